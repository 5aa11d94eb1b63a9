//! Lease events and the tracker that turns store observations into them.
//!
//! Every store (etcd, kube) reports what it sees as puts, deletes and full snapshots;
//! the tracker holds the last known set and emits only real changes, so a peer's lease
//! renewal (same attributes, new expiry) or a node heartbeat causes no work downstream.

use std::collections::BTreeMap;

use crate::lease::{Lease, LeaseKey};

/// A change in the set of other hosts' leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease we did not know.
    Added(Lease),
    /// A known lease whose attributes (public IP, backend data...) changed.
    Changed { previous: Lease, current: Lease },
    /// A lease that was deleted or expired, with the attributes it last had.
    Removed(Lease),
}

impl LeaseEvent {
    pub fn key(&self) -> LeaseKey {
        match self {
            LeaseEvent::Added(l) | LeaseEvent::Removed(l) => l.key,
            LeaseEvent::Changed { current, .. } => current.key,
        }
    }
}

/// What a store's watch delivers to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseUpdate {
    /// The complete set of other hosts' leases. Always the first update of a watch;
    /// a backend reconciles the kernel against it (adding, replacing and removing).
    Full(Vec<Lease>),
    /// Changes since the previous update, in order.
    Events(Vec<LeaseEvent>),
}

/// The last known set of other hosts' leases.
#[derive(Debug, Default, Clone)]
pub struct LeaseTracker {
    own: Option<LeaseKey>,
    known: BTreeMap<LeaseKey, Lease>,
}

impl LeaseTracker {
    /// A tracker that ignores the lease `own` (this host's).
    pub fn new(own: Option<LeaseKey>) -> Self {
        LeaseTracker {
            own,
            known: BTreeMap::new(),
        }
    }

    fn is_own(&self, key: &LeaseKey) -> bool {
        self.own.is_some_and(|o| o.v4 == key.v4)
    }

    /// A lease was written.
    pub fn put(&mut self, lease: Lease) -> Option<LeaseEvent> {
        if self.is_own(&lease.key) {
            return None;
        }
        match self.known.insert(lease.key, lease.clone()) {
            None => Some(LeaseEvent::Added(lease)),
            Some(prev) if prev.attrs == lease.attrs => None,
            Some(previous) => Some(LeaseEvent::Changed {
                previous,
                current: lease,
            }),
        }
    }

    /// A lease key was deleted.
    pub fn delete(&mut self, key: &LeaseKey) -> Option<LeaseEvent> {
        self.known.remove(key).map(LeaseEvent::Removed)
    }

    /// A complete listing: emits what differs from the known set.
    pub fn snapshot(&mut self, leases: impl IntoIterator<Item = Lease>) -> Vec<LeaseEvent> {
        let mut seen = BTreeMap::new();
        for l in leases {
            if !self.is_own(&l.key) {
                seen.insert(l.key, l);
            }
        }
        let mut events: Vec<LeaseEvent> = self
            .known
            .keys()
            .filter(|k| !seen.contains_key(k))
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|k| self.delete(&k))
            .collect();
        for l in seen.into_values() {
            events.extend(self.put(l));
        }
        events
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.known.values()
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(key: &str, ip: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new(ip.parse().unwrap()).into(),
            expiration: None,
        }
    }

    #[test]
    fn emits_only_real_changes() {
        let mut t = LeaseTracker::new(Some("10.5.1.0-24".parse().unwrap()));
        assert_eq!(
            t.put(lease("10.5.1.0-24", "1.1.1.1")),
            None,
            "own lease ignored"
        );
        assert!(matches!(
            t.put(lease("10.5.2.0-24", "1.1.1.2")),
            Some(LeaseEvent::Added(_))
        ));
        let mut renewed = lease("10.5.2.0-24", "1.1.1.2");
        renewed.expiration = Some(std::time::SystemTime::now());
        assert_eq!(t.put(renewed), None, "renewal is not a change");
        assert!(matches!(
            t.put(lease("10.5.2.0-24", "1.1.1.9")),
            Some(LeaseEvent::Changed { .. })
        ));
        match t.delete(&"10.5.2.0-24".parse().unwrap()) {
            Some(LeaseEvent::Removed(l)) => assert_eq!(l.attrs.public_ip.to_string(), "1.1.1.9"),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.delete(&"10.5.2.0-24".parse().unwrap()), None);
    }

    #[test]
    fn snapshot_diffs() {
        let mut t = LeaseTracker::new(None);
        t.put(lease("10.5.2.0-24", "1.1.1.2"));
        t.put(lease("10.5.3.0-24", "1.1.1.3"));
        let ev = t.snapshot(vec![
            lease("10.5.3.0-24", "1.1.1.3"),
            lease("10.5.4.0-24", "1.1.1.4"),
        ]);
        assert_eq!(ev.len(), 2);
        assert!(matches!(&ev[0], LeaseEvent::Removed(l) if l.key.to_string() == "10.5.2.0-24"));
        assert!(matches!(&ev[1], LeaseEvent::Added(l) if l.key.to_string() == "10.5.4.0-24"));
        assert_eq!(t.len(), 2);
    }
}
