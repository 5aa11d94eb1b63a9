//! Checks of the host's kernel settings before the agent programs anything. flanneld
//! sets no sysctl itself (as upstream): it refuses what makes its rules useless and
//! says clearly what stops pod traffic.

use anyhow::{bail, Result};
use flannel_core::NetworkConfig;

/// Upstream refuses to start in iptables mode without br_netfilter, because pod
/// traffic on the bridge would bypass the masquerade and forward rules.
pub fn bridge_netfilter(config: &NetworkConfig) -> Result<()> {
    let mut need = Vec::new();
    if config.enable_ipv4 {
        need.push("/proc/sys/net/bridge/bridge-nf-call-iptables");
    }
    if config.enable_ipv6 {
        need.push("/proc/sys/net/bridge/bridge-nf-call-ip6tables");
    }
    for p in need {
        if !std::path::Path::new(p).exists() {
            bail!("{p} does not exist: load the br_netfilter module (modprobe br_netfilter), or set \"EnableNFTables\": true");
        }
    }
    Ok(())
}

/// The forwarding sysctl of each enabled family, and the command that enables it.
const FORWARDING: [(&str, &str, &str); 2] = [
    (
        "IPv4",
        "/proc/sys/net/ipv4/ip_forward",
        "sysctl -w net.ipv4.ip_forward=1",
    ),
    (
        "IPv6",
        "/proc/sys/net/ipv6/conf/all/forwarding",
        "sysctl -w net.ipv6.conf.all.forwarding=1",
    ),
];

/// A warning per enabled family whose forwarding is off (`read` returns a
/// /proc/sys file's text, `None` if unreadable: then nothing is said).
pub fn forwarding_off(
    config: &NetworkConfig,
    read: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let enabled = [config.enable_ipv4, config.enable_ipv6];
    FORWARDING
        .iter()
        .zip(enabled)
        .filter(|(_, on)| *on)
        .filter_map(|((family, path, fix), _)| {
            let v = read(path)?;
            (v.trim() == "0").then(|| {
                format!(
                    "{family} forwarding is off ({path} is 0): pods on this host cannot reach other hosts' pods; \
                     enable it with `{fix}` (flanneld does not change sysctls)"
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse_and_validate(json).unwrap()
    }

    #[test]
    fn forwarding_off_is_reported_per_enabled_family() {
        let dual = config(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"host-gw"}}"#,
        );
        let v4 = config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#);
        let all_off = |_: &str| Some("0\n".to_string());
        let all_on = |_: &str| Some("1\n".to_string());
        let w = forwarding_off(&dual, all_off);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("net.ipv4.ip_forward=1"), "{}", w[0]);
        assert!(w[1].contains("net.ipv6.conf.all.forwarding=1"), "{}", w[1]);
        assert!(forwarding_off(&dual, all_on).is_empty());
        assert_eq!(
            forwarding_off(&v4, all_off).len(),
            1,
            "IPv6 not enabled: not checked"
        );
        let only_v6_off = |p: &str| Some(if p.contains("ipv6") { "0" } else { "1" }.to_string());
        let w = forwarding_off(&dual, only_v6_off);
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("IPv6 forwarding is off"));
        assert!(
            forwarding_off(&dual, |_| None).is_empty(),
            "unreadable: nothing said"
        );
    }
}
