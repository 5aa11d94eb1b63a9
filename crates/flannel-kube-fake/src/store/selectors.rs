//! Field and label selectors, and what a selecting watch sees of a change.

use serde_json::{json, Value};

use super::{EventKind, FakeError, LogEntry};

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
