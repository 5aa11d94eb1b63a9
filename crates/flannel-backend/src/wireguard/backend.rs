//! The backend: lease data out, peers in, the userspace device in between.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, LeaseKey, NetworkConfig, WireguardData};
use flannel_net::netlink::{Netlink, Route, RT_SCOPE_LINK};
use flannel_udp::wireguard::device::{Device, DeviceCounters, Handles};
use flannel_udp::wireguard::{uapi, PeerSpec, Sessions};
use ipnet::IpNet;
use serde_json::value::RawValue;
use tracing::{info, warn};

use super::config::WireguardConfig;
use super::key::{key_file_path, PrivateKey};
use crate::{
    Backend, BackendError, ExternalInterface, PacketStats, PacketStatsSource, RTPROT_FLANNEL,
};

/// Upstream's IPv4 device name.
pub const DEVICE: &str = "flannel-wg";

/// Present when the kernel has its WireGuard module loaded (or built in).
const KERNEL_MODULE: &str = "/sys/module/wireguard";

/// For `flanneld --cleanup`: stops the fd keeper of `flannel-wg` (the device goes
/// with it) and removes the UAPI socket, in the calling thread's network
/// namespace. Ok(false) when there was nothing to remove.
pub fn cleanup() -> Result<bool, BackendError> {
    let device = flannel_udp::remove_device(DEVICE)
        .map_err(BackendError::kernel(format!("remove {DEVICE}")))?;
    let path = uapi::socket_path(DEVICE);
    let socket = match std::fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(BackendError::Other(format!(
                "removing {}: {e}",
                path.display()
            )))
        }
    };
    Ok(device || socket)
}

pub struct WireguardBackend {
    cfg: WireguardConfig,
    ext: ExternalInterface,
    nl: Netlink,
    sessions: Option<Arc<Mutex<Sessions>>>,
    device: Option<Device>,
    uapi: Option<tokio::task::JoinHandle<()>>,
    /// Made before the device so that metrics can hold it from the start.
    counters: Arc<DeviceCounters>,
    /// A copy of the device's socket, to greet new peers the moment they are added.
    greeter: Option<std::net::UdpSocket>,
    /// The peer each lease stands for, by lease key.
    peers: BTreeMap<LeaseKey, PeerSpec>,
}

impl WireguardBackend {
    pub fn new(raw: &RawValue, ext: ExternalInterface, nl: Netlink) -> Result<Self, BackendError> {
        Ok(WireguardBackend {
            cfg: WireguardConfig::parse(raw, false)?,
            ext,
            nl,
            sessions: None,
            device: None,
            uapi: None,
            counters: Arc::new(DeviceCounters::default()),
            greeter: None,
            peers: BTreeMap::new(),
        })
    }

    /// The peer a lease describes; `None` (with a warning) for a lease that is not a
    /// usable wireguard lease.
    fn peer_of(&self, l: &Lease) -> Option<PeerSpec> {
        if l.attrs.backend_type != "wireguard" {
            warn!(lease = %l.key, backend = %l.attrs.backend_type, "peer lease is not a wireguard lease; not added");
            return None;
        }
        let data = match l.attrs.backend_data.as_deref().map(WireguardData::decode) {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                warn!(lease = %l.key, error = %e, "peer lease has unusable wireguard data; not added");
                return None;
            }
            None => {
                warn!(lease = %l.key, "peer lease has no wireguard data; not added");
                return None;
            }
        };
        Some(PeerSpec {
            public_key: data.public_key,
            endpoint: SocketAddr::V4(SocketAddrV4::new(
                l.attrs.public_ip,
                data.port_or(self.cfg.listen_port),
            )),
            allowed_ips: vec![IpNet::V4(l.subnet())],
            psk: self.cfg.psk.as_ref().map(|p| p.0),
            keepalive: self.cfg.keepalive_secs,
        })
    }

    /// Makes the sessions hold exactly `self.peers` (a changed key replaces the
    /// old peer).
    fn push_peers(&mut self) {
        let Some(s) = &self.sessions else { return };
        let Ok(mut s) = s.lock() else { return };
        let wanted: std::collections::HashSet<_> =
            self.peers.values().map(|p| p.public_key).collect();
        for (key, _) in s.peers() {
            if !wanted.contains(&key.public_key) {
                s.remove_peer(&key.public_key);
            }
        }
        for p in self.peers.values() {
            s.set_peer(p.clone());
        }
        if let Some(sock) = &self.greeter {
            let mut out = [0u8; 256];
            s.greet(&mut out, |d, to| {
                // Best effort: boringtun retries a lost initiation after 5 s.
                let _ = sock.send_to(d, to);
            });
        }
    }

    fn public_ip(&self) -> Result<Ipv4Addr, BackendError> {
        self.ext.public_ip.or(self.ext.addr).ok_or_else(|| {
            BackendError::Config(format!(
                "wireguard backend: interface {} has no IPv4 address",
                self.ext.name
            ))
        })
    }
}

#[async_trait]
impl Backend for WireguardBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        if config.enable_ipv6 || !config.enable_ipv4 {
            return Err(BackendError::Config(
                "wireguard: IPv6 (EnableIPv6) is not supported by this backend yet".into(),
            ));
        }
        let path = key_file_path();
        let key = PrivateKey::load_or_create(&path)?;
        let public_key = key.public_key();
        // No key material in the log, not even the public key (it is in the lease).
        info!(key_file = %path.display(), "wireguard key loaded");
        self.sessions = Some(Arc::new(Mutex::new(Sessions::new(key.secret().clone()))));
        let mut attrs = LeaseAttrs::new(self.public_ip()?);
        attrs.backend_type = "wireguard".into();
        attrs.backend_data = Some(
            WireguardData {
                public_key,
                port: self.cfg.listen_port,
            }
            .encode(),
        );
        Ok(attrs)
    }

    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError> {
        let network = config.network.ok_or_else(|| {
            BackendError::Config("wireguard backend needs an IPv4 Network".into())
        })?;
        let sessions = self
            .sessions
            .clone()
            .ok_or_else(|| BackendError::Other("wireguard: start before register".into()))?;
        let listen = SocketAddr::from(([0, 0, 0, 0], self.cfg.listen_port));
        let keep = flannel_udp::keeper::hook_installed();
        let inherited = if keep {
            match Handles::inherit(DEVICE, listen) {
                Ok(h) => h,
                Err(e) => {
                    warn!(device = DEVICE, error = %e, "cannot take over the previous device; making a new one");
                    None
                }
            }
        } else {
            None
        };
        let handles = match inherited {
            Some(h) => h,
            None => {
                // As upstream: a device left from before is replaced.
                if let Some(old) = self
                    .nl
                    .link_by_name(DEVICE)
                    .await
                    .map_err(BackendError::kernel(format!("look up {DEVICE}")))?
                {
                    self.nl
                        .link_del(old.index)
                        .await
                        .map_err(BackendError::kernel(format!("delete the old {DEVICE}")))?;
                }
                let h = Handles::open(DEVICE, listen)
                    .map_err(BackendError::kernel(format!("open {DEVICE}")))?;
                if keep {
                    if let Err(e) = h.keep(DEVICE) {
                        warn!(device = DEVICE, error = %e, "cannot start the fd keeper; a restart will drop packets until the new agent is up");
                    }
                }
                h
            }
        };
        let inherited = handles.inherited;
        self.greeter = match handles.sock.try_clone() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot copy the wireguard socket; new peers are greeted at the next tick");
                None
            }
        };
        let device = Device::start_with(handles, sessions.clone(), self.counters.clone())
            .map_err(BackendError::kernel(format!("start {DEVICE}")))?;
        let index = flannel_udp::netconf::configure(
            &self.nl,
            DEVICE,
            own.subnet().network(),
            self.mtu(),
            network,
            RTPROT_FLANNEL,
        )
        .await
        .map_err(BackendError::kernel(format!("configure {DEVICE}")))?;
        // Upstream's route is scope link: the peers are behind the device itself.
        let route = Route::new(IpNet::V4(network.trunc()))
            .dev(index)
            .scope(RT_SCOPE_LINK)
            .protocol(RTPROT_FLANNEL);
        self.nl
            .route_replace(&route)
            .await
            .map_err(BackendError::kernel(format!(
                "route {network} dev {DEVICE}"
            )))?;
        self.uapi = Some(
            uapi::serve(DEVICE, self.cfg.listen_port, sessions)
                .map_err(|e| BackendError::Other(format!("wireguard UAPI socket: {e}")))?,
        );
        self.device = Some(device);
        let kernel_module = std::path::Path::new(KERNEL_MODULE).exists();
        info!(
            device = DEVICE,
            port = self.cfg.listen_port,
            mtu = self.mtu(),
            inherited,
            data_path = "userspace",
            kernel_wireguard = kernel_module,
            "wireguard backend started: userspace data path (boringtun sessions on TUN {DEVICE}, one queue, batched TUN/UDP I/O with offloads){}",
            if kernel_module {
                "; the kernel's wireguard module is present, but its device is not used yet"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn mtu(&self) -> u32 {
        self.cfg.device_mtu(self.ext.mtu)
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        self.peers = peers
            .iter()
            .filter_map(|l| Some((l.key, self.peer_of(l)?)))
            .collect();
        self.push_peers();
        Ok(())
    }

    fn packet_stats(&self) -> Option<PacketStatsSource> {
        let c = self.counters.clone();
        Some(Arc::new(move || {
            use std::sync::atomic::Ordering::Relaxed;
            PacketStats {
                tx_packets: c.tx_packets.load(Relaxed),
                tx_bytes: c.tx_bytes.load(Relaxed),
                rx_packets: c.rx_packets.load(Relaxed),
                rx_bytes: c.rx_bytes.load(Relaxed),
                drops: c.drops(),
            }
        }))
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<(), BackendError> {
        for e in events {
            match e {
                LeaseEvent::Added(l) | LeaseEvent::Changed { current: l, .. } => {
                    match self.peer_of(l) {
                        Some(p) => self.peers.insert(l.key, p),
                        None => self.peers.remove(&l.key),
                    };
                }
                LeaseEvent::Removed(l) => {
                    self.peers.remove(&l.key);
                }
            }
        }
        self.push_peers();
        Ok(())
    }
}

impl Drop for WireguardBackend {
    fn drop(&mut self) {
        if let Some(u) = self.uapi.take() {
            u.abort();
            let _ = std::fs::remove_file(uapi::socket_path(DEVICE));
        }
    }
}
