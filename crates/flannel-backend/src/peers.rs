//! Bookkeeping shared by backends: which leases to use, warnings given once per lease,
//! the current set of peers.

use std::collections::{BTreeMap, HashMap};

use flannel_core::{Lease, LeaseEvent, LeaseKey};

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
}
