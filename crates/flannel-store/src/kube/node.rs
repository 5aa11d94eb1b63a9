//! Pure conversions between Kubernetes nodes and flannel leases: pod CIDRs, the
//! annotations a node publishes and reads, and the status patches flanneld sends.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use flannel_core::{Lease, LeaseAttrs, LeaseKey, MacAddr, VxlanData};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;

use super::annotations::Annotations;
use super::lite::NodeFields;

/// A node's pod CIDRs split by family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
    /// As written on the node, for messages.
    pub raw: Vec<String>,
}

/// `spec.podCIDRs` if non-empty (at most one per family), else `spec.podCIDR`. Each
/// CIDR is masked to its network, as Go's `net.ParseCIDR` does.
pub fn pod_cidrs<N: NodeFields>(node: &N) -> Result<PodCidrs, String> {
    let list: Vec<String> = node
        .pod_cidrs()
        .filter(|l| !l.is_empty())
        .map(<[String]>::to_vec)
        .or_else(|| {
            node.pod_cidr()
                .filter(|c| !c.is_empty())
                .map(|c| vec![c.to_string()])
        })
        .unwrap_or_default();
    if list.len() > 2 {
        return Err(format!(
            "spec.podCIDRs {list:?} has more than two entries (one IPv4 and one IPv6 at most)"
        ));
    }
    let mut out = PodCidrs {
        raw: list.clone(),
        ..Default::default()
    };
    for c in &list {
        let twice = || format!("spec.podCIDRs {list:?} has two entries of the same family");
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) if out.v4.is_none() => out.v4 = Some(n.trunc()),
            Ok(IpNet::V6(n)) if out.v6.is_none() => out.v6 = Some(n.trunc()),
            Ok(_) => return Err(twice()),
            Err(_) => return Err(format!("pod CIDR {c:?} is not a valid CIDR")),
        }
    }
    Ok(out)
}

fn annotation<'a, N: NodeFields>(node: &'a N, key: &str) -> Option<&'a str> {
    node.annotation(key)
}

/// Whether the node publishes a flannel lease (`kube-subnet-manager: "true"`).
pub fn is_managed<N: NodeFields>(node: &N, ann: &Annotations) -> bool {
    annotation(node, &ann.kube_subnet_manager) == Some("true")
}

/// Backend data as published: verbatim JSON; absent, empty or `null` means none.
fn backend_data(text: Option<&str>) -> Result<Option<Box<RawValue>>, String> {
    match text.map(str::trim) {
        None | Some("") | Some("null") => Ok(None),
        Some(t) => RawValue::from_string(t.to_string())
            .map(Some)
            .map_err(|e| format!("backend data {t:?} is not JSON: {e}")),
    }
}

/// The lease another node publishes, or why it is skipped.
pub fn node_to_lease<N: NodeFields>(
    node: &N,
    ann: &Annotations,
    enable_ipv4: bool,
    enable_ipv6: bool,
) -> Result<Lease, String> {
    let cidrs = pod_cidrs(node)?;
    let mut key = LeaseKey::v4(Ipv4Net::default());
    let mut attrs = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED);
    if enable_ipv4 {
        let ip = annotation(node, &ann.public_ip).unwrap_or("");
        attrs.public_ip = ip
            .parse()
            .map_err(|_| format!("{} {ip:?} is not an IPv4 address", ann.public_ip))?;
        attrs.backend_data = backend_data(annotation(node, &ann.backend_data))?;
        key.v4 = cidrs
            .v4
            .ok_or_else(|| format!("no IPv4 pod CIDR in {:?}", cidrs.raw))?;
    }
    if enable_ipv6 {
        let ip = annotation(node, &ann.public_ipv6).unwrap_or("");
        attrs.public_ipv6 = Some(
            ip.parse()
                .map_err(|_| format!("{} {ip:?} is not an IPv6 address", ann.public_ipv6))?,
        );
        attrs.backend_v6_data = backend_data(annotation(node, &ann.backend_v6_data))?;
        key.v6 = Some(
            cidrs
                .v6
                .ok_or_else(|| format!("no IPv6 pod CIDR in {:?}", cidrs.raw))?,
        );
    }
    attrs.backend_type = annotation(node, &ann.backend_type)
        .unwrap_or("")
        .to_string();
    Ok(Lease {
        key,
        attrs: attrs.into(),
        expiration: None,
    })
}

/// Go's `json.RawMessage.MarshalJSON`: the raw text, or `null` when unset.
fn raw_text(r: &Option<Box<RawValue>>) -> String {
    r.as_ref()
        .map(|r| r.get().to_string())
        .unwrap_or_else(|| "null".to_string())
}

/// The annotations to change so the node publishes `attrs`, exactly as upstream's
/// AcquireLease decides them; empty when the node already says all of it.
pub fn annotation_changes<N: NodeFields>(
    node: &N,
    attrs: &LeaseAttrs,
    ann: &Annotations,
) -> BTreeMap<String, String> {
    let current = |k: &str| annotation(node, k).unwrap_or("").to_string();
    let mut want: BTreeMap<String, String> = BTreeMap::new();
    let bt = attrs.backend_type.as_str();
    let bd = raw_text(&attrs.backend_data);
    let bd6 = raw_text(&attrs.backend_v6_data);
    want.insert(ann.backend_type.clone(), bt.to_string());
    let v4_data = match bt {
        "vxlan" | "wireguard" => bd != "null",
        _ => true,
    };
    if v4_data {
        want.insert(ann.backend_data.clone(), bd);
        let overwrite = current(&ann.public_ip_overwrite);
        let ip = if overwrite.is_empty() {
            attrs.public_ip.to_string()
        } else {
            overwrite
        };
        want.insert(ann.public_ip.clone(), ip);
    }
    let has_v6 = attrs.public_ipv6.is_some();
    let v6_data = match bt {
        "vxlan" => bd6 != "null",
        "wireguard" => bd6 != "null" && has_v6,
        "host-gw" | "extension" => has_v6,
        _ => false,
    };
    if v6_data {
        want.insert(ann.backend_v6_data.clone(), bd6);
        let overwrite = current(&ann.public_ipv6_overwrite);
        if !overwrite.is_empty() {
            want.insert(ann.public_ipv6.clone(), overwrite);
        } else if let Some(ip6) = attrs.public_ipv6 {
            want.insert(ann.public_ipv6.clone(), ip6.to_string());
        }
    }
    want.insert(ann.kube_subnet_manager.clone(), "true".to_string());
    want.retain(|k, v| annotation(node, k) != Some(v.as_str()));
    want
}

/// The strategic-merge patch body for `nodes/<name>/status` that sets `changes`.
pub fn annotations_patch(changes: &BTreeMap<String, String>) -> serde_json::Value {
    let annotations: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({"metadata": {"annotations": annotations}})
}

/// The status patch upstream sends once the backend runs: a `NetworkUnavailable`
/// condition, status `False`, fields in Go's NodeCondition order. `now` is RFC 3339
/// in whole seconds (`2024-05-01T10:00:00Z`), as metav1.Time marshals.
pub fn network_available_patch(now: &str) -> serde_json::Value {
    let condition = serde_json::json!({
        "type": "NetworkUnavailable",
        "status": "False",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
    });
    serde_json::json!({"status": {"conditions": [condition]}})
}

/// What the own node says before flanneld publishes anything: the VTEP MACs of a
/// previous run and the public-IP overrides (`node-public-ip`, `node-public-ipv6`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStartupInfo {
    pub vtep_mac: Option<MacAddr>,
    pub vtep_mac_v6: Option<MacAddr>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

pub fn startup_info<N: NodeFields>(node: &N, ann: &Annotations) -> NodeStartupInfo {
    let mac = |key: &str| {
        let text = annotation(node, key)?;
        let raw = RawValue::from_string(text.to_string()).ok()?;
        match VxlanData::decode(&raw) {
            Ok(d) => Some(d.vtep_mac),
            Err(e) => {
                tracing::debug!("{key} on the own node has no usable VtepMAC: {e}");
                None
            }
        }
    };
    let ip = |key: &str| {
        let text = annotation(node, key).filter(|t| !t.is_empty())?;
        match text.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!("ignoring annotation {key}={text:?}: not an IP address");
                None
            }
        }
    };
    NodeStartupInfo {
        vtep_mac: mac(&ann.backend_data),
        vtep_mac_v6: mac(&ann.backend_v6_data),
        public_ip: ip(&ann.node_public_ip).and_then(|ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        }),
        public_ipv6: ip(&ann.node_public_ipv6).and_then(|ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V6(v6) => Some(v6),
            std::net::IpAddr::V4(_) => None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, NodeSpec};

    fn node(cidrs: &[&str], annotations: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.spec = Some(NodeSpec {
            pod_cidr: cidrs.first().map(|s| s.to_string()),
            pod_cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        });
        n.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string()))
                .collect(),
        );
        n
    }

    fn ann() -> Annotations {
        Annotations::new("flannel.alpha.coreos.com").unwrap()
    }

    #[test]
    fn pod_cidrs_split_and_mask() {
        let c = pod_cidrs(&node(&["10.244.1.7/24", "fd00:1::5/64"], &[])).unwrap();
        assert_eq!(c.v4.unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(c.v6.unwrap().to_string(), "fd00:1::/64");
        assert!(pod_cidrs(&node(&["10.0.0.0/24", "10.1.0.0/24", "fd00::/64"], &[])).is_err());
        assert!(pod_cidrs(&node(&["bogus"], &[])).is_err());
        assert_eq!(pod_cidrs(&node(&[], &[])).unwrap(), PodCidrs::default());
    }

    #[test]
    fn vxlan_publishes_everything_once() {
        let mut attrs = LeaseAttrs::new("192.168.1.10".parse().unwrap());
        attrs.backend_type = "vxlan".into();
        attrs.backend_data = Some(
            VxlanData {
                vni: 1,
                vtep_mac: "12:c6:65:89:b4:e3".parse().unwrap(),
            }
            .encode(),
        );
        let n = node(&["10.244.1.0/24"], &[]);
        let ch = annotation_changes(&n, &attrs, &ann());
        let p = "flannel.alpha.coreos.com/";
        assert_eq!(ch.len(), 4, "{ch:?}");
        assert_eq!(
            ch[&format!("{p}backend-data")],
            r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#
        );
        assert_eq!(ch[&format!("{p}backend-type")], "vxlan");
        assert_eq!(ch[&format!("{p}public-ip")], "192.168.1.10");
        assert_eq!(ch[&format!("{p}kube-subnet-manager")], "true");
        let done: Vec<(&str, &str)> = vec![
            ("backend-data", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
            ("backend-type", "vxlan"),
            ("public-ip", "192.168.1.10"),
            ("kube-subnet-manager", "true"),
        ];
        assert!(annotation_changes(&node(&["10.244.1.0/24"], &done), &attrs, &ann()).is_empty());
    }

    #[test]
    fn host_gw_writes_null_data_and_overwrite_wins() {
        let mut attrs = LeaseAttrs::new("192.168.1.10".parse().unwrap());
        attrs.backend_type = "host-gw".into();
        let n = node(
            &["10.244.1.0/24"],
            &[("public-ip-overwrite", "203.0.113.9")],
        );
        let ch = annotation_changes(&n, &attrs, &ann());
        assert_eq!(ch["flannel.alpha.coreos.com/backend-data"], "null");
        assert_eq!(ch["flannel.alpha.coreos.com/public-ip"], "203.0.113.9");
    }

    #[test]
    fn leases_from_nodes() {
        let n = node(
            &["10.244.2.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("public-ip", "192.168.1.11"),
                ("backend-type", "vxlan"),
                ("backend-data", r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#),
            ],
        );
        assert!(is_managed(&n, &ann()));
        let l = node_to_lease(&n, &ann(), true, false).unwrap();
        assert_eq!(l.key.to_string(), "10.244.2.0-24");
        assert_eq!(
            l.attrs.encode(),
            r#"{"PublicIP":"192.168.1.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#
        );
        assert!(node_to_lease(&n, &ann(), true, true).is_err(), "no v6 data");
        let bad = node(&["10.244.2.0/24"], &[("public-ip", "nope")]);
        assert!(node_to_lease(&bad, &ann(), true, false).is_err());
        let v6only = node(&["fd00::/64"], &[("public-ip", "192.168.1.11")]);
        assert!(node_to_lease(&v6only, &ann(), true, false).is_err());
    }

    #[test]
    fn startup_info_reads_mac_and_overrides() {
        let n = node(
            &["10.244.2.0/24"],
            &[
                ("backend-data", r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#),
                ("node-public-ip", "198.51.100.7"),
                ("node-public-ipv6", "not-an-ip"),
            ],
        );
        let i = startup_info(&n, &ann());
        assert_eq!(i.vtep_mac.unwrap().to_string(), "aa:bb:cc:dd:ee:ff");
        assert_eq!(i.public_ip.unwrap().to_string(), "198.51.100.7");
        assert_eq!(i.public_ipv6, None);
        assert_eq!(i.vtep_mac_v6, None);
    }

    #[test]
    fn condition_patch_matches_upstream_bytes() {
        assert_eq!(
            network_available_patch("2024-05-01T10:00:00Z").to_string(),
            r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","lastHeartbeatTime":"2024-05-01T10:00:00Z","lastTransitionTime":"2024-05-01T10:00:00Z","reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}"#
        );
    }
}
