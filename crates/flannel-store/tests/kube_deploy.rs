//! The deployment files agree with what the code needs: RBAC rules, flags, paths,
//! the net-conf.json and CNI config the DaemonSet installs.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use flannel_core::NetworkConfig;
use flannel_store::kube::{KubeOptions, REQUIRED_RBAC};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

const MANIFEST: &str = include_str!("../../../deploy/kube-flannel.yml");
const UNIT: &str = include_str!("../../../deploy/flanneld.service");

/// flanneld's flags (docs/compatibility.md, "Command-line flags and environment"),
/// without the leading dashes.
const FLAGS: &[&str] = &[
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
    "iface",
    "iface-regex",
    "iface-can-reach",
    "public-ip",
    "public-ipv6",
    "subnet-file",
    "subnet-lease-renew-margin",
    "ip-masq",
    "ip-masq-fully-random-disable",
    "kube-subnet-mgr",
    "kube-api-url",
    "kubeconfig-file",
    "kube-annotation-prefix",
    "healthz-ip",
    "healthz-port",
    "iptables-resync",
    "iptables-forward-rules",
    "ip-blackhole-route",
    "net-config-path",
    "set-node-network-unavailable",
    "version",
    "v",
    "vmodule",
    "log_backtrace_at",
];

fn docs() -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(MANIFEST).context("parsing the manifest")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn one<T: k8s_openapi::serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> Result<T> {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    match found[..] {
        [d] => {
            Ok(serde_json::from_value((*d).clone()).with_context(|| format!("decoding {kind}"))?)
        }
        _ => bail!("expected one {kind}, found {}", found.len()),
    }
}

fn container<'a>(ds: &'a DaemonSet, name: &str, init: bool) -> Result<&'a Container> {
    let spec = ds.spec.template.spec.as_ref().context("pod spec")?;
    let list = if init {
        spec.init_containers.as_deref()
    } else {
        Some(&spec.containers[..])
    };
    list.unwrap_or_default()
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("container {name}"))
}

#[test]
fn cluster_role_grants_exactly_what_the_store_uses() -> Result<()> {
    let docs = docs()?;
    let role: ClusterRole = one(&docs, "ClusterRole")?;
    let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.unwrap_or_default() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "core group only"
        );
        for r in rule.resources.unwrap_or_default() {
            granted
                .entry(r)
                .or_default()
                .extend(rule.verbs.iter().cloned());
        }
    }
    let needed: BTreeMap<String, BTreeSet<String>> = REQUIRED_RBAC
        .iter()
        .map(|(r, v)| (r.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(granted, needed);

    let sa: ServiceAccount = one(&docs, "ServiceAccount")?;
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding")?;
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-flannel"));
    assert!(docs
        .iter()
        .any(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == "kube-flannel"));
    Ok(())
}

#[test]
fn daemonset_runs_flanneld_as_the_code_expects() -> Result<()> {
    let docs = docs()?;
    let ds: DaemonSet = one(&docs, "DaemonSet")?;
    let cm: ConfigMap = one(&docs, "ConfigMap")?;
    let sa: ServiceAccount = one(&docs, "ServiceAccount")?;
    let pod = ds.spec.template.spec.as_ref().context("pod spec")?;
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);

    let c = container(&ds, "kube-flannel", false)?;
    assert_eq!(
        c.command.as_deref(),
        Some(&["/opt/bin/flanneld".to_string()][..])
    );
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--ip-masq".to_string()) && args.contains(&"--kube-subnet-mgr".to_string()),
        "{args:?}"
    );
    for a in &args {
        let name = a.trim_start_matches('-').split('=').next().unwrap_or("");
        assert!(FLAGS.contains(&name), "unknown flanneld flag {a}");
    }
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);

    // The environment the store reads (KubeOptions::with_env) comes from the downward API.
    let env: BTreeMap<String, String> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let f = e.value_from.as_ref()?.field_ref.as_ref()?;
            Some((e.name.clone(), f.field_path.clone()))
        })
        .collect();
    assert_eq!(
        env.get("NODE_NAME").map(String::as_str),
        Some("spec.nodeName")
    );
    assert_eq!(
        env.get("POD_NAME").map(String::as_str),
        Some("metadata.name")
    );
    assert_eq!(
        env.get("POD_NAMESPACE").map(String::as_str),
        Some("metadata.namespace")
    );

    // Mounts: subnet.env dir, the ConfigMap where --net-config-path points by default,
    // and the iptables lock shared with the host.
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.clone(), m.name.clone()))
        .collect();
    assert!(mounts.contains_key("/run/flannel"), "{mounts:?}");
    assert!(mounts.contains_key("/run/xtables.lock"), "{mounts:?}");
    let net_conf = KubeOptions::default().net_config_path;
    let (cfg_dir, cfg_volume) = mounts
        .iter()
        .find(|(p, _)| net_conf.starts_with(p.as_str()))
        .context("no mount holds the default --net-config-path")?;
    let key = net_conf
        .strip_prefix(cfg_dir)?
        .to_string_lossy()
        .to_string();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let vol = volumes
        .iter()
        .find(|v| &v.name == cfg_volume)
        .context("config volume")?;
    assert_eq!(
        vol.config_map.as_ref().map(|c| c.name.clone()),
        cm.metadata.name
    );
    let data = cm.data.clone().unwrap_or_default();
    let text = data
        .get(&key)
        .with_context(|| format!("ConfigMap key {key}"))?;
    let config = NetworkConfig::parse(text)?;
    assert_eq!(
        config.network.map(|n| n.to_string()).as_deref(),
        Some("10.244.0.0/16")
    );
    assert_eq!(config.backend.backend_type, "vxlan");

    // The CNI plugin and its conflist are installed where the runtime looks.
    let plugin = container(&ds, "install-cni-plugin", true)?;
    let pargs = plugin.args.clone().unwrap_or_default();
    assert_eq!(
        pargs.last().map(String::as_str),
        Some("/opt/cni/bin/flannel")
    );
    let cni = container(&ds, "install-cni", true)?;
    let cargs = cni.args.clone().unwrap_or_default();
    assert_eq!(
        cargs.last().map(String::as_str),
        Some("/etc/cni/net.d/10-flannel.conflist")
    );
    let conflist: Value =
        serde_json::from_str(data.get("cni-conf.json").context("cni-conf.json")?)?;
    assert_eq!(
        cargs.iter().rev().nth(1).map(String::as_str),
        Some(
            format!("{cfg_dir}cni-conf.json")
                .replace("//", "/")
                .as_str()
        )
    );
    assert_eq!(conflist["name"], "cbr0");
    assert_eq!(conflist["plugins"][0]["type"], "flannel");
    assert_eq!(conflist["plugins"][0]["delegate"]["hairpinMode"], true);
    assert_eq!(conflist["plugins"][0]["delegate"]["isDefaultGateway"], true);
    assert_eq!(conflist["plugins"][1]["type"], "portmap");
    Ok(())
}

#[test]
fn systemd_unit_runs_flanneld_with_environment_settings() -> Result<()> {
    let mut service = BTreeMap::new();
    let mut section = String::new();
    for line in UNIT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if line.starts_with('[') {
            section = line.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            if section == "[Service]" {
                service.insert(k.to_string(), v.to_string());
            }
        }
    }
    assert_eq!(service.get("Type").map(String::as_str), Some("notify"));
    assert!(service
        .get("ExecStart")
        .is_some_and(|e| e.ends_with("/flanneld")));
    assert!(service
        .get("EnvironmentFile")
        .is_some_and(|e| e.contains("flanneld")));
    // Every FLANNELD_* variable the unit documents is a real flag.
    let mut seen = 0;
    for word in UNIT.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(flag) = word.strip_prefix("FLANNELD_").filter(|f| !f.is_empty()) {
            let flag = flag.to_ascii_lowercase().replace('_', "-");
            assert!(
                FLAGS.contains(&flag.as_str()),
                "FLANNELD_{flag} is not a flag"
            );
            seen += 1;
        }
    }
    assert!(seen >= 5);
    Ok(())
}
