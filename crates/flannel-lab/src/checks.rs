//! What a host's kernel holds for a peer, per backend, whether a monitor saw
//! flannel's entries deleted, and the kill -9 restart check built on that. Shared by
//! the end-to-end tests.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

use crate::error::Result;
use crate::lab::{Lab, PodId};
use crate::measure::PingStats;
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
    is_flannel_deletion_in(line, &[IpNet::V4(network)])
}

/// [`is_flannel_deletion`] for a cluster with several pod networks (dual stack:
/// the IPv4 and the IPv6 one).
pub fn is_flannel_deletion_in(line: &str, networks: &[IpNet]) -> bool {
    let Some(rest) = line.strip_prefix("Deleted ") else {
        return false;
    };
    if rest.contains("dev cni0") {
        return false;
    }
    if rest.contains("flannel") {
        return true;
    }
    // `Deleted 10.244.3.0/24 via ...` (host-gw, DirectRouting); a v6 route of one
    // address is shown without its `/128`.
    let first = rest.split_whitespace().next().unwrap_or("");
    let net = first
        .parse::<IpNet>()
        .ok()
        .or_else(|| first.parse::<IpAddr>().ok().map(IpNet::from));
    net.is_some_and(|n| networks.iter().any(|p| p.contains(&n)))
}

/// One background ping of [`kill_9_restart_pinging`]: from a pod to an address.
#[derive(Debug, Clone)]
pub struct PingPath {
    /// Names the path in failures, e.g. "v6 into host 1".
    pub what: String,
    pub from: PodId,
    pub to: IpAddr,
}

impl PingPath {
    pub fn new(what: impl Into<String>, from: PodId, to: IpAddr) -> PingPath {
        PingPath {
            what: what.into(),
            from,
            to,
        }
    }
}

/// The paths around restarted host `restarted`, per family its pods have: into it
/// (from the first other host's pod) and out of it (to the last other host's pod,
/// so with three hosts both peers are on a path). `pods[h]` is a pod on host `h`.
pub fn paths_around(lab: &Lab, pods: &[PodId], restarted: usize) -> Result<Vec<PingPath>> {
    let others: Vec<usize> = (0..pods.len()).filter(|h| *h != restarted).collect();
    let (Some(&first), Some(&last)) = (others.first(), others.last()) else {
        return Err(crate::LabError::Invalid(
            "a restart check needs a pod on another host".into(),
        ));
    };
    let r = lab.pod(pods[restarted])?.clone();
    let (a, b) = (lab.pod(pods[first])?.clone(), lab.pod(pods[last])?.clone());
    let mut paths = Vec::new();
    // A pod of an IPv6-only network has `0.0.0.0` as its IPv4 address.
    if [a.ip, r.ip, b.ip].iter().all(|ip| !ip.is_unspecified()) {
        paths.push(PingPath::new(
            format!("v4 into host {restarted}"),
            a.id,
            r.ip.into(),
        ));
        paths.push(PingPath::new(
            format!("v4 out of host {restarted}"),
            r.id,
            b.ip.into(),
        ));
    }
    if let (Some(_), Some(r6), Some(b6)) = (a.ip6, r.ip6, b.ip6) {
        paths.push(PingPath::new(
            format!("v6 into host {restarted}"),
            a.id,
            r6.into(),
        ));
        paths.push(PingPath::new(
            format!("v6 out of host {restarted}"),
            r.id,
            b6.into(),
        ));
    }
    Ok(paths)
}

/// What a kill -9 restart cost: the result of every ping path and, per host, the
/// flannel entries its monitor saw deleted.
#[derive(Debug, Clone)]
pub struct RestartOutcome {
    pub pings: Vec<(PingPath, PingStats)>,
    pub deleted: Vec<Vec<String>>,
}

impl RestartOutcome {
    /// One line per lost ping path and per host that saw a deletion; empty when
    /// the restart was hitless.
    pub fn failures(&self) -> Vec<String> {
        let lost = self
            .pings
            .iter()
            .filter(|(_, st)| !st.all_replied())
            .map(|(p, st)| format!("pings {} ({} -> {}): {st:?}", p.what, p.from.0, p.to));
        let deleted = self
            .deleted
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.is_empty())
            .map(|(h, d)| format!("host {h} saw flannel entries deleted: {d:#?}"));
        lost.chain(deleted).collect()
    }
}

/// Monitors routes, neighbours (FDB entries included: `ip monitor neigh` shows the
/// bridge family too) and links on every host, runs `count` pings 0.2 s apart on
/// every path, kills host `restarted`'s flanneld with SIGKILL and starts it again
/// (waiting for its subnet file), then waits for the pings and collects what the
/// monitors saw deleted of flannel's (`networks`: the pod networks).
///
/// `count` must let the pings outlast the restart and the new agent's first
/// reconcile (40 is 8 s). Errors only if the lab cannot do its part; a lossy or
/// destructive restart is in the outcome.
pub fn kill_9_restart_pinging(
    lab: &mut Lab,
    restarted: usize,
    paths: &[PingPath],
    count: u32,
    networks: &[IpNet],
) -> Result<RestartOutcome> {
    let mut monitors = Vec::new();
    for h in lab.hosts() {
        monitors.push(lab.monitor(&h.ns, &["route", "neigh", "link"])?);
    }
    let mut running = Vec::new();
    for p in paths {
        running.push((p.clone(), lab.start_ping_ip(p.from, p.to, count)?));
    }
    lab.kill_agent(restarted)?;
    lab.start_agent(restarted)?;
    // Every ping was either answered or timed out (2 s) by count × 0.2 s + 2 s.
    let wait = Duration::from_millis(200) * count + Duration::from_secs(30);
    let mut pings = Vec::new();
    for (p, bg) in running {
        pings.push((p, bg.finish(wait)?));
    }
    lab.check_agents()?;
    let deleted = monitors
        .iter_mut()
        .map(|m| {
            m.barrier()
                .into_iter()
                .filter(|l| is_flannel_deletion_in(l, networks))
                .collect()
        })
        .collect();
    Ok(RestartOutcome { pings, deleted })
}

/// The sum of `flanneld_backend_drops_total{backend, reason}` in a /metrics answer
/// (0 when the series is absent: nothing was dropped for that reason yet).
pub fn backend_drops(metrics: &str, backend: &str, reason: &str) -> Result<f64> {
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| crate::LabError::Invalid(format!("metrics do not parse: {e}")))?;
    Ok(scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == "flanneld_backend_drops_total"
                && s.labels.get("backend") == Some(backend)
                && s.labels.get("reason") == Some(reason)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum())
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
    fn drops_by_backend_and_reason() {
        let text = "# TYPE flanneld_backend_drops counter\n\
                    flanneld_backend_drops_total{backend=\"wireguard\",reason=\"malformed\"} 3\n\
                    flanneld_backend_drops_total{backend=\"wireguard\",reason=\"replay\"} 1\n\
                    flanneld_backend_drops_total{backend=\"udp\",reason=\"malformed\"} 7\n";
        assert_eq!(backend_drops(text, "wireguard", "malformed").unwrap(), 3.0);
        assert_eq!(backend_drops(text, "udp", "malformed").unwrap(), 7.0);
        assert_eq!(
            backend_drops(text, "wireguard", "unknown_key").unwrap(),
            0.0
        );
    }

    #[test]
    fn dual_stack_deletions() {
        let nets: Vec<IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd10:244::/56".parse().unwrap(),
        ];
        assert!(is_flannel_deletion_in(
            "Deleted fd10:244:0:22::/64 via fd18:198:18::2 dev fabx1h1 proto 70 metric 1024 pref medium",
            &nets
        ));
        assert!(is_flannel_deletion_in(
            "Deleted fd10:244:0:22:: dev flannel-v6.1 lladdr 02:00:00:00:00:01 NOARP PERMANENT",
            &nets
        ));
        assert!(is_flannel_deletion_in(
            "Deleted fd10:244:0:22::5 dev fabx1h1 proto 70 metric 1024 pref medium",
            &nets
        ));
        assert!(is_flannel_deletion_in(
            "Deleted 10.244.3.0/24 via 198.18.0.3 dev fabx1h1 proto 70",
            &nets
        ));
        // Another network, the underlay, and pod-side entries are not flannel's.
        assert!(!is_flannel_deletion_in(
            "Deleted fd18:198:18::2 dev fabx1h1 lladdr 0a:00:00:00:00:02 STALE",
            &nets
        ));
        assert!(!is_flannel_deletion_in(
            "Deleted fd10:245::/64 via fd18:198:18::2 dev fabx1h1",
            &nets
        ));
        assert!(!is_flannel_deletion_in(
            "Deleted fd10:244:0:11::5 dev cni0 lladdr 0a:58:0a:f4:01:05 STALE",
            &nets
        ));
        assert!(!is_flannel_deletion_in(
            "Deleted 10.244.3.0/24 via 198.18.0.3 dev fabx1h1",
            &nets[1..]
        ));
    }

    #[test]
    fn restart_failures() {
        let ok = PingStats {
            transmitted: 40,
            received: 40,
            rtt_avg_ms: Some(0.1),
        };
        let lossy = PingStats { received: 39, ..ok };
        let path = PingPath::new(
            "v6 into host 1",
            PodId(0),
            "fd10:244:0:22::2".parse().unwrap(),
        );
        let clean = RestartOutcome {
            pings: vec![(path.clone(), ok)],
            deleted: vec![vec![], vec![]],
        };
        assert!(clean.failures().is_empty());
        let bad = RestartOutcome {
            pings: vec![(path.clone(), ok), (path, lossy)],
            deleted: vec![vec![], vec!["Deleted fd10:244:0:22::/64 via x".into()]],
        };
        let f = bad.failures();
        assert_eq!(f.len(), 2, "{f:#?}");
        assert!(
            f[0].contains("v6 into host 1") && f[1].starts_with("host 1 "),
            "{f:#?}"
        );
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
