//! The iptables engine: both variants, Go flanneld's rules, check/resync, cleanup.

use super::*;

// ---------------------------------------------------------------- iptables

pub(super) fn ipt_expected_v4(rf: &str) -> Vec<String> {
    [
        "*filter",
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
        "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
        "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
        "*nat",
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
        &format!(
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE{rf}"
        ),
        &format!(
            "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE{rf}"
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Table headers and rule lines of `iptables-save` (no comments, chain declarations,
/// COMMIT), i.e. exactly what can be compared verbatim; tables sorted by name (legacy and
/// nft print them in different orders).
pub(super) fn save_rules(ns: &Ns, bin: &str) -> Vec<String> {
    let mut tables: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut current = String::new();
    for l in ns.sh(bin).lines() {
        if l.starts_with('*') {
            current = l.to_string();
            tables.entry(current.clone()).or_default();
        } else if l.starts_with("-A ") {
            tables
                .entry(current.clone())
                .or_default()
                .push(l.to_string());
        }
    }
    tables
        .into_iter()
        .flat_map(|(t, rules)| std::iter::once(t).chain(rules))
        .collect()
}

/// Both iptables variants: Debian's iptables package ships both, so under
/// FLANNEL_E2E=1 a missing one fails the test instead of dropping its cases.
fn variants() -> Vec<(IptablesVariant, &'static str)> {
    let mut v = Vec::new();
    for (variant, suffix) in [
        (IptablesVariant::Nft, "-nft"),
        (IptablesVariant::Legacy, "-legacy"),
    ] {
        let tool = format!("iptables{suffix}");
        if tool_exists(&tool) {
            v.push((variant, suffix));
        } else {
            flannel_testkit::skip_or_fail(
                &flannel_testkit::gate::this_test(),
                format!("{tool} is not installed (Debian package iptables); its cases"),
            );
        }
    }
    v
}

#[test]
fn iptables_apply_writes_the_expected_rules_and_is_idempotent() {
    if !require(&["ip", "iptables", "ip6tables"]) {
        return;
    }
    for (variant, infix) in variants() {
        let ns = Ns::new("ipt-apply");
        // Rules that exist before start end up after ours (upstream inserts at 1).
        ns.sh(&format!(
            "iptables{infix} -t nat -A POSTROUTING -s 192.0.2.0/24 -j ACCEPT"
        ));
        ns.sh(&format!(
            "iptables{infix} -A FORWARD -s 192.0.2.0/24 -j DROP"
        ));
        let mut e = IptablesEngine::new(ns.ipt_opts(variant)).unwrap();
        assert!(e.cheap_check(), "{variant:?}");
        let rs = rules_dual();
        for _ in 0..3 {
            e.apply(&rs).unwrap();
            let mut want = ipt_expected_v4(" --random-fully");
            want.insert(1, "-A FORWARD -s 192.0.2.0/24 -j DROP".into());
            want.push("-A POSTROUTING -s 192.0.2.0/24 -j ACCEPT".into());
            let mut got = save_rules(&ns, &format!("iptables{infix}-save"));
            // The jump must be first in its built-in chain; compare the rest as sets per chain.
            let fwd: Vec<&String> = got.iter().filter(|l| l.starts_with("-A FORWARD")).collect();
            assert!(fwd[0].ends_with("-j FLANNEL-FWD"), "{got:#?}");
            let post: Vec<&String> = got
                .iter()
                .filter(|l| l.starts_with("-A POSTROUTING"))
                .collect();
            assert!(post[0].ends_with("-j FLANNEL-POSTRTG"), "{got:#?}");
            got.sort();
            want.sort();
            assert_eq!(got, want, "{variant:?}");

            let v6 = ns.sh(&format!("ip6tables{infix}-save"));
            assert_eq!(v6.matches("-j FLANNEL-POSTRTG").count(), 1, "{v6}");
            assert!(
                v6.contains("-A FLANNEL-POSTRTG -s 2001:cafe:42::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
                "{v6}"
            );
            assert!(
                v6.contains("-A FLANNEL-POSTRTG ! -s 2001:cafe:42::/56 -d 2001:cafe:42:1::/64 -m comment --comment \"flanneld masq\" -j RETURN"),
                "{v6}"
            );
            assert_eq!(v6.matches("-A FLANNEL-POSTRTG").count(), 6, "{v6}");
            assert_eq!(v6.matches("-A FLANNEL-FWD").count(), 2, "{v6}");
        }
        assert!(e.check(&rs).unwrap());
    }
}

#[test]
fn iptables_takes_over_go_flanneld_rules_without_duplicating() {
    if !require(&["ip", "iptables"]) {
        return;
    }
    for (variant, infix) in variants() {
        let ns = Ns::new("ipt-go");
        // What Go flanneld v0.20.2 leaves (Appendix A.4), plus a pre-v0.15 rule that sat
        // straight in POSTROUTING, plus a foreign rule.
        let mut input = crate::iptables::GO_FLANNELD_SAVE.to_string().replace(
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n",
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
             -A POSTROUTING -s 192.0.2.0/24 -j ACCEPT\n",
        );
        input = input.replace("# Generated by iptables-save v1.8.9 (nf_tables)\n", "");
        ns.run(&[&format!("iptables{infix}-restore")], Some(&input));
        let mut e = IptablesEngine::new(ns.ipt_opts(variant)).unwrap();
        let rs = RuleSet::new(true, true).with_ipv4(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.48.0/24".parse().unwrap(),
        );
        assert!(!e.check(&rs).unwrap());
        e.apply(&rs).unwrap();
        e.apply(&rs).unwrap();
        let got = save_rules(&ns, &format!("iptables{infix}-save"));
        let want: Vec<String> = ipt_expected_v4(" --random-fully")
            .into_iter()
            .map(|l| l.replace("10.244.1.0/24", "10.244.48.0/24"))
            .collect();
        let mut want_all = want.clone();
        want_all.insert(6, "-A POSTROUTING -s 192.0.2.0/24 -j ACCEPT".into());
        assert_eq!(got, want_all, "{variant:?}");
        assert!(e.check(&rs).unwrap());
    }
}

/// The IPv6 text of an IPv4 rule line of these tests (Go's v6 rules are the v4 ones
/// with the v6 network, subnet and `ff00::/8`).
fn to_v6(line: &str) -> String {
    line.replace("10.244.0.0/16", "2001:cafe:42::/56")
        .replace("10.244.48.0/24", "2001:cafe:42:30::/64")
        .replace("10.244.1.0/24", "2001:cafe:42:30::/64")
        .replace("224.0.0.0/4", "ff00::/8")
}

#[test]
fn ip6tables_takes_over_go_flanneld_v6_rules_in_the_v4_order() {
    if !require(&["ip", "iptables", "ip6tables"]) {
        return;
    }
    for (variant, infix) in variants() {
        let ns = Ns::new("ip6t-go");
        // Go flanneld's dual-stack leftovers: the v0.20.2 set in both families, plus a
        // foreign v6 rule.
        let go = crate::iptables::GO_FLANNELD_SAVE
            .replace("# Generated by iptables-save v1.8.9 (nf_tables)\n", "");
        ns.run(&[&format!("iptables{infix}-restore")], Some(&go));
        let go6 = to_v6(&go).replace(
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n",
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -A POSTROUTING -s 2001:db8::/64 -j ACCEPT\n",
        );
        ns.run(&[&format!("ip6tables{infix}-restore")], Some(&go6));
        let mut e = IptablesEngine::new(ns.ipt_opts(variant)).unwrap();
        let rs = RuleSet::new(true, true)
            .with_ipv4(
                "10.244.0.0/16".parse().unwrap(),
                "10.244.48.0/24".parse().unwrap(),
            )
            .with_ipv6(
                "2001:cafe:42::/56".parse().unwrap(),
                "2001:cafe:42:30::/64".parse().unwrap(),
            );
        assert!(!e.check(&rs).unwrap());
        e.apply(&rs).unwrap();
        e.apply(&rs).unwrap();
        let want4: Vec<String> = ipt_expected_v4(" --random-fully")
            .into_iter()
            .map(|l| l.replace("10.244.1.0/24", "10.244.48.0/24"))
            .collect();
        assert_eq!(
            save_rules(&ns, &format!("iptables{infix}-save")),
            want4,
            "{variant:?}"
        );
        // Same rules, same order as IPv4; the jump first, the foreign rule kept after.
        let mut want6: Vec<String> = want4.iter().map(|l| to_v6(l)).collect();
        want6.insert(6, "-A POSTROUTING -s 2001:db8::/64 -j ACCEPT".into());
        assert_eq!(
            save_rules(&ns, &format!("ip6tables{infix}-save")),
            want6,
            "{variant:?}"
        );
        assert!(e.check(&rs).unwrap());
    }
}

#[test]
fn iptables_check_detects_changes_and_resync_restores() {
    if !require(&["ip", "iptables"]) {
        return;
    }
    for (variant, infix) in variants() {
        let ns = Ns::new("ipt-check");
        let mut e = IptablesEngine::new(ns.ipt_opts(variant)).unwrap();
        let rs = rules_v4();
        e.apply(&rs).unwrap();
        assert!(tick(&mut e, &rs).is_none());
        // Another agent appends to POSTROUTING: ours are still in place, nothing re-applied.
        ns.sh(&format!(
            "iptables{infix} -t nat -A POSTROUTING -s 192.0.2.0/24 -j ACCEPT"
        ));
        assert!(e.check(&rs).unwrap());
        // Traffic-free counter changes are not changes (zeroing counters is a commit).
        ns.sh(&format!("iptables{infix} -t nat -Z"));
        assert!(e.check(&rs).unwrap());

        // Rule 3 is `-s C -d S -j RETURN`.
        let _ = ns.run(
            &[
                &format!("iptables{infix}"),
                "-t",
                "nat",
                "-D",
                "FLANNEL-POSTRTG",
                "3",
            ],
            None,
        );
        assert!(
            !e.check(&rs).unwrap(),
            "{variant:?}: a deleted rule must be noticed"
        );
        assert!(matches!(
            tick(&mut e, &rs),
            Some(ResyncEvent::Restored { .. })
        ));
        let got = save_rules(&ns, &format!("iptables{infix}-save"));
        assert_eq!(
            got.iter()
                .filter(|l| l.starts_with("-A FLANNEL-POSTRTG"))
                .count(),
            6,
            "{got:#?}"
        );
        assert!(got.contains(&"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN".to_string()));
        // Re-applied: the jump is first again, the foreign rule kept.
        let post: Vec<&String> = got
            .iter()
            .filter(|l| l.starts_with("-A POSTROUTING"))
            .collect();
        assert_eq!(post.len(), 2, "{got:#?}");
        assert!(post[0].ends_with("-j FLANNEL-POSTRTG"));
        assert!(e.check(&rs).unwrap());

        // The jump deleted.
        let _ = ns.run(&[&format!("iptables{infix}"), "-D", "FORWARD", "1"], None);
        assert!(!e.check(&rs).unwrap());
        assert!(matches!(
            tick(&mut e, &rs),
            Some(ResyncEvent::Restored { .. })
        ));
        assert!(e.check(&rs).unwrap());
    }
}

#[test]
fn iptables_cleanup_removes_ours_only() {
    if !require(&["ip", "iptables", "ip6tables"]) {
        return;
    }
    for (variant, infix) in variants() {
        let ns = Ns::new("ipt-clean");
        ns.sh(&format!("iptables{infix} -t nat -N FOREIGN"));
        ns.sh(&format!("iptables{infix} -t nat -A FOREIGN -j RETURN"));
        ns.sh(&format!("iptables{infix} -t nat -A POSTROUTING -j FOREIGN"));
        ns.sh(&format!(
            "iptables{infix} -A FORWARD -s 192.0.2.0/24 -j ACCEPT"
        ));
        let mut e = IptablesEngine::new(ns.ipt_opts(variant)).unwrap();
        e.apply(&rules_dual()).unwrap();
        e.cleanup().unwrap();
        let got = save_rules(&ns, &format!("iptables{infix}-save"));
        assert_eq!(
            got,
            [
                "*filter",
                "-A FORWARD -s 192.0.2.0/24 -j ACCEPT",
                "*nat",
                "-A POSTROUTING -j FOREIGN",
                "-A FOREIGN -j RETURN"
            ],
            "{variant:?}"
        );
        let all =
            ns.sh(&format!("iptables{infix}-save")) + &ns.sh(&format!("ip6tables{infix}-save"));
        assert!(!all.contains("FLANNEL"), "{all}");
        e.cleanup().unwrap();
    }
}

#[test]
fn iptables_masq_off_removes_the_masq_set() {
    if !require(&["ip", "iptables"]) {
        return;
    }
    let ns = Ns::new("ipt-nomasq");
    let mut e = IptablesEngine::new(ns.ipt_opts(IptablesVariant::Default)).unwrap();
    e.apply(&rules_v4()).unwrap();
    let old = RuleSet::new(false, true).with_ipv4(
        "10.244.0.0/16".parse().unwrap(),
        "10.244.1.0/24".parse().unwrap(),
    );
    e.apply(&old).unwrap();
    let s = ns.sh("iptables-save");
    assert!(
        !s.contains("FLANNEL-POSTRTG") && s.contains("FLANNEL-FWD"),
        "{s}"
    );
    assert!(e.check(&old).unwrap());
}

#[test]
fn legacy_fingerprint_sees_rule_changes_but_not_counters() {
    if !require(&["ip", "iptables-legacy", "ip6tables-legacy"]) {
        return;
    }
    let ns = Ns::new("xt");
    let x = crate::xtlegacy::XtLegacy::open(Some(&ns.name)).unwrap();
    let fp = |v6: bool| {
        let mut h = crate::nfnl::Fnv::new();
        x.fingerprint(v6, &["nat", "filter"], &mut h).unwrap();
        h.finish()
    };
    let empty = fp(false);
    // Counters set at insert, then zeroed: a change of counters only.
    ns.sh("iptables-legacy -A FORWARD -s 192.0.2.0/24 -j ACCEPT -c 5 100");
    let with_rule = fp(false);
    assert_ne!(empty, with_rule);
    ns.sh("iptables-legacy -Z");
    assert_eq!(
        fp(false),
        with_rule,
        "zeroed counters must not change the fingerprint"
    );
    ns.sh("iptables-legacy -t nat -A POSTROUTING -s 192.0.2.0/24 -j ACCEPT");
    assert_ne!(fp(false), with_rule);
    let v6 = fp(true);
    ns.sh("ip6tables-legacy -A FORWARD -s 2001:db8::/32 -j ACCEPT -c 3 300");
    let v6_rule = fp(true);
    assert_ne!(v6, v6_rule);
    ns.sh("ip6tables-legacy -Z");
    assert_eq!(fp(true), v6_rule);
}
