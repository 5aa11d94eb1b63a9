//! Translation between flannel's values and rtnetlink messages.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_core::MacAddr;
use ipnet::IpNet;
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::AddressFamily;

use super::*;

pub(super) fn mac_from(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

pub(super) fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(|a| IpAddr::V4(a.into())),
        16 => <[u8; 16]>::try_from(b).ok().map(|a| IpAddr::V6(a.into())),
        _ => None,
    }
}

pub(super) fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

pub(super) fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v) => Some(IpAddr::V4(*v)),
        NeighbourAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        NeighbourAddress::Other(b) => ip_from_bytes(b),
        _ => None,
    }
}

pub(super) fn parse_link(m: &LinkMessage) -> LinkInfo {
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

pub(super) fn parse_vxlan(attrs: &[InfoVxlan]) -> VxlanInfo {
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

pub(super) fn parse_route(m: &RouteMessage) -> Option<Route> {
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

pub(super) fn route_message(r: &Route) -> RouteMessage {
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

/// The destination IP and link-layer address a neighbour or FDB message carries (the
/// last of each attribute wins).
fn neigh_attrs(m: &NeighbourMessage) -> (Option<IpAddr>, Option<MacAddr>) {
    let mut dst = None;
    let mut lladdr = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(d) => dst = neigh_ip(d),
            NeighbourAttribute::LinkLayerAddress(b) => lladdr = mac_from(b),
            _ => {}
        }
    }
    (dst, lladdr)
}

pub(super) fn parse_neigh(m: &NeighbourMessage) -> Option<Neighbour> {
    let (dst, lladdr) = neigh_attrs(m);
    Some(Neighbour {
        index: m.header.ifindex,
        dst: dst?,
        lladdr,
        state: m.header.state.into(),
    })
}

pub(super) fn parse_fdb(m: &NeighbourMessage) -> Option<FdbEntry> {
    let (dst, mac) = neigh_attrs(m);
    Some(FdbEntry {
        index: m.header.ifindex,
        mac: mac?,
        dst,
        state: m.header.state.into(),
        flags: m.header.flags.bits(),
    })
}

pub(super) fn neigh_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
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
}
