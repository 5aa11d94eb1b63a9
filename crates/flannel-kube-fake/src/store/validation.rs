//! What the real server checks and fills in on a write: typed decoding, object
//! names, annotation keys, server-managed metadata.

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Map, Value};

use super::FakeError;

pub(super) fn parse_rv(s: &str) -> Result<u64, FakeError> {
    s.parse::<u64>()
        .map_err(|_| FakeError::BadRequest(format!("invalid resource version: {s:?}")))
}

pub(super) fn now() -> Value {
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
pub(super) fn is_dns_subdomain(s: &str) -> bool {
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
pub(super) fn is_qualified_name(key: &str) -> bool {
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
pub(super) fn normalize_node(v: Value) -> Result<Value, FakeError> {
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

pub(super) fn normalize_pod(v: Value) -> Result<Value, FakeError> {
    let pod: Pod = serde_json::from_value(v)
        .map_err(|e| FakeError::BadRequest(format!("error decoding Pod: {e}")))?;
    serde_json::to_value(pod).map_err(|e| FakeError::Io(e.to_string()))
}

pub(super) fn node_name(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or("").to_string()
}

pub(super) fn set_meta(v: &mut Value, key: &str, value: Value) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(key.to_string(), value);
    } else if let Some(o) = v.as_object_mut() {
        let mut m = Map::new();
        m.insert(key.to_string(), value);
        o.insert("metadata".into(), Value::Object(m));
    }
}

/// The object without the fields the server manages, for "did anything change".
pub(super) fn comparable(v: &Value) -> Value {
    let mut c = v.clone();
    if let Some(m) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    c
}

/// A patch that names a resourceVersion different from... itself is a precondition:
/// the merged object keeps the patch's value only if the patch set one.
pub(super) fn patch_sets_rv(new: &Value, old: &Value) -> bool {
    new["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"]
}
