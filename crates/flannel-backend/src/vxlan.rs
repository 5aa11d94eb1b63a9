//! The `vxlan` backend: a VXLAN device `flannel.<VNI>` and, per peer, a permanent
//! neighbour entry (peer subnet IP → peer VTEP MAC), an FDB entry (MAC → peer public
//! IP) and an onlink route `<subnet> via <subnet IP> dev flannel.<VNI>`
//! (docs/compatibility.md, "vxlan device, wire format and routes"). With
//! `DirectRouting`, peers on a directly connected network get a
//! plain route via their public IP instead.
//!
//! Dual stack adds a second device `flannel-v6.<VNI>` over the interface's IPv6
//! address with the same entries for each peer's IPv6 subnet (neighbour on the v6
//! subnet IP, FDB to the peer's `PublicIPv6`, route onlink via the v6 subnet IP), its
//! MAC published in `BackendV6Data`. Each family has its own device, so the two are
//! read, diffed and written as two independent data planes. IPv6-only
//! (`EnableIPv4:false`, Kubernetes mode) has the IPv6 device alone; the leases' IPv4
//! part is the `0.0.0.0/0` placeholder and is never looked at.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use async_trait::async_trait;
use flannel_core::gojson::FoldedObject;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, LeaseKey, MacAddr, NetworkConfig, VxlanData};
use flannel_net::netlink::{IpFamily, LinkInfo, Netlink, Route, VxlanSpec, RTN_UNICAST};
use ipnet::{IpNet, Ipv6Net};
use serde_json::value::RawValue;

use crate::dataplane::{self, Desired, Ownership, Plan, State};
use crate::peers::{self, PeerSet, RouteLookups, Warnings};
use crate::KernelError;
use crate::{Backend, BackendError, BackendOptions, ExternalInterface};

/// The port the kernel uses when none is configured (Linux's historical VXLAN port).
pub const KERNEL_DEFAULT_PORT: u16 = 8472;
/// Encapsulation overhead subtracted from the underlay MTU (IPv4 outer header).
pub const OVERHEAD: u32 = 50;
/// The same for the IPv6 device: its outer IPv6 header is 20 bytes longer.
pub const OVERHEAD_V6: u32 = 70;
/// The metric the kernel gives an IPv6 route added without one (IP6_RT_PRIO_USER);
/// set explicitly so our routes compare equal to what a dump returns.
const V6_METRIC: u32 = 1024;
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

    /// The IPv6 device's name (upstream's `flannel-v6.<VNI>`).
    pub fn device_name_v6(&self) -> String {
        format!("flannel-v6.{}", self.vni)
    }

    fn name(&self, fam: Fam) -> String {
        match fam {
            Fam::V4 => self.device_name(),
            Fam::V6 => self.device_name_v6(),
        }
    }

    fn effective_port(&self) -> u16 {
        if self.port > 0 {
            self.port
        } else {
            KERNEL_DEFAULT_PORT
        }
    }
}

/// Which of the two data planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn ip_family(self) -> IpFamily {
        match self {
            Fam::V4 => IpFamily::V4,
            Fam::V6 => IpFamily::V6,
        }
    }

    fn overhead(self) -> u32 {
        match self {
            Fam::V4 => OVERHEAD,
            Fam::V6 => OVERHEAD_V6,
        }
    }

    fn host_len(self) -> u8 {
        match self {
            Fam::V4 => 32,
            Fam::V6 => 128,
        }
    }
}

/// How one peer's subnet of one family is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Through the tunnel.
    Tunnel {
        dst: IpNet,
        gw: IpAddr,
        mac: MacAddr,
        vtep: IpAddr,
    },
    /// DirectRouting: straight over the underlay.
    Direct { dst: IpNet, gw: IpAddr, oif: u32 },
}

/// One family's device and what is programmed on it.
#[derive(Debug)]
struct Side {
    fam: Fam,
    dev: Option<LinkInfo>,
    mac: Option<MacAddr>,
    network: Option<IpNet>,
    own: Option<IpNet>,
    /// What is programmed (or being programmed), by lease key (the lease's
    /// identity, so an event's key names both families' entries; the IPv4 subnet
    /// alone is not unique in an IPv6-only network).
    programmed: BTreeMap<LeaseKey, Peer>,
}

impl Side {
    fn new(fam: Fam) -> Self {
        Side {
            fam,
            dev: None,
            mac: None,
            network: None,
            own: None,
            programmed: BTreeMap::new(),
        }
    }

    fn device_index(&self) -> Option<u32> {
        self.dev.as_ref().map(|d| d.index)
    }
}

pub struct VxlanBackend {
    cfg: VxlanConfig,
    ext: ExternalInterface,
    nl: Netlink,
    opts: BackendOptions,
    /// The IPv4 data plane, unless the network is IPv6-only.
    v4: Option<Side>,
    /// The IPv6 data plane, when the network has IPv6 enabled.
    v6: Option<Side>,
    peers: PeerSet,
    warnings: Warnings,
    /// IPv6 problems of a peer whose IPv4 side is fine, kept apart so that the
    /// IPv4 success does not clear them (each is said once).
    warnings6: Warnings,
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
            v4: Some(Side::new(Fam::V4)),
            v6: None,
            peers: PeerSet::default(),
            warnings: Warnings::default(),
            warnings6: Warnings::default(),
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
        self.v4.as_ref().and_then(Side::device_index)
    }

    /// The IPv6 device's interface index, once registered with IPv6 enabled.
    pub fn device_index_v6(&self) -> Option<u32> {
        self.v6.as_ref().and_then(Side::device_index)
    }

    fn side(&self, fam: Fam) -> Option<&Side> {
        match fam {
            Fam::V4 => self.v4.as_ref(),
            Fam::V6 => self.v6.as_ref(),
        }
    }

    fn side_mut(&mut self, fam: Fam) -> Option<&mut Side> {
        match fam {
            Fam::V4 => self.v4.as_mut(),
            Fam::V6 => self.v6.as_mut(),
        }
    }

    fn families(&self) -> Vec<Fam> {
        [Fam::V4, Fam::V6]
            .into_iter()
            .filter(|f| self.side(*f).is_some())
            .collect()
    }

    /// Whether every enabled family's device exists (register ran).
    fn registered(&self) -> Result<(), BackendError> {
        let fams = self.families();
        if fams.is_empty()
            || fams
                .iter()
                .any(|f| self.side(*f).and_then(Side::device_index).is_none())
        {
            return Err(not_started());
        }
        Ok(())
    }

    fn device_mtu(&self, fam: Fam) -> u32 {
        let under = if self.cfg.mtu > 0 {
            self.cfg.mtu
        } else {
            self.ext.mtu
        };
        under.saturating_sub(fam.overhead())
    }

    fn local_addr(&self, fam: Fam) -> Result<IpAddr, BackendError> {
        let (addr, what) = match fam {
            Fam::V4 => (self.ext.addr.map(IpAddr::V4), "IPv4"),
            Fam::V6 => (self.ext.addr6.map(IpAddr::V6), "IPv6"),
        };
        addr.ok_or_else(|| {
            cfg_err(format!(
                "interface {} has no {what} address to use as the VXLAN source",
                self.ext.name
            ))
        })
    }

    /// Whether an existing device can be kept. Compared: kind, VNI, underlay device
    /// and local address (when both are set), no group, no l2miss, port (the
    /// effective one: a device on another port could not talk to the cluster),
    /// GBP and learning.
    fn compatible(&self, l: &LinkInfo, local: IpAddr) -> Result<(), String> {
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
        let have = v.local.map(IpAddr::V4).or(v.local6.map(IpAddr::V6));
        if have.is_some_and(|a| a != local) {
            diffs.push(format!("local {have:?} (want {local})"));
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

    /// Finds or creates the family's device; returns it.
    async fn ensure_device(&self, fam: Fam) -> Result<LinkInfo, BackendError> {
        let name = self.cfg.name(fam);
        let local = self.local_addr(fam)?;
        let mtu = self.device_mtu(fam);
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
        let published = match fam {
            Fam::V4 => self.opts.vtep_mac,
            Fam::V6 => self.opts.vtep_mac_v6,
        };
        let mac = published
            .or(self.side(fam).and_then(|s| s.mac))
            .unwrap_or_else(|| MacAddr::random_local(&mut rand::rng()));
        let spec = VxlanSpec {
            name: name.clone(),
            vni: self.cfg.vni,
            link: self.ext.index,
            local: Some(local),
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

    /// Sets `<subnet IP>/32` (IPv6: `<v6 subnet IP>/128`) as the only address from
    /// the network on the device, and sets it up. IPv6 link-local addresses are the
    /// kernel's and stay.
    async fn configure_address(&self, fam: Fam, dev: &LinkInfo) -> Result<(), BackendError> {
        let Some(side) = self.side(fam) else {
            return Ok(());
        };
        let (Some(network), Some(own)) = (side.network, side.own) else {
            return Ok(());
        };
        let ctx = || format!("vxlan device {} address", dev.name);
        let want = own.network();
        let host = fam.host_len();
        let addrs = self
            .nl
            .addresses(fam.ip_family(), Some(dev.index))
            .await
            .map_err(BackendError::kernel(ctx()))?;
        let mut present = false;
        for a in addrs {
            if let IpAddr::V6(v6) = a.addr {
                if v6.is_unicast_link_local() {
                    continue;
                }
            }
            if a.addr == want && a.prefix_len == host && a.scope == 0 {
                present = true;
            } else if network.contains(&a.addr) || a.addr == want || fam == Fam::V6 {
                self.nl
                    .addr_del(dev.index, a.addr, a.prefix_len)
                    .await
                    .map_err(BackendError::kernel(ctx()))?;
            }
        }
        if !present {
            self.nl
                .addr_add(dev.index, want, host)
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

    fn ownership(&self, side: &Side) -> Result<Ownership, BackendError> {
        let network = side.network.ok_or_else(not_started)?;
        let mut devices = vec![self.ext.index];
        devices.extend(side.device_index());
        Ok(Ownership {
            network,
            own: side.own,
            devices,
        })
    }

    /// The IPv6 subnet, VTEP MAC and public IPv6 of a usable lease, when this node
    /// runs dual stack and the lease can be reached over IPv6; a lease that cannot
    /// gets its warning (once) and keeps its IPv4 entries.
    fn v6_part(&mut self, l: &Lease) -> Option<(Ipv6Net, MacAddr, Ipv6Addr)> {
        let side = match &self.v6 {
            Some(Side {
                network: Some(IpNet::V6(n)),
                own,
                ..
            }) => peers::V6Side {
                network: Some(*n),
                own: match own {
                    Some(IpNet::V6(o)) => Some(*o),
                    _ => None,
                },
                dual_stack: self.v4.is_some(),
            },
            _ => peers::V6Side {
                network: None,
                own: None,
                dual_stack: self.v4.is_some(),
            },
        };
        let (net6, public6) = peers::v6_route_part(l, side, &mut self.warnings6)?;
        let v4_still = peers::v4_still(side.dual_stack);
        let data = match &l.attrs.backend_v6_data {
            None => Err("it has no BackendV6Data".to_string()),
            Some(raw) => VxlanData::decode(raw).map_err(|e| format!("its BackendV6Data: {e}")),
        };
        match data {
            Ok(d) => {
                self.warnings6.clear(&l.key);
                Some((net6, d.vtep_mac, public6))
            }
            Err(e) => {
                self.warnings6.warn(
                    l.key,
                    format!("{e}: its IPv6 subnet {net6} is not routed{v4_still}"),
                );
                None
            }
        }
    }

    /// Decides how to reach each usable lease, per family. `refresh` picks cached
    /// route lookups (DirectRouting) to redo.
    async fn plan_peers(
        &mut self,
        leases: &[Lease],
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) -> (BTreeMap<LeaseKey, Peer>, BTreeMap<LeaseKey, Peer>) {
        let ipv4 = self.v4.is_some();
        let own = match self.v4.as_ref().and_then(|s| s.own) {
            Some(IpNet::V4(o)) => Some(o),
            _ => None,
        };
        let own6 = self.v6.as_ref().and_then(|s| s.own);
        // IPv6-only: peers are told apart by their v6 subnet, and there is no IPv4
        // public IP or BackendData to require.
        let mut peers6 = Vec::new();
        if !ipv4 {
            for l in leases {
                let mine = own6.is_some() && own6 == l.ipv6_subnet().map(|n| IpNet::V6(n.trunc()));
                if peers::type_matches(l, TYPE, &mut self.warnings) && !mine {
                    peers6.push(l);
                }
            }
        }
        let mut usable = Vec::new();
        for l in leases.iter().filter(|_| ipv4) {
            if !peers::usable(l, TYPE, own, &mut self.warnings) {
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
        peers6.extend(usable.iter().map(|(l, _)| *l));
        let v6: Vec<(&Lease, Ipv6Net, MacAddr, Ipv6Addr)> = peers6
            .into_iter()
            .filter_map(|l| self.v6_part(l).map(|(n, m, ip)| (l, n, m, ip)))
            .collect();
        if self.cfg.direct_routing {
            self.lookups
                .update(
                    &self.nl,
                    usable
                        .iter()
                        .map(|(l, _)| IpAddr::V4(l.attrs.public_ip))
                        .chain(v6.iter().map(|(_, _, _, ip)| IpAddr::V6(*ip))),
                    refresh,
                )
                .await;
        }
        let mut out4 = BTreeMap::new();
        let dev4 = self.device_index();
        let mut macs: HashMap<MacAddr, IpAddr> = HashMap::new();
        for (l, d) in usable {
            let subnet = l.subnet().trunc();
            let peer = self.peer(
                l,
                IpNet::V4(subnet),
                d.vtep_mac,
                IpAddr::V4(l.attrs.public_ip),
                dev4,
                &mut macs,
            );
            out4.insert(l.key, peer);
        }
        let mut out6 = BTreeMap::new();
        let dev6 = self.device_index_v6();
        let mut macs: HashMap<MacAddr, IpAddr> = HashMap::new();
        for (l, net6, mac, ip) in v6 {
            let peer = self.peer(l, IpNet::V6(net6), mac, IpAddr::V6(ip), dev6, &mut macs);
            out6.insert(l.key, peer);
        }
        (out4, out6)
    }

    /// How to reach subnet `dst` of lease `l` whose VTEP is `mac` at `ip`.
    fn peer(
        &mut self,
        l: &Lease,
        dst: IpNet,
        mac: MacAddr,
        ip: IpAddr,
        dev: Option<u32>,
        macs: &mut HashMap<MacAddr, IpAddr>,
    ) -> Peer {
        // DirectRouting: a peer whose address the kernel reaches without a
        // gateway gets a plain route over the underlay (docs/compatibility.md,
        // "vxlan device, wire format and routes").
        let direct = match self.lookups.get(ip) {
            Some(Ok(r)) if self.cfg.direct_routing => r
                .oif
                .filter(|o| r.gateway.is_none() && r.kind == RTN_UNICAST && Some(*o) != dev),
            _ => None,
        };
        if let Some(oif) = direct {
            return Peer::Direct { dst, gw: ip, oif };
        }
        if let Some(other) = macs.insert(mac, ip).filter(|o| *o != ip) {
            let w = if ip.is_ipv6() {
                &mut self.warnings6
            } else {
                &mut self.warnings
            };
            w.warn(
                l.key,
                format!(
                    "its VTEP MAC {mac} is also published by {other}; traffic for one \
                     of them goes to the other"
                ),
            );
        }
        Peer::Tunnel {
            dst,
            gw: dst.network(),
            mac,
            vtep: ip,
        }
    }

    fn desired<'a>(&self, dev: u32, peers: impl IntoIterator<Item = &'a Peer>) -> Desired {
        let mut d = Desired::default();
        for peer in peers {
            let mut r = match *peer {
                Peer::Tunnel { dst, gw, mac, vtep } => {
                    d.fdb.insert(mac, vtep);
                    d.neigh.insert(gw, mac);
                    d.deps.insert(dst, (gw, mac));
                    Route::new(dst).via(gw).dev(dev).onlink()
                }
                Peer::Direct { dst, gw, oif } => Route::new(dst).via(gw).dev(oif),
            };
            if r.dst.addr().is_ipv6() {
                r.priority = Some(V6_METRIC);
            }
            d.routes.insert(r.dst, r);
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

    /// Reads what we own of one family from the kernel.
    async fn kernel_state(&self, side: &Side, dev: u32) -> Result<State, BackendError> {
        let own = self.ownership(side)?;
        let ctx = || "vxlan: read kernel state".to_string();
        let mut s = State::default();
        let (routes, device) = futures::join!(dataplane::owned_routes(&self.nl, &own), async {
            let mut s = State::default();
            dataplane::read_device(&self.nl, dev, side.fam.ip_family(), &mut s)
                .await
                .map(|()| s)
        });
        for r in routes.map_err(BackendError::kernel(ctx()))? {
            s.add_route(r);
        }
        let device = device.map_err(BackendError::kernel(ctx()))?;
        s.neigh = device.neigh;
        // The FDB dump has both families' remotes only if both devices were one;
        // keep this family's.
        s.fdb = device
            .fdb
            .into_iter()
            .filter(|(_, ip)| ip.is_ipv6() == (side.fam == Fam::V6))
            .collect();
        Ok(s)
    }

    async fn full_reconcile(
        &mut self,
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) -> Result<(), BackendError> {
        self.registered()?;
        let t = std::time::Instant::now();
        let leases = self.peers.all();
        let (peers4, peers6) = self.plan_peers(&leases, refresh).await;
        self.peers
            .prune(&leases, &mut self.lookups, &mut self.warnings);
        self.warnings6
            .retain(|k| leases.iter().any(|l| l.key == *k));
        let planned_us = t.elapsed().as_micros() as u64;
        let mut result = Ok(());
        for (fam, peers) in [(Fam::V4, peers4), (Fam::V6, peers6)] {
            let Some(side) = self.side(fam) else { continue };
            let dev = side.device_index().ok_or_else(not_started)?;
            let desired = self.desired(dev, peers.values());
            let current = self.kernel_state(side, dev).await?;
            let plan = dataplane::diff(&desired, &current);
            tracing::debug!(
                ?fam,
                planned_us,
                diffed_us = t.elapsed().as_micros() as u64,
                "vxlan reconcile planned"
            );
            if let Some(side) = self.side_mut(fam) {
                side.programmed = peers;
            }
            if plan.is_empty() {
                continue;
            }
            tracing::debug!(
                "vxlan reconcile ({fam:?}): {} neighbours, {} fdb, {} routes to set; {} routes, {} neighbours, {} fdb to delete",
                plan.neigh_set.len(),
                plan.fdb_set.len(),
                plan.route_set.len(),
                plan.route_del.len(),
                plan.neigh_del.len(),
                plan.fdb_del.len()
            );
            // One family's failure must not keep the other from being programmed.
            let r = self.run_plan(dev, &desired, &plan, "vxlan reconcile").await;
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Makes sure the family's device still exists (someone may have deleted it);
    /// recreates it with the same MAC and address. Returns whether it had to.
    async fn ensure_device_alive(&mut self, fam: Fam) -> Result<bool, BackendError> {
        let Some(dev) = self.side(fam).and_then(|s| s.dev.clone()) else {
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
        let l = self.ensure_device(fam).await?;
        self.configure_device(&l).await?;
        self.configure_address(fam, &l).await?;
        if let Some(side) = self.side_mut(fam) {
            side.dev = Some(l);
        }
        Ok(true)
    }

    /// Creates (or reuses) the family's device and returns its MAC.
    async fn register_side(&mut self, fam: Fam) -> Result<MacAddr, BackendError> {
        let dev = self.ensure_device(fam).await?;
        self.configure_device(&dev).await?;
        let mac = dev.mac.ok_or_else(|| BackendError::Kernel {
            context: format!("vxlan device {}", dev.name),
            source: KernelError::State("the device has no MAC address".into()),
        })?;
        let side = self.side_mut(fam).ok_or_else(not_started)?;
        side.mac = Some(mac);
        side.dev = Some(dev);
        Ok(mac)
    }

    /// Sets the device's address once our lease is known and checks that its MAC is
    /// still the published one.
    async fn start_side(&self, fam: Fam) -> Result<(), BackendError> {
        let side = self.side(fam).ok_or_else(not_started)?;
        let dev = side.dev.clone().ok_or_else(not_started)?;
        self.configure_address(fam, &dev).await?;
        let now = self
            .nl
            .link_by_index(dev.index)
            .await
            .map_err(BackendError::kernel(format!("vxlan device {}", dev.name)))?;
        if now.as_ref().and_then(|l| l.mac) != side.mac {
            return Err(BackendError::Kernel {
                context: format!("vxlan device {}", dev.name),
                source: KernelError::State(format!(
                    "its MAC changed from the published {:?} to {:?}",
                    side.mac.map(|m| m.to_string()),
                    now.and_then(|l| l.mac).map(|m| m.to_string())
                )),
            });
        }
        Ok(())
    }
}

fn not_started() -> BackendError {
    BackendError::Other("vxlan backend used before register/start".into())
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        let side = |on: bool, fam: Fam, network: Option<IpNet>| {
            on.then(|| {
                let mut s = Side::new(fam);
                s.network = network;
                s
            })
        };
        self.v4 = side(config.enable_ipv4, Fam::V4, config.network.map(IpNet::V4));
        self.v6 = side(
            config.enable_ipv6,
            Fam::V6,
            config.ipv6_network.map(IpNet::V6),
        );
        // Checked before any device is created, so a bad config changes nothing.
        let mut locals = Vec::new();
        for fam in self.families() {
            locals.push(self.local_addr(fam)?.to_string());
        }
        let local = locals.join(", ");
        tracing::info!(
            "vxlan: VNI {} port {} GBP {} learning {} DirectRouting {} on {} ({local})",
            self.cfg.vni,
            self.cfg.effective_port(),
            self.cfg.gbp,
            self.cfg.learning,
            self.cfg.direct_routing,
            self.ext.name,
        );
        let local4 = self.ext.addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mut attrs = LeaseAttrs::new(self.ext.public_ip.unwrap_or(local4));
        attrs.backend_type = TYPE.to_string();
        if self.v4.is_some() {
            let mac = self.register_side(Fam::V4).await?;
            attrs.backend_data = Some(
                VxlanData {
                    vni: self.cfg.vni,
                    vtep_mac: mac,
                }
                .encode(),
            );
        } else {
            // IPv6-only: nothing IPv4 is published (the agent fills in 0.0.0.0).
            attrs.public_ip = Ipv4Addr::UNSPECIFIED;
        }
        if self.v6.is_some() {
            let mac6 = self.register_side(Fam::V6).await?;
            attrs.backend_v6_data = Some(
                VxlanData {
                    vni: self.cfg.vni,
                    vtep_mac: mac6,
                }
                .encode(),
            );
        }
        Ok(attrs)
    }

    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError> {
        if let Some(v4) = &mut self.v4 {
            v4.network = config.network.map(IpNet::V4);
            v4.own = Some(IpNet::V4(own.subnet().trunc()));
        }
        if let Some(v6) = &mut self.v6 {
            v6.network = config.ipv6_network.map(IpNet::V6);
            v6.own = own.ipv6_subnet().map(|n| IpNet::V6(n.trunc()));
        }
        for fam in self.families() {
            self.start_side(fam).await?;
        }
        Ok(())
    }

    fn mtu(&self) -> u32 {
        // FLANNEL_MTU stays upstream's (the IPv4 device's) in dual stack too; larger
        // IPv6 pod packets get a Packet Too Big from flannel-v6 (docs/compatibility.md).
        // IPv6-only: the v6 device's, the only one pods' packets cross.
        match self.v4 {
            Some(_) => self.device_mtu(Fam::V4),
            None => self.device_mtu(Fam::V6),
        }
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        self.peers.replace_all(peers);
        // A full update re-asks the kernel about every peer (DirectRouting).
        self.full_reconcile(|_| true).await
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<(), BackendError> {
        self.registered()?;
        let mut batch = self.peers.apply_batch(events, &mut self.warnings, |_| {});
        for e in events {
            if let LeaseEvent::Removed(l) = e {
                self.warnings6.clear(&l.key);
            }
        }
        batch.current.dedup_by(|a, b| a.key == b.key);
        let (new4, new6) = self.plan_peers(&batch.current, |_| false).await;
        let mut result = Ok(());
        for (fam, new_peers) in [(Fam::V4, new4), (Fam::V6, new6)] {
            let Some(side) = self.side_mut(fam) else {
                continue;
            };
            let dev = side.device_index().ok_or_else(not_started)?;
            let old = peers::swap_touched(&mut side.programmed, &batch.touched, &new_peers);
            // Another peer may still use an FDB entry a removed one shared.
            let still: HashSet<(MacAddr, IpAddr)> = side
                .programmed
                .values()
                .filter_map(|p| match p {
                    Peer::Tunnel { mac, vtep, .. } => Some((*mac, *vtep)),
                    Peer::Direct { .. } => None,
                })
                .collect();
            let desired = self.desired(dev, new_peers.values());
            let mut plan = dataplane::diff(&desired, &self.desired(dev, old.values()).as_state());
            plan.fdb_del.retain(|e| !still.contains(e));
            let r = self
                .run_plan(dev, &desired, &plan, "vxlan lease events")
                .await;
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    fn resync_interval(&self) -> Option<Duration> {
        Some(RESYNC)
    }

    async fn resync(&mut self) -> Result<(), BackendError> {
        for fam in self.families() {
            self.ensure_device_alive(fam).await?;
        }
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
