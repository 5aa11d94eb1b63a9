//! Choosing the external interface and public IP (upstream's rules,
//! docs/compatibility.md, "Interface and public IP selection").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_backend::ExternalInterface;
use flannel_net::netlink::{IpFamily, Netlink, NetlinkError};
use flannel_net::Interface;
use regex::Regex;

use crate::options::Options;

/// What the operator asked for, already parsed.
#[derive(Debug, Clone, Default)]
pub struct IfaceRequest {
    pub iface: Vec<String>,
    pub iface_regex: Vec<String>,
    pub can_reach: Option<IpAddr>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub ipv4: bool,
    pub ipv6: bool,
}

impl IfaceRequest {
    pub fn from_options(o: &Options, ipv4: bool, ipv6: bool) -> Result<Self, String> {
        Ok(IfaceRequest {
            iface: o.iface.clone(),
            iface_regex: o.iface_regex.clone(),
            can_reach: o.iface_can_reach,
            public_ip: o.public_ip()?,
            public_ipv6: o.public_ipv6()?,
            ipv4,
            ipv6,
        })
    }
}

/// `--iface` value: an IP selects the interface holding it, anything else is a name.
pub fn by_spec<'a>(ifaces: &'a [Interface], spec: &str) -> Option<(&'a Interface, Option<IpAddr>)> {
    match spec.parse::<IpAddr>() {
        Ok(ip) => ifaces
            .iter()
            .find(|i| i.has_addr(ip))
            .map(|i| (i, Some(ip))),
        Err(_) => ifaces.iter().find(|i| i.name == spec).map(|i| (i, None)),
    }
}

/// An interface `--iface-regex` chose, with the addresses of it that matched.
#[derive(Debug)]
pub struct RegexMatch<'a> {
    pub iface: &'a Interface,
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<std::net::Ipv6Addr>,
}

/// `--iface-regex`: the first interface with an address of a wanted family whose
/// text matches, else the first whose name matches. Upstream matches only the
/// IPv4 addresses (IPv6 ones when IPv6-only); here, in dual stack, an interface
/// whose IPv6 address matches is chosen too, and the matching address of each
/// family is the one used (so `^10\.1\.|^fd00:1:` picks both), the interface's
/// preferred address standing in for a family that did not match.
pub fn by_regex<'a>(
    ifaces: &'a [Interface],
    re: &Regex,
    want_v4: bool,
    want_v6: bool,
) -> Option<RegexMatch<'a>> {
    let matching = |i: &Interface, v6: bool| {
        i.addrs
            .iter()
            .map(|a| a.addr)
            .find(|a| a.is_ipv6() == v6 && re.is_match(&a.to_string()))
    };
    let of = |i: &'a Interface| RegexMatch {
        iface: i,
        v4: matching(i, false).and_then(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }),
        v6: matching(i, true).and_then(|a| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }),
    };
    let families = [(want_v4, false), (want_v6, true)];
    for (wanted, v6) in families {
        if !wanted {
            continue;
        }
        if let Some(i) = ifaces.iter().find(|i| matching(i, v6).is_some()) {
            return Some(of(i));
        }
    }
    ifaces
        .iter()
        .find(|i| re.is_match(&i.name))
        .map(|i| RegexMatch {
            iface: i,
            v4: None,
            v6: None,
        })
}

/// Why no external interface could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// Asking the kernel failed (the errno stays reachable).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Nothing matches what the operator asked for.
    #[error("{0}")]
    NoMatch(String),
}

impl From<String> for SelectError {
    fn from(s: String) -> Self {
        SelectError::NoMatch(s)
    }
}

impl From<&str> for SelectError {
    fn from(s: &str) -> Self {
        SelectError::NoMatch(s.to_string())
    }
}

/// Picks the external interface from the interfaces of this namespace.
pub async fn select(nl: &Netlink, req: &IfaceRequest) -> Result<ExternalInterface, SelectError> {
    let ifaces = nl.interfaces().await?;
    let v6_only = req.ipv6 && !req.ipv4;
    let mut chosen: Option<(&Interface, Option<IpAddr>)> = None;
    // A v6 address `--iface-regex` matched in dual stack (the v4 one goes in `chosen`).
    let mut regex_v6 = None;

    if req.iface.is_empty() && req.iface_regex.is_empty() && req.can_reach.is_none() {
        let owner = req
            .public_ip
            .map(IpAddr::V4)
            .or(req.public_ipv6.map(IpAddr::V6));
        if let Some(ip) = owner {
            chosen = Some(
                ifaces
                    .iter()
                    .find(|i| i.has_addr(ip))
                    .map(|i| (i, None))
                    .ok_or_else(|| {
                        format!("no interface holds the public IP {ip}; use --iface to choose one")
                    })?,
            );
        } else {
            let family = if v6_only { IpFamily::V6 } else { IpFamily::V4 };
            let oif = nl.default_route_oif(family).await?;
            let oif = oif.ok_or("no default route: use --iface, --iface-regex or --iface-can-reach to choose the interface")?;
            if req.ipv4 && req.ipv6 {
                let oif6 = nl.default_route_oif(IpFamily::V6).await?;
                if oif6 != Some(oif) {
                    return Err("dual stack needs the IPv4 and IPv6 default routes on the same interface; use --iface".into());
                }
            }
            chosen = ifaces.iter().find(|i| i.index == oif).map(|i| (i, None));
        }
    } else {
        for spec in &req.iface {
            if let Some(c) = by_spec(&ifaces, spec) {
                chosen = Some(c);
                break;
            }
            tracing::warn!(iface = %spec, "no interface matches --iface");
        }
        if chosen.is_none() {
            for pat in &req.iface_regex {
                let re = Regex::new(pat).map_err(|e| format!("--iface-regex {pat:?}: {e}"))?;
                if let Some(m) = by_regex(&ifaces, &re, req.ipv4, req.ipv6) {
                    let given = match (m.v4, m.v6) {
                        (Some(a), _) if req.ipv4 => Some(IpAddr::V4(a)),
                        (_, Some(a)) if v6_only => Some(IpAddr::V6(a)),
                        _ => None,
                    };
                    regex_v6 = m.v6.filter(|_| req.ipv6);
                    chosen = Some((m.iface, given));
                    break;
                }
                tracing::warn!(regex = %pat, "no interface matches --iface-regex");
            }
        }
        if chosen.is_none() {
            if let Some(dst) = req.can_reach {
                let r = nl.route_get(dst).await?;
                if let Some(oif) = r.oif {
                    chosen = ifaces
                        .iter()
                        .find(|i| i.index == oif)
                        .map(|i| (i, r.pref_src));
                }
            }
        }
    }
    let (i, given_addr) = chosen.ok_or(
        "failed to find any interface matching --iface, --iface-regex or --iface-can-reach",
    )?;

    let addr = match given_addr {
        Some(IpAddr::V4(a)) => Some(a),
        _ => i.preferred_v4(),
    };
    let addr6 = match given_addr {
        Some(IpAddr::V6(a)) => Some(a),
        _ => regex_v6.or_else(|| i.preferred_v6()),
    };
    if req.ipv4 && addr.is_none() {
        return Err(format!("interface {} has no IPv4 address", i.name).into());
    }
    if req.ipv6 && addr6.is_none() {
        return Err(format!("interface {} has no IPv6 address", i.name).into());
    }
    Ok(ExternalInterface {
        name: i.name.clone(),
        index: i.index,
        mtu: i.mtu,
        addr: addr.filter(|_| req.ipv4),
        public_ip: req.public_ip.or(addr).filter(|_| req.ipv4),
        addr6: addr6.filter(|_| req.ipv6),
        public_ipv6: req.public_ipv6.or(addr6).filter(|_| req.ipv6),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_net::IfAddr;

    fn iface(index: u32, name: &str, addrs: &[&str]) -> Interface {
        Interface {
            index,
            name: name.into(),
            mtu: 1500,
            up: true,
            loopback: false,
            addrs: addrs
                .iter()
                .map(|a| IfAddr {
                    addr: a.parse().unwrap(),
                    prefix_len: 24,
                    link_local_scope: false,
                    host_scope: false,
                    deprecated: false,
                    permanent: true,
                    temporary: false,
                })
                .collect(),
        }
    }

    #[test]
    fn spec_by_ip_or_name() {
        let l = vec![
            iface(1, "eth0", &["10.0.0.1"]),
            iface(2, "eth1", &["192.168.5.5"]),
        ];
        assert_eq!(by_spec(&l, "eth1").unwrap().0.index, 2);
        let (i, ip) = by_spec(&l, "192.168.5.5").unwrap();
        assert_eq!((i.index, ip), (2, Some("192.168.5.5".parse().unwrap())));
        assert!(by_spec(&l, "eth9").is_none());
    }

    #[test]
    fn regex_prefers_addresses_then_names() {
        let l = vec![
            iface(1, "eth0", &["10.0.0.1"]),
            iface(2, "ens5", &["192.168.5.5"]),
        ];
        let re = Regex::new(r"^192\.168\.").unwrap();
        let m = by_regex(&l, &re, true, false).unwrap();
        assert_eq!(
            (m.iface.name.as_str(), m.v4),
            ("ens5", Some("192.168.5.5".parse().unwrap()))
        );
        let re = Regex::new("^eth").unwrap();
        let m = by_regex(&l, &re, true, false).unwrap();
        assert_eq!((m.iface.name.as_str(), m.v4, m.v6), ("eth0", None, None));
    }

    #[test]
    fn regex_finds_the_ipv6_address_too() {
        let l = vec![
            iface(1, "eth0", &["10.0.0.1", "fd00:0:0:1::1"]),
            iface(
                2,
                "ens5",
                &["192.168.5.5", "fd00:0:0:5::5", "fd00:0:0:5::6"],
            ),
        ];
        // Dual stack, a v6-only pattern: upstream would find nothing (it matches the
        // IPv4 addresses); here the interface holding the matching v6 address.
        let re = Regex::new("^fd00:0:0:5::6$").unwrap();
        let m = by_regex(&l, &re, true, true).unwrap();
        assert_eq!(m.iface.name, "ens5");
        assert_eq!((m.v4, m.v6), (None, Some("fd00:0:0:5::6".parse().unwrap())));
        // A pattern for both families picks the matching address of each.
        let re = Regex::new(r"^192\.168\.|^fd00:0:0:5::6$").unwrap();
        let m = by_regex(&l, &re, true, true).unwrap();
        assert_eq!(
            (m.iface.name.as_str(), m.v4, m.v6),
            (
                "ens5",
                Some("192.168.5.5".parse().unwrap()),
                Some("fd00:0:0:5::6".parse().unwrap())
            )
        );
        // IPv4 only: a v6 match does not choose the interface (upstream's behaviour).
        let re = Regex::new("^fd00:0:0:5::").unwrap();
        assert!(by_regex(&l, &re, true, false).is_none());
        // IPv6 only: the v6 addresses.
        let re = Regex::new("^fd00:0:0:1::").unwrap();
        let m = by_regex(&l, &re, false, true).unwrap();
        assert_eq!(
            (m.iface.name.as_str(), m.v6),
            ("eth0", Some("fd00:0:0:1::1".parse().unwrap()))
        );
    }
}
