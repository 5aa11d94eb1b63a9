//! The lab in Kubernetes mode: the fake API server (`flannel-kube-fake`) in the
//! underlay namespace on the bridge address, one Node object per host and each
//! host's flanneld started with `--kube-subnet-mgr` and its own `NODE_NAME`.
//!
//! All HTTP to the fake goes through sockets opened inside the underlay namespace
//! ([`bench_kube::http_in`]), never from the root namespace.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::bench_kube::http_in;
use crate::bins::find_binary;
use crate::lab::{tail, UNDERLAY_GATEWAY};
use crate::process::{Proc, ProcOutput};
use crate::{poll_until, Lab, LabError, Result};

/// The fake API server's port on the underlay bridge address.
pub const API_PORT: u16 = 6443;
/// The default annotation prefix, as flanneld writes it.
pub const PREFIX: &str = "flannel.alpha.coreos.com/";

/// The Node name of host `h` (`node-1`, ...).
pub fn node_name(h: usize) -> String {
    format!("node-{}", h + 1)
}

/// The fake API server of a lab, and the agents' kube-mode command line.
pub struct KubeFake {
    proc_: Option<Proc>,
    log: PathBuf,
    ns: String,
    addr: SocketAddrV4,
}

impl Drop for KubeFake {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- flannel-kube-fake log (end)\n{}", tail(&self.log, 30));
        }
    }
}

impl KubeFake {
    /// Starts the fake in `lab`'s underlay namespace, writes `net_conf` as the
    /// mounted net-conf.json and makes every host's next flanneld start run in
    /// Kubernetes mode as node [`node_name`]. Build the lab with
    /// `start_agents(false)`.
    pub fn start(lab: &mut Lab, net_conf: &str) -> Result<KubeFake> {
        let bin = find_binary("flannel-kube-fake")?;
        let flanneld = find_binary("flanneld")?;
        let conf = lab.run_dir().join("net-conf.json");
        std::fs::write(&conf, net_conf)
            .map_err(|e| LabError::io(format!("write {}", conf.display()), e))?;
        let log = lab.run_dir().join("kube-fake.log");
        let state = lab.run_dir().join("kube-state.json");
        let listen = format!("{UNDERLAY_GATEWAY}:{API_PORT}");
        let proc_ = lab.spawn_in(
            lab.under_ns(),
            &[
                &bin.display().to_string(),
                "--listen",
                &listen,
                "--state",
                &state.display().to_string(),
            ],
            ProcOutput::File(log.clone()),
        )?;
        let mut fake = KubeFake {
            proc_: Some(proc_),
            log,
            ns: lab.under_ns().to_string(),
            addr: SocketAddrV4::new(UNDERLAY_GATEWAY, API_PORT),
        };
        lab.add_agent_arg("--kube-subnet-mgr");
        lab.add_agent_arg(&format!("--kube-api-url=http://{listen}"));
        lab.add_agent_arg(&format!("--net-config-path={}", conf.display()));
        for h in 0..lab.hosts().len() {
            let env = format!("NODE_NAME={}", node_name(h));
            lab.set_agent_wrapper(h, &["env", &env], &flanneld)?;
        }
        let timeout = lab.timeout();
        poll_until(
            "the fake API server to answer",
            timeout,
            Duration::from_millis(50),
            || {
                if let Some(st) = fake.proc_.as_mut().and_then(Proc::try_wait) {
                    return Err(LabError::Invalid(format!(
                        "flannel-kube-fake exited ({st}): {}",
                        tail(&fake.log, 20)
                    )));
                }
                Ok(fake
                    .call("GET", "/healthz", "")
                    .is_ok_and(|(st, _)| st == 200))
            },
        )?;
        Ok(fake)
    }

    /// One request; the status and the body as JSON (a string if it is not JSON).
    pub fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, Value)> {
        let (st, text) = http_in(&self.ns, self.addr, method, path, body)?;
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((st, v))
    }

    fn ok(&self, method: &str, path: &str, body: &str) -> Result<Value> {
        let (st, v) = self.call(method, path, body)?;
        if !(200..300).contains(&st) {
            return Err(LabError::Invalid(format!("{method} {path}: HTTP {st} {v}")));
        }
        Ok(v)
    }

    /// Creates Node `name` with `spec.podCIDRs` = `pod_cidrs` and `spec.podCIDR` its
    /// first entry, as kube-controller-manager writes them.
    pub fn create_node(&self, name: &str, pod_cidrs: &[&str]) -> Result<()> {
        self.create_node_annotated(name, pod_cidrs, &[])
    }

    /// [`create_node`](Self::create_node) with flannel annotations already set (names
    /// without the prefix), e.g. an operator's `public-ipv6-overwrite`.
    pub fn create_node_annotated(
        &self,
        name: &str,
        pod_cidrs: &[&str],
        annotations: &[(&str, &str)],
    ) -> Result<()> {
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), Value::String(v.to_string())))
            .collect();
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs},
        });
        self.ok("POST", "/api/v1/nodes", &node.to_string())?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> Result<Value> {
        self.ok("GET", &format!("/api/v1/nodes/{name}"), "")
    }

    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.ok("DELETE", &format!("/api/v1/nodes/{name}"), "")?;
        Ok(())
    }

    /// The flannel annotations of Node `name`, prefix stripped.
    pub fn annotations(&self, name: &str) -> Result<BTreeMap<String, String>> {
        Ok(flannel_annotations(&self.node(name)?))
    }

    /// Errors if the fake has exited.
    pub fn check(&mut self) -> Result<()> {
        match self.proc_.as_mut().and_then(Proc::try_wait) {
            Some(st) => Err(LabError::Invalid(format!(
                "flannel-kube-fake exited ({st}): {}",
                tail(&self.log, 20)
            ))),
            None => Ok(()),
        }
    }
}

/// The flannel annotations of a Node object (prefix stripped).
pub fn flannel_annotations(node: &Value) -> BTreeMap<String, String> {
    node["metadata"]["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    Some((k.strip_prefix(PREFIX)?.to_string(), v.as_str()?.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}
