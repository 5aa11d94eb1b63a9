//! rtnetlink plumbing: links, addresses, routes, neighbours and bridge FDB entries.
//!
//! Every write is idempotent in the way a reconciler needs: adding what already
//! exists replaces it (`NLM_F_CREATE | NLM_F_REPLACE`), deleting what is already gone
//! succeeds. Requests are independent futures on one socket, so callers can keep many
//! in flight at once with [`Netlink::run_batch`]; the kernel handles each rtnetlink
//! request synchronously, so a few hundred in flight saturate it.
//!
//! A [`Netlink`] is bound to the namespace its socket was opened in (see
//! [`Netlink::connect_in`]); sysctl writes made through it go to the same namespace.

mod addr;
mod batch;
mod codec;
mod error;
mod iface;
mod link;
mod neigh;
mod route;
mod types;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};

use crate::netns::run_maybe_in_netns;

pub use batch::WriteOp;
pub use error::{Cause, NetlinkError};
pub use iface::{IfAddr, Interface};
pub use types::{Address, FdbEntry, LinkInfo, Neighbour, Route, RouteFilter, VxlanInfo, VxlanSpec};

/// The route protocol flannel-rs marks its routes with (`ip route` shows `proto 70`;
/// add `70 flannel` to `/etc/iproute2/rt_protos.d/flannel.conf` for a name). It is
/// not used by any routing daemon we know of. Routes left by Go flanneld carry
/// [`RTPROT_BOOT`] instead; backends adopt those where they can tell they are
/// flannel's (inside the cluster network, on flannel's devices).
pub const RTPROT_FLANNEL: u8 = 70;
/// `proto boot`: what `ip route add` and Go flanneld's routes carry.
pub const RTPROT_BOOT: u8 = 3;
/// `proto kernel`: routes the kernel derives from addresses.
pub const RTPROT_KERNEL: u8 = 2;
/// The main routing table.
pub const RT_TABLE_MAIN: u32 = 254;
/// Route scopes (`rtm_scope`).
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
pub const RT_SCOPE_HOST: u8 = 254;
/// Route types (`rtm_type`).
pub const RTN_UNICAST: u8 = 1;
pub const RTN_LOCAL: u8 = 2;
pub const RTN_BLACKHOLE: u8 = 6;
/// Neighbour states and flags.
pub const NUD_PERMANENT: u16 = 0x80;
pub const NUD_NOARP: u16 = 0x40;
pub const NTF_SELF: u8 = 0x02;

/// How many requests [`Netlink::run_batch`] keeps in flight by default. Each
/// outstanding reply occupies socket receive buffer; the buffer is sized for this.
pub const DEFAULT_WINDOW: usize = 512;
const RCVBUF_BYTES: i32 = 8 * 1024 * 1024;

/// IPv4 or IPv6, for dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
    fn af(self) -> AddressFamily {
        match self {
            IpFamily::V4 => AddressFamily::Inet,
            IpFamily::V6 => AddressFamily::Inet6,
        }
    }
}

/// A route-netlink connection (one socket, many concurrent requests). Cheap to clone.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    netns: Option<Arc<PathBuf>>,
    window: usize,
    /// The kernel runs one dump per socket at a time (a second one fails with
    /// EBUSY); dumps through this connection take turns.
    dump_turn: Arc<tokio::sync::Mutex<()>>,
    /// The blocking socket of [`write_batch`](Self::write_batch), opened on first use.
    batch: batch::SharedBatch,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("netns", &self.netns)
            .field("window", &self.window)
            .finish()
    }
}

fn open_socket() -> io::Result<Socket> {
    let s = Socket::new(NETLINK_ROUTE)?;
    // Replies to pipelined requests queue up in the receive buffer; when it is full
    // the kernel drops them (ENOBUFS). Root may exceed rmem_max with RCVBUFFORCE.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let size: libc::c_int = RCVBUF_BYTES;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: fd is a valid socket owned by `s`; `size` outlives the call and
        // `len` is its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
    }
    Ok(s)
}

impl Netlink {
    /// Connects in the process's own network namespace.
    pub async fn connect() -> Result<Netlink, NetlinkError> {
        Self::open(None).await
    }

    /// Connects inside the network namespace bind-mounted at `netns` (e.g.
    /// [`crate::netns::netns_path`]`("h1")`). The socket is created on a short-lived
    /// std thread that entered the namespace; no tokio thread changes namespace.
    pub async fn connect_in(netns: impl Into<PathBuf>) -> Result<Netlink, NetlinkError> {
        Self::open(Some(netns.into())).await
    }

    async fn open(netns: Option<PathBuf>) -> Result<Netlink, NetlinkError> {
        let op = || match &netns {
            Some(p) => format!("open netlink socket in {}", p.display()),
            None => "open netlink socket".to_string(),
        };
        let sock = run_maybe_in_netns(netns.as_deref(), open_socket)
            .await
            .map_err(|e| NetlinkError::new(op(), e.into()))?
            .map_err(|e| NetlinkError::new(op(), Cause::Io(e)))?;
        // SAFETY: the descriptor comes straight from `Socket::into_raw_fd`, so it is a
        // valid, open netlink socket whose ownership moves into the TokioSocket.
        let sock = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
        let (conn, handle, _unsolicited) = rtnetlink::from_socket(sock);
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            netns: netns.map(Arc::new),
            window: DEFAULT_WINDOW,
            dump_turn: Arc::new(tokio::sync::Mutex::new(())),
            batch: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    /// The underlying rtnetlink handle (same socket), for requests not wrapped here.
    /// The kernel allows one dump per socket at a time: do not run a dump through
    /// it while this connection may be dumping (open another connection instead).
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// The namespace this connection works in (`None`: the process's own).
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref().map(|p| p.as_path())
    }

    /// Sets how many requests [`run_batch`](Self::run_batch) keeps in flight.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Runs the futures with at most `window` in flight and returns their outputs
    /// in completion order (tag them if the order matters).
    pub async fn run_batch<T, F>(&self, futures: impl IntoIterator<Item = F>) -> Vec<T>
    where
        F: Future<Output = T>,
    {
        stream::iter(futures)
            .buffer_unordered(self.window)
            .collect()
            .await
    }

    async fn exchange(
        &self,
        payload: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Cause> {
        let mut req = NetlinkMessage::from(payload);
        req.header.flags = flags;
        let mut handle = self.handle.clone();
        let mut replies = handle.request(req).map_err(|_| Cause::Closed)?;
        let mut out = Vec::new();
        while let Some(msg) = replies.next().await {
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(Cause::Errno(-code.get()));
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    async fn ack(&self, payload: RouteNetlinkMessage, extra: u16) -> Result<(), Cause> {
        self.exchange(payload, NLM_F_REQUEST | NLM_F_ACK | extra)
            .await
            .map(|_| ())
    }

    async fn dump(&self, payload: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, Cause> {
        let _turn = self.dump_turn.lock().await;
        self.exchange(payload, NLM_F_REQUEST | NLM_F_DUMP).await
    }
}

/// `10.5.2.0/24 via 10.5.2.0 dev #7 onlink`, for messages.
pub fn describe_route(r: &Route) -> String {
    let mut s = r.dst.to_string();
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(o) = r.oif {
        s.push_str(&format!(" dev #{o}"));
    }
    if r.onlink {
        s.push_str(" onlink");
    }
    if r.table != RT_TABLE_MAIN {
        s.push_str(&format!(" table {}", r.table));
    }
    s
}
