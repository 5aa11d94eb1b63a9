//! Interface and address lookup, for choosing the external interface: the links of
//! this namespace with their addresses, the default route's interface, and
//! `ip route get`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// A link of this namespace and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    pub addrs: Vec<IfAddr>,
}

/// One address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub link_local_scope: bool,
    pub host_scope: bool,
    pub deprecated: bool,
    pub permanent: bool,
    pub temporary: bool,
}

impl Interface {
    /// The address upstream would pick for this interface: the first usable
    /// (non-deprecated) unicast address of the family, preferring global scope, then
    /// permanent, then non-temporary. Host-scoped addresses (loopback) come last, so
    /// `--iface=lo` still works for single-host setups.
    pub fn preferred_addr(&self, v6: bool) -> Option<IpAddr> {
        self.addrs
            .iter()
            .filter(|a| a.addr.is_ipv6() == v6 && !a.deprecated && !a.addr.is_multicast())
            .min_by_key(|a| (a.host_scope, a.link_local_scope, !a.permanent, a.temporary))
            .map(|a| a.addr)
    }

    pub fn preferred_v4(&self) -> Option<Ipv4Addr> {
        match self.preferred_addr(false) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        }
    }

    pub fn preferred_v6(&self) -> Option<Ipv6Addr> {
        match self.preferred_addr(true) {
            Some(IpAddr::V6(a)) => Some(a),
            _ => None,
        }
    }

    pub fn has_addr(&self, ip: IpAddr) -> bool {
        self.addrs.iter().any(|a| a.addr == ip)
    }
}

/// The answer of `ip route get <dst>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLookup {
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub prefsrc: Option<IpAddr>,
}

/// A netlink query that failed.
#[derive(Debug, thiserror::Error)]
#[error("netlink {what}: {source}")]
pub struct LookupError {
    pub what: &'static str,
    #[source]
    pub source: rtnetlink::Error,
}

fn err(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> LookupError {
    move |source| LookupError { what, source }
}

/// All links of the handle's namespace with their addresses, in index order.
pub async fn interfaces(h: &Handle) -> Result<Vec<Interface>, LookupError> {
    let mut out: Vec<Interface> = Vec::new();
    let mut links = h.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(err("link dump"))? {
        let mut iface = Interface {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            addrs: Vec::new(),
        };
        for a in msg.attributes {
            match a {
                LinkAttribute::IfName(n) => iface.name = n,
                LinkAttribute::Mtu(m) => iface.mtu = m,
                _ => {}
            }
        }
        out.push(iface);
    }
    let mut addrs = h.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(err("address dump"))? {
        let hdr = &msg.header;
        let mut addr = None;
        let mut local = None;
        let mut flags = u32::from(hdr.flags.bits());
        for a in &msg.attributes {
            match a {
                AddressAttribute::Address(ip) => addr = Some(*ip),
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Flags(f) => flags = f.bits(),
                _ => {}
            }
        }
        // On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours.
        let Some(ip) = local.or(addr) else { continue };
        let bit = |f: AddressHeaderFlags| flags & u32::from(f.bits()) != 0;
        let entry = IfAddr {
            addr: ip,
            prefix_len: hdr.prefix_len,
            link_local_scope: hdr.scope == AddressScope::Link,
            host_scope: hdr.scope == AddressScope::Host,
            deprecated: bit(AddressHeaderFlags::Deprecated),
            permanent: bit(AddressHeaderFlags::Permanent),
            temporary: flags & 0x01 != 0, // IFA_F_TEMPORARY (= IFA_F_SECONDARY for v4)
        };
        let entry = IfAddr {
            temporary: entry.temporary && ip.is_ipv6(),
            ..entry
        };
        if let Some(i) = out.iter_mut().find(|i| i.index == hdr.index) {
            i.addrs.push(entry);
        }
    }
    out.sort_by_key(|i| i.index);
    Ok(out)
}

/// `ip route get <dst>`: the interface, gateway and preferred source the kernel would use.
pub async fn route_get(h: &Handle, dst: IpAddr) -> Result<RouteLookup, LookupError> {
    let msg: RouteMessage = match dst {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .build(),
    };
    let mut replies = h.route().get(msg).execute();
    let reply = replies.try_next().await.map_err(err("route get"))?;
    let mut out = RouteLookup {
        oif: None,
        gateway: None,
        prefsrc: None,
    };
    for a in reply.map(|r| r.attributes).unwrap_or_default() {
        match a {
            RouteAttribute::Oif(i) => out.oif = Some(i),
            RouteAttribute::Gateway(g) => out.gateway = route_ip(g),
            RouteAttribute::PrefSource(s) => out.prefsrc = route_ip(s),
            _ => {}
        }
    }
    Ok(out)
}

/// The output interface of the default route of the main table, if there is one.
pub async fn default_route_oif(h: &Handle, v6: bool) -> Result<Option<u32>, LookupError> {
    let msg: RouteMessage = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let mut routes = h.route().get(msg).execute();
    let mut best: Option<(u32, u32)> = None; // (priority, oif)
    while let Some(r) = routes.try_next().await.map_err(err("route dump"))? {
        if r.header.address_family != family
            || r.header.destination_prefix_length != 0
            || r.header.table != 254
        {
            continue;
        }
        let mut oif = None;
        let mut prio = 0;
        for a in &r.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Priority(p) => prio = *p,
                _ => {}
            }
        }
        if let Some(oif) = oif {
            if best.is_none_or(|(p, _)| prio < p) {
                best = Some((prio, oif));
            }
        }
    }
    Ok(best.map(|(_, oif)| oif))
}

fn route_ip(a: RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str, ll: bool, perm: bool, temp: bool, dep: bool) -> IfAddr {
        IfAddr {
            addr: ip.parse().unwrap(),
            prefix_len: 24,
            link_local_scope: ll,
            host_scope: false,
            deprecated: dep,
            permanent: perm,
            temporary: temp,
        }
    }

    #[test]
    fn preferred_address_order() {
        let i = Interface {
            index: 2,
            name: "eth0".into(),
            mtu: 1500,
            up: true,
            loopback: false,
            addrs: vec![
                addr("fe80::1", true, true, false, false),
                addr("2001:db8::5", false, false, true, false),
                addr("2001:db8::6", false, false, false, true),
                addr("2001:db8::7", false, true, false, false),
                addr("10.0.0.9", false, true, false, false),
            ],
        };
        assert_eq!(i.preferred_v6(), Some("2001:db8::7".parse().unwrap()));
        assert_eq!(i.preferred_v4(), Some("10.0.0.9".parse().unwrap()));
    }
}
