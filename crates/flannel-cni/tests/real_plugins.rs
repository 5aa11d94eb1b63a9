//! The plugin with the real `bridge`, `host-local` and `loopback` plugins from
//! /usr/lib/cni, in throw-away network namespaces (root needed).
//!
//! Layout: a "host" namespace and a "pod" namespace per test, both named
//! `fl-<pid>-cni-<n>`. The plugin runs inside the host namespace
//! (`ip netns exec <host> flannel`) with CNI_NETNS pointing at the pod namespace,
//! so the bridge and the host end of the veth live in the test's host namespace and
//! nothing touches the root namespace. All state directories are temporary.
//! Without root or the plugins the tests skip with a reason, unless FLANNEL_E2E=1,
//! which turns a missing prerequisite into a failure.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const CNI_DIR: &str = "/usr/lib/cni";
const PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// Ok, or why these tests cannot run here.
fn prerequisites() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Err(format!("needs root (euid {euid})"));
    }
    for p in PLUGINS {
        let path = Path::new(CNI_DIR).join(p);
        if !path.is_file() {
            return Err(format!(
                "{} is missing (Debian containernetworking-plugins)",
                path.display()
            ));
        }
    }
    for (tool, arg) in [("ip", "-V"), ("ping", "-V")] {
        if Command::new(tool).arg(arg).output().is_err() {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    Ok(())
}

/// True when the test may run; otherwise prints why it skips, or panics under
/// FLANNEL_E2E=1.
fn can_run(test: &str) -> bool {
    match prerequisites() {
        Ok(()) => true,
        Err(why) => flannel_testkit::skip_or_fail(test, why),
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique(kind: &str) -> String {
    format!(
        "fl-{}-{kind}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace that is deleted when dropped (also on panic).
struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    fn new() -> Netns {
        let name = unique("cni");
        must(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            name,
            deleted: false,
        };
        must(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn delete(&mut self) {
        if !self.deleted {
            self.deleted = true;
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }

    /// `ip -n <ns> -j <args>` as JSON.
    fn ip_json(&self, args: &[&str]) -> Value {
        let out = must(Command::new("ip").args(["-n", &self.name, "-j"]).args(args));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

fn must(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code,
            0,
            "stdout {} stderr {}",
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        );
        self
    }
}

/// Runs `prog` inside namespace `ns` with the given environment and stdin.
fn run_in(ns: &Netns, prog: &str, env: &HashMap<&str, String>, stdin: &[u8]) -> Run {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, prog])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ip netns exec");
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One simulated node: host namespace, temp subnet.env and state directories.
struct Node {
    host: Netns,
    tmp: tempfile::TempDir,
    bridge: String,
    cni_version: &'static str,
}

impl Node {
    fn new() -> Node {
        let host = Netns::new();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        // Unique even though it lives in the test's own namespace (max 15 chars).
        let bridge = format!("fl{}br", std::process::id() % 10_000_000);
        Node {
            host,
            tmp,
            bridge,
            cni_version: "1.0.0",
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("flannel")
    }

    fn ipam_dir(&self) -> PathBuf {
        self.tmp.path().join("ipam")
    }

    fn netconf(&self) -> String {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": "fl-test",
            "type": "flannel",
            "subnetFile": self.tmp.path().join("subnet.env"),
            "dataDir": self.data_dir(),
            "subnetFileWait": 0,
            "delegate": {"bridge": self.bridge, "hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"dataDir": self.ipam_dir()},
        })
        .to_string()
    }

    fn env(&self, cmd: &str, cid: &str, pod: &Netns) -> HashMap<&'static str, String> {
        HashMap::from([
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", cid.to_string()),
            ("CNI_NETNS", pod.path()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", CNI_DIR.to_string()),
        ])
    }

    fn flannel(&self, cmd: &str, cid: &str, pod: &Netns) -> Run {
        run_in(
            &self.host,
            env!("CARGO_BIN_EXE_flannel"),
            &self.env(cmd, cid, pod),
            self.netconf().as_bytes(),
        )
    }

    /// What a runtime does first: bring up lo in the pod with the loopback plugin.
    fn loopback(&self, cid: &str, pod: &Netns) {
        let conf = r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#;
        let loopback = format!("{CNI_DIR}/loopback");
        run_in(
            &self.host,
            &loopback,
            &self.env("ADD", cid, pod),
            conf.as_bytes(),
        )
        .ok();
    }

    /// host-local's lease files (named after the addresses).
    fn leases(&self) -> Vec<String> {
        let dir = self.ipam_dir().join("fl-test");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return vec![];
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("10."))
            .collect()
    }
}

fn pod_address(result: &Value) -> String {
    let ips = result["ips"].as_array().expect("ips in the result");
    assert_eq!(ips.len(), 1, "{result}");
    let addr = ips[0]["address"].as_str().unwrap();
    assert_eq!(ips[0]["gateway"], "10.244.5.1", "{result}");
    let (ip, len) = addr.split_once('/').unwrap();
    assert_eq!(len, "24");
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    assert_eq!(
        &ip.octets()[..3],
        &[10, 244, 5],
        "{addr} not in 10.244.5.0/24"
    );
    ip.to_string()
}

/// Pings from the pod until it answers (ARP and the bridge may need a moment on a
/// loaded machine); fails after a generous deadline.
fn ping_from(pod: &Netns, dst: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &pod.name, "ping", "-c", "1", "-W", "2", dst,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no answer from {dst}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn add_check_del_with_bridge_and_host_local() {
    if !can_run("add_check_del_with_bridge_and_host_local") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new();
    let cid = unique("ctr");
    node.loopback(&cid, &pod);

    let add = node.flannel("ADD", &cid, &pod);
    add.ok();
    let result: Value = serde_json::from_slice(&add.stdout).expect("ADD result is JSON");
    assert_eq!(result["cniVersion"], "1.0.0");
    let ip = pod_address(&result);

    // The pod: eth0 with the address, MTU from subnet.env, route to the cluster
    // network through the bridge.
    let links = pod.ip_json(&["addr", "show", "dev", "eth0"]);
    let eth0 = &links[0];
    assert_eq!(eth0["mtu"], 1450, "{eth0}");
    assert!(
        eth0["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["local"] == ip.as_str() && a["prefixlen"] == 24),
        "{eth0}"
    );
    let routes = pod.ip_json(&["-4", "route", "show"]);
    let routes = routes.as_array().unwrap();
    assert!(
        routes.iter().any(|r| r["dst"] == "10.244.0.0/16"
            && r["gateway"] == "10.244.5.1"
            && r["dev"] == "eth0"),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.244.5.1"),
        "isDefaultGateway passed through: {routes:?}"
    );
    // The host side: the bridge holds the gateway address.
    let br = node.host.ip_json(&["addr", "show", "dev", &node.bridge]);
    assert!(
        br[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["local"] == "10.244.5.1" && a["prefixlen"] == 24),
        "{br}"
    );
    ping_from(&pod, "10.244.5.1");

    // The saved config and host-local's lease.
    let saved = std::fs::read(node.data_dir().join(&cid)).expect("saved delegate config");
    let saved: Value = serde_json::from_slice(&saved).unwrap();
    assert_eq!(saved["type"], "bridge");
    assert_eq!(saved["ipam"]["ranges"][0][0]["subnet"], "10.244.5.0/24");
    assert_eq!(node.leases(), vec![ip.clone()]);

    node.flannel("CHECK", &cid, &pod).ok();

    node.flannel("DEL", &cid, &pod).ok();
    let gone = Command::new("ip")
        .args(["-n", &pod.name, "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "eth0 still in the pod after DEL");
    assert!(!node.data_dir().join(&cid).exists(), "saved config removed");
    assert!(
        node.leases().is_empty(),
        "address released: {:?}",
        node.leases()
    );

    // DEL is idempotent.
    node.flannel("DEL", &cid, &pod).ok();
}

#[test]
fn del_after_the_pod_netns_is_gone() {
    if !can_run("del_after_the_pod_netns_is_gone") {
        return;
    }
    // The version of flannel's reference conflist.
    let node = Node {
        cni_version: "0.3.1",
        ..Node::new()
    };
    let mut pod = Netns::new();
    let cid = unique("ctr");
    let add = node.flannel("ADD", &cid, &pod);
    add.ok();
    let result: Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(result["cniVersion"], "0.3.1");
    let ip = pod_address(&result);
    assert_eq!(node.leases(), vec![ip]);

    pod.delete();
    assert!(!Path::new(&pod.path()).exists());
    node.flannel("DEL", &cid, &pod).ok();
    assert!(!node.data_dir().join(&cid).exists());
    assert!(
        node.leases().is_empty(),
        "address released: {:?}",
        node.leases()
    );
    node.flannel("DEL", &cid, &pod).ok();
}

#[test]
fn two_pods_share_the_bridge_and_reach_each_other() {
    if !can_run("two_pods_share_the_bridge_and_reach_each_other") {
        return;
    }
    let node = Node::new();
    let (a, b) = (Netns::new(), Netns::new());
    let (ca, cb) = (unique("ctr"), unique("ctr"));
    let ra = node.flannel("ADD", &ca, &a);
    ra.ok();
    let rb = node.flannel("ADD", &cb, &b);
    rb.ok();
    let ipa = pod_address(&serde_json::from_slice(&ra.stdout).unwrap());
    let ipb = pod_address(&serde_json::from_slice(&rb.stdout).unwrap());
    assert_ne!(ipa, ipb);
    ping_from(&a, &ipb);
    ping_from(&b, &ipa);
    node.flannel("DEL", &ca, &a).ok();
    node.flannel("DEL", &cb, &b).ok();
    assert!(node.leases().is_empty());
}

#[test]
fn bad_stdin_fails_before_touching_anything() {
    if !can_run("bad_stdin_fails_before_touching_anything") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new();
    let cid = unique("ctr");
    let base: Value = serde_json::from_str(&node.netconf()).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = base.clone();
        f(&mut v);
        v.to_string()
    };
    let cases = [
        ("invalid JSON", "{\"name\":".to_string()),
        (
            "missing name",
            with(&|v| {
                v.as_object_mut().unwrap().remove("name");
            }),
        ),
        (
            "unknown cniVersion",
            with(&|v| v["cniVersion"] = "0.9.9".into()),
        ),
        (
            "delegate with name",
            with(&|v| v["delegate"]["name"] = "x".into()),
        ),
        (
            "delegate with ipam",
            with(&|v| v["delegate"]["ipam"] = serde_json::json!({})),
        ),
    ];
    for (what, stdin) in cases {
        let r = run_in(
            &node.host,
            env!("CARGO_BIN_EXE_flannel"),
            &node.env("ADD", &cid, &pod),
            stdin.as_bytes(),
        );
        assert_ne!(r.code, 0, "{what}");
        let e: Value = serde_json::from_slice(&r.stdout).unwrap_or_else(|_| {
            panic!(
                "{what}: no CNI error: {}",
                String::from_utf8_lossy(&r.stdout)
            )
        });
        assert!(e["code"].is_u64() && e["msg"].is_string(), "{what}: {e}");
        assert!(
            !node.data_dir().join(&cid).exists(),
            "{what}: nothing saved"
        );
        let links = pod.ip_json(&["link", "show"]);
        assert_eq!(
            links.as_array().unwrap().len(),
            1,
            "{what}: pod has only lo"
        );
    }
}
