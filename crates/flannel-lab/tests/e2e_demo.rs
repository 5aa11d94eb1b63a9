//! The README's demo command, run as a user runs it: `flannel-lab demo`, which builds
//! a lab, prints the ping matrices and iperf3 table, tears the lab down and fails if
//! any pod pair lost pings.

use std::process::Command;

use flannel_lab::e2e::{ready_with, Needs};

fn demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flannel-lab"))
        .arg("demo")
        .args(args)
        .output()
        .expect("run flannel-lab demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flannel-lab demo {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The numbers of an output line `  <n> of <m> pairs reachable over <family> ...`.
fn reachable(out: &str, family: &str) -> Option<(usize, usize)> {
    out.lines().find_map(|l| {
        let rest = l.trim().strip_suffix("without loss")?;
        let (counts, fam) = rest.split_once(" pairs reachable over ")?;
        if fam.trim() != family {
            return None;
        }
        let (n, m) = counts.split_once(" of ")?;
        Some((n.trim().parse().ok()?, m.trim().parse().ok()?))
    })
}

fn ratio(out: &str, family: &str) -> Option<f64> {
    let key = format!("ratio pod / host ({family})");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn demo_dual_stack_host_gw_reaches_every_pod_over_both_families() {
    dual_stack_demo("host-gw");
}

#[test]
fn demo_dual_stack_vxlan_reaches_every_pod_over_both_families() {
    dual_stack_demo("vxlan");
}

fn dual_stack_demo(backend: &str) {
    if !ready_with("demo --ipv6", Needs::Agents, &["iperf3"]) {
        return;
    }
    let out = demo(&["--backend", backend, "--ipv6", "--iperf-secs", "1"]);
    assert_eq!(reachable(&out, "IPv4"), Some((6, 6)), "{out}");
    assert_eq!(reachable(&out, "IPv6"), Some((6, 6)), "{out}");
    // Both families carried iperf3 traffic pod to pod (a ratio, not a speed).
    for f in ["IPv4", "IPv6"] {
        let r = ratio(&out, f).unwrap_or_else(|| panic!("no {f} ratio in\n{out}"));
        assert!(r > 0.0, "{f} pod traffic: ratio {r}\n{out}");
    }
    // Every pod line carries a v4 and a v6 address.
    let pods = out
        .lines()
        .skip_while(|l| l.trim() != "Pods")
        .skip(2)
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>();
    assert_eq!(pods.len(), 3, "{out}");
    for l in pods {
        let addrs: Vec<&str> = l.split_whitespace().skip(2).collect();
        assert_eq!(addrs.len(), 2, "{l}");
        assert!(addrs[0].parse::<std::net::Ipv4Addr>().is_ok(), "{l}");
        assert!(addrs[1].parse::<std::net::Ipv6Addr>().is_ok(), "{l}");
    }
    assert!(out.contains(" removed"), "lab not torn down:\n{out}");
}

#[test]
fn demo_default_vxlan_reaches_every_pod() {
    if !ready_with("demo", Needs::Agents, &["iperf3"]) {
        return;
    }
    let out = demo(&["--iperf-secs", "1"]);
    assert_eq!(reachable(&out, "IPv4"), Some((6, 6)), "{out}");
    assert_eq!(reachable(&out, "IPv6"), None, "IPv6 without --ipv6:\n{out}");
    assert!(ratio(&out, "IPv4").is_some_and(|r| r > 0.0), "{out}");
}
