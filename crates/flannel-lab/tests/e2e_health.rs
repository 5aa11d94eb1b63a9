//! End-to-end: flanneld's health endpoints on real agents in a namespace lab.
//!
//! Each agent serves `--healthz-ip=<its underlay address>` inside its host namespace,
//! and every request is made from a thread inside that namespace (never from the
//! root namespace). Checked:
//! * `/readyz` is 503 naming what is missing while the agent waits for a network
//!   config that is not in etcd yet, and 200 once it holds a lease, the backend runs,
//!   the rules are in place and subnet.env is written; `/healthz` is 200 throughout.
//! * `/metrics` parses with a Prometheus text parser and follows the cluster: a peer
//!   joining moves `flanneld_peers` and `flanneld_lease_events_total`.
//! * After a run that exercises the failure paths too (the vxlan device taken down
//!   so the kernel refuses the new peer's route; a masquerade rule deleted so the
//!   resync restores it), every declared metric family shows a non-default value,
//!   except the ones only the udp backend can move (listed in [`UDP_ONLY`]).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::http::{http_get, Response};
use flannel_lab::lab::ETCD_PREFIX;
use flannel_lab::process::{Proc, ProcOutput};
use flannel_lab::{poll_until, Lab};
use prometheus_parse::{Scrape, Value};

const DEADLINE: Duration = Duration::from_secs(90);
const HEALTH_PORT: u16 = 10260;

/// Families that only the udp backend updates: with vxlan the kernel carries the
/// packets, so the agent has nothing to count. Declared (and on the page) for every
/// backend; the check below skips them and nothing else.
const UDP_ONLY: [&str; 3] = [
    "flanneld_backend_packets",
    "flanneld_backend_bytes",
    "flanneld_backend_drops",
];

// ----- agents with per-host health flags -----

/// A flanneld started by this test (the lab's own agent flags are the same for every
/// host; the health address differs per host).
struct Agent {
    proc_: Proc,
    ns: String,
    health: SocketAddrV4,
}

impl Agent {
    fn start(lab: &Lab, h: usize) -> Agent {
        let host = &lab.hosts()[h];
        let health = SocketAddrV4::new(host.ip, HEALTH_PORT);
        let mut argv = lab.agent_command(h).unwrap();
        argv.push(format!("--healthz-ip={}", host.ip));
        argv.push(format!("--healthz-port={HEALTH_PORT}"));
        // Restored rules show up within a second instead of five.
        argv.push("--iptables-resync=1".into());
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let proc_ = lab
            .spawn_in(&host.ns, &args, ProcOutput::File(host.log_file()))
            .unwrap();
        Agent {
            proc_,
            ns: host.ns.clone(),
            health,
        }
    }

    fn alive(&mut self) {
        if let Some(st) = self.proc_.try_wait() {
            panic!("flanneld on {} exited: {st}", self.ns);
        }
    }

    fn get(&mut self, path: &str) -> Response {
        self.alive();
        http_get(&self.ns, self.health, path)
            .unwrap_or_else(|e| panic!("GET {path} from {}: {e}", self.ns))
    }

    /// Waits until the health server answers at all.
    fn wait_listening(&mut self) {
        let (ns, addr) = (self.ns.clone(), self.health);
        poll_until(
            &format!("health server on {addr} in {ns}"),
            DEADLINE,
            Duration::from_millis(50),
            || {
                self.alive();
                Ok(http_get(&ns, addr, "/healthz").is_ok())
            },
        )
        .unwrap();
    }

    fn wait_ready(&mut self) -> Response {
        let mut last = None;
        let (ns, addr) = (self.ns.clone(), self.health);
        poll_until(
            &format!("/readyz of {ns} to be 200"),
            DEADLINE,
            Duration::from_millis(50),
            || {
                self.alive();
                let r = http_get(&ns, addr, "/readyz");
                let ok = matches!(&r, Ok(r) if r.status == 200);
                last = r.ok();
                Ok(ok)
            },
        )
        .unwrap();
        last.unwrap()
    }

    fn scrape(&mut self) -> Scrape {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.headers
                .contains("content-type: application/openmetrics-text")
                || r.headers.contains("content-type: text/plain"),
            "{}",
            r.headers
        );
        assert!(
            r.body.ends_with("# EOF\n"),
            "no OpenMetrics end marker:\n{}",
            r.body
        );
        Scrape::parse(r.body.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("metrics do not parse: {e}\n{}", r.body))
    }
}

// ----- reading scrapes -----

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        // The number of observations: the largest cumulative bucket count.
        Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
        Value::Summary(s) => s.iter().map(|q| q.count).fold(0.0, f64::max),
    }
}

/// The value of the sample `metric` with all of `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| number(&x.value))
}

/// The sum over every label set of `metric`.
fn sum(s: &Scrape, metric: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .map(|x| number(&x.value))
        .sum()
}

/// The family (a `# HELP` name) a sample belongs to: the name itself or the name plus
/// an OpenMetrics suffix. `_created` samples carry timestamps, not values.
fn family_of<'a>(sample: &str, families: &'a BTreeSet<String>) -> Option<&'a String> {
    const SUFFIXES: [&str; 5] = ["_total", "_info", "_bucket", "_count", "_sum"];
    if sample.ends_with("_created") {
        return None;
    }
    families.iter().find(|f| {
        sample == f.as_str()
            || sample
                .strip_prefix(f.as_str())
                .is_some_and(|rest| SUFFIXES.contains(&rest))
    })
}

/// Families with at least one sample different from its default (0 for gauges and
/// counters, no observation for histograms).
fn updated_families(s: &Scrape) -> BTreeSet<String> {
    let families: BTreeSet<String> = s.docs.keys().cloned().collect();
    s.samples
        .iter()
        .filter(|x| number(&x.value) != 0.0)
        .filter_map(|x| family_of(&x.metric, &families).cloned())
        .collect()
}

/// The metric families flanneld declares: every `"flanneld_..."` name in the
/// non-test part of its metrics module (registered names, as `families()` returns
/// them). Read from the source so that a family added there is checked here too.
fn declared_families() -> BTreeSet<String> {
    const SOURCE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../flanneld/src/metrics.rs"
    ));
    let code = SOURCE.split("\nmod tests {").next().unwrap_or(SOURCE);
    let names: BTreeSet<String> = code
        .match_indices("\"flanneld_")
        .filter_map(|(at, _)| {
            let lit = &code[at + 1..];
            let name = &lit[..lit.find('"')?];
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                .then(|| name.to_string())
        })
        .collect();
    assert!(
        names.contains("flanneld_peers") && names.contains("flanneld_lease_events"),
        "could not read the declared families from flanneld's metrics.rs: {names:?}"
    );
    names
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn tools_ready(what: &str) -> bool {
    ready_with(what, Needs::Agents, &["iptables"])
}

#[test]
fn readiness_follows_startup_and_every_metric_family_moves() {
    let what = "e2e_health";
    if !tools_ready(what) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .start_agents(false)
        .ip_masq(true)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    // The agent starts before the network config exists: it waits for it, serving
    // health all the while.
    assert!(lab.etcd().delete(&lab.config_key()).unwrap());
    let mut a = Agent::start(&lab, 0);
    let h0 = lab.hosts()[0].ns.clone();
    a.wait_listening();

    let r = a.get("/readyz");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.starts_with("flanneld is not ready yet"),
        "{:?}",
        r.body
    );
    for missing in [
        "subnet lease not held",
        "backend not ready",
        "traffic rules not in place",
        "subnet file not written",
    ] {
        assert!(r.body.contains(missing), "{missing:?} not in {:?}", r.body);
    }
    let r = a.get("/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "flanneld is running"));
    let waiting = a.scrape();
    assert_eq!(value(&waiting, "flanneld_lease_held", &[]), Some(0.0));
    assert_eq!(value(&waiting, "flanneld_peers", &[]), Some(0.0));
    assert!(lab.subnet_file(0).unwrap().is_none());
    assert!(lab
        .etcd()
        .get_prefix(&format!("{ETCD_PREFIX}/subnets/"))
        .unwrap()
        .is_empty());
    // It listens on the host address only: not on the namespace's loopback.
    assert!(
        http_get(
            &h0,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, HEALTH_PORT),
            "/healthz"
        )
        .is_err(),
        "--healthz-ip was not honoured"
    );

    // Config in place: ready once everything is done, and by then it all is.
    lab.etcd().put(&lab.config_key(), lab.config()).unwrap();
    let r = a.wait_ready();
    assert_eq!(r.body, "flanneld is ready");
    let sub = lab.subnet_file(0).unwrap().expect("subnet.env once ready");
    assert!(lab.get_lease(0).unwrap().is_some(), "lease once ready");
    let ipt = lab.run_in(&h0, &["iptables-save"]).unwrap();
    assert!(ipt.contains("-j FLANNEL-POSTRTG"), "{ipt}");
    assert!(ipt.contains("-j FLANNEL-FWD"), "{ipt}");

    let alone = a.scrape();
    assert_eq!(value(&alone, "flanneld_lease_held", &[]), Some(1.0));
    assert_eq!(value(&alone, "flanneld_peers", &[]), Some(0.0));
    assert_eq!(
        value(&alone, "flanneld_lease_events_total", &[("kind", "added")]),
        Some(0.0)
    );
    let expiry = value(&alone, "flanneld_lease_expiry_timestamp_seconds", &[]).unwrap();
    assert!(
        expiry > now_secs(),
        "lease expiry {expiry} is not in the future"
    );

    // Failure path 1: the vxlan device is down, so the kernel refuses the route for
    // the peer that is about to join (ENETDOWN): reconcile errors, retried.
    lab.ip_in(&h0, &["link", "set", "flannel.1", "down"])
        .unwrap();
    let mut b = Agent::start(&lab, 1);
    b.wait_ready();
    let mut joined = None;
    poll_until(
        "host 1's metrics to show the peer and the refused route",
        DEADLINE,
        Duration::from_millis(200),
        || {
            let s = a.scrape();
            let ok = value(&s, "flanneld_peers", &[]) == Some(1.0)
                && value(&s, "flanneld_lease_events_total", &[("kind", "added")])
                    .is_some_and(|v| v >= 1.0)
                && sum(&s, "flanneld_reconcile_errors_total") >= 1.0;
            joined = Some(s);
            Ok(ok)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}; last scrape: {:?}",
            joined.as_ref().map(|s| &s.samples)
        )
    });
    // Back up: the retry programs the peer and the pods reach each other.
    lab.ip_in(&h0, &["link", "set", "flannel.1", "up"]).unwrap();
    let p0 = lab.add_pod(0).unwrap();
    let p1 = lab.add_pod(1).unwrap();
    let (ip0, ip1) = (lab.pod(p0).unwrap().ip, lab.pod(p1).unwrap().ip);
    assert!(sub.subnet.contains(&ip0));
    lab.wait_reachable(p0, ip1).unwrap();
    lab.wait_reachable(p1, ip0).unwrap();

    // Failure path 2: someone flushes the masquerade chain; the resync puts it back.
    lab.run_in(&h0, &["iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"])
        .unwrap();
    poll_until(
        "the masquerade rules to be restored and counted",
        DEADLINE,
        Duration::from_millis(200),
        || {
            let s = a.scrape();
            let ipt = lab.run_in(&h0, &["iptables-save", "-t", "nat"]).unwrap();
            let masq = ipt
                .lines()
                .filter(|l| l.starts_with("-A FLANNEL-POSTRTG") && l.contains("MASQUERADE"))
                .count();
            Ok(
                value(&s, "flanneld_rules_restored_total", &[]).is_some_and(|v| v >= 1.0)
                    && masq == 2,
            )
        },
    )
    .unwrap();

    // Failure path 3: a hostile lease that would take over the default route is
    // refused, counted once, and changes nothing in the kernel.
    let routes_before = lab.ip_in(&h0, &["route", "show"]).unwrap();
    let hostile = format!("{ETCD_PREFIX}/subnets/0.0.0.0-0");
    lab.etcd()
        .put(
            &hostile,
            r#"{"PublicIP":"198.18.0.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#,
        )
        .unwrap();
    poll_until(
        "the hostile lease to be refused and counted",
        DEADLINE,
        Duration::from_millis(200),
        || {
            let s = a.scrape();
            Ok(value(
                &s,
                "flanneld_leases_rejected_total",
                &[("reason", "outside_network")],
            ) == Some(1.0))
        },
    )
    .unwrap();
    assert_eq!(
        lab.ip_in(&h0, &["route", "show"]).unwrap(),
        routes_before,
        "a refused lease must not reach the kernel"
    );
    lab.wait_reachable(p0, ip1).unwrap();
    assert!(lab.etcd().delete(&hostile).unwrap());

    let fin = a.scrape();
    eprintln!("{what}: final metrics of {h0}:\n{}", a.get("/metrics").body);
    // The page changed when the peer joined.
    assert_eq!(value(&fin, "flanneld_peers", &[]), Some(1.0));
    assert!(
        value(&fin, "flanneld_lease_events_total", &[("kind", "added")]).unwrap()
            > value(&alone, "flanneld_lease_events_total", &[("kind", "added")]).unwrap()
    );
    assert_eq!(value(&fin, "flanneld_lease_held", &[]), Some(1.0));
    assert_eq!(value(&fin, "flanneld_store_connected", &[]), Some(1.0));
    assert_eq!(value(&fin, "flanneld_lease_watch_active", &[]), Some(1.0));
    assert!(sum(&fin, "flanneld_kernel_apply_duration_seconds_count") >= 1.0);

    // Every declared family is on the page and moved, except the udp-only ones.
    // (prometheus-client leaves a labelled family that never got a sample off the
    // page entirely, so the page alone cannot tell what is declared.)
    let declared = declared_families();
    for f in UDP_ONLY {
        assert!(
            declared.contains(f),
            "{f} is no longer declared in flanneld: update UDP_ONLY ({declared:?})"
        );
    }
    let on_page: BTreeSet<String> = fin.docs.keys().cloned().collect();
    let updated = updated_families(&fin);
    let mut problems = Vec::new();
    for f in declared.iter().filter(|f| !UDP_ONLY.contains(&f.as_str())) {
        if !on_page.contains(f) {
            problems.push(format!("{f}: no # HELP on the page"));
        } else if !updated.contains(f) {
            problems.push(format!("{f}: only default values"));
        }
    }
    assert!(
        problems.is_empty(),
        "declared metric families never updated in this run: {problems:#?}\n\
         (declared: {declared:?}; on the page: {on_page:?}; updated: {updated:?})"
    );
    // Nothing on the page that flanneld does not declare.
    assert!(
        on_page.is_subset(&declared),
        "undeclared families on the page: {:?}",
        on_page.difference(&declared).collect::<Vec<_>>()
    );
    assert!(fin.docs.values().all(|d| !d.trim().is_empty()));

    // Still healthy; and SIGTERM ends both agents cleanly.
    assert_eq!(a.get("/healthz").status, 200);
    assert_eq!(a.get("/readyz").status, 200);
    for (name, agent) in [("host 1", &mut a), ("host 2", &mut b)] {
        let (st, killed) = agent.proc_.terminate(DEADLINE).unwrap();
        assert!(!killed && st.success(), "{name}: exit on SIGTERM: {st}");
    }
}
