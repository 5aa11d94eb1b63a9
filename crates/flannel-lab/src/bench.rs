//! `flannel-lab bench`: every figure next to a baseline measured in the same run.
//!
//! * throughput: pod-to-pod iperf3 across two hosts as a fraction of host-to-host
//!   iperf3 over the same underlay (1 and 4 streams);
//! * convergence: N leases written straight into etcd in flannel's format, then one
//!   agent started; time until all N routes are in its host;
//! * churn: one more lease put / deleted while N are present; time until its route
//!   appears / disappears (seen by `ip monitor`), p50;
//! * startup: spawn → subnet.env written, median of several restarts; agent RSS.
//!
//! Absolute times are noise on a shared machine; the ratios are the figures.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use flannel_core::lease::{LeaseAttrs, MacAddr, VxlanData};
use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{LabError, Result};
use crate::lab::{poll_until, Lab};
use crate::measure::{median, percentile};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Backend objects of the network config (`{"Type":"vxlan"}`...).
    pub backends: Vec<Value>,
    /// iperf3 duration per run, seconds.
    pub secs: u32,
    /// Stream counts for the throughput runs.
    pub streams: Vec<u32>,
    /// Host/pod iperf3 pairs per stream count, run alternately (A/B/A/B...);
    /// medians are reported.
    pub rounds: usize,
    /// Lease counts for the convergence runs.
    pub lease_counts: Vec<usize>,
    /// Number of join/leave samples.
    pub joins: usize,
    /// Number of agent (re)starts timed.
    pub starts: usize,
    /// Deadline for each wait.
    pub timeout: Duration,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            backends: vec![json!({"Type":"vxlan"}), json!({"Type":"host-gw"})],
            secs: 3,
            streams: vec![1, 4],
            rounds: 3,
            lease_counts: vec![1000, 5000],
            joins: 20,
            starts: 5,
            timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub backend: String,
    pub streams: u32,
    pub secs: u32,
    /// Underlay host-to-host, Gbit/s (the baseline), median of the rounds.
    pub host_gbps: f64,
    /// Pod-to-pod across the two hosts, Gbit/s, median of the rounds.
    pub pod_gbps: f64,
    /// pod / host of the medians.
    pub ratio: f64,
    /// Every round, in order: (host, pod) Gbit/s.
    pub rounds: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    pub backend: String,
    pub leases: usize,
    /// Agent spawn → all `leases` routes present in its host.
    pub seconds: f64,
    /// Agent RSS once converged, KiB.
    pub agent_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    pub backend: String,
    /// Leases present while measuring.
    pub leases_present: usize,
    pub samples: usize,
    /// etcd put → route present, p50 / max, ms.
    pub join_p50_ms: f64,
    pub join_max_ms: f64,
    /// etcd delete → route gone, p50 / max, ms.
    pub leave_p50_ms: f64,
    pub leave_max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    pub backend: String,
    pub samples: usize,
    /// Agent spawn → subnet.env written, median, ms.
    pub median_ms: f64,
    /// Agent RSS after start with one peer, KiB.
    pub agent_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub load_avg: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub throughput: Vec<Throughput>,
    pub convergence: Vec<Convergence>,
    pub churn: Vec<Churn>,
    pub startup: Vec<Startup>,
    /// Measurements that failed, with the reason (the rest still ran).
    pub errors: Vec<String>,
}

/// A short label for a backend object: its type, plus non-default keys.
pub fn backend_label(b: &Value) -> String {
    let ty = b
        .get("Type")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let extra: Vec<String> = b
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "Type")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if extra.is_empty() {
        ty
    } else {
        format!("{ty}({})", extra.join(","))
    }
}

fn backend_type(b: &Value) -> String {
    b.get("Type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn machine() -> Machine {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: read("/proc/sys/kernel/osrelease"),
        load_avg: read("/proc/loadavg"),
    }
}

/// Runs everything in `opts`; `say` gets a progress line per step. A failing
/// measurement is recorded in `errors` and the others still run.
pub fn run(opts: &BenchOptions, mut say: impl FnMut(&str)) -> BenchReport {
    let mut report = BenchReport {
        machine: machine(),
        throughput: Vec::new(),
        convergence: Vec::new(),
        churn: Vec::new(),
        startup: Vec::new(),
        errors: Vec::new(),
    };
    for b in &opts.backends {
        let label = backend_label(b);
        if backend_type(b) == "alloc" {
            say(&format!("{label}: no data plane, throughput skipped"));
        } else {
            say(&format!("{label}: throughput and startup (2 hosts)"));
            if let Err(e) = throughput_and_startup(opts, b, &label, &mut report, &mut say) {
                report
                    .errors
                    .push(format!("{label} throughput/startup: {e}"));
            }
        }
        // Convergence needs one kernel route per lease: vxlan and host-gw.
        if !matches!(backend_type(b).as_str(), "vxlan" | "host-gw") {
            continue;
        }
        for (i, &n) in opts.lease_counts.iter().enumerate() {
            say(&format!("{label}: convergence with {n} leases"));
            let churn = if i == 0 { opts.joins } else { 0 };
            if let Err(e) = convergence(opts, b, &label, n, churn, &mut report, &mut say) {
                report.errors.push(format!("{label} convergence {n}: {e}"));
            }
        }
    }
    report
}

fn throughput_and_startup(
    opts: &BenchOptions,
    backend: &Value,
    label: &str,
    report: &mut BenchReport,
    say: &mut impl FnMut(&str),
) -> Result<()> {
    let mut lab = Lab::builder()
        .hosts(2)
        .backend_json(&backend.to_string())
        .timeout(opts.timeout)
        .build()?;
    let a = lab.add_pod(0)?;
    let b = lab.add_pod(1)?;
    let ib = lab.pod(b)?.ip;
    let ia = lab.pod(a)?.ip;
    lab.wait_reachable(a, ib)?;
    lab.wait_reachable(b, ia)?;
    for &streams in &opts.streams {
        let mut rounds = Vec::new();
        for _ in 0..opts.rounds.max(1) {
            let host = lab.iperf_hosts(0, 1, opts.secs, streams)?;
            let pod = lab.iperf_pods(a, b, opts.secs, streams)?;
            rounds.push((host, pod));
        }
        let host = median_f64(rounds.iter().map(|r| r.0));
        let pod = median_f64(rounds.iter().map(|r| r.1));
        let t = Throughput {
            backend: label.to_string(),
            streams,
            secs: opts.secs,
            host_gbps: host,
            pod_gbps: pod,
            ratio: if host > 0.0 { pod / host } else { 0.0 },
            rounds,
        };
        say(&format!(
            "  {streams} stream(s): pod {pod:.2} Gbit/s, host {host:.2} Gbit/s, ratio {:.2} (median of {})",
            t.ratio,
            t.rounds.len()
        ));
        report.throughput.push(t);
    }
    let mut samples = Vec::new();
    for _ in 0..opts.starts {
        let st = lab.stop_agent(0)?;
        if !st.success() {
            return Err(LabError::Invalid(format!("flanneld exit on SIGTERM: {st}")));
        }
        samples.push(lab.start_agent(0)?);
    }
    // Let it settle into its steady state before reading the RSS.
    lab.wait_reachable(a, ib)?;
    let rss = lab.agent_rss_kib(0)?;
    let med = median(&samples).unwrap_or_default();
    say(&format!(
        "  start -> subnet.env median {:.0} ms over {}, RSS {rss} KiB",
        ms(med),
        samples.len()
    ));
    report.startup.push(Startup {
        backend: label.to_string(),
        samples: samples.len(),
        median_ms: ms(med),
        agent_rss_kib: rss,
    });
    Ok(())
}

/// The median of some numbers (mean of the middle two for an even count).
fn median_f64(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `i`-th fake lease subnet: 10.1.0.0/24, 10.1.1.0/24, ... (inside 10.0.0.0/8,
/// clear of 10.250.0.0/16 used for churn).
fn fake_subnet(i: usize) -> Ipv4Net {
    let k = 256 + i as u32;
    Ipv4Net::new(Ipv4Addr::new(10, (k >> 8) as u8, (k & 0xff) as u8, 0), 24)
        .expect("prefix 24 is valid")
}

/// flanneld's lease TTL (24 h).
const LEASE_TTL_SECS: u64 = 24 * 3600;

/// A lease value as the backend `ty` writes it, for a fake peer on the underlay.
fn fake_lease_value(ty: &str, i: usize) -> String {
    // Fake peers sit on the underlay (198.18.0.2-.250) so host-gw routes resolve.
    let ip = Ipv4Addr::new(198, 18, 0, 2 + (i % 249) as u8);
    let mut attrs = LeaseAttrs::new(ip);
    attrs.backend_type = ty.to_string();
    if ty == "vxlan" {
        attrs.backend_data = Some(
            VxlanData {
                vni: 1,
                vtep_mac: MacAddr::random_local(&mut rand::rng()),
            }
            .encode(),
        );
    }
    attrs.encode()
}

fn count_lease_routes(lab: &Lab) -> Result<usize> {
    let out = lab.ip_in(&lab.hosts()[0].ns, &["-4", "route", "show"])?;
    Ok(out.lines().filter(|l| l.starts_with("10.")).count())
}

fn convergence(
    opts: &BenchOptions,
    backend: &Value,
    label: &str,
    n: usize,
    joins: usize,
    report: &mut BenchReport,
    say: &mut impl FnMut(&str),
) -> Result<()> {
    let ty = backend_type(backend);
    let config = json!({"Network": "10.0.0.0/8", "Backend": backend}).to_string();
    let mut lab = Lab::builder()
        .hosts(1)
        .config_json(&config)
        .start_agents(false)
        .timeout(opts.timeout)
        .build()?;
    let kvs: Vec<(String, String)> = (0..n)
        .map(|i| (Lab::lease_key_for(fake_subnet(i)), fake_lease_value(&ty, i)))
        .collect();
    // As flanneld writes them: each key on its own 24 h etcd lease.
    lab.etcd().put_many_leased(&kvs, LEASE_TTL_SECS)?;
    let t0 = Instant::now();
    lab.spawn_agent(0)?;
    let mut seen = 0;
    poll_until(
        &format!("{n} routes in the host"),
        opts.timeout,
        Duration::from_millis(20),
        || {
            lab.check_agent(0)?;
            seen = count_lease_routes(&lab)?;
            Ok(seen >= n)
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let rss = lab.agent_rss_kib(0)?;
    say(&format!("  {n} leases: {secs:.2} s, RSS {rss} KiB"));
    report.convergence.push(Convergence {
        backend: label.to_string(),
        leases: n,
        seconds: secs,
        agent_rss_kib: rss,
    });
    if joins == 0 {
        return Ok(());
    }
    let ns = lab.hosts()[0].ns.clone();
    let mut mon = lab.monitor(&ns, &["route"])?;
    let (mut join, mut leave) = (Vec::new(), Vec::new());
    // The agent picked its own subnet at random: churn must not touch it.
    let own = lab.host_subnet(0)?;
    let subnets: Vec<Ipv4Net> = (0..=255u8)
        .map(|x| Ipv4Net::new(Ipv4Addr::new(10, 250, x, 0), 24).expect("prefix 24 is valid"))
        .filter(|s| *s != own)
        .take(joins)
        .collect();
    for (j, &subnet) in subnets.iter().enumerate() {
        let key = Lab::lease_key_for(subnet);
        let value = fake_lease_value(&ty, j);
        let route = format!("{subnet} ");
        let deleted = format!("Deleted {subnet} ");
        let mark = mon.mark();
        let t0 = Instant::now();
        lab.etcd().put_leased(&key, &value, LEASE_TTL_SECS)?;
        let t = mon
            .wait_for_after(mark, opts.timeout, |l| l.starts_with(&route))
            .ok_or_else(|| LabError::Timeout {
                what: format!("route for joining lease {subnet}"),
                after: opts.timeout,
            })?;
        join.push(t.saturating_duration_since(t0));
        let mark = mon.mark();
        let t0 = Instant::now();
        lab.etcd().delete(&key)?;
        let t = mon
            .wait_for_after(mark, opts.timeout, |l| l.starts_with(&deleted))
            .ok_or_else(|| LabError::Timeout {
                what: format!("route of leaving lease {subnet} to go"),
                after: opts.timeout,
            })?;
        leave.push(t.saturating_duration_since(t0));
    }
    let c = Churn {
        backend: label.to_string(),
        leases_present: n,
        samples: join.len(),
        join_p50_ms: ms(median(&join).unwrap_or_default()),
        join_max_ms: ms(percentile(&join, 100).unwrap_or_default()),
        leave_p50_ms: ms(median(&leave).unwrap_or_default()),
        leave_max_ms: ms(percentile(&leave, 100).unwrap_or_default()),
    };
    say(&format!(
        "  join p50 {:.1} ms, leave p50 {:.1} ms ({joins} samples, {n} leases present)",
        c.join_p50_ms, c.leave_p50_ms
    ));
    report.churn.push(c);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::lease::LeaseKey;

    #[test]
    fn fake_leases_are_distinct_and_in_flannel_format() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..5000 {
            let s = fake_subnet(i);
            assert!("10.0.0.0/8".parse::<Ipv4Net>().unwrap().contains(&s));
            assert!(!"10.250.0.0/16".parse::<Ipv4Net>().unwrap().contains(&s));
            assert!(seen.insert(s));
        }
        let key = Lab::lease_key_for(fake_subnet(0));
        assert_eq!(key, "/coreos.com/network/subnets/10.1.0.0-24");
        assert!(key.parse::<LeaseKey>().is_ok());
        let v = fake_lease_value("vxlan", 0);
        let a = LeaseAttrs::decode(&v).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(198, 18, 0, 2));
        assert!(v.starts_with(r#"{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#));
        assert_eq!(
            fake_lease_value("host-gw", 248),
            r#"{"PublicIP":"198.18.0.250","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median_f64([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median_f64([4.0, 1.0].into_iter()), 2.5);
        assert_eq!(median_f64(std::iter::empty()), 0.0);
    }

    #[test]
    fn labels() {
        assert_eq!(backend_label(&json!({"Type":"vxlan"})), "vxlan");
        assert_eq!(
            backend_label(&json!({"Type":"vxlan","DirectRouting":true})),
            "vxlan(DirectRouting=true)"
        );
    }
}
