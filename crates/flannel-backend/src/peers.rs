//! Bookkeeping shared by backends: which leases to use, warnings given once per lease,
//! the current set of peers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use flannel_core::{Lease, LeaseEvent, LeaseKey};
use flannel_net::netlink::{Netlink, Route};
use ipnet::Ipv4Net;

/// Remembers the warning last logged for each lease so a bad lease is reported once
/// (and again only if what is wrong with it changes), not on every resync.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    given: HashMap<LeaseKey, String>,
}

impl Warnings {
    pub fn warn(&mut self, key: LeaseKey, msg: String) {
        if self.given.get(&key) != Some(&msg) {
            tracing::warn!("lease {key}: {msg}");
            self.given.insert(key, msg);
        }
    }

    /// Like [`warn`](Self::warn), at error level (the peer is unreachable).
    pub fn error(&mut self, key: LeaseKey, msg: String) {
        if self.given.get(&key) != Some(&msg) {
            tracing::error!("lease {key}: {msg}");
            self.given.insert(key, msg);
        }
    }

    pub fn clear(&mut self, key: &LeaseKey) {
        self.given.remove(key);
    }

    /// Forgets leases that are no longer present.
    pub fn retain(&mut self, present: impl Fn(&LeaseKey) -> bool) {
        self.given.retain(|k, _| present(k));
    }
}

/// Checks the lease's type against ours (exact, case-sensitive, as upstream; a lease
/// without a type counts as another type).
pub(crate) fn type_matches(lease: &Lease, ours: &str, warnings: &mut Warnings) -> bool {
    if lease.attrs.backend_type == ours {
        return true;
    }
    warnings.warn(
        lease.key,
        format!(
            "ignored: its backend type is {:?}, this node runs {ours:?}",
            lease.attrs.backend_type
        ),
    );
    false
}

/// Whether a route-programming backend of type `ours` can use `lease`: of our type,
/// not our own subnet (`own`), and with a public IP. A refused lease gets its warning.
pub(crate) fn usable(
    lease: &Lease,
    ours: &str,
    own: Option<Ipv4Net>,
    warnings: &mut Warnings,
) -> bool {
    if !type_matches(lease, ours, warnings) {
        return false;
    }
    if own.is_some_and(|o| o == lease.subnet()) {
        return false;
    }
    if lease.attrs.public_ip.is_unspecified() {
        warnings.warn(lease.key, "ignored: it has no public IP".into());
        return false;
    }
    true
}

/// What one batch of lease events touched.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// The lease keys the events name, sorted, each once (keys, not IPv4 subnets:
    /// IPv6-only leases all share the 0.0.0.0/0 placeholder).
    pub touched: Vec<LeaseKey>,
    /// The added or changed leases that are still current after the whole batch
    /// (the latest state of a subnet wins within one batch), in event order.
    pub current: Vec<Lease>,
}

/// The current set of other hosts' leases, by key.
#[derive(Debug, Default, Clone)]
pub(crate) struct PeerSet {
    pub leases: BTreeMap<LeaseKey, Lease>,
}

impl PeerSet {
    pub fn replace_all(&mut self, peers: &[Lease]) {
        self.leases = peers.iter().map(|l| (l.key, l.clone())).collect();
    }

    pub fn apply(&mut self, events: &[LeaseEvent]) {
        for e in events {
            match e {
                LeaseEvent::Added(l) | LeaseEvent::Changed { current: l, .. } => {
                    self.leases.insert(l.key, l.clone());
                }
                LeaseEvent::Removed(l) => {
                    self.leases.remove(&l.key);
                }
            }
        }
    }

    pub fn all(&self) -> Vec<Lease> {
        self.leases.values().cloned().collect()
    }

    /// [`apply`](Self::apply)s `events` and says what they touched. A removed
    /// lease's warning is forgotten, then `on_removed` hears of it.
    pub fn apply_batch(
        &mut self,
        events: &[LeaseEvent],
        warnings: &mut Warnings,
        mut on_removed: impl FnMut(&Lease),
    ) -> Batch {
        self.apply(events);
        let mut touched: Vec<LeaseKey> = events.iter().map(|e| e.key()).collect();
        touched.sort();
        touched.dedup();
        let mut current = Vec::new();
        for e in events {
            match e {
                LeaseEvent::Added(l) | LeaseEvent::Changed { current: l, .. } => {
                    if self.leases.get(&l.key) == Some(l) {
                        current.push(l.clone());
                    }
                }
                LeaseEvent::Removed(l) => {
                    warnings.clear(&l.key);
                    on_removed(l);
                }
            }
        }
        Batch { touched, current }
    }

    /// Forgets the route lookups and warnings of leases that are gone; `leases` is
    /// [`all`](Self::all) as planned.
    pub fn prune(&self, leases: &[Lease], lookups: &mut RouteLookups, warnings: &mut Warnings) {
        let used: HashSet<IpAddr> = leases
            .iter()
            .flat_map(|l| {
                std::iter::once(IpAddr::V4(l.attrs.public_ip))
                    .chain(l.attrs.public_ipv6.map(IpAddr::V6))
            })
            .collect();
        lookups.retain(&used);
        warnings.retain(|k| self.leases.contains_key(k));
    }
}

/// Replaces what is programmed for the `touched` subnets (or lease keys) with `new`
/// and returns what was programmed for them before.
pub(crate) fn swap_touched<K: Ord + Copy, V: Copy>(
    programmed: &mut BTreeMap<K, V>,
    touched: &[K],
    new: &BTreeMap<K, V>,
) -> BTreeMap<K, V> {
    let old: BTreeMap<K, V> = touched
        .iter()
        .filter_map(|s| programmed.get(s).map(|v| (*s, *v)))
        .collect();
    for s in touched {
        programmed.remove(s);
    }
    programmed.extend(new.iter().map(|(k, v)| (*k, *v)));
    old
}

/// The kernel's route lookup (`ip route get`) for peers' public IPs (either
/// family), cached so a periodic resync costs no lookups for peers already decided.
#[derive(Debug, Default)]
pub(crate) struct RouteLookups {
    answers: HashMap<IpAddr, Result<Route, String>>,
}

impl RouteLookups {
    /// Looks up every IP that is not cached yet or whose cached answer `refresh`
    /// selects, all at once on the pipelined socket.
    pub async fn update(
        &mut self,
        nl: &Netlink,
        ips: impl IntoIterator<Item = impl Into<IpAddr>>,
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) {
        let todo: HashSet<IpAddr> = ips
            .into_iter()
            .map(Into::into)
            .filter(|ip| self.answers.get(ip).is_none_or(&refresh))
            .collect();
        let futs: Vec<_> = todo
            .into_iter()
            .map(|ip| {
                let nl = nl.clone();
                async move {
                    let r = nl.route_get(ip).await.map_err(|e| e.to_string());
                    (ip, r)
                }
            })
            .collect();
        self.answers.extend(nl.run_batch(futs).await);
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Result<Route, String>> {
        self.answers.get(&ip)
    }

    /// Forgets IPs no peer uses any more.
    pub fn retain(&mut self, used: &HashSet<IpAddr>) {
        self.answers.retain(|ip, _| used.contains(ip));
    }
}
