//! The fake server's objects, resource versions, watch history and RBAC denials.
//! Everything here is synchronous and guarded by one mutex; the HTTP layer only
//! translates requests into these calls.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::patch;
use crate::FakeOptions;

/// Why a request failed; maps onto the Kubernetes `Status` the server returns.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FakeError {
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{message}")]
    Invalid {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{message}")]
    Forbidden {
        kind: &'static str,
        name: Option<String>,
        message: String,
    },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Io(String),
}

impl FakeError {
    pub fn code(&self) -> u16 {
        match self {
            FakeError::NotFound { .. } => 404,
            FakeError::AlreadyExists { .. } | FakeError::Conflict(_) => 409,
            FakeError::BadRequest(_) => 400,
            FakeError::Invalid { .. } => 422,
            FakeError::Gone(_) => 410,
            FakeError::Forbidden { .. } => 403,
            FakeError::UnsupportedMediaType(_) => 415,
            FakeError::Timeout(_) => 504,
            FakeError::Io(_) => 500,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            FakeError::NotFound { .. } => "NotFound",
            FakeError::AlreadyExists { .. } => "AlreadyExists",
            FakeError::Conflict(_) => "Conflict",
            FakeError::BadRequest(_) => "BadRequest",
            FakeError::Invalid { .. } => "Invalid",
            FakeError::Gone(_) => "Expired",
            FakeError::Forbidden { .. } => "Forbidden",
            FakeError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            FakeError::Timeout(_) => "Timeout",
            FakeError::Io(_) => "InternalError",
        }
    }

    /// The `Status` object the real server sends for this error.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
        });
        let details = match self {
            FakeError::NotFound { kind, name }
            | FakeError::AlreadyExists { kind, name }
            | FakeError::Invalid { kind, name, .. } => Some(json!({"name": name, "kind": kind})),
            FakeError::Forbidden { kind, name, .. } => Some(match name {
                Some(n) => json!({"name": n, "kind": kind}),
                None => json!({"kind": kind}),
            }),
            _ => None,
        };
        if let Some(d) = details {
            s["details"] = d;
        }
        s["code"] = json!(self.code());
        s
    }
}

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
    events: broadcast::Sender<WatchMsg>,
    watches: AtomicUsize,
}

/// A field or label selector (the subset of the real grammar flannel-like clients use:
/// comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`).
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

impl Selectors {
    pub fn parse(field: Option<&str>, label: Option<&str>) -> Result<Self, FakeError> {
        let mut s = Selectors::default();
        for term in field.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(FakeError::BadRequest(format!(
                    "invalid field selector: {term:?}: expected an operator"
                )));
            };
            if !matches!(k, "metadata.name" | "spec.unschedulable") {
                return Err(FakeError::BadRequest(format!(
                    "field label not supported: {k}"
                )));
            }
            s.fields.push((k.to_string(), eq, v.to_string()));
        }
        for term in label.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let term = term.trim();
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(FakeError::BadRequest(format!(
                    "this fake API server does not implement set-based label selectors: {term:?}"
                )));
            }
            let req = if let Some((k, v)) = term.split_once("!=") {
                LabelReq::Ne(k.into(), v.into())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.into(), v.into())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.into(), v.into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.into())
            } else {
                LabelReq::Exists(term.into())
            };
            s.labels.push(req);
        }
        Ok(s)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let field_ok = self.fields.iter().all(|(k, eq, v)| {
            let actual = match k.as_str() {
                "metadata.name" => obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
                _ => obj["spec"]["unschedulable"]
                    .as_bool()
                    .unwrap_or(false)
                    .to_string(),
            };
            (actual == *v) == *eq
        });
        let labels = &obj["metadata"]["labels"];
        let label_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => labels[k].as_str() == Some(v),
            LabelReq::Ne(k, v) => labels[k].as_str() != Some(v),
            LabelReq::Exists(k) => labels.get(k).is_some(),
            LabelReq::NotExists(k) => labels.get(k).is_none(),
        });
        field_ok && label_ok
    }
}

/// Query parameters of a LIST.
#[derive(Debug, Default)]
pub struct ListParams {
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub selectors: Selectors,
}

/// What a new watch starts with.
pub struct WatchStart {
    /// Events (full WatchEvent JSON) to send before live ones.
    pub initial: Vec<Value>,
    /// Close the stream after `initial` (an ERROR was sent).
    pub end: bool,
    pub rx: broadcast::Receiver<WatchMsg>,
    pub last_rv: u64,
}

fn parse_rv(s: &str) -> Result<u64, FakeError> {
    s.parse::<u64>()
        .map_err(|_| FakeError::BadRequest(format!("invalid resource version: {s:?}")))
}

fn now() -> Value {
    // Whole seconds, as the API server stores metav1.Time.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match k8s_openapi::jiff::Timestamp::from_second(secs) {
        Ok(t) => serde_json::to_value(Time(t)).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// A DNS-1123 subdomain (object names, annotation key prefixes).
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A qualified name as annotation and label keys must be (`[prefix/]name`).
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return false;
    }
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Decodes through the typed object as the real server does (unknown fields dropped,
/// wrong types refused), then checks names and annotation keys.
fn normalize_node(v: Value) -> Result<Value, FakeError> {
    let node: Node = serde_json::from_value(v)
        .map_err(|e| FakeError::BadRequest(format!("error decoding Node: {e}")))?;
    let name = node.metadata.name.clone().unwrap_or_default();
    if !is_dns_subdomain(&name) {
        return Err(FakeError::Invalid {
            kind: "Node",
            name: name.clone(),
            message: format!(
                "Node {name:?} is invalid: metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
            ),
        });
    }
    for key in node.metadata.annotations.iter().flat_map(|a| a.keys()) {
        if !is_qualified_name(key) {
            return Err(FakeError::Invalid {
                kind: "Node",
                name: name.clone(),
                message: format!(
                    "Node {name:?} is invalid: metadata.annotations: Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                ),
            });
        }
    }
    serde_json::to_value(node).map_err(|e| FakeError::Io(e.to_string()))
}

fn normalize_pod(v: Value) -> Result<Value, FakeError> {
    let pod: Pod = serde_json::from_value(v)
        .map_err(|e| FakeError::BadRequest(format!("error decoding Pod: {e}")))?;
    serde_json::to_value(pod).map_err(|e| FakeError::Io(e.to_string()))
}

fn node_name(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or("").to_string()
}

fn set_meta(v: &mut Value, key: &str, value: Value) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(key.to_string(), value);
    } else if let Some(o) = v.as_object_mut() {
        let mut m = Map::new();
        m.insert(key.to_string(), value);
        o.insert("metadata".into(), Value::Object(m));
    }
}

/// The object without the fields the server manages, for "did anything change".
fn comparable(v: &Value) -> Value {
    let mut c = v.clone();
    if let Some(m) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    c
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

    pub fn create_node(&self, node: Node) -> Result<Node, FakeError> {
        let v = serde_json::to_value(node).map_err(|e| FakeError::Io(e.to_string()))?;
        let v = self.create_node_value(v)?;
        serde_json::from_value(v).map_err(|e| FakeError::Io(e.to_string()))
    }

    pub fn create_node_value(&self, v: Value) -> Result<Value, FakeError> {
        let mut v = normalize_node(v)?;
        let name = node_name(&v);
        let mut s = self.lock();
        if s.nodes.contains_key(&name) {
            return Err(FakeError::AlreadyExists {
                kind: "nodes",
                name,
            });
        }
        s.rv += 1;
        s.uid_seq += 1;
        set_meta(
            &mut v,
            "uid",
            json!(format!("00000000-0000-4000-8000-{:012x}", s.uid_seq)),
        );
        set_meta(&mut v, "creationTimestamp", now());
        set_meta(&mut v, "resourceVersion", json!(s.rv.to_string()));
        s.nodes.insert(name, v.clone());
        self.emit(&mut s, EventKind::Added, v.clone(), None);
        Ok(v)
    }

    pub fn replace_node(&self, node: Node) -> Result<Node, FakeError> {
        let v = serde_json::to_value(node).map_err(|e| FakeError::Io(e.to_string()))?;
        let name = node_name(&v);
        let v = self.update_node_value(&name, v, false)?;
        serde_json::from_value(v).map_err(|e| FakeError::Io(e.to_string()))
    }

    /// A PUT (or the result of a PATCH). With `precondition`, a `resourceVersion` in
    /// the new object must match the stored one.
    pub fn update_node_value(
        &self,
        name: &str,
        new: Value,
        precondition: bool,
    ) -> Result<Value, FakeError> {
        let mut s = self.lock();
        let old = s
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| FakeError::NotFound {
                kind: "nodes",
                name: name.to_string(),
            })?;
        self.write_node(&mut s, name, old, new, precondition)
    }

    fn write_node(
        &self,
        s: &mut Store,
        name: &str,
        old: Value,
        new: Value,
        precondition: bool,
    ) -> Result<Value, FakeError> {
        if node_name(&new) != name {
            return Err(FakeError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                node_name(&new)
            )));
        }
        if precondition {
            if let Some(want) = new["metadata"]["resourceVersion"].as_str() {
                if want != old["metadata"]["resourceVersion"].as_str().unwrap_or("") {
                    return Err(FakeError::Conflict(format!(
                        "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    )));
                }
            }
        }
        let mut new = normalize_node(new)?;
        for k in ["uid", "creationTimestamp"] {
            set_meta(&mut new, k, old["metadata"][k].clone());
        }
        if comparable(&new) == comparable(&old) {
            // The real server skips no-op writes: same resource version, no event.
            return Ok(old);
        }
        s.rv += 1;
        set_meta(&mut new, "resourceVersion", json!(s.rv.to_string()));
        s.nodes.insert(name.to_string(), new.clone());
        self.emit(s, EventKind::Modified, new.clone(), Some(old));
        Ok(new)
    }

    /// PATCH of `nodes/<name>` or (with `status`) `nodes/<name>/status`.
    pub fn patch_node(
        &self,
        name: &str,
        status: bool,
        content_type: &str,
        body: &[u8],
    ) -> Result<Value, FakeError> {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let kind = match media.as_str() {
            "application/strategic-merge-patch+json" => 0,
            "application/merge-patch+json" => 1,
            "application/json-patch+json" => 2,
            _ => {
                return Err(FakeError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
                )))
            }
        };
        let patch: Value = serde_json::from_slice(body)
            .map_err(|e| FakeError::BadRequest(format!("error decoding patch: {e}")))?;
        let mut s = self.lock();
        let old = s
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| FakeError::NotFound {
                kind: "nodes",
                name: name.to_string(),
            })?;
        let mut new = match kind {
            0 => {
                if !patch.is_object() {
                    return Err(FakeError::BadRequest(
                        "error decoding patch: a strategic merge patch must be a JSON object"
                            .into(),
                    ));
                }
                patch::strategic_merge(&old, &patch).map_err(|e| FakeError::Invalid {
                    kind: "Node",
                    name: name.to_string(),
                    message: e.to_string(),
                })?
            }
            1 => {
                if !patch.is_object() {
                    return Err(FakeError::BadRequest(
                        "error decoding patch: a merge patch must be a JSON object".into(),
                    ));
                }
                patch::merge_patch(&old, &patch)
            }
            _ => {
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| FakeError::BadRequest(format!("error decoding patch: {e}")))?;
                let mut doc = old.clone();
                json_patch::patch(&mut doc, &ops).map_err(|e| FakeError::Invalid {
                    kind: "Node",
                    name: name.to_string(),
                    message: format!(
                        "the server rejected our request due to an error in our request: {e}"
                    ),
                })?;
                doc
            }
        };
        // The status subresource keeps the stored spec; the main resource keeps the
        // stored status (node registry strategies).
        let keep = if status { "spec" } else { "status" };
        if let Some(o) = new.as_object_mut() {
            match old.get(keep) {
                Some(v) => o.insert(keep.to_string(), v.clone()),
                None => o.remove(keep),
            };
        }
        let precondition = patch_sets_rv(&new, &old);
        self.write_node(&mut s, name, old, new, precondition)
    }

    pub fn delete_node(&self, name: &str) -> Result<Node, FakeError> {
        let v = self.delete_node_value(name)?;
        serde_json::from_value(v).map_err(|e| FakeError::Io(e.to_string()))
    }

    pub fn delete_node_value(&self, name: &str) -> Result<Value, FakeError> {
        let mut s = self.lock();
        let mut old = s.nodes.remove(name).ok_or_else(|| FakeError::NotFound {
            kind: "nodes",
            name: name.to_string(),
        })?;
        s.rv += 1;
        let prev = old.clone();
        set_meta(&mut old, "resourceVersion", json!(s.rv.to_string()));
        self.emit(&mut s, EventKind::Deleted, old.clone(), Some(prev));
        Ok(old)
    }

    pub fn node(&self, name: &str) -> Option<Node> {
        let v = self.lock().nodes.get(name).cloned()?;
        serde_json::from_value(v).ok()
    }

    pub fn node_value(&self, name: &str) -> Result<Value, FakeError> {
        self.lock()
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| FakeError::NotFound {
                kind: "nodes",
                name: name.to_string(),
            })
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.lock()
            .nodes
            .values()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    pub fn create_pod(&self, pod: Pod) -> Result<Pod, FakeError> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let v = serde_json::to_value(pod).map_err(|e| FakeError::Io(e.to_string()))?;
        let v = self.create_pod_value(&ns, v)?;
        serde_json::from_value(v).map_err(|e| FakeError::Io(e.to_string()))
    }

    pub fn create_pod_value(&self, ns: &str, v: Value) -> Result<Value, FakeError> {
        let mut v = normalize_pod(v)?;
        let name = node_name(&v);
        if !is_dns_subdomain(&name) {
            return Err(FakeError::Invalid {
                kind: "Pod",
                name: name.clone(),
                message: format!("Pod {name:?} is invalid: metadata.name"),
            });
        }
        let mut s = self.lock();
        if s.pods.contains_key(&(ns.to_string(), name.clone())) {
            return Err(FakeError::AlreadyExists { kind: "pods", name });
        }
        s.rv += 1;
        s.uid_seq += 1;
        set_meta(&mut v, "namespace", json!(ns));
        set_meta(
            &mut v,
            "uid",
            json!(format!("00000000-0000-4000-8000-{:012x}", s.uid_seq)),
        );
        set_meta(&mut v, "creationTimestamp", now());
        set_meta(&mut v, "resourceVersion", json!(s.rv.to_string()));
        s.pods.insert((ns.to_string(), name), v.clone());
        self.persist(&s);
        Ok(v)
    }

    pub fn pod_value(&self, ns: &str, name: &str) -> Result<Value, FakeError> {
        self.lock()
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| FakeError::NotFound {
                kind: "pods",
                name: name.to_string(),
            })
    }

    pub fn delete_pod_value(&self, ns: &str, name: &str) -> Result<Value, FakeError> {
        let mut s = self.lock();
        let v = s
            .pods
            .remove(&(ns.to_string(), name.to_string()))
            .ok_or_else(|| FakeError::NotFound {
                kind: "pods",
                name: name.to_string(),
            })?;
        s.rv += 1;
        self.persist(&s);
        Ok(v)
    }

    /// The nodes as they were at resource version `rv` (from the watch history).
    fn nodes_at(&self, s: &Store, rv: u64) -> Result<BTreeMap<String, Value>, FakeError> {
        if rv < s.compacted {
            return Err(FakeError::Gone(format!(
                "too old resource version: {rv} ({})",
                s.compacted
            )));
        }
        let mut nodes = s.nodes.clone();
        for e in s.log.iter().rev().take_while(|e| e.rv > rv) {
            let name = node_name(&e.obj);
            match (&e.kind, &e.prev) {
                (EventKind::Added, _) | (_, None) => {
                    nodes.remove(&name);
                }
                (_, Some(prev)) => {
                    nodes.insert(name, prev.clone());
                }
            }
        }
        Ok(nodes)
    }

    /// LIST nodes: a `NodeList`.
    pub fn list_nodes(&self, p: &ListParams) -> Result<Value, FakeError> {
        let mut s = self.lock();
        if let Some(token) = p.continue_token.as_deref().filter(|t| !t.is_empty()) {
            let (rv, rest) = s.continues.remove(token).ok_or_else(|| {
                FakeError::Gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                )
            })?;
            return Ok(self.page(&mut s, rv, rest, p.limit));
        }
        let requested = p
            .resource_version
            .as_deref()
            .filter(|r| !r.is_empty())
            .map(parse_rv)
            .transpose()?;
        let exact = p.resource_version_match.as_deref() == Some("Exact");
        if let Some(m) = p.resource_version_match.as_deref() {
            if !matches!(m, "Exact" | "NotOlderThan") {
                return Err(FakeError::BadRequest(format!(
                    "resourceVersionMatch: Unsupported value: {m:?}"
                )));
            }
            if requested.is_none() {
                return Err(FakeError::BadRequest(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
                ));
            }
        }
        let (rv, nodes) = match requested {
            Some(r) if r > s.rv => {
                return Err(FakeError::Timeout(format!(
                    "Too large resource version: {r}, current: {}",
                    s.rv
                )))
            }
            Some(r) if exact => (r, self.nodes_at(&s, r)?),
            _ => (s.rv, s.nodes.clone()),
        };
        let items: Vec<Value> = nodes
            .into_values()
            .filter(|n| p.selectors.matches(n))
            .collect();
        // resourceVersion=0 is served from the cache, which ignores the limit.
        let limit = if requested == Some(0) { None } else { p.limit };
        Ok(self.page(&mut s, rv, items, limit))
    }

    fn page(&self, s: &mut Store, rv: u64, mut items: Vec<Value>, limit: Option<usize>) -> Value {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if let Some(limit) = limit.filter(|l| *l > 0 && *l < items.len()) {
            let rest = items.split_off(limit);
            s.cont_seq += 1;
            let token = format!("c{}-{rv}", s.cont_seq);
            meta["continue"] = json!(token);
            meta["remainingItemCount"] = json!(rest.len());
            s.continues.insert(token, (rv, rest));
        }
        // Items of a typed list carry no apiVersion/kind.
        for i in &mut items {
            if let Some(o) = i.as_object_mut() {
                o.remove("apiVersion");
                o.remove("kind");
            }
        }
        json!({"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": items})
    }

    /// Starts a node watch from `resource_version`.
    pub fn watch_nodes(
        &self,
        resource_version: Option<&str>,
        selectors: &Selectors,
    ) -> Result<WatchStart, FakeError> {
        let requested = resource_version
            .filter(|r| !r.is_empty())
            .map(parse_rv)
            .transpose()?;
        let s = self.lock();
        let rx = self.events.subscribe();
        let mut initial = Vec::new();
        let mut end = false;
        match requested {
            None | Some(0) => {
                for n in s.nodes.values().filter(|n| selectors.matches(n)) {
                    initial.push(json!({"type": "ADDED", "object": n}));
                }
            }
            Some(r) if r < s.compacted => {
                let e = FakeError::Gone(format!("too old resource version: {r} ({})", s.compacted));
                initial.push(json!({"type": "ERROR", "object": e.status()}));
                end = true;
            }
            Some(r) if r > s.rv => {
                let e = FakeError::Timeout(format!(
                    "Too large resource version: {r}, current: {}",
                    s.rv
                ));
                initial.push(json!({"type": "ERROR", "object": e.status()}));
                end = true;
            }
            Some(r) => {
                for e in s.log.iter().filter(|e| e.rv > r) {
                    if let Some(ev) = selected_event(e, selectors) {
                        initial.push(ev);
                    }
                }
            }
        }
        Ok(WatchStart {
            initial,
            end,
            rx,
            last_rv: s.rv,
        })
    }

    pub fn compact(&self) {
        let mut s = self.lock();
        // Watching from the current version stays valid: nothing after it is lost.
        s.compacted = s.rv;
        s.log.clear();
        s.continues.clear();
    }

    pub fn close_watches(&self) {
        let _ = self.events.send(WatchMsg::Close);
    }

    pub fn expire_watches(&self) {
        self.compact();
        let _ = self.events.send(WatchMsg::Expire);
    }

    pub fn compacted_rv(&self) -> u64 {
        self.lock().compacted
    }

    pub fn watch_opened(&self) {
        self.watches.fetch_add(1, Ordering::SeqCst);
    }

    pub fn watch_closed(&self) {
        self.watches.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn open_watches(&self) -> usize {
        self.watches.load(Ordering::SeqCst)
    }
}

/// A patch that names a resourceVersion different from... itself is a precondition:
/// the merged object keeps the patch's value only if the patch set one.
fn patch_sets_rv(new: &Value, old: &Value) -> bool {
    new["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"]
}

/// The event a watch with `selectors` sees for `e`: objects moving into the
/// selection arrive as ADDED, out of it as DELETED.
pub fn selected_event(e: &LogEntry, selectors: &Selectors) -> Option<Value> {
    let now = selectors.matches(&e.obj);
    let before = e.prev.as_ref().is_some_and(|p| selectors.matches(p));
    let kind = match (e.kind, before, now) {
        (EventKind::Deleted, true, _) => "DELETED",
        (EventKind::Deleted, false, _) => return None,
        (EventKind::Added, _, true) => "ADDED",
        (EventKind::Modified, true, true) => "MODIFIED",
        (EventKind::Modified, false, true) => "ADDED",
        (EventKind::Modified, true, false) => "DELETED",
        _ => return None,
    };
    Some(json!({"type": kind, "object": e.obj}))
}
