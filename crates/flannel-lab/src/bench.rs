//! `flannel-lab bench`: every figure next to a baseline measured in the same run.
//!
//! * throughput: pod-to-pod iperf3 across two hosts as a fraction of host-to-host
//!   iperf3 over the same underlay (1 and 4 streams);
//! * convergence: N leases written straight into etcd in flannel's format, then one
//!   agent started; time until all N routes are in its host;
//! * churn: one more lease put / deleted while N are present; time until its route
//!   appears / disappears (seen by `ip monitor`), p50;
//! * startup: spawn → subnet.env written, median of several restarts; agent RSS.
//! * scale: N leases (1000 / 5000 / 10000), each on its own 24 h etcd lease with
//!   public IPs spread over a /16: agent start → all N routes against `ip -batch`
//!   writing the same kernel entries in a fresh namespace of the same lab; RSS with
//!   N peers against RSS with none (bytes per peer); join/leave p50/p99 with N
//!   present.
//!
//! Absolute times are noise on a shared machine; the ratios are the figures.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use flannel_core::lease::{LeaseAttrs, LeaseKey, MacAddr, VxlanData};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{LabError, Result};
use crate::lab::{Family, Lab, UNDERLAY_V6_PREFIX};
use crate::lease_writer::LeaseWriter;
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
    /// Which parts to run.
    pub sections: Sections,
    /// Lease counts for the scale runs.
    pub scale_counts: Vec<usize>,
    /// Join/leave samples per scale run (p99 needs about 100).
    pub scale_joins: usize,
    /// Alternating ip -batch / agent start rounds per scale run (medians reported).
    pub scale_rounds: usize,
    /// Where to copy the agent log of each scale run (`scale-<type>-<n>.log`).
    pub log_dir: Option<std::path::PathBuf>,
    /// Dual stack: throughput and startup for IPv4 and for IPv6 (pod v6 against
    /// the v6 underlay), start → subnet.env with IPv6 on; scale leases carry IPv6
    /// parts (subnet, PublicIPv6, vxlan BackendV6Data) and count both families.
    pub ipv6: bool,
}

/// The IPv6 pod network of `--ipv6` runs.
pub const BENCH_IPV6_NETWORK: &str = "fd10:244::/56";

/// (backend, streams, IPv6 ratio / IPv4 ratio) for every backend and stream count
/// measured in both families.
pub fn family_ratios(t: &[Throughput]) -> Vec<(String, u32, f64)> {
    t.iter()
        .filter(|v6| v6.family == Family::V6.label())
        .filter_map(|v6| {
            let v4 = t.iter().find(|v4| {
                v4.family == Family::V4.label()
                    && v4.backend == v6.backend
                    && v4.streams == v6.streams
            })?;
            Some((v6.backend.clone(), v6.streams, ratio(v6.ratio, v4.ratio)))
        })
        .collect()
}

/// The parts of the bench; all by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sections {
    /// Throughput and startup (two hosts).
    pub throughput: bool,
    /// Convergence and churn for `lease_counts`.
    pub convergence: bool,
    /// The scale section for `scale_counts`.
    pub scale: bool,
}

impl Default for Sections {
    fn default() -> Self {
        Sections {
            throughput: true,
            convergence: true,
            scale: true,
        }
    }
}

impl std::str::FromStr for Sections {
    type Err = String;
    /// A comma-separated list of `throughput`, `convergence`, `scale` (or `all`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut out = Sections {
            throughput: false,
            convergence: false,
            scale: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "throughput" => out.throughput = true,
                "convergence" => out.convergence = true,
                "scale" => out.scale = true,
                "all" => out = Sections::default(),
                other => {
                    return Err(format!(
                        "unknown bench section {other:?} (throughput, convergence, scale, all)"
                    ))
                }
            }
        }
        Ok(out)
    }
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
            sections: Sections::default(),
            scale_counts: vec![1000, 5000, 10000],
            scale_joins: 100,
            scale_rounds: 3,
            log_dir: None,
            ipv6: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub backend: String,
    /// "IPv4" or "IPv6": the family of both the pod and the underlay traffic.
    pub family: String,
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
    /// Userspace data paths (udp, wireguard): CPU seconds both agents used per
    /// Gbit carried (= cores per Gbit/s), median of the rounds.
    pub agent_cpu_s_per_gbit: Option<f64>,
    /// wireguard: Debian's wireguard-go between the same two hosts, pod-like
    /// namespace to pod-like namespace, Gbit/s, median (the anchor).
    pub wggo_gbps: Option<f64>,
    /// pod / wireguard-go of the medians.
    pub ratio_wggo: Option<f64>,
    /// wireguard-go's CPU seconds (both processes) per Gbit, median.
    pub wggo_cpu_s_per_gbit: Option<f64>,
    /// wireguard-go's every round, Gbit/s.
    pub wggo_rounds: Vec<f64>,
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
    /// Dual stack (IPv6 on) or IPv4 only.
    pub ipv6: bool,
    pub samples: usize,
    /// Agent spawn → subnet.env written, median, ms.
    pub median_ms: f64,
    /// Agent RSS after start with one peer, KiB.
    pub agent_rss_kib: u64,
}

/// One scale run: `leases` peers, each on its own etcd lease.
#[derive(Debug, Clone, Serialize)]
pub struct Scale {
    pub backend: String,
    /// Dual stack: every lease also has an IPv6 subnet, PublicIPv6 (and vxlan
    /// BackendV6Data); "all routes" means both families'.
    pub ipv6: bool,
    pub leases: usize,
    /// Agent spawn → all `leases` routes present in its host (the agent's lease
    /// exists already, as on a restart; the host holds none of the entries), ms,
    /// median of the rounds.
    pub start_to_routes_ms: f64,
    /// The agent's own log: full lease set received → kernel programmed, ms.
    pub agent_apply_ms: Option<f64>,
    /// The agent's own log: spawn → subnet.env written, ms.
    pub agent_subnet_file_ms: Option<f64>,
    /// `ip -batch` writing the same kernel entries (neighbour + FDB + route per
    /// peer for vxlan, a route for host-gw) in a fresh namespace of the lab, ms
    /// (process start to exit).
    pub ip_batch_ms: f64,
    /// Kernel entries in that batch.
    pub ip_batch_entries: usize,
    /// start_to_routes / ip_batch.
    pub ratio_start: f64,
    /// agent_apply / ip_batch.
    pub ratio_apply: Option<f64>,
    /// Agent RSS with no peers (same config, started before the leases were
    /// written), KiB.
    pub rss_idle_kib: u64,
    /// Agent RSS with `leases` peers, one second after the last route appeared, KiB.
    pub rss_kib: u64,
    /// (rss - rss_idle) / leases, bytes.
    pub bytes_per_peer: f64,
    /// The agent's own (anonymous) part of `rss_idle_kib` and `rss_kib`, KiB; the
    /// rest is the executable's pages from the page cache.
    pub anon_idle_kib: u64,
    pub anon_kib: u64,
    /// Agent RSS after the join/leave samples, KiB.
    pub rss_after_churn_kib: u64,
    pub samples: usize,
    /// etcd put of one more lease → its route present (ip monitor), ms.
    pub join_p50_ms: f64,
    pub join_p99_ms: f64,
    /// etcd delete → route gone, ms.
    pub leave_p50_ms: f64,
    pub leave_p99_ms: f64,
    /// The lease write itself (the create transaction's gRPC round trip, inside every
    /// join sample), p50, ms.
    pub put_p50_ms: f64,
    /// Join measured from the put's response (the write committed) instead of its
    /// start: the agent's share of the join, p50, ms (0 when the watch event beat
    /// the response).
    pub join_after_put_p50_ms: f64,
    /// Every round in order: (start -> all routes, ip -batch), ms; the figures
    /// above are medians.
    pub rounds: Vec<(f64, f64)>,
    /// The agent's apply time of every round, ms.
    pub agent_apply_rounds_ms: Vec<f64>,
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
    pub scale: Vec<Scale>,
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
        scale: Vec::new(),
        errors: Vec::new(),
    };
    for b in &opts.backends {
        let label = backend_label(b);
        if opts.sections.throughput {
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
        }
        // Convergence needs one kernel route per lease: vxlan and host-gw.
        if !matches!(backend_type(b).as_str(), "vxlan" | "host-gw") {
            continue;
        }
        let counts: &[usize] = if opts.sections.convergence {
            &opts.lease_counts
        } else {
            &[]
        };
        for (i, &n) in counts.iter().enumerate() {
            say(&format!("{label}: convergence with {n} leases"));
            let churn = if i == 0 { opts.joins } else { 0 };
            if let Err(e) = convergence(opts, b, &label, n, churn, &mut report, &mut say) {
                report.errors.push(format!("{label} convergence {n}: {e}"));
            }
        }
        let counts: &[usize] = if opts.sections.scale {
            &opts.scale_counts
        } else {
            &[]
        };
        for &n in counts {
            say(&format!("{label}: scale with {n} leases"));
            match scale(opts, b, &label, n, &mut say) {
                Ok(s) => report.scale.push(s),
                Err(e) => report.errors.push(format!("{label} scale {n}: {e}")),
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
    let mut builder = Lab::builder()
        .hosts(2)
        .backend_json(&backend.to_string())
        .timeout(opts.timeout);
    if opts.ipv6 {
        builder = builder.dual_stack(BENCH_IPV6_NETWORK);
    }
    let mut lab = builder.build()?;
    let families: &[Family] = if opts.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    let a = lab.add_pod(0)?;
    let b = lab.add_pod(1)?;
    for &f in families {
        for (from, to) in [(a, b), (b, a)] {
            let ip = lab.pod(to)?.addr(f).ok_or_else(|| {
                LabError::Invalid(format!("pod without an {} address", f.label()))
            })?;
            lab.wait_reachable_ip(from, ip)?;
        }
    }
    let ty = backend_type(backend);
    let userspace = matches!(ty.as_str(), "udp" | "wireguard");
    let wggo = if ty == "wireguard" {
        let mtu = lab
            .subnet_file(0)?
            .map(|s| s.mtu)
            .ok_or_else(|| LabError::Invalid("no subnet.env on host 0".into()))?;
        say(&format!(
            "  wireguard-go anchor between the same hosts (MTU {mtu})"
        ));
        Some(crate::wggo::start(&lab, [0, 1], mtu)?)
    } else {
        None
    };
    for &streams in &opts.streams {
        for &family in families {
            let mut rounds = Vec::new();
            let mut cpu = Vec::new();
            let mut wg_rounds = Vec::new();
            let mut wg_cpu = Vec::new();
            // The anchor runs over IPv4 only (its tunnel does not depend on the family).
            let wggo = wggo.as_ref().filter(|_| family == Family::V4);
            for _ in 0..opts.rounds.max(1) {
                let host = lab.iperf_hosts_over(family, 0, 1, opts.secs, streams)?;
                let pids: Vec<u32> = [0, 1].iter().filter_map(|&h| lab.agent_pid(h)).collect();
                let before = cpu_of(&pids)?;
                let pod = lab.iperf_pods_over(family, a, b, opts.secs, streams)?;
                if userspace {
                    cpu.push(per_gbit(cpu_of(&pids)? - before, pod, opts.secs));
                }
                rounds.push((host, pod));
                if let Some(w) = wggo {
                    let before = cpu_of(&w.pids())?;
                    let g = w.iperf(&lab, opts.secs, streams)?;
                    wg_cpu.push(per_gbit(cpu_of(&w.pids())? - before, g, opts.secs));
                    wg_rounds.push(g);
                }
            }
            let host = median_f64(rounds.iter().map(|r| r.0));
            let pod = median_f64(rounds.iter().map(|r| r.1));
            let wg = (!wg_rounds.is_empty()).then(|| median_f64(wg_rounds.iter().copied()));
            let t = Throughput {
                backend: label.to_string(),
                family: family.label().to_string(),
                streams,
                secs: opts.secs,
                host_gbps: host,
                pod_gbps: pod,
                ratio: if host > 0.0 { pod / host } else { 0.0 },
                rounds,
                agent_cpu_s_per_gbit: (!cpu.is_empty()).then(|| median_f64(cpu.into_iter())),
                wggo_gbps: wg,
                ratio_wggo: wg.map(|w| if w > 0.0 { pod / w } else { 0.0 }),
                wggo_cpu_s_per_gbit: (!wg_cpu.is_empty()).then(|| median_f64(wg_cpu.into_iter())),
                wggo_rounds: wg_rounds,
            };
            say(&format!(
                "  {streams} stream(s) {}: pod {pod:.2} Gbit/s, host {host:.2} Gbit/s, ratio {:.3} (median of {})",
                family.label(),
                t.ratio,
                t.rounds.len()
            ));
            if let Some(c) = t.agent_cpu_s_per_gbit {
                say(&format!("    agents: {c:.3} CPU s per Gbit"));
            }
            if let (Some(w), Some(r), Some(c)) = (t.wggo_gbps, t.ratio_wggo, t.wggo_cpu_s_per_gbit)
            {
                say(&format!(
                    "    wireguard-go {w:.2} Gbit/s ({:.3} x host), ours {r:.2} x wireguard-go; wireguard-go {c:.3} CPU s per Gbit",
                    if host > 0.0 { w / host } else { 0.0 }
                ));
            }
            report.throughput.push(t);
        }
    }
    drop(wggo);
    let mut samples = Vec::new();
    for _ in 0..opts.starts {
        let st = lab.stop_agent(0)?;
        if !st.success() {
            return Err(LabError::Invalid(format!("flanneld exit on SIGTERM: {st}")));
        }
        samples.push(lab.start_agent(0)?);
    }
    // Let it settle into its steady state before reading the RSS.
    let ib = lab.pod(b)?.ip;
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
        ipv6: opts.ipv6,
        samples: samples.len(),
        median_ms: ms(med),
        agent_rss_kib: rss,
    });
    Ok(())
}

/// CPU seconds used so far by all of `pids` together.
fn cpu_of(pids: &[u32]) -> Result<f64> {
    pids.iter()
        .map(|&p| crate::measure::cpu_seconds(p))
        .sum::<Result<f64>>()
}

/// CPU seconds per Gbit carried: `cpu` seconds over a run of `secs` at `gbps`.
fn per_gbit(cpu: f64, gbps: f64, secs: u32) -> f64 {
    let gbit = gbps * f64::from(secs);
    if gbit > 0.0 {
        cpu / gbit
    } else {
        0.0
    }
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
    crate::leases::peer_lease_value(ty, Ipv4Addr::new(198, 18, 0, 2 + (i % 249) as u8))
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
    let log_from = std::fs::metadata(lab.hosts()[0].log_file()).map_or(0, |m| m.len());
    let t0 = Instant::now();
    lab.spawn_agent(0)?;
    let done = wait_routes(&mut lab, n, false, opts.timeout, log_from)?;
    let secs = done.saturating_duration_since(t0).as_secs_f64();
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
    let writer = LeaseWriter::connect(lab.etcd())?;
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
        let m = join_leave(
            &writer,
            &mut mon,
            &key,
            &value,
            &[subnet.into()],
            opts.timeout,
        )?;
        join.push(m.join);
        leave.push(m.leave);
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

/// The underlay route that puts all of 198.18.0.0/16 on the hosts' link, so that
/// scale peers can have public IPs spread over a /16 and still be directly
/// connected (host-gw); the lab's own addresses stay in 198.18.0.0/24.
const SCALE_UNDERLAY: &str = "198.18.0.0/16";

/// The public IP of the `i`-th scale peer: 198.18.1.0 onwards in steps of 6, so
/// 10 000 peers cover most of the /16 (every one distinct up to 10 837 peers).
fn scale_public_ip(i: usize) -> Ipv4Addr {
    let j = 256 + (i as u32 * 6) % (65536 - 512);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + j)
}

/// The `i`-th scale peer's IPv6 underlay address: in the lab's on-link /64, clear
/// of the hosts (`::<n>`) and the gateway.
fn scale_public_ipv6(i: usize) -> Ipv6Addr {
    let mut s = UNDERLAY_V6_PREFIX.segments();
    s[6] = 1 + (i >> 16) as u16;
    s[7] = i as u16;
    Ipv6Addr::from(s)
}

/// The IPv6 pod network of dual-stack scale runs (a /64 per peer).
const SCALE_IPV6_NETWORK: &str = "fd10::/48";

/// The `i`-th /64 of [`SCALE_IPV6_NETWORK`].
fn scale_subnet6(i: usize) -> Ipv6Net {
    let mut s = [0xfd10u16, 0, 0, 0, 0, 0, 0, 0];
    s[3] = i as u16;
    Ipv6Net::new(Ipv6Addr::from(s), 64).expect("prefix 64 is valid")
}

/// What the `i`-th scale peer publishes, and the entries a host programs for it.
struct ScalePeer {
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    mac: MacAddr,
    /// Dual stack: its IPv6 subnet, PublicIPv6 and v6 VTEP MAC.
    v6: Option<(Ipv6Net, Ipv6Addr, MacAddr)>,
}

impl ScalePeer {
    fn key(&self) -> String {
        let key = LeaseKey {
            v4: self.subnet,
            v6: self.v6.map(|v| v.0),
        };
        format!("{}/subnets/{key}", crate::lab::ETCD_PREFIX)
    }

    fn value(&self, ty: &str) -> String {
        let mut attrs = LeaseAttrs::new(self.public_ip);
        attrs.backend_type = ty.to_string();
        attrs.public_ipv6 = self.v6.map(|v| v.1);
        if ty == "vxlan" {
            let data = |vtep_mac| VxlanData { vni: 1, vtep_mac }.encode();
            attrs.backend_data = Some(data(self.mac));
            attrs.backend_v6_data = self.v6.map(|v| data(v.2));
        }
        attrs.encode()
    }

    /// Appends the batch lines writing what the agent writes for this peer: FDB
    /// entries (`bridge -batch`), neighbours and routes (`ip -batch`, neighbours
    /// first as the agent does); returns the number of kernel entries.
    fn batch_lines(&self, ty: &str, dev: &str, b: &mut Batches) -> usize {
        use std::fmt::Write as _;
        let gw = self.subnet.network();
        let v6 = match (self.v6, ty) {
            (None, _) => 0,
            (Some((subnet, _, mac)), "vxlan") => {
                let gw = subnet.network();
                let dev = VXLAN_V6_DEV;
                let _ = writeln!(
                    b.neigh,
                    "neigh replace {gw} lladdr {mac} dev {dev} nud permanent"
                );
                let _ = writeln!(
                    b.fdb,
                    "fdb replace {mac} dev {dev} dst {} self permanent",
                    self.v6.expect("matched").1
                );
                let _ = writeln!(
                    b.routes,
                    "route replace {subnet} via {gw} dev {dev} onlink proto 70 metric 1024"
                );
                3
            }
            (Some((subnet, public, _)), _) => {
                let _ = writeln!(
                    b.routes,
                    "route replace {subnet} via {public} dev {dev} proto 70 metric 1024"
                );
                1
            }
        };
        v6 + if ty == "vxlan" {
            let _ = writeln!(
                b.neigh,
                "neigh replace {gw} lladdr {} dev {dev} nud permanent",
                self.mac
            );
            let _ = writeln!(
                b.fdb,
                "fdb replace {} dev {dev} dst {} self permanent",
                self.mac, self.public_ip
            );
            let _ = writeln!(
                b.routes,
                "route replace {} via {gw} dev {dev} onlink proto 70",
                self.subnet
            );
            3
        } else {
            let _ = writeln!(
                b.routes,
                "route replace {} via {} dev {dev} proto 70",
                self.subnet, self.public_ip
            );
            1
        }
    }
}

/// The vxlan backend's IPv6 device (VNI 1).
const VXLAN_V6_DEV: &str = "flannel-v6.1";

/// Batch files for the baseline.
#[derive(Default)]
struct Batches {
    fdb: String,
    neigh: String,
    routes: String,
}

/// `n` scale peers with subnets 10.1.0.0/24, 10.1.1.0/24, ... skipping `own`; with
/// `own6`, dual stack: /64s of [`SCALE_IPV6_NETWORK`] skipping `own6`.
fn scale_peers(n: usize, own: Ipv4Net, own6: Option<Ipv6Net>) -> Vec<ScalePeer> {
    let mut rng = rand::rng();
    let mut subnets6 = (0..).map(scale_subnet6).filter(|s| Some(*s) != own6);
    (0..)
        .map(fake_subnet)
        .filter(|s| !s.contains(&own.network()) && !own.contains(&s.network()))
        .take(n)
        .enumerate()
        .map(|(i, subnet)| ScalePeer {
            subnet,
            public_ip: scale_public_ip(i),
            mac: MacAddr::random_local(&mut rng),
            v6: own6.map(|_| {
                let s6 = subnets6.next().expect("endless");
                (s6, scale_public_ipv6(i), MacAddr::random_local(&mut rng))
            }),
        })
        .collect()
}

/// IPv4 /24 routes into 10.0.0.0/8 in the network namespace of process `pid`,
/// read from /proc (much cheaper than running `ip route` while an agent works);
/// with `v6`, also the /64 routes into fd10::/16 (the smaller of both counts).
fn lease_routes_of(pid: u32, v6: bool) -> Result<usize> {
    let read = |f: &str| {
        let path = format!("/proc/{pid}/net/{f}");
        std::fs::read_to_string(&path).map_err(|e| LabError::io(path, e))
    };
    let v4 = count_proc_routes(&read("route")?);
    if !v6 {
        return Ok(v4);
    }
    Ok(v4.min(count_proc_routes6(&read("ipv6_route")?)))
}

/// Counts the /64 routes into fd10::/16 of a /proc/net/ipv6_route text (destination
/// as 32 hex digits, then its prefix length in hex).
fn count_proc_routes6(text: &str) -> usize {
    text.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[0].len() == 32 && f[0].starts_with("fd10") && f[1] == "40"
        })
        .count()
}

/// Counts the /24 routes into 10.0.0.0/8 of a /proc/net/route text (addresses in
/// little-endian hex: 10.x.y.0 is `00yyxx0A`).
fn count_proc_routes(text: &str) -> usize {
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 7 && f[1].len() == 8 && f[1].ends_with("0A") && f[7] == "00FFFFFF"
        })
        .count()
}

/// The value of `key=` in the last line of `log` containing `message`.
fn log_field(log: &str, message: &str, key: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(message))?;
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
}

/// Waits until the agent on host 0 has programmed `n` lease routes; returns when.
/// Reading the route table of thousands of routes every few milliseconds would
/// compete with the agent for the CPU, so the agent's log is followed (cheap) for
/// the line it writes once a full lease set is programmed, and the routes are
/// counted then; between, they are counted only every 50 ms (agents that write no
/// such line).
fn wait_routes(
    lab: &mut Lab,
    n: usize,
    v6: bool,
    timeout: Duration,
    log_from: u64,
) -> Result<Instant> {
    use std::io::{Read, Seek, SeekFrom};
    let pid = lab
        .agent_pid(0)
        .ok_or_else(|| LabError::Invalid("flanneld does not run on host 0".into()))?;
    let log_path = lab.hosts()[0].log_file();
    let mut log = std::fs::File::open(&log_path)
        .map_err(|e| LabError::io(log_path.display().to_string(), e))?;
    // Only what this start writes.
    let mut offset = log_from;
    let mut tail = String::new();
    let start = Instant::now();
    let mut last_count = start;
    loop {
        let mut chunk = String::new();
        if log.seek(SeekFrom::Start(offset)).is_ok() {
            if let Ok(k) = log.read_to_string(&mut chunk) {
                offset += k as u64;
            }
        }
        tail.push_str(&chunk);
        let marked = tail.contains(PROGRAMMED_MARK);
        if let Some(cut) = tail.rfind('\n') {
            tail.drain(..=cut);
        }
        if marked || last_count.elapsed() >= Duration::from_millis(50) {
            let now = Instant::now();
            if lease_routes_of(pid, v6)? >= n {
                return Ok(now);
            }
            last_count = Instant::now();
        }
        lab.check_agent(0)?;
        if start.elapsed() >= timeout {
            return Err(LabError::Timeout {
                what: format!("{n} routes in the host"),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What flanneld logs once a full lease set is in the kernel.
const PROGRAMMED_MARK: &str = "full lease set programmed";

fn scale(
    opts: &BenchOptions,
    backend: &Value,
    label: &str,
    n: usize,
    say: &mut impl FnMut(&str),
) -> Result<Scale> {
    let ty = backend_type(backend);
    let dual = opts.ipv6;
    let mut config = json!({"Network": "10.0.0.0/8", "Backend": backend});
    if dual {
        config["EnableIPv6"] = json!(true);
        config["IPv6Network"] = json!(SCALE_IPV6_NETWORK);
    }
    // Host 0 runs the agent; host 1 is the fresh namespace of the `ip -batch`
    // baseline.
    let mut lab = Lab::builder()
        .hosts(2)
        .config_json(&config.to_string())
        .ipv6(dual)
        .start_agents(false)
        .timeout(opts.timeout)
        .build()?;
    for h in lab.hosts() {
        lab.ip_in(&h.ns, &["route", "add", SCALE_UNDERLAY, "dev", &h.link])?;
    }

    // RSS with no peers: the same agent, before any lease is written. It keeps
    // its lease for the start with peers (reused by public IP, as on a restart).
    lab.start_agent(0)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = lab.agent_rss(0)?;
    let st = lab.stop_agent(0)?;
    if !st.success() {
        return Err(LabError::Invalid(format!("flanneld exit on SIGTERM: {st}")));
    }
    let own = lab.host_subnet(0)?;
    let own6 = lab.subnet_file(0)?.and_then(|s| s.ipv6_subnet);
    if dual && own6.is_none() {
        return Err(LabError::Invalid(
            "dual stack: host 0's subnet.env has no FLANNEL_IPV6_SUBNET".into(),
        ));
    }

    let peers = scale_peers(n, own, own6);
    let kvs: Vec<(String, String)> = peers.iter().map(|p| (p.key(), p.value(&ty))).collect();
    lab.etcd().put_many_leased(&kvs, LEASE_TTL_SECS)?;
    drop(kvs);

    // The baseline: the same entries in host 1 with `ip -batch`.
    let base = lab.hosts()[1].ns.clone();
    let base_link = lab.hosts()[1].link.clone();
    let base_ip = lab.hosts()[1].ip.to_string();
    let dev = if ty == "vxlan" {
        "flannel.1".to_string()
    } else {
        base_link.clone()
    };
    let mut b = Batches::default();
    let entries: usize = peers.iter().map(|p| p.batch_lines(&ty, &dev, &mut b)).sum();
    let write = |name: &str, text: &str| -> Result<String> {
        let path = lab.run_dir().join(format!("scale-{ty}-{n}.{name}"));
        std::fs::write(&path, text).map_err(|e| LabError::io(path.display().to_string(), e))?;
        Ok(path.display().to_string())
    };
    let fdb_file = (!b.fdb.is_empty())
        .then(|| write("fdb", &b.fdb))
        .transpose()?;
    b.neigh.push_str(&b.routes);
    let ip_file = write("ip", &b.neigh)?;
    drop(b);
    let agent_ns = lab.hosts()[0].ns.clone();
    // Between rounds both hosts lose what was written: the vxlan device with all
    // its entries, or our routes.
    let clear = |lab: &Lab, ns: &str| -> Result<()> {
        if ty == "vxlan" {
            lab.ip_in(ns, &["link", "del", "flannel.1"])?;
            if dual {
                lab.ip_in(ns, &["link", "del", VXLAN_V6_DEV])?;
            }
        } else {
            lab.ip_in(ns, &["route", "flush", "proto", "70"])?;
            if dual {
                lab.ip_in(ns, &["-6", "route", "flush", "proto", "70"])?;
            }
        }
        Ok(())
    };
    let log_path = lab.hosts()[0].log_file();
    let (mut starts, mut applies, mut batches) = (Vec::new(), Vec::new(), Vec::new());
    let mut agent_subnet_file_ms = None;
    for round in 0..opts.scale_rounds.max(1) {
        if round > 0 {
            let st = lab.stop_agent(0)?;
            if !st.success() {
                return Err(LabError::Invalid(format!("flanneld exit on SIGTERM: {st}")));
            }
            clear(&lab, &agent_ns)?;
            clear(&lab, &base)?;
        }
        // The baseline: the same entries in host 1 with `bridge -batch` + `ip -batch`.
        if ty == "vxlan" {
            lab.ip_in(
                &base,
                &[
                    "link",
                    "add",
                    &dev,
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "local",
                    &base_ip,
                    "dev",
                    &base_link,
                    "dstport",
                    "8472",
                    "nolearning",
                ],
            )?;
            lab.ip_in(&base, &["link", "set", &dev, "up"])?;
            if dual {
                let base_ip6 = lab.hosts()[1]
                    .ip6
                    .ok_or_else(|| LabError::Invalid("host 1 has no IPv6 address".into()))?
                    .to_string();
                lab.ip_in(
                    &base,
                    &[
                        "link",
                        "add",
                        VXLAN_V6_DEV,
                        "type",
                        "vxlan",
                        "id",
                        "1",
                        "local",
                        &base_ip6,
                        "dev",
                        &base_link,
                        "dstport",
                        "8472",
                        "nolearning",
                    ],
                )?;
                lab.ip_in(&base, &["link", "set", VXLAN_V6_DEV, "up"])?;
            }
        }
        let t0 = Instant::now();
        if let Some(f) = &fdb_file {
            crate::process::run(crate::process::command(
                "bridge",
                &["-n", &base, "-batch", f],
            ))?;
        }
        lab.ip_in(&base, &["-batch", &ip_file])?;
        batches.push(t0.elapsed());
        let mut in_base = count_proc_routes(&lab.run_in(&base, &["cat", "/proc/net/route"])?);
        if dual {
            in_base = in_base.min(count_proc_routes6(
                &lab.run_in(&base, &["cat", "/proc/net/ipv6_route"])?,
            ));
        }
        if in_base != n {
            return Err(LabError::Invalid(format!(
                "the ip -batch baseline made {in_base} routes, not {n}"
            )));
        }

        // The agent with N peers (its lease exists: a restart).
        let log_from = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let t0 = Instant::now();
        lab.spawn_agent(0)?;
        let done = wait_routes(&mut lab, n, dual, opts.timeout, log_from)?;
        starts.push(done.saturating_duration_since(t0));
        let log = lab.agent_log(0)?;
        let tail = log.get(log_from as usize..).unwrap_or("");
        applies.extend(log_field(tail, PROGRAMMED_MARK, "elapsed_ms"));
        agent_subnet_file_ms = log_field(tail, "subnet file written", "elapsed_ms");
        say(&format!(
            "  {n} leases, round {}: start -> all routes {:.0} ms, agent apply {} ms; ip -batch {:.0} ms for {entries} entries",
            round + 1,
            ms(*starts.last().expect("pushed")),
            applies.last().map_or("-".into(), |a| format!("{a:.0}")),
            ms(*batches.last().expect("pushed"))
        ));
    }
    let start_to_routes = median(&starts).unwrap_or_default();
    let ip_batch = median(&batches).unwrap_or_default();
    let agent_apply_ms = (!applies.is_empty()).then(|| median_f64(applies.iter().copied()));
    std::thread::sleep(Duration::from_secs(1));
    let rss = lab.agent_rss(0)?;
    say(&format!(
        "  {n} leases: median start -> all routes {:.0} ms (ip -batch {:.0} ms), RSS {} -> {} KiB (anonymous {} -> {} KiB)",
        ms(start_to_routes),
        ms(ip_batch),
        rss_idle.total_kib,
        rss.total_kib,
        rss_idle.anon_kib,
        rss.anon_kib
    ));

    // Join/leave with N present.
    let ns = lab.hosts()[0].ns.clone();
    let mut mon = lab.monitor(&ns, &["route"])?;
    let writer = LeaseWriter::connect(lab.etcd())?;
    let (mut join, mut leave, mut put) = (Vec::new(), Vec::new(), Vec::new());
    let mut after_put = Vec::new();
    let churn: Vec<Ipv4Net> = (0..)
        .map(|j: u32| {
            Ipv4Net::new(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + (j << 8)),
                24,
            )
            .expect("prefix 24 is valid")
        })
        .filter(|s| *s != own)
        .take(opts.scale_joins)
        .collect();
    for (j, &subnet) in churn.iter().enumerate() {
        let mut rng = rand::rng();
        let peer = ScalePeer {
            subnet,
            public_ip: scale_public_ip(n + j),
            mac: MacAddr::random_local(&mut rng),
            // Far above the peers' /64s (index < 2^15 for every N the bench runs).
            v6: own6.map(|_| {
                let s6 = scale_subnet6(0xf000 + j);
                (
                    s6,
                    scale_public_ipv6(n + j),
                    MacAddr::random_local(&mut rng),
                )
            }),
        };
        let routes: Vec<IpNet> = std::iter::once(subnet.into())
            .chain(peer.v6.map(|v| v.0.into()))
            .collect();
        let m = join_leave(
            &writer,
            &mut mon,
            &peer.key(),
            &peer.value(&ty),
            &routes,
            opts.timeout,
        )?;
        join.push(m.join);
        leave.push(m.leave);
        put.push(m.put);
        after_put.push(m.after_put);
    }
    let rss_after = lab.agent_rss_kib(0)?;
    if let Some(dir) = &opts.log_dir {
        let path = dir.join(format!("scale-{ty}-{n}.log"));
        std::fs::write(&path, lab.agent_log(0)?)
            .map_err(|e| LabError::io(path.display().to_string(), e))?;
    }
    let p = |v: &[Duration], q: u32| ms(percentile(v, q).unwrap_or_default());
    let r = Scale {
        backend: label.to_string(),
        ipv6: dual,
        leases: n,
        start_to_routes_ms: ms(start_to_routes),
        agent_apply_ms,
        agent_subnet_file_ms,
        ip_batch_ms: ms(ip_batch),
        ip_batch_entries: entries,
        ratio_start: ratio(ms(start_to_routes), ms(ip_batch)),
        ratio_apply: agent_apply_ms.map(|a| ratio(a, ms(ip_batch))),
        rss_idle_kib: rss_idle.total_kib,
        rss_kib: rss.total_kib,
        bytes_per_peer: (rss.total_kib as f64 - rss_idle.total_kib as f64) * 1024.0
            / n.max(1) as f64,
        anon_idle_kib: rss_idle.anon_kib,
        anon_kib: rss.anon_kib,
        rss_after_churn_kib: rss_after,
        samples: join.len(),
        join_p50_ms: p(&join, 50),
        join_p99_ms: p(&join, 99),
        leave_p50_ms: p(&leave, 50),
        leave_p99_ms: p(&leave, 99),
        put_p50_ms: p(&put, 50),
        join_after_put_p50_ms: p(&after_put, 50),
        rounds: starts
            .iter()
            .zip(&batches)
            .map(|(s, b)| (ms(*s), ms(*b)))
            .collect(),
        agent_apply_rounds_ms: applies,
    };
    say(&format!(
        "  join p50/p99 {:.1}/{:.1} ms, leave p50/p99 {:.1}/{:.1} ms ({} samples; etcd put itself p50 {:.1} ms, join after the put returned p50 {:.1} ms)",
        r.join_p50_ms, r.join_p99_ms, r.leave_p50_ms, r.leave_p99_ms, r.samples, r.put_p50_ms,
        r.join_after_put_p50_ms
    ));
    Ok(r)
}

/// One join/leave sample: a lease written → its routes present, deleted → gone.
struct JoinLeave {
    join: Duration,
    leave: Duration,
    /// The etcd write itself.
    put: Duration,
    /// From the write's response to the route (0 if the watch beat the response).
    after_put: Duration,
}

/// Writes `key` as flanneld does (grant first, then the create transaction that
/// makes the lease visible, over gRPC), waits for a route to each of `routes` in
/// `mon` (a route monitor of the agent's host), deletes it and waits for the routes
/// to go. Join (leave) runs from the write's send to when the last family's route is
/// in (gone).
fn join_leave(
    writer: &LeaseWriter,
    mon: &mut flannel_testkit::Monitor,
    key: &str,
    value: &str,
    routes: &[IpNet],
    timeout: Duration,
) -> Result<JoinLeave> {
    let wait = |mon: &mut flannel_testkit::Monitor, mark, prefix: &str| {
        let mut last: Option<Instant> = None;
        for r in routes {
            let line = format!("{prefix}{r} ");
            let t = mon
                .wait_for_after(mark, timeout, |l| l.starts_with(&line))
                .ok_or_else(|| LabError::Timeout {
                    what: format!("`{line}` for lease {key}"),
                    after: timeout,
                })?;
            last = Some(last.map_or(t, |l| l.max(t)));
        }
        last.ok_or_else(|| LabError::Invalid("a join needs at least one route".into()))
    };
    let mark = mon.mark();
    let w = writer.create(key, value, LEASE_TTL_SECS)?;
    let routed = wait(mon, mark, "")?;
    let mark = mon.mark();
    let d = writer.delete(key)?;
    let gone = wait(mon, mark, "Deleted ")?;
    Ok(JoinLeave {
        join: routed.saturating_duration_since(w.sent),
        leave: gone.saturating_duration_since(d.sent),
        put: w.answered.saturating_duration_since(w.sent),
        after_put: routed.saturating_duration_since(w.answered),
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
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
    fn scale_peers_are_distinct_spread_and_clear_of_the_own_subnet() {
        let own: Ipv4Net = "10.1.5.0/24".parse().unwrap();
        let peers = scale_peers(10_000, own, None);
        assert_eq!(peers.len(), 10_000);
        assert!(peers.iter().all(|p| p.v6.is_none()));
        let subnets: std::collections::BTreeSet<_> = peers.iter().map(|p| p.subnet).collect();
        let ips: std::collections::BTreeSet<_> = peers.iter().map(|p| p.public_ip).collect();
        assert_eq!((subnets.len(), ips.len()), (10_000, 10_000));
        assert!(!subnets.contains(&own));
        let under: Ipv4Net = SCALE_UNDERLAY.parse().unwrap();
        let lab: Ipv4Net = "198.18.0.0/24".parse().unwrap();
        assert!(ips.iter().all(|ip| under.contains(ip) && !lab.contains(ip)));
        // Spread over the /16, not packed into its start.
        assert!(ips.iter().any(|ip| ip.octets()[2] > 200));
        let v = LeaseAttrs::decode(&peers[0].value("vxlan")).unwrap();
        assert_eq!(v.public_ip, Ipv4Addr::new(198, 18, 1, 0));
        assert_eq!(
            VxlanData::decode(v.backend_data.as_ref().unwrap())
                .unwrap()
                .vtep_mac,
            peers[0].mac
        );
    }

    #[test]
    fn baseline_batches_write_what_the_agent_writes() {
        let p = ScalePeer {
            subnet: "10.1.0.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::new(198, 18, 1, 0),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            v6: None,
        };
        let mut b = Batches::default();
        assert_eq!(p.batch_lines("vxlan", "flannel.1", &mut b), 3);
        assert_eq!(
            b.neigh,
            "neigh replace 10.1.0.0 lladdr 02:00:00:00:00:01 dev flannel.1 nud permanent\n"
        );
        assert_eq!(
            b.fdb,
            "fdb replace 02:00:00:00:00:01 dev flannel.1 dst 198.18.1.0 self permanent\n"
        );
        assert_eq!(
            b.routes,
            "route replace 10.1.0.0/24 via 10.1.0.0 dev flannel.1 onlink proto 70\n"
        );
        let mut b = Batches::default();
        assert_eq!(p.batch_lines("host-gw", "eth0", &mut b), 1);
        assert_eq!(
            b.routes,
            "route replace 10.1.0.0/24 via 198.18.1.0 dev eth0 proto 70\n"
        );
        assert!(b.fdb.is_empty() && b.neigh.is_empty());
    }

    #[test]
    fn dual_stack_scale_peers_publish_both_families_as_flanneld_does() {
        let own: Ipv4Net = "10.1.5.0/24".parse().unwrap();
        let own6: Ipv6Net = "fd10:0:0:3::/64".parse().unwrap();
        let peers = scale_peers(10_000, own, Some(own6));
        let v6: std::collections::BTreeSet<_> = peers.iter().map(|p| p.v6.unwrap().0).collect();
        let ip6: std::collections::BTreeSet<_> = peers.iter().map(|p| p.v6.unwrap().1).collect();
        assert_eq!((v6.len(), ip6.len()), (10_000, 10_000));
        assert!(!v6.contains(&own6));
        let net6: Ipv6Net = SCALE_IPV6_NETWORK.parse().unwrap();
        let under6 = Ipv6Net::new(UNDERLAY_V6_PREFIX, 64).unwrap();
        assert!(v6.iter().all(|s| net6.contains(s) && s.prefix_len() == 64));
        // On the lab's v6 link, clear of the hosts (::n) and the gateway (::fe).
        assert!(ip6
            .iter()
            .all(|a| under6.contains(a) && a.segments()[6] != 0));
        let p = &peers[0];
        assert_eq!(p.key(), "/coreos.com/network/subnets/10.1.0.0-24&fd10::-64");
        let (s6, a6, mac6) = p.v6.unwrap();
        assert_eq!(s6, "fd10::/64".parse::<Ipv6Net>().unwrap());
        let v = LeaseAttrs::decode(&p.value("vxlan")).unwrap();
        assert_eq!(v.public_ipv6, Some(a6));
        assert_eq!(
            VxlanData::decode(v.backend_v6_data.as_ref().unwrap())
                .unwrap()
                .vtep_mac,
            mac6
        );
        let v = LeaseAttrs::decode(&p.value("host-gw")).unwrap();
        assert!(v.backend_v6_data.is_none() && v.public_ipv6 == Some(a6));

        let mut b = Batches::default();
        assert_eq!(p.batch_lines("host-gw", "eth0", &mut b), 2);
        assert_eq!(
            b.routes,
            format!(
                "route replace fd10::/64 via {a6} dev eth0 proto 70 metric 1024\n\
                 route replace 10.1.0.0/24 via 198.18.1.0 dev eth0 proto 70\n"
            )
        );
        let mut b = Batches::default();
        assert_eq!(p.batch_lines("vxlan", "flannel.1", &mut b), 6);
        assert!(b.neigh.starts_with(&format!(
            "neigh replace fd10:: lladdr {mac6} dev flannel-v6.1 nud permanent\n"
        )));
        assert!(b.fdb.starts_with(&format!(
            "fdb replace {mac6} dev flannel-v6.1 dst {a6} self permanent\n"
        )));
        assert!(b.routes.starts_with(
            "route replace fd10::/64 via fd10:: dev flannel-v6.1 onlink proto 70 metric 1024\n"
        ));
    }

    #[test]
    fn proc_ipv6_routes_count_the_lease_64s_only() {
        // /proc/net/ipv6_route: dest, dest len, src, src len, next hop, metric,
        // refcnt, use, flags, device (all hex but the device).
        let line = |dest: &str, len: &str, dev: &str| {
            format!(
                "{dest} {len} 00000000000000000000000000000000 00 fd180198001800000000000000000002 00000400 00000001 00000000 00000003 {dev}\n"
            )
        };
        let text = [
            line("fd100000000000010000000000000000", "40", "eth0"),
            line("fd100000000000020000000000000000", "40", "eth0"),
            line("fd100000000000000000000000000000", "30", "eth0"),
            line("fd180198001800000000000000000000", "40", "eth0"),
            line("fe800000000000000000000000000000", "40", "eth0"),
        ]
        .concat();
        assert_eq!(count_proc_routes6(&text), 2);
    }

    #[test]
    fn proc_routes_and_log_fields() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
flannel.1\t0000010A\t0000010A\t0007\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
flannel.1\t0005020A\t0005020A\t0007\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
eth0\t000012C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
flannel.1\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
        assert_eq!(count_proc_routes(text), 2, "only /24s inside 10.0.0.0/8");
        let log = "x INFO full lease set programmed peers=5 elapsed_ms=12\n\
y INFO full lease set programmed peers=9 elapsed_ms=345\n";
        assert_eq!(log_field(log, PROGRAMMED_MARK, "elapsed_ms"), Some(345.0));
        assert_eq!(log_field(log, "nothing", "elapsed_ms"), None);
    }

    #[test]
    fn sections_parse() {
        let s: Sections = "scale".parse().unwrap();
        assert_eq!((s.throughput, s.convergence, s.scale), (false, false, true));
        assert_eq!("all".parse::<Sections>().unwrap(), Sections::default());
        assert!("scale,nope".parse::<Sections>().is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median_f64([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median_f64([4.0, 1.0].into_iter()), 2.5);
        assert_eq!(median_f64(std::iter::empty()), 0.0);
    }

    #[test]
    fn family_ratios_pair_each_v6_figure_with_its_v4_twin() {
        let t = |backend: &str, family: Family, streams, ratio| Throughput {
            backend: backend.into(),
            family: family.label().into(),
            streams,
            secs: 1,
            host_gbps: 10.0,
            pod_gbps: 10.0 * ratio,
            ratio,
            rounds: vec![],
            agent_cpu_s_per_gbit: None,
            wggo_gbps: None,
            ratio_wggo: None,
            wggo_cpu_s_per_gbit: None,
            wggo_rounds: vec![],
        };
        let all = [
            t("vxlan", Family::V4, 1, 0.8),
            t("vxlan", Family::V6, 1, 0.6),
            t("vxlan", Family::V4, 4, 0.5),
            t("host-gw", Family::V6, 1, 0.9),
            t("host-gw", Family::V4, 1, 1.0),
            t("udp", Family::V4, 1, 0.3),
        ];
        let r = family_ratios(&all);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!((r[0].0.as_str(), r[0].1), ("vxlan", 1));
        assert!((r[0].2 - 0.75).abs() < 1e-9);
        assert_eq!((r[1].0.as_str(), r[1].1), ("host-gw", 1));
        assert!((r[1].2 - 0.9).abs() < 1e-9);
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
