//! The reconciler shared by the kernel-programming backends (vxlan, host-gw).
//!
//! A backend turns its peers into a [`State`] (the routes, neighbour and FDB entries
//! it wants), reads the entries it owns from the kernel into another `State`, and
//! [`diff`]s the two into a [`Plan`]: set what is missing or different, delete what is
//! owned but no longer wanted, and leave equal entries alone (so a restart over
//! existing state changes nothing). The plan runs in phases, each phase pipelined on
//! the netlink socket:
//!
//! 1. neighbour + FDB entries (a vxlan route must never exist before its neighbour,
//!    or the kernel would ARP for the gateway through the tunnel),
//! 2. routes (skipping a peer whose neighbour/FDB entry failed),
//! 3. stale routes,
//! 4. stale neighbour + FDB entries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use flannel_core::MacAddr;
use flannel_net::netlink::{
    IpFamily, Netlink, NetlinkError, Route, RouteFilter, WriteOp, RTN_UNICAST, RTPROT_BOOT,
    RTPROT_FLANNEL, RT_TABLE_MAIN,
};
use ipnet::IpNet;

use crate::BackendError;

/// Neighbour, FDB and route entries, keyed for comparison.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct State {
    /// IP → (MAC, permanent) on the backend's device.
    pub neigh: BTreeMap<IpAddr, (Option<MacAddr>, bool)>,
    /// (MAC, remote VTEP) entries on the backend's device.
    pub fdb: HashSet<(MacAddr, IpAddr)>,
    /// Routes by destination (several only if they differ in metric).
    pub routes: BTreeMap<IpNet, Vec<Route>>,
}

impl State {
    pub fn add_route(&mut self, r: Route) {
        self.routes.entry(r.dst).or_default().push(r);
    }
}

/// What the desired side wants, with the link from each route to the entries it
/// depends on.
#[derive(Debug, Default, Clone)]
pub(crate) struct Desired {
    pub neigh: BTreeMap<IpAddr, MacAddr>,
    pub fdb: HashMap<MacAddr, IpAddr>,
    pub routes: BTreeMap<IpNet, Route>,
    /// route destination → (neighbour IP, FDB MAC) it needs.
    pub deps: BTreeMap<IpNet, (IpAddr, MacAddr)>,
}

impl Desired {
    /// The same entries as a [`State`] (what the kernel holds once they are applied).
    pub fn as_state(&self) -> State {
        let mut s = State::default();
        for (ip, mac) in &self.neigh {
            s.neigh.insert(*ip, (Some(*mac), true));
        }
        for (mac, ip) in &self.fdb {
            s.fdb.insert((*mac, *ip));
        }
        for r in self.routes.values() {
            s.add_route(r.clone());
        }
        s
    }
}

/// Work to do, in phase order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub neigh_set: Vec<(IpAddr, MacAddr)>,
    pub fdb_set: Vec<(MacAddr, IpAddr)>,
    pub route_set: Vec<Route>,
    pub route_del: Vec<Route>,
    pub neigh_del: Vec<IpAddr>,
    pub fdb_del: Vec<(MacAddr, IpAddr)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.neigh_set.is_empty()
            && self.fdb_set.is_empty()
            && self.route_set.is_empty()
            && self.route_del.is_empty()
            && self.neigh_del.is_empty()
            && self.fdb_del.is_empty()
    }

    /// The number of kernel writes the plan makes.
    pub fn ops(&self) -> usize {
        self.neigh_set.len()
            + self.fdb_set.len()
            + self.route_set.len()
            + self.route_del.len()
            + self.neigh_del.len()
            + self.fdb_del.len()
    }
}

/// The plan that turns `current` into `desired`. A route counts as in place only if
/// it has the same path *and* carries our protocol, so adopted `proto boot` routes
/// are re-marked (a hitless in-place replace).
pub(crate) fn diff(desired: &Desired, current: &State) -> Plan {
    let mut p = Plan::default();
    for (ip, mac) in &desired.neigh {
        if current.neigh.get(ip) != Some(&(Some(*mac), true)) {
            p.neigh_set.push((*ip, *mac));
        }
    }
    for (ip, (_, permanent)) in &current.neigh {
        if *permanent && !desired.neigh.contains_key(ip) {
            p.neigh_del.push(*ip);
        }
    }
    for (mac, ip) in &desired.fdb {
        if !current.fdb.contains(&(*mac, *ip)) {
            p.fdb_set.push((*mac, *ip));
        }
    }
    for (mac, ip) in &current.fdb {
        if desired.fdb.get(mac) != Some(ip) {
            p.fdb_del.push((*mac, *ip));
        }
    }
    for (dst, want) in &desired.routes {
        let in_place = current.routes.get(dst).is_some_and(|have| {
            have.iter()
                .any(|h| h.same_path(want) && h.protocol == want.protocol)
        });
        if !in_place {
            p.route_set.push(want.clone());
        }
    }
    for (dst, have) in &current.routes {
        let want = desired.routes.get(dst);
        for h in have {
            let kept = want.is_some_and(|w| h.same_path(w) && h.protocol == w.protocol);
            // A route the replace above overwrites in place (same destination, table
            // and metric) must not be deleted afterwards: the delete would hit the
            // new route.
            let replaced = want.is_some_and(|w| {
                w.table == h.table && w.priority.unwrap_or(0) == h.priority.unwrap_or(0)
            });
            if !kept && !replaced {
                p.route_del.push(h.clone());
            }
        }
    }
    p
}

/// Which kernel routes a backend owns.
#[derive(Debug, Clone)]
pub(crate) struct Ownership {
    /// The cluster network (IPv4 or IPv6): only routes of its family strictly
    /// inside it are considered.
    pub network: IpNet,
    /// Our own subnet: only our own-protocol routes into it are removed.
    pub own: Option<IpNet>,
    /// Devices on which Go flanneld's `proto boot` routes are adopted.
    pub devices: Vec<u32>,
}

impl Ownership {
    pub fn owns(&self, r: &Route) -> bool {
        let dst = r.dst;
        if r.table != RT_TABLE_MAIN || r.kind != RTN_UNICAST {
            return false;
        }
        if dst.prefix_len() <= self.network.prefix_len() || !self.network.contains(&dst) {
            return false;
        }
        // A route into our own subnet is only ever a leftover (e.g. the subnet was a
        // peer's before); remove it only when it is certainly ours.
        if self.own.is_some_and(|o| o.contains(&dst)) {
            return r.protocol == RTPROT_FLANNEL;
        }
        r.protocol == RTPROT_FLANNEL
            || (r.protocol == RTPROT_BOOT && r.oif.is_some_and(|o| self.devices.contains(&o)))
    }
}

/// The routes we own in the main table (of the network's family).
pub(crate) async fn owned_routes(
    nl: &Netlink,
    own: &Ownership,
) -> Result<Vec<Route>, NetlinkError> {
    let family = match own.network {
        IpNet::V4(_) => IpFamily::V4,
        IpNet::V6(_) => IpFamily::V6,
    };
    let routes = nl
        .routes(
            family,
            &RouteFilter {
                table: Some(RT_TABLE_MAIN),
                ..Default::default()
            },
        )
        .await?;
    Ok(routes.into_iter().filter(|r| own.owns(r)).collect())
}

/// Reads neighbour entries of `family` and FDB entries of `dev` (permanent `self`
/// FDB entries with a remote).
pub(crate) async fn read_device(
    nl: &Netlink,
    dev: u32,
    family: IpFamily,
    state: &mut State,
) -> Result<(), NetlinkError> {
    let (neigh, fdb) = futures::join!(nl.neighbours(family, Some(dev)), nl.fdb_entries(dev));
    for n in neigh? {
        state.neigh.insert(n.dst, (n.lladdr, n.is_permanent()));
    }
    for e in fdb? {
        if let (true, true, Some(dst)) = (e.is_self(), e.is_permanent(), e.dst) {
            state.fdb.insert((e.mac, dst));
        }
    }
    Ok(())
}

/// Outcome of running a plan.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub done: usize,
    pub errors: Vec<NetlinkError>,
}

impl Outcome {
    pub fn into_result(mut self, context: &str) -> Result<usize, BackendError> {
        if self.errors.is_empty() {
            return Ok(self.done);
        }
        for e in self.errors.iter().take(20) {
            tracing::warn!("{context}: {e}");
        }
        if self.errors.len() > 20 {
            tracing::warn!("{context}: {} more errors", self.errors.len() - 20);
        }
        let failed = self.errors.len();
        let first = self.errors.swap_remove(0);
        Err(BackendError::Kernel {
            context: context.to_string(),
            source: crate::KernelError::Batch {
                failed,
                total: failed + self.done,
                first,
            },
        })
    }
}

/// Runs `plan` (nothing when it is empty) and adds its writes to `writes`; failures
/// are reported under `context`.
pub(crate) async fn run(
    nl: &Netlink,
    dev: Option<u32>,
    desired: &Desired,
    plan: &Plan,
    writes: &mut u64,
    context: &str,
) -> Result<(), BackendError> {
    if plan.is_empty() {
        return Ok(());
    }
    *writes += plan.ops() as u64;
    execute(nl, dev, desired, plan)
        .await
        .into_result(context)
        .map(|_| ())
}

/// Runs `plan` against device `dev` (neighbour/FDB entries) in phase order, each
/// phase packed into as few netlink system calls as the kernel takes (see
/// [`Netlink::write_batch`]).
pub(crate) async fn execute(
    nl: &Netlink,
    dev: Option<u32>,
    desired: &Desired,
    plan: &Plan,
) -> Outcome {
    let mut out = Outcome::default();
    let mut failed_neigh = HashSet::new();
    let mut failed_fdb = HashSet::new();

    if let Some(dev) = dev {
        let ops: Vec<WriteOp> = plan
            .neigh_set
            .iter()
            .map(|(ip, mac)| WriteOp::NeighReplace {
                index: dev,
                ip: *ip,
                mac: *mac,
            })
            .chain(plan.fdb_set.iter().map(|(mac, ip)| WriteOp::FdbReplace {
                index: dev,
                mac: *mac,
                dst: *ip,
            }))
            .collect();
        let results = nl.write_batch(ops.clone()).await;
        for (op, r) in ops.iter().zip(results) {
            match r {
                Ok(()) => out.done += 1,
                Err(e) => {
                    match op {
                        WriteOp::NeighReplace { ip, .. } => {
                            failed_neigh.insert(*ip);
                        }
                        WriteOp::FdbReplace { mac, .. } => {
                            failed_fdb.insert(*mac);
                        }
                        _ => {}
                    }
                    out.errors.push(e);
                }
            }
        }
    }

    let routes: Vec<WriteOp> = plan
        .route_set
        .iter()
        .filter(|r| match desired.deps.get(&r.dst) {
            Some((ip, mac)) => !failed_neigh.contains(ip) && !failed_fdb.contains(mac),
            None => true,
        })
        .cloned()
        .map(WriteOp::RouteReplace)
        .collect();
    tally(&mut out, nl.write_batch(routes).await);
    let dels = plan
        .route_del
        .iter()
        .cloned()
        .map(WriteOp::RouteDel)
        .collect();
    tally(&mut out, nl.write_batch(dels).await);

    if let Some(dev) = dev {
        let ops: Vec<WriteOp> = plan
            .neigh_del
            .iter()
            .map(|ip| WriteOp::NeighDel {
                index: dev,
                ip: *ip,
            })
            .chain(plan.fdb_del.iter().map(|(mac, ip)| WriteOp::FdbDel {
                index: dev,
                mac: *mac,
                dst: Some(*ip),
            }))
            .collect();
        tally(&mut out, nl.write_batch(ops).await);
    }
    out
}

fn tally(out: &mut Outcome, results: Vec<Result<(), NetlinkError>>) {
    for r in results {
        match r {
            Ok(()) => out.done += 1,
            Err(e) => out.errors.push(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, gw: &str, oif: u32) -> Route {
        Route::new(dst.parse().unwrap())
            .via(gw.parse().unwrap())
            .dev(oif)
            .onlink()
    }

    fn mac(b: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, b])
    }

    fn desired() -> Desired {
        let mut d = Desired::default();
        let r = route("10.5.2.0/24", "10.5.2.0", 7);
        d.neigh.insert("10.5.2.0".parse().unwrap(), mac(2));
        d.fdb.insert(mac(2), "198.18.0.2".parse().unwrap());
        d.deps.insert(r.dst, ("10.5.2.0".parse().unwrap(), mac(2)));
        d.routes.insert(r.dst, r);
        d
    }

    #[test]
    fn equal_state_gives_an_empty_plan() {
        let d = desired();
        assert!(diff(&d, &d.as_state()).is_empty());
    }

    #[test]
    fn missing_entries_are_set_and_stale_ones_deleted() {
        let d = desired();
        let mut cur = State::default();
        cur.neigh
            .insert("10.5.9.0".parse().unwrap(), (Some(mac(9)), true));
        // Not permanent: the kernel's own, left alone.
        cur.neigh
            .insert("10.5.8.0".parse().unwrap(), (Some(mac(8)), false));
        cur.fdb.insert((mac(9), "198.18.0.9".parse().unwrap()));
        cur.add_route(route("10.5.9.0/24", "10.5.9.0", 7));
        let p = diff(&d, &cur);
        assert_eq!(p.neigh_set.len(), 1);
        assert_eq!(p.fdb_set.len(), 1);
        assert_eq!(p.route_set.len(), 1);
        assert_eq!(p.neigh_del, vec!["10.5.9.0".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.fdb_del, vec![(mac(9), "198.18.0.9".parse().unwrap())]);
        assert_eq!(p.route_del.len(), 1);
    }

    #[test]
    fn changed_peer_is_replaced_in_place() {
        let d = desired();
        let mut cur = d.as_state();
        // Old MAC and old VTEP address.
        cur.neigh
            .insert("10.5.2.0".parse().unwrap(), (Some(mac(3)), true));
        cur.fdb.clear();
        cur.fdb.insert((mac(3), "198.18.0.3".parse().unwrap()));
        let p = diff(&d, &cur);
        assert_eq!(p.neigh_set, vec![("10.5.2.0".parse().unwrap(), mac(2))]);
        assert!(
            p.neigh_del.is_empty(),
            "the neighbour is replaced, not deleted"
        );
        assert_eq!(p.fdb_set, vec![(mac(2), "198.18.0.2".parse().unwrap())]);
        assert_eq!(p.fdb_del, vec![(mac(3), "198.18.0.3".parse().unwrap())]);
        assert!(
            p.route_set.is_empty() && p.route_del.is_empty(),
            "route untouched"
        );
    }

    #[test]
    fn boot_routes_are_adopted_by_replace_not_deleted() {
        let d = desired();
        let mut cur = d.as_state();
        for rs in cur.routes.values_mut() {
            for r in rs {
                r.protocol = RTPROT_BOOT;
            }
        }
        let p = diff(&d, &cur);
        assert_eq!(p.route_set.len(), 1);
        assert!(
            p.route_del.is_empty(),
            "a replaced route must not be deleted"
        );
        // A different gateway is also replaced in place.
        let mut cur = d.as_state();
        cur.routes.clear();
        cur.add_route(
            Route::new("10.5.2.0/24".parse().unwrap())
                .via("198.18.0.2".parse().unwrap())
                .dev(3),
        );
        let p = diff(&d, &cur);
        assert_eq!(p.route_set.len(), 1);
        assert!(p.route_del.is_empty());
        // Same destination with another metric is a separate route: deleted.
        let mut other = route("10.5.2.0/24", "10.5.2.0", 7);
        other.priority = Some(100);
        cur.add_route(other);
        assert_eq!(diff(&d, &cur).route_del.len(), 1);
    }

    #[test]
    fn ownership() {
        let own = Ownership {
            network: "10.5.0.0/16".parse().unwrap(),
            own: Some("10.5.1.0/24".parse().unwrap()),
            devices: vec![7],
        };
        let v6 = |dst: &str, proto: u8| {
            Route::new(dst.parse().unwrap())
                .via("fd18::2".parse().unwrap())
                .dev(7)
                .protocol(proto)
        };
        assert!(
            !own.owns(&v6("fd10:244:0:2::/64", RTPROT_FLANNEL)),
            "other family"
        );
        let own6 = Ownership {
            network: "fd10:244::/56".parse().unwrap(),
            own: Some("fd10:244:0:1::/64".parse().unwrap()),
            devices: vec![7],
        };
        assert!(own6.owns(&v6("fd10:244:0:2::/64", RTPROT_FLANNEL)));
        assert!(own6.owns(&v6("fd10:244:0:2::/64", RTPROT_BOOT)));
        assert!(!own6.owns(&v6("fd10:244:0:2::/64", 4)), "the admin's");
        assert!(
            !own6.owns(&v6("fd10:244:0:1::/64", RTPROT_BOOT)),
            "own subnet"
        );
        assert!(
            !own6.owns(&v6("fd10:244::/56", RTPROT_FLANNEL)),
            "the network"
        );
        assert!(!own6.owns(&v6("fd11::/64", RTPROT_FLANNEL)), "outside");
        assert!(!own6.owns(&route("10.5.2.0/24", "10.5.2.0", 7).protocol(RTPROT_FLANNEL)));
        let r = |dst: &str, proto: u8, oif: u32| route(dst, "10.5.2.0", oif).protocol(proto);
        assert!(own.owns(&r("10.5.2.0/24", RTPROT_FLANNEL, 99)));
        assert!(own.owns(&r("10.5.2.0/24", RTPROT_BOOT, 7)));
        assert!(
            !own.owns(&r("10.5.2.0/24", RTPROT_BOOT, 8)),
            "boot route elsewhere"
        );
        assert!(
            !own.owns(&r("10.5.2.0/24", 4, 7)),
            "proto static is the admin's"
        );
        assert!(
            own.owns(&r("10.5.1.0/24", RTPROT_FLANNEL, 7)),
            "leftover of ours into the own subnet"
        );
        assert!(
            !own.owns(&r("10.5.1.0/24", RTPROT_BOOT, 7)),
            "own subnet, maybe not ours"
        );
        assert!(
            !own.owns(&r("10.5.0.0/16", RTPROT_FLANNEL, 7)),
            "the network itself"
        );
        assert!(!own.owns(&r("10.6.2.0/24", RTPROT_FLANNEL, 7)), "outside");
        assert!(!own.owns(&r("10.5.2.0/24", RTPROT_FLANNEL, 7).table(100)));
    }
}
