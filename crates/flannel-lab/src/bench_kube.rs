//! `flannel-lab bench-kube`: one agent in Kubernetes mode against the fake API
//! server holding a large cluster whose kubelets rewrite every node's status
//! periodically (node leases off), and what that costs the agent.
//!
//! Measured in one run, each next to a baseline from the same run:
//! * start → all routes with N annotated nodes (plus the API bytes it took, against
//!   the size of the node list);
//! * steady state under status churn (nothing flannel reads changes): API requests,
//!   bytes and watch events per minute received by the agent (counted by the fake
//!   server per client address), agent CPU seconds per minute against the fake
//!   server's (which produced and serialised the same events), lease events and
//!   kernel writes (`ip monitor` and the agent's kernel-apply metric; both must be 0);
//! * agent RSS with N peers against the same agent with 0 peers, bytes per peer;
//! * join / leave: a node added (annotated) / deleted → its route present / gone, p50
//!   and p99, with N nodes present and churn running.
//!
//! The fake server runs in the lab's underlay namespace on the bridge address; every
//! HTTP request to it or to the agent's metrics is made from a socket opened inside a
//! lab namespace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flannel_net::netns::{netns_path, run_in_netns};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bins::find_binary;
use crate::error::{LabError, Result};
use crate::lab::{poll_until, tail, Lab, UNDERLAY_GATEWAY};
use crate::measure::percentile;
use crate::process::{Proc, ProcOutput};
use crate::Monitor;

/// The fake API server's port on the underlay bridge address.
pub const API_PORT: u16 = 6443;
/// The agent's /metrics port inside its host namespace.
pub const METRICS_PORT: u16 = 9102;
/// The node the agent runs on.
pub const OWN_NODE: &str = "bench-self";
/// Its pod CIDR (the `--nodes` nodes use 10.1.0.0/24 upwards).
pub const OWN_CIDR: &str = "10.250.0.0/24";
const NET_CONF: &str = r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#;

/// What to measure.
#[derive(Debug, Clone)]
pub struct KubeBenchOptions {
    /// Nodes in the cluster besides the agent's own.
    pub nodes: usize,
    /// Every node's status is rewritten once per this period.
    pub churn_period: Duration,
    /// Steady state before the window starts.
    pub settle: Duration,
    /// Steady-state measurement window.
    pub window: Duration,
    /// Join/leave samples.
    pub joins: usize,
    /// Deadline for each wait.
    pub timeout: Duration,
}

impl Default for KubeBenchOptions {
    fn default() -> Self {
        KubeBenchOptions {
            nodes: 5000,
            churn_period: Duration::from_secs(10),
            settle: Duration::from_secs(15),
            window: Duration::from_secs(60),
            joins: 20,
            timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct KubeBenchReport {
    pub nodes: usize,
    pub churn_period_secs: f64,
    /// Agent spawn → all N routes in its host.
    pub start_to_routes_secs: f64,
    /// API bytes and requests the agent received from spawn until all routes.
    pub start_bytes: u64,
    pub start_requests: u64,
    /// Bytes of the N nodes as JSON (what one full list carries), the baseline of
    /// `start_bytes`.
    pub node_list_bytes: u64,
    pub window_secs: f64,
    /// Per minute, received by the agent (counted by the fake server).
    pub requests_per_min: f64,
    pub bytes_per_min: f64,
    pub watch_events_per_min: f64,
    /// Status updates the fake server made per minute (all nodes).
    pub updates_per_min: f64,
    /// CPU seconds per minute: the agent, and the fake server producing the events.
    pub agent_cpu_secs_per_min: f64,
    pub server_cpu_secs_per_min: f64,
    /// During the window (must be 0).
    pub lease_events: u64,
    pub kernel_applies: u64,
    pub kernel_monitor_lines: usize,
    /// RSS with 0 peers (same agent, same cluster shape) and with N, KiB.
    pub rss_kib_0_peers: u64,
    pub rss_kib_n_peers: u64,
    pub bytes_per_peer: f64,
    /// The agent's own (anonymous) part of the two, KiB.
    pub anon_kib_0_peers: u64,
    pub anon_kib_n_peers: u64,
    pub join_samples: usize,
    pub join_p50_ms: f64,
    pub join_p99_ms: f64,
    pub leave_p50_ms: f64,
    pub leave_p99_ms: f64,
    /// The bench's create request itself (part of every join sample), p50, ms.
    pub create_p50_ms: f64,
    /// Join measured from the create's response (the node stored) instead of its
    /// start, p50, ms (0 when the watch event beat the response).
    pub join_after_create_p50_ms: f64,
}

/// What the agent and the fake have done so far.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub at: Option<Instant>,
    pub requests: u64,
    pub bytes: u64,
    pub watch_events: u64,
    pub agent_cpu_secs: f64,
    pub server_cpu_secs: f64,
    pub lease_events: u64,
    pub kernel_applies: u64,
    pub resource_version: u64,
}

/// One HTTP/1.0 exchange from inside namespace `ns`.
pub fn http_in(
    ns: &str,
    addr: SocketAddrV4,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String)> {
    let target = SocketAddr::V4(addr);
    let stream = run_in_netns(&netns_path(ns), move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(10))
    })
    .map_err(|e| LabError::Invalid(format!("entering {ns}: {e}")))?
    .map_err(|e| LabError::io(format!("connect {addr} in {ns}"), e))?;
    let mut s = stream;
    let io = |what: &str, e| LabError::io(format!("{method} {path} ({what})"), e);
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| io("timeout", e))?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| io("write", e))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| io("read", e))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| LabError::Invalid(format!("{method} {path}: no end of headers")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| LabError::Invalid(format!("{method} {path}: no status in {head:?}")))?;
    Ok((status, body.to_string()))
}

/// CPU seconds (user + system) process `pid` has used.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| LabError::io(path.clone(), e))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| LabError::Invalid(format!("{path}: no command name")))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11) + ticks(12)) as f64 / hz)
}

/// Sum of the samples of metric family `name` (lines `name{...} value` or
/// `name value`) whose labels contain every `needle`.
pub fn metric_sum(text: &str, name: &str, needles: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The lab, the fake API server in its underlay namespace and (once started) the
/// agent on host 0 in Kubernetes mode. Fields drop in order: the fake goes before
/// the lab removes the namespaces.
pub struct KubeScale {
    fake: Proc,
    pub fake_log: PathBuf,
    api: SocketAddrV4,
    pub lab: Lab,
}

impl KubeScale {
    /// A one-host lab, the fake API server with the agent's own node (not yet
    /// annotated) and status churn of every node once per `churn_period`.
    pub fn start(churn_period: Duration, timeout: Duration) -> Result<KubeScale> {
        let fake_bin = find_binary("flannel-kube-fake")?;
        let lab = Lab::builder()
            .hosts(1)
            .backend("vxlan")
            .start_agents(false)
            .timeout(timeout)
            .agent_env("NODE_NAME", OWN_NODE)
            .agent_arg("--kube-subnet-mgr")
            .agent_arg(&format!(
                "--kube-api-url=http://{UNDERLAY_GATEWAY}:{API_PORT}"
            ))
            .agent_arg(&format!("--healthz-port={METRICS_PORT}"))
            .build()?;
        let conf = lab.run_dir().join("net-conf.json");
        std::fs::write(&conf, NET_CONF).map_err(|e| LabError::io("net-conf.json", e))?;
        let fake_log = lab.run_dir().join("kube-fake.log");
        let listen = format!("{UNDERLAY_GATEWAY}:{API_PORT}");
        let churn = churn_period.as_secs().max(1).to_string();
        let fake = lab.spawn_in(
            lab.under_ns(),
            &[
                &fake_bin.display().to_string(),
                "--listen",
                &listen,
                "--status-churn-secs",
                &churn,
                // A few churn periods of history, so a watch resumes rather than
                // re-lists after a reconnect.
                "--history",
                "30000",
            ],
            ProcOutput::File(fake_log.clone()),
        )?;
        let mut ks = KubeScale {
            fake,
            fake_log,
            api: SocketAddrV4::new(UNDERLAY_GATEWAY, API_PORT),
            lab,
        };
        // The network config is a file in Kubernetes mode; its path is known only
        // once the lab exists.
        let flanneld = find_binary("flanneld")?;
        let env = format!("FLANNELD_NET_CONFIG_PATH={}", conf.display());
        ks.lab.set_agent_wrapper(0, &["env", &env], &flanneld)?;
        poll_until(
            "the fake API server to answer",
            timeout,
            Duration::from_millis(50),
            || {
                if let Some(st) = ks.fake.try_wait() {
                    return Err(LabError::Invalid(format!(
                        "flannel-kube-fake exited ({st}): {}",
                        tail(&ks.fake_log, 20)
                    )));
                }
                Ok(ks.call("GET", "/healthz", "").is_ok_and(|(c, _)| c == 200))
            },
        )?;
        ks.add_node(OWN_NODE, 100_000, OWN_CIDR, "198.18.0.1", false)?;
        Ok(ks)
    }

    /// A request to the fake server from the underlay namespace.
    pub fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        http_in(self.lab.under_ns(), self.api, method, path, body)
    }

    fn ok(&self, method: &str, path: &str, body: &str) -> Result<String> {
        let (code, text) = self.call(method, path, body)?;
        if !(200..300).contains(&code) {
            return Err(LabError::Invalid(format!(
                "{method} {path}: HTTP {code}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        Ok(text)
    }

    /// Adds `count` annotated nodes (`node-00000`...) as their flanneld left them.
    pub fn populate(&self, count: usize) -> Result<()> {
        self.ok(
            "POST",
            "/fake/v1/populate",
            &json!({"count": count}).to_string(),
        )
        .map(drop)
    }

    /// Adds one realistic node; `annotate`: with flannel's annotations.
    pub fn add_node(
        &self,
        name: &str,
        index: usize,
        cidr: &str,
        ip: &str,
        annotate: bool,
    ) -> Result<()> {
        let body = json!({"name": name, "index": index, "podCIDR": cidr,
                          "publicIP": ip, "annotate": annotate});
        self.ok("POST", "/fake/v1/realistic-node", &body.to_string())
            .map(drop)
    }

    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.ok("DELETE", &format!("/api/v1/nodes/{name}"), "")
            .map(drop)
    }

    /// Routes through the vxlan device in the agent's host.
    pub fn routes(&self) -> Result<usize> {
        let out = self
            .lab
            .ip_in(&self.lab.hosts()[0].ns, &["-4", "route", "show"])?;
        Ok(out.lines().filter(|l| l.contains("dev flannel.1")).count())
    }

    /// Starts the agent and waits until it has `routes` vxlan routes.
    pub fn start_agent_until_routes(&mut self, routes: usize) -> Result<Duration> {
        let t0 = Instant::now();
        self.lab.spawn_agent(0)?;
        let timeout = self.lab.timeout();
        poll_until(
            &format!("{routes} vxlan routes in the agent's host"),
            timeout,
            Duration::from_millis(50),
            || {
                self.lab.check_agent(0)?;
                Ok(self.routes()? >= routes && self.lab.subnet_file(0)?.is_some())
            },
        )?;
        Ok(t0.elapsed())
    }

    pub fn metrics(&self) -> Result<String> {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS_PORT);
        let (code, text) = http_in(&self.lab.hosts()[0].ns, addr, "GET", "/metrics", "")?;
        if code != 200 {
            return Err(LabError::Invalid(format!("agent /metrics: HTTP {code}")));
        }
        Ok(text)
    }

    /// Requests, bytes and watch events the fake sent the agent's address.
    pub fn agent_traffic(&self) -> Result<(u64, u64, u64)> {
        let text = self.ok("GET", "/fake/v1/traffic", "")?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| LabError::Invalid(format!("/fake/v1/traffic: {e}")))?;
        let t = &v[self.lab.hosts()[0].ip.to_string()];
        let requests = t["requests"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        Ok((
            requests,
            t["bytes"].as_u64().unwrap_or(0),
            t["watch_events"].as_u64().unwrap_or(0),
        ))
    }

    pub fn resource_version(&self) -> Result<u64> {
        let text = self.ok("POST", "/fake/v1/populate", r#"{"count":0}"#)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| LabError::Invalid(format!("populate reply: {e}")))?;
        Ok(v["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    }

    pub fn snapshot(&mut self) -> Result<Snapshot> {
        let (requests, bytes, watch_events) = self.agent_traffic()?;
        let pid = self
            .lab
            .agent_pid(0)
            .ok_or_else(|| LabError::Invalid("the agent does not run".into()))?;
        let m = self.metrics()?;
        Ok(Snapshot {
            at: Some(Instant::now()),
            requests,
            bytes,
            watch_events,
            agent_cpu_secs: cpu_secs(pid)?,
            server_cpu_secs: cpu_secs(self.fake.pid())?,
            lease_events: metric_sum(&m, "flanneld_lease_events_total", &[]),
            kernel_applies: metric_sum(
                &m,
                "flanneld_kernel_apply_duration_seconds_count",
                &["what=\"events\""],
            ) + metric_sum(
                &m,
                "flanneld_kernel_apply_duration_seconds_count",
                &["what=\"reconcile\""],
            ),
            resource_version: self.resource_version()?,
        })
    }

    /// `ip monitor` of routes, neighbours and links in the agent's host.
    pub fn monitor(&self) -> Result<Monitor> {
        self.lab
            .monitor(&self.lab.hosts()[0].ns, &["route", "neigh", "link"])
    }

    /// Adds node `name` (annotated) and waits for its route; then deletes it and
    /// waits for the route to go. Returns (join, leave, the create request).
    pub fn join_leave(
        &self,
        mon: &mut Monitor,
        name: &str,
        index: usize,
        cidr: &str,
        ip: &str,
    ) -> Result<(Duration, Duration, Duration)> {
        let timeout = self.lab.timeout();
        let net = cidr.trim_end_matches("/24");
        let (route, deleted) = (format!("{cidr} "), format!("Deleted {cidr} "));
        let mark = mon.mark();
        let t0 = Instant::now();
        self.add_node(name, index, cidr, ip, true)?;
        let create = t0.elapsed();
        let t = mon
            .wait_for_after(mark, timeout, |l| l.starts_with(&route))
            .ok_or_else(|| LabError::Timeout {
                what: format!("route of joining node {name} ({net})"),
                after: timeout,
            })?;
        let join = t.saturating_duration_since(t0);
        let mark = mon.mark();
        let t0 = Instant::now();
        self.delete_node(name)?;
        let t = mon
            .wait_for_after(mark, timeout, |l| l.starts_with(&deleted))
            .ok_or_else(|| LabError::Timeout {
                what: format!("route of deleted node {name} ({net}) to go"),
                after: timeout,
            })?;
        Ok((join, t.saturating_duration_since(t0), create))
    }
}

/// An `ip monitor` line about something flanneld programs: the vxlan device, its
/// neighbours and FDB entries, or a route into the pod network (10.0.0.0/8 here).
pub fn is_flannel_change(line: &str) -> bool {
    let l = line.strip_prefix("Deleted ").unwrap_or(line);
    l.contains("flannel.1") || l.starts_with("10.")
}

fn per_min(v: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        v / secs * 60.0
    } else {
        0.0
    }
}

fn ms(d: Option<Duration>) -> f64 {
    d.unwrap_or_default().as_secs_f64() * 1000.0
}

/// Runs the whole measurement; `say` gets a progress line per step.
pub fn run(opts: &KubeBenchOptions, mut say: impl FnMut(&str)) -> Result<KubeBenchReport> {
    let mut ks = KubeScale::start(opts.churn_period, opts.timeout)?;
    // Baseline: the same agent with no peers (its own node only, churn on).
    say("agent with 0 peers (baseline RSS)");
    ks.start_agent_until_routes(0)?;
    std::thread::sleep(opts.settle.min(Duration::from_secs(5)));
    let rss0 = ks.lab.agent_rss(0)?;
    ks.lab.stop_agent(0)?;
    say(&format!(
        "  RSS {} KiB ({} KiB anonymous); adding {} nodes",
        rss0.total_kib, rss0.anon_kib, opts.nodes
    ));
    ks.populate(opts.nodes)?;
    let node_list_bytes = {
        let text = ks.ok("GET", "/api/v1/nodes", "")?;
        text.len() as u64
    };
    let before = ks.agent_traffic()?;
    say(&format!(
        "  {} nodes, {} bytes as one list; starting the agent",
        opts.nodes, node_list_bytes
    ));
    let took = ks.start_agent_until_routes(opts.nodes)?;
    let after = ks.agent_traffic()?;
    say(&format!(
        "  start -> {} routes: {:.2} s ({} requests, {} bytes)",
        opts.nodes,
        took.as_secs_f64(),
        after.0 - before.0,
        after.1 - before.1
    ));
    std::thread::sleep(opts.settle);
    let mut mon = ks.monitor()?;
    mon.barrier();
    let a = ks.snapshot()?;
    say(&format!(
        "steady state under status churn (every node every {:?}) for {:?}",
        opts.churn_period, opts.window
    ));
    std::thread::sleep(opts.window);
    let b = ks.snapshot()?;
    // The agent's own TCP connection to the API server moves ARP states on the
    // underlay link: not a flannel write.
    let lines: Vec<String> = mon
        .barrier()
        .into_iter()
        .filter(|l| is_flannel_change(l))
        .collect();
    ks.lab.check_agent(0)?;
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => y.duration_since(x).as_secs_f64(),
        _ => 0.0,
    };
    let rss_n = ks.lab.agent_rss(0)?;
    let mut report = KubeBenchReport {
        nodes: opts.nodes,
        churn_period_secs: opts.churn_period.as_secs_f64(),
        start_to_routes_secs: took.as_secs_f64(),
        start_bytes: after.1 - before.1,
        start_requests: after.0 - before.0,
        node_list_bytes,
        window_secs: secs,
        requests_per_min: per_min((b.requests - a.requests) as f64, secs),
        bytes_per_min: per_min((b.bytes - a.bytes) as f64, secs),
        watch_events_per_min: per_min((b.watch_events - a.watch_events) as f64, secs),
        updates_per_min: per_min(
            b.resource_version.saturating_sub(a.resource_version) as f64,
            secs,
        ),
        agent_cpu_secs_per_min: per_min(b.agent_cpu_secs - a.agent_cpu_secs, secs),
        server_cpu_secs_per_min: per_min(b.server_cpu_secs - a.server_cpu_secs, secs),
        lease_events: b.lease_events - a.lease_events,
        kernel_applies: b.kernel_applies - a.kernel_applies,
        kernel_monitor_lines: lines.len(),
        rss_kib_0_peers: rss0.total_kib,
        rss_kib_n_peers: rss_n.total_kib,
        bytes_per_peer: (rss_n.total_kib.saturating_sub(rss0.total_kib) * 1024) as f64
            / opts.nodes.max(1) as f64,
        anon_kib_0_peers: rss0.anon_kib,
        anon_kib_n_peers: rss_n.anon_kib,
        join_samples: 0,
        join_p50_ms: 0.0,
        join_p99_ms: 0.0,
        leave_p50_ms: 0.0,
        leave_p99_ms: 0.0,
        create_p50_ms: 0.0,
        join_after_create_p50_ms: 0.0,
    };
    if !lines.is_empty() {
        say(&format!(
            "  kernel changes under churn (first 5): {:?}",
            &lines[..lines.len().min(5)]
        ));
    }
    say(&format!("join/leave with {} nodes present", opts.nodes));
    let (mut join, mut leave) = (Vec::new(), Vec::new());
    let (mut create, mut after_create) = (Vec::new(), Vec::new());
    for j in 0..opts.joins.min(250) {
        let cidr = format!("10.251.{j}.0/24");
        let ip = format!("198.18.1.{}", j + 1);
        let (a, b, c) =
            ks.join_leave(&mut mon, &format!("joiner-{j:03}"), 200_000 + j, &cidr, &ip)?;
        join.push(a);
        leave.push(b);
        create.push(c);
        after_create.push(a.saturating_sub(c));
    }
    report.join_samples = join.len();
    report.join_p50_ms = ms(percentile(&join, 50));
    report.join_p99_ms = ms(percentile(&join, 99));
    report.leave_p50_ms = ms(percentile(&leave, 50));
    report.leave_p99_ms = ms(percentile(&leave, 99));
    report.create_p50_ms = ms(percentile(&create, 50));
    report.join_after_create_p50_ms = ms(percentile(&after_create, 50));
    ks.lab.check_agent(0)?;
    Ok(report)
}

/// The report as the lines `flannel-lab bench-kube` prints.
pub fn render(r: &KubeBenchReport) -> String {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!(
        "Kubernetes mode, {} nodes (realistic Node objects), every node's status rewritten every {:.0} s",
        r.nodes, r.churn_period_secs
    ));
    line(format!(
        "  start -> all routes          {:>10.2} s   ({} requests, {:.1} MiB received = {:.2} x one node list of {:.1} MiB)",
        r.start_to_routes_secs,
        r.start_requests,
        mib(r.start_bytes as f64),
        r.start_bytes as f64 / r.node_list_bytes.max(1) as f64,
        mib(r.node_list_bytes as f64)
    ));
    line(format!(
        "  steady state ({:.0} s window), per minute, received by the agent:",
        r.window_secs
    ));
    line(format!(
        "    API requests               {:>10.2}",
        r.requests_per_min
    ));
    line(format!(
        "    bytes                      {:>10.1} MiB  ({:.2} x the node list per minute)",
        mib(r.bytes_per_min),
        r.bytes_per_min / r.node_list_bytes.max(1) as f64
    ));
    line(format!(
        "    watch events               {:>10.0}      (server status updates: {:.0})",
        r.watch_events_per_min, r.updates_per_min
    ));
    line(format!(
        "    agent CPU                  {:>10.2} s   (fake API server producing them: {:.2} s; agent/server {:.2})",
        r.agent_cpu_secs_per_min,
        r.server_cpu_secs_per_min,
        r.agent_cpu_secs_per_min / r.server_cpu_secs_per_min.max(1e-9)
    ));
    line(format!(
        "    lease events               {:>10}      (must be 0)",
        r.lease_events
    ));
    line(format!(
        "    kernel writes              {:>10}      (ip monitor lines {}; must be 0)",
        r.kernel_applies, r.kernel_monitor_lines
    ));
    line(format!(
        "  agent RSS                    {:>10} KiB (0 peers: {} KiB) = {:.0} bytes per peer",
        r.rss_kib_n_peers, r.rss_kib_0_peers, r.bytes_per_peer
    ));
    line(format!(
        "    of it the agent's own      {:>10} KiB (0 peers: {} KiB; anonymous memory, the rest is the executable's pages from the page cache)",
        r.anon_kib_n_peers, r.anon_kib_0_peers
    ));
    line(format!(
        "  join  (node added -> route)  p50 {:>8.1} ms  p99 {:>8.1} ms  ({} samples, {} nodes present, churn on)",
        r.join_p50_ms, r.join_p99_ms, r.join_samples, r.nodes
    ));
    line(format!(
        "  leave (node deleted -> gone) p50 {:>8.1} ms  p99 {:>8.1} ms",
        r.leave_p50_ms, r.leave_p99_ms
    ));
    line(format!(
        "  (inside each join: the create request p50 {:.1} ms; join after its response p50 {:.1} ms)",
        r.create_p50_ms, r.join_after_create_p50_ms
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums() {
        let m = "# HELP x\nflanneld_lease_events_total{kind=\"added\"} 3\n\
                 flanneld_lease_events_total{kind=\"removed\"} 2\n\
                 flanneld_lease_events_total_other 9\n\
                 flanneld_kernel_apply_duration_seconds_count{what=\"events\"} 4\n\
                 flanneld_kernel_apply_duration_seconds_count{what=\"rules\"} 40\n";
        assert_eq!(metric_sum(m, "flanneld_lease_events_total", &[]), 5);
        assert_eq!(
            metric_sum(
                m,
                "flanneld_kernel_apply_duration_seconds_count",
                &["what=\"events\""]
            ),
            4
        );
    }

    #[test]
    fn own_cpu_is_readable() {
        assert!(cpu_secs(std::process::id()).unwrap() >= 0.0);
    }
}
