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

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flannel_core::MacAddr;
use futures::stream::{self, StreamExt};
use ipnet::IpNet;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};

use crate::netns::{run_maybe_in_netns, NetnsError};

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

/// What went wrong below a netlink operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    /// The kernel answered with this errno.
    #[error("{}", io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// The connection task stopped (its socket failed).
    #[error("netlink connection closed")]
    Closed,
    /// The kernel answered something we did not ask for.
    #[error("unexpected netlink reply: {0}")]
    Unexpected(String),
    /// Opening the socket or a /proc/sys file failed.
    #[error("{0}")]
    Io(String),
}

/// A failed netlink (or sysctl) operation; `op` names what was attempted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {cause}")]
pub struct NetlinkError {
    pub op: String,
    pub cause: Cause,
}

impl NetlinkError {
    fn new(op: impl Into<String>, cause: Cause) -> Self {
        NetlinkError {
            op: op.into(),
            cause,
        }
    }
    /// The kernel's errno, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self.cause {
            Cause::Errno(e) => Some(e),
            _ => None,
        }
    }
}

impl From<NetnsError> for Cause {
    fn from(e: NetnsError) -> Self {
        Cause::Io(e.to_string())
    }
}

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

/// A route-netlink connection (one socket, many concurrent requests). Cheap to clone.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    netns: Option<Arc<PathBuf>>,
    window: usize,
    /// The kernel runs one dump per socket at a time (a second one fails with
    /// EBUSY); dumps through this connection take turns.
    dump_turn: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("netns", &self.netns)
            .field("window", &self.window)
            .finish()
    }
}

fn mac_from(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(|a| IpAddr::V4(a.into())),
        16 => <[u8; 16]>::try_from(b).ok().map(|a| IpAddr::V6(a.into())),
        _ => None,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v) => Some(IpAddr::V4(*v)),
        NeighbourAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        NeighbourAddress::Other(b) => ip_from_bytes(b),
        _ => None,
    }
}

fn parse_link(m: &LinkMessage) -> LinkInfo {
    let mut l = LinkInfo {
        index: m.header.index,
        name: String::new(),
        kind: None,
        mtu: 0,
        mac: None,
        up: m.header.flags.contains(LinkFlags::Up),
        vxlan: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(b) => l.mac = mac_from(b),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                        NlLinkInfo::Data(InfoData::Vxlan(v)) => l.vxlan = Some(parse_vxlan(v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn parse_vxlan(attrs: &[InfoVxlan]) -> VxlanInfo {
    let mut v = VxlanInfo::default();
    for a in attrs {
        match a {
            InfoVxlan::Id(id) => v.vni = *id,
            InfoVxlan::Link(i) if *i != 0 => v.link = Some(*i),
            InfoVxlan::Local(ip) if !ip.is_unspecified() => v.local = Some(*ip),
            InfoVxlan::Local6(ip) if !ip.is_unspecified() => v.local6 = Some(*ip),
            InfoVxlan::Group(ip) if !ip.is_unspecified() => v.group = Some(IpAddr::V4(*ip)),
            InfoVxlan::Group6(ip) if !ip.is_unspecified() => v.group = Some(IpAddr::V6(*ip)),
            InfoVxlan::Port(p) => v.port = *p,
            InfoVxlan::Learning(b) => v.learning = *b,
            InfoVxlan::Gbp => v.gbp = true,
            InfoVxlan::L2Miss(b) => v.l2miss = *b,
            InfoVxlan::L3Miss(b) => v.l3miss = *b,
            _ => {}
        }
    }
    v
}

fn parse_route(m: &RouteMessage) -> Option<Route> {
    let family = m.header.address_family;
    let mut dst_addr: Option<IpAddr> = None;
    let mut r = Route {
        dst: IpNet::default(),
        gateway: None,
        oif: None,
        table: u32::from(m.header.table),
        protocol: m.header.protocol.into(),
        scope: m.header.scope.into(),
        kind: m.header.kind.into(),
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        priority: None,
        pref_src: None,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst_addr = route_ip(d),
            RouteAttribute::Gateway(g) => r.gateway = route_ip(g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Priority(p) => r.priority = Some(*p),
            RouteAttribute::PrefSource(s) => r.pref_src = route_ip(s),
            _ => {}
        }
    }
    let dst_addr = match (dst_addr, family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    r.dst = IpNet::new(dst_addr, m.header.destination_prefix_length).ok()?;
    Some(r)
}

fn route_message(r: &Route) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = match r.dst {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    m.header.destination_prefix_length = r.dst.prefix_len();
    m.header.protocol = RouteProtocol::from(r.protocol);
    m.header.scope = RouteScope::from(r.scope);
    m.header.kind = RouteType::from(r.kind);
    if r.onlink {
        m.header.flags = RouteFlags::Onlink;
    }
    if r.table < 256 {
        m.header.table = r.table as u8;
    } else {
        m.header.table = RouteHeader::RT_TABLE_UNSPEC;
        m.attributes.push(RouteAttribute::Table(r.table));
    }
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(
            r.dst.addr(),
        )));
    if let Some(gw) = r.gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(p) = r.priority {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    if let Some(s) = r.pref_src {
        m.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    m
}

fn parse_neigh(m: &NeighbourMessage) -> Option<Neighbour> {
    let mut dst = None;
    let mut lladdr = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(d) => dst = neigh_ip(d),
            NeighbourAttribute::LinkLayerAddress(b) => lladdr = mac_from(b),
            _ => {}
        }
    }
    Some(Neighbour {
        index: m.header.ifindex,
        dst: dst?,
        lladdr,
        state: m.header.state.into(),
    })
}

fn parse_fdb(m: &NeighbourMessage) -> Option<FdbEntry> {
    let mut dst = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(d) => dst = neigh_ip(d),
            NeighbourAttribute::LinkLayerAddress(b) => mac = mac_from(b),
            _ => {}
        }
    }
    Some(FdbEntry {
        index: m.header.ifindex,
        mac: mac?,
        dst,
        state: m.header.state.into(),
        flags: m.header.flags.bits(),
    })
}

fn neigh_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
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

fn sysctl_path(key: &str) -> Result<PathBuf, Cause> {
    // The dotted form cannot name devices with dots (flannel.1); a key with a slash
    // is taken as a path as it is.
    let key = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    if key.is_empty() || key.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(Cause::Io(format!("invalid sysctl key {key:?}")));
    }
    Ok(Path::new("/proc/sys").join(key))
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
            .map_err(|e| NetlinkError::new(op(), Cause::Io(e.to_string())))?;
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

    // ---- links ----

    async fn get_link(&self, m: LinkMessage, op: String) -> Result<Option<LinkInfo>, NetlinkError> {
        match self
            .exchange(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST)
            .await
        {
            Ok(msgs) => Ok(msgs.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })),
            Err(Cause::Errno(libc::ENODEV)) => Ok(None),
            Err(c) => Err(NetlinkError::new(op, c)),
        }
    }

    /// The link called `name`, or `None`.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(m, format!("get link {name}")).await
    }

    /// The link with index `index`, or `None`.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.get_link(m, format!("get link #{index}")).await
    }

    /// All links.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let msgs = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .await
            .map_err(|c| NetlinkError::new("list links", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a vxlan device (fails with EEXIST if the name is taken: whether an
    /// existing device is usable is the caller's decision). Never sends group,
    /// l2miss/l3miss on, ttl, tos or the UDP checksum attribute, so those keep the
    /// kernel defaults, as Go flanneld leaves them.
    pub async fn vxlan_create(&self, spec: &VxlanSpec) -> Result<LinkInfo, NetlinkError> {
        let op = format!("create vxlan device {}", spec.name);
        let mut data = vec![InfoVxlan::Id(spec.vni), InfoVxlan::Link(spec.link)];
        match spec.local {
            Some(IpAddr::V4(a)) => data.push(InfoVxlan::Local(a)),
            Some(IpAddr::V6(a)) => data.push(InfoVxlan::Local6(a)),
            None => {}
        }
        if let Some(p) = spec.port.filter(|p| *p > 0) {
            data.push(InfoVxlan::Port(p));
        }
        data.push(InfoVxlan::Learning(spec.learning));
        data.push(InfoVxlan::L2Miss(false));
        data.push(InfoVxlan::L3Miss(false));
        if spec.gbp {
            data.push(InfoVxlan::Gbp);
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(spec.name.clone()));
        if let Some(mtu) = spec.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = spec.mac {
            m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Vxlan),
            NlLinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
            .await
            .map_err(|c| NetlinkError::new(op.clone(), c))?;
        self.link_by_name(&spec.name)
            .await?
            .ok_or_else(|| NetlinkError::new(op, Cause::Errno(libc::ENODEV)))
    }

    async fn link_change(&self, m: LinkMessage, op: String) -> Result<(), NetlinkError> {
        self.ack(RouteNetlinkMessage::NewLink(m), 0)
            .await
            .map_err(|c| NetlinkError::new(op, c))
    }

    /// Sets the link administratively up.
    pub async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.link_change(m, format!("set link #{index} up")).await
    }

    /// Sets the link administratively down.
    pub async fn link_set_down(&self, index: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.change_mask = LinkFlags::Up;
        self.link_change(m, format!("set link #{index} down")).await
    }

    pub async fn link_set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.link_change(m, format!("set link #{index} mtu {mtu}"))
            .await
    }

    pub async fn link_set_mac(&self, index: u32, mac: MacAddr) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        self.link_change(m, format!("set link #{index} address {mac}"))
            .await
    }

    /// Deletes a link; a link that is already gone is success.
    pub async fn link_del(&self, index: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.ack(RouteNetlinkMessage::DelLink(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ENODEV)) => Ok(()),
            Err(c) => Err(NetlinkError::new(format!("delete link #{index}"), c)),
        }
    }

    // ---- addresses ----

    /// Addresses of one family, of one link (`Some(index)`) or all.
    pub async fn addresses(
        &self,
        family: IpFamily,
        index: Option<u32>,
    ) -> Result<Vec<Address>, NetlinkError> {
        let mut req = AddressMessage::default();
        req.header.family = family.af();
        let msgs = self
            .dump(RouteNetlinkMessage::GetAddress(req))
            .await
            .map_err(|c| NetlinkError::new("list addresses", c))?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if index.is_some_and(|i| i != a.header.index) {
                continue;
            }
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
            // point-to-point links); prefer it when present.
            let mut local = None;
            let mut address = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(addr) = local.or(address) {
                out.push(Address {
                    index: a.header.index,
                    addr,
                    prefix_len: a.header.prefix_len,
                    scope: a.header.scope.into(),
                });
            }
        }
        Ok(out)
    }

    fn address_message(index: u32, addr: IpAddr, prefix_len: u8) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix_len;
        m.header.scope = AddressScope::Universe;
        match addr {
            IpAddr::V4(_) => {
                m.header.family = AddressFamily::Inet;
                m.attributes.push(AddressAttribute::Local(addr));
                m.attributes.push(AddressAttribute::Address(addr));
            }
            IpAddr::V6(_) => {
                m.header.family = AddressFamily::Inet6;
                m.attributes.push(AddressAttribute::Address(addr));
            }
        }
        m
    }

    /// Adds `addr/prefix_len` (scope global) to the link; present already is success.
    pub async fn addr_add(
        &self,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let m = Self::address_message(index, addr, prefix_len);
        self.ack(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|c| {
            NetlinkError::new(
                format!("add address {addr}/{prefix_len} to link #{index}"),
                c,
            )
        })
    }

    /// Removes an address; an address that is not there is success.
    pub async fn addr_del(
        &self,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let m = Self::address_message(index, addr, prefix_len);
        match self.ack(RouteNetlinkMessage::DelAddress(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::EADDRNOTAVAIL)) | Err(Cause::Errno(libc::ENODEV)) => {
                Ok(())
            }
            Err(c) => Err(NetlinkError::new(
                format!("delete address {addr}/{prefix_len} from link #{index}"),
                c,
            )),
        }
    }

    // ---- routes ----

    /// Routes of one family matching `filter` (all tables unless filtered).
    pub async fn routes(
        &self,
        family: IpFamily,
        filter: &RouteFilter,
    ) -> Result<Vec<Route>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = family.af();
        let msgs = self
            .dump(RouteNetlinkMessage::GetRoute(req))
            .await
            .map_err(|c| NetlinkError::new("list routes", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if !r.header.flags.contains(RouteFlags::Cloned) =>
                {
                    parse_route(r)
                }
                _ => None,
            })
            .filter(|r| {
                filter.table.is_none_or(|t| t == r.table)
                    && filter.protocol.is_none_or(|p| p == r.protocol)
                    && filter.oif.is_none_or(|o| Some(o) == r.oif)
            })
            .collect())
    }

    /// Adds or replaces the route for `route.dst` (in its table, same metric).
    pub async fn route_replace(&self, route: &Route) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::NewRoute(route_message(route)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|c| NetlinkError::new(format!("replace route {}", describe_route(route)), c))
    }

    /// Deletes a route (matched by destination, table and, if set, gateway, device
    /// and metric); a route that is already gone is success.
    pub async fn route_del(&self, route: &Route) -> Result<(), NetlinkError> {
        let mut m = route_message(route);
        // The kernel matches a non-zero protocol/scope too; leave them out so a
        // route is found whoever added it.
        m.header.protocol = RouteProtocol::Unspec;
        m.header.scope = RouteScope::NoWhere;
        m.header.flags = RouteFlags::empty();
        match self.ack(RouteNetlinkMessage::DelRoute(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ESRCH)) => Ok(()),
            Err(c) => Err(NetlinkError::new(
                format!("delete route {}", describe_route(route)),
                c,
            )),
        }
    }

    /// The kernel's route lookup for `dst` (`ip route get`).
    pub async fn route_get(&self, dst: IpAddr) -> Result<Route, NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = match dst {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let op = || format!("route get {dst}");
        let msgs = self
            .exchange(RouteNetlinkMessage::GetRoute(m), NLM_F_REQUEST)
            .await
            .map_err(|c| NetlinkError::new(op(), c))?;
        msgs.iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::new(op(), Cause::Unexpected("no route in reply".into())))
    }

    // ---- neighbours ----

    /// IP neighbour entries of one family, of one link or all.
    pub async fn neighbours(
        &self,
        family: IpFamily,
        index: Option<u32>,
    ) -> Result<Vec<Neighbour>, NetlinkError> {
        let mut req = NeighbourMessage::default();
        req.header.family = family.af();
        let msgs = self
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .await
            .map_err(|c| NetlinkError::new("list neighbours", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neigh(n),
                _ => None,
            })
            .filter(|n| index.is_none_or(|i| i == n.index))
            .collect())
    }

    /// Adds or replaces a permanent neighbour entry `ip lladdr mac` on the link.
    pub async fn neigh_replace(
        &self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), NetlinkError> {
        let mut m = NeighbourMessage::default();
        m.header.family = IpFamily::of(&ip).af();
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_address(ip)));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|c| {
            NetlinkError::new(
                format!("replace neighbour {ip} lladdr {mac} on link #{index}"),
                c,
            )
        })
    }

    /// Deletes a neighbour entry; gone already is success.
    pub async fn neigh_del(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut m = NeighbourMessage::default();
        m.header.family = IpFamily::of(&ip).af();
        m.header.ifindex = index;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_address(ip)));
        match self.ack(RouteNetlinkMessage::DelNeighbour(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ENOENT)) | Err(Cause::Errno(libc::ENODEV)) => Ok(()),
            Err(c) => Err(NetlinkError::new(
                format!("delete neighbour {ip} on link #{index}"),
                c,
            )),
        }
    }

    // ---- bridge FDB ----

    /// FDB entries of the link (`bridge fdb show dev <link>`).
    pub async fn fdb_entries(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        let msgs = self
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .await
            .map_err(|c| NetlinkError::new("list fdb entries", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_fdb(n),
                _ => None,
            })
            .filter(|e| e.index == index)
            .collect())
    }

    fn fdb_message(index: u32, mac: MacAddr, dst: Option<IpAddr>) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        if let Some(ip) = dst {
            m.attributes
                .push(NeighbourAttribute::Destination(neigh_address(ip)));
        }
        m
    }

    /// Adds or replaces the permanent entry `mac dst <dst> self` on the (vxlan) link.
    pub async fn fdb_replace(
        &self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> Result<(), NetlinkError> {
        let m = Self::fdb_message(index, mac, Some(dst));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|c| NetlinkError::new(format!("replace fdb {mac} dst {dst} on link #{index}"), c))
    }

    /// Deletes the entry for `mac` (only the remote `dst` if given); gone is success.
    pub async fn fdb_del(
        &self,
        index: u32,
        mac: MacAddr,
        dst: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let m = Self::fdb_message(index, mac, dst);
        match self.ack(RouteNetlinkMessage::DelNeighbour(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ENOENT)) | Err(Cause::Errno(libc::ENODEV)) => Ok(()),
            Err(c) => Err(NetlinkError::new(
                format!("delete fdb {mac} on link #{index}"),
                c,
            )),
        }
    }

    // ---- sysctl ----

    /// Writes a sysctl (`net/ipv6/conf/flannel.1/accept_ra` or the dotted form) in
    /// this connection's namespace (/proc/sys/net is per namespace, resolved by the
    /// namespace of the thread that opens the file).
    pub async fn sysctl_write(&self, key: &str, value: &str) -> Result<(), NetlinkError> {
        let op = format!("write sysctl {key}={value}");
        let path = sysctl_path(key).map_err(|c| NetlinkError::new(op.clone(), c))?;
        let value = value.to_string();
        run_maybe_in_netns(self.netns(), move || std::fs::write(&path, value))
            .await
            .map_err(|e| NetlinkError::new(op.clone(), e.into()))?
            .map_err(|e| NetlinkError::new(op, Cause::Io(e.to_string())))
    }

    /// Reads a sysctl in this connection's namespace (trimmed).
    pub async fn sysctl_read(&self, key: &str) -> Result<String, NetlinkError> {
        let op = format!("read sysctl {key}");
        let path = sysctl_path(key).map_err(|c| NetlinkError::new(op.clone(), c))?;
        run_maybe_in_netns(self.netns(), move || std::fs::read_to_string(&path))
            .await
            .map_err(|e| NetlinkError::new(op.clone(), e.into()))?
            .map(|s| s.trim().to_string())
            .map_err(|e| NetlinkError::new(op, Cause::Io(e.to_string())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_messages_round_trip() {
        let r = Route::new("10.5.2.0/24".parse().unwrap())
            .via("10.5.2.0".parse().unwrap())
            .dev(7)
            .onlink();
        let back = parse_route(&route_message(&r)).unwrap();
        assert_eq!(back, r);
        let r = Route::new("fd00::/64".parse().unwrap()).table(1000).dev(3);
        assert_eq!(parse_route(&route_message(&r)).unwrap(), r);
    }

    #[test]
    fn sysctl_keys_are_confined_to_proc_sys() {
        assert_eq!(
            sysctl_path("net/ipv6/conf/eth0/accept_ra").unwrap(),
            Path::new("/proc/sys/net/ipv6/conf/eth0/accept_ra")
        );
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv6/conf/flannel.1/accept_ra").unwrap(),
            Path::new("/proc/sys/net/ipv6/conf/flannel.1/accept_ra")
        );
        assert!(sysctl_path("net/../../etc/passwd").is_err());
        assert!(sysctl_path("").is_err());
    }
}
