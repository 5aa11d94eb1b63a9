//! The WireGuard data path on flannel-udp's batched machinery: TUN with a
//! virtio-net header (TSO super-packets in, split into MTU-sized inner packets
//! before encryption; TCP segments coalesced into GSO writes out), UDP GSO for the
//! runs of equal-sized encrypted datagrams a super-packet becomes, UDP GRO and
//! recvmmsg in, sendmmsg out. Buffers are allocated once per thread.
//!
//! One thread each way and one for the timers. Encryption runs on the TUN-reading
//! thread and decryption on the UDP-reading one: on 2 cores a separate crypto
//! stage only adds hand-offs (see docs/compatibility.md, "wireguard"). The session
//! lock is taken per packet, so that neither direction waits for the other's batch.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use super::segment;
use super::{Action, DropReason, Sessions};
use crate::counters::CounterValues;
use crate::keeper;
use crate::rx::{Decap, RxPlan};
use crate::sock::{self, Receiver, Sender};
use crate::tun::{self, QueueFlags};
use crate::tx::{Dgram, TxBatch};
use crate::vnet::VNET_HDR_LEN;
use crate::UdpError;

/// How often boringtun's timers run (its own device ticks every 250 ms).
const TICK: Duration = Duration::from_millis(250);
/// A TUN read: a 64 KiB GSO packet plus its vnet header, with slack.
const READ_BUF: usize = 65536 + VNET_HDR_LEN + 256;
/// TUN reads gathered before one sendmmsg...
const TX_READS: usize = 16;
/// ...or this many inner bytes: sending while the data is still in cache beats
/// bigger batches.
const TX_FLUSH_BYTES: usize = 64 * 1024;
/// The encrypted datagrams of one batch: TX_FLUSH_BYTES plus one more full read,
/// with WireGuard's 32 bytes per packet, and room for a handshake.
const TX_ARENA: usize = 2 * 65536 + 64 * 1024;
/// Room boringtun needs beyond the inner packet (data header + tag; a handshake
/// initiation is 148 bytes). boringtun panics on a smaller buffer.
const HEADROOM: usize = 256;
/// Datagrams (or GRO batches of up to 64 KiB) per recvmmsg.
const RX_BATCH: usize = 8;
const RX_BUF: usize = 65536 + 64;
/// Handshake messages and packets boringtun queued during a handshake.
const AUX_BUF: usize = 65536 + HEADROOM;

/// Packets carried and dropped, by reason.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    drops: Mutex<HashMap<&'static str, u64>>,
}

impl DeviceCounters {
    fn drop_n(&self, r: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut d) = self.drops.lock() {
            *d.entry(r.label()).or_default() += n;
        }
    }

    /// Drops so far, by reason label.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self
            .drops
            .lock()
            .map(|d| d.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Drops of one batch, added to the shared counters once.
#[derive(Default)]
struct DropTally([u64; 8]);

impl DropTally {
    fn add(&mut self, r: DropReason) {
        self.0[r as usize] += 1;
    }

    fn flush(&mut self, c: &DeviceCounters) {
        use DropReason as R;
        for r in [
            R::NoPeer,
            R::UnknownKey,
            R::AuthFailed,
            R::Replay,
            R::Malformed,
            R::SourceNotAllowed,
            R::UnderLoad,
            R::Other,
        ] {
            c.drop_n(r, std::mem::take(&mut self.0[r as usize]));
        }
    }
}

/// What the device found the kernel supports (one log line at start).
#[derive(Debug, Clone, Copy)]
struct Offloads {
    vnet: bool,
    vnet_le: bool,
    udp_gso: bool,
    udp_gro: bool,
    /// The socket is AF_INET6 (dual-stack).
    v6_socket: bool,
}

/// A running device: stops (threads joined) when dropped; the TUN device goes with
/// its last queue.
pub struct Device {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<DeviceCounters>,
}

impl Device {
    /// Creates TUN `name` (or opens it) and starts carrying packets between it and
    /// a UDP socket bound to `listen`.
    pub fn start(
        name: &str,
        listen: SocketAddr,
        sessions: Arc<Mutex<Sessions>>,
    ) -> Result<Device, UdpError> {
        Self::start_with(
            Handles::open(name, listen)?,
            sessions,
            Arc::new(DeviceCounters::default()),
        )
    }

    /// Starts carrying packets over handles already open (fresh or from a
    /// keeper), counting into `counters` (which the caller may have handed to
    /// metrics before the device existed).
    pub fn start_with(
        handles: Handles,
        sessions: Arc<Mutex<Sessions>>,
        counters: Arc<DeviceCounters>,
    ) -> Result<Device, UdpError> {
        let Handles {
            tun, sock, device, ..
        } = handles;
        let v6_socket = sock
            .local_addr()
            .map_err(|e| UdpError::io("getsockname", e))?
            .is_ipv6();
        // The loops poll; an inherited socket may come from an agent that read
        // with a timeout instead.
        sock.set_nonblocking(true)
            .map_err(|e| UdpError::io("UDP socket non-blocking", e))?;
        let off = Offloads {
            v6_socket,
            ..offloads(&device, tun.as_raw_fd(), sock.as_raw_fd())?
        };
        info!(
            device = %device,
            vnet_hdr = off.vnet,
            udp_gso = off.udp_gso,
            udp_gro = off.udp_gro,
            "wireguard data path: userspace (boringtun) on TUN, batched I/O"
        );
        let tun = Arc::new(tun);
        let sock = Arc::new(sock);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (tun, sock, sessions, stop, c) = (
                tun.clone(),
                sock.clone(),
                sessions.clone(),
                stop.clone(),
                counters.clone(),
            );
            threads.push(spawn("wg-tx", move || {
                outbound(tun.as_raw_fd(), sock.as_raw_fd(), off, &sessions, &stop, &c)
            }));
        }
        {
            let (tun, sock, sessions, stop, c) = (
                tun.clone(),
                sock.clone(),
                sessions.clone(),
                stop.clone(),
                counters.clone(),
            );
            threads.push(spawn("wg-rx", move || {
                inbound(tun.as_raw_fd(), sock.as_raw_fd(), off, &sessions, &stop, &c)
            }));
        }
        {
            let (sock, stop) = (sock.clone(), stop.clone());
            threads.push(spawn("wg-timers", move || {
                let mut out = vec![0u8; AUX_BUF];
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    if let Ok(mut s) = sessions.lock() {
                        s.tick(&mut out, |d, to| {
                            send_one(sock.as_raw_fd(), v6_socket, d, to)
                        });
                    }
                }
            }));
        }
        Ok(Device {
            stop,
            threads,
            counters,
        })
    }

    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The kernel objects a device runs on: its TUN queue and UDP socket. Obtained
/// fresh, or from the fd keeper that held them while no agent ran (so packets
/// waited in the TUN queue and the socket buffer instead of being dropped).
pub struct Handles {
    pub tun: OwnedFd,
    pub sock: UdpSocket,
    /// The TUN device's name.
    pub device: String,
    /// They came from a keeper: the device with its address and route survived.
    pub inherited: bool,
}

impl Handles {
    /// Creates TUN `name` (or attaches to it) and binds a UDP socket to `listen`.
    /// An IPv6 `listen` gives a dual-stack socket: peers of both families on one
    /// port, as a kernel WireGuard device listens.
    pub fn open(name: &str, listen: SocketAddr) -> Result<Handles, UdpError> {
        let tun = open_tun(name)?;
        let sock = match listen {
            SocketAddr::V4(a) => sock::bind(a, false),
            SocketAddr::V6(a) => sock::bind6(a, false),
        }
        .map_err(|e| UdpError::io(format!("bind UDP {listen}"), e))?;
        Ok(Handles {
            tun,
            sock: UdpSocket::from(sock),
            device: name.to_string(),
            inherited: false,
        })
    }

    /// Takes over the TUN queue and socket the keeper of `name` holds, in this
    /// network namespace. Ok(None) when no keeper runs. Handles that do not fit
    /// (another device, a multi-queue TUN, another port) are an error, and the
    /// keeper is told to exit so the device can be made anew. A queue with or
    /// without a virtio-net header both fit: the device adapts its offloads.
    pub fn inherit(name: &str, listen: SocketAddr) -> Result<Option<Handles>, UdpError> {
        let Some(mut got) = keeper::fetch(name).map_err(|e| UdpError::io("keeper", e))? else {
            return Ok(None);
        };
        let refuse = |why: String| {
            let _ = keeper::stop(name);
            Err(UdpError::Inherit(why))
        };
        if got.tun.len() != 1 || got.socks.len() != 1 {
            return refuse(format!(
                "the keeper of {name} holds {} TUN queues and {} sockets, not 1 and 1",
                got.tun.len(),
                got.socks.len()
            ));
        }
        let (tun, sock) = (got.tun.remove(0), got.socks.remove(0));
        let (dev, flags) =
            tun::queue_info(tun.as_raw_fd()).map_err(|e| UdpError::io("TUNGETIFF", e))?;
        if dev != name || flags.multi_queue {
            return refuse(format!(
                "the keeper of {name} holds a queue of {dev} (multi_queue={})",
                flags.multi_queue
            ));
        }
        let sock = UdpSocket::from(sock);
        match sock.local_addr() {
            Ok(a) if a.port() == listen.port() && a.is_ipv6() == listen.is_ipv6() => {}
            Ok(a) => return refuse(format!("the keeper's socket is bound to {a}, not {listen}")),
            Err(e) => return Err(UdpError::io("getsockname", e)),
        }
        Ok(Some(Handles {
            tun,
            sock,
            device: name.to_string(),
            inherited: true,
        }))
    }

    /// Hands copies of the handles to a keeper process for `name` (this binary
    /// re-executed; see [`keeper`]), so they outlive the agent. Returns its pid.
    pub fn keep(&self, name: &str) -> std::io::Result<u32> {
        keeper::spawn(name, &[self.tun.as_raw_fd()], &[self.sock.as_raw_fd()])
    }
}

/// Opens the device's TUN queue, with a virtio-net header when the kernel has it.
fn open_tun(name: &str) -> Result<OwnedFd, UdpError> {
    let features = tun::supported_flags().unwrap_or(0);
    let vnet_ok = features & libc::IFF_VNET_HDR != 0;
    if !vnet_ok {
        warn!("TUN has no virtio-net header support; reading one plain packet at a time");
    }
    let plain = QueueFlags {
        vnet_hdr: false,
        multi_queue: false,
    };
    let flags = QueueFlags {
        vnet_hdr: vnet_ok,
        ..plain
    };
    match tun::open_queue(name, flags) {
        Ok((fd, _)) => Ok(fd),
        Err(e) if vnet_ok && e.raw_os_error() == Some(libc::EINVAL) => {
            // A device left with other flags (say, by an earlier version): the
            // plain path still works on it.
            warn!(device = name, error = %e, "TUN device exists with other flags; using it without a virtio-net header");
            tun::open_queue(name, plain)
                .map(|(fd, _)| fd)
                .map_err(|e| UdpError::io(format!("open TUN {name}"), e))
        }
        Err(e) => Err(UdpError::io(format!("open TUN {name}"), e)),
    }
}

/// The offloads a device's queue and socket give, switched on where they are
/// missing (again, for inherited handles: the calls are idempotent), with one
/// warning per missing piece.
fn offloads(name: &str, tun: RawFd, sock: RawFd) -> Result<Offloads, UdpError> {
    let (_, flags) = tun::queue_info(tun).map_err(|e| UdpError::io("TUNGETIFF", e))?;
    let vnet = flags.vnet_hdr;
    let mut vnet_le = cfg!(target_endian = "little");
    if vnet {
        vnet_le = tun::set_vnet_le(tun);
        let mut last_err = None;
        let mut got = None;
        let best = tun::WG_OFFLOAD_CHOICES[0].1;
        for (bits, what) in tun::WG_OFFLOAD_CHOICES {
            match tun::set_offload(tun, bits) {
                Ok(()) => {
                    got = Some(what);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        match got {
            Some(w) if w != best => {
                warn!(device = name, using = w, error = ?last_err, "TUN offloads partly unavailable")
            }
            Some(_) => {}
            None => {
                warn!(device = name, error = ?last_err, "TUN offloads unavailable; reading plain packets with a vnet header")
            }
        }
    }
    // UDP_SEGMENT is a UDP-level option: the probe's family does not matter.
    let udp_gso = match sock::probe_gso() {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "UDP GSO unavailable; one encrypted datagram per send");
            false
        }
    };
    let udp_gro = match sock::enable_gro(sock) {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "UDP GRO unavailable; one datagram per receive slot");
            false
        }
    };
    Ok(Offloads {
        vnet,
        vnet_le,
        udp_gso,
        udp_gro,
        v6_socket: false,
    })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawning a data path thread")
}

/// One datagram by sendto (handshakes, cookies, timers); failures are not retried:
/// WireGuard's timers resend.
fn send_one(fd: RawFd, v6_socket: bool, d: &[u8], to: SocketAddr) {
    if to.is_ipv6() && !v6_socket {
        return;
    }
    // SAFETY: sockaddr_in6 is plain old data; name_of fills it.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let len = sock::name_of(to, v6_socket, &mut sa);
    // SAFETY: d and sa are live for the call; sendto reads them only.
    unsafe {
        libc::sendto(
            fd,
            d.as_ptr().cast(),
            d.len(),
            libc::MSG_DONTWAIT,
            (&sa as *const libc::sockaddr_in6).cast(),
            len,
        );
    }
}

/// TUN → split → encrypt → UDP.
fn outbound(
    tun: RawFd,
    sock: RawFd,
    off: Offloads,
    sessions: &Mutex<Sessions>,
    stop: &AtomicBool,
    c: &DeviceCounters,
) {
    let mut read = vec![0u8; READ_BUF].into_boxed_slice();
    let mut seg: Vec<u8> = Vec::with_capacity(READ_BUF);
    let mut arena = [vec![0u8; TX_ARENA].into_boxed_slice()];
    let mut batch = TxBatch::with_capacity(TX_READS);
    let mut sender = if off.v6_socket {
        Sender::new_v6(off.udp_gso)
    } else {
        Sender::new(off.udp_gso)
    };
    let mut drops = DropTally::default();
    let mut tally = CounterValues::default();
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        let (mut reads, mut bytes, mut used) = (0usize, 0usize, 0usize);
        let (mut packets, mut inner_bytes) = (0u64, 0u64);
        let mut failed = false;
        while reads < TX_READS && bytes < TX_FLUSH_BYTES {
            let n = match tun::read(tun, &mut read) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "TUN read failed; wireguard transmit stops");
                    failed = true;
                    break;
                }
            };
            reads += 1;
            bytes += n;
            let out = &mut arena[0];
            let r = segment::split(&mut read[..n], off.vnet, off.vnet_le, &mut seg, |inner| {
                if used + inner.len() + HEADROOM > out.len() {
                    // The arena is sized for a full batch; a batch this large can
                    // only come from a peer-less flood: drop rather than grow.
                    drops.add(DropReason::Other);
                    return;
                }
                // Locked per packet, not per read: the receive thread's
                // decryption (a TCP flow's ACKs) must not wait for a whole
                // super-packet's encryption. Uncontended, the lock costs ~20 ns.
                let Ok(mut s) = sessions.lock() else { return };
                match s.encapsulate(inner, &mut out[used..]) {
                    Action::Send { len, to } if to.is_ipv4() || off.v6_socket => {
                        batch.dgrams.push(datagram(to, used, len));
                        used += len;
                        packets += 1;
                        inner_bytes += inner.len() as u64;
                    }
                    Action::Send { .. } => drops.add(DropReason::Other),
                    Action::Dropped(r) => drops.add(r),
                    Action::Deliver { .. } | Action::Nothing => {}
                }
            });
            if r.is_err() {
                drops.add(DropReason::Malformed);
            }
        }
        if !batch.dgrams.is_empty() {
            sender.send(sock, &batch, &arena, &mut tally);
            c.tx_packets.fetch_add(packets, Ordering::Relaxed);
            c.tx_bytes.fetch_add(inner_bytes, Ordering::Relaxed);
        }
        drops.flush(c);
        if failed {
            return;
        }
        if reads == 0 {
            let _ = tun::wait_fd(tun, libc::POLLIN, TICK.as_millis() as i32, None);
        }
    }
}

fn datagram(dst: SocketAddr, at: usize, len: usize) -> Dgram {
    Dgram {
        dst,
        buf: 0,
        hdr_start: 0,
        hdr_len: 0,
        body_start: at as u32,
        body_len: len as u32,
    }
}

/// UDP → decrypt → TUN (and handshake answers back to UDP).
fn inbound(
    tun: RawFd,
    sock: RawFd,
    off: Offloads,
    sessions: &Mutex<Sessions>,
    stop: &AtomicBool,
    c: &DeviceCounters,
) {
    let mut rx = Receiver::new(RX_BATCH, RX_BUF);
    // Every received byte can become at most one plaintext byte.
    let mut plain = vec![0u8; RX_BATCH * RX_BUF].into_boxed_slice();
    let mut aux = vec![0u8; AUX_BUF].into_boxed_slice();
    let mut pkts: Vec<(u32, u32)> = Vec::with_capacity(RX_BATCH * 64);
    let mut plan = RxPlan::with_capacity();
    let mut decap = Decap::new(off.vnet, off.vnet_le);
    decap.trust_checksums = true;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(80);
    let mut drops = DropTally::default();
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        let n = match rx.recv(sock) {
            Ok(n) => n,
            Err(e) => {
                if !warned {
                    warn!(error = %e, "UDP receive failed (further failures not logged)");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        if n == 0 {
            let _ = tun::wait_fd(sock, libc::POLLIN, TICK.as_millis() as i32, None);
            continue;
        }
        pkts.clear();
        let mut used = 0usize;
        {
            for i in 0..n {
                let r = rx.got[i];
                if r.truncated {
                    drops.add(DropReason::Malformed);
                    continue;
                }
                let from = SocketAddr::new(r.from, r.port);
                let buf = &rx.bufs[i][..r.len];
                let stride = if r.stride == 0 || r.stride > r.len {
                    r.len.max(1)
                } else {
                    r.stride
                };
                for d in buf.chunks(stride) {
                    // Per datagram, as on the transmit side.
                    let Ok(mut s) = sessions.lock() else { return };
                    match s.decapsulate(from, d, &mut plain[used..]) {
                        Action::Deliver { len } => {
                            pkts.push((used as u32, len as u32));
                            used += len;
                        }
                        Action::Send { len, to } => {
                            send_one(sock, off.v6_socket, &plain[used..used + len], to);
                            // A completed handshake releases what was queued meanwhile.
                            s.flush(from, &mut aux, |d, to| send_one(sock, off.v6_socket, d, to));
                        }
                        Action::Dropped(r) => drops.add(r),
                        Action::Nothing => {
                            s.flush(from, &mut aux, |d, to| send_one(sock, off.v6_socket, d, to))
                        }
                    }
                }
            }
        }
        drops.flush(c);
        if pkts.is_empty() {
            continue;
        }
        plan.clear();
        decap.packets(&plain[..used], &pkts, &mut plan);
        let (mut packets, mut bytes) = (0u64, 0u64);
        for w in &plan.writes {
            plan.iovecs(w, &plain[..], off.vnet, &mut iov);
            if tun::writev(tun, &iov).is_ok() {
                packets += u64::from(w.packets);
                bytes += u64::from(w.bytes);
            }
        }
        c.rx_packets.fetch_add(packets, Ordering::Relaxed);
        c.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}
