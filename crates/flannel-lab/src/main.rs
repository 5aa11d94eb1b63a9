//! `flannel-lab`: a flannel cluster in network namespaces on this machine.
//!
//! `demo` builds one, shows hosts, pods, a ping matrix and iperf3 figures, then tears
//! it down (or leaves it up with `--keep`); `bench` measures throughput, convergence
//! and agent figures against baselines from the same run; `down` removes what a
//! killed run left behind.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use flannel_lab::bench::{self, backend_label, BenchOptions};
use flannel_lab::cleanup::{self, install_signal_teardown};
use flannel_lab::{leases, poll_until, Family, Lab, PodId};
use ipnet::Ipv4Net;

#[derive(Parser)]
#[command(
    name = "flannel-lab",
    version,
    about = "A flannel cluster in network namespaces on this machine (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a lab, show pods reaching each other and iperf3 figures, tear it down.
    Demo {
        /// Backend: a type (vxlan, host-gw, udp, alloc), `vxlan+direct` for
        /// DirectRouting, or a Backend JSON object.
        #[arg(long, default_value = "vxlan")]
        backend: String,
        /// Number of hosts.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Pods per host.
        #[arg(long, default_value_t = 1)]
        pods: usize,
        /// iperf3 duration in seconds (0 skips iperf3).
        #[arg(long, default_value_t = 3)]
        iperf_secs: u32,
        /// etcd members (1, 3, 5 or 7). With more than one, the demo also kills the
        /// etcd leader while pods ping and a new lease is written.
        #[arg(long, default_value_t = 1)]
        etcd_members: usize,
        /// Leave the lab running; remove it later with `flannel-lab down <prefix>`.
        #[arg(long)]
        keep: bool,
        /// Dual stack: an IPv6 underlay besides the IPv4 one, IPv6 pod network
        /// fd10:244::/56 (a /64 per host); every pod gets both addresses, and the
        /// ping matrix and iperf3 run for each family.
        #[arg(long)]
        ipv6: bool,
    },
    /// Throughput per backend against the underlay, convergence for N leases,
    /// join/leave latency, agent start time and RSS.
    Bench {
        /// Comma-separated backends (as for `demo --backend`, JSON not allowed here).
        #[arg(long, value_delimiter = ',', default_value = "vxlan,host-gw")]
        backends: Vec<String>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// iperf3 duration in seconds.
        #[arg(long, default_value_t = 3)]
        secs: u32,
        /// Comma-separated iperf3 stream counts.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        streams: Vec<u32>,
        /// Alternating host/pod iperf3 pairs per stream count (medians reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Comma-separated lease counts for the convergence runs.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        leases: Vec<usize>,
        /// Join/leave samples.
        #[arg(long, default_value_t = 20)]
        joins: usize,
        /// Timed agent (re)starts.
        #[arg(long, default_value_t = 5)]
        starts: usize,
        /// Comma-separated parts to run: throughput (with startup), convergence
        /// (with churn), scale; or all.
        #[arg(long, default_value = "all")]
        sections: bench::Sections,
        /// Comma-separated lease counts for the scale section.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        scale: Vec<usize>,
        /// Join/leave samples per scale run (p99 wants about 100).
        #[arg(long, default_value_t = 100)]
        scale_joins: usize,
        /// Alternating ip -batch / agent start rounds per scale run (medians).
        #[arg(long, default_value_t = 3)]
        scale_rounds: usize,
        /// Copy the agent log of each scale run into this directory.
        #[arg(long)]
        logs: Option<PathBuf>,
        /// Dual stack: throughput and startup for IPv4 and IPv6 (the v6 pod path
        /// against the v6 underlay, same run); scale leases with IPv6 parts too (all
        /// routes = both families', ip -batch writes both).
        #[arg(long)]
        ipv6: bool,
    },
    /// Kubernetes mode at scale: one agent against the fake API server holding N
    /// nodes whose status is rewritten periodically (start, steady-state API bytes
    /// and CPU, lease events, kernel writes, RSS, join/leave latency).
    BenchKube {
        /// Nodes in the cluster besides the agent's own (realistic Node objects,
        /// annotated as their flanneld left them).
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        /// Seconds between two status rewrites of each node.
        #[arg(long, default_value_t = 10)]
        churn_secs: u64,
        /// Steady-state window, seconds.
        #[arg(long, default_value_t = 60)]
        window_secs: u64,
        /// Join/leave samples (nodes added and deleted with the N present).
        #[arg(long, default_value_t = 20)]
        joins: usize,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Remove the namespaces, processes and run directories of labs whose process
    /// is gone (or of the named lab, e.g. one left by `demo --keep`).
    Down {
        /// A lab prefix (`flab-<pid>-<n>`); default: every lab of a dead process.
        prefix: Option<String>,
    },
}

fn parse_backend(s: &str) -> Result<Value> {
    let s = s.trim();
    if s.starts_with('{') {
        let v: Value = serde_json::from_str(s).context("backend JSON")?;
        if !v.is_object() {
            bail!("backend JSON must be an object");
        }
        return Ok(v);
    }
    Ok(match s {
        "vxlan+direct" => json!({"Type": "vxlan", "DirectRouting": true}),
        "" => bail!("empty backend name"),
        ty => json!({ "Type": ty }),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Down { prefix } => down(prefix.as_deref()),
        cmd => {
            if !flannel_lab::is_root() {
                eprintln!("flannel-lab: needs root (network namespaces)");
                return ExitCode::from(2);
            }
            install_signal_teardown()
                .map_err(anyhow::Error::from)
                .and_then(|()| match cmd {
                    Cmd::Demo {
                        backend,
                        hosts,
                        pods,
                        iperf_secs,
                        etcd_members,
                        keep,
                        ipv6,
                    } => demo(&DemoOptions {
                        backend,
                        hosts,
                        pods_per_host: pods,
                        secs: iperf_secs,
                        etcd_members,
                        keep,
                        ipv6,
                    }),
                    Cmd::Bench {
                        backends,
                        json,
                        secs,
                        streams,
                        rounds,
                        leases,
                        joins,
                        starts,
                        sections,
                        scale,
                        scale_joins,
                        scale_rounds,
                        logs,
                        ipv6,
                    } => {
                        let opts = BenchOptions {
                            backends: match backends
                                .iter()
                                .map(|b| parse_backend(b))
                                .collect::<Result<Vec<_>>>()
                            {
                                Ok(b) => b,
                                Err(e) => return Err(e),
                            },
                            secs,
                            streams,
                            rounds,
                            lease_counts: leases,
                            joins,
                            starts,
                            sections,
                            scale_counts: scale,
                            scale_joins,
                            scale_rounds,
                            log_dir: logs,
                            ipv6,
                            ..BenchOptions::default()
                        };
                        run_bench(&opts, json)
                    }
                    Cmd::BenchKube {
                        nodes,
                        churn_secs,
                        window_secs,
                        joins,
                        json,
                    } => bench_kube(
                        &flannel_lab::bench_kube::KubeBenchOptions {
                            nodes,
                            churn_period: std::time::Duration::from_secs(churn_secs),
                            window: std::time::Duration::from_secs(window_secs),
                            joins,
                            ..Default::default()
                        },
                        json,
                    ),
                    Cmd::Down { .. } => unreachable!("handled above"),
                })
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flannel-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stepper() -> impl Fn(&str) + Copy + 'static {
    let t0 = Instant::now();
    move |s: &str| println!("[{:>5.1}s] {s}", t0.elapsed().as_secs_f64())
}

struct DemoOptions {
    backend: String,
    hosts: usize,
    pods_per_host: usize,
    secs: u32,
    etcd_members: usize,
    keep: bool,
    ipv6: bool,
}

/// The demo's IPv6 pod network (`--ipv6`).
const DEMO_IPV6_NETWORK: &str = "fd10:244::/56";

fn demo(o: &DemoOptions) -> Result<()> {
    let (hosts, pods_per_host, secs, keep) = (o.hosts, o.pods_per_host, o.secs, o.keep);
    let backend = parse_backend(&o.backend)?;
    let label = backend_label(&backend);
    let say = stepper();
    println!(
        "flannel-lab demo: {hosts} hosts, backend {label}, {} etcd member(s){}",
        o.etcd_members,
        if o.ipv6 { ", dual stack" } else { "" }
    );
    let mut builder = Lab::builder()
        .hosts(hosts)
        .backend_json(&backend.to_string())
        .etcd_members(o.etcd_members)
        .keepable(keep)
        .on_progress(say);
    if o.ipv6 {
        builder = builder.dual_stack(DEMO_IPV6_NETWORK);
    }
    let mut lab = builder.build()?;
    let families: &[Family] = if o.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    let mut pods: Vec<PodId> = Vec::new();
    for h in 0..hosts {
        for _ in 0..pods_per_host {
            let id = lab.add_pod(h)?;
            let p = lab.pod(id)?;
            say(&format!(
                "pod {} on {} -> {}",
                p.ns,
                lab.hosts()[h].ns,
                addrs_of(p, families)
            ));
            pods.push(id);
        }
    }
    let data_plane = label != "alloc";
    if data_plane {
        say("waiting until every pod reaches every other pod");
        let t = Instant::now();
        let mut unreachable = 0;
        for &f in families {
            for &a in &pods {
                for &b in &pods {
                    let to = lab.pod(b)?.addr(f);
                    if a != b && to.is_none_or(|ip| lab.wait_reachable_ip(a, ip).is_err()) {
                        unreachable += 1;
                    }
                }
            }
        }
        say(&format!(
            "mesh ready after {:.1} s ({unreachable} pair(s) unreachable)",
            t.elapsed().as_secs_f64()
        ));
    }

    println!("\nHosts");
    println!(
        "  {:<22} {:<14} {:<18} {:<20} {:>5}",
        "NAME", "PUBLIC IP", "SUBNET", "IPV6 SUBNET", "MTU"
    );
    for (h, host) in lab.hosts().iter().enumerate() {
        let sf = lab.subnet_file(h)?;
        println!(
            "  {:<22} {:<14} {:<18} {:<20} {:>5}",
            host.ns,
            host.ip.to_string(),
            sf.as_ref().map_or("-".into(), |s| s.subnet.to_string()),
            sf.as_ref()
                .and_then(|s| s.ipv6_subnet)
                .map_or("-".into(), |s| s.to_string()),
            sf.as_ref().map_or("-".into(), |s| s.mtu.to_string()),
        );
    }
    println!("\nPods");
    println!("  {:<22} {:<22} {:<14}", "NAME", "HOST", "ADDRESSES");
    for p in lab.pods() {
        println!(
            "  {:<22} {:<22} {}",
            p.ns,
            lab.hosts()[p.host].ns,
            addrs_of(p, families)
        );
    }

    // Pairs with loss, over all families: the demo fails if any (after teardown).
    let mut lossy = 0;
    if data_plane {
        for &f in families {
            let failures = ping_matrix(&lab, &pods, f)?;
            lossy += failures;
            let pairs = pods.len() * (pods.len() - 1);
            println!(
                "  {} of {pairs} pairs reachable over {} without loss",
                pairs - failures,
                f.label()
            );
        }
        if secs > 0 && hosts >= 2 && pods.len() >= 2 {
            let (a, b) = (pods[0], pods[pods_per_host]);
            println!("\nThroughput (iperf3, {secs} s, single stream)");
            println!("  {:<48} {:>8}", "PATH", "Gbit/s");
            for &f in families {
                let host = lab.iperf_hosts_over(f, 0, 1, secs, 1)?;
                let pod = lab.iperf_pods_over(f, a, b, secs, 1)?;
                let ends = |x: Option<IpAddr>| x.map_or("-".into(), |i| i.to_string());
                println!(
                    "  {:<48} {:>8.2}",
                    format!(
                        "host {} -> host {}",
                        ends(lab.hosts()[0].addr(f)),
                        ends(lab.hosts()[1].addr(f))
                    ),
                    host
                );
                println!(
                    "  {:<48} {:>8.2}",
                    format!(
                        "pod {} -> pod {}",
                        ends(lab.pod(a)?.addr(f)),
                        ends(lab.pod(b)?.addr(f))
                    ),
                    pod
                );
                println!(
                    "  {:<48} {:>8.2}",
                    format!("ratio pod / host ({})", f.label()),
                    if host > 0.0 { pod / host } else { 0.0 }
                );
            }
        }
    }

    if data_plane && lab.etcd_member_count() > 1 && hosts >= 2 && pods.len() >= 2 {
        let ty = backend
            .get("Type")
            .and_then(Value::as_str)
            .unwrap_or("vxlan");
        etcd_failover(&mut lab, pods[0], pods[pods_per_host], ty, say)?;
    }

    let rss: Vec<String> = (0..hosts)
        .map(|h| {
            lab.agent_rss_kib(h)
                .map(|r| format!("{r}"))
                .unwrap_or_else(|_| "-".into())
        })
        .collect();
    println!("\nflanneld RSS (KiB) per host: {}", rss.join(", "));
    println!();
    if keep {
        let first_pod = lab.pods().next().map(|p| p.ns.clone());
        let (prefix, run_dir) = lab.into_kept()?;
        say(&format!("lab {prefix} left running"));
        if let Some(p) = first_pod {
            println!("  enter a pod:       ip netns exec {p} bash");
        }
        println!("  agent logs etc.:   {}", run_dir.display());
        println!("  remove it later:   flannel-lab down {prefix}");
    } else {
        say("tearing down");
        let prefix = lab.prefix().to_string();
        lab.teardown()?;
        say(&format!("{prefix} removed"));
    }
    if lossy > 0 {
        bail!("{lossy} pod pair(s) lost pings");
    }
    Ok(())
}

/// A pod's addresses of `families`, space-separated.
fn addrs_of(p: &flannel_lab::Pod, families: &[Family]) -> String {
    families
        .iter()
        .map(|&f| p.addr(f).map_or("-".into(), |a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints a ping matrix (3 pings per pair) over `family`; returns the pairs with loss.
fn ping_matrix(lab: &Lab, pods: &[PodId], family: Family) -> Result<usize> {
    println!(
        "\nPing matrix, {} (3 pings each, 0.2 s apart; row pings column)",
        family.label()
    );
    let ips: Vec<Option<IpAddr>> = pods
        .iter()
        .map(|p| lab.pod(*p).map(|p| p.addr(family)))
        .collect::<Result<_, _>>()?;
    let name = |ip: &Option<IpAddr>| ip.map_or("-".into(), |i| i.to_string());
    let width = ips.iter().map(|i| name(i).len()).max().unwrap_or(0).max(12);
    print!("  {:<width$}", "from \\ to");
    for ip in &ips {
        print!(" {:<width$}", name(ip));
    }
    println!();
    let mut failures = 0;
    for (i, &a) in pods.iter().enumerate() {
        print!("  {:<width$}", name(&ips[i]));
        for (j, ip) in ips.iter().enumerate() {
            if i == j {
                print!(" {:<width$}", "-");
                continue;
            }
            let Some(ip) = ip else {
                failures += 1;
                print!(" {:<width$}", "✗ no address");
                continue;
            };
            let s = lab.ping_ip(a, *ip, 3)?;
            if !s.all_replied() {
                failures += 1;
            }
            let mark = if s.all_replied() { "✓" } else { "✗" };
            print!(
                " {:<width$}",
                format!("{mark} {:.0}% loss", s.loss() * 100.0)
            );
        }
        println!();
    }
    Ok(failures)
}

fn bench_kube(
    opts: &flannel_lab::bench_kube::KubeBenchOptions,
    json_out: Option<PathBuf>,
) -> Result<()> {
    let r = flannel_lab::bench_kube::run(opts, stepper())?;
    print!("\n{}", flannel_lab::bench_kube::render(&r));
    if let Some(p) = json_out {
        std::fs::write(&p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Kills the etcd leader while a pod pings another host's pod and a made-up peer's
/// lease is written; shows how long etcd and the agents took and what the pods lost.
fn etcd_failover(
    lab: &mut Lab,
    from: PodId,
    to: PodId,
    backend_type: &str,
    say: impl Fn(&str),
) -> Result<()> {
    let n = lab.etcd_member_count();
    println!("\netcd failover ({n} members): kill the leader while pods ping");
    let leader = lab
        .etcd_leader()?
        .context("no etcd member knows of a leader")?;
    let name = lab.etcd_member(leader)?.name.clone();
    // 10 s of pings at 0.2 s: the failover and the lease below fit well inside.
    let ping = lab.start_ping(from, lab.pod(to)?.ip, 50)?;
    std::thread::sleep(Duration::from_secs(1));
    let peer: Ipv4Net = "10.244.250.0/24".parse()?;
    let key = Lab::lease_key_for(peer);
    let value = leases::peer_lease_value(backend_type, Ipv4Addr::new(198, 18, 0, 250));
    say(&format!("killing etcd leader {name} (SIGKILL)"));
    lab.stop_etcd_member(leader)?;
    let killed = Instant::now();
    let deadline = Duration::from_secs(60);
    let mut new_leader = None;
    poll_until(
        "a new etcd leader",
        deadline,
        Duration::from_millis(20),
        || {
            new_leader = lab.etcd_leader()?;
            Ok(new_leader.is_some())
        },
    )?;
    let elected = killed.elapsed();
    let new_name = match new_leader {
        Some(i) => lab.etcd_member(i)?.name.clone(),
        None => "?".into(),
    };
    say(&format!(
        "{new_name} leads after {:.2} s",
        elected.as_secs_f64()
    ));
    poll_until(
        "etcd to accept a write",
        deadline,
        Duration::from_millis(20),
        || Ok(lab.etcd().put(&key, &value).is_ok()),
    )?;
    let written = killed.elapsed();
    say(&format!(
        "new lease {peer} written {:.2} s after the kill",
        written.as_secs_f64()
    ));
    for h in 0..lab.hosts().len() {
        poll_until(
            &format!("host {} to route {peer}", h + 1),
            deadline,
            Duration::from_millis(20),
            || {
                // wireguard routes the whole network to its device: the new peer
                // shows up among the device's allowed IPs instead.
                if backend_type == "wireguard" {
                    let want = format!("allowed_ip={peer}");
                    return Ok(lab.wireguard_uapi_get(h)?.lines().any(|l| l == want));
                }
                Ok(lab.route_to(h, peer)?.is_some())
            },
        )?;
    }
    let routed = killed.elapsed();
    say(&format!(
        "{peer} routed on every host {:.2} s after the kill",
        routed.as_secs_f64()
    ));
    lab.restart_etcd_member(leader)?;
    lab.wait_etcd_member(leader)?;
    say(&format!("{name} restarted and back in the cluster"));
    lab.etcd().delete(&key)?;
    let s = ping.finish(Duration::from_secs(60))?;
    println!(
        "  leader kill -> new leader {:.2} s, -> lease written {:.2} s, -> routed on all hosts {:.2} s; pod ping {}/{} replies ({:.0}% loss)",
        elected.as_secs_f64(),
        written.as_secs_f64(),
        routed.as_secs_f64(),
        s.received,
        s.transmitted,
        s.loss() * 100.0
    );
    Ok(())
}

fn run_bench(opts: &BenchOptions, json_out: Option<PathBuf>) -> Result<()> {
    let say = stepper();
    let t0 = Instant::now();
    let report = bench::run(opts, say);
    println!(
        "\nflannel-lab bench ({} CPUs, kernel {}, load {}), {:.0} s",
        report.machine.cpus,
        report.machine.kernel,
        report.machine.load_avg,
        t0.elapsed().as_secs_f64()
    );
    if !report.throughput.is_empty() {
        println!(
            "\nThroughput: pod-to-pod across hosts vs underlay host-to-host \
             (iperf3 {} s, same run, median of {} alternating rounds)",
            opts.secs, opts.rounds
        );
        println!(
            "  {:<28} {:>6} {:>7} {:>10} {:>10} {:>7}",
            "BACKEND", "FAMILY", "STREAMS", "POD Gb/s", "HOST Gb/s", "RATIO"
        );
        for t in &report.throughput {
            println!(
                "  {:<28} {:>6} {:>7} {:>10.2} {:>10.2} {:>7.3}",
                t.backend, t.family, t.streams, t.pod_gbps, t.host_gbps, t.ratio
            );
        }
        for (backend, streams, r) in bench::family_ratios(&report.throughput) {
            println!(
                "  {backend} {streams} stream(s): IPv6 ratio / IPv4 ratio = {r:.3} \
                 (goal: within 5 % of 1)"
            );
        }
        let userspace: Vec<_> = report
            .throughput
            .iter()
            .filter(|t| t.agent_cpu_s_per_gbit.is_some() || t.wggo_gbps.is_some())
            .collect();
        if !userspace.is_empty() {
            println!(
                "\nUserspace data paths: CPU seconds per Gbit (both agents; = cores per Gbit/s), \
                 and Debian's wireguard-go between the same hosts in the same run"
            );
            println!(
                "  {:<28} {:>6} {:>7} {:>9} {:>11} {:>10} {:>9} {:>12}",
                "BACKEND",
                "FAMILY",
                "STREAMS",
                "CPU s/Gb",
                "WG-GO Gb/s",
                "WG-GO/HOST",
                "POD/WG-GO",
                "WG-GO CPU/Gb"
            );
            let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
            for t in userspace {
                println!(
                    "  {:<28} {:>6} {:>7} {:>9} {:>11} {:>10} {:>9} {:>12}",
                    t.backend,
                    t.family,
                    t.streams,
                    f(t.agent_cpu_s_per_gbit, 3),
                    f(t.wggo_gbps, 2),
                    f(
                        t.wggo_gbps.map(|w| if t.host_gbps > 0.0 {
                            w / t.host_gbps
                        } else {
                            0.0
                        }),
                        3
                    ),
                    f(t.ratio_wggo, 2),
                    f(t.wggo_cpu_s_per_gbit, 3),
                );
            }
        }
    }
    if !report.convergence.is_empty() {
        println!("\nConvergence: agent start -> all N routes present");
        println!(
            "  {:<28} {:>7} {:>9} {:>10}",
            "BACKEND", "LEASES", "SECONDS", "RSS KiB"
        );
        for c in &report.convergence {
            println!(
                "  {:<28} {:>7} {:>9.2} {:>10}",
                c.backend, c.leases, c.seconds, c.agent_rss_kib
            );
        }
    }
    if !report.churn.is_empty() {
        println!("\nChurn: one lease put/deleted in etcd -> route added/removed (ip monitor)");
        println!(
            "  {:<28} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "BACKEND", "PRESENT", "SAMPLES", "JOIN p50", "JOIN max", "LEAVE p50", "LEAVE max"
        );
        for c in &report.churn {
            println!(
                "  {:<28} {:>8} {:>8} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms",
                c.backend,
                c.leases_present,
                c.samples,
                c.join_p50_ms,
                c.join_max_ms,
                c.leave_p50_ms,
                c.leave_max_ms
            );
        }
    }
    if !report.startup.is_empty() {
        println!("\nAgent: start -> subnet.env written (median), RSS with one peer");
        println!(
            "  {:<28} {:>10} {:>8} {:>10} {:>10}",
            "BACKEND", "FAMILIES", "SAMPLES", "MEDIAN ms", "RSS KiB"
        );
        for s in &report.startup {
            println!(
                "  {:<28} {:>10} {:>8} {:>10.1} {:>10}",
                s.backend,
                if s.ipv6 { "v4+v6" } else { "v4" },
                s.samples,
                s.median_ms,
                s.agent_rss_kib
            );
        }
    }
    if !report.scale.is_empty() {
        println!(
            "\nScale: N leases, each on its own 24 h etcd lease, public IPs over a /16 \
             (same run; ip -batch writes the same kernel entries in a fresh namespace)"
        );
        println!(
            "  {:<14} {:>6} {:>9} {:>9} {:>9} {:>6} {:>6} {:>8} {:>8} {:>7} {:>11} {:>15} {:>15} {:>6}",
            "BACKEND",
            "LEASES",
            "START ms",
            "APPLY ms",
            "IP-B ms",
            "xSTART",
            "xAPPLY",
            "RSS0 KiB",
            "RSS KiB",
            "B/PEER",
            "ANON KiB",
            "JOIN p50/p99",
            "LEAVE p50/p99",
            "PUT"
        );
        for s in &report.scale {
            let opt =
                |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
            println!(
                "  {:<14} {:>6} {:>9.0} {:>9} {:>9.0} {:>6.2} {:>6} {:>8} {:>8} {:>7.0} {:>11} {:>15} {:>15} {:>6.1}",
                if s.ipv6 {
                    format!("{} v4+v6", s.backend)
                } else {
                    s.backend.clone()
                },
                s.leases,
                s.start_to_routes_ms,
                opt(s.agent_apply_ms, 0),
                s.ip_batch_ms,
                s.ratio_start,
                opt(s.ratio_apply, 2),
                s.rss_idle_kib,
                s.rss_kib,
                s.bytes_per_peer,
                format!("{}->{}", s.anon_idle_kib, s.anon_kib),
                format!("{:.1}/{:.1}", s.join_p50_ms, s.join_p99_ms),
                format!("{:.1}/{:.1}", s.leave_p50_ms, s.leave_p99_ms),
                s.put_p50_ms
            );
        }
        println!(
            "  START: spawn -> all N routes; APPLY: the agent's own log, full lease set -> kernel \
             programmed; xSTART/xAPPLY: ratio to ip -batch; B/PEER: (RSS - RSS0) / N; ANON: the \
             agent's own memory (RssAnon) with 0 -> N peers, the rest of RSS being the executable's \
             pages from the page cache; \
             PUT: the lease's create transaction over gRPC, as flanneld writes it (inside every join sample)"
        );
    }
    for e in &report.errors {
        println!("\nerror: {e}");
    }
    if let Some(path) = json_out {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n").with_context(|| format!("write {}", path.display()))?;
        println!("\nresults written to {}", path.display());
    }
    if !report.errors.is_empty() {
        bail!("{} measurement(s) failed", report.errors.len());
    }
    Ok(())
}

fn down(prefix: Option<&str>) -> Result<()> {
    if !flannel_lab::is_root() {
        bail!("needs root");
    }
    let r = cleanup::down(prefix)?;
    for (pid, comm) in &r.killed {
        println!("killed {pid} ({comm})");
    }
    for ns in &r.removed_namespaces {
        println!("removed namespace {ns}");
    }
    for d in &r.removed_dirs {
        println!("removed {}", d.display());
    }
    for (p, why) in &r.skipped {
        println!("left {p}: {why}");
    }
    if r.removed_namespaces.is_empty() && r.removed_dirs.is_empty() && r.skipped.is_empty() {
        println!("nothing to remove");
    }
    if !r.errors.is_empty() {
        bail!("{}", r.errors.join("; "));
    }
    Ok(())
}
