//! `flanneld --cleanup` (ours, beyond upstream): removes what flannel put on this host
//! — its devices (and with them their addresses, routes, neighbours and FDB entries),
//! routes it added elsewhere, its masquerade/forward rules and subnet.env — and
//! nothing else. Running it twice is harmless. The lease in the store is left to
//! expire: other hosts keep their routes to us until then, as after a crash.

use anyhow::{Context, Result};
use flannel_net::netlink::{IpFamily, RouteFilter, RTPROT_BOOT, RTPROT_FLANNEL};
use flannel_net::Netlink;
use flannel_rules::{self as rules, EngineKind, EngineOptions};
use ipnet::IpNet;
use tracing::{info, warn};

use crate::options::Options;
use crate::subnet_file;

/// Whether a link name is one flannel creates: `flannel.<VNI>`, `flannel-v6.<VNI>`
/// (vxlan), `flannel<N>` (udp TUN), `flannel-wg`, `flannel-wg-v6` (wireguard).
pub fn is_flannel_link(name: &str, kind: Option<&str>) -> bool {
    let numbered = |rest: Option<&str>| {
        rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
    };
    match kind {
        Some("vxlan") => {
            numbered(name.strip_prefix("flannel.")) || numbered(name.strip_prefix("flannel-v6."))
        }
        // The userspace wireguard device is a TUN too.
        Some("tun") => {
            numbered(name.strip_prefix("flannel"))
                || name == "flannel-wg"
                || name == "flannel-wg-v6"
        }
        Some("wireguard") => name == "flannel-wg" || name == "flannel-wg-v6",
        _ => false,
    }
}

/// Whether a route is flannel's: tagged with our protocol, or upstream's `proto boot`
/// route for a subnet of the cluster network (left by Go flanneld or by host-gw).
pub fn is_flannel_route(dst: &IpNet, protocol: u8, networks: &[IpNet]) -> bool {
    protocol == RTPROT_FLANNEL
        || (protocol == RTPROT_BOOT && networks.iter().any(|n| n.contains(dst) && n != dst))
}

pub async fn run(opts: &Options) -> Result<()> {
    let previous = subnet_file::read_previous(&opts.subnet_file);
    let networks: Vec<IpNet> = previous
        .network
        .map(IpNet::V4)
        .into_iter()
        .chain(previous.ipv6_network.map(IpNet::V6))
        .collect();
    let netlink = Netlink::connect()
        .await
        .context("opening a netlink socket")?;
    let mut errors = Vec::new();

    for link in netlink.links().await.context("listing links")? {
        if is_flannel_link(&link.name, link.kind.as_deref()) {
            match netlink.link_del(link.index).await {
                Ok(()) => info!(link = %link.name, "deleted"),
                Err(e) => errors.push(format!("deleting {}: {e}", link.name)),
            }
        }
    }
    for family in [IpFamily::V4, IpFamily::V6] {
        let routes = netlink
            .routes(family, &RouteFilter::default())
            .await
            .context("listing routes")?;
        for r in routes
            .iter()
            .filter(|r| is_flannel_route(&r.dst, r.protocol, &networks))
        {
            match netlink.route_del(r).await {
                Ok(()) => info!(route = %flannel_net::netlink::describe_route(r), "deleted"),
                Err(e) => errors.push(format!("deleting route {}: {e}", r.dst)),
            }
        }
    }

    let rule_errors = tokio::task::spawn_blocking(|| {
        let mut errs = Vec::new();
        for kind in [EngineKind::Nftables, EngineKind::Iptables] {
            match rules::new_engine(kind, EngineOptions::default()) {
                Ok(mut engine) => {
                    if let Err(e) = engine.cleanup_host() {
                        errs.push(format!("{kind} rules: {e}"));
                    }
                }
                // No nft/iptables binary: nothing of ours can be there either.
                Err(e) => warn!(engine = %kind, error = %e, "rule engine unavailable; skipped"),
            }
        }
        errs
    })
    .await
    .context("rule cleanup task")?;
    errors.extend(rule_errors);

    match std::fs::remove_file(&opts.subnet_file) {
        Ok(()) => info!(path = %opts.subnet_file.display(), "removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", opts.subnet_file.display())),
    }
    if errors.is_empty() {
        info!("cleanup done");
        Ok(())
    } else {
        anyhow::bail!("cleanup left something behind:\n  {}", errors.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_flannel_links() {
        assert!(is_flannel_link("flannel.1", Some("vxlan")));
        assert!(is_flannel_link("flannel-v6.4096", Some("vxlan")));
        assert!(is_flannel_link("flannel0", Some("tun")));
        assert!(is_flannel_link("flannel-wg", Some("wireguard")));
        assert!(is_flannel_link("flannel-wg", Some("tun")));
        assert!(!is_flannel_link("flannel.1", Some("veth")));
        assert!(!is_flannel_link("flannel.x", Some("vxlan")));
        assert!(!is_flannel_link("vxlan0", Some("vxlan")));
        assert!(!is_flannel_link("cni0", Some("bridge")));
        assert!(!is_flannel_link("flannel0", None));
    }

    #[test]
    fn recognises_only_flannel_routes() {
        let nets: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        let sub: IpNet = "10.244.3.0/24".parse().unwrap();
        assert!(is_flannel_route(&sub, RTPROT_FLANNEL, &[]));
        assert!(is_flannel_route(&sub, RTPROT_BOOT, &nets));
        assert!(
            !is_flannel_route(&sub, RTPROT_BOOT, &[]),
            "unknown network: boot routes are not ours"
        );
        assert!(!is_flannel_route(
            &"10.0.0.0/8".parse().unwrap(),
            RTPROT_BOOT,
            &nets
        ));
        assert!(
            !is_flannel_route(&"10.244.0.0/16".parse().unwrap(), RTPROT_BOOT, &nets),
            "the network itself (e.g. an admin's route)"
        );
        assert!(
            !is_flannel_route(&sub, 2, &nets),
            "kernel routes (cni0's subnet) stay"
        );
    }
}
