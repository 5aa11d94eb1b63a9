//! The three patch formats the API server accepts for JSON bodies.
//!
//! Strategic merge needs to know, per list field, whether the list is merged (and by
//! which key) or replaced; the real server reads that from Go struct tags. Only the
//! fields of the objects this fake serves (Node, Pod metadata) are listed here; every
//! other list is replaced, which is also what the real server does for untagged lists.

use serde_json::{Map, Value};

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{0}")]
    Invalid(String),
}

/// How a list field is patched under strategic merge.
enum ListStrategy {
    Replace,
    /// Objects merged by the value of this key (`patchMergeKey`).
    MergeByKey(&'static str),
    /// A set of scalars (`patchStrategy:"merge"` on a `[]string`).
    MergePrimitives,
}

/// The strategic-merge tags of Node and Pod list fields (k8s.io/api core/v1).
fn list_strategy(path: &str) -> ListStrategy {
    match path {
        "metadata.finalizers" | "spec.podCIDRs" => ListStrategy::MergePrimitives,
        "metadata.ownerReferences" => ListStrategy::MergeByKey("uid"),
        "status.conditions" | "status.addresses" => ListStrategy::MergeByKey("type"),
        _ => ListStrategy::Replace,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(p) = patch else {
        return patch.clone();
    };
    let mut out = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    for (k, v) in p {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = merge_patch(out.get(k).unwrap_or(&Value::Null), v);
            out.insert(k.clone(), merged);
        }
    }
    Value::Object(out)
}

/// Kubernetes strategic merge patch of `patch` onto `target`.
pub fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    match smp_object(target, patch, "")? {
        Some(v) => Ok(v),
        None => Err(PatchError::Invalid(
            "a $patch: delete directive at the top level is not allowed".into(),
        )),
    }
}

/// Returns `None` when the patch deletes the object (`$patch: delete`).
fn smp_object(target: &Value, patch: &Value, path: &str) -> Result<Option<Value>, PatchError> {
    let Value::Object(p) = patch else {
        return Ok(Some(patch.clone()));
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut replaced = p.clone();
            replaced.remove("$patch");
            return Ok(Some(Value::Object(replaced)));
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::Invalid(format!(
                "unknown patch type {other:?} at {path:?}"
            )))
        }
    }
    let mut out = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    let mut retain: Option<Vec<String>> = None;
    for (k, v) in p {
        if k == "$patch" || k.starts_with("$setElementOrder/") {
            // Ordering hints only; the merged order is kept as it is.
            continue;
        }
        if k == "$retainKeys" {
            let keys = v
                .as_array()
                .ok_or_else(|| PatchError::Invalid("$retainKeys must be a list".into()))?;
            retain = Some(
                keys.iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect(),
            );
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = v.as_array().ok_or_else(|| {
                PatchError::Invalid(format!("{k} must be a list of values to delete"))
            })?;
            if let Some(Value::Array(items)) = out.get_mut(field) {
                items.retain(|i| !gone.contains(i));
            }
            continue;
        }
        if k.starts_with('$') {
            return Err(PatchError::Invalid(format!(
                "unknown patch directive {k:?}"
            )));
        }
        let field_path = join(path, k);
        if v.is_null() {
            out.remove(k);
            continue;
        }
        let current = out.get(k).cloned().unwrap_or(Value::Null);
        let merged = match v {
            Value::Object(_) => smp_object(&current, v, &field_path)?,
            Value::Array(items) => Some(smp_list(&current, items, &field_path)?),
            _ => Some(v.clone()),
        };
        match merged {
            Some(m) => {
                out.insert(k.clone(), m);
            }
            None => {
                out.remove(k);
            }
        }
    }
    if let Some(keep) = retain {
        out.retain(|k, _| keep.iter().any(|r| r == k));
    }
    Ok(Some(Value::Object(out)))
}

fn smp_list(current: &Value, patch: &[Value], path: &str) -> Result<Value, PatchError> {
    match list_strategy(path) {
        ListStrategy::Replace => Ok(Value::Array(patch.to_vec())),
        ListStrategy::MergePrimitives => {
            let mut out: Vec<Value> = current.as_array().cloned().unwrap_or_default();
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(Value::Array(out))
        }
        ListStrategy::MergeByKey(key) => {
            let mut out: Vec<Value> = current.as_array().cloned().unwrap_or_default();
            if patch
                .iter()
                .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
            {
                // `{"$patch":"replace"}` as a list element replaces the whole list.
                return Ok(Value::Array(
                    patch
                        .iter()
                        .filter(|e| e.get("$patch").is_none())
                        .cloned()
                        .collect(),
                ));
            }
            for elem in patch {
                let Some(kv) = elem.get(key) else {
                    return Err(PatchError::Invalid(format!(
                        "map: {elem} does not contain declared merge key: {key}"
                    )));
                };
                let pos = out.iter().position(|e| e.get(key) == Some(kv));
                match (
                    pos,
                    smp_object(pos.map_or(&Value::Null, |i| &out[i]), elem, path)?,
                ) {
                    (Some(i), Some(m)) => out[i] = m,
                    (Some(i), None) => {
                        out.remove(i);
                    }
                    (None, Some(m)) => out.push(m),
                    (None, None) => {}
                }
            }
            Ok(Value::Array(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_merge_by_type_and_annotations_merge() {
        let node = json!({
            "metadata": {"name": "n1", "annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
            ]}
        });
        let patch = json!({
            "metadata": {"annotations": {"b": null, "c": "3"}},
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}
            ]}
        });
        let out = strategic_merge(&node, &patch).unwrap();
        assert_eq!(out["metadata"]["annotations"], json!({"a": "1", "c": "3"}));
        let conds = out["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 2);
        assert_eq!(conds[0]["type"], "Ready");
        assert_eq!(conds[1]["status"], "False");
        assert_eq!(conds[1]["reason"], "FlannelIsUp");
    }

    #[test]
    fn merge_patch_replaces_lists() {
        let node = json!({"status": {"conditions": [{"type": "Ready"}, {"type": "X"}]}});
        let out = merge_patch(&node, &json!({"status": {"conditions": [{"type": "Y"}]}}));
        assert_eq!(out["status"]["conditions"], json!([{"type": "Y"}]));
    }

    #[test]
    fn merge_key_missing_is_an_error_and_delete_directive_works() {
        let node = json!({"status": {"conditions": [{"type": "Ready"}, {"type": "X"}]}});
        assert!(strategic_merge(
            &node,
            &json!({"status": {"conditions": [{"status": "True"}]}})
        )
        .is_err());
        let out = strategic_merge(
            &node,
            &json!({"status": {"conditions": [{"type": "X", "$patch": "delete"}]}}),
        )
        .unwrap();
        assert_eq!(out["status"]["conditions"], json!([{"type": "Ready"}]));
        let out = strategic_merge(
            &json!({"spec": {"podCIDRs": ["a"]}}),
            &json!({"spec": {"podCIDRs": ["b", "a"]}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["podCIDRs"], json!(["a", "b"]));
    }
}
