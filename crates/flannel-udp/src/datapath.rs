//! Opening the TUN and sockets (probing each kernel feature once), and running the
//! workers.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{info, warn};

use crate::counters::Counters;
use crate::engine::{self, WorkerConfig};
use crate::keeper;
use crate::peers::{Peer, PeerTable, SharedPeers};
use crate::sock;
use crate::tun::{self, QueueFlags};
use crate::UdpError;

/// How the data path talks to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// virtio-net header on the TUN (TSO/USO/checksum offloads), UDP GSO/GRO where
    /// the kernel has them. The wire format is unchanged.
    Offload,
    /// Like upstream: IFF_TUN|IFF_NO_PI, one read/write and one datagram per packet
    /// (sendmmsg/recvmmsg batching only).
    Plain,
}

/// What to open.
#[derive(Debug, Clone)]
pub struct Config {
    /// Device name or template (`flannel%d`, upstream's default, gives flannel0).
    pub tun_name: String,
    /// `<iface addr>:<Port>`: the socket sends from and listens on it.
    pub bind: SocketAddrV4,
    /// The device's address (own subnet IP): source of ICMP net-unreachable.
    pub tun_addr: Ipv4Addr,
    pub mode: Mode,
    /// TUN queues = worker pairs; 0 = one per CPU (at most 8; plain mode: 1).
    pub queues: usize,
    /// Keep the device (and its address and route) when the process exits, so a
    /// restarted agent re-attaches without the path going dark. Upstream's TUN is
    /// not persistent; `flanneld --cleanup` removes ours ([`remove_device`]).
    pub persist: bool,
    /// Hand the open queues and sockets to a keeper process so that packets queue
    /// (instead of being dropped) while the agent is down, and the next agent picks
    /// them up. Needs `persist` and the binary's `main` to call
    /// [`keeper::run_if_requested`] first thing.
    pub keeper: bool,
}

/// Kernel features in use (each probed at open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    pub vnet_hdr: bool,
    pub vnet_le: bool,
    /// TUN_F_* offload bits accepted by the device.
    pub tun_offload: u32,
    pub multi_queue: bool,
    pub udp_gso: bool,
    pub udp_gro: bool,
    pub queues: usize,
    /// The queues and sockets came from a keeper (restart without a gap).
    pub inherited: bool,
    /// The keeper this data path started (None when inherited or disabled).
    pub keeper_pid: Option<u32>,
}

struct Queue {
    tun: OwnedFd,
    sock: OwnedFd,
}

/// The running (or ready) data path of one TUN device.
pub struct DataPath {
    name: String,
    cfg: Config,
    features: Features,
    queues: Vec<Queue>,
    peers: Arc<SharedPeers>,
    counters: Arc<Counters>,
    stop: OwnedFd,
    threads: Vec<JoinHandle<()>>,
}

fn eventfd() -> Result<OwnedFd, UdpError> {
    // SAFETY: eventfd(2) with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(UdpError::io("eventfd", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh fd, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl DataPath {
    /// Opens (or re-attaches to) the TUN device and binds the sockets, in the
    /// calling thread's network namespace. Workers start with [`DataPath::start`].
    pub fn open(cfg: &Config) -> Result<DataPath, UdpError> {
        let mut cfg = cfg.clone();
        if !cfg.persist {
            cfg.keeper = false;
        }
        let want_vnet = cfg.mode == Mode::Offload;
        let queues = match (cfg.queues, cfg.mode) {
            (0, Mode::Offload) => cpus().min(8),
            (0, Mode::Plain) => 1,
            (n, _) => n.min(64),
        };
        if cfg.keeper {
            match Self::inherit(&cfg, want_vnet) {
                Ok(Some(dp)) => return Ok(dp),
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "cannot take over the previous data path; opening a new one")
                }
            }
        }
        let features = tun::supported_flags().unwrap_or(0);
        let mq_ok = features & libc::IFF_MULTI_QUEUE != 0;
        let vnet_ok = features & libc::IFF_VNET_HDR != 0;
        if want_vnet && !vnet_ok {
            warn!("TUN has no virtio-net header support; falling back to plain per-packet I/O");
        }
        let multi_queue = mq_ok && (queues > 1 || cfg.persist);
        if queues > 1 && !mq_ok {
            warn!("TUN has no multi-queue support; falling back to one queue");
        }
        let queues = if mq_ok { queues } else { 1 };
        let mut flags = QueueFlags {
            vnet_hdr: want_vnet && vnet_ok,
            multi_queue,
        };
        let (first, name) = match tun::open_queue(&cfg.tun_name, flags) {
            Ok(q) => q,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // A persistent device left by an earlier run with other flags.
                warn!(device = %cfg.tun_name, error = %e, "existing TUN device has other flags; recreating it");
                remove_link_by_name(&cfg.tun_name);
                tun::open_queue(&cfg.tun_name, flags).map_err(|e| UdpError::io("open TUN", e))?
            }
            Err(e) => return Err(UdpError::io("open TUN", e)),
        };
        let mut vnet_le = cfg!(target_endian = "little");
        let mut offload = 0u32;
        if flags.vnet_hdr {
            vnet_le = tun::set_vnet_le(first.as_raw_fd());
            let mut last_err = None;
            for (bits, what) in tun::OFFLOAD_CHOICES {
                match tun::set_offload(first.as_raw_fd(), bits) {
                    Ok(()) => {
                        offload = bits;
                        if bits != tun::OFFLOAD_CHOICES[0].0 {
                            warn!(using = what, error = ?last_err, "TUN offloads partly unavailable");
                        }
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            if offload == 0 {
                warn!(error = ?last_err, "TUN offloads unavailable; reading plain packets with a vnet header");
            }
        }
        if let Err(e) = tun::set_persist(first.as_raw_fd(), cfg.persist) {
            if cfg.persist {
                warn!(error = %e, "cannot make the TUN persistent; it vanishes with the process");
            }
        }
        let mut tun_fds = vec![first];
        for _ in 1..queues {
            match tun::open_queue(&name, flags) {
                Ok((q, _)) => {
                    if flags.vnet_hdr {
                        tun::set_vnet_le(q.as_raw_fd());
                        let _ = tun::set_offload(q.as_raw_fd(), offload);
                    }
                    tun_fds.push(q);
                }
                Err(e) => {
                    warn!(error = %e, queues = tun_fds.len(), "cannot open more TUN queues");
                    break;
                }
            }
        }
        flags.multi_queue = multi_queue;
        let reuse = tun_fds.len() > 1 || cfg.keeper;
        let mut qs = Vec::with_capacity(tun_fds.len());
        for t in tun_fds {
            let s = sock::bind(cfg.bind, reuse)
                .map_err(|e| UdpError::io(format!("bind UDP {}", cfg.bind), e))?;
            qs.push(Queue { tun: t, sock: s });
        }
        let mut f = Features {
            vnet_hdr: flags.vnet_hdr,
            vnet_le,
            tun_offload: offload,
            multi_queue,
            udp_gso: false,
            udp_gro: false,
            queues: qs.len(),
            inherited: false,
            keeper_pid: None,
        };
        Self::probe_udp(&cfg, &mut f, &qs);
        if cfg.keeper {
            let tuns: Vec<RawFd> = qs.iter().map(|q| q.tun.as_raw_fd()).collect();
            let socks: Vec<RawFd> = qs.iter().map(|q| q.sock.as_raw_fd()).collect();
            match keeper::spawn(&name, &tuns, &socks) {
                Ok(pid) => f.keeper_pid = Some(pid),
                Err(e) => {
                    warn!(error = %e, "cannot start the fd keeper; a restart will drop packets until the new agent is up")
                }
            }
        }
        Self::log_features(&name, &cfg, &f);
        Ok(DataPath {
            name,
            cfg,
            features: f,
            queues: qs,
            peers: Arc::new(SharedPeers::default()),
            counters: Arc::new(Counters::default()),
            stop: eventfd()?,
            threads: Vec::new(),
        })
    }

    fn probe_udp(cfg: &Config, f: &mut Features, qs: &[Queue]) {
        if cfg.mode == Mode::Plain {
            return;
        }
        match sock::probe_gso() {
            Ok(()) => f.udp_gso = true,
            Err(e) => {
                warn!(error = %e, "UDP GSO unavailable; sending one datagram per packet (batched)")
            }
        }
        f.udp_gro = true;
        for q in qs {
            if let Err(e) = sock::enable_gro(q.sock.as_raw_fd()) {
                warn!(error = %e, "UDP GRO unavailable; receiving one datagram per packet (batched)");
                f.udp_gro = false;
                break;
            }
        }
    }

    fn log_features(name: &str, cfg: &Config, f: &Features) {
        info!(
            device = name,
            bind = %cfg.bind,
            mode = ?cfg.mode,
            queues = f.queues,
            vnet_hdr = f.vnet_hdr,
            tun_offload = f.tun_offload,
            udp_gso = f.udp_gso,
            udp_gro = f.udp_gro,
            persist = cfg.persist,
            inherited = f.inherited,
            "udp data path ready"
        );
    }

    /// Takes over the queues and sockets a keeper holds for this device.
    fn inherit(cfg: &Config, want_vnet: bool) -> Result<Option<DataPath>, UdpError> {
        let Some(got) = keeper::fetch(&cfg.tun_name).map_err(|e| UdpError::io("keeper", e))? else {
            return Ok(None);
        };
        let mismatch = |why: String| {
            let _ = keeper::stop(&cfg.tun_name);
            Err(UdpError::Inherit(why))
        };
        if got.tun.is_empty() || got.tun.len() != got.socks.len() {
            return mismatch(format!(
                "{} queues and {} sockets",
                got.tun.len(),
                got.socks.len()
            ));
        }
        let mut name = String::new();
        let mut vnet = false;
        for t in &got.tun {
            let (n, fl) =
                tun::queue_info(t.as_raw_fd()).map_err(|e| UdpError::io("TUNGETIFF", e))?;
            if n != cfg.tun_name {
                return mismatch(format!(
                    "the keeper of {} handed over a queue of {n}",
                    cfg.tun_name
                ));
            }
            name = n;
            vnet = fl.vnet_hdr;
        }
        if vnet != want_vnet {
            return mismatch(format!(
                "device {name} has vnet_hdr={vnet}, mode wants {want_vnet}"
            ));
        }
        for s in &got.socks {
            let a = sock::local_addr(s.as_raw_fd()).map_err(|e| UdpError::io("getsockname", e))?;
            if a != cfg.bind {
                return mismatch(format!("socket bound to {a}, config wants {}", cfg.bind));
            }
        }
        let qs: Vec<Queue> = got
            .tun
            .into_iter()
            .zip(got.socks)
            .map(|(tun, sock)| Queue { tun, sock })
            .collect();
        let mut f = Features {
            vnet_hdr: vnet,
            vnet_le: cfg!(target_endian = "little"),
            tun_offload: 0,
            multi_queue: true,
            udp_gso: false,
            udp_gro: false,
            queues: qs.len(),
            inherited: true,
            keeper_pid: None,
        };
        if vnet {
            f.vnet_le = tun::set_vnet_le(qs[0].tun.as_raw_fd());
            for (bits, _) in tun::OFFLOAD_CHOICES {
                if qs
                    .iter()
                    .all(|q| tun::set_offload(q.tun.as_raw_fd(), bits).is_ok())
                {
                    f.tun_offload = bits;
                    break;
                }
            }
        }
        Self::probe_udp(cfg, &mut f, &qs);
        Self::log_features(&name, cfg, &f);
        Ok(Some(DataPath {
            name,
            cfg: cfg.clone(),
            features: f,
            queues: qs,
            peers: Arc::new(SharedPeers::default()),
            counters: Arc::new(Counters::default()),
            stop: eventfd()?,
            threads: Vec::new(),
        }))
    }

    /// The device's name (e.g. flannel0).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn features(&self) -> Features {
        self.features
    }

    /// Shared counters (plain atomics) for metrics.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Replaces the set of peers (takes effect on the workers' next batch).
    pub fn set_peers(&self, peers: impl IntoIterator<Item = Peer>) {
        self.peers
            .replace(PeerTable::new(peers, self.cfg.bind.port()));
    }

    pub fn is_running(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Starts the workers (idempotent).
    pub fn start(&mut self) -> Result<(), UdpError> {
        if self.is_running() {
            return Ok(());
        }
        for (i, q) in self.queues.iter().enumerate() {
            let wc = Arc::new(WorkerConfig {
                tun: q.tun.as_raw_fd(),
                sock: q.sock.as_raw_fd(),
                stop: self.stop.as_raw_fd(),
                vnet: self.features.vnet_hdr,
                vnet_le: self.features.vnet_le,
                udp_gso: self.features.udp_gso,
                udp_gro: self.features.udp_gro,
                tun_addr: self.cfg.tun_addr,
                peers: self.peers.clone(),
                counters: self.counters.clone(),
            });
            let w = wc.clone();
            let tx = std::thread::Builder::new()
                .name(format!("udp-encap{i}"))
                .spawn(move || engine::encap_loop(&w))
                .map_err(|e| UdpError::io("spawn worker", e))?;
            self.threads.push(tx);
            let rx = std::thread::Builder::new()
                .name(format!("udp-decap{i}"))
                .spawn(move || engine::decap_loop(&wc))
                .map_err(|e| UdpError::io("spawn worker", e))?;
            self.threads.push(rx);
        }
        Ok(())
    }

    /// Stops the workers and closes our fds (a keeper's copies stay open).
    pub fn stop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Deletes a TUN device by name through its queue: attach, clear persistence,
/// close. Best effort; used when flags changed.
fn remove_link_by_name(name: &str) {
    for mq in [true, false] {
        for vnet in [true, false] {
            if let Ok((fd, _)) = tun::open_queue(
                name,
                QueueFlags {
                    vnet_hdr: vnet,
                    multi_queue: mq,
                },
            ) {
                let _ = tun::set_persist(fd.as_raw_fd(), false);
                return;
            }
        }
    }
}

/// Removes a persistent device and its keeper (for `flanneld --cleanup`), in the
/// calling thread's network namespace. Ok(false) when there was nothing to remove.
pub fn remove_device(name: &str) -> Result<bool, UdpError> {
    let had_keeper = keeper::stop(name).unwrap_or(false);
    // The keeper's queues close when it exits; give it a moment.
    for _ in 0..50 {
        if keeper::fetch_probe(name) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        } else {
            break;
        }
    }
    let exists = std::ffi::CString::new(name)
        // SAFETY: a valid NUL-terminated name; if_nametoindex only reads it.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
        .unwrap_or(false);
    if exists {
        remove_link_by_name(name);
    }
    Ok(had_keeper || exists)
}
