//! `/run/flannel/subnet.env`: what flanneld tells the CNI plugin.

use std::fmt::Write as _;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::subnet::{first_host_v4, first_host_v6};

/// The contents of subnet.env. Subnets are held as lease subnets (network address);
/// the file shows the first host address (`10.244.1.0/24` → `FLANNEL_SUBNET=10.244.1.1/24`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Option<Ipv4Net>,
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// The file's exact bytes, in flanneld's key order.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let (Some(n), Some(sub)) = (self.network, self.subnet) {
            let _ = writeln!(s, "FLANNEL_NETWORK={n}");
            let _ = writeln!(
                s,
                "FLANNEL_SUBNET={}/{}",
                first_host_v4(&sub),
                sub.prefix_len()
            );
        }
        if let (Some(n), Some(sub)) = (self.ipv6_network, self.ipv6_subnet) {
            let _ = writeln!(s, "FLANNEL_IPV6_NETWORK={n}");
            let _ = writeln!(
                s,
                "FLANNEL_IPV6_SUBNET={}/{}",
                first_host_v6(&sub),
                sub.prefix_len()
            );
        }
        let _ = writeln!(s, "FLANNEL_MTU={}", self.mtu);
        let _ = writeln!(s, "FLANNEL_IPMASQ={}", self.ip_masq);
        s
    }
}

/// `KEY=value` pairs of a dotenv-style file, in order. Blank lines and `#` comments
/// are skipped, an `export ` prefix and matching quotes around the value are dropped.
pub fn parse_env_lines(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = ['"', '\'']
            .iter()
            .find_map(|q| v.strip_prefix(*q).and_then(|r| r.strip_suffix(*q)))
            .unwrap_or(v);
        out.push((k.trim().to_string(), v.to_string()));
    }
    out
}

/// The subnets a previous run wrote, as flanneld reads them at start to keep its
/// subnet. A value holding several comma-separated CIDRs counts as absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreviousSubnets {
    pub network: Option<Ipv4Net>,
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
}

impl PreviousSubnets {
    pub fn parse(text: &str) -> Self {
        let mut p = PreviousSubnets::default();
        for (k, v) in parse_env_lines(text) {
            if v.contains(',') {
                continue;
            }
            match k.as_str() {
                "FLANNEL_NETWORK" => p.network = v.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
                "FLANNEL_SUBNET" => p.subnet = v.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
                "FLANNEL_IPV6_NETWORK" => {
                    p.ipv6_network = v.parse::<Ipv6Net>().ok().map(|n| n.trunc())
                }
                "FLANNEL_IPV6_SUBNET" => {
                    p.ipv6_subnet = v.parse::<Ipv6Net>().ok().map(|n| n.trunc())
                }
                _ => {}
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_upstream_bytes() {
        let e = SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.48.0/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ip_masq: true,
        };
        let text = e.render();
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.48.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(text.len(), 97);
    }

    #[test]
    fn dual_stack_render_and_parse_back() {
        let e = SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.1.0/24".parse().unwrap()),
            ipv6_network: Some("2001:cafe:42::/56".parse().unwrap()),
            ipv6_subnet: Some("2001:cafe:42::/64".parse().unwrap()),
            mtu: 1450,
            ip_masq: false,
        };
        let text = e.render();
        assert!(text.contains("FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"));
        let p = PreviousSubnets::parse(&text);
        assert_eq!(p.subnet, e.subnet);
        assert_eq!(p.network, e.network);
        assert_eq!(p.ipv6_subnet, e.ipv6_subnet);
        assert_eq!(p.ipv6_network, e.ipv6_network);
    }

    #[test]
    fn dotenv_details() {
        let p = PreviousSubnets::parse(
            "# c\nexport FLANNEL_SUBNET=\"10.1.2.1/24\"\nFLANNEL_NETWORK=10.1.0.0/16,10.2.0.0/16\nnonsense\n",
        );
        assert_eq!(p.subnet, Some("10.1.2.0/24".parse().unwrap()));
        assert_eq!(p.network, None, "comma lists count as absent");
        assert_eq!(
            PreviousSubnets::parse("FLANNEL_SUBNET=garbage"),
            PreviousSubnets::default()
        );
    }
}
