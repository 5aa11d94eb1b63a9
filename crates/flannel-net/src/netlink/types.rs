//! What flannel reads from and writes to the kernel: links, addresses, routes,
//! neighbours and FDB entries, as plain values (the codec turns them into messages).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_core::MacAddr;
use ipnet::IpNet;

use super::{
    NTF_SELF, NUD_PERMANENT, RTN_UNICAST, RTPROT_FLANNEL, RT_SCOPE_UNIVERSE, RT_TABLE_MAIN,
};

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`vxlan`, `veth`, `bridge`...); `None` for plain devices.
    pub kind: Option<String>,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Set for vxlan devices.
    pub vxlan: Option<VxlanInfo>,
}

/// The vxlan attributes flannel cares about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VxlanInfo {
    pub vni: u32,
    /// The underlay device (`dev`), if bound to one.
    pub link: Option<u32>,
    pub local: Option<Ipv4Addr>,
    pub local6: Option<Ipv6Addr>,
    pub group: Option<IpAddr>,
    /// UDP destination port (the kernel reports its default, 8472, when none was set).
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
    pub l2miss: bool,
    pub l3miss: bool,
}

/// A vxlan device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// Underlay interface index (`dev`).
    pub link: u32,
    /// Local (source) address.
    pub local: Option<IpAddr>,
    /// Destination port; `None` keeps the kernel default (8472).
    pub port: Option<u16>,
    pub learning: bool,
    pub gbp: bool,
    pub mtu: Option<u32>,
    pub mac: Option<MacAddr>,
}

/// An interface address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// `rtm_scope` values (0 global, 253 link, 254 host).
    pub scope: u8,
}

/// A route. [`Route::new`] gives flannel's defaults: main table, [`RTPROT_FLANNEL`],
/// unicast, scope universe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub table: u32,
    pub protocol: u8,
    pub scope: u8,
    pub kind: u8,
    pub onlink: bool,
    pub priority: Option<u32>,
    pub pref_src: Option<IpAddr>,
}

impl Route {
    pub fn new(dst: IpNet) -> Self {
        Route {
            dst: dst.trunc(),
            gateway: None,
            oif: None,
            table: RT_TABLE_MAIN,
            protocol: RTPROT_FLANNEL,
            scope: RT_SCOPE_UNIVERSE,
            kind: RTN_UNICAST,
            onlink: false,
            priority: None,
            pref_src: None,
        }
    }
    pub fn via(mut self, gw: IpAddr) -> Self {
        self.gateway = Some(gw);
        self
    }
    pub fn dev(mut self, oif: u32) -> Self {
        self.oif = Some(oif);
        self
    }
    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }
    pub fn scope(mut self, scope: u8) -> Self {
        self.scope = scope;
        self
    }
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }
    pub fn table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }

    /// Same forwarding behaviour: destination, gateway, device, onlink, type,
    /// scope, table, metric. Ignores the protocol (who owns it).
    pub fn same_path(&self, o: &Route) -> bool {
        self.dst == o.dst
            && self.gateway == o.gateway
            && self.oif == o.oif
            && self.onlink == o.onlink
            && self.kind == o.kind
            && self.scope == o.scope
            && self.table == o.table
            && self.priority.unwrap_or(0) == o.priority.unwrap_or(0)
    }
}

/// Which routes a dump returns (all conditions must hold; `None` = any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteFilter {
    pub table: Option<u32>,
    pub protocol: Option<u8>,
    pub oif: Option<u32>,
}

/// An IP neighbour (ARP/NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub index: u32,
    pub dst: IpAddr,
    pub lladdr: Option<MacAddr>,
    /// `NUD_*` bits.
    pub state: u16,
}

impl Neighbour {
    pub fn is_permanent(&self) -> bool {
        self.state & NUD_PERMANENT != 0
    }
}

/// A bridge forwarding database entry of a device (for vxlan: MAC → remote VTEP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    pub index: u32,
    pub mac: MacAddr,
    /// The remote VTEP (`dst`), for vxlan entries.
    pub dst: Option<IpAddr>,
    /// `NUD_*` bits.
    pub state: u16,
    /// `NTF_*` bits.
    pub flags: u8,
}

impl FdbEntry {
    pub fn is_permanent(&self) -> bool {
        self.state & NUD_PERMANENT != 0
    }
    /// Entry of the device itself (`self`), not of a bridge it is enslaved to.
    pub fn is_self(&self) -> bool {
        self.flags & NTF_SELF != 0
    }
}
