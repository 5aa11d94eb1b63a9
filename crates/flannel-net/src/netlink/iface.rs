//! The interfaces of a namespace with their addresses and the default route's
//! interface: what choosing the external interface needs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::{IpFamily, Netlink, NetlinkError, RT_TABLE_MAIN};

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

impl Netlink {
    /// All links of this connection's namespace with their addresses, in index order.
    pub async fn interfaces(&self) -> Result<Vec<Interface>, NetlinkError> {
        let links = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .await
            .map_err(|c| NetlinkError::new("list links", c))?;
        let mut out: Vec<Interface> = Vec::new();
        for m in links {
            let RouteNetlinkMessage::NewLink(msg) = m else {
                continue;
            };
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
        let addrs = self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .await
            .map_err(|c| NetlinkError::new("list addresses", c))?;
        for m in addrs {
            let RouteNetlinkMessage::NewAddress(msg) = m else {
                continue;
            };
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
                // IFA_F_TEMPORARY (= IFA_F_SECONDARY for v4, which is not "temporary").
                temporary: flags & 0x01 != 0 && ip.is_ipv6(),
            };
            if let Some(i) = out.iter_mut().find(|i| i.index == hdr.index) {
                i.addrs.push(entry);
            }
        }
        out.sort_by_key(|i| i.index);
        Ok(out)
    }

    /// The output interface of the main table's default route of the family with the
    /// lowest metric, if there is one.
    pub async fn default_route_oif(&self, family: IpFamily) -> Result<Option<u32>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = family.af();
        let routes = self
            .dump(RouteNetlinkMessage::GetRoute(req))
            .await
            .map_err(|c| NetlinkError::new("list routes", c))?;
        let mut best: Option<(u32, u32)> = None; // (priority, oif)
        for m in routes {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            if r.header.address_family != family.af()
                || r.header.destination_prefix_length != 0
                || u32::from(r.header.table) != RT_TABLE_MAIN
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
