//! End-to-end for the Kubernetes subnet manager (`--kube-subnet-mgr`,
//! docs/compatibility.md, "Kubernetes subnet manager and node annotations"): the
//! fake API server (`flannel-kube-fake`) runs inside the lab's underlay namespace on
//! the bridge address, three nodes carry pod CIDRs, and a real flanneld per host
//! namespace (env `NODE_NAME`) takes its lease from its node, publishes the
//! annotations, sets the node condition and programs vxlan towards the others.
//!
//! Proven, in order, on one cluster:
//! 1. each subnet.env holds the node's pod CIDR; the node annotations and the
//!    `NetworkUnavailable=False` condition are exactly upstream's;
//! 2. pods on the three hosts reach each other over vxlan, whose neighbour and FDB
//!    entries carry the VTEP MACs the nodes publish;
//! 3. (printed; asserted only: no list, get or patch while idle) API requests per
//!    minute per agent over 30 s of idle steady state (`FLANNEL_E2E_KUBE_IDLE_SECS`
//!    to measure longer);
//! 4. a SIGTERM restart keeps the VTEP MAC and is hitless; a restart that must
//!    recreate the vxlan device takes the MAC from the node's `backend-data`;
//! 5. a node deleted from the API disappears from the other hosts' kernels.
//!
//! All HTTP to the fake goes through sockets opened inside the underlay namespace
//! (on a short-lived thread that enters it), never from the root namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use flannel_lab::bins::find_binary;
use flannel_lab::checks::{is_flannel_deletion, peer_entries, PeerModel};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::lab::{tail, UNDERLAY_GATEWAY};
use flannel_lab::measure::{ping_gaps, ping_reply_seqs};
use flannel_lab::process::{Proc, ProcOutput};
use flannel_lab::{poll_until, Lab, PodId};
use flannel_net::netns::{netns_path, run_in_netns};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(90);
/// The fake API server's port on the underlay bridge address.
const API_PORT: u16 = 6443;
const PREFIX: &str = "flannel.alpha.coreos.com/";
const NETWORK: &str = "10.244.0.0/16";
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WIREGUARD_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
/// Pod CIDRs unlike anything an etcd allocation would pick first, so a lease can
/// only have come from its node.
const POD_CIDRS: [&str; 3] = ["10.244.11.0/24", "10.244.22.0/24", "10.244.33.0/24"];
/// How long the idle request rate is measured; `FLANNEL_E2E_KUBE_IDLE_SECS` makes it
/// longer (watch reconnects come every ~290 s per agent).
fn idle_window() -> Duration {
    let secs = std::env::var("FLANNEL_E2E_KUBE_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

fn node_name(h: usize) -> String {
    format!("node-{}", h + 1)
}

fn cidr(h: usize) -> Ipv4Net {
    POD_CIDRS[h].parse().expect("constant CIDR")
}

// ----- HTTP to the fake, from inside the underlay namespace -----

/// A client of the fake API server reachable only inside namespace `ns`.
struct ApiClient {
    ns: String,
    addr: SocketAddrV4,
    /// `verb path` of every API request this test sent, to tell them apart from the
    /// agents' in the fake's request log.
    sent: Mutex<Vec<String>>,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
}

impl ApiClient {
    /// Connects from inside the namespace: the socket belongs to the namespace it was
    /// created in, so only the short-lived thread that makes it enters the namespace
    /// (never a thread that runs anything else).
    fn connect(&self) -> anyhow::Result<TcpStream> {
        let addr = SocketAddr::V4(self.addr);
        let ns = self.ns.clone();
        run_in_netns(&netns_path(&self.ns), move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .with_context(|| format!("connect {addr} in {ns}"))
        })?
    }

    /// One HTTP/1.0 request (the server closes the connection after replying).
    fn call(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> anyhow::Result<Reply> {
        if path.starts_with("/api/") {
            let verb = match method {
                "GET" => "get",
                "POST" => "create",
                "PUT" => "update",
                "PATCH" => "patch",
                "DELETE" => "delete",
                other => other,
            };
            let path = path.split('?').next().unwrap_or(path);
            self.sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{verb} {path}"));
        }
        let mut s = self.connect()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(ct) = content_type {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .with_context(|| format!("{method} {path}: reading the reply"))?;
        let text = String::from_utf8(buf).context("reply is not UTF-8")?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("{method} {path}: no end of headers in {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("{method} {path}: no status in {head:?}"))?;
        // Non-JSON bodies (`/healthz` says `ok`) are kept as a string.
        let body = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()))
        };
        Ok(Reply { status, body })
    }

    fn ok(&self, method: &str, path: &str, ct: Option<&str>, body: &str) -> anyhow::Result<Value> {
        let r = self.call(method, path, ct, body)?;
        if !(200..300).contains(&r.status) {
            bail!("{method} {path}: HTTP {} {}", r.status, r.body);
        }
        Ok(r.body)
    }

    fn node(&self, name: &str) -> anyhow::Result<Value> {
        self.ok("GET", &format!("/api/v1/nodes/{name}"), None, "")
    }

    /// How many API requests this test has sent so far.
    fn sent_count(&self) -> usize {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Counts by `verb path` of the requests in `log` that the agents sent: the
    /// fake's log minus this test's own requests `sent[since..]`.
    fn agents_tally(&self, log: &[Value], since: usize) -> BTreeMap<String, usize> {
        let mut m = tally(log);
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        for k in sent.iter().skip(since) {
            if let Some(n) = m.get_mut(k) {
                *n = n.saturating_sub(1);
            }
        }
        m.retain(|_, n| *n > 0);
        m
    }

    /// The fake's log of API requests (its control calls excluded).
    fn requests(&self) -> anyhow::Result<Vec<Value>> {
        match self.ok("GET", "/fake/v1/requests", None, "")? {
            Value::Array(a) => Ok(a),
            other => bail!("requests: not an array: {other}"),
        }
    }
}

/// The flannel annotations of a node (prefix stripped).
fn flannel_annotations(node: &Value) -> BTreeMap<String, String> {
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

fn condition<'a>(node: &'a Value, ty: &str) -> Option<&'a Value> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
}

// ----- processes -----

/// Modification stamp of a file: changes when it is rewritten.
fn stamp(p: &Path) -> Option<(u64, i64, i64, u64)> {
    fs::metadata(p)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// The fake API server and the agents this test runs itself (the lab's own agent
/// helpers give every host the same environment; each agent here needs its own
/// `NODE_NAME`).
struct Procs {
    fake: Option<Proc>,
    fake_log: PathBuf,
    agents: Vec<Option<Proc>>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- flannel-kube-fake log (end)\n{}",
                tail(&self.fake_log, 30)
            );
        }
    }
}

/// Fields drop in order: the processes go before the lab removes the namespaces.
struct Cluster {
    procs: Procs,
    api: ApiClient,
    pods: Vec<PodId>,
    lab: Lab,
}

impl Cluster {
    fn agent_argv(&self, h: usize) -> Vec<String> {
        let mut argv = vec!["env".to_string(), format!("NODE_NAME={}", node_name(h))];
        for (k, v) in self.lab.hosts()[h].own_files_env() {
            argv.push(format!("{k}={}", v.display()));
        }
        argv.extend(self.lab.agent_command(h).expect("agent command"));
        argv.push("--kube-subnet-mgr".into());
        argv.push(format!(
            "--kube-api-url=http://{UNDERLAY_GATEWAY}:{API_PORT}"
        ));
        argv.push(format!(
            "--net-config-path={}",
            self.lab.run_dir().join("net-conf.json").display()
        ));
        argv
    }

    /// Starts flanneld on host `h` and waits until it (re)wrote its subnet file.
    fn start_agent(&mut self, h: usize) {
        let host = &self.lab.hosts()[h];
        let (ns, log, sf) = (host.ns.clone(), host.log_file(), host.subnet_file());
        let before = stamp(&sf);
        let argv = self.agent_argv(h);
        let marker = format!("===== e2e_kube: starting {}\n", argv.join(" "));
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(marker.as_bytes()))
            .expect("agent log");
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let p = self
            .lab
            .spawn_in(&ns, &args, ProcOutput::File(log.clone()))
            .expect("spawn flanneld");
        self.procs.agents[h] = Some(p);
        poll_until(
            &format!("flanneld on {ns} to write {}", sf.display()),
            DEADLINE,
            Duration::from_millis(20),
            || {
                self.check_agent(h);
                let now = stamp(&sf);
                Ok(now.is_some() && now != before && self.lab.subnet_file(h)?.is_some())
            },
        )
        .unwrap();
    }

    /// Panics with the log tail if host `h`'s agent has exited.
    fn check_agent(&mut self, h: usize) {
        let log = self.lab.hosts()[h].log_file();
        if let Some(p) = self.procs.agents[h].as_mut() {
            if let Some(st) = p.try_wait() {
                panic!("flanneld on host {h} exited ({st}):\n{}", tail(&log, 40));
            }
        }
    }

    /// SIGTERM to host `h`'s agent; asserts it exits cleanly in time.
    fn stop_agent(&mut self, h: usize) {
        let mut p = self.procs.agents[h].take().expect("agent running");
        let (st, killed) = p.terminate(DEADLINE).expect("terminate");
        assert!(!killed, "flanneld on host {h} ignored SIGTERM");
        assert!(st.success(), "flanneld on host {h} exit on SIGTERM: {st}");
    }

    fn vtep_mac(&self, h: usize) -> Option<String> {
        let ns = &self.lab.hosts()[h].ns;
        let out = self
            .lab
            .ip_in(ns, &["-j", "link", "show", "flannel.1"])
            .ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        v.get(0)?.get("address")?.as_str().map(str::to_string)
    }

    fn annotations(&self, h: usize) -> BTreeMap<String, String> {
        flannel_annotations(&self.api.node(&node_name(h)).expect("GET node"))
    }

    fn pod_ip(&self, p: PodId) -> Ipv4Addr {
        self.lab.pod(p).unwrap().ip
    }

    /// Every pod reaches every other pod.
    fn wait_mesh(&self) {
        for &a in &self.pods {
            for &b in &self.pods {
                if a != b {
                    self.lab
                        .wait_reachable(a, self.pod_ip(b))
                        .expect("reachable");
                }
            }
        }
    }

    /// Waits until host `h` has vxlan entries for `peer` that use `mac`.
    fn wait_peer_with_mac(&self, h: usize, peer: usize, mac: &str) {
        let pip = self.lab.hosts()[peer].ip;
        let mut last = None;
        let r = poll_until(
            "vxlan entries",
            DEADLINE,
            Duration::from_millis(100),
            || {
                let e = peer_entries(&self.lab, h, cidr(peer), pip)?;
                let ok = e.complete(PeerModel::VxlanL2, pip)
                    && e.routes
                        .iter()
                        .any(|r| r.contains("dev flannel.1") && r.contains("onlink"))
                    && e.neighbours
                        .iter()
                        .any(|n| n.contains(&format!("lladdr {mac}")))
                    && e.fdb.iter().any(|f| f.starts_with(&format!("{mac} ")));
                last = Some(e);
                Ok(ok)
            },
        );
        if let Err(e) = r {
            panic!(
                "host {h} has no vxlan entries for {} with MAC {mac}: {e}; last seen {last:#?}",
                cidr(peer)
            );
        }
    }
}

/// A ping running in the background, its output in a file.
struct BgPing {
    proc_: Proc,
    out: PathBuf,
}

impl BgPing {
    fn start(lab: &Lab, from: PodId, to: Ipv4Addr, tag: &str) -> BgPing {
        let ns = lab.pod(from).unwrap().ns.clone();
        let out = lab.run_dir().join(format!("ping-{tag}.txt"));
        let proc_ = lab
            .spawn_in(
                &ns,
                &["ping", "-n", "-i", "0.2", "-W", "2", &to.to_string()],
                ProcOutput::File(out.clone()),
            )
            .unwrap();
        BgPing { proc_, out }
    }
    fn replies(&self) -> BTreeSet<u32> {
        ping_reply_seqs(&fs::read_to_string(&self.out).unwrap_or_default())
    }
    fn wait_replies(&self, n: usize) {
        poll_until(
            &format!("{n} replies in {}", self.out.display()),
            DEADLINE,
            Duration::from_millis(100),
            || Ok(self.replies().len() >= n),
        )
        .unwrap();
    }
    fn stop(mut self) -> BTreeSet<u32> {
        self.proc_.signal(Signal::SIGINT).unwrap();
        self.proc_.wait_timeout(DEADLINE);
        self.replies()
    }
}

/// Counts of requests by `verb path`.
fn tally(reqs: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in reqs {
        let k = format!(
            "{} {}",
            r["verb"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?")
        );
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// The lab, the fake API server with three nodes, and no agent yet; `None` when
/// the test must skip. `net_conf` is the mounted net-conf.json.
fn cluster(backend: &str, net_conf: &str) -> Option<Cluster> {
    const TEST: &str = "kube subnet manager end-to-end";
    if !ready(TEST, Needs::Agents) {
        return None;
    }
    let fake_bin = match find_binary("flannel-kube-fake") {
        Ok(b) => b,
        Err(e) => {
            flannel_testkit::skip_or_fail(TEST, format!("{e} (cargo build --workspace --bins)"));
            return None;
        }
    };
    let lab = Lab::builder()
        .hosts(3)
        .backend(backend)
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    fs::write(lab.run_dir().join("net-conf.json"), net_conf).expect("write net-conf.json");
    let fake_log = lab.run_dir().join("kube-fake.log");
    let listen = format!("{UNDERLAY_GATEWAY}:{API_PORT}");
    let state = lab.run_dir().join("kube-state.json");
    let fake = lab
        .spawn_in(
            lab.under_ns(),
            &[
                &fake_bin.display().to_string(),
                "--listen",
                &listen,
                "--state",
                &state.display().to_string(),
            ],
            ProcOutput::File(fake_log.clone()),
        )
        .expect("spawn flannel-kube-fake");
    let api = ApiClient {
        ns: lab.under_ns().to_string(),
        addr: SocketAddrV4::new(UNDERLAY_GATEWAY, API_PORT),
        sent: Mutex::new(Vec::new()),
    };
    let mut c = Cluster {
        lab,
        api,
        procs: Procs {
            fake: Some(fake),
            fake_log,
            agents: (0..3).map(|_| None).collect(),
        },
        pods: Vec::new(),
    };
    poll_until(
        "the fake API server to answer",
        DEADLINE,
        Duration::from_millis(50),
        || {
            if let Some(st) = c.procs.fake.as_mut().and_then(Proc::try_wait) {
                panic!(
                    "flannel-kube-fake exited ({st}): {}",
                    tail(&c.procs.fake_log, 20)
                );
            }
            Ok(c.api
                .call("GET", "/healthz", None, "")
                .is_ok_and(|r| r.status == 200))
        },
    )
    .unwrap();
    for (h, pod_cidr) in POD_CIDRS.iter().enumerate() {
        // node-3 has only the single-stack `spec.podCIDR` of older clusters; the
        // others also `spec.podCIDRs`, as current controller managers write.
        let spec = if h == 2 {
            json!({"podCIDR": pod_cidr})
        } else {
            json!({"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]})
        };
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node_name(h)},
            "spec": spec,
        });
        let r = c
            .api
            .call(
                "POST",
                "/api/v1/nodes",
                Some("application/json"),
                &node.to_string(),
            )
            .expect("create node");
        assert_eq!(r.status, 201, "create {}: {}", node_name(h), r.body);
        assert!(flannel_annotations(&r.body).is_empty());
    }
    Some(c)
}

#[test]
fn kube_subnet_manager_end_to_end() {
    let Some(mut c) = cluster("vxlan", NET_CONF) else {
        return;
    };
    for h in 0..3 {
        c.start_agent(h);
    }

    // ----- 1. lease from the pod CIDR; annotations and condition as upstream -----
    let mut macs = Vec::new();
    for h in 0..3 {
        let sf = c.lab.subnet_file(h).unwrap().expect("subnet.env");
        let gw = cidr(h).hosts().next().unwrap();
        assert_eq!(
            sf.text,
            format!(
                "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={gw}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
            ),
            "subnet.env of host {h}"
        );
        let mac = c.vtep_mac(h).expect("flannel.1 on the host");
        let want: BTreeMap<String, String> = [
            ("backend-type", "vxlan".to_string()),
            ("backend-data", format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)),
            ("public-ip", c.lab.hosts()[h].ip.to_string()),
            ("kube-subnet-manager", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(c.annotations(h), want, "annotations of {}", node_name(h));
        // The condition is set once the backend runs, after subnet.env.
        poll_until(
            &format!("{} to get NetworkUnavailable=False", node_name(h)),
            DEADLINE,
            Duration::from_millis(100),
            || Ok(condition(&c.api.node(&node_name(h)).unwrap(), "NetworkUnavailable").is_some()),
        )
        .unwrap();
        let node = c.api.node(&node_name(h)).unwrap();
        let cond = condition(&node, "NetworkUnavailable").unwrap();
        assert_eq!(cond["status"], "False", "{cond}");
        assert_eq!(cond["reason"], "FlannelIsUp", "{cond}");
        assert_eq!(cond["message"], "Flannel is running on this node", "{cond}");
        for t in ["lastHeartbeatTime", "lastTransitionTime"] {
            let ts = cond[t].as_str().unwrap_or("");
            assert!(
                ts.len() == 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                "{t} {ts:?} is not whole-second RFC 3339 UTC"
            );
        }
        // The spec (pod CIDR) is the controller manager's, never flanneld's.
        assert_eq!(node["spec"]["podCIDR"], cidr(h).to_string());
        println!(
            "{}: subnet {} VtepMAC {mac} condition {}",
            node_name(h),
            sf.subnet,
            cond
        );
        macs.push(mac);
    }
    let distinct: BTreeSet<&String> = macs.iter().collect();
    assert_eq!(distinct.len(), 3, "VTEP MACs {macs:?}");

    // ----- 2. pods reach each other over vxlan -----
    for h in 0..3 {
        let p = c.lab.add_pod(h).expect("pod");
        assert!(
            cidr(h).contains(&c.pod_ip(p)),
            "pod {} on host {h} is outside {}",
            c.pod_ip(p),
            cidr(h)
        );
        c.pods.push(p);
    }
    for h in 0..3 {
        for peer in (0..3).filter(|p| *p != h) {
            c.wait_peer_with_mac(h, peer, &macs[peer]);
        }
    }
    c.wait_mesh();
    for &a in &c.pods {
        for &b in &c.pods {
            if a != b {
                let st = c.lab.ping(a, c.pod_ip(b), 3).unwrap();
                assert!(
                    st.received > 0,
                    "{} -> {}: {st:?}",
                    c.pod_ip(a),
                    c.pod_ip(b)
                );
            }
        }
    }
    println!("every pair of the 3 pods pings over vxlan");

    // ----- 3. API requests at idle steady state -----
    let before = c.api.requests().unwrap();
    let own_before = c.api.sent_count();
    let t0 = Instant::now();
    std::thread::sleep(idle_window());
    let after = c.api.requests().unwrap();
    let window = t0.elapsed();
    for h in 0..3 {
        c.check_agent(h);
    }
    assert_eq!(
        c.api.sent_count(),
        own_before,
        "the test sent requests while idle"
    );
    let idle = &after[before.len().min(after.len())..];
    let per_agent_per_min = idle.len() as f64 / 3.0 / window.as_secs_f64() * 60.0;
    println!(
        "idle steady state: {} API requests from 3 agents in {:.1} s = {per_agent_per_min:.2} requests/min per agent; by kind: {:?}",
        idle.len(),
        window.as_secs_f64(),
        tally(idle)
    );
    println!(
        "the 3 agents' API requests from their start to steady state ({} in all): {:#?}",
        c.api.agents_tally(&before, 0).values().sum::<usize>(),
        c.api.agents_tally(&before, 0)
    );
    // Whatever the count, nothing may be polling: no list, get or patch while idle
    // (a watch reconnect is allowed).
    let polling: Vec<&Value> = idle.iter().filter(|r| r["verb"] != "watch").collect();
    assert!(polling.is_empty(), "requests while idle: {polling:?}");

    // ----- 4a. SIGTERM restart: same VTEP MAC, hitless -----
    let r = 1;
    let ann_before = c.annotations(r);
    let mut monitors: Vec<_> = (0..3)
        .map(|h| {
            let ns = c.lab.hosts()[h].ns.clone();
            c.lab.monitor(&ns, &["link", "route", "neigh"]).unwrap()
        })
        .collect();
    let into = BgPing::start(&c.lab, c.pods[0], c.pod_ip(c.pods[r]), "into");
    let out_of = BgPing::start(&c.lab, c.pods[r], c.pod_ip(c.pods[2]), "out-of");
    into.wait_replies(5);
    out_of.wait_replies(5);
    let reqs_before = c.api.requests().unwrap().len();
    let own_before = c.api.sent_count();
    c.stop_agent(r);
    // With the agent down the data plane stays: replies keep coming.
    let (n_into, n_out) = (into.replies().len(), out_of.replies().len());
    into.wait_replies(n_into + 5);
    out_of.wait_replies(n_out + 5);
    c.start_agent(r);
    let (n_into, n_out) = (into.replies().len(), out_of.replies().len());
    into.wait_replies(n_into + 20);
    out_of.wait_replies(n_out + 20);
    assert_eq!(
        c.vtep_mac(r).as_deref(),
        Some(macs[r].as_str()),
        "VTEP MAC after restart"
    );
    assert_eq!(c.annotations(r), ann_before, "annotations after restart");
    for (what, p) in [("into", into), ("out of", out_of)] {
        let seqs = p.stop();
        assert_eq!(
            ping_gaps(&seqs),
            Vec::<u32>::new(),
            "replies lost pinging {what} the restarted host"
        );
    }
    let network: Ipv4Net = NETWORK.parse().unwrap();
    for (h, m) in monitors.iter_mut().enumerate() {
        let deleted: Vec<String> = m
            .lines()
            .into_iter()
            .filter(|l| is_flannel_deletion(l, network))
            .collect();
        assert!(
            deleted.is_empty(),
            "host {h} saw flannel entries deleted during the restart: {deleted:#?}"
        );
    }
    drop(monitors);
    let restart_reqs = c.api.requests().unwrap();
    println!(
        "SIGTERM restart of {}: VTEP MAC {} kept; the restarted agent's API requests: {:?}",
        node_name(r),
        macs[r],
        c.api.agents_tally(
            &restart_reqs[reqs_before.min(restart_reqs.len())..],
            own_before
        )
    );
    c.wait_mesh();

    // ----- 4b. restart that must recreate the device: MAC from backend-data -----
    c.stop_agent(r);
    let ns = c.lab.hosts()[r].ns.clone();
    c.lab.ip_in(&ns, &["link", "del", "flannel.1"]).unwrap();
    assert_eq!(c.vtep_mac(r), None);
    c.start_agent(r);
    assert_eq!(
        c.vtep_mac(r).as_deref(),
        Some(macs[r].as_str()),
        "recreated device's MAC"
    );
    assert_eq!(c.annotations(r), ann_before);
    c.wait_mesh();
    println!("device recreated by a restart kept VTEP MAC {}", macs[r]);

    // The MAC really comes from the annotation: publish another one while the agent
    // is down (as a previous run would have), drop the device, start again.
    let new_mac = "0a:58:0a:f4:16:02";
    c.stop_agent(r);
    c.lab.ip_in(&ns, &["link", "del", "flannel.1"]).unwrap();
    let patch = json!({"metadata": {"annotations": {
        format!("{PREFIX}backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{new_mac}"}}"#)
    }}});
    c.api
        .ok(
            "PATCH",
            &format!("/api/v1/nodes/{}/status", node_name(r)),
            Some("application/strategic-merge-patch+json"),
            &patch.to_string(),
        )
        .unwrap();
    c.start_agent(r);
    assert_eq!(
        c.vtep_mac(r).as_deref(),
        Some(new_mac),
        "MAC from backend-data"
    );
    for h in (0..3).filter(|h| *h != r) {
        c.wait_peer_with_mac(h, r, new_mac);
    }
    c.wait_mesh();
    println!("device recreated with VTEP MAC {new_mac} taken from the node's backend-data");

    // ----- 5. a deleted node disappears from the others -----
    let gone = 2;
    let pip = c.lab.hosts()[gone].ip;
    c.api
        .ok(
            "DELETE",
            &format!("/api/v1/nodes/{}", node_name(gone)),
            None,
            "",
        )
        .unwrap();
    for h in (0..3).filter(|h| *h != gone) {
        poll_until(
            &format!("host {h} to drop its entries for {}", cidr(gone)),
            DEADLINE,
            Duration::from_millis(100),
            || Ok(peer_entries(&c.lab, h, cidr(gone), pip)?.is_empty()),
        )
        .unwrap();
        // Nothing of the gone VTEP remains on the vxlan device.
        let fdb = c.lab.fdb(h, "flannel.1").unwrap();
        assert!(
            !fdb.iter().any(|l| l.starts_with(&macs[gone])),
            "host {h} fdb still has {}: {fdb:?}",
            macs[gone]
        );
        let neigh = c.lab.neighbours(h, "flannel.1").unwrap();
        assert!(
            !neigh.iter().any(|l| l.contains(&macs[gone])),
            "host {h} neighbours still have {}: {neigh:?}",
            macs[gone]
        );
        poll_until(
            "the deleted node's pod to become unreachable",
            DEADLINE,
            Duration::from_millis(200),
            || Ok(c.lab.ping(c.pods[h], c.pod_ip(c.pods[gone]), 1)?.received == 0),
        )
        .unwrap();
    }
    // The remaining two still reach each other.
    c.lab
        .wait_reachable(c.pods[0], c.pod_ip(c.pods[1]))
        .unwrap();
    c.lab
        .wait_reachable(c.pods[1], c.pod_ip(c.pods[0]))
        .unwrap();
    for h in (0..3).filter(|h| *h != gone) {
        c.check_agent(h);
    }
    // As upstream (which does not monitor its lease in Kubernetes mode), the deleted
    // node's own agent keeps running: its podCIDR lease does not expire. Before this
    // was decided it exited within a second of the deletion, so a few seconds of
    // watching are enough to catch a regression.
    std::thread::sleep(Duration::from_secs(3));
    c.check_agent(gone);
    println!(
        "{} deleted: gone from the other hosts; its own agent kept running",
        node_name(gone)
    );
}

/// The wireguard backend in Kubernetes mode: each node's `backend-data` annotation
/// carries its public key and port in Go's bytes (the same BackendData as an etcd
/// lease), and the pods of the three nodes reach each other through flannel-wg.
#[test]
fn kube_wireguard_mesh() {
    if !flannel_lab::e2e::ready_with("kube wireguard", flannel_lab::e2e::Needs::Agents, &["wg"]) {
        return;
    }
    let Some(mut c) = cluster("wireguard", WIREGUARD_NET_CONF) else {
        return;
    };
    for h in 0..3 {
        c.start_agent(h);
    }
    for h in 0..3 {
        let sf = c.lab.subnet_file(h).unwrap().expect("subnet.env");
        let gw = cidr(h).hosts().next().unwrap();
        assert_eq!(
            sf.text,
            format!(
                "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={gw}/24\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=true\n"
            ),
            "subnet.env of host {h}"
        );
        let public = c.lab.wireguard_public_key(h).expect("wg pubkey");
        let want: BTreeMap<String, String> = [
            ("backend-type", "wireguard".to_string()),
            (
                "backend-data",
                format!(r#"{{"PublicKey":"{public}","Port":51820}}"#),
            ),
            ("public-ip", c.lab.hosts()[h].ip.to_string()),
            ("kube-subnet-manager", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(c.annotations(h), want, "annotations of {}", node_name(h));
    }
    for h in 0..3 {
        let p = c.lab.add_pod(h).expect("pod");
        c.pods.push(p);
    }
    c.wait_mesh();
    for h in 0..3 {
        let routes = c
            .lab
            .run_in(
                &c.lab.hosts()[h].ns.clone(),
                &["ip", "route", "show", NETWORK],
            )
            .expect("ip route");
        assert!(
            routes.contains("dev flannel-wg") && routes.contains("scope link"),
            "host {h}: {routes}"
        );
    }
    println!("every pair of the 3 pods reaches the others over wireguard in kube mode");
}
