//! Many writes in few system calls: requests packed back to back into one datagram.
//!
//! The kernel runs every rtnetlink message of a datagram in turn inside the
//! `sendmsg` call and queues one ack per message, so a few hundred route writes cost
//! one `sendmsg` and a few `recv`s instead of a request/reply round trip each
//! through the async connection (wake-up, channel, reply stream per request). That
//! round trip, not the kernel, was most of programming 5000 peers. Writes go
//! through a second, blocking socket of the same namespace, on a blocking-pool
//! thread: the kernel work of a chunk takes milliseconds and must not stall the
//! runtime.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flannel_core::MacAddr;
use rtnetlink::packet_core::{
    NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::route::{RouteFlags, RouteProtocol, RouteScope};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{Socket, SocketAddr};

use super::codec::route_message;
use super::*;

/// Messages per datagram. Their acks (a few hundred bytes of socket buffer each)
/// must fit the receive buffer before they are read.
const CHUNK: usize = 256;
/// Datagram size cap; rtnetlink requests are ~100 bytes.
const MAX_DATAGRAM: usize = 64 * 1024;
/// How long to wait for acks the kernel owes (it queues them before `sendmsg`
/// returns, so this only bounds a broken socket).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const NLMSG_ERROR: u16 = 2;

/// One kernel write of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    RouteReplace(Route),
    /// Gone already is success.
    RouteDel(Route),
    NeighReplace {
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    },
    /// Gone already is success.
    NeighDel {
        index: u32,
        ip: IpAddr,
    },
    FdbReplace {
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    },
    /// Gone already is success.
    FdbDel {
        index: u32,
        mac: MacAddr,
        dst: Option<IpAddr>,
    },
}

impl WriteOp {
    /// The request, with the flags beyond REQUEST|ACK, as the single-request
    /// methods send it.
    fn message(&self) -> (RouteNetlinkMessage, u16) {
        match self {
            WriteOp::RouteReplace(r) => (
                RouteNetlinkMessage::NewRoute(route_message(r)),
                NLM_F_CREATE | NLM_F_REPLACE,
            ),
            WriteOp::RouteDel(r) => {
                let mut m = route_message(r);
                m.header.protocol = RouteProtocol::Unspec;
                m.header.scope = RouteScope::NoWhere;
                m.header.flags = RouteFlags::empty();
                (RouteNetlinkMessage::DelRoute(m), 0)
            }
            WriteOp::NeighReplace { index, ip, mac } => (
                RouteNetlinkMessage::NewNeighbour(Netlink::neigh_message(*index, *ip, Some(*mac))),
                NLM_F_CREATE | NLM_F_REPLACE,
            ),
            WriteOp::NeighDel { index, ip } => (
                RouteNetlinkMessage::DelNeighbour(Netlink::neigh_message(*index, *ip, None)),
                0,
            ),
            WriteOp::FdbReplace { index, mac, dst } => (
                RouteNetlinkMessage::NewNeighbour(Netlink::fdb_message(*index, *mac, Some(*dst))),
                NLM_F_CREATE | NLM_F_REPLACE,
            ),
            WriteOp::FdbDel { index, mac, dst } => (
                RouteNetlinkMessage::DelNeighbour(Netlink::fdb_message(*index, *mac, *dst)),
                0,
            ),
        }
    }

    /// Whether the kernel's `errno` means done (deleting what is gone).
    fn accepts(&self, errno: i32) -> bool {
        match self {
            WriteOp::RouteDel(_) => errno == libc::ESRCH,
            WriteOp::NeighDel { .. } | WriteOp::FdbDel { .. } => {
                errno == libc::ENOENT || errno == libc::ENODEV
            }
            _ => false,
        }
    }

    /// What was attempted, for an error message.
    pub fn describe(&self) -> String {
        match self {
            WriteOp::RouteReplace(r) => format!("replace route {}", describe_route(r)),
            WriteOp::RouteDel(r) => format!("delete route {}", describe_route(r)),
            WriteOp::NeighReplace { index, ip, mac } => {
                format!("replace neighbour {ip} lladdr {mac} on link #{index}")
            }
            WriteOp::NeighDel { index, ip } => format!("delete neighbour {ip} on link #{index}"),
            WriteOp::FdbReplace { index, mac, dst } => {
                format!("replace fdb {mac} dst {dst} on link #{index}")
            }
            WriteOp::FdbDel { index, mac, .. } => format!("delete fdb {mac} on link #{index}"),
        }
    }
}

/// The blocking socket writes go through, shared by clones of a [`Netlink`].
pub(crate) struct BatchSocket {
    sock: Socket,
    next_seq: u32,
}

impl BatchSocket {
    pub(crate) fn open() -> io::Result<BatchSocket> {
        let sock = super::open_socket()?;
        // Acks without a copy of the request: 36 bytes instead of the whole message.
        sock.set_cap_ack(true)?;
        let tv = libc::timeval {
            tv_sec: ACK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        // SAFETY: fd is a valid socket owned by `sock`; `tv` outlives the call and
        // the length is its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BatchSocket { sock, next_seq: 1 })
    }

    /// Sends `ops` in chunks and collects one result per op, in order.
    fn run(&mut self, ops: &[WriteOp]) -> Vec<Result<(), Cause>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut buf = Vec::with_capacity(MAX_DATAGRAM);
        let mut rx = vec![0u8; MAX_DATAGRAM];
        let mut i = 0;
        while i < ops.len() {
            buf.clear();
            let first_seq = self.next_seq;
            let start = i;
            while i < ops.len() && i - start < CHUNK && buf.len() < MAX_DATAGRAM - 1024 {
                let (payload, extra) = ops[i].message();
                let mut m = NetlinkMessage::from(payload);
                m.header.flags = NLM_F_REQUEST | NLM_F_ACK | extra;
                m.header.sequence_number = self.next_seq;
                m.finalize();
                let at = buf.len();
                buf.resize(at + m.buffer_len(), 0);
                m.serialize(&mut buf[at..]);
                self.next_seq = self.next_seq.wrapping_add(1).max(1);
                i += 1;
            }
            let n = i - start;
            let mut results: Vec<Option<Result<(), Cause>>> = (0..n).map(|_| None).collect();
            if let Err(e) = self.sock.send_to(&buf, &SocketAddr::new(0, 0), 0) {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                out.extend((0..n).map(|_| Err(Cause::Errno(errno))));
                continue;
            }
            let mut pending = n;
            while pending > 0 {
                let len = match self.sock.recv(&mut &mut rx[..], 0) {
                    Ok(l) => l.min(rx.len()),
                    Err(e) => {
                        // A lost ack (ENOBUFS) or a timeout: the rest is unknown,
                        // which a caller must treat as failed (a reconcile retries).
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        for r in results.iter_mut().filter(|r| r.is_none()) {
                            *r = Some(Err(Cause::Errno(errno)));
                        }
                        break;
                    }
                };
                for (seq, code) in acks(&rx[..len]) {
                    let k = seq.wrapping_sub(first_seq) as usize;
                    let Some(slot) = results.get_mut(k).filter(|s| s.is_none()) else {
                        continue;
                    };
                    let errno = -code;
                    *slot = Some(if errno == 0 || ops[start + k].accepts(errno) {
                        Ok(())
                    } else {
                        Err(Cause::Errno(errno))
                    });
                    pending -= 1;
                }
            }
            out.extend(
                results
                    .into_iter()
                    .map(|r| r.unwrap_or(Err(Cause::Unexpected("no ack".into())))),
            );
        }
        out
    }
}

/// The (sequence number, error code) of every ack in a datagram from the kernel.
fn acks(mut data: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let ty = u16::from_ne_bytes([data[4], data[5]]);
        let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        if len < 16 || len > data.len() {
            break;
        }
        if ty == NLMSG_ERROR && len >= 20 {
            let code = i32::from_ne_bytes([data[16], data[17], data[18], data[19]]);
            out.push((seq, code));
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        data = &data[next.min(data.len())..];
    }
    out
}

impl Netlink {
    /// Runs the writes in order, many per system call, and returns one result per
    /// op in the same order. A failed op does not stop the ones after it (as with
    /// [`run_batch`](Self::run_batch)).
    pub async fn write_batch(&self, ops: Vec<WriteOp>) -> Vec<Result<(), NetlinkError>> {
        if ops.is_empty() {
            return Vec::new();
        }
        let sock = self.batch.clone();
        let netns = self.netns.clone();
        let ops = Arc::new(ops);
        let job = {
            let ops = ops.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<Result<(), Cause>>, Cause> {
                let mut guard = sock.lock().map_err(|_| Cause::Closed)?;
                if guard.is_none() {
                    // The socket belongs to the connection's namespace.
                    let s = match netns.as_deref() {
                        Some(p) => crate::netns::run_in_netns(p, BatchSocket::open)??,
                        None => BatchSocket::open()?,
                    };
                    *guard = Some(s);
                }
                let s = guard.as_mut().ok_or(Cause::Closed)?;
                Ok(s.run(&ops))
            })
        };
        let results = match job.await {
            Ok(Ok(r)) => r,
            Ok(Err(c)) => {
                let text = c.to_string();
                return ops
                    .iter()
                    .map(|op| {
                        Err(NetlinkError::new(
                            op.describe(),
                            Cause::Unexpected(text.clone()),
                        ))
                    })
                    .collect();
            }
            Err(e) => {
                return ops
                    .iter()
                    .map(|op| {
                        Err(NetlinkError::new(
                            op.describe(),
                            Cause::Unexpected(format!("netlink batch task: {e}")),
                        ))
                    })
                    .collect()
            }
        };
        results
            .into_iter()
            .zip(ops.iter())
            .map(|(r, op)| r.map_err(|c| NetlinkError::new(op.describe(), c)))
            .collect()
    }
}

/// The lazily opened batch socket of one connection.
pub(crate) type SharedBatch = Arc<Mutex<Option<BatchSocket>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_read_by_sequence_number() {
        let mut d = Vec::new();
        for (seq, code) in [(7u32, 0i32), (8, -17)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&code.to_ne_bytes());
            d.extend_from_slice(&[0u8; 16]);
        }
        assert_eq!(acks(&d), vec![(7, 0), (8, -17)]);
        // A truncated or nonsense header ends the walk instead of panicking.
        assert_eq!(acks(&d[..40]), vec![(7, 0)]);
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(acks(&bad).is_empty());
    }

    #[test]
    fn deletes_accept_gone_and_writes_do_not() {
        let r = Route::new("10.5.2.0/24".parse().unwrap());
        assert!(WriteOp::RouteDel(r.clone()).accepts(libc::ESRCH));
        assert!(!WriteOp::RouteReplace(r).accepts(libc::ESRCH));
        let ip: IpAddr = "10.5.2.0".parse().unwrap();
        assert!(WriteOp::NeighDel { index: 3, ip }.accepts(libc::ENOENT));
        assert!(!WriteOp::NeighReplace {
            index: 3,
            ip,
            mac: MacAddr([2, 0, 0, 0, 0, 1])
        }
        .accepts(libc::ENOENT));
    }
}
