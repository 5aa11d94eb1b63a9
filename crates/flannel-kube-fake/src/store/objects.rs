//! Node and pod writes and reads.

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};

use super::validation::{
    comparable, is_dns_subdomain, node_name, normalize_node, normalize_pod, now, patch_sets_rv,
    set_meta,
};
use super::{EventKind, FakeError, Shared, Store};
use crate::patch;

impl Shared {
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
        s.stamp_new(&mut v);
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
        let old = s.stored_node(name)?;
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
        let old = s.stored_node(name)?;
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
        let mut old = s
            .nodes
            .remove(name)
            .ok_or_else(|| not_found("nodes", name))?;
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
        self.lock().stored_node(name)
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
        set_meta(&mut v, "namespace", json!(ns));
        s.stamp_new(&mut v);
        s.pods.insert((ns.to_string(), name), v.clone());
        self.persist(&s);
        Ok(v)
    }

    pub fn pod_value(&self, ns: &str, name: &str) -> Result<Value, FakeError> {
        self.lock()
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| not_found("pods", name))
    }

    pub fn delete_pod_value(&self, ns: &str, name: &str) -> Result<Value, FakeError> {
        let mut s = self.lock();
        let v = s
            .pods
            .remove(&(ns.to_string(), name.to_string()))
            .ok_or_else(|| not_found("pods", name))?;
        s.rv += 1;
        self.persist(&s);
        Ok(v)
    }
}

fn not_found(kind: &'static str, name: &str) -> FakeError {
    FakeError::NotFound {
        kind,
        name: name.to_string(),
    }
}

impl Store {
    /// The stored node `name`, or 404.
    fn stored_node(&self, name: &str) -> Result<Value, FakeError> {
        self.nodes
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("nodes", name))
    }

    /// Gives a new object its uid, creation time and the current resource version.
    fn stamp_new(&mut self, v: &mut Value) {
        self.uid_seq += 1;
        set_meta(
            v,
            "uid",
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uid_seq)),
        );
        set_meta(v, "creationTimestamp", now());
        set_meta(v, "resourceVersion", json!(self.rv.to_string()));
    }
}

impl Shared {
    /// Names of all nodes, in order.
    pub fn node_names(&self) -> Vec<String> {
        self.lock().nodes.keys().cloned().collect()
    }

    /// Adds `count` realistic annotated nodes named `<name_prefix>00000`...
    pub fn populate(
        &self,
        count: usize,
        name_prefix: &str,
        ann_prefix: &str,
    ) -> Result<(), FakeError> {
        use crate::population::{from_template, node_name, realistic_node};
        if count == 0 {
            return Ok(());
        }
        let now = crate::now_rfc3339();
        // One node goes through the full create path (decoded, checked, normalised
        // like any client's); the rest are that stored node with their own fields.
        let first = node_name(name_prefix, 0);
        let template = self.create_node_value(realistic_node(&first, 0, ann_prefix, &now, &now))?;
        let mut s = self.lock();
        for i in 1..count {
            let name = node_name(name_prefix, i);
            if s.nodes.contains_key(&name) {
                return Err(FakeError::AlreadyExists {
                    kind: "nodes",
                    name,
                });
            }
            let mut v = from_template(&template, &name, i, ann_prefix);
            s.rv += 1;
            s.stamp_new(&mut v);
            s.nodes.insert(name, v.clone());
            self.emit(&mut s, EventKind::Added, v, None);
        }
        Ok(())
    }

    /// A kubelet's periodic status update of node `name` (heartbeat times move, so
    /// the resource version bumps and watches get a MODIFIED event); false when the
    /// node is gone or has no kubelet conditions.
    pub fn heartbeat_node(&self, name: &str, now: &str) -> bool {
        let mut s = self.lock();
        let Some(old) = s.nodes.get(name).cloned() else {
            return false;
        };
        let mut new = old.clone();
        if !crate::population::heartbeat(&mut new, now) || new == old {
            return false;
        }
        s.rv += 1;
        set_meta(&mut new, "resourceVersion", json!(s.rv.to_string()));
        s.nodes.insert(name.to_string(), new.clone());
        self.emit(&mut s, EventKind::Modified, new, Some(old));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeOptions;

    /// The stored nodes without what the server stamps per create.
    fn stored(s: &Shared) -> Vec<Value> {
        s.lock()
            .nodes
            .values()
            .map(|v| {
                let mut v = v.clone();
                if let Some(m) = v["metadata"].as_object_mut() {
                    for k in ["uid", "creationTimestamp", "resourceVersion"] {
                        m.remove(k);
                    }
                }
                v
            })
            .collect()
    }

    #[test]
    fn populate_stores_what_creating_each_node_would() {
        let fast = Shared::new(FakeOptions::default()).unwrap();
        let slow = Shared::new(FakeOptions::default()).unwrap();
        let p = "flannel.alpha.coreos.com";
        fast.populate(300, "node-", p).unwrap();
        // Both paths read the clock; a second boundary between them would differ.
        let now = fast.lock().nodes["node-00000"]["status"]["conditions"][1]["lastHeartbeatTime"]
            .as_str()
            .unwrap()
            .to_string();
        for i in 0..300 {
            let name = crate::population::node_name("node-", i);
            let v = crate::population::realistic_node(&name, i, p, &now, &now);
            slow.create_node_value(v).unwrap();
        }
        assert_eq!(stored(&fast), stored(&slow));
        assert_eq!(fast.lock().rv, slow.lock().rv);
        assert!(matches!(
            fast.populate(1, "node-", p),
            Err(FakeError::AlreadyExists { .. })
        ));
    }
}
