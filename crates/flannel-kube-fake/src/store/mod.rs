//! The fake server's objects, resource versions, watch history and RBAC denials.
//! Everything here is synchronous and guarded by one mutex; the HTTP layer only
//! translates requests into these calls.

mod errors;
mod objects;
mod paging;
mod selectors;
mod validation;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::FakeOptions;

pub use errors::FakeError;
pub use paging::{ListParams, WatchStart};
pub use selectors::{selected_event, Selectors};

/// One served API request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// The request's Content-Type (patch format), empty when absent.
    pub content_type: String,
    pub status: u16,
}

/// What the server sent one API client: requests by verb, response body bytes
/// (watch streams included, as they are sent) and watch events.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub requests: BTreeMap<String, u64>,
    pub bytes: u64,
    pub watch_events: u64,
}

#[derive(Debug, Default)]
pub struct ClientCounters {
    requests: Mutex<BTreeMap<String, u64>>,
    bytes: AtomicU64,
    watch_events: AtomicU64,
}

impl ClientCounters {
    pub fn request(&self, verb: &str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(verb.to_string())
            .or_default() += 1;
    }
    pub fn sent(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn watch_event(&self) {
        self.watch_events.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> Traffic {
        Traffic {
            requests: self
                .requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            bytes: self.bytes.load(Ordering::Relaxed),
            watch_events: self.watch_events.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// A node change kept for watches.
#[derive(Debug)]
pub struct LogEntry {
    pub rv: u64,
    pub kind: EventKind,
    pub obj: Value,
    /// The object before the change (`None` for ADDED).
    pub prev: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum WatchMsg {
    Event(Arc<LogEntry>),
    Expire,
    Close,
}

struct Store {
    rv: u64,
    /// Watch history before this resource version is gone.
    compacted: u64,
    uid_seq: u64,
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    log: VecDeque<Arc<LogEntry>>,
    deny: BTreeSet<(String, String)>,
    continues: HashMap<String, (u64, Vec<Value>)>,
    cont_seq: u64,
    requests: Vec<RequestRecord>,
}

pub struct Shared {
    pub(crate) opts: FakeOptions,
    store: Mutex<Store>,
    traffic: Mutex<BTreeMap<IpAddr, Arc<ClientCounters>>>,
    events: broadcast::Sender<WatchMsg>,
    watches: AtomicUsize,
}

impl Shared {
    pub fn new(opts: FakeOptions) -> Result<Self, FakeError> {
        let (events, _) = broadcast::channel(4096);
        let shared = Shared {
            opts,
            store: Mutex::new(Store {
                rv: 1,
                compacted: 1,
                uid_seq: 0,
                nodes: BTreeMap::new(),
                pods: BTreeMap::new(),
                log: VecDeque::new(),
                deny: BTreeSet::new(),
                continues: HashMap::new(),
                cont_seq: 0,
                requests: Vec::new(),
            }),
            events,
            watches: AtomicUsize::new(0),
            traffic: Mutex::new(BTreeMap::new()),
        };
        shared.load()?;
        Ok(shared)
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every write is a
        // single insert), so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self) -> Result<(), FakeError> {
        let Some(path) = &self.opts.state_file else {
            return Ok(());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(FakeError::Io(format!("reading {}: {e}", path.display()))),
        };
        let state: Value = serde_json::from_str(&text)
            .map_err(|e| FakeError::BadRequest(format!("state file {}: {e}", path.display())))?;
        for n in state["nodes"].as_array().cloned().unwrap_or_default() {
            let node: Node = serde_json::from_value(n)
                .map_err(|e| FakeError::BadRequest(format!("state file node: {e}")))?;
            self.create_node(node)?;
        }
        for p in state["pods"].as_array().cloned().unwrap_or_default() {
            let pod: Pod = serde_json::from_value(p)
                .map_err(|e| FakeError::BadRequest(format!("state file pod: {e}")))?;
            self.create_pod(pod)?;
        }
        Ok(())
    }

    fn persist(&self, s: &Store) {
        let Some(path) = &self.opts.state_file else {
            return;
        };
        let state = json!({
            "nodes": s.nodes.values().collect::<Vec<_>>(),
            "pods": s.pods.values().collect::<Vec<_>>(),
        });
        let tmp = path.with_extension("tmp");
        let res = std::fs::write(&tmp, state.to_string()).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::warn!("saving fake API state to {}: {e}", path.display());
        }
    }

    pub fn record(&self, r: RequestRecord) {
        let mut s = self.lock();
        if s.requests.len() >= 100_000 {
            s.requests.drain(..50_000);
        }
        s.requests.push(r);
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// The counters of API client `ip` (created on first use).
    pub fn client(&self, ip: IpAddr) -> Arc<ClientCounters> {
        self.traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ip)
            .or_default()
            .clone()
    }

    /// What each API client got so far, by address.
    pub fn traffic(&self) -> BTreeMap<IpAddr, Traffic> {
        self.traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(ip, c)| (*ip, c.snapshot()))
            .collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    pub fn deny(&self, verb: &str, resource: &str) {
        self.lock()
            .deny
            .insert((verb.to_string(), resource.to_string()));
    }

    pub fn allow_all(&self) {
        self.lock().deny.clear();
    }

    /// 403 unless `verb` on `resource` is allowed.
    pub fn authorize(
        &self,
        verb: &str,
        resource: &str,
        name: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<(), FakeError> {
        if !self
            .lock()
            .deny
            .contains(&(verb.to_string(), resource.to_string()))
        {
            return Ok(());
        }
        let base: &'static str = if resource.starts_with("pods") {
            "pods"
        } else {
            "nodes"
        };
        let subject = match name {
            Some(n) => format!("{base} \"{n}\""),
            None => base.to_string(),
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        Err(FakeError::Forbidden {
            kind: base,
            name: name.map(String::from),
            message: format!(
                "{subject} is forbidden: User \"{}\" cannot {verb} resource \"{resource}\" in API group \"\" {scope}",
                self.opts.user
            ),
        })
    }

    /// Appends a node change to the history and tells the open watches.
    fn emit(&self, s: &mut Store, kind: EventKind, obj: Value, prev: Option<Value>) {
        let entry = Arc::new(LogEntry {
            rv: s.rv,
            kind,
            obj,
            prev,
        });
        s.log.push_back(entry.clone());
        while s.log.len() > self.opts.history.max(1) {
            if let Some(old) = s.log.pop_front() {
                s.compacted = old.rv;
            }
        }
        let _ = self.events.send(WatchMsg::Event(entry));
        self.persist(s);
    }
}
