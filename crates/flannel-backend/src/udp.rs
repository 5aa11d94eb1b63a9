//! The `udp` backend: flannel's userspace encapsulation (one bare IPv4 packet per
//! UDP datagram, port 8285), with the data path in the `flannel-udp` crate.
//!
//! As upstream: no BackendType/BackendData in the lease (only `PublicIP`), peers'
//! BackendType is not checked, TUN `flannel0` with `<subnet IP>/32`, MTU = iface
//! MTU − 28, route `<Network> dev flannel0` (scope global; protocol flannel-rs's
//! own, like the other backends' routes, where upstream has `boot`), socket on
//! `<iface addr>:<Port>`.
//! Deliberately different: the device is persistent (it survives an agent restart,
//! with its address and route, so pods keep talking; `flanneld --cleanup` removes
//! it through [`flannel_udp::remove_device`]) and, when the binary installs the
//! keeper hook, an fd keeper holds the queues across the restart.
//!
//! Backend config keys: `Port` (default 8285). flannel-rs extensions (ignored by
//! Go flanneld): `Offload` (default true; false = upstream-like per-packet I/O),
//! `Persist` (default true; false = the TUN vanishes with the agent, as upstream).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use flannel_core::gojson::FoldedObject;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, LeaseKey, NetworkConfig};
use flannel_net::netlink::Netlink;
use flannel_net::netns::run_in_netns_async;
use flannel_udp::{Config, DataPath, Mode, Peer};
use ipnet::Ipv4Net;
use serde_json::value::RawValue;
use tracing::{info, warn};

use crate::{Backend, BackendError, ExternalInterface, PacketStats, PacketStatsSource};

/// The device name. Upstream asks for the template `flannel%d`; a fixed name lets a
/// restarted agent find its persistent device again (the template would make a
/// new `flannel1`).
pub const DEVICE: &str = "flannel0";

/// Call first thing in `main` of the agent: the udp backend's fd keeper (which
/// holds the TUN queues and sockets across an agent restart) is the agent binary
/// re-executed, and this is where it takes over. In a normal start it only notes
/// that the hook exists; without it no keeper is started (the device still
/// persists, but packets are dropped, not queued, while the agent is down).
pub fn keeper_entry() {
    flannel_udp::keeper::run_if_requested();
}

/// For `flanneld --cleanup`: removes flannel0 (persistent, so it outlives the
/// agent) and its keeper, in the calling thread's network namespace. Ok(false)
/// when there was nothing to remove.
pub fn cleanup() -> Result<bool, BackendError> {
    flannel_udp::remove_device(DEVICE).map_err(BackendError::kernel(format!("remove {DEVICE}")))
}

/// Parsed backend config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpConfig {
    pub port: u16,
    pub offload: bool,
    pub persist: bool,
}

impl UdpConfig {
    pub fn parse(raw: &RawValue) -> Result<Self, BackendError> {
        let o = FoldedObject::from_raw(raw, &["Type", "Port", "Offload", "Persist"])
            .map_err(|e| BackendError::Config(format!("udp backend: {e}")))?;
        let field =
            |e: flannel_core::gojson::FieldError| BackendError::Config(format!("udp backend: {e}"));
        let port = o
            .get::<Option<i64>>("Port")
            .map_err(field)?
            .flatten()
            .unwrap_or(i64::from(flannel_udp::DEFAULT_PORT));
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                BackendError::Config(format!(
                    "udp backend: Port {port} is not a UDP port (1-65535)"
                ))
            })?;
        Ok(UdpConfig {
            port,
            offload: o
                .get::<Option<bool>>("Offload")
                .map_err(field)?
                .flatten()
                .unwrap_or(true),
            persist: o
                .get::<Option<bool>>("Persist")
                .map_err(field)?
                .flatten()
                .unwrap_or(true),
        })
    }
}

pub struct UdpBackend {
    cfg: UdpConfig,
    ext: ExternalInterface,
    nl: Netlink,
    dp: Option<DataPath>,
    own: Option<(Ipv4Addr, Ipv4Net)>,
    peers: BTreeMap<LeaseKey, Peer>,
}

impl UdpBackend {
    pub fn new(raw: &RawValue, ext: ExternalInterface, nl: Netlink) -> Result<Self, BackendError> {
        Ok(UdpBackend {
            cfg: UdpConfig::parse(raw)?,
            ext,
            nl,
            dp: None,
            own: None,
            peers: BTreeMap::new(),
        })
    }

    fn mtu_value(&self) -> u32 {
        self.ext.mtu.saturating_sub(flannel_udp::OVERHEAD)
    }

    fn data_config(&self, tun_addr: Ipv4Addr) -> Result<Config, BackendError> {
        let addr = self.ext.addr.ok_or_else(|| {
            BackendError::Config(format!(
                "udp backend: interface {} has no IPv4 address",
                self.ext.name
            ))
        })?;
        Ok(Config {
            tun_name: DEVICE.into(),
            bind: SocketAddrV4::new(addr, self.cfg.port),
            tun_addr,
            mode: if self.cfg.offload {
                Mode::Offload
            } else {
                Mode::Plain
            },
            queues: 0,
            persist: self.cfg.persist,
            // Only if this binary re-executes itself as the keeper.
            keeper: self.cfg.persist && flannel_udp::keeper::hook_installed(),
        })
    }

    /// A netlink connection of our own (dumps must not share a socket with the
    /// daemon's), in the backend's namespace.
    async fn netlink(&self) -> Result<Netlink, BackendError> {
        let r = match self.nl.netns() {
            Some(p) => Netlink::connect_in(p.to_path_buf()).await,
            None => Netlink::connect().await,
        };
        r.map_err(BackendError::kernel("udp backend netlink"))
    }

    async fn open(&mut self) -> Result<(), BackendError> {
        let Some((tun_addr, network)) = self.own else {
            return Ok(());
        };
        let cfg = self.data_config(tun_addr)?;
        let dp = open_in(self.nl.netns().map(Path::to_path_buf), cfg).await?;
        let nl = self.netlink().await?;
        flannel_udp::netconf::configure(
            &nl,
            dp.name(),
            tun_addr,
            self.mtu_value(),
            network,
            crate::RTPROT_FLANNEL,
        )
        .await
        .map_err(BackendError::kernel(format!("configure {}", dp.name())))?;
        self.dp = Some(dp);
        Ok(())
    }

    fn push_peers(&mut self) -> Result<(), BackendError> {
        let Some(dp) = self.dp.as_mut() else {
            return Ok(());
        };
        dp.set_peers(self.peers.values().copied());
        // Workers start with the first peer set, so packets queued across a restart
        // are not answered with net-unreachable before the table is known.
        dp.start()
            .map_err(BackendError::kernel("start udp workers"))
    }
}

fn peer_of(l: &Lease) -> Peer {
    Peer {
        subnet: l.subnet(),
        public_ip: l.attrs.public_ip,
    }
}

/// Opens the data path inside `netns` (if any): the TUN and sockets belong to the
/// namespace of the thread that creates them, and no tokio thread may change
/// namespace, so the open runs on a dedicated std thread.
async fn open_in(netns: Option<PathBuf>, cfg: Config) -> Result<DataPath, BackendError> {
    let open = move || DataPath::open(&cfg);
    let opened = match netns {
        Some(p) => run_in_netns_async(p, open)
            .await
            .map_err(BackendError::kernel(format!("open {DEVICE}")))?,
        None => tokio::task::spawn_blocking(open)
            .await
            .map_err(|e| BackendError::Other(format!("udp open task: {e}")))?,
    };
    opened.map_err(BackendError::kernel(format!("open {DEVICE}")))
}

#[async_trait]
impl Backend for UdpBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        // Upstream's udp backend is IPv4-only too.
        crate::ipv4_only(config, "udp")?;
        let ip = self.ext.public_ip.or(self.ext.addr).ok_or_else(|| {
            BackendError::Config(format!(
                "udp backend: interface {} has no IPv4 address",
                self.ext.name
            ))
        })?;
        // Only PublicIP (and PublicIPv6: null): no BackendType, no BackendData.
        Ok(LeaseAttrs::new(ip))
    }

    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError> {
        let network = config
            .network
            .ok_or_else(|| BackendError::Config("udp backend needs an IPv4 Network".into()))?;
        self.own = Some((own.subnet().network(), network));
        self.open().await?;
        info!(
            device = DEVICE,
            port = self.cfg.port,
            mtu = self.mtu_value(),
            "udp backend started"
        );
        Ok(())
    }

    fn mtu(&self) -> u32 {
        self.mtu_value()
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        self.peers = peers.iter().map(|l| (l.key, peer_of(l))).collect();
        self.push_peers()
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<(), BackendError> {
        for e in events {
            match e {
                LeaseEvent::Added(l) | LeaseEvent::Changed { current: l, .. } => {
                    self.peers.insert(l.key, peer_of(l));
                }
                LeaseEvent::Removed(l) => {
                    self.peers.remove(&l.key);
                }
            }
        }
        self.push_peers()
    }

    fn packet_stats(&self) -> Option<PacketStatsSource> {
        let c = self.dp.as_ref()?.counters();
        Some(Arc::new(move || {
            let v = c.values();
            PacketStats {
                tx_packets: v.tx_packets,
                tx_bytes: v.tx_bytes,
                rx_packets: v.rx_packets,
                rx_bytes: v.rx_bytes,
                drops: v
                    .pairs()
                    .iter()
                    .filter(|(k, _)| k.contains("drop"))
                    .map(|(k, n)| (*k, *n))
                    .collect(),
            }
        }))
    }

    fn resync_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(10))
    }

    /// Puts address and route back if someone removed them, and recreates the
    /// device (with the current peers) if it was deleted.
    async fn resync(&mut self) -> Result<(), BackendError> {
        let Some((tun_addr, network)) = self.own else {
            return Ok(());
        };
        let nl = self.netlink().await?;
        let exists = nl
            .link_by_name(DEVICE)
            .await
            .map_err(BackendError::kernel(format!("look up {DEVICE}")))?
            .is_some();
        if !exists {
            warn!(device = DEVICE, "udp device disappeared; recreating it");
            let running = self.dp.as_ref().is_some_and(DataPath::is_running);
            self.dp = None;
            self.open().await?;
            if running {
                self.push_peers()?;
            }
            return Ok(());
        }
        flannel_udp::netconf::configure(
            &nl,
            DEVICE,
            tun_addr,
            self.mtu_value(),
            network,
            crate::RTPROT_FLANNEL,
        )
        .await
        .map(drop)
        .map_err(BackendError::kernel(format!("configure {DEVICE}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn config_defaults_and_keys() {
        let c = UdpConfig::parse(&raw(r#"{"Type":"udp"}"#)).unwrap();
        assert_eq!(
            c,
            UdpConfig {
                port: 8285,
                offload: true,
                persist: true
            }
        );
        let c = UdpConfig::parse(&raw(
            r#"{"Type":"udp","port":9000,"Offload":false,"persist":false}"#,
        ))
        .unwrap();
        assert_eq!(
            c,
            UdpConfig {
                port: 9000,
                offload: false,
                persist: false
            }
        );
        let c = UdpConfig::parse(&raw(r#"{"Type":"udp","Port":null}"#)).unwrap();
        assert_eq!(c.port, 8285);
        for bad in [
            r#"{"Port":0}"#,
            r#"{"Port":70000}"#,
            r#"{"Port":-1}"#,
            r#"{"Port":"x"}"#,
        ] {
            assert!(UdpConfig::parse(&raw(bad)).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn lease_attrs_carry_only_the_public_ip() {
        let Ok(nl) = Netlink::connect().await else {
            return;
        };
        let ext = ExternalInterface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            addr: Some(Ipv4Addr::new(10, 10, 0, 1)),
            public_ip: Some(Ipv4Addr::new(10, 10, 0, 1)),
            addr6: None,
            public_ipv6: None,
        };
        let mut b = UdpBackend::new(&raw(r#"{"Type":"udp"}"#), ext, nl).unwrap();
        assert_eq!(b.mtu(), 1472);
        let cfg = NetworkConfig::parse_and_validate(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
        )
        .unwrap();
        let attrs = b.register(&cfg).await.unwrap();
        assert_eq!(
            attrs.encode(),
            r#"{"PublicIP":"10.10.0.1","PublicIPv6":null}"#
        );
    }
}
