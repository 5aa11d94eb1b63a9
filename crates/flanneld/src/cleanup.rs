//! `flanneld --cleanup` (ours, beyond upstream): removes what flannel put on this host
//! — its devices (and with them their addresses, routes, neighbours and FDB entries),
//! routes it added elsewhere, its masquerade/forward rules and subnet.env — and
//! nothing else. Running it twice is harmless. The lease in the store is left to
//! expire: other hosts keep their routes to us until then, as after a crash.

use anyhow::{Context, Result};
use flannel_net::netlink::{IpFamily, RouteFilter, RTPROT_BOOT, RTPROT_FLANNEL};
use flannel_net::rules::{self, EngineKind, EngineOptions};
use flannel_net::Netlink;
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
        Some("tun") => numbered(name.strip_prefix("flannel")),
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
        let ours = iptables_tables_with_our_chains();
        for kind in [EngineKind::Nftables, EngineKind::Iptables] {
            match rules::new_engine(kind, EngineOptions::default()) {
                Ok(mut engine) => {
                    if let Err(e) = engine.cleanup() {
                        errs.push(format!("{kind} rules: {e}"));
                    }
                }
                // No nft/iptables binary: nothing of ours can be there either.
                Err(e) => warn!(engine = %kind, error = %e, "rule engine unavailable; skipped"),
            }
        }
        errs.extend(remove_emptied_iptables_tables(&ours));
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

/// Per iptables-save section: (table name, whether it has a `FLANNEL-` chain, whether
/// it is nothing but iptables-nft's scaffolding: built-in chains only, every policy
/// ACCEPT, no rule, i.e. a table that filters nothing).
fn iptables_tables(save: &str) -> Vec<(String, bool, bool)> {
    let mut out = Vec::new();
    let mut current: Option<(String, bool, bool)> = None;
    for line in save.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            current = Some((name.to_string(), false, true));
        } else if line == "COMMIT" {
            out.extend(current.take());
        } else if let Some((_, ours, empty)) = current.as_mut() {
            *ours |= line.starts_with(":FLANNEL-");
            // `:CHAIN POLICY [counters]`; user chains have the policy `-`.
            let accept_chain = line
                .strip_prefix(':')
                .is_some_and(|c| c.split_whitespace().nth(1) == Some("ACCEPT"));
            if !(accept_chain || line.is_empty() || line.starts_with('#')) {
                *empty = false;
            }
        }
    }
    out
}

/// Whether `iptables` on PATH is the nf_tables variant, and the save tools with the
/// nft family their tables live in.
fn iptables_nft_families() -> Vec<(&'static str, &'static str)> {
    let nf_tables = std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nf_tables"));
    if nf_tables {
        vec![("iptables-save", "ip"), ("ip6tables-save", "ip6")]
    } else {
        // Legacy tables belong to the kernel modules: nothing to delete there.
        Vec::new()
    }
}

fn iptables_save(tool: &str) -> Option<String> {
    let o = std::process::Command::new(tool).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// (nft family, table) of every iptables-nft table holding a flannel chain now.
fn iptables_tables_with_our_chains() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (tool, family) in iptables_nft_families() {
        let Some(save) = iptables_save(tool) else {
            continue;
        };
        for (table, ours, _) in iptables_tables(&save) {
            if ours {
                out.push((family, table));
            }
        }
    }
    out
}

/// iptables-nft creates a table with all its built-in chains the first time a rule
/// goes in. A table that held our chains and is empty scaffolding now is deleted, so
/// a host that had no iptables tables before the agent has none after the cleanup.
fn remove_emptied_iptables_tables(ours: &[(&'static str, String)]) -> Vec<String> {
    let mut errors = Vec::new();
    for (tool, family) in iptables_nft_families() {
        let Some(save) = iptables_save(tool) else {
            continue;
        };
        for (table, _, empty) in iptables_tables(&save) {
            if !empty || !ours.iter().any(|(f, t)| *f == family && *t == table) {
                continue;
            }
            match std::process::Command::new("nft")
                .args(["delete", "table", family, &table])
                .output()
            {
                Ok(o) if o.status.success() => {
                    info!(%family, %table, "deleted the table our chains left empty")
                }
                Ok(o) => errors.push(format!(
                    "deleting the empty table {family} {table}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => errors.push(format!("running nft: {e}")),
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_save_sections_ours_and_empty() {
        let save = "# Generated by iptables-nft-save v1.8.9
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [10:600]
:OUTPUT ACCEPT [0:0]
COMMIT
*security
:FLANNEL-FWD - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -d 192.0.2.0/24 -j RETURN
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OWN - [0:0]
COMMIT
*raw
:PREROUTING DROP [0:0]
COMMIT
";
        let t = |n: &str, ours, empty| (n.to_string(), ours, empty);
        assert_eq!(
            iptables_tables(save),
            vec![
                t("filter", false, true),
                t("security", true, false),
                t("nat", false, false),
                t("mangle", false, false),
                t("raw", false, false),
            ]
        );
        assert!(iptables_tables("").is_empty());
    }

    #[test]
    fn recognises_only_flannel_links() {
        assert!(is_flannel_link("flannel.1", Some("vxlan")));
        assert!(is_flannel_link("flannel-v6.4096", Some("vxlan")));
        assert!(is_flannel_link("flannel0", Some("tun")));
        assert!(is_flannel_link("flannel-wg", Some("wireguard")));
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
