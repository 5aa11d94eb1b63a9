//! Which peer leases may reach the kernel.
//!
//! The agent runs as root and programs routes from what the store says. A mistaken
//! or hostile entry must not take over the host's routing: a `0.0.0.0-0` key would
//! replace the default route, a subnet overlapping ours would steal our pods'
//! traffic. So a peer lease is programmed only if its subnet lies inside the
//! cluster network (v6: the IPv6 network), has no host bits, and overlaps neither
//! our own subnet nor a peer already accepted. The first accepted of two
//! overlapping peers keeps its routes; the other waits and is accepted once the
//! conflict is gone. Upstream programs whatever the store says: this is a
//! deliberate difference (docs/compatibility.md, "Deliberate differences").

use std::collections::BTreeMap;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::events::{LeaseEvent, LeaseUpdate};
use crate::lease::{Lease, LeaseKey};

/// What accepted peers must respect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerScope {
    /// The cluster's IPv4 network, if IPv4 is enabled.
    pub network: Option<Ipv4Net>,
    /// The cluster's IPv6 network, if IPv6 is enabled.
    pub network6: Option<Ipv6Net>,
    /// Our own lease.
    pub own: LeaseKey,
}

/// Why a peer lease was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    /// Its subnet is not inside the cluster network (e.g. `0.0.0.0-0`).
    OutsideNetwork,
    /// Its key has host bits set (`10.5.52.7-24`): a second name for a subnet.
    HostBits,
    /// Its subnet overlaps our own.
    OverlapsOwn,
    /// Its subnet overlaps a peer accepted before it.
    OverlapsPeer,
}

impl RejectReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::OutsideNetwork => "outside_network",
            RejectReason::HostBits => "host_bits",
            RejectReason::OverlapsOwn => "overlaps_own",
            RejectReason::OverlapsPeer => "overlaps_peer",
        }
    }

    pub const ALL: [RejectReason; 4] = [
        RejectReason::OutsideNetwork,
        RejectReason::HostBits,
        RejectReason::OverlapsOwn,
        RejectReason::OverlapsPeer,
    ];
}

/// One refused lease, reported once when it is first refused (not on every resync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub key: LeaseKey,
    pub reason: RejectReason,
    /// The accepted lease it conflicts with ([`RejectReason::OverlapsPeer`]).
    pub conflicts_with: Option<LeaseKey>,
}

/// An update with the refused leases taken out, and the new refusals.
#[derive(Debug, Clone)]
pub struct Filtered {
    /// What may go to the backend (`None`: nothing changed for it).
    pub update: Option<LeaseUpdate>,
    pub rejected: Vec<Rejection>,
}

/// The accepted and the refused peers, kept across updates so that a refused lease
/// is reported once and a waiting one is accepted when its conflict goes away.
#[derive(Debug, Clone)]
pub struct PeerFilter {
    scope: PeerScope,
    accepted: BTreeMap<LeaseKey, Lease>,
    refused: BTreeMap<LeaseKey, (Lease, RejectReason)>,
    /// The accepted subnets as address ranges, per family in use. Accepted peers
    /// never overlap each other, so the ranges are disjoint and a new key's
    /// conflicts are found in O(log n): a scan of all accepted peers per admitted
    /// lease made a 5000-lease listing quadratic.
    ranges4: Ranges<u32>,
    ranges6: Ranges<u128>,
}

/// Disjoint address ranges `[start, end]`, each of one accepted lease.
#[derive(Debug, Clone)]
struct Ranges<T> {
    by_start: BTreeMap<T, (T, LeaseKey)>,
}

impl<T: Ord + Copy> Default for Ranges<T> {
    fn default() -> Self {
        Ranges {
            by_start: BTreeMap::new(),
        }
    }
}

impl<T: Ord + Copy> Ranges<T> {
    fn insert(&mut self, (start, end): (T, T), key: LeaseKey) {
        self.by_start.insert(start, (end, key));
    }

    fn remove(&mut self, (start, _): (T, T), key: &LeaseKey) {
        if self.by_start.get(&start).is_some_and(|(_, k)| k == key) {
            self.by_start.remove(&start);
        }
    }

    fn clear(&mut self) {
        self.by_start.clear();
    }

    /// The keys whose range overlaps `[start, end]`: the one starting at or before
    /// `start` if it reaches it, and those starting inside.
    fn overlapping(&self, (start, end): (T, T)) -> impl Iterator<Item = &LeaseKey> {
        let before = self
            .by_start
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e >= start)
            .map(|(_, (_, k))| k);
        let inside = self
            .by_start
            .range(start..=end)
            .filter(move |(s, _)| **s != start)
            .map(|(_, (_, k))| k);
        before.into_iter().chain(inside)
    }
}

fn range4(n: Ipv4Net) -> (u32, u32) {
    let n = n.trunc();
    (u32::from(n.network()), u32::from(n.broadcast()))
}

fn range6(n: Ipv6Net) -> (u128, u128) {
    let n = n.trunc();
    (u128::from(n.network()), u128::from(n.broadcast()))
}

fn overlap4(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b) || b.contains(&a)
}

fn overlap6(a: Option<Ipv6Net>, b: Option<Ipv6Net>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.contains(&b) || b.contains(&a),
        _ => false,
    }
}

impl PeerFilter {
    pub fn new(scope: PeerScope) -> Self {
        PeerFilter {
            scope,
            accepted: BTreeMap::new(),
            refused: BTreeMap::new(),
            ranges4: Ranges::default(),
            ranges6: Ranges::default(),
        }
    }

    /// How many peers are accepted now.
    pub fn accepted_count(&self) -> usize {
        self.accepted.len()
    }

    fn insert_accepted(&mut self, lease: Lease) {
        let key = lease.key;
        if self.accepted.insert(key, lease).is_none() {
            if self.scope.network.is_some() {
                self.ranges4.insert(range4(key.v4), key);
            }
            if let (Some(_), Some(v6)) = (self.scope.network6, key.v6) {
                self.ranges6.insert(range6(v6), key);
            }
        }
    }

    fn remove_accepted(&mut self, key: &LeaseKey) -> Option<Lease> {
        let l = self.accepted.remove(key)?;
        self.ranges4.remove(range4(key.v4), key);
        if let Some(v6) = key.v6 {
            self.ranges6.remove(range6(v6), key);
        }
        Some(l)
    }

    fn clear_accepted(&mut self) {
        self.accepted.clear();
        self.ranges4.clear();
        self.ranges6.clear();
    }

    /// The peers that may be programmed now.
    pub fn accepted(&self) -> impl Iterator<Item = &Lease> {
        self.accepted.values()
    }

    /// How many leases are refused now.
    pub fn refused_count(&self) -> usize {
        self.refused.len()
    }

    /// Whether two keys overlap in a family the cluster uses. (A disabled family's
    /// part is a placeholder: IPv6-only nodes all publish `0.0.0.0/0` for IPv4.)
    fn overlaps(&self, a: &LeaseKey, b: &LeaseKey) -> bool {
        (self.scope.network.is_some() && overlap4(a.v4.trunc(), b.v4.trunc()))
            || (self.scope.network6.is_some()
                && overlap6(a.v6.map(|n| n.trunc()), b.v6.map(|n| n.trunc())))
    }

    /// Why `key` would be refused next to the accepted peers (`None`: it is fine).
    fn check(&self, key: &LeaseKey) -> Option<(RejectReason, Option<LeaseKey>)> {
        let s = &self.scope;
        if let Some(n) = s.network {
            if !n.contains(&key.v4) {
                return Some((RejectReason::OutsideNetwork, None));
            }
            if key.v4 != key.v4.trunc() {
                return Some((RejectReason::HostBits, None));
            }
        }
        if let (Some(n), Some(k)) = (s.network6, key.v6) {
            if !n.contains(&k) {
                return Some((RejectReason::OutsideNetwork, None));
            }
            if k != k.trunc() {
                return Some((RejectReason::HostBits, None));
            }
        }
        if self.overlaps(key, &s.own) {
            return Some((RejectReason::OverlapsOwn, None));
        }
        // The first overlapping peer in key order, as a scan of `accepted` finds it.
        let v4 = s
            .network
            .map(|_| self.ranges4.overlapping(range4(key.v4)))
            .into_iter()
            .flatten();
        let v6 = match (s.network6, key.v6) {
            (Some(_), Some(n)) => Some(self.ranges6.overlapping(range6(n))),
            _ => None,
        }
        .into_iter()
        .flatten();
        v4.chain(v6)
            .filter(|k| *k != key)
            .min()
            .map(|k| (RejectReason::OverlapsPeer, Some(*k)))
    }

    /// Accepts `lease` or refuses it; a refusal is reported only if it is new or its
    /// reason changed.
    fn admit(&mut self, lease: Lease, rejected: &mut Vec<Rejection>) -> bool {
        match self.check(&lease.key) {
            None => {
                self.refused.remove(&lease.key);
                self.insert_accepted(lease);
                true
            }
            Some((reason, conflicts_with)) => {
                let known = self.refused.get(&lease.key).map(|(_, r)| *r) == Some(reason);
                if !known {
                    rejected.push(Rejection {
                        key: lease.key,
                        reason,
                        conflicts_with,
                    });
                }
                self.refused.insert(lease.key, (lease, reason));
                false
            }
        }
    }

    /// Refused leases that may now be accepted (their conflict went away), as Added.
    fn promote(&mut self, out: &mut Vec<LeaseEvent>, rejected: &mut Vec<Rejection>) {
        let waiting: Vec<Lease> = self
            .refused
            .values()
            .filter(|(_, r)| *r == RejectReason::OverlapsPeer)
            .map(|(l, _)| l.clone())
            .collect();
        for l in waiting {
            if self.check(&l.key).is_none() && self.admit(l.clone(), rejected) {
                out.push(LeaseEvent::Added(l));
            }
        }
    }

    /// Filters one watch update.
    pub fn filter(&mut self, update: LeaseUpdate) -> Filtered {
        let mut rejected = Vec::new();
        let update = match update {
            LeaseUpdate::Full(all) => {
                // Peers accepted before keep their place, so a full listing after a
                // reconnect does not swap which of two overlapping peers is routed.
                let (mut first, mut rest): (Vec<Lease>, Vec<Lease>) = all
                    .into_iter()
                    .partition(|l| self.accepted.contains_key(&l.key));
                first.sort_by_key(|l| l.key);
                rest.sort_by_key(|l| l.key);
                let old_refused = std::mem::take(&mut self.refused);
                self.clear_accepted();
                for l in first.into_iter().chain(rest) {
                    let key = l.key;
                    if let Some((_, r)) = old_refused.get(&key) {
                        // Keep the memory of the refusal, so it is not reported again.
                        self.refused.insert(key, (l.clone(), *r));
                    }
                    self.admit(l, &mut rejected);
                }
                Some(LeaseUpdate::Full(self.accepted.values().cloned().collect()))
            }
            LeaseUpdate::Events(events) => {
                let mut out = Vec::new();
                for e in events {
                    match e {
                        LeaseEvent::Added(l) => {
                            if let Some(slot) = self.accepted.get_mut(&l.key) {
                                let previous = std::mem::replace(slot, l.clone());
                                out.push(LeaseEvent::Changed {
                                    previous,
                                    current: l,
                                });
                            } else if self.admit(l.clone(), &mut rejected) {
                                out.push(LeaseEvent::Added(l));
                            }
                        }
                        LeaseEvent::Changed { previous, current } => {
                            if let Some(slot) = self.accepted.get_mut(&current.key) {
                                *slot = current.clone();
                                out.push(LeaseEvent::Changed { previous, current });
                            } else if self.admit(current.clone(), &mut rejected) {
                                out.push(LeaseEvent::Added(current));
                            }
                        }
                        LeaseEvent::Removed(l) => {
                            self.refused.remove(&l.key);
                            if let Some(last) = self.remove_accepted(&l.key) {
                                out.push(LeaseEvent::Removed(last));
                                self.promote(&mut out, &mut rejected);
                            }
                        }
                    }
                }
                (!out.is_empty()).then_some(LeaseUpdate::Events(out))
            }
        };
        Filtered { update, rejected }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn lease_of(key: LeaseKey) -> Lease {
        Lease {
            key,
            attrs: LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 1)),
            expiration: None,
        }
    }

    fn lease(key: &str) -> Lease {
        lease_of(key.parse().unwrap())
    }

    fn filter() -> PeerFilter {
        PeerFilter::new(PeerScope {
            network: Some("10.5.0.0/16".parse().unwrap()),
            network6: None,
            own: "10.5.1.0-24".parse().unwrap(),
        })
    }

    fn keys(u: &Option<LeaseUpdate>) -> Vec<String> {
        match u {
            Some(LeaseUpdate::Full(all)) => all.iter().map(|l| l.key.to_string()).collect(),
            Some(LeaseUpdate::Events(ev)) => ev
                .iter()
                .map(|e| match e {
                    LeaseEvent::Added(l) => format!("+{}", l.key),
                    LeaseEvent::Changed { current, .. } => format!("~{}", current.key),
                    LeaseEvent::Removed(l) => format!("-{}", l.key),
                })
                .collect(),
            None => vec![],
        }
    }

    #[test]
    fn hostile_keys_are_refused_and_the_rest_pass() {
        let mut f = filter();
        let out = f.filter(LeaseUpdate::Full(vec![
            lease("0.0.0.0-0"),
            lease("10.5.2.0-24"),
            lease("10.5.1.128-25"),
            lease("10.5.52.7-24"),
            lease("192.168.0.0-24"),
            lease("10.5.2.0-23"),
        ]));
        // In key order the /23 comes first and is accepted; the /24 inside it waits.
        assert_eq!(keys(&out.update), ["10.5.2.0-23"]);
        let reasons: Vec<(String, RejectReason)> = out
            .rejected
            .iter()
            .map(|r| (r.key.to_string(), r.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("0.0.0.0-0".into(), RejectReason::OutsideNetwork),
                ("10.5.1.128-25".into(), RejectReason::OverlapsOwn),
                ("10.5.2.0-24".into(), RejectReason::OverlapsPeer),
                ("10.5.52.7-24".into(), RejectReason::HostBits),
                ("192.168.0.0-24".into(), RejectReason::OutsideNetwork),
            ]
        );
        assert_eq!(
            out.rejected[2].conflicts_with,
            Some("10.5.2.0-23".parse().unwrap())
        );
    }

    #[test]
    fn a_refusal_is_reported_once_across_resyncs() {
        let mut f = filter();
        let all = vec![lease("0.0.0.0-0"), lease("10.5.2.0-24")];
        assert_eq!(f.filter(LeaseUpdate::Full(all.clone())).rejected.len(), 1);
        assert!(f.filter(LeaseUpdate::Full(all)).rejected.is_empty());
        let again = f.filter(LeaseUpdate::Events(vec![LeaseEvent::Changed {
            previous: lease("0.0.0.0-0"),
            current: lease("0.0.0.0-0"),
        }]));
        assert!(again.rejected.is_empty() && again.update.is_none());
        assert_eq!(f.refused_count(), 1);
    }

    #[test]
    fn the_waiting_peer_is_accepted_when_its_conflict_goes() {
        let mut f = filter();
        f.filter(LeaseUpdate::Full(vec![lease("10.5.2.0-24")]));
        let out = f.filter(LeaseUpdate::Events(vec![LeaseEvent::Added(lease(
            "10.5.2.0-23",
        ))]));
        assert!(out.update.is_none());
        assert_eq!(out.rejected[0].reason, RejectReason::OverlapsPeer);
        let out = f.filter(LeaseUpdate::Events(vec![LeaseEvent::Removed(lease(
            "10.5.2.0-24",
        ))]));
        assert_eq!(keys(&out.update), ["-10.5.2.0-24", "+10.5.2.0-23"]);
        // Removing a refused lease changes nothing for the backend.
        let out = f.filter(LeaseUpdate::Events(vec![LeaseEvent::Removed(lease(
            "0.0.0.0-0",
        ))]));
        assert!(out.update.is_none());
    }

    #[test]
    fn a_full_listing_keeps_the_peer_that_was_routed() {
        let mut f = filter();
        f.filter(LeaseUpdate::Full(vec![lease("10.5.4.0-23")]));
        // 10.5.4.0-24 sorts first, but 10.5.4.0-23 was accepted before.
        let out = f.filter(LeaseUpdate::Full(vec![
            lease("10.5.4.0-24"),
            lease("10.5.4.0-23"),
        ]));
        assert_eq!(keys(&out.update), ["10.5.4.0-23"]);
    }

    #[test]
    fn ipv6_parts_are_checked_too() {
        let mut f = PeerFilter::new(PeerScope {
            network: Some("10.5.0.0/16".parse().unwrap()),
            network6: Some("fd00::/48".parse().unwrap()),
            own: "10.5.1.0-24&fd00:0:0:1::-64".parse().unwrap(),
        });
        let out = f.filter(LeaseUpdate::Full(vec![
            lease("10.5.2.0-24&fd00:0:0:2::-64"),
            lease("10.5.3.0-24&fd00:0:0:1::-64"),
            lease("10.5.4.0-24&::-0"),
        ]));
        assert_eq!(keys(&out.update), ["10.5.2.0-24&fd00:0:0:2::-64"]);
        assert_eq!(out.rejected.len(), 2);
    }

    #[test]
    fn ipv6_only_ignores_the_ipv4_placeholder() {
        let mut f = PeerFilter::new(PeerScope {
            network: None,
            network6: Some("fd00::/48".parse().unwrap()),
            own: "0.0.0.0-0&fd00:0:0:1::-64".parse().unwrap(),
        });
        let out = f.filter(LeaseUpdate::Full(vec![
            lease("0.0.0.0-0&fd00:0:0:2::-64"),
            lease("0.0.0.0-0&fd00:0:0:3::-64"),
            lease("0.0.0.0-0&fd00:1::-64"),
        ]));
        assert_eq!(
            keys(&out.update),
            ["0.0.0.0-0&fd00:0:0:2::-64", "0.0.0.0-0&fd00:0:0:3::-64"]
        );
        assert_eq!(out.rejected.len(), 1, "only the one outside fd00::/48");
    }

    /// What `check` answered when it scanned every accepted peer (before the range
    /// index): the index must give the same verdicts and the same conflicting peer.
    fn check_by_scan(f: &PeerFilter, key: &LeaseKey) -> Option<(RejectReason, Option<LeaseKey>)> {
        match f.check(key) {
            Some((RejectReason::OverlapsPeer, _)) | None => {}
            other => return other,
        }
        f.accepted
            .keys()
            .find(|k| *k != key && f.overlaps(k, key))
            .map(|k| (RejectReason::OverlapsPeer, Some(*k)))
    }

    fn dual_filter() -> PeerFilter {
        PeerFilter::new(PeerScope {
            network: Some("10.5.0.0/16".parse().unwrap()),
            network6: Some("fd00::/48".parse().unwrap()),
            own: "10.5.1.0-24&fd00:0:0:1::-64".parse().unwrap(),
        })
    }

    #[test]
    fn the_range_index_follows_additions_and_removals() {
        let mut f = filter();
        let all: Vec<Lease> = (0..=255u8)
            .filter(|x| *x != 1)
            .map(|x| lease(&format!("10.5.{x}.0-24")))
            .collect();
        let out = f.filter(LeaseUpdate::Full(all));
        assert_eq!(f.accepted_count(), 255);
        assert!(out.rejected.is_empty());
        // A /20 over 16 accepted /24s conflicts with the first of them.
        let out = f.filter(LeaseUpdate::Events(vec![LeaseEvent::Added(lease(
            "10.5.16.0-20",
        ))]));
        assert!(out.update.is_none());
        assert_eq!(
            out.rejected[0].conflicts_with,
            Some("10.5.16.0-24".parse().unwrap())
        );
        // Once all 16 are gone it is accepted: the index forgot them.
        let gone: Vec<LeaseEvent> = (16..32u8)
            .map(|x| LeaseEvent::Removed(lease(&format!("10.5.{x}.0-24"))))
            .collect();
        let out = f.filter(LeaseUpdate::Events(gone));
        assert_eq!(keys(&out.update).last().unwrap(), "+10.5.16.0-20");
        // And a /24 inside the accepted /20 now conflicts with the /20.
        let out = f.filter(LeaseUpdate::Events(vec![LeaseEvent::Added(lease(
            "10.5.17.0-24",
        ))]));
        assert_eq!(
            out.rejected[0].conflicts_with,
            Some("10.5.16.0-20".parse().unwrap())
        );
    }

    proptest! {
        /// Whatever the store sends, what passes lies inside the network, has no
        /// host bits and overlaps neither our subnet nor another passed peer.
        #[test]
        fn what_passes_is_disjoint_and_inside(
            raw in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            removals in proptest::collection::vec(0usize..40, 0..10),
        ) {
            let mut f = filter();
            let leases: Vec<Lease> = raw
                .iter()
                .filter_map(|(ip, len)| Ipv4Net::new(Ipv4Addr::from(*ip), *len).ok())
                .map(|n| lease_of(LeaseKey::v4(n)))
                .collect();
            let (half, other) = leases.split_at(leases.len() / 2);
            f.filter(LeaseUpdate::Full(half.to_vec()));
            f.filter(LeaseUpdate::Events(other.iter().cloned().map(LeaseEvent::Added).collect()));
            let gone: Vec<LeaseEvent> = removals
                .iter()
                .filter_map(|i| leases.get(*i).cloned())
                .map(LeaseEvent::Removed)
                .collect();
            f.filter(LeaseUpdate::Events(gone));
            let passed: Vec<LeaseKey> = f.accepted().map(|l| l.key).collect();
            let net: Ipv4Net = "10.5.0.0/16".parse().unwrap();
            let own: LeaseKey = "10.5.1.0-24".parse().unwrap();
            for (i, a) in passed.iter().enumerate() {
                prop_assert!(net.contains(&a.v4));
                prop_assert_eq!(a.v4, a.v4.trunc());
                prop_assert!(!f.overlaps(a, &own));
                for b in &passed[i + 1..] {
                    prop_assert!(!f.overlaps(a, b), "{} and {}", a, b);
                }
            }
        }

        /// The range index finds exactly the conflicts a scan of all accepted peers
        /// finds, in both families, after any mix of listings, additions and removals.
        #[test]
        fn the_index_agrees_with_a_scan(
            raw in proptest::collection::vec((0u32..4096, 20u8..=26, 0u16..8, 60u8..=66), 0..60),
            removals in proptest::collection::vec(0usize..60, 0..15),
            probes in proptest::collection::vec((0u32..4096, 18u8..=28, 0u16..8, 58u8..=66), 1..30),
        ) {
            let v4 = |x: u32, len: u8| Ipv4Net::new(Ipv4Addr::from(0x0a05_0000 | (x << 4)), len).unwrap().trunc();
            let v6 = |x: u16, len: u8| {
                Ipv6Net::new(std::net::Ipv6Addr::new(0xfd00, 0, 0, x, 0, 0, 0, 0), len).unwrap().trunc()
            };
            let leases: Vec<Lease> = raw
                .iter()
                .map(|(a, l, b, l6)| lease_of(LeaseKey { v4: v4(*a, *l), v6: Some(v6(*b, *l6)) }))
                .collect();
            for mut f in [filter(), dual_filter()] {
                let (half, other) = leases.split_at(leases.len() / 2);
                f.filter(LeaseUpdate::Full(half.to_vec()));
                f.filter(LeaseUpdate::Events(other.iter().cloned().map(LeaseEvent::Added).collect()));
                let gone: Vec<LeaseEvent> = removals
                    .iter()
                    .filter_map(|i| leases.get(*i).cloned())
                    .map(LeaseEvent::Removed)
                    .collect();
                f.filter(LeaseUpdate::Events(gone));
                f.filter(LeaseUpdate::Full(leases.clone()));
                for (a, l, b, l6) in &probes {
                    let key = LeaseKey { v4: v4(*a, *l), v6: Some(v6(*b, *l6)) };
                    prop_assert_eq!(f.check(&key), check_by_scan(&f, &key), "{}", key);
                }
            }
        }
    }
}
