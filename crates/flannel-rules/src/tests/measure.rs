//! Measurements (ignored by default; they print figures and assert nothing about
//! time).

use super::*;

// ------------------------------------------------------- idle cost (a measurement, not a test)

/// CPU time (user + system) of this process and its reaped children.
fn cpu_time() -> Duration {
    let get = |who| {
        // SAFETY: rusage is plain old data; getrusage fills it and we check the result.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage.
        let r = unsafe { libc::getrusage(who, &mut ru) };
        assert_eq!(r, 0, "getrusage");
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    get(libc::RUSAGE_SELF) + get(libc::RUSAGE_CHILDREN)
}

/// Prints the CPU cost of the periodic check for each engine, next to the cost of the
/// fork-based check upstream's approach needs, measured in the same run. Run alone:
/// `cargo test -p flannel-net --lib rules::tests::idle_cpu -- --ignored --nocapture --test-threads=1`
#[test]
#[ignore = "measurement; prints figures, asserts nothing about time"]
fn idle_cpu_of_the_rule_resync() {
    if !require(&["ip", "nft", "iptables", "iptables-legacy"]) {
        return;
    }
    const N: u32 = 200;
    let per_minute = |d: Duration| d / N * 12; // 12 checks per minute at --iptables-resync=5
    let ns = Ns::new("idle");
    let rs = rules_dual();
    let mut engines: Vec<(&str, Box<dyn RuleEngine>)> = vec![
        ("nftables", Box::new(NftEngine::new(ns.opts()).unwrap())),
        (
            "iptables (nf_tables backend)",
            Box::new(IptablesEngine::new(ns.ipt_opts(IptablesVariant::Nft)).unwrap()),
        ),
        (
            "iptables (legacy backend)",
            Box::new(IptablesEngine::new(ns.ipt_opts(IptablesVariant::Legacy)).unwrap()),
        ),
    ];
    for (name, e) in engines.iter_mut() {
        e.apply(&rs).unwrap();
        let t0 = cpu_time();
        for _ in 0..N {
            assert!(e.check(&rs).unwrap());
        }
        let took = cpu_time() - t0;
        println!(
            "{name}: check() {:?} CPU each, {:?} per 60 s at 5 s interval (cheap: {})",
            took / N,
            per_minute(took),
            e.cheap_check()
        );
    }
    // Baselines in the same run: what a fork-per-tick check costs.
    let runner = Runner::new(Some(ns.name.clone()));
    for (label, prog, args) in [
        (
            "baseline: fork `iptables-nft-save` per tick (v4 only)",
            "iptables-nft-save",
            vec![],
        ),
        (
            "baseline: fork `nft -j list table ip flannel-ipv4` per tick",
            "nft",
            vec!["-j", "list", "table", "ip", "flannel-ipv4"],
        ),
    ] {
        let t0 = cpu_time();
        for _ in 0..N / 4 {
            runner.run(prog, &args, None).unwrap();
        }
        let took = (cpu_time() - t0) * 4;
        println!(
            "{label}: {:?} CPU each, {:?} per 60 s",
            took / N,
            per_minute(took)
        );
    }
    // Upstream's check: one `iptables -C` fork per rule (10 rules in v4) every tick.
    let checks: Vec<Vec<String>> = ipt_expected_v4(" --random-fully")
        .iter()
        .filter_map(|l| l.strip_prefix("-A "))
        .map(|rest| {
            let table = if rest.contains("forward") {
                "filter"
            } else {
                "nat"
            };
            let mut args = vec!["-t".to_string(), table.to_string(), "-C".to_string()];
            // The comment is the only quoted, space-holding argument.
            let (before, after) = rest.split_once('"').unwrap_or((rest, ""));
            args.extend(before.split_whitespace().map(str::to_string));
            let (comment, tail) = after.split_once('"').unwrap_or(("", after));
            args.push(comment.to_string());
            args.extend(tail.split_whitespace().map(str::to_string));
            args
        })
        .collect();
    let t0 = cpu_time();
    for _ in 0..N / 20 {
        for c in &checks {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            runner.run("iptables-nft", &args, None).unwrap();
        }
    }
    let took = (cpu_time() - t0) * 20;
    println!(
        "baseline: upstream-style `iptables -C` per rule ({} forks) per tick: {:?} CPU per tick, {:?} per 60 s",
        checks.len(),
        took / N,
        per_minute(took)
    );

    // Unrelated nf_tables commits (e.g. kube-proxy) every tick: the fingerprint path.
    let (_, e) = &mut engines[0];
    let t0 = cpu_time();
    let mut extra = Duration::ZERO;
    for i in 0..N / 4 {
        let c0 = cpu_time();
        runner
            .run(
                "nft",
                &["add", "table", "inet", &format!("churn{}", i % 2)],
                None,
            )
            .unwrap();
        extra += cpu_time() - c0;
        assert!(e.check(&rs).unwrap());
    }
    let took = (cpu_time() - t0 - extra) * 4;
    println!(
        "nftables check() after an unrelated commit: {:?} CPU each",
        took / N
    );

    // The real thing: the resync thread at 5 s for 60 s.
    let (_, e) = engines.remove(0);
    let t0 = cpu_time();
    let h = spawn_resync(e, rs, Duration::from_secs(5), |_| {}).unwrap();
    std::thread::sleep(Duration::from_secs(60));
    drop(h);
    println!(
        "nftables resync thread, 60 s idle at 5 s interval: {:?} CPU (whole test process)",
        cpu_time() - t0
    );
}
