//! The backend: lease data out, peers in, the userspace devices in between.
//!
//! Device layout by `Mode`, as upstream: `separate` runs `flannel-wg` for IPv4
//! and, with `EnableIPv6`, `flannel-wg-v6` for IPv6 on `ListenPortV6` (alone in an
//! IPv6-only network, the one case where the other modes are refused); `auto`,
//! `ipv4` and `ipv6` run `flannel-wg` alone, each peer on it with both its
//! subnets, reached over the family the mode picks. One key for every device.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, LeaseKey, NetworkConfig, WireguardData};
use flannel_net::netlink::{IpFamily, Netlink, Route, RT_SCOPE_LINK};
use flannel_udp::wireguard::device::{Device, DeviceCounters, Handles};
use flannel_udp::wireguard::{uapi, PeerSpec, Sessions};
use ipnet::{IpNet, Ipv6Net};
use serde_json::value::RawValue;
use tracing::{info, warn};

use super::config::{Mode, WireguardConfig};
use super::key::{key_file_path, PrivateKey};
use crate::peers::Warnings;
use crate::{
    Backend, BackendError, ExternalInterface, PacketStats, PacketStatsSource, RTPROT_FLANNEL,
};

/// Upstream's IPv4 device name (and the single device's, in the one-device modes).
pub const DEVICE: &str = "flannel-wg";
/// Upstream's IPv6 device in `separate` mode.
pub const DEVICE_V6: &str = "flannel-wg-v6";

/// Present when the kernel has its WireGuard module loaded (or built in).
const KERNEL_MODULE: &str = "/sys/module/wireguard";

/// For `flanneld --cleanup`: stops the fd keepers of `flannel-wg` and
/// `flannel-wg-v6` (each device goes with its keeper) and removes their UAPI
/// sockets, in the calling thread's network namespace. Ok(false) when there was
/// nothing to remove.
pub fn cleanup() -> Result<bool, BackendError> {
    let mut any = false;
    for dev in [DEVICE, DEVICE_V6] {
        any |= flannel_udp::remove_device(dev)
            .map_err(BackendError::kernel(format!("remove {dev}")))?;
        let path = uapi::socket_path(dev);
        any |= match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(BackendError::Other(format!(
                    "removing {}: {e}",
                    path.display()
                )))
            }
        };
    }
    Ok(any)
}

/// Whether `auto` mode reaches a peer over IPv6 (upstream's `selectMode`): only
/// when the peer has a PublicIPv6, and not if its IPv4 address is public while we
/// have IPv4 ourselves, and then only if both its and our IPv6 addresses are
/// non-ULA (Go's `IsPrivate`: fc00::/7). Anything else goes over IPv4.
pub fn auto_uses_ipv6(
    remote4: Ipv4Addr,
    remote6: Option<Ipv6Addr>,
    local4: bool,
    local6: Option<Ipv6Addr>,
) -> bool {
    let ula = |ip: Ipv6Addr| ip.segments()[0] & 0xfe00 == 0xfc00;
    let Some(remote6) = remote6 else {
        return false;
    };
    if !remote4.is_private() && local4 {
        return false;
    }
    !ula(remote6) && local6.is_some_and(|l| !ula(l))
}

/// Which `Mode`s an IPv6-only network (`EnableIPv4: false`) can run. `separate`
/// runs `flannel-wg-v6` alone, as upstream does. Upstream's one-device modes are
/// refused: they still work out an IPv4 endpoint (`ipv4` always, `auto` unless
/// both IPv6 addresses are non-ULA, `0.0.0.0:<port>` in an IPv6-only network) and
/// ask for a route to the IPv4 Network that does not exist (Go's zero network,
/// `0.0.0.0/0`, on `flannel-wg`); neither is anything a peer could rely on.
pub fn ipv6_only_mode_ok(mode: Mode, ipv4: bool, ipv6: bool) -> Result<(), BackendError> {
    if ipv4 || !ipv6 || mode == Mode::Separate {
        return Ok(());
    }
    Err(BackendError::Config(format!(
        "wireguard: Mode {:?} is not supported in an IPv6-only network (EnableIPv4 false); use Mode \"separate\" (the default), which runs {DEVICE_V6} alone",
        format!("{mode:?}").to_lowercase()
    )))
}

/// One userspace device: its sessions, data path, UAPI socket and peers.
struct Dev {
    name: &'static str,
    port: u16,
    listen: SocketAddr,
    /// IPv6 is routed into it.
    carries_v6: bool,
    sessions: Arc<Mutex<Sessions>>,
    device: Option<Device>,
    /// The opened handles until the first peers are known: the data path starts
    /// only then, so that what waited in the TUN queue across a restart is not
    /// read while there is no peer to send it to.
    pending: Option<(Handles, Arc<DeviceCounters>)>,
    uapi: Option<tokio::task::JoinHandle<()>>,
    /// A copy of the device's socket, to greet new peers the moment they are added.
    greeter: Option<std::net::UdpSocket>,
    /// The peer each lease stands for, by lease key.
    peers: BTreeMap<LeaseKey, PeerSpec>,
}

impl Dev {
    /// Makes the sessions hold exactly `self.peers` (a changed key replaces the
    /// old peer).
    fn push_peers(&mut self) -> Result<(), BackendError> {
        self.set_sessions();
        if let Some((handles, counters)) = self.pending.take() {
            self.device = Some(
                Device::start_with(handles, self.sessions.clone(), counters)
                    .map_err(BackendError::kernel(format!("start {}", self.name)))?,
            );
        }
        Ok(())
    }

    fn set_sessions(&mut self) {
        let Ok(mut s) = self.sessions.lock() else {
            return;
        };
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

    /// Takes over the keeper's handles or makes the device anew, and starts it.
    async fn open(
        &mut self,
        nl: &Netlink,
        counters: Arc<DeviceCounters>,
    ) -> Result<bool, BackendError> {
        let name = self.name;
        let keep = flannel_udp::keeper::hook_installed();
        let inherited = if keep {
            match Handles::inherit(name, self.listen) {
                Ok(h) => h,
                Err(e) => {
                    warn!(device = name, error = %e, "cannot take over the previous device; making a new one");
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
                if let Some(old) = nl
                    .link_by_name(name)
                    .await
                    .map_err(BackendError::kernel(format!("look up {name}")))?
                {
                    nl.link_del(old.index)
                        .await
                        .map_err(BackendError::kernel(format!("delete the old {name}")))?;
                }
                let h = Handles::open(name, self.listen)
                    .map_err(BackendError::kernel(format!("open {name}")))?;
                if keep {
                    if let Err(e) = h.keep(name) {
                        warn!(device = name, error = %e, "cannot start the fd keeper; a restart will drop packets until the new agent is up");
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
        self.pending = Some((handles, counters));
        Ok(inherited)
    }

    fn serve_uapi(&mut self) -> Result<(), BackendError> {
        self.uapi = Some(
            uapi::serve(self.name, self.port, self.sessions.clone())
                .map_err(|e| BackendError::Other(format!("wireguard UAPI socket: {e}")))?,
        );
        Ok(())
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(u) = self.uapi.take() {
            u.abort();
            let _ = std::fs::remove_file(uapi::socket_path(self.name));
        }
    }
}

/// `<addr>/128` as the device's only address inside `network`, and the route
/// `<network> dev <device> scope link`, as upstream's `ConfigureV6`.
async fn configure_v6(
    nl: &Netlink,
    index: u32,
    name: &str,
    addr: Ipv6Addr,
    network: Ipv6Net,
) -> Result<(), BackendError> {
    let network = network.trunc();
    let err = |what: String| BackendError::kernel(format!("{what} on {name}"));
    let mut have = false;
    for a in nl
        .addresses(IpFamily::V6, Some(index))
        .await
        .map_err(err("list IPv6 addresses".into()))?
    {
        let IpAddr::V6(ip) = a.addr else { continue };
        if ip == addr && a.prefix_len == 128 {
            have = true;
        } else if network.contains(&ip) {
            nl.addr_del(index, a.addr, a.prefix_len)
                .await
                .map_err(err(format!("delete {ip}/{}", a.prefix_len)))?;
        }
    }
    if !have {
        nl.addr_add(index, IpAddr::V6(addr), 128)
            .await
            .map_err(err(format!("add {addr}/128")))?;
    }
    let route = Route::new(IpNet::V6(network))
        .dev(index)
        .scope(RT_SCOPE_LINK)
        .protocol(RTPROT_FLANNEL);
    nl.route_replace(&route)
        .await
        .map_err(BackendError::kernel(format!("route {network} dev {name}")))
}

pub struct WireguardBackend {
    cfg: WireguardConfig,
    ext: ExternalInterface,
    nl: Netlink,
    /// `flannel-wg`: IPv4 in `separate` mode, both families in the others.
    dev: Option<Dev>,
    /// `flannel-wg-v6`: `separate` mode with IPv6.
    dev6: Option<Dev>,
    /// Made before the devices so that metrics can hold it from the start; both
    /// devices count into it.
    counters: Arc<DeviceCounters>,
    /// The network config enables IPv4 (false: IPv6-only, `flannel-wg-v6` alone).
    ipv4: bool,
    /// The network config enables IPv6.
    ipv6: bool,
    /// Warnings about leases' IPv6 parts, once per lease.
    warnings6: Warnings,
}

impl WireguardBackend {
    pub fn new(raw: &RawValue, ext: ExternalInterface, nl: Netlink) -> Result<Self, BackendError> {
        Ok(WireguardBackend {
            cfg: WireguardConfig::parse(raw)?,
            ext,
            nl,
            dev: None,
            dev6: None,
            counters: Arc::new(DeviceCounters::default()),
            ipv4: true,
            ipv6: false,
            warnings6: Warnings::default(),
        })
    }

    /// The wireguard data a lease carries in `field`; `None` (with a warning) when
    /// the lease is not a usable wireguard lease.
    fn data_of(l: &Lease, raw: Option<&RawValue>) -> Result<WireguardData, String> {
        match raw.map(WireguardData::decode) {
            Some(Ok(d)) => Ok(d),
            Some(Err(e)) => Err(format!("unusable wireguard data ({e})")),
            None => Err(format!("no wireguard data (lease {})", l.key)),
        }
    }

    fn type_ok(l: &Lease) -> bool {
        if l.attrs.backend_type != "wireguard" {
            warn!(lease = %l.key, backend = %l.attrs.backend_type, "peer lease is not a wireguard lease; not added");
            return false;
        }
        true
    }

    /// The IPv4 peer a lease describes (`separate` mode's `flannel-wg`); `None`
    /// (with a warning) for a lease that is not a usable wireguard lease.
    fn peer_of(&self, l: &Lease) -> Option<PeerSpec> {
        if !Self::type_ok(l) {
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

    /// The peer a lease describes on `flannel-wg-v6`: its IPv6 subnet at
    /// `[PublicIPv6]:<BackendV6Data Port>`. A lease without a usable IPv6 part is
    /// warned about once and left off this device (its IPv4 peer stays).
    fn peer6_of(&mut self, l: &Lease) -> Option<PeerSpec> {
        if l.attrs.backend_type != "wireguard" {
            return None;
        }
        let why = match (l.ipv6_subnet(), l.attrs.public_ipv6) {
            (None, _) => Err("it has no IPv6 subnet".to_string()),
            (Some(_), None) => Err("it has no PublicIPv6".to_string()),
            (Some(net6), Some(ip6)) => match Self::data_of(l, l.attrs.backend_v6_data.as_deref()) {
                Ok(d) => Ok((net6, ip6, d)),
                Err(e) => Err(format!("its BackendV6Data has {e}")),
            },
        };
        match why {
            Ok((net6, ip6, d)) => {
                self.warnings6.clear(&l.key);
                Some(PeerSpec {
                    public_key: d.public_key,
                    endpoint: SocketAddr::V6(SocketAddrV6::new(
                        ip6,
                        d.port_or(self.cfg.listen_port_v6),
                        0,
                        0,
                    )),
                    allowed_ips: vec![IpNet::V6(net6.trunc())],
                    psk: self.cfg.psk.as_ref().map(|p| p.0),
                    keepalive: self.cfg.keepalive_secs,
                })
            }
            Err(why) => {
                let stays = if self.dev.is_some() {
                    format!(" (its IPv4 peer on {DEVICE} stays)")
                } else {
                    String::new()
                };
                self.warnings6
                    .warn(l.key, format!("{why}: not added to {DEVICE_V6}{stays}"));
                None
            }
        }
    }

    /// The peer a lease describes in the one-device modes: both subnets, one
    /// endpoint by mode (upstream: the key of BackendV6Data when the lease has an
    /// IPv6 part, else of BackendData).
    fn peer_single_of(&mut self, l: &Lease) -> Option<PeerSpec> {
        if !Self::type_ok(l) {
            return None;
        }
        let d4 = Self::data_of(l, l.attrs.backend_data.as_deref());
        let net6 = l.ipv6_subnet().filter(|_| self.ipv6);
        let d6 = net6.map(|_| Self::data_of(l, l.attrs.backend_v6_data.as_deref()));
        if let Some(Err(e)) = &d6 {
            self.warnings6.warn(
                l.key,
                format!("its BackendV6Data has {e}: using BackendData's key"),
            );
        }
        let d6 = d6.and_then(Result::ok);
        let key = match (&d6, &d4) {
            (Some(d), _) | (None, Ok(d)) => d.public_key,
            (None, Err(e)) => {
                warn!(lease = %l.key, error = %e, "peer lease has no usable wireguard data; not added");
                return None;
            }
        };
        let port4 = d4
            .as_ref()
            .map(|d| d.port_or(self.cfg.listen_port))
            .unwrap_or(self.cfg.listen_port);
        let port6 = d6.map(|d| d.port_or(port4)).unwrap_or(port4);
        let v6 = match self.cfg.mode {
            Mode::Ipv6 => true,
            Mode::Auto => auto_uses_ipv6(
                l.attrs.public_ip,
                l.attrs.public_ipv6,
                self.ext.addr.is_some(),
                self.ext.public_ipv6.or(self.ext.addr6),
            ),
            Mode::Ipv4 | Mode::Separate => false,
        };
        let endpoint = if v6 {
            let Some(ip6) = l.attrs.public_ipv6 else {
                self.warnings6.warn(
                    l.key,
                    "it has no PublicIPv6, which Mode \"ipv6\" needs: not added".into(),
                );
                return None;
            };
            SocketAddr::V6(SocketAddrV6::new(ip6, port6, 0, 0))
        } else {
            SocketAddr::V4(SocketAddrV4::new(l.attrs.public_ip, port4))
        };
        let mut allowed_ips = vec![IpNet::V4(l.subnet())];
        allowed_ips.extend(net6.map(|n| IpNet::V6(n.trunc())));
        Some(PeerSpec {
            public_key: key,
            endpoint,
            allowed_ips,
            psk: self.cfg.psk.as_ref().map(|p| p.0),
            keepalive: self.cfg.keepalive_secs,
        })
    }

    /// Sets lease `l`'s peers on the devices (or removes them, for `None`).
    fn set_lease(&mut self, l: &Lease) {
        let single = self.cfg.mode.single_device();
        let p4 = if self.dev.is_none() {
            // IPv6-only: the type is judged here, as peer_of would have.
            if !Self::type_ok(l) {
                if let Some(d) = &mut self.dev6 {
                    d.peers.remove(&l.key);
                }
                return;
            }
            None
        } else if single {
            self.peer_single_of(l)
        } else {
            self.peer_of(l)
        };
        let p6 = if self.dev6.is_some() {
            self.peer6_of(l)
        } else {
            None
        };
        if let Some(d) = &mut self.dev {
            match p4 {
                Some(p) => d.peers.insert(l.key, p),
                None => d.peers.remove(&l.key),
            };
        }
        if let Some(d) = &mut self.dev6 {
            match p6 {
                Some(p) => d.peers.insert(l.key, p),
                None => d.peers.remove(&l.key),
            };
        }
    }

    fn push_peers(&mut self) -> Result<(), BackendError> {
        for d in [&mut self.dev, &mut self.dev6].into_iter().flatten() {
            d.push_peers()?;
        }
        Ok(())
    }

    fn public_ip(&self) -> Result<Ipv4Addr, BackendError> {
        self.ext.public_ip.or(self.ext.addr).ok_or_else(|| {
            BackendError::Config(format!(
                "wireguard backend: interface {} has no IPv4 address",
                self.ext.name
            ))
        })
    }

    fn startup_line(&self, d: &Dev, inherited: bool) {
        let kernel_module = std::path::Path::new(KERNEL_MODULE).exists();
        info!(
            device = d.name,
            port = d.port,
            mtu = self.mtu(),
            inherited,
            data_path = "userspace",
            kernel_wireguard = kernel_module,
            "wireguard backend started: userspace data path (boringtun sessions on TUN {}, one queue, batched TUN/UDP I/O with offloads){}",
            d.name,
            if kernel_module {
                "; the kernel's wireguard module is present, but its device is not used yet"
            } else {
                ""
            }
        );
    }
}

#[async_trait]
impl Backend for WireguardBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        let mode = self.cfg.mode;
        ipv6_only_mode_ok(mode, config.enable_ipv4, config.enable_ipv6)?;
        self.ipv4 = config.enable_ipv4;
        self.ipv6 = config.enable_ipv6;
        let addr6 = self.ext.public_ipv6.or(self.ext.addr6);
        let needs_v6_underlay = mode == Mode::Ipv6 || (mode == Mode::Separate && self.ipv6);
        if needs_v6_underlay && addr6.is_none() {
            return Err(BackendError::Config(format!(
                "wireguard: Mode {:?}{} needs an IPv6 address on interface {} (and EnableIPv6 for its public IPv6)",
                format!("{mode:?}").to_lowercase(),
                if self.ipv6 { " with EnableIPv6" } else { "" },
                self.ext.name
            )));
        }
        let path = key_file_path();
        let key = PrivateKey::load_or_create(&path)?;
        let public_key = key.public_key();
        // No key material in the log, not even the public key (it is in the lease).
        info!(key_file = %path.display(), "wireguard key loaded");
        let dev = |name, port, listen, carries_v6| Dev {
            name,
            port,
            listen,
            carries_v6,
            sessions: Arc::new(Mutex::new(Sessions::new(key.secret().clone()))),
            device: None,
            pending: None,
            uapi: None,
            greeter: None,
            peers: BTreeMap::new(),
        };
        let port = self.cfg.listen_port;
        // Dual-stack where a peer may be reached over IPv6: one port for both
        // families, as the kernel device listens.
        let listen = if matches!(mode, Mode::Auto | Mode::Ipv6) {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        };
        if self.ipv4 {
            self.dev = Some(dev(DEVICE, port, listen, mode.single_device() && self.ipv6));
        }
        if mode == Mode::Separate && self.ipv6 {
            let port6 = self.cfg.listen_port_v6;
            self.dev6 = Some(dev(
                DEVICE_V6,
                port6,
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port6)),
                true,
            ));
        }
        // IPv6-only: no IPv4 part at all; Go's zero IP4 prints as 0.0.0.0 in the lease.
        let public_ip = if self.ipv4 {
            self.public_ip()?
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        let mut attrs = LeaseAttrs::new(public_ip);
        attrs.backend_type = "wireguard".into();
        if self.ipv4 {
            attrs.backend_data = Some(
                WireguardData {
                    public_key,
                    port: self.cfg.listen_port,
                }
                .encode(),
            );
        }
        if self.ipv6 {
            // The port this node's IPv6 peers reach it on: flannel-wg-v6's in
            // separate mode, the one device's otherwise (where upstream also
            // writes ListenPortV6, though only ListenPort is listened on).
            let port6 = match &self.dev6 {
                Some(d) => d.port,
                None => self.cfg.listen_port,
            };
            attrs.backend_v6_data = Some(
                WireguardData {
                    public_key,
                    port: port6,
                }
                .encode(),
            );
        }
        Ok(attrs)
    }

    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError> {
        let network6 = if self.ipv6 {
            let n = config.ipv6_network.ok_or_else(|| {
                BackendError::Config(
                    "wireguard backend with EnableIPv6 needs an IPv6Network".into(),
                )
            })?;
            let s = own.ipv6_subnet().ok_or_else(|| {
                BackendError::Config("wireguard: the own lease has no IPv6 subnet".into())
            })?;
            Some((n, s))
        } else {
            None
        };
        if self.dev.is_none() && self.dev6.is_none() {
            return Err(BackendError::Other(
                "wireguard: start before register".into(),
            ));
        }
        let mtu = self.mtu();
        let counters = self.counters.clone();
        let nl = self.nl.clone();
        if let Some(mut dev) = self.dev.take() {
            let network = config.network.ok_or_else(|| {
                BackendError::Config("wireguard backend needs an IPv4 Network".into())
            })?;
            let inherited = dev.open(&nl, counters.clone()).await;
            let inherited = match inherited {
                Ok(i) => i,
                Err(e) => {
                    self.dev = Some(dev);
                    return Err(e);
                }
            };
            let index = flannel_udp::netconf::configure(
                &nl,
                DEVICE,
                own.subnet().network(),
                mtu,
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
            nl.route_replace(&route)
                .await
                .map_err(BackendError::kernel(format!(
                    "route {network} dev {DEVICE}"
                )))?;
            if dev.carries_v6 {
                if let Some((n6, s6)) = network6 {
                    configure_v6(&nl, index, DEVICE, s6.network(), n6).await?;
                }
            }
            dev.serve_uapi()?;
            self.startup_line(&dev, inherited);
            self.dev = Some(dev);
        }

        if let (Some(mut dev6), Some((n6, s6))) = (self.dev6.take(), network6) {
            let inherited = dev6.open(&nl, counters).await?;
            let link = nl
                .link_by_name(DEVICE_V6)
                .await
                .map_err(BackendError::kernel(format!("look up {DEVICE_V6}")))?
                .ok_or_else(|| BackendError::Other(format!("{DEVICE_V6} vanished")))?;
            if link.mtu != mtu {
                nl.link_set_mtu(link.index, mtu)
                    .await
                    .map_err(BackendError::kernel(format!("MTU of {DEVICE_V6}")))?;
            }
            nl.link_set_up(link.index)
                .await
                .map_err(BackendError::kernel(format!("set {DEVICE_V6} up")))?;
            configure_v6(&nl, link.index, DEVICE_V6, s6.network(), n6).await?;
            dev6.serve_uapi()?;
            self.startup_line(&dev6, inherited);
            self.dev6 = Some(dev6);
        }
        Ok(())
    }

    fn mtu(&self) -> u32 {
        self.cfg.device_mtu(self.ext.mtu)
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        for d in [&mut self.dev, &mut self.dev6].into_iter().flatten() {
            d.peers.clear();
        }
        for l in peers {
            self.set_lease(l);
        }
        self.warnings6.retain(|k| peers.iter().any(|l| &l.key == k));
        self.push_peers()
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
                    self.set_lease(l);
                }
                LeaseEvent::Removed(l) => {
                    for d in [&mut self.dev, &mut self.dev6].into_iter().flatten() {
                        d.peers.remove(&l.key);
                    }
                    self.warnings6.clear(&l.key);
                }
            }
        }
        self.push_peers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_mode_picks_the_family_as_upstream() {
        let private4: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let public4: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let ula: Ipv6Addr = "fd18:198:18::2".parse().unwrap();
        let global: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let local_global: Ipv6Addr = "2001:db8::1".parse().unwrap();
        for (r4, r6, l4, l6, want) in [
            // No remote IPv6: always IPv4.
            (private4, None, true, Some(local_global), false),
            // Public remote IPv4 and we have IPv4: IPv4.
            (public4, Some(global), true, Some(local_global), false),
            // Private remote IPv4, both IPv6 global: IPv6.
            (private4, Some(global), true, Some(local_global), true),
            // We lack IPv4: IPv6 even to a public IPv4.
            (public4, Some(global), false, Some(local_global), true),
            // A ULA on either side: IPv4 and cross fingers.
            (private4, Some(ula), true, Some(local_global), false),
            (private4, Some(global), true, Some(ula), false),
            (private4, Some(global), true, None, false),
        ] {
            assert_eq!(
                auto_uses_ipv6(r4, r6, l4, l6),
                want,
                "{r4} {r6:?} local4={l4} {l6:?}"
            );
        }
    }

    fn ext() -> ExternalInterface {
        ExternalInterface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            addr: Some("10.0.0.1".parse().unwrap()),
            public_ip: Some("10.0.0.1".parse().unwrap()),
            addr6: Some("2001:db8::1".parse().unwrap()),
            public_ipv6: Some("2001:db8::1".parse().unwrap()),
        }
    }

    const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64}"#;
    const KEY_A: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const KEY_B: &str = "YJ9NRzvq2XQqAJcUiC4kBEoYUbsF0xl8ri2UbHjUyGM=";

    fn lease(v4: &str, v6: Option<&str>, value: &str) -> Lease {
        Lease {
            key: LeaseKey {
                v4: v4.parse().unwrap(),
                v6: v6.map(|s| s.parse().unwrap()),
            },
            attrs: Arc::new(LeaseAttrs::decode(value).unwrap()),
            expiration: None,
        }
    }

    async fn registered(mode: &str, config: &str) -> (WireguardBackend, LeaseAttrs) {
        let raw =
            RawValue::from_string(format!(r#"{{"Type":"wireguard","Mode":"{mode}"}}"#)).unwrap();
        let nl = Netlink::connect().await.unwrap();
        let mut be = WireguardBackend::new(&raw, ext(), nl).unwrap();
        let cfg = NetworkConfig::parse(config).unwrap();
        let attrs = be.register(&cfg).await.unwrap();
        (be, attrs)
    }

    fn peers(d: &Option<Dev>) -> Vec<(String, String, Vec<String>)> {
        d.as_ref()
            .map(|d| {
                d.peers
                    .values()
                    .map(|p| {
                        (
                            p.public_key.to_string(),
                            p.endpoint.to_string(),
                            p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Lease bytes and peers per mode, in one test: the key file is named by an
    /// environment variable, which is process-wide.
    #[tokio::test]
    async fn lease_data_and_peers_by_mode() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var(super::super::key::KEY_FILE_ENV, dir.path().join("wgkey"));

        // separate, dual stack: two devices, BackendV6Data on ListenPortV6.
        let (mut be, attrs) = registered("separate", DUAL).await;
        let key = WireguardData::decode(attrs.backend_data.as_ref().unwrap())
            .unwrap()
            .public_key;
        assert_eq!(
            attrs.backend_data.as_ref().unwrap().get(),
            format!(r#"{{"PublicKey":"{key}","Port":51820}}"#)
        );
        assert_eq!(
            attrs.backend_v6_data.as_ref().unwrap().get(),
            format!(r#"{{"PublicKey":"{key}","Port":51821}}"#),
            "one key for both devices"
        );
        assert_eq!(
            (
                be.dev.as_ref().unwrap().listen.to_string(),
                be.dev6.as_ref().unwrap().listen.to_string()
            ),
            ("0.0.0.0:51820".into(), "[::]:51821".into())
        );
        let good = lease(
            "10.244.5.0/24",
            Some("fd10:244:0:5::/64"),
            &format!(
                r#"{{"PublicIP":"10.0.0.5","PublicIPv6":"2001:db8::5","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY_A}","Port":51820}},"BackendV6Data":{{"PublicKey":"{KEY_A}","Port":4000}}}}"#
            ),
        );
        // No v6 key (v0.20.2-style BackendData only): IPv4 peer only.
        let no_v6_key = lease(
            "10.244.6.0/24",
            Some("fd10:244:0:6::/64"),
            &format!(
                r#"{{"PublicIP":"10.0.0.6","PublicIPv6":"2001:db8::6","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY_B}"}}}}"#
            ),
        );
        // Garbage in the v6 part: refused, no panic.
        let bad_v6 = lease(
            "10.244.7.0/24",
            Some("fd10:244:0:7::/64"),
            r#"{"PublicIP":"10.0.0.7","PublicIPv6":"2001:db8::7","BackendType":"wireguard","BackendV6Data":{"PublicKey":"AAECAwQFBgcICQoLDA0ODw==","Port":"x"}}"#,
        );
        be.reconcile(&[good.clone(), no_v6_key.clone(), bad_v6.clone()])
            .await
            .unwrap();
        assert_eq!(
            peers(&be.dev),
            vec![
                (
                    KEY_A.into(),
                    "10.0.0.5:51820".into(),
                    vec!["10.244.5.0/24".into()]
                ),
                (
                    KEY_B.into(),
                    "10.0.0.6:51820".into(),
                    vec!["10.244.6.0/24".into()]
                ),
            ]
        );
        assert_eq!(
            peers(&be.dev6),
            vec![(
                KEY_A.into(),
                "[2001:db8::5]:4000".into(),
                vec!["fd10:244:0:5::/64".into()]
            )]
        );
        be.apply(&[LeaseEvent::Removed(good.clone())])
            .await
            .unwrap();
        assert!(peers(&be.dev6).is_empty());

        // auto: one dual-stack device with both subnets; the lab-like private
        // IPv4 peer with a global IPv6 (ours global too) goes over IPv6, on the
        // port of its BackendV6Data.
        let (mut be, attrs) = registered("auto", DUAL).await;
        assert!(be.dev6.is_none());
        assert_eq!(be.dev.as_ref().unwrap().listen.to_string(), "[::]:51820");
        assert!(be.dev.as_ref().unwrap().carries_v6);
        assert_eq!(
            attrs.backend_v6_data.as_ref().unwrap().get(),
            format!(r#"{{"PublicKey":"{key}","Port":51820}}"#)
        );
        be.reconcile(&[good.clone(), no_v6_key.clone()])
            .await
            .unwrap();
        assert_eq!(
            peers(&be.dev),
            vec![
                (
                    KEY_A.into(),
                    "[2001:db8::5]:4000".into(),
                    vec!["10.244.5.0/24".into(), "fd10:244:0:5::/64".into()]
                ),
                (
                    KEY_B.into(),
                    "[2001:db8::6]:51820".into(),
                    vec!["10.244.6.0/24".into(), "fd10:244:0:6::/64".into()]
                ),
            ]
        );

        // ipv4: v4 endpoints, v4 socket, both subnets.
        let (mut be, _) = registered("ipv4", DUAL).await;
        assert_eq!(be.dev.as_ref().unwrap().listen.to_string(), "0.0.0.0:51820");
        be.reconcile(std::slice::from_ref(&good)).await.unwrap();
        assert_eq!(peers(&be.dev)[0].1, "10.0.0.5:51820");
        assert_eq!(peers(&be.dev)[0].2.len(), 2);

        // ipv6: a peer without PublicIPv6 is left out.
        let (mut be, _) = registered("ipv6", DUAL).await;
        let no_pub6 = lease(
            "10.244.8.0/24",
            Some("fd10:244:0:8::/64"),
            &format!(
                r#"{{"PublicIP":"10.0.0.8","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY_B}","Port":51820}}}}"#
            ),
        );
        be.reconcile(&[good.clone(), no_pub6]).await.unwrap();
        assert_eq!(
            peers(&be.dev).into_iter().map(|p| p.1).collect::<Vec<_>>(),
            vec!["[2001:db8::5]:4000".to_string()]
        );

        // IPv4 only, separate: today's lease bytes, no v6 part, one IPv4 device.
        let (be, attrs) = registered("separate", r#"{"Network":"10.244.0.0/16"}"#).await;
        assert!(attrs.backend_v6_data.is_none() && be.dev6.is_none());
        assert_eq!(be.dev.as_ref().unwrap().listen.to_string(), "0.0.0.0:51820");
        assert!(!be.dev.as_ref().unwrap().carries_v6);

        // ipv6 mode needs an IPv6 address on the interface.
        let raw = RawValue::from_string(r#"{"Type":"wireguard","Mode":"ipv6"}"#.into()).unwrap();
        let mut no6 = ext();
        no6.addr6 = None;
        no6.public_ipv6 = None;
        let mut be = WireguardBackend::new(&raw, no6, Netlink::connect().await.unwrap()).unwrap();
        let e = be
            .register(&NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs an IPv6 address"), "{e}");

        // IPv6-only, separate: flannel-wg-v6 alone on ListenPortV6, no IPv4 part
        // in the lease (PublicIP Go's zero IP4), BackendV6Data only.
        let (mut be, attrs) = registered("separate", V6_ONLY).await;
        assert!(be.dev.is_none(), "no flannel-wg in an IPv6-only network");
        let d6 = be.dev6.as_ref().unwrap();
        assert_eq!(
            (d6.name, d6.listen.to_string()),
            (DEVICE_V6, "[::]:51821".into())
        );
        assert!(attrs.backend_data.is_none());
        assert_eq!(attrs.public_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(attrs.public_ipv6, None, "the agent fills in PublicIPv6");
        assert_eq!(
            attrs.backend_v6_data.as_ref().unwrap().get(),
            format!(r#"{{"PublicKey":"{key}","Port":51821}}"#)
        );
        // Peers as a kube IPv6-only node publishes them: no IPv4 part at all.
        let v6_peer = lease(
            "0.0.0.0/0",
            Some("fd10:244:0:5::/64"),
            &format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::5","BackendType":"wireguard","BackendV6Data":{{"PublicKey":"{KEY_A}","Port":51821}}}}"#
            ),
        );
        let not_wg = lease(
            "0.0.0.0/0",
            Some("fd10:244:0:6::/64"),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
        );
        let no_v6_data = lease(
            "0.0.0.0/0",
            Some("fd10:244:0:7::/64"),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::7","BackendType":"wireguard"}"#,
        );
        be.reconcile(&[v6_peer.clone(), not_wg, no_v6_data])
            .await
            .unwrap();
        assert_eq!(
            peers(&be.dev6),
            vec![(
                KEY_A.into(),
                "[2001:db8::5]:51821".into(),
                vec!["fd10:244:0:5::/64".into()]
            )]
        );
        be.apply(&[LeaseEvent::Removed(v6_peer)]).await.unwrap();
        assert!(peers(&be.dev6).is_empty());

        // IPv6-only without an IPv6 address on the interface: a clear error.
        let raw = RawValue::from_string(r#"{"Type":"wireguard"}"#.into()).unwrap();
        let mut no6 = ext();
        no6.addr6 = None;
        no6.public_ipv6 = None;
        let mut be = WireguardBackend::new(&raw, no6, Netlink::connect().await.unwrap()).unwrap();
        let e = be
            .register(&NetworkConfig::parse(V6_ONLY).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs an IPv6 address"), "{e}");
    }

    const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64}"#;

    #[test]
    fn ipv6_only_runs_separate_mode_alone() {
        for mode in [Mode::Separate, Mode::Auto, Mode::Ipv4, Mode::Ipv6] {
            // Dual stack and IPv4-only: every mode.
            assert!(ipv6_only_mode_ok(mode, true, true).is_ok());
            assert!(ipv6_only_mode_ok(mode, true, false).is_ok());
        }
        assert!(ipv6_only_mode_ok(Mode::Separate, false, true).is_ok());
        for (mode, name) in [
            (Mode::Auto, "\"auto\""),
            (Mode::Ipv4, "\"ipv4\""),
            (Mode::Ipv6, "\"ipv6\""),
        ] {
            let e = ipv6_only_mode_ok(mode, false, true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(name) && e.contains("IPv6-only") && e.contains("\"separate\""),
                "{e}"
            );
        }
    }

    /// The refusal comes from register, before any key file or device exists.
    #[tokio::test]
    async fn ipv6_only_single_device_modes_are_refused_at_register() {
        for mode in ["auto", "ipv4", "ipv6"] {
            let raw = RawValue::from_string(format!(r#"{{"Type":"wireguard","Mode":"{mode}"}}"#))
                .unwrap();
            let mut be =
                WireguardBackend::new(&raw, ext(), Netlink::connect().await.unwrap()).unwrap();
            let e = be
                .register(&NetworkConfig::parse(V6_ONLY).unwrap())
                .await
                .unwrap_err();
            assert!(matches!(e, BackendError::Config(_)), "{mode}: {e}");
            assert!(be.dev.is_none() && be.dev6.is_none());
        }
    }
}
