//! A cluster's worth of nodes as a real API server holds them, and the kubelets'
//! periodic status rewrites, for scale tests and benchmarks.
//!
//! Each node is what `kubectl get node -o json` shows on a kubeadm cluster running
//! flannel: labels, kubeadm and flannel annotations (exactly as flanneld writes
//! them for vxlan), managed fields of kubelet, controller manager and flanneld,
//! `spec.podCIDR(s)`, and a status with capacity, conditions, addresses, node info
//! and ~50 container images with sizes: ~12 KB of JSON.

use serde_json::{json, Value};

/// Pod CIDR of the `i`-th node: 10.1.0.0/24, 10.1.1.0/24, ... (clear of 10.250/16
/// and above, left for nodes a test adds).
pub fn pod_cidr(i: usize) -> String {
    let k = 256 + i as u32;
    format!("10.{}.{}.0/24", k >> 8, k & 0xff)
}

/// Public (InternalIP) address of the `i`-th node, in the benchmarking range.
pub fn public_ip(i: usize) -> String {
    format!("198.19.{}.{}", i / 250, 1 + i % 250)
}

/// Name of the `i`-th node.
pub fn node_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:05}")
}

fn vtep_mac(i: usize) -> String {
    // Locally administered, unicast, distinct per node.
    format!(
        "0e:6a:{:02x}:{:02x}:{:02x}:01",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

/// The flannel annotations flanneld writes on node `i` (vxlan, VNI 1) with `prefix`
/// (`flannel.alpha.coreos.com`).
pub fn flannel_annotations(prefix: &str, i: usize) -> Value {
    json!({
        format!("{prefix}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, vtep_mac(i)),
        format!("{prefix}/backend-type"): "vxlan",
        format!("{prefix}/kube-subnet-manager"): "true",
        format!("{prefix}/public-ip"): public_ip(i),
    })
}

const IMAGES: &[(&str, &str, u64)] = &[
    ("registry.k8s.io/etcd", "3.5.15-0", 56_909_194),
    ("registry.k8s.io/kube-apiserver", "v1.33.0", 30_071_307),
    (
        "registry.k8s.io/kube-controller-manager",
        "v1.33.0",
        27_646_507,
    ),
    ("registry.k8s.io/kube-scheduler", "v1.33.0", 21_507_893),
    ("registry.k8s.io/kube-proxy", "v1.33.0", 30_896_512),
    ("registry.k8s.io/coredns/coredns", "v1.11.3", 18_562_039),
    ("registry.k8s.io/pause", "3.10", 320_368),
    ("docker.io/flannel/flannel", "v0.26.4", 33_195_227),
    (
        "docker.io/flannel/flannel-cni-plugin",
        "v1.6.2-flannel1",
        4_856_838,
    ),
    ("docker.io/library/nginx", "1.27.3", 72_099_501),
    ("docker.io/library/redis", "7.4.1", 45_012_317),
    ("docker.io/library/postgres", "17.2", 158_104_520),
    ("docker.io/library/busybox", "1.37.0", 2_167_176),
    ("docker.io/library/alpine", "3.21.0", 3_645_232),
    ("quay.io/prometheus/node-exporter", "v1.8.2", 11_651_734),
    ("quay.io/prometheus/prometheus", "v3.0.1", 118_352_710),
    (
        "quay.io/prometheus-operator/prometheus-config-reloader",
        "v0.79.2",
        14_421_602,
    ),
    (
        "registry.k8s.io/kube-state-metrics/kube-state-metrics",
        "v2.14.0",
        20_540_231,
    ),
    (
        "registry.k8s.io/metrics-server/metrics-server",
        "v0.7.2",
        19_494_617,
    ),
    ("docker.io/grafana/grafana", "11.4.0", 129_302_119),
    ("docker.io/grafana/loki", "3.3.2", 34_225_801),
    ("docker.io/grafana/promtail", "3.3.2", 82_116_524),
    (
        "quay.io/jetstack/cert-manager-controller",
        "v1.16.2",
        19_021_882,
    ),
    (
        "quay.io/jetstack/cert-manager-webhook",
        "v1.16.2",
        15_404_011,
    ),
    (
        "quay.io/jetstack/cert-manager-cainjector",
        "v1.16.2",
        13_219_532,
    ),
    (
        "registry.k8s.io/ingress-nginx/controller",
        "v1.12.0",
        105_811_212,
    ),
    (
        "registry.k8s.io/ingress-nginx/kube-webhook-certgen",
        "v1.5.0",
        24_017_245,
    ),
    ("docker.io/bitnami/kubectl", "1.32.0", 89_201_388),
    ("ghcr.io/fluxcd/source-controller", "v1.4.1", 37_215_113),
    ("ghcr.io/fluxcd/kustomize-controller", "v1.4.0", 36_120_772),
    ("ghcr.io/fluxcd/helm-controller", "v1.1.0", 39_411_290),
    ("quay.io/argoproj/argocd", "v2.13.2", 186_215_992),
    ("docker.io/library/mysql", "9.1.0", 172_044_118),
    (
        "docker.io/library/rabbitmq",
        "4.0.5-management",
        131_822_207,
    ),
    ("docker.io/library/memcached", "1.6.33", 33_417_519),
    ("docker.io/elastic/filebeat", "8.17.0", 125_932_441),
    ("docker.io/library/haproxy", "3.1.1", 42_115_632),
    ("docker.io/library/python", "3.13.1-slim", 45_619_311),
    ("docker.io/library/node", "22.12.0-slim", 74_822_904),
    ("docker.io/library/golang", "1.23.4", 294_118_531),
    ("docker.io/library/openjdk", "23-jdk-slim", 219_110_052),
    ("docker.io/library/traefik", "v3.2.3", 53_812_020),
    ("docker.io/istio/proxyv2", "1.24.2", 99_211_437),
    ("docker.io/istio/pilot", "1.24.2", 75_213_995),
    ("quay.io/cilium/hubble-relay", "v1.16.5", 23_112_800),
    ("docker.io/velero/velero", "v1.15.1", 88_015_223),
    (
        "registry.k8s.io/sig-storage/csi-node-driver-registrar",
        "v2.12.0",
        11_203_334,
    ),
    (
        "registry.k8s.io/sig-storage/livenessprobe",
        "v2.14.0",
        9_211_023,
    ),
    (
        "registry.k8s.io/sig-storage/csi-provisioner",
        "v5.1.0",
        29_118_446,
    ),
    (
        "registry.k8s.io/sig-storage/csi-attacher",
        "v4.7.0",
        27_345_100,
    ),
];

/// A hex digest that differs per image and node (as pulled image digests do).
fn digest(seed: usize, k: usize) -> String {
    let mut x = (seed as u64) << 20 ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut s = String::with_capacity(64);
    for _ in 0..4 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        s.push_str(&format!("{x:016x}"));
    }
    s
}

fn conditions(now: &str, since: &str) -> Value {
    let c = |ty: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": ty, "status": status,
            "lastHeartbeatTime": now, "lastTransitionTime": since,
            "reason": reason, "message": message,
        })
    };
    json!([
        {
            "type": "NetworkUnavailable", "status": "False",
            "lastHeartbeatTime": since, "lastTransitionTime": since,
            "reason": "FlannelIsUp", "message": "Flannel is running on this node",
        },
        c("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        c("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        c("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        c("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
    ])
}

fn managed_fields(prefix: &str, now: &str, since: &str) -> Value {
    json!([
        {
            "manager": "kubeadm", "operation": "Update", "apiVersion": "v1", "time": since,
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:annotations": {
                "f:kubeadm.alpha.kubernetes.io/cri-socket": {}}}}
        },
        {
            "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
            "time": since, "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:annotations": {"f:node.alpha.kubernetes.io/ttl": {}}},
                "f:spec": {"f:podCIDR": {}, "f:podCIDRs": {".": {}, "v:\"\"": {}}}
            }
        },
        {
            "manager": "flanneld", "operation": "Update", "apiVersion": "v1", "time": since,
            "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": {
                "f:metadata": {"f:annotations": {
                    format!("f:{prefix}/backend-data"): {},
                    format!("f:{prefix}/backend-type"): {},
                    format!("f:{prefix}/kube-subnet-manager"): {},
                    format!("f:{prefix}/public-ip"): {}
                }},
                "f:status": {"f:conditions": {"k:{\"type\":\"NetworkUnavailable\"}": {
                    ".": {}, "f:lastHeartbeatTime": {}, "f:lastTransitionTime": {},
                    "f:message": {}, "f:reason": {}, "f:status": {}, "f:type": {}
                }}}
            }
        },
        {
            "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": now,
            "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": {"f:status": {
                "f:allocatable": {"f:cpu": {}, "f:ephemeral-storage": {}, "f:memory": {}},
                "f:capacity": {"f:cpu": {}, "f:ephemeral-storage": {}, "f:memory": {}},
                "f:conditions": {
                    "k:{\"type\":\"DiskPressure\"}": {"f:lastHeartbeatTime": {}},
                    "k:{\"type\":\"MemoryPressure\"}": {"f:lastHeartbeatTime": {}},
                    "k:{\"type\":\"PIDPressure\"}": {"f:lastHeartbeatTime": {}},
                    "k:{\"type\":\"Ready\"}": {
                        "f:lastHeartbeatTime": {}, "f:lastTransitionTime": {},
                        "f:message": {}, "f:reason": {}, "f:status": {}
                    }
                },
                "f:images": {}, "f:nodeInfo": {"f:bootID": {}}
            }}
        }
    ])
}

/// Node `i` of a cluster whose nodes carry `prefix`'s flannel annotations, with all
/// heartbeats at `now` (RFC 3339) and transitions at `since`.
pub fn realistic_node(name: &str, i: usize, prefix: &str, now: &str, since: &str) -> Value {
    let cidr = pod_cidr(i);
    let ip = public_ip(i);
    let mut annotations = flannel_annotations(prefix, i);
    if let Some(a) = annotations.as_object_mut() {
        a.insert(
            "kubeadm.alpha.kubernetes.io/cri-socket".into(),
            json!("unix:///var/run/containerd/containerd.sock"),
        );
        a.insert("node.alpha.kubernetes.io/ttl".into(), json!("0"));
        a.insert(
            "volumes.kubernetes.io/controller-managed-attach-detach".into(),
            json!("true"),
        );
    }
    let images: Vec<Value> = IMAGES
        .iter()
        .enumerate()
        .map(|(k, (repo, tag, size))| {
            json!({
                "names": [
                    format!("{repo}@sha256:{}", digest(i, k)),
                    format!("{repo}:{tag}"),
                ],
                "sizeBytes": size + (i as u64 % 4096),
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m6i.xlarge",
                "topology.kubernetes.io/region": "eu-west-1",
                "topology.kubernetes.io/zone": format!("eu-west-1{}", ["a", "b", "c"][i % 3]),
            },
            "annotations": annotations,
            "managedFields": managed_fields(prefix, now, since),
        },
        "spec": {
            "podCIDR": cidr,
            "podCIDRs": [cidr],
            "providerID": format!("aws:///eu-west-1a/i-0{:016x}", 0x5eed_0000_u64 + i as u64),
        },
        "status": {
            "capacity": {
                "cpu": "4", "ephemeral-storage": "203070420Ki", "hugepages-1Gi": "0",
                "hugepages-2Mi": "0", "memory": "16106176Ki", "pods": "110"
            },
            "allocatable": {
                "cpu": "4", "ephemeral-storage": "187149698263", "hugepages-1Gi": "0",
                "hugepages-2Mi": "0", "memory": "16003776Ki", "pods": "110"
            },
            "conditions": conditions(now, since),
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": digest(i, 1000)[..32].to_string(),
                "systemUUID": format!("ec2{}", &digest(i, 1001)[..29]),
                "bootID": format!("{}-{}", &digest(i, 1002)[..8], &digest(i, 1003)[..12]),
                "kernelVersion": "6.8.0-1021-aws",
                "osImage": "Ubuntu 24.04.1 LTS",
                "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": "v1.33.0",
                "kubeProxyVersion": "v1.33.0",
                "operatingSystem": "linux",
                "architecture": "amd64"
            },
            "images": images,
        }
    })
}

/// Node `i` exactly as [`realistic_node`] builds it, made from `template` (any node
/// [`realistic_node`] built with the same `prefix`, `now` and `since`) by rewriting
/// only the fields that differ between nodes. Building a node's JSON from scratch
/// and checking it through the typed `Node` is most of what populating thousands of
/// nodes costs in a debug build; a clone of a checked template is a fraction of it.
pub fn from_template(template: &Value, name: &str, i: usize, prefix: &str) -> Value {
    let mut v = template.clone();
    let cidr = pod_cidr(i);
    let ip = public_ip(i);
    let set = |v: &mut Value, ptr: &str, val: Value| {
        if let Some(slot) = v.pointer_mut(ptr) {
            *slot = val;
        }
    };
    set(&mut v, "/metadata/name", json!(name));
    set(
        &mut v,
        "/metadata/labels/kubernetes.io~1hostname",
        json!(name),
    );
    set(
        &mut v,
        "/metadata/labels/topology.kubernetes.io~1zone",
        json!(format!("eu-west-1{}", ["a", "b", "c"][i % 3])),
    );
    if let (Some(a), Value::Object(fl)) = (
        v.pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut),
        flannel_annotations(prefix, i),
    ) {
        a.extend(fl);
    }
    set(&mut v, "/spec/podCIDR", json!(cidr));
    set(&mut v, "/spec/podCIDRs", json!([cidr]));
    set(
        &mut v,
        "/spec/providerID",
        json!(format!(
            "aws:///eu-west-1a/i-0{:016x}",
            0x5eed_0000_u64 + i as u64
        )),
    );
    set(&mut v, "/status/addresses/0/address", json!(ip));
    set(&mut v, "/status/addresses/1/address", json!(name));
    set(
        &mut v,
        "/status/nodeInfo/machineID",
        json!(digest(i, 1000)[..32].to_string()),
    );
    set(
        &mut v,
        "/status/nodeInfo/systemUUID",
        json!(format!("ec2{}", &digest(i, 1001)[..29])),
    );
    set(
        &mut v,
        "/status/nodeInfo/bootID",
        json!(format!(
            "{}-{}",
            &digest(i, 1002)[..8],
            &digest(i, 1003)[..12]
        )),
    );
    if let Some(images) = v
        .pointer_mut("/status/images")
        .and_then(Value::as_array_mut)
    {
        for (k, (img, (repo, _, size))) in images.iter_mut().zip(IMAGES).enumerate() {
            img["names"][0] = json!(format!("{repo}@sha256:{}", digest(i, k)));
            img["sizeBytes"] = json!(size + (i as u64 % 4096));
        }
    }
    v
}

/// What a kubelet's status update changes on a healthy node: the heartbeat of each
/// condition it owns and the time of its managed-fields entry. Returns false when the
/// node has no such conditions (nothing to rewrite).
pub fn heartbeat(node: &mut Value, now: &str) -> bool {
    let mut touched = false;
    if let Some(conds) = node
        .pointer_mut("/status/conditions")
        .and_then(Value::as_array_mut)
    {
        for c in conds {
            // NetworkUnavailable is flanneld's, not the kubelet's.
            if c["type"] != "NetworkUnavailable" && c.get("lastHeartbeatTime").is_some() {
                c["lastHeartbeatTime"] = json!(now);
                touched = true;
            }
        }
    }
    if let Some(mf) = node
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    {
        for m in mf.iter_mut().filter(|m| m["manager"] == "kubelet") {
            m["time"] = json!(now);
        }
    }
    touched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_look_real_and_decode() {
        let now = "2026-12-03T10:00:00Z";
        let n = realistic_node("node-00007", 7, "flannel.alpha.coreos.com", now, now);
        let text = n.to_string();
        assert!(
            (10_000..20_000).contains(&text.len()),
            "a realistic node is 10-20 KB of JSON, this one {}",
            text.len()
        );
        let typed: k8s_openapi::api::core::v1::Node = serde_json::from_value(n.clone()).unwrap();
        assert_eq!(typed.spec.unwrap().pod_cidr.as_deref(), Some("10.1.7.0/24"));
        let st = typed.status.unwrap();
        assert_eq!(st.images.unwrap().len(), 50);
        assert_eq!(st.conditions.unwrap().len(), 5);
        let a = typed.metadata.annotations.unwrap();
        assert_eq!(
            a["flannel.alpha.coreos.com/backend-data"],
            r#"{"VNI":1,"VtepMAC":"0e:6a:00:00:07:01"}"#
        );
        assert_eq!(a["flannel.alpha.coreos.com/public-ip"], "198.19.0.8");
        assert_eq!(typed.metadata.managed_fields.unwrap().len(), 4);
    }

    #[test]
    fn heartbeat_moves_kubelet_times_only() {
        let t0 = "2026-12-03T10:00:00Z";
        let t1 = "2026-12-03T10:00:10Z";
        let mut n = realistic_node("n", 1, "flannel.alpha.coreos.com", t0, t0);
        let before = n.clone();
        assert!(heartbeat(&mut n, t1));
        assert_ne!(n, before);
        assert_eq!(
            n["metadata"]["annotations"],
            before["metadata"]["annotations"]
        );
        assert_eq!(n["spec"], before["spec"]);
        let conds = n["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds[0]["lastHeartbeatTime"], t0, "flanneld's condition");
        assert!(conds[1..].iter().all(|c| c["lastHeartbeatTime"] == t1));
        assert!(conds.iter().all(|c| c["lastTransitionTime"] == t0));
        assert!(!heartbeat(&mut json!({"metadata": {"name": "bare"}}), t1));
    }

    #[test]
    fn template_nodes_equal_nodes_built_from_scratch() {
        let (now, since) = ("2026-12-03T10:00:10Z", "2026-12-03T09:00:00Z");
        let p = "flannel.alpha.coreos.com";
        let template = realistic_node("node-00000", 0, p, now, since);
        for i in [0, 1, 2, 3, 249, 250, 4095, 4096, 4999, 12_345] {
            let name = node_name("node-", i);
            assert_eq!(
                from_template(&template, &name, i, p),
                realistic_node(&name, i, p, now, since),
                "node {i}"
            );
        }
    }

    #[test]
    fn addresses_are_distinct() {
        let mut cidrs = std::collections::BTreeSet::new();
        let mut ips = std::collections::BTreeSet::new();
        for i in 0..20_000 {
            assert!(cidrs.insert(pod_cidr(i)));
            assert!(ips.insert(public_ip(i)));
        }
        assert!(!cidrs.iter().any(|c| c.starts_with("10.250.")));
    }
}
