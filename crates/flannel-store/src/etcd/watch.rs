//! Watching leases: a snapshot at revision R, then a watch from R+1 that survives
//! anything etcd does to it (docs/compatibility.md, "Watching leases", with its
//! deliberate differences).
//!
//! A broken stream is reopened from the revision after the last applied event, with
//! backoff; a compacted revision forces a fresh listing that the tracker diffs into
//! events. Nothing here ever gives up while someone listens: the consumer keeps the
//! last known set and keeps serving.

use std::time::Duration;

use etcd_client::{Event, EventType, WatchClient, WatchOptions, WatchStream};
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, LeaseKey, LeaseTracker, LeaseUpdate};
use tokio::sync::{mpsc, watch};

use super::acquire::{decode_kv, list, Listing};
use super::keys::KeyLayout;
use super::ops::{Ops, REQUEST_TIMEOUT};
use super::retry::{Backoff, DistinctErrors};
use super::WatchHealth;
use crate::{OwnLeaseEvent, StoreError};

/// One etcd watch that can be reopened where it left off.
pub(crate) struct Resumable {
    client: WatchClient,
    key: String,
    prefix: bool,
    /// The first revision not yet applied: where a reopened stream starts.
    next_rev: i64,
    stream: Option<WatchStream>,
}

/// What one read from a watch gave.
pub(crate) enum Step {
    /// The events of one response (possibly none: stream created, progress notice)
    /// and the revision to resume from once they are applied.
    Events {
        events: Vec<Event>,
        resume: Option<i64>,
    },
    /// The start revision is no longer in etcd's history.
    Compacted { compact_revision: i64 },
    /// The stream failed or ended; it will be reopened by the next call.
    Broken(String),
}

impl Resumable {
    pub fn new(client: WatchClient, key: String, prefix: bool, start: i64) -> Self {
        Resumable {
            client,
            key,
            prefix,
            next_rev: start,
            stream: None,
        }
    }

    /// Reads the next response, opening the stream first if needed.
    pub async fn next(&mut self) -> Step {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let mut opts = WatchOptions::new()
                    .with_start_revision(self.next_rev)
                    .with_progress_notify();
                if self.prefix {
                    opts = opts.with_prefix();
                }
                let open = self.client.watch(self.key.clone(), Some(opts));
                match tokio::time::timeout(REQUEST_TIMEOUT, open).await {
                    Ok(Ok(s)) => self.stream.insert(s),
                    Ok(Err(e)) => {
                        return Step::Broken(format!("cannot watch {}: {e}", self.key));
                    }
                    Err(_) => {
                        return Step::Broken(format!(
                            "cannot watch {}: no answer within {} s",
                            self.key,
                            REQUEST_TIMEOUT.as_secs()
                        ));
                    }
                }
            }
        };
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.compact_revision() != 0 {
                    self.stream = None;
                    return Step::Compacted {
                        compact_revision: resp.compact_revision(),
                    };
                }
                if resp.canceled() {
                    self.stream = None;
                    return Step::Broken(format!(
                        "etcd cancelled the watch on {}: {}",
                        self.key,
                        resp.cancel_reason()
                    ));
                }
                let events = resp.events().to_vec();
                // Resume after the last event delivered. A response without events
                // that is not the creation notice is a progress notice, which etcd
                // sends only to watchers that have seen everything up to its header
                // revision. (The header of an event response is not a safe resume
                // point: a catching-up watcher may get fewer revisions than it names.)
                let resume = match events.last().and_then(|e| e.kv()) {
                    Some(kv) => Some(after(kv.mod_revision())),
                    None if !resp.created() => resp.header().map(|h| after(h.revision())),
                    None => None,
                };
                Step::Events { events, resume }
            }
            Ok(None) => {
                self.stream = None;
                Step::Broken(format!("etcd closed the watch stream on {}", self.key))
            }
            Err(e) => {
                self.stream = None;
                Step::Broken(format!("watch stream on {}: {e}", self.key))
            }
        }
    }

    /// Marks everything before `rev` as applied.
    pub fn commit(&mut self, rev: i64) {
        self.next_rev = self.next_rev.max(rev);
    }

    /// Drops the stream so the next read reopens it from the last commit.
    pub fn reset(&mut self) {
        self.stream = None;
    }
}

/// Sleeps for `d` unless the receiver goes away first; true when it did.
async fn sleep_or_closed<T>(tx: &mpsc::Sender<T>, d: Duration) -> bool {
    tokio::select! {
        _ = tx.closed() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

fn set_health(health: &watch::Sender<WatchHealth>, h: WatchHealth) {
    health.send_if_modified(|cur| {
        if *cur == h {
            false
        } else {
            *cur = h;
            true
        }
    });
}

/// One decoded change from a watch response.
enum Change {
    Put(LeaseKey, LeaseAttrs),
    Delete(LeaseKey),
}

/// Turns the events of one response into tracker changes. Every event is applied
/// (upstream applies only the first of a response); unusable ones are logged with
/// their key and skipped.
///
/// A peer's expiry is not looked up (one TimeToLive round trip per event): no
/// backend needs it, and renewals (same attributes) cause no lease event anyway.
fn apply(keys: &KeyLayout, tracker: &mut LeaseTracker, events: &[Event]) -> Vec<LeaseEvent> {
    let mut changes = Vec::with_capacity(events.len());
    for ev in events {
        let Some(kv) = ev.kv() else { continue };
        match ev.event_type() {
            EventType::Put => match decode_kv(keys, kv) {
                Ok((key, attrs)) => changes.push(Change::Put(key, attrs)),
                Err(e) => {
                    tracing::warn!("skipping an unusable lease update from etcd: {e}");
                    // A lease overwritten with garbage is no longer usable; a fresh
                    // listing would not contain it either.
                    if let Ok(key) = keys.parse_lease_key(kv.key()) {
                        changes.push(Change::Delete(key));
                    }
                }
            },
            EventType::Delete => match keys.parse_lease_key(kv.key()) {
                Ok(key) => changes.push(Change::Delete(key)),
                Err(e) => tracing::debug!("ignoring the deletion of a non-lease key: {e}"),
            },
        }
    }
    let mut out = Vec::new();
    for c in changes {
        match c {
            Change::Put(key, attrs) => out.extend(tracker.put(Lease {
                key,
                attrs,
                expiration: None,
            })),
            Change::Delete(key) => out.extend(tracker.delete(&key)),
        }
    }
    out
}

/// The lease watch (see [`crate::LeaseStore::watch_leases`]).
pub(crate) async fn watch_leases(
    ops: &Ops,
    watch_client: &WatchClient,
    keys: &KeyLayout,
    health: &watch::Sender<WatchHealth>,
    own: LeaseKey,
    mut primed: Option<Listing>,
    tx: mpsc::Sender<LeaseUpdate>,
) -> Result<(), StoreError> {
    let mut tracker = LeaseTracker::new(Some(own));
    let mut errors = DistinctErrors::new("etcd lease watch");
    let mut backoff = Backoff::new();
    let mut sent_full = false;
    let mut current: Option<Resumable> = None;
    loop {
        let w = match current.as_mut() {
            Some(w) => w,
            None => {
                let listed = match primed.take() {
                    Some(l) => Ok(l),
                    None => tokio::select! {
                        _ = tx.closed() => return Ok(()),
                        r = list(ops, keys) => r,
                    },
                };
                let listing = match listed {
                    Ok(l) => l,
                    Err(e) => {
                        let e = format!("listing leases: {e}");
                        errors.warn(&e);
                        set_health(health, WatchHealth::Reconnecting { error: e });
                        if sleep_or_closed(&tx, backoff.next_delay()).await {
                            return Ok(());
                        }
                        continue;
                    }
                };
                let leases = listing.leases.into_iter().map(|l| l.lease);
                let update = if sent_full {
                    let events = tracker.snapshot(leases);
                    (!events.is_empty()).then_some(LeaseUpdate::Events(events))
                } else {
                    tracker.snapshot(leases);
                    Some(LeaseUpdate::Full(tracker.leases().cloned().collect()))
                };
                if let Some(u) = update {
                    if tx.send(u).await.is_err() {
                        return Ok(());
                    }
                }
                sent_full = true;
                tracing::debug!(
                    revision = listing.revision,
                    leases = tracker.len(),
                    "lease listing applied; watching from the next revision"
                );
                current.insert(Resumable::new(
                    watch_client.clone(),
                    keys.subnets_prefix.clone(),
                    true,
                    after(listing.revision),
                ))
            }
        };
        let step = tokio::select! {
            _ = tx.closed() => return Ok(()),
            s = w.next() => s,
        };
        match step {
            Step::Events { events, resume } => {
                let batch = apply(keys, &mut tracker, &events);
                if let Some(r) = resume {
                    w.commit(r);
                }
                backoff.reset();
                errors.recovered();
                set_health(health, WatchHealth::Watching);
                if !batch.is_empty() && tx.send(LeaseUpdate::Events(batch)).await.is_err() {
                    return Ok(());
                }
            }
            Step::Compacted { compact_revision } => {
                tracing::info!(
                    "etcd compacted the lease history (to revision {compact_revision}) before \
                     this watch read it; listing all leases again"
                );
                current = None;
            }
            Step::Broken(e) => {
                errors.warn(&e);
                set_health(health, WatchHealth::Reconnecting { error: e });
                if sleep_or_closed(&tx, backoff.next_delay()).await {
                    return Ok(());
                }
            }
        }
    }
}

/// This host's lease as a PUT of its key left it.
async fn renewed(ops: &Ops, own: &Lease, kv: &etcd_client::KeyValue) -> Result<Lease, StoreError> {
    let attrs = match std::str::from_utf8(kv.value())
        .map_err(|e| e.to_string())
        .and_then(|v| LeaseAttrs::decode(v).map_err(|e| e.to_string()))
    {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(
                "this host's lease key {} holds an unusable value ({e}); keeping our attributes",
                String::from_utf8_lossy(kv.key())
            );
            own.attrs.clone()
        }
    };
    let expiration = match kv.lease() {
        0 => None,
        id => Some(ops.expiry(id).await?),
    };
    Ok(Lease {
        key: own.key,
        attrs,
        expiration,
    })
}

/// The own-lease watch (see [`crate::LeaseStore::watch_own_lease`]).
pub(crate) async fn watch_own_lease(
    ops: &Ops,
    watch_client: &WatchClient,
    keys: &KeyLayout,
    own: &Lease,
    tx: mpsc::Sender<OwnLeaseEvent>,
) -> Result<(), StoreError> {
    let etcd_key = keys.lease_key(&own.key);
    let mut errors = DistinctErrors::new("etcd own-lease watch");
    let mut backoff = Backoff::new();
    let mut last_mod: Option<i64> = None;
    let mut current: Option<Resumable> = None;
    loop {
        let w = match current.as_mut() {
            Some(w) => w,
            None => {
                let got = tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    r = ops.get(&etcd_key, false, REQUEST_TIMEOUT) => r,
                };
                let resp = match got {
                    Ok(r) => r,
                    Err(e) => {
                        errors.warn(&e.to_string());
                        if sleep_or_closed(&tx, backoff.next_delay()).await {
                            return Ok(());
                        }
                        continue;
                    }
                };
                let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                let Some(kv) = resp.kvs().first() else {
                    tracing::warn!("this host's lease key {etcd_key} is gone from etcd");
                    let _ = tx.send(OwnLeaseEvent::Revoked).await;
                    return Ok(());
                };
                // The first read reports the lease as it is (a renewal may have
                // happened between acquisition and this watch); after a compaction,
                // a write we could not see as an event is reported the same way.
                if last_mod != Some(kv.mod_revision()) {
                    match renewed(ops, own, kv).await {
                        Ok(l) => {
                            if tx.send(OwnLeaseEvent::Renewed(l)).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(e) => {
                            errors.warn(&e.to_string());
                            if sleep_or_closed(&tx, backoff.next_delay()).await {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
                last_mod = Some(kv.mod_revision());
                current.insert(Resumable::new(
                    watch_client.clone(),
                    etcd_key.clone(),
                    false,
                    after(revision),
                ))
            }
        };
        let step = tokio::select! {
            _ = tx.closed() => return Ok(()),
            s = w.next() => s,
        };
        match step {
            Step::Events { events, resume } => {
                let mut failed = None;
                for ev in &events {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Delete => {
                            tracing::warn!(
                                "this host's lease key {etcd_key} was deleted or expired"
                            );
                            let _ = tx.send(OwnLeaseEvent::Revoked).await;
                            return Ok(());
                        }
                        EventType::Put => match renewed(ops, own, kv).await {
                            Ok(l) => {
                                last_mod = Some(kv.mod_revision());
                                if tx.send(OwnLeaseEvent::Renewed(l)).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        },
                    }
                }
                match failed {
                    None => {
                        if let Some(r) = resume {
                            w.commit(r);
                        }
                        backoff.reset();
                        errors.recovered();
                    }
                    Some(e) => {
                        w.reset();
                        errors.warn(&e.to_string());
                        if sleep_or_closed(&tx, backoff.next_delay()).await {
                            return Ok(());
                        }
                    }
                }
            }
            Step::Compacted { .. } => current = None,
            Step::Broken(e) => {
                errors.warn(&e);
                if sleep_or_closed(&tx, backoff.next_delay()).await {
                    return Ok(());
                }
            }
        }
    }
}
/// The revision to resume a watch from, after `rev` was seen. Saturating: a hostile
/// or broken server announcing `i64::MAX` must not make the agent panic or wrap to a
/// negative revision (which etcd reads as "from the start").
fn after(rev: i64) -> i64 {
    rev.saturating_add(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::after;

    #[test]
    fn resume_revisions_saturate() {
        assert_eq!(after(41), 42);
        assert_eq!(after(i64::MAX), i64::MAX, "no wrap to a negative revision");
        assert_eq!(after(-7), 1, "a nonsense revision resumes from the first");
    }
}
