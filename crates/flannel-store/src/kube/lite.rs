//! The part of a Node the lease watch reads, decoded straight from the API server's
//! JSON.
//!
//! A real Node is 10-20 KB of JSON (status with ~50 images, conditions, node info,
//! managed fields) and kubelets rewrite the status of every node every 10 s when
//! node leases are off; every rewrite reaches every agent's watch. The typed
//! `k8s_openapi` Node allocates every one of those fields (strings, maps, a JSON
//! tree per managed-fields entry) for each event; this type keeps the name, the
//! resource version, the annotations flannel can read and the pod CIDRs, and lets
//! serde skip the rest of the text without allocating. Annotations whose key does
//! not end in a flannel annotation name are skipped too (their values may be large:
//! `kubectl.kubernetes.io/last-applied-configuration`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The annotation names (after `<prefix>/`) flannel reads on other nodes or its own.
const FLANNEL_NAMES: &[&str] = &[
    "backend-data",
    "backend-v6-data",
    "backend-type",
    "kube-subnet-manager",
    "public-ip",
    "public-ipv6",
    "public-ip-overwrite",
    "public-ipv6-overwrite",
    "node-public-ip",
    "node-public-ipv6",
];

fn wanted(key: &str) -> bool {
    key.rsplit_once('/')
        .is_some_and(|(_, name)| FLANNEL_NAMES.contains(&name))
}

/// A node as the lease watch sees it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NodeLite {
    /// Only name, resourceVersion, uid and the flannel annotations are filled in
    /// (a full ObjectMeta because the client's `Resource` trait hands one out).
    #[serde(default, deserialize_with = "lite_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<LiteSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
pub struct LiteSpec {
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct LiteMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    annotations: Option<FlannelAnnotations>,
}

fn lite_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Option::<LiteMeta>::deserialize(d)?.unwrap_or(LiteMeta {
        name: None,
        resource_version: None,
        uid: None,
        annotations: None,
    });
    Ok(ObjectMeta {
        name: m.name,
        resource_version: m.resource_version,
        uid: m.uid,
        annotations: m.annotations.map(|a| a.0),
        ..Default::default()
    })
}

/// The annotations whose name flannel knows; the others are skipped unallocated.
struct FlannelAnnotations(BTreeMap<String, String>);

/// An annotation key: kept only if flannel may read it.
struct Key(Option<String>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an annotation key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(Key(wanted(s).then(|| s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for FlannelAnnotations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FlannelAnnotations;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of annotations")
            }
            fn visit_unit<E: de::Error>(self) -> Result<FlannelAnnotations, E> {
                Ok(FlannelAnnotations(BTreeMap::new()))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<FlannelAnnotations, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(Key(k)) = m.next_key::<Key>()? {
                    match k {
                        Some(k) => {
                            // As the typed Node: a non-string value is an error.
                            out.insert(k, m.next_value::<String>()?);
                        }
                        None => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(FlannelAnnotations(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl kube::Resource for NodeLite {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The part of a Pod flanneld reads: which node its own pod runs on
/// (`--kube-subnet-mgr` without `NODE_NAME`). A Pod's typed decoder is large, and
/// this is the one field of one request.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodLite {
    #[serde(default, deserialize_with = "lite_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpecLite>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PodSpecLite {
    #[serde(default, rename = "nodeName")]
    pub node_name: Option<String>,
}

impl kube::Resource for PodLite {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the node conversions read of a node, from either type.
pub trait NodeFields {
    fn annotation(&self, key: &str) -> Option<&str>;
    fn pod_cidr(&self) -> Option<&str>;
    fn pod_cidrs(&self) -> Option<&[String]>;
}

impl NodeFields for Node {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
    fn pod_cidr(&self) -> Option<&str> {
        self.spec.as_ref()?.pod_cidr.as_deref()
    }
    fn pod_cidrs(&self) -> Option<&[String]> {
        self.spec.as_ref()?.pod_cidrs.as_deref()
    }
}

impl NodeFields for NodeLite {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
    fn pod_cidr(&self) -> Option<&str> {
        self.spec.as_ref()?.pod_cidr.as_deref()
    }
    fn pod_cidrs(&self) -> Option<&[String]> {
        self.spec.as_ref()?.pod_cidrs.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = r#"{
        "metadata": {
            "name": "n1", "uid": "u-1", "resourceVersion": "42",
            "labels": {"kubernetes.io/hostname": "n1"},
            "annotations": {
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:ff\"}",
                "flannel.alpha.coreos.com/public-ip": "192.168.1.11",
                "example.com/x/public-ip": "9.9.9.9",
                "kubectl.kubernetes.io/last-applied-configuration": "{\"big\":true}",
                "node.alpha.kubernetes.io/ttl": "0"
            },
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
        },
        "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"], "providerID": "x"},
        "status": {"images": [{"names": ["a"], "sizeBytes": 1}], "conditions": []}
    }"#;

    #[test]
    fn pod_lite_reads_the_node_name_and_skips_the_rest() {
        let text = r#"{"apiVersion":"v1","kind":"Pod",
            "metadata":{"name":"kube-flannel-ds-x","namespace":"kube-flannel","uid":"u",
                        "resourceVersion":"9","labels":{"app":"flannel"},
                        "ownerReferences":[{"kind":"DaemonSet","name":"kube-flannel-ds"}]},
            "spec":{"containers":[{"name":"kube-flannel","image":"x","args":["--ip-masq"],
                     "resources":{"requests":{"cpu":"100m"}}}],
                    "nodeName":"node-7","hostNetwork":true,"tolerations":[{"operator":"Exists"}]},
            "status":{"phase":"Running","podIP":"198.18.0.7"}}"#;
        let p: PodLite = serde_json::from_str(text).unwrap();
        assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("node-7"));
        assert_eq!(p.metadata.name.as_deref(), Some("kube-flannel-ds-x"));
        let unscheduled: PodLite = serde_json::from_str(r#"{"metadata":{},"spec":{}}"#).unwrap();
        assert_eq!(unscheduled.spec.unwrap().node_name, None);
        assert_eq!(
            <PodLite as kube::Resource>::url_path(&(), Some("kube-flannel")),
            "/api/v1/namespaces/kube-flannel/pods"
        );
    }

    #[test]
    fn keeps_what_flannel_reads_only() {
        let n: NodeLite = serde_json::from_str(NODE).unwrap();
        assert_eq!(n.metadata.name.as_deref(), Some("n1"));
        assert_eq!(n.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(n.metadata.uid.as_deref(), Some("u-1"));
        let a = n.metadata.annotations.as_ref().unwrap();
        let keys: Vec<&str> = a.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "example.com/x/public-ip",
                "flannel.alpha.coreos.com/backend-data",
                "flannel.alpha.coreos.com/public-ip"
            ]
        );
        assert_eq!(
            n.annotation("flannel.alpha.coreos.com/backend-data"),
            Some(r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#)
        );
        assert_eq!(n.pod_cidr(), Some("10.244.2.0/24"));
        assert_eq!(n.pod_cidrs().unwrap(), ["10.244.2.0/24".to_string()]);
        assert!(n.metadata.managed_fields.is_none());
    }

    #[test]
    fn agrees_with_the_typed_node() {
        let full: Node = serde_json::from_str(NODE).unwrap();
        let lite: NodeLite = serde_json::from_str(NODE).unwrap();
        for k in [
            "flannel.alpha.coreos.com/backend-data",
            "flannel.alpha.coreos.com/public-ip",
        ] {
            assert_eq!(full.annotation(k), lite.annotation(k));
        }
        assert_eq!(full.pod_cidr(), lite.pod_cidr());
        assert_eq!(full.pod_cidrs(), lite.pod_cidrs());
    }

    #[test]
    fn sparse_and_wrong_shapes() {
        let n: NodeLite = serde_json::from_str(r#"{"metadata":{"name":"n"}}"#).unwrap();
        assert_eq!(n.spec, None);
        assert_eq!(n.metadata.annotations, None);
        let n: NodeLite =
            serde_json::from_str(r#"{"metadata":{"annotations":null},"spec":null}"#).unwrap();
        assert_eq!(n.metadata.name, None);
        // A non-string flannel annotation is refused, as by the typed Node.
        assert!(serde_json::from_str::<NodeLite>(
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":7}}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Node>(
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":7}}}"#
        )
        .is_err());
        // An unknown non-string annotation is skipped (the typed Node refuses it; the
        // API server never sends one).
        let n: NodeLite =
            serde_json::from_str(r#"{"metadata":{"annotations":{"a/b":{"x":1}}}}"#).unwrap();
        assert_eq!(n.metadata.annotations.unwrap().len(), 0);
    }
}
