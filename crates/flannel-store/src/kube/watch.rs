//! One list + watch of all nodes, turned into lease updates.
//!
//! The watch resumes from the last resource version it saw (objects and bookmarks),
//! so a closed connection costs one request and no re-list. Only a 410 Gone (the
//! version is too old) makes it list again; the list is diffed against what is known,
//! so nothing is lost and nothing is repeated. Failures back off from 0.5 s to 30 s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flannel_core::{LeaseEvent, LeaseKey, LeaseTracker, LeaseUpdate};
use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use tokio::sync::mpsc;

use super::lite::{LiteSpec, NodeLite};
use super::node::{is_managed, node_to_lease};
use super::{api_error, describe, KubeError, KubeStore, OwnNode, LIST_NODES, WATCH_NODES};

/// Nodes per list page. A realistic Node is about 13 KB of JSON and each page's body
/// is collected whole before it is decoded, so the page size sets the start's peak
/// heap: at 5000 nodes 23.4 MB with 500 per page (what client-go's reflector asks
/// for), 13.6 MB with 100 (heaptrack), which matters under kube-flannel's 50 MiB
/// memory limit. It costs 4 more round trips per 500 nodes at start, nothing after.
const PAGE_SIZE: u32 = 100;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A watch connection silent for longer than its server-side timeout plus this is
/// taken as dead.
const IDLE_MARGIN: Duration = Duration::from_secs(60);

/// Logs each distinct failure once, so a lasting outage does not flood the log.
#[derive(Default)]
struct Quiet(Option<String>);

impl Quiet {
    fn warn(&mut self, msg: String) {
        if self.0.as_deref() != Some(msg.as_str()) {
            tracing::warn!("{msg}");
            self.0 = Some(msg);
        }
    }
    fn clear(&mut self) {
        self.0 = None;
    }
}

struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_MIN)
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// The leases known from nodes, by node name, and the tracker that turns node
/// changes into lease events.
///
/// Two nodes can publish the same podCIDR (a misconfigured or hostile node). The
/// tracker is keyed by lease key, so each key has one owner node, the first seen;
/// the other node is refused with a warning and waits. Deleting either node then
/// touches only its own claim: the owner's routes stay while it lives, and when it
/// goes the waiting node takes the key over (a change of public IP, not a removal).
struct State<'a> {
    store: &'a KubeStore,
    own_key: LeaseKey,
    tracker: LeaseTracker,
    /// Every node's usable lease.
    claims: HashMap<String, flannel_core::Lease>,
    /// The node whose lease is routed, per key.
    owner: HashMap<LeaseKey, String>,
    skipped: HashMap<String, String>,
    /// A digest of what flannel read of each node last time: a status heartbeat
    /// (every node every 10 s in many clusters) leaves it unchanged and is dropped
    /// here, before any conversion.
    views: HashMap<String, ViewDigest>,
}

/// A node list folded in as its pages arrive, keeping of each node only what
/// [`State::snapshot`] needs: the decoded nodes of one page are alive at a time,
/// not all N of them (about 1.5 KB each), whose holes in the heap outlived them:
/// `flannel-lab bench-kube --nodes 5000` took the agent's anonymous memory from
/// 17.0 to 14.8 MB (two runs each).
struct Listing {
    claims: HashMap<String, flannel_core::Lease>,
    views: HashMap<String, ViewDigest>,
    own_present: bool,
}

impl Listing {
    /// Sized for `nodes` (the count known from the last list), so the maps do not
    /// grow by doubling through a 5000-node list.
    fn sized(nodes: usize) -> Self {
        Listing {
            claims: HashMap::with_capacity(nodes),
            views: HashMap::with_capacity(nodes),
            own_present: false,
        }
    }
}

/// A 64-bit digest of a [`View`]. Keeping digests instead of the views saves about
/// 1.5 KB per node (the annotation strings and their map) at the cost of a 2^-64
/// chance per update that a real change looks unchanged (and waits for the next
/// list); SipHash with fixed keys keeps it stable for the process's life.
type ViewDigest = u64;

fn digest(view: &View) -> ViewDigest {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    view.hash(&mut h);
    h.finish()
}

/// The flannel annotations and the spec of a node.
type View = (
    Option<std::collections::BTreeMap<String, String>>,
    Option<LiteSpec>,
);

fn view_of(node: &mut NodeLite) -> View {
    (node.metadata.annotations.take(), node.spec.take())
}

fn with_view(name: &str, view: View) -> NodeLite {
    let mut n = NodeLite::default();
    n.metadata.name = Some(name.to_string());
    n.metadata.annotations = view.0;
    n.spec = view.1;
    n
}

impl State<'_> {
    fn is_own(&self, name: &str) -> bool {
        name == self.store.node_name
    }

    /// The lease a node publishes, if it is an annotated flannel node with usable
    /// data (a skipped node is logged once per distinct reason).
    fn lease_of(&mut self, node: &NodeLite) -> Option<flannel_core::Lease> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if !is_managed(node, &self.store.ann) {
            self.skipped.remove(&name);
            return None;
        }
        let c = &self.store.config;
        match node_to_lease(node, &self.store.ann, c.enable_ipv4, c.enable_ipv6) {
            Ok(l) if l.key == self.own_key => None,
            Ok(l) => {
                self.skipped.remove(&name);
                Some(l)
            }
            Err(reason) => {
                if self.skipped.get(&name) != Some(&reason) {
                    tracing::warn!("ignoring node {name}: {reason}");
                    self.skipped.insert(name, reason);
                }
                None
            }
        }
    }

    fn own_seen(&self, present: bool) {
        let s = if present {
            OwnNode::Present
        } else {
            OwnNode::Deleted
        };
        self.store.own.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s;
            changed
        });
    }

    fn warn_conflict(&self, name: &str, key: &LeaseKey) {
        if let Some(owner) = self.owner.get(key) {
            tracing::warn!(
                "ignoring node {name}: it publishes pod CIDR {key}, which node {owner} \
                 already has; it is used if that node goes away"
            );
        }
    }

    /// The owner of `key` after `name` no longer claims it: a waiting node (by name
    /// order), or none.
    fn successor(&self, key: &LeaseKey, name: &str) -> Option<String> {
        let mut waiting: Vec<&String> = self
            .claims
            .iter()
            .filter(|(n, l)| n.as_str() != name && l.key == *key)
            .map(|(n, _)| n)
            .collect();
        waiting.sort();
        waiting.first().map(|n| n.to_string())
    }

    /// `name` no longer claims `key` (its claim is already gone from `claims`).
    fn release(&mut self, name: &str, key: LeaseKey) -> Vec<LeaseEvent> {
        if self.owner.get(&key).map(String::as_str) != Some(name) {
            return Vec::new();
        }
        match self.successor(&key, name) {
            Some(next) => {
                tracing::info!("node {next} takes over pod CIDR {key} from node {name}");
                let lease = self.claims[&next].clone();
                self.owner.insert(key, next);
                self.tracker.put(lease).into_iter().collect()
            }
            None => {
                self.owner.remove(&key);
                self.tracker.delete(&key).into_iter().collect()
            }
        }
    }

    /// `name` now claims `lease` (already recorded in `claims`).
    fn claim(&mut self, name: &str, lease: flannel_core::Lease) -> Vec<LeaseEvent> {
        match self.owner.get(&lease.key) {
            Some(o) if o != name => {
                self.warn_conflict(name, &lease.key);
                Vec::new()
            }
            _ => {
                self.owner.insert(lease.key, name.to_string());
                self.tracker.put(lease).into_iter().collect()
            }
        }
    }

    /// Folds one listed node into `listing`.
    fn list_one(&mut self, listing: &mut Listing, mut n: NodeLite) {
        let name = n.metadata.name.clone().unwrap_or_default();
        if self.is_own(&name) {
            listing.own_present = true;
        } else if let Some(l) = self.lease_of(&n) {
            listing.claims.insert(name.clone(), l);
        }
        listing.views.insert(name, digest(&view_of(&mut n)));
    }

    /// A complete node list: the events that bring the known set to it.
    fn snapshot(&mut self, listing: Listing) -> Vec<LeaseEvent> {
        let Listing {
            claims,
            views,
            own_present,
        } = listing;
        self.skipped.retain(|name, _| views.contains_key(name));
        self.views = views;
        // An owner that still claims its key keeps it; other keys go to the first
        // claimer by name.
        let mut owner: HashMap<LeaseKey, String> = self
            .owner
            .drain()
            .filter(|(k, n)| claims.get(n).is_some_and(|l| l.key == *k))
            .collect();
        let mut names: Vec<&String> = claims.keys().collect();
        names.sort();
        for name in names {
            let key = claims[name].key;
            owner.entry(key).or_insert_with(|| name.clone());
        }
        self.claims = claims;
        self.owner = owner;
        for (name, l) in &self.claims {
            if self.owner.get(&l.key) != Some(name) {
                self.warn_conflict(name, &l.key);
            }
        }
        self.own_seen(own_present);
        let routed: Vec<flannel_core::Lease> = self
            .owner
            .values()
            .map(|n| self.claims[n].clone())
            .collect();
        self.tracker.snapshot(routed)
    }

    fn applied(&mut self, mut node: NodeLite) -> Vec<LeaseEvent> {
        let name = node.metadata.name.take().unwrap_or_default();
        let view = view_of(&mut node);
        let d = digest(&view);
        if self.views.get(&name) == Some(&d) {
            return Vec::new();
        }
        self.views.insert(name.clone(), d);
        if self.is_own(&name) {
            self.own_seen(true);
            return Vec::new();
        }
        let mut events = Vec::new();
        let lease = self.lease_of(&with_view(&name, view));
        let old = self.claims.get(&name).map(|l| l.key);
        match (old, lease) {
            (Some(k), Some(l)) if k == l.key => {
                self.claims.insert(name.clone(), l.clone());
                if self.owner.get(&k) == Some(&name) {
                    events.extend(self.tracker.put(l));
                }
            }
            (old, Some(l)) => {
                self.claims.insert(name.clone(), l.clone());
                if let Some(k) = old {
                    events.extend(self.release(&name, k));
                }
                events.extend(self.claim(&name, l));
            }
            (Some(k), None) => {
                self.claims.remove(&name);
                events.extend(self.release(&name, k));
            }
            (None, None) => {}
        }
        events
    }

    fn deleted(&mut self, node: &NodeLite) -> Vec<LeaseEvent> {
        let name = node.metadata.name.clone().unwrap_or_default();
        self.views.remove(&name);
        if self.is_own(&name) {
            self.own_seen(false);
            return Vec::new();
        }
        self.skipped.remove(&name);
        match self.claims.remove(&name) {
            Some(l) => self.release(&name, l.key),
            None => Vec::new(),
        }
    }
}

impl KubeStore {
    /// Lists all nodes (following continue tokens), handing each to `each` as its
    /// page arrives; returns how many there were and the list's resource version.
    async fn list_nodes(
        &self,
        mut each: impl FnMut(NodeLite),
    ) -> Result<(usize, String), kube::Error> {
        let mut count = 0;
        let mut token: Option<String> = None;
        let mut version = None;
        loop {
            let mut lp = ListParams::default().limit(PAGE_SIZE);
            if let Some(t) = token.take() {
                lp = lp.continue_token(&t);
            }
            let page = self.nodes.list(&lp).await?;
            count += page.items.len();
            page.items.into_iter().for_each(&mut each);
            if version.is_none() {
                version = page.metadata.resource_version.filter(|v| !v.is_empty());
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => token = Some(c),
                None => return Ok((count, version.unwrap_or_default())),
            }
        }
    }
}

enum WatchEnd {
    /// The receiver went away.
    Closed,
    /// The resource version expired: list again.
    Gone,
    /// The connection ended or failed: watch again from the last version.
    Resume { failed: bool },
}

pub(crate) async fn run(
    store: &KubeStore,
    own: LeaseKey,
    tx: mpsc::Sender<LeaseUpdate>,
) -> Result<(), KubeError> {
    let mut state = State {
        store,
        own_key: own,
        tracker: LeaseTracker::new(None),
        claims: HashMap::new(),
        owner: HashMap::new(),
        skipped: HashMap::new(),
        views: HashMap::new(),
    };
    let started = Instant::now();
    let mut synced = false;
    let mut backoff = Backoff::new();
    let mut quiet = Quiet::default();
    loop {
        // List (first time, or after 410 Gone).
        let mut listing = Listing::sized(state.views.len());
        let listed = tokio::select! {
            _ = tx.closed() => return Ok(()),
            r = store.list_nodes(|n| state.list_one(&mut listing, n)) => r,
        };
        let (count, mut version) = match listed {
            Ok((_, v)) if v.is_empty() => {
                quiet.warn("node list without a resourceVersion; listing again".into());
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
            Ok(x) => x,
            Err(e) => {
                let err = api_error(LIST_NODES, "listing nodes", e);
                if !synced
                    && !store.opts.continue_when_cache_not_ready
                    && started.elapsed() >= store.opts.cache_sync_timeout
                {
                    return Err(KubeError::CacheSyncTimeout {
                        timeout: store.opts.cache_sync_timeout,
                        last: err.to_string(),
                    });
                }
                quiet.warn(err.to_string());
                tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    _ = tokio::time::sleep(backoff.next()) => {}
                }
                continue;
            }
        };
        quiet.clear();
        backoff.reset();
        let events = state.snapshot(listing);
        let update = if synced {
            tracing::info!("re-listed {count} nodes at resourceVersion {version}");
            (!events.is_empty()).then_some(LeaseUpdate::Events(events))
        } else {
            synced = true;
            tracing::info!(
                "listed {count} nodes ({} flannel leases) at resourceVersion {version}",
                state.tracker.len()
            );
            Some(LeaseUpdate::Full(state.tracker.leases().cloned().collect()))
        };
        if let Some(u) = update {
            if tx.send(u).await.is_err() {
                return Ok(());
            }
        }
        // Watch, resuming from the last version seen, until it expires.
        loop {
            match watch_once(&mut state, &mut version, &tx, &mut quiet).await {
                WatchEnd::Closed => return Ok(()),
                WatchEnd::Gone => {
                    tracing::info!(
                        "node watch at resourceVersion {version} expired (410 Gone); listing again"
                    );
                    break;
                }
                WatchEnd::Resume { failed: false } => backoff.reset(),
                WatchEnd::Resume { failed: true } => {
                    tokio::select! {
                        _ = tx.closed() => return Ok(()),
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                }
            }
        }
    }
}

async fn watch_once(
    state: &mut State<'_>,
    version: &mut String,
    tx: &mpsc::Sender<LeaseUpdate>,
    quiet: &mut Quiet,
) -> WatchEnd {
    let store = state.store;
    let timeout = store.opts.watch_timeout.as_secs().clamp(1, 290) as u32;
    // Bookmarks are on by default in WatchParams.
    let wp = WatchParams::default().timeout(timeout);
    let opened = tokio::select! {
        _ = tx.closed() => return WatchEnd::Closed,
        r = store.nodes.watch(&wp, version) => r,
    };
    let stream = match opened {
        Ok(s) => s,
        Err(kube::Error::Api(s)) if s.code == 410 => return WatchEnd::Gone,
        Err(e) => {
            quiet.warn(api_error(WATCH_NODES, "watching nodes", e).to_string());
            return WatchEnd::Resume { failed: true };
        }
    };
    let idle = Duration::from_secs(u64::from(timeout)) + IDLE_MARGIN;
    let opened_at = Instant::now();
    let mut received = false;
    futures::pin_mut!(stream);
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return WatchEnd::Closed,
            n = tokio::time::timeout(idle, stream.next()) => n,
        };
        let item = match next {
            Err(_) => {
                quiet.warn(format!("node watch silent for {idle:?}; reconnecting"));
                return WatchEnd::Resume { failed: true };
            }
            // A watch the server ends at once, over and over, must not spin.
            Ok(None) => {
                return WatchEnd::Resume {
                    failed: !received && opened_at.elapsed() < Duration::from_secs(1),
                }
            }
            Ok(Some(item)) => item,
        };
        let events = match item {
            Ok(WatchEvent::Added(n)) | Ok(WatchEvent::Modified(n)) => {
                received = true;
                quiet.clear();
                if let Some(v) = n.metadata.resource_version.clone() {
                    *version = v;
                }
                state.applied(n)
            }
            Ok(WatchEvent::Deleted(n)) => {
                received = true;
                if let Some(v) = n.metadata.resource_version.clone() {
                    *version = v;
                }
                state.deleted(&n)
            }
            Ok(WatchEvent::Bookmark(b)) => {
                received = true;
                *version = b.metadata.resource_version;
                continue;
            }
            Ok(WatchEvent::Error(s)) if s.code == 410 => return WatchEnd::Gone,
            Ok(WatchEvent::Error(s)) => {
                quiet.warn(format!(
                    "node watch error {} {}: {}",
                    s.code, s.reason, s.message
                ));
                return WatchEnd::Resume { failed: true };
            }
            Err(e) => {
                quiet.warn(format!("node watch: {}", describe(&e)));
                return WatchEnd::Resume { failed: true };
            }
        };
        if !events.is_empty() && tx.send(LeaseUpdate::Events(events)).await.is_err() {
            return WatchEnd::Closed;
        }
    }
}
