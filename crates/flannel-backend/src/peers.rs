//! Bookkeeping shared by backends: which leases to use, warnings given once per lease,
//! the current set of peers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};

use flannel_core::{Lease, LeaseEvent, LeaseKey};
use flannel_net::netlink::{Netlink, Route};
use ipnet::{Ipv4Net, Ipv6Net};

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

/// Where this node's IPv6 side stands, for judging a peer's v6 part.
#[derive(Debug, Clone, Copy)]
pub(crate) struct V6Side {
    /// The IPv6Network, or `None` when IPv6 is off.
    pub network: Option<Ipv6Net>,
    /// Our own IPv6 subnet (a lease holding it is ours, not a peer).
    pub own: Option<Ipv6Net>,
    /// Whether IPv4 runs beside it (the warnings then say IPv4 is still routed).
    pub dual_stack: bool,
}

/// The IPv6 subnet and public IPv6 of a peer lease, when they can be routed: IPv6
/// on here, a v6 subnet inside IPv6Network that is not ours, and a PublicIPv6. A
/// lease that cannot gets its warning (once, in `warnings6`); its IPv4 part is the
/// caller's business.
pub(crate) fn v6_route_part(
    l: &Lease,
    side: V6Side,
    warnings6: &mut Warnings,
) -> Option<(Ipv6Net, Ipv6Addr)> {
    let Some(network6) = side.network else {
        if let Some(n) = l.ipv6_subnet() {
            warnings6.warn(
                l.key,
                format!(
                    "its IPv6 subnet {n} is ignored: IPv6 is not enabled in the network config"
                ),
            );
        }
        return None;
    };
    let Some(net6) = l.ipv6_subnet().map(|n| n.trunc()) else {
        let msg = if side.dual_stack {
            "it has no IPv6 subnet in a dual-stack network: only its IPv4 subnet is routed"
        } else {
            "it has no IPv6 subnet in an IPv6-only network: not routed"
        };
        warnings6.warn(l.key, msg.into());
        return None;
    };
    if side.own == Some(net6) {
        return None;
    }
    if net6.prefix_len() <= network6.prefix_len() || !network6.contains(&net6) {
        warnings6.warn(
            l.key,
            format!("its IPv6 subnet {net6} is not inside IPv6Network {network6}: not routed"),
        );
        return None;
    }
    let Some(public6) = l.attrs.public_ipv6 else {
        warnings6.warn(
            l.key,
            format!(
                "it has no PublicIPv6: its IPv6 subnet {net6} is not routed{}",
                v4_still(side.dual_stack)
            ),
        );
        return None;
    };
    Some((net6, public6))
}

/// The tail of a v6 warning: in dual stack the peer's IPv4 part is still used.
pub(crate) fn v4_still(dual_stack: bool) -> &'static str {
    if dual_stack {
        " (IPv4 still is)"
    } else {
        ""
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flannel_core::LeaseAttrs;

    use super::*;

    fn lease(v6: Option<&str>, value: &str) -> Lease {
        Lease {
            key: LeaseKey {
                v4: "10.244.7.0/24".parse().unwrap(),
                v6: v6.map(|s| s.parse().unwrap()),
            },
            attrs: Arc::new(LeaseAttrs::decode(value).unwrap()),
            expiration: None,
        }
    }

    fn side(network: Option<&str>, dual_stack: bool) -> V6Side {
        V6Side {
            network: network.map(|n| n.parse().unwrap()),
            own: Some("fd10:244:0:1::/64".parse().unwrap()),
            dual_stack,
        }
    }

    const WITH_V6: &str =
        r#"{"PublicIP":"192.0.2.7","PublicIPv6":"fd00::7","BackendType":"host-gw"}"#;
    const NO_V6_IP: &str = r#"{"PublicIP":"192.0.2.7","BackendType":"host-gw"}"#;

    /// Runs `v6_route_part` and returns its answer with the warning it gave.
    fn judge(l: &Lease, s: V6Side) -> (Option<(Ipv6Net, Ipv6Addr)>, Option<String>) {
        let mut w = Warnings::default();
        let part = v6_route_part(l, s, &mut w);
        (part, w.given.get(&l.key).cloned())
    }

    #[test]
    fn a_routable_v6_part_is_its_subnet_and_public_ipv6() {
        let l = lease(Some("fd10:244:0:7::/64"), WITH_V6);
        let (part, warning) = judge(&l, side(Some("fd10:244::/56"), true));
        assert_eq!(
            part,
            Some((
                "fd10:244:0:7::/64".parse().unwrap(),
                "fd00::7".parse().unwrap()
            ))
        );
        assert_eq!(warning, None);
    }

    #[test]
    fn our_own_v6_subnet_is_silently_not_a_peer() {
        let l = lease(Some("fd10:244:0:1::/64"), WITH_V6);
        assert_eq!(judge(&l, side(Some("fd10:244::/56"), true)), (None, None));
    }

    #[test]
    fn each_unroutable_v6_part_gets_its_own_warning() {
        let net = Some("fd10:244::/56");
        let cases = [
            (
                Some("fd10:244:0:7::/64"),
                WITH_V6,
                side(None, true),
                "IPv6 is not enabled",
            ),
            (
                None,
                WITH_V6,
                side(net, true),
                "only its IPv4 subnet is routed",
            ),
            (
                None,
                WITH_V6,
                side(net, false),
                "IPv6-only network: not routed",
            ),
            (
                Some("fd99::/64"),
                WITH_V6,
                side(net, true),
                "not inside IPv6Network",
            ),
            (
                Some("fd10:244::/56"),
                WITH_V6,
                side(net, true),
                "not inside IPv6Network",
            ),
            (
                Some("fd10:244:0:7::/64"),
                NO_V6_IP,
                side(net, true),
                "(IPv4 still is)",
            ),
        ];
        for (v6, value, s, expected) in cases {
            let l = lease(v6, value);
            let (part, warning) = judge(&l, s);
            assert_eq!(part, None, "{v6:?} {value}");
            let warning = warning.unwrap_or_default();
            assert!(warning.contains(expected), "{v6:?}: {warning:?}");
        }
        let l = lease(Some("fd10:244:0:7::/64"), NO_V6_IP);
        let (_, warning) = judge(&l, side(net, false));
        assert!(!warning.unwrap().contains("IPv4 still"));
    }
}
