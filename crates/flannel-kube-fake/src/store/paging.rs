//! LIST with resource versions and continue tokens, and the start of a WATCH.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::selectors::{selected_event, Selectors};
use super::validation::{node_name, parse_rv};
use super::{EventKind, FakeError, Shared, Store, WatchMsg};

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

impl Shared {
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
