//! What a host's kernel holds for a peer, per backend, and whether a monitor saw
//! flannel's entries deleted. Shared by the end-to-end tests.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::error::Result;
use crate::lab::Lab;
use crate::process::{command, run};

/// How a backend represents one remote lease in a host's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerModel {
    /// vxlan: route via the peer's subnet address onlink on `flannel.<VNI>`, a
    /// permanent neighbour for that address, an FDB entry pointing at the peer's
    /// public IP.
    VxlanL2,
    /// host-gw and vxlan DirectRouting on one L2: a route via the peer's public IP.
    Routed,
    /// udp: one route for the whole network into the TUN; nothing per peer in the
    /// kernel (the peer table lives in the agent).
    Tunnel,
}

impl PeerModel {
    /// The model for a network config's `Backend` object.
    pub fn for_backend(backend: &serde_json::Value) -> PeerModel {
        let ty = backend
            .get("Type")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let direct = backend
            .get("DirectRouting")
            .and_then(|d| d.as_bool())
            .unwrap_or(false);
        match ty.as_str() {
            "vxlan" if direct => PeerModel::Routed,
            "vxlan" => PeerModel::VxlanL2,
            "udp" => PeerModel::Tunnel,
            _ => PeerModel::Routed,
        }
    }
}

/// The entries a host has for one peer (its lease subnet and public IP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerEntries {
    pub routes: Vec<String>,
    pub neighbours: Vec<String>,
    pub fdb: Vec<String>,
}

impl PeerEntries {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }

    /// Whether the entries `model` needs for a peer at `public_ip` are all there.
    pub fn complete(&self, model: PeerModel, public_ip: Ipv4Addr) -> bool {
        let via_public = format!("via {public_ip} ");
        match model {
            PeerModel::VxlanL2 => {
                self.routes.iter().any(|r| r.contains("flannel"))
                    && !self.neighbours.is_empty()
                    && !self.fdb.is_empty()
            }
            PeerModel::Routed => self
                .routes
                .iter()
                .any(|r| format!("{r} ").contains(&via_public)),
            // Nothing per peer to see.
            PeerModel::Tunnel => true,
        }
    }
}

/// Host `h`'s route, neighbour and FDB entries for the peer holding `subnet` at
/// `public_ip`.
pub fn peer_entries(
    lab: &Lab,
    h: usize,
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
) -> Result<PeerEntries> {
    let ns = lab.host(h)?.ns.clone();
    let routes = lab.route_to(h, subnet)?.into_iter().collect();
    let gw = format!("{} ", subnet.network());
    let neighbours = lab
        .ip_in(&ns, &["neigh", "show"])?
        .lines()
        .filter(|l| l.starts_with(&gw) && l.contains("dev flannel"))
        .map(str::to_string)
        .collect();
    let dst = format!("dst {public_ip} ");
    let fdb = run(command("bridge", &["-n", &ns, "fdb", "show"]))?
        .lines()
        .filter(|l| format!("{l} ").contains(&dst))
        .map(str::to_string)
        .collect();
    Ok(PeerEntries {
        routes,
        neighbours,
        fdb,
    })
}

/// Whether an `ip monitor` line reports one of flannel's entries (or its device)
/// being deleted: anything on a `flannel*` device, or a route for a subnet of the
/// pod network. Pod-side entries on the CNI bridge are not flannel's.
pub fn is_flannel_deletion(line: &str, network: Ipv4Net) -> bool {
    let Some(rest) = line.strip_prefix("Deleted ") else {
        return false;
    };
    if rest.contains("dev cni0") {
        return false;
    }
    if rest.contains("flannel") {
        return true;
    }
    // `Deleted 10.244.3.0/24 via ...` (host-gw, DirectRouting).
    let first = rest.split_whitespace().next().unwrap_or("");
    first
        .parse::<Ipv4Net>()
        .map(|n| network.contains(&n))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn models() {
        assert_eq!(
            PeerModel::for_backend(&json!({"Type":"vxlan"})),
            PeerModel::VxlanL2
        );
        assert_eq!(
            PeerModel::for_backend(&json!({"Type":"vxlan","DirectRouting":true})),
            PeerModel::Routed
        );
        assert_eq!(
            PeerModel::for_backend(&json!({"Type":"host-gw"})),
            PeerModel::Routed
        );
        assert_eq!(
            PeerModel::for_backend(&json!({"Type":"udp"})),
            PeerModel::Tunnel
        );
    }

    #[test]
    fn deletions() {
        let n: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        assert!(is_flannel_deletion(
            "Deleted 10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink",
            n
        ));
        assert!(is_flannel_deletion(
            "Deleted 10.244.3.0/24 via 198.18.0.3 dev fabx1h1 proto boot",
            n
        ));
        assert!(is_flannel_deletion(
            "Deleted 198.18.0.2 dev flannel.1 lladdr 02:00:00:00:00:01 NOARP PERMANENT",
            n
        ));
        assert!(!is_flannel_deletion("Deleted blackhole 192.0.2.5 ", n));
        assert!(!is_flannel_deletion(
            "Deleted 10.244.1.5 dev cni0 lladdr 0a:58:0a:f4:01:05 STALE",
            n
        ));
        assert!(!is_flannel_deletion(
            "10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink",
            n
        ));
    }

    #[test]
    fn completeness() {
        let ip = Ipv4Addr::new(198, 18, 0, 3);
        let routed = PeerEntries {
            routes: vec!["10.244.3.0/24 via 198.18.0.3 dev x proto boot".into()],
            ..Default::default()
        };
        assert!(routed.complete(PeerModel::Routed, ip));
        assert!(!routed.complete(PeerModel::Routed, Ipv4Addr::new(198, 18, 0, 33)));
        assert!(!routed.complete(PeerModel::VxlanL2, ip));
        assert!(PeerEntries::default().is_empty());
    }
}
