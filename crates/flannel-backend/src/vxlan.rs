//! The `vxlan` backend: a VXLAN device `flannel.<VNI>` and, per peer, a permanent
//! neighbour entry (peer subnet IP → peer VTEP MAC), an FDB entry (MAC → peer public
//! IP) and an onlink route `<subnet> via <subnet IP> dev flannel.<VNI>`
//! (docs/compatibility.md, "vxlan device, wire format and routes"). With
//! `DirectRouting`, peers on a directly connected network get a
//! plain route via their public IP instead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use flannel_core::gojson::FoldedObject;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, MacAddr, NetworkConfig, VxlanData};
use flannel_net::netlink::{IpFamily, LinkInfo, Netlink, Route, VxlanSpec, RTN_UNICAST};
use ipnet::{IpNet, Ipv4Net};
use serde_json::value::RawValue;

use crate::dataplane::{self, Desired, Ownership, Plan, State};
use crate::peers::{self, PeerSet, RouteLookups, Warnings};
use crate::KernelError;
use crate::{Backend, BackendError, BackendOptions, ExternalInterface};

/// The port the kernel uses when none is configured (Linux's historical VXLAN port).
pub const KERNEL_DEFAULT_PORT: u16 = 8472;
/// Encapsulation overhead subtracted from the underlay MTU (IPv4 outer header).
pub const OVERHEAD: u32 = 50;
const TYPE: &str = "vxlan";
const RESYNC: Duration = Duration::from_secs(10);

/// The backend's config keys (docs/compatibility.md, "vxlan device, wire format and
/// routes"), read case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// 0 = kernel default (8472).
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    /// Underlay MTU to use instead of the interface's (0 = the interface's).
    pub mtu: u32,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: 1,
            port: 0,
            gbp: false,
            learning: false,
            direct_routing: false,
            mtu: 0,
        }
    }
}

const FIELDS: &[&str] = &[
    "VNI",
    "Port",
    "GBP",
    "Learning",
    "DirectRouting",
    "MTU",
    "MacPrefix",
    "Name",
];

fn cfg_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Config(format!("vxlan: {e}"))
}

impl VxlanConfig {
    pub fn parse(raw: &RawValue) -> Result<Self, BackendError> {
        let o = FoldedObject::from_raw(raw, FIELDS).map_err(cfg_err)?;
        let d = VxlanConfig::default();
        let vni: i64 = o.get("VNI").map_err(cfg_err)?.unwrap_or(i64::from(d.vni));
        let port: i64 = o.get("Port").map_err(cfg_err)?.unwrap_or(0);
        let mtu: i64 = o.get("MTU").map_err(cfg_err)?.unwrap_or(0);
        if !(0..(1 << 24)).contains(&vni) {
            return Err(cfg_err(format!("VNI {vni} is outside 0..16777215")));
        }
        if !(0..=65535).contains(&port) {
            return Err(cfg_err(format!("Port {port} is not a UDP port")));
        }
        if mtu != 0 && !((68 + i64::from(OVERHEAD))..=65535).contains(&mtu) {
            return Err(cfg_err(format!(
                "MTU {mtu} is outside {}..65535",
                68 + OVERHEAD
            )));
        }
        Ok(VxlanConfig {
            vni: vni as u32,
            port: port as u16,
            gbp: o.get("GBP").map_err(cfg_err)?.unwrap_or(false),
            learning: o.get("Learning").map_err(cfg_err)?.unwrap_or(false),
            direct_routing: o.get("DirectRouting").map_err(cfg_err)?.unwrap_or(false),
            mtu: mtu as u32,
        })
    }

    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    fn effective_port(&self) -> u16 {
        if self.port > 0 {
            self.port
        } else {
            KERNEL_DEFAULT_PORT
        }
    }
}

/// How one peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Through the tunnel.
    Tunnel {
        gw: Ipv4Addr,
        mac: MacAddr,
        vtep: Ipv4Addr,
    },
    /// DirectRouting: straight over the underlay.
    Direct { gw: Ipv4Addr, oif: u32 },
}

pub struct VxlanBackend {
    cfg: VxlanConfig,
    ext: ExternalInterface,
    nl: Netlink,
    opts: BackendOptions,
    dev: Option<LinkInfo>,
    mac: Option<MacAddr>,
    network: Option<Ipv4Net>,
    own: Option<Ipv4Net>,
    peers: PeerSet,
    /// What is programmed (or being programmed) per peer subnet.
    programmed: BTreeMap<Ipv4Net, Peer>,
    warnings: Warnings,
    /// Neighbour/FDB/route writes issued for peers so far.
    peer_writes: u64,
    lookups: RouteLookups,
}

impl VxlanBackend {
    pub fn new(
        raw: &RawValue,
        ext: ExternalInterface,
        nl: Netlink,
        opts: BackendOptions,
    ) -> Result<Self, BackendError> {
        Ok(VxlanBackend {
            cfg: VxlanConfig::parse(raw)?,
            ext,
            nl,
            opts,
            dev: None,
            mac: None,
            network: None,
            own: None,
            peers: PeerSet::default(),
            programmed: BTreeMap::new(),
            warnings: Warnings::default(),
            peer_writes: 0,
            lookups: RouteLookups::default(),
        })
    }

    pub fn config(&self) -> &VxlanConfig {
        &self.cfg
    }

    /// Neighbour, FDB and route writes issued for peers since creation (a
    /// reconcile over a kernel that already matches issues none).
    pub fn peer_writes(&self) -> u64 {
        self.peer_writes
    }

    /// The device's interface index, once registered.
    pub fn device_index(&self) -> Option<u32> {
        self.dev.as_ref().map(|d| d.index)
    }

    fn device_mtu(&self) -> u32 {
        let under = if self.cfg.mtu > 0 {
            self.cfg.mtu
        } else {
            self.ext.mtu
        };
        under.saturating_sub(OVERHEAD)
    }

    fn local_addr(&self) -> Result<Ipv4Addr, BackendError> {
        self.ext.addr.ok_or_else(|| {
            cfg_err(format!(
                "interface {} has no IPv4 address to use as the VXLAN source",
                self.ext.name
            ))
        })
    }

    /// Whether an existing device can be kept. Compared: kind, VNI, underlay device
    /// and local address (when both are set), no group, no l2miss, port (the
    /// effective one: a device on another port could not talk to the cluster),
    /// GBP and learning.
    fn compatible(&self, l: &LinkInfo, local: Ipv4Addr) -> Result<(), String> {
        if l.kind.as_deref() != Some("vxlan") {
            return Err(format!("it is a {:?} device, not vxlan", l.kind));
        }
        let Some(v) = &l.vxlan else {
            return Err("it reports no vxlan attributes".into());
        };
        let mut diffs = Vec::new();
        if v.vni != self.cfg.vni {
            diffs.push(format!("VNI {} (want {})", v.vni, self.cfg.vni));
        }
        if v.link.is_some_and(|i| i != self.ext.index) {
            diffs.push(format!("underlay #{:?} (want #{})", v.link, self.ext.index));
        }
        if v.local.is_some_and(|a| a != local) {
            diffs.push(format!("local {:?} (want {local})", v.local));
        }
        if v.group.is_some() {
            diffs.push(format!("group {:?}", v.group));
        }
        if v.l2miss {
            diffs.push("l2miss".into());
        }
        if v.port != self.cfg.effective_port() {
            diffs.push(format!(
                "port {} (want {})",
                v.port,
                self.cfg.effective_port()
            ));
        }
        if v.gbp != self.cfg.gbp {
            diffs.push(format!("gbp {} (want {})", v.gbp, self.cfg.gbp));
        }
        if v.learning != self.cfg.learning {
            diffs.push(format!(
                "learning {} (want {})",
                v.learning, self.cfg.learning
            ));
        }
        if l.mac.is_none() {
            diffs.push("no MAC address".into());
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(diffs.join(", "))
        }
    }

    /// Finds or creates the device; returns it.
    async fn ensure_device(&mut self) -> Result<LinkInfo, BackendError> {
        let name = self.cfg.device_name();
        let local = self.local_addr()?;
        let mtu = self.device_mtu();
        let existing = self
            .nl
            .link_by_name(&name)
            .await
            .map_err(BackendError::kernel(format!("vxlan device {name}")))?;
        if let Some(l) = existing {
            match self.compatible(&l, local) {
                Ok(()) => {
                    if l.mtu != mtu {
                        self.nl
                            .link_set_mtu(l.index, mtu)
                            .await
                            .map_err(BackendError::kernel(format!("vxlan device {name}")))?;
                    }
                    tracing::info!(
                        "reusing vxlan device {name} (#{}, MAC {:?})",
                        l.index,
                        l.mac.map(|m| m.to_string())
                    );
                    return Ok(l);
                }
                Err(why) => {
                    tracing::warn!("vxlan device {name} is incompatible ({why}); recreating it");
                    self.nl
                        .link_del(l.index)
                        .await
                        .map_err(BackendError::kernel(format!("vxlan device {name}")))?;
                }
            }
        }
        // A device we must create keeps a MAC published before (kube annotation,
        // or our own previous device) so peers' entries stay valid.
        let mac = self
            .opts
            .vtep_mac
            .or(self.mac)
            .unwrap_or_else(|| MacAddr::random_local(&mut rand::rng()));
        let spec = VxlanSpec {
            name: name.clone(),
            vni: self.cfg.vni,
            link: self.ext.index,
            local: Some(IpAddr::V4(local)),
            port: (self.cfg.port > 0).then_some(self.cfg.port),
            learning: self.cfg.learning,
            gbp: self.cfg.gbp,
            mtu: Some(mtu),
            mac: Some(mac),
        };
        let l = self
            .nl
            .vxlan_create(&spec)
            .await
            .map_err(BackendError::kernel(format!("vxlan device {name}")))?;
        tracing::info!(
            "created vxlan device {name} (#{}, MAC {mac}, MTU {mtu})",
            l.index
        );
        Ok(l)
    }

    async fn configure_device(&self, dev: &LinkInfo) -> Result<(), BackendError> {
        // Router advertisements must not configure the tunnel device.
        let key = format!("net/ipv6/conf/{}/accept_ra", dev.name);
        if let Err(e) = flannel_net::sysctl::write(self.nl.netns(), &key, "0").await {
            // Kernels without IPv6 have no such file; nothing to turn off then.
            tracing::warn!("{e}");
        }
        Ok(())
    }

    /// Sets `<subnet IP>/32` as the only address from the network on the device, and
    /// sets it up.
    async fn configure_address(&self, dev: &LinkInfo) -> Result<(), BackendError> {
        let (Some(network), Some(own)) = (self.network, self.own) else {
            return Ok(());
        };
        let ctx = || format!("vxlan device {} address", dev.name);
        let want = IpAddr::V4(own.network());
        let addrs = self
            .nl
            .addresses(IpFamily::V4, Some(dev.index))
            .await
            .map_err(BackendError::kernel(ctx()))?;
        let mut present = false;
        for a in addrs {
            let IpAddr::V4(v4) = a.addr else { continue };
            if a.addr == want && a.prefix_len == 32 && a.scope == 0 {
                present = true;
            } else if network.contains(&v4) || a.addr == want {
                self.nl
                    .addr_del(dev.index, a.addr, a.prefix_len)
                    .await
                    .map_err(BackendError::kernel(ctx()))?;
            }
        }
        if !present {
            self.nl
                .addr_add(dev.index, want, 32)
                .await
                .map_err(BackendError::kernel(ctx()))?;
        }
        self.nl
            .link_set_up(dev.index)
            .await
            .map_err(BackendError::kernel(format!(
                "set vxlan device {} up",
                dev.name
            )))
    }

    fn ownership(&self) -> Result<Ownership, BackendError> {
        let network = self.network.ok_or_else(not_started)?;
        let mut devices = vec![self.ext.index];
        devices.extend(self.device_index());
        Ok(Ownership {
            network: IpNet::V4(network),
            own: self.own.map(IpNet::V4),
            devices,
        })
    }

    /// Decides how to reach each usable lease. `refresh` picks cached route lookups
    /// (DirectRouting) to redo.
    async fn plan_peers(
        &mut self,
        leases: &[Lease],
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) -> BTreeMap<Ipv4Net, Peer> {
        let mut usable = Vec::new();
        for l in leases {
            if !peers::usable(l, TYPE, self.own, &mut self.warnings) {
                continue;
            }
            let data = match &l.attrs.backend_data {
                None => Err("it has no BackendData".to_string()),
                Some(raw) => VxlanData::decode(raw).map_err(|e| e.to_string()),
            };
            match data {
                Ok(d) => {
                    self.warnings.clear(&l.key);
                    usable.push((l, d));
                }
                Err(e) => self.warnings.warn(l.key, format!("ignored: {e}")),
            }
        }
        if self.cfg.direct_routing {
            self.lookups
                .update(
                    &self.nl,
                    usable.iter().map(|(l, _)| l.attrs.public_ip),
                    refresh,
                )
                .await;
        }
        let dev = self.device_index();
        let mut macs: HashMap<MacAddr, Ipv4Addr> = HashMap::new();
        let mut out = BTreeMap::new();
        for (l, d) in usable {
            let subnet = l.subnet().trunc();
            let ip = l.attrs.public_ip;
            // DirectRouting: a peer whose address the kernel reaches without a
            // gateway gets a plain route over the underlay (docs/compatibility.md,
            // "vxlan device, wire format and routes").
            let direct = match self.lookups.get(IpAddr::V4(ip)) {
                Some(Ok(r)) if self.cfg.direct_routing => r
                    .oif
                    .filter(|o| r.gateway.is_none() && r.kind == RTN_UNICAST && Some(*o) != dev),
                _ => None,
            };
            let peer = match direct {
                Some(oif) => Peer::Direct { gw: ip, oif },
                None => {
                    if let Some(other) = macs.insert(d.vtep_mac, ip).filter(|o| *o != ip) {
                        self.warnings.warn(
                            l.key,
                            format!(
                                "its VTEP MAC {} is also published by {other}; traffic for one \
                                 of them goes to the other",
                                d.vtep_mac
                            ),
                        );
                    }
                    Peer::Tunnel {
                        gw: subnet.network(),
                        mac: d.vtep_mac,
                        vtep: ip,
                    }
                }
            };
            out.insert(subnet, peer);
        }
        out
    }

    fn desired<'a>(
        &self,
        dev: u32,
        peers: impl IntoIterator<Item = (&'a Ipv4Net, &'a Peer)>,
    ) -> Desired {
        let mut d = Desired::default();
        for (subnet, peer) in peers {
            let dst = IpNet::V4(*subnet);
            match *peer {
                Peer::Tunnel { gw, mac, vtep } => {
                    let gw = IpAddr::V4(gw);
                    d.fdb.insert(mac, IpAddr::V4(vtep));
                    d.neigh.insert(gw, mac);
                    d.deps.insert(dst, (gw, mac));
                    d.routes
                        .insert(dst, Route::new(dst).via(gw).dev(dev).onlink());
                }
                Peer::Direct { gw, oif } => {
                    d.routes
                        .insert(dst, Route::new(dst).via(IpAddr::V4(gw)).dev(oif));
                }
            }
        }
        d
    }

    /// Runs `plan` on device `dev`, counting its writes.
    async fn run_plan(
        &mut self,
        dev: u32,
        desired: &Desired,
        plan: &Plan,
        context: &str,
    ) -> Result<(), BackendError> {
        let writes = &mut self.peer_writes;
        dataplane::run(&self.nl, Some(dev), desired, plan, writes, context).await
    }

    /// Reads what we own from the kernel.
    async fn kernel_state(&self, dev: u32) -> Result<State, BackendError> {
        let own = self.ownership()?;
        let ctx = || "vxlan: read kernel state".to_string();
        let mut s = State::default();
        let (routes, device) = futures::join!(dataplane::owned_routes(&self.nl, &own), async {
            let mut s = State::default();
            dataplane::read_device(&self.nl, dev, &mut s)
                .await
                .map(|()| s)
        });
        for r in routes.map_err(BackendError::kernel(ctx()))? {
            s.add_route(r);
        }
        let device = device.map_err(BackendError::kernel(ctx()))?;
        s.neigh = device.neigh;
        s.fdb = device.fdb;
        Ok(s)
    }

    async fn full_reconcile(
        &mut self,
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) -> Result<(), BackendError> {
        let dev = self.device_index().ok_or_else(not_started)?;
        let t = std::time::Instant::now();
        let leases = self.peers.all();
        let peers = self.plan_peers(&leases, refresh).await;
        self.peers
            .prune(&leases, &mut self.lookups, &mut self.warnings);
        let desired = self.desired(dev, &peers);
        let planned_us = t.elapsed().as_micros() as u64;
        let current = self.kernel_state(dev).await?;
        let read_us = t.elapsed().as_micros() as u64;
        let plan = dataplane::diff(&desired, &current);
        tracing::debug!(
            planned_us,
            read_us,
            diffed_us = t.elapsed().as_micros() as u64,
            "vxlan reconcile planned"
        );
        self.programmed = peers;
        if plan.is_empty() {
            return Ok(());
        }
        tracing::debug!(
            "vxlan reconcile: {} neighbours, {} fdb, {} routes to set; {} routes, {} neighbours, {} fdb to delete",
            plan.neigh_set.len(),
            plan.fdb_set.len(),
            plan.route_set.len(),
            plan.route_del.len(),
            plan.neigh_del.len(),
            plan.fdb_del.len()
        );
        self.run_plan(dev, &desired, &plan, "vxlan reconcile").await
    }

    /// Makes sure the device still exists (someone may have deleted it); recreates
    /// it with the same MAC and address. Returns whether it had to.
    async fn ensure_device_alive(&mut self) -> Result<bool, BackendError> {
        let Some(dev) = self.dev.clone() else {
            return Ok(false);
        };
        let now = self
            .nl
            .link_by_index(dev.index)
            .await
            .map_err(BackendError::kernel(format!("vxlan device {}", dev.name)))?;
        if now.as_ref().is_some_and(|l| l.name == dev.name) {
            return Ok(false);
        }
        tracing::warn!("vxlan device {} disappeared; recreating it", dev.name);
        let l = self.ensure_device().await?;
        self.configure_device(&l).await?;
        self.configure_address(&l).await?;
        self.dev = Some(l);
        Ok(true)
    }
}

fn not_started() -> BackendError {
    BackendError::Other("vxlan backend used before register/start".into())
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        crate::ipv4_only(config, TYPE)?;
        self.network = config.network;
        let local = self.local_addr()?;
        tracing::info!(
            "vxlan: VNI {} port {} GBP {} learning {} DirectRouting {} on {} ({local})",
            self.cfg.vni,
            self.cfg.effective_port(),
            self.cfg.gbp,
            self.cfg.learning,
            self.cfg.direct_routing,
            self.ext.name
        );
        let dev = self.ensure_device().await?;
        self.configure_device(&dev).await?;
        let mac = dev.mac.ok_or_else(|| BackendError::Kernel {
            context: format!("vxlan device {}", dev.name),
            source: KernelError::State("the device has no MAC address".into()),
        })?;
        self.mac = Some(mac);
        self.dev = Some(dev);
        let mut attrs = LeaseAttrs::new(self.ext.public_ip.unwrap_or(local));
        attrs.backend_type = TYPE.to_string();
        attrs.backend_data = Some(
            VxlanData {
                vni: self.cfg.vni,
                vtep_mac: mac,
            }
            .encode(),
        );
        Ok(attrs)
    }

    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError> {
        self.network = config.network;
        self.own = Some(own.subnet().trunc());
        let dev = self.dev.clone().ok_or_else(not_started)?;
        self.configure_address(&dev).await?;
        let now = self
            .nl
            .link_by_index(dev.index)
            .await
            .map_err(BackendError::kernel(format!("vxlan device {}", dev.name)))?;
        if now.as_ref().and_then(|l| l.mac) != self.mac {
            return Err(BackendError::Kernel {
                context: format!("vxlan device {}", dev.name),
                source: KernelError::State(format!(
                    "its MAC changed from the published {:?} to {:?}",
                    self.mac.map(|m| m.to_string()),
                    now.and_then(|l| l.mac).map(|m| m.to_string())
                )),
            });
        }
        Ok(())
    }

    fn mtu(&self) -> u32 {
        self.device_mtu()
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        self.peers.replace_all(peers);
        // A full update re-asks the kernel about every peer (DirectRouting).
        self.full_reconcile(|_| true).await
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<(), BackendError> {
        let dev = self.device_index().ok_or_else(not_started)?;
        let mut batch = self.peers.apply_batch(events, &mut self.warnings, |_| {});
        batch.current.dedup_by(|a, b| a.key == b.key);
        let new_peers = self.plan_peers(&batch.current, |_| false).await;
        let old = peers::swap_touched(&mut self.programmed, &batch.touched, &new_peers);
        let desired = self.desired(dev, &new_peers);
        let mut plan = dataplane::diff(&desired, &self.desired(dev, &old).as_state());
        // Another peer may still use an FDB entry a removed one shared.
        let still: HashSet<(MacAddr, Ipv4Addr)> = self
            .programmed
            .values()
            .filter_map(|p| match p {
                Peer::Tunnel { mac, vtep, .. } => Some((*mac, *vtep)),
                Peer::Direct { .. } => None,
            })
            .collect();
        plan.fdb_del.retain(|(mac, ip)| match ip {
            IpAddr::V4(v4) => !still.contains(&(*mac, *v4)),
            IpAddr::V6(_) => true,
        });
        self.run_plan(dev, &desired, &plan, "vxlan lease events")
            .await
    }

    fn resync_interval(&self) -> Option<Duration> {
        Some(RESYNC)
    }

    async fn resync(&mut self) -> Result<(), BackendError> {
        self.ensure_device_alive().await?;
        self.full_reconcile(|_| false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn config_defaults_and_folding() {
        let c = VxlanConfig::parse(&raw(r#"{"Type":"vxlan"}"#)).unwrap();
        assert_eq!(c, VxlanConfig::default());
        assert_eq!(c.device_name(), "flannel.1");
        let c = VxlanConfig::parse(&raw(
            r#"{"type":"vxlan","vni":5,"port":4789,"gbp":true,"learning":true,"directrouting":true,"mtu":9000}"#,
        ))
        .unwrap();
        assert_eq!(
            c,
            VxlanConfig {
                vni: 5,
                port: 4789,
                gbp: true,
                learning: true,
                direct_routing: true,
                mtu: 9000
            }
        );
        assert_eq!(c.device_name(), "flannel.5");
    }

    #[test]
    fn config_errors_are_clear() {
        for (text, needle) in [
            (r#"{"VNI":16777216}"#, "VNI"),
            (r#"{"VNI":-1}"#, "VNI"),
            (r#"{"Port":70000}"#, "Port"),
            (r#"{"VNI":"x"}"#, "VNI"),
            (r#"{"MTU":100}"#, "MTU"),
            (r#"[1]"#, "vxlan"),
        ] {
            let e = VxlanConfig::parse(&raw(text)).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
