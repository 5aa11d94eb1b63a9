//! What an engine forks and writes at startup.

use super::*;

// ------------------------------------------------------- startup cost

/// What the agent does at startup (flanneld's traffic_rules::install): remove the other
/// engine's leftovers, then apply the set with a fresh engine.
fn startup(kind: EngineKind, opts: &EngineOptions, rs: &RuleSet) -> Box<dyn RuleEngine> {
    remove_other_engine_artifacts(kind, opts).unwrap();
    let mut e = new_engine(kind, opts.clone()).unwrap();
    e.apply(rs).unwrap();
    e
}

/// [`startup`], and the programs it started.
fn counted_startup(
    ns: &Ns,
    kind: EngineKind,
    opts: &EngineOptions,
    rs: &RuleSet,
) -> (Box<dyn RuleEngine>, crate::cmd::counts::Counts) {
    crate::cmd::counts::take(&ns.name);
    let e = startup(kind, opts, rs);
    (e, crate::cmd::counts::take(&ns.name))
}

/// Whether the kernel's commit notifications name our children (see `run_commit`).
fn early_commits_expected() -> bool {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|l| l.as_os_str() == "pid:[4026531836]")
        .unwrap_or(false)
}

#[test]
fn plain_jump_is_recognised_exactly_as_iptables_nft_writes_it() {
    if !require(&["ip", "iptables-nft"]) {
        return;
    }
    let ns = Ns::new("plain");
    ns.sh("iptables-nft -t nat -N FLANNEL-POSTRTG");
    ns.sh("iptables-nft -t nat -N OTHER");
    let comment = ["-m", "comment", "--comment", "flanneld masq"];
    let variants: [&[&str]; 8] = [
        &["-j", "FLANNEL-POSTRTG"],                              // the plain jump
        &["-s", "10.0.0.0/8", "-j", "FLANNEL-POSTRTG"],          // restricted
        &["-p", "tcp", "-j", "FLANNEL-POSTRTG"],                 // l4 protocol
        &["-g", "FLANNEL-POSTRTG"],                              // goto, not jump
        &["-j", "OTHER"],                                        // another target
        &["-j", "RETURN"],                                       // a verdict
        &["-m", "mark", "--mark", "1", "-j", "FLANNEL-POSTRTG"], // another match
        &["-j", "FLANNEL-POSTRTG"],                              // plain, but see below
    ];
    for (i, v) in variants.iter().enumerate() {
        let mut args = vec!["iptables-nft", "-t", "nat", "-A", "POSTROUTING"];
        if i == 7 {
            args.extend(["-m", "comment", "--comment", "flanneld masq2"]);
        } else {
            args.extend(comment);
        }
        args.extend(v.iter());
        ns.run(&args, None);
    }
    // Without any comment.
    ns.sh("iptables-nft -t nat -A POSTROUTING -j FLANNEL-POSTRTG");
    let mut nl = crate::nfnl::NfNetlink::open(Some(&ns.name)).unwrap();
    let got = nl
        .table_rules(crate::nfnl::NFPROTO_IPV4, "nat", |chain, attrs| {
            (chain == b"POSTROUTING")
                .then(|| crate::nfnl::is_plain_jump(attrs, "flanneld masq", "FLANNEL-POSTRTG"))
        })
        .unwrap();
    assert_eq!(
        got,
        [true, false, false, false, false, false, false, false, false]
    );
    // A missing table has no rules; existence checks answer without an error.
    assert!(nl
        .table_rules(crate::nfnl::NFPROTO_IPV6, "nat", |_, _| Some(()))
        .unwrap()
        .is_empty());
    assert!(nl
        .chain_exists(crate::nfnl::NFPROTO_IPV4, "nat", "FLANNEL-POSTRTG")
        .unwrap());
    assert!(!nl
        .chain_exists(crate::nfnl::NFPROTO_IPV4, "nat", "FLANNEL-FWD")
        .unwrap());
    assert!(!nl
        .chain_exists(crate::nfnl::NFPROTO_IPV4, "filter", "FLANNEL-FWD")
        .unwrap());
    assert!(!nl
        .table_exists(crate::nfnl::NFPROTO_IPV4, "flannel-ipv4")
        .unwrap());
}

#[test]
fn iptables_startup_forks_only_what_must_change() {
    if !require(&["ip", "iptables-nft", "nft"]) {
        return;
    }
    let ns = Ns::new("ipt-forks");
    let opts = ns.ipt_opts(IptablesVariant::Nft);
    let rs = rules_v4();
    let expected = || {
        let mut want = ipt_expected_v4(" --random-fully");
        want.sort();
        want
    };
    let rules_now = || {
        let mut got = save_rules(&ns, "iptables-nft-save");
        got.sort();
        got
    };
    let start = |rs: &RuleSet| counted_startup(&ns, EngineKind::Iptables, &opts, rs);

    // A clean host: the restore is the only program started, and the batch counts as
    // done on the kernel's commit notification.
    let (mut e, c) = start(&rs);
    assert_eq!(c.spawned, ["iptables-nft-restore"], "clean host");
    assert_eq!(c.committed_early, usize::from(early_commits_expected()));
    assert_eq!(rules_now(), expected());
    crate::cmd::counts::take(&ns.name);
    assert!(
        e.check(&rs).unwrap(),
        "baseline taken without iptables-save"
    );
    assert!(
        crate::cmd::counts::take(&ns.name).spawned.is_empty(),
        "check forks nothing"
    );
    drop(e);

    // A restart (our rules in place): iptables-save shows them exactly as wanted, so
    // nothing is rewritten (no commit at all).
    let gen = |ns: &Ns| {
        crate::nfnl::NfNetlink::open(Some(&ns.name))
            .unwrap()
            .generation()
            .unwrap()
    };
    let g0 = gen(&ns);
    let (mut e, c) = start(&rs);
    assert_eq!(c.spawned, ["iptables-nft-save"], "restart");
    assert_eq!(
        gen(&ns),
        g0,
        "a restart with the rules in place commits nothing"
    );
    assert_eq!(rules_now(), expected());
    crate::cmd::counts::take(&ns.name);
    assert!(e.check(&rs).unwrap());
    assert!(crate::cmd::counts::take(&ns.name).spawned.is_empty());
    drop(e);

    // Someone put rules above our jumps: they are put first again.
    ns.sh("iptables-nft -t nat -I POSTROUTING 1 -s 192.0.2.0/24 -j ACCEPT");
    ns.sh("iptables-nft -I FORWARD 1 -s 192.0.2.0/24 -j DROP");
    let (e, c) = start(&rs);
    assert_eq!(
        c.spawned,
        ["iptables-nft-save", "iptables-nft-restore"],
        "foreign rules first"
    );
    let got = save_rules(&ns, "iptables-nft-save");
    for (builtin, jump) in [
        ("-A FORWARD", "-j FLANNEL-FWD"),
        ("-A POSTROUTING", "-j FLANNEL-POSTRTG"),
    ] {
        let first = got.iter().find(|l| l.starts_with(builtin));
        assert!(first.is_some_and(|l| l.ends_with(jump)), "{got:#?}");
    }
    assert_eq!(got.iter().filter(|l| l.contains("-j FLANNEL-")).count(), 2);
    assert_eq!(got.len(), expected().len() + 2, "{got:#?}");
    drop(e);
    ns.sh("iptables-nft -t nat -D POSTROUTING -s 192.0.2.0/24 -j ACCEPT");
    ns.sh("iptables-nft -D FORWARD -s 192.0.2.0/24 -j DROP");

    // A rule of Go flanneld before v0.15, straight in POSTROUTING: only iptables-save
    // gives its text, so it is asked, and the rule goes.
    ns.run(
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.244.0.0/16",
            "-d",
            "10.244.0.0/16",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "RETURN",
        ],
        None,
    );
    let (e, c) = start(&rs);
    assert_eq!(c.spawned, ["iptables-nft-save", "iptables-nft-restore"]);
    assert_eq!(rules_now(), expected());
    drop(e);

    // Leftovers of the nftables engine: `nft` runs once to delete them (our iptables
    // rules are in place already).
    NftEngine::new(ns.opts()).unwrap().apply(&rs).unwrap();
    let (e, c) = start(&rs);
    assert_eq!(c.spawned, ["nft", "iptables-nft-save"]);
    assert!(!ns.sh("nft list tables").contains("flannel-ipv4"));
    assert_eq!(rules_now(), expected());
    drop(e);

    // Another lease (subnet.env recycling): the old rules are replaced.
    let other = RuleSet::new(true, true).with_ipv4(
        "10.244.0.0/16".parse().unwrap(),
        "10.244.7.0/24".parse().unwrap(),
    );
    let (e, c) = start(&other);
    assert_eq!(c.spawned, ["iptables-nft-save", "iptables-nft-restore"]);
    let mut want: Vec<String> = expected()
        .into_iter()
        .map(|l| l.replace("10.244.1.0/24", "10.244.7.0/24"))
        .collect();
    want.sort();
    assert_eq!(rules_now(), want);
    drop(e);
}

#[test]
fn nft_startup_forks_only_the_batch() {
    if !require(&["ip", "nft", "iptables-nft"]) {
        return;
    }
    let ns = Ns::new("nft-forks");
    let opts = ns.ipt_opts(IptablesVariant::Nft);
    let rs = rules_v4();
    let start = |rs: &RuleSet| counted_startup(&ns, EngineKind::Nftables, &opts, rs);

    // Clean host: one `nft` run, which also finds out that fully-random works.
    let (mut e, c) = start(&rs);
    assert_eq!(c.spawned, ["nft"], "clean host");
    assert_eq!(c.committed_early, usize::from(early_commits_expected()));
    assert_eq!(lines(&nft_table(&ns, "ip", "flannel-ipv4")), lines(NFT_V4));
    assert!(e.check(&rs).unwrap());
    drop(e);

    // Restart.
    let (e, c) = start(&rs);
    assert_eq!(c.spawned, ["nft"], "restart");
    assert_eq!(lines(&nft_table(&ns, "ip", "flannel-ipv4")), lines(NFT_V4));
    drop(e);

    // Without --ip-masq there is no masquerade to write.
    let fwd_only = RuleSet {
        ip_masq: false,
        ..rules_v4()
    };
    let (e, c) = start(&fwd_only);
    assert_eq!(c.spawned, ["nft"], "no masquerade");
    assert!(!nft_table(&ns, "ip", "flannel-ipv4").contains("postrtg"));
    drop(e);

    // iptables leftovers (a switch from iptables mode): the plain jumps are recognised
    // in-process, so one restore deletes them without iptables-save.
    IptablesEngine::new(opts.clone())
        .unwrap()
        .apply(&rs)
        .unwrap();
    let (e, c) = start(&rs);
    assert_eq!(
        c.spawned,
        ["iptables-nft-restore", "nft"],
        "iptables leftovers"
    );
    let ipt = ns.sh("iptables-nft-save") + &ns.sh("ip6tables-nft-save");
    assert!(
        !ipt.contains("FLANNEL") && !ipt.contains("flanneld"),
        "{ipt}"
    );
    assert_eq!(lines(&nft_table(&ns, "ip", "flannel-ipv4")), lines(NFT_V4));
    drop(e);
}
