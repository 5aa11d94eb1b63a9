//! Kernel tests for both rule engines. Every rule goes into a network namespace the test
//! creates (named `fl-<pid>-<n>-<tag>`, removed on drop, also on panic); nothing touches
//! the root namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::resync::tick;
use super::*;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether the test can run; with `FLANNEL_E2E=1` a missing prerequisite fails it.
fn require(tools: &[&str]) -> bool {
    let mut missing: Vec<String> = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".into());
    }
    for t in tools {
        if !tool_exists(t) {
            missing.push((*t).to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("FLANNEL_E2E").as_deref() == Ok("1") {
        panic!("FLANNEL_E2E=1 but prerequisites are missing: {missing:?}");
    }
    eprintln!("skipping: missing {missing:?}");
    false
}

fn tool_exists(name: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| std::path::Path::new(d).join(name).is_file());
    found
}

/// A throw-away network namespace.
struct Ns {
    name: String,
}

impl Ns {
    fn new(tag: &str) -> Ns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("fl-{}-{}-{}", std::process::id(), n, tag);
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        let ns = Ns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Run a command line (split on whitespace; no quoting) inside the namespace.
    fn sh(&self, line: &str) -> String {
        let args: Vec<&str> = line.split_whitespace().collect();
        self.run(&args, None)
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
        Runner::new(Some(self.name.clone()))
            .run(args[0], &args[1..], stdin)
            .unwrap_or_else(|e| panic!("in {}: {e}", self.name))
    }

    fn opts(&self) -> EngineOptions {
        EngineOptions {
            netns: Some(self.name.clone()),
            ..EngineOptions::default()
        }
    }

    fn ipt_opts(&self, variant: IptablesVariant) -> EngineOptions {
        EngineOptions {
            iptables_variant: variant,
            ..self.opts()
        }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

use super::cmd::Runner;

fn rules_v4() -> RuleSet {
    RuleSet::new(true, true).with_ipv4(
        "10.244.0.0/16".parse().unwrap(),
        "10.244.1.0/24".parse().unwrap(),
    )
}

fn rules_dual() -> RuleSet {
    rules_v4().with_ipv6(
        "2001:cafe:42::/56".parse().unwrap(),
        "2001:cafe:42:1::/64".parse().unwrap(),
    )
}

/// Non-empty, trimmed lines.
fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------- nftables

const NFT_V4: &str = "
table ip flannel-ipv4 {
	chain forward {
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}
	chain postrtg {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}
}";

const NFT_V6: &str = "
table ip6 flannel-ipv6 {
	chain forward {
		type filter hook forward priority filter; policy accept;
		ip6 saddr 2001:cafe:42::/56 accept
		ip6 daddr 2001:cafe:42::/56 accept
	}
	chain postrtg {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return
		ip6 saddr 2001:cafe:42:1::/64 ip6 daddr 2001:cafe:42::/56 return
		ip6 saddr 2001:cafe:42::/56 ip6 daddr 2001:cafe:42:1::/64 return
		ip6 saddr != 2001:cafe:42::/56 ip6 daddr 2001:cafe:42:1::/64 return
		ip6 saddr 2001:cafe:42::/56 ip6 daddr != ff00::/8 masquerade fully-random
		ip6 saddr != 2001:cafe:42::/56 ip6 daddr 2001:cafe:42::/56 masquerade fully-random
	}
}";

fn nft_table(ns: &Ns, fam: &str, table: &str) -> String {
    ns.sh(&format!("nft list table {fam} {table}"))
}

/// Handles of the rules in one of our chains, from `nft -j`.
fn nft_rule_handles(ns: &Ns, fam: &str, table: &str, chain: &str) -> Vec<u64> {
    let out = ns.sh(&format!("nft -j list chain {fam} {table} {chain}"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft json");
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter_map(|r| r["handle"].as_u64())
        .collect()
}

#[test]
fn nft_apply_writes_the_expected_tables_and_is_idempotent() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Ns::new("nft-apply");
    let mut e = NftEngine::new(ns.opts()).unwrap();
    let rs = rules_dual();
    for _ in 0..3 {
        e.apply(&rs).unwrap();
        assert_eq!(lines(&nft_table(&ns, "ip", "flannel-ipv4")), lines(NFT_V4));
        assert_eq!(lines(&nft_table(&ns, "ip6", "flannel-ipv6")), lines(NFT_V6));
    }
    assert!(e.check(&rs).unwrap());
    assert!(e.cheap_check());
    // The whole ruleset holds our two tables and nothing else.
    let all = ns.sh("nft -j list ruleset");
    let v: serde_json::Value = serde_json::from_str(&all).unwrap();
    let tables: Vec<String> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("table"))
        .map(|t| {
            format!(
                "{} {}",
                t["family"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(tables, ["ip flannel-ipv4", "ip6 flannel-ipv6"]);
    // A different set is not "in place" until applied.
    assert!(!e.check(&rules_v4()).unwrap());
}

#[test]
fn nft_check_detects_a_deleted_rule_and_resync_restores_it() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Ns::new("nft-check");
    let mut e = NftEngine::new(ns.opts()).unwrap();
    let rs = rules_v4();
    e.apply(&rs).unwrap();
    assert!(
        tick(&mut e, &rs).is_none(),
        "nothing to do right after apply"
    );

    // Unrelated commits move the generation but not our fingerprint: still in place.
    ns.sh("nft add table inet foreign");
    ns.sh("nft add chain inet foreign c");
    assert!(e.check(&rs).unwrap());

    let handles = nft_rule_handles(&ns, "ip", "flannel-ipv4", "postrtg");
    assert_eq!(handles.len(), 6);
    ns.sh(&format!(
        "nft delete rule ip flannel-ipv4 postrtg handle {}",
        handles[3]
    ));
    assert!(!e.check(&rs).unwrap(), "a deleted rule must be noticed");
    match tick(&mut e, &rs) {
        Some(ResyncEvent::Restored { .. }) => {}
        other => panic!("expected a restore, got {other:?}"),
    }
    assert_eq!(lines(&nft_table(&ns, "ip", "flannel-ipv4")), lines(NFT_V4));
    assert!(e.check(&rs).unwrap());

    // A rule someone adds to our chain is noticed too, and goes away on re-apply.
    ns.sh("nft add rule ip flannel-ipv4 forward ip saddr 192.0.2.0/24 accept");
    assert!(!e.check(&rs).unwrap());
    assert!(matches!(
        tick(&mut e, &rs),
        Some(ResyncEvent::Restored { .. })
    ));
    assert_eq!(lines(&nft_table(&ns, "ip", "flannel-ipv4")), lines(NFT_V4));

    // The whole table deleted.
    ns.sh("nft delete table ip flannel-ipv4");
    assert!(!e.check(&rs).unwrap());
    assert!(matches!(
        tick(&mut e, &rs),
        Some(ResyncEvent::Restored { .. })
    ));
    assert_eq!(lines(&nft_table(&ns, "ip", "flannel-ipv4")), lines(NFT_V4));
    // The foreign table was never touched.
    assert!(ns.sh("nft list tables").contains("table inet foreign"));
}

#[test]
fn nft_network_change_and_disabled_sets_replace_the_old_rules() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Ns::new("nft-recycle");
    let mut e = NftEngine::new(ns.opts()).unwrap();
    let old = RuleSet::new(true, true).with_ipv4(
        "10.5.0.0/16".parse().unwrap(),
        "10.5.7.0/24".parse().unwrap(),
    );
    e.apply(&old).unwrap();
    assert!(nft_table(&ns, "ip", "flannel-ipv4").contains("10.5.7.0/24"));
    e.apply(&rules_v4()).unwrap();
    let now = nft_table(&ns, "ip", "flannel-ipv4");
    assert!(
        !now.contains("10.5."),
        "old network rules must be gone:\n{now}"
    );
    assert_eq!(lines(&now), lines(NFT_V4));

    // --ip-masq off: the postrtg chain goes, forward stays.
    let no_masq = RuleSet {
        ip_masq: false,
        ..rules_v4()
    };
    e.apply(&no_masq).unwrap();
    let now = nft_table(&ns, "ip", "flannel-ipv4");
    assert!(
        !now.contains("postrtg") && now.contains("chain forward"),
        "{now}"
    );
    assert!(e.check(&no_masq).unwrap());
    // Everything off: the table goes.
    let nothing = RuleSet {
        forward: false,
        ..no_masq
    };
    e.apply(&nothing).unwrap();
    assert!(!ns.sh("nft list tables").contains("flannel-ipv4"));
    assert!(e.check(&nothing).unwrap());
}

#[test]
fn nft_cleanup_removes_our_tables_only() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Ns::new("nft-clean");
    ns.sh("nft add table ip foreign");
    ns.sh("nft add chain ip foreign post { type nat hook postrouting priority 50 ; }");
    ns.sh("nft add rule ip foreign post ip saddr 192.0.2.0/24 masquerade");
    let mut e = NftEngine::new(ns.opts()).unwrap();
    e.apply(&rules_dual()).unwrap();
    e.cleanup().unwrap();
    let tables = ns.sh("nft list tables");
    assert_eq!(lines(&tables), ["table ip foreign"]);
    assert!(ns
        .sh("nft list table ip foreign")
        .contains("ip saddr 192.0.2.0/24 masquerade"));
    // Cleaning up with nothing there is fine.
    e.cleanup().unwrap();
}

// ---------------------------------------------------------------- iptables

fn ipt_expected_v4(rf: &str) -> Vec<String> {
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
fn save_rules(ns: &Ns, bin: &str) -> Vec<String> {
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

fn variants() -> Vec<(IptablesVariant, &'static str)> {
    let mut v = Vec::new();
    if tool_exists("iptables-nft") {
        v.push((IptablesVariant::Nft, "-nft"));
    }
    if tool_exists("iptables-legacy") {
        v.push((IptablesVariant::Legacy, "-legacy"));
    }
    if v.is_empty() && std::env::var("FLANNEL_E2E").as_deref() == Ok("1") {
        panic!("FLANNEL_E2E=1 but neither iptables-nft nor iptables-legacy is installed");
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
        let mut input = super::iptables::GO_FLANNELD_SAVE.to_string().replace(
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
    let x = super::xtlegacy::XtLegacy::open(Some(&ns.name)).unwrap();
    let fp = |v6: bool| {
        let mut h = super::nfnl::Fnv::new();
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

// ------------------------------------------------------- other engine's artifacts

#[test]
fn startup_removes_the_other_engines_artifacts() {
    if !require(&["ip", "nft", "iptables", "ip6tables"]) {
        return;
    }
    let ns = Ns::new("other");
    // Both engines' rules present (e.g. a switch of EnableNFTables).
    IptablesEngine::new(ns.opts())
        .unwrap()
        .apply(&rules_dual())
        .unwrap();
    NftEngine::new(ns.opts())
        .unwrap()
        .apply(&rules_dual())
        .unwrap();
    ns.sh("iptables -t nat -A POSTROUTING -s 192.0.2.0/24 -j ACCEPT");

    remove_other_engine_artifacts(EngineKind::Nftables, &ns.opts()).unwrap();
    let ipt = ns.sh("iptables-save") + &ns.sh("ip6tables-save");
    assert!(!ipt.contains("FLANNEL"), "{ipt}");
    assert!(
        ipt.contains("-A POSTROUTING -s 192.0.2.0/24 -j ACCEPT"),
        "{ipt}"
    );
    assert!(ns.sh("nft list tables").contains("flannel-ipv4"));

    remove_other_engine_artifacts(EngineKind::Iptables, &ns.opts()).unwrap();
    let tables = ns.sh("nft list tables");
    assert!(!tables.contains("flannel-ipv"), "{tables}");
}

// ------------------------------------------------------- resync thread

#[test]
fn resync_thread_restores_deleted_rules() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Ns::new("resync");
    let mut e = NftEngine::new(ns.opts()).unwrap();
    let rs = rules_v4();
    e.apply(&rs).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let h = spawn_resync(Box::new(e), rs, Duration::from_millis(100), move |ev| {
        seen2.lock().unwrap().push(format!("{ev:?}"));
    })
    .unwrap();
    ns.sh("nft flush chain ip flannel-ipv4 postrtg");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines(&nft_table(&ns, "ip", "flannel-ipv4")) != lines(NFT_V4) {
        assert!(Instant::now() < deadline, "rules not restored");
        std::thread::sleep(Duration::from_millis(50));
    }
    let engine = h.stop().expect("engine back");
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|s| s.starts_with("Restored")), "{seen:?}");
    drop(engine);
}

// ------------------------------------------------------- masquerade behaviour

/// Run `f` on a fresh thread inside the namespace.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    flannel_net::netns::run_in_netns(&flannel_net::netns::netns_path(ns), f)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Listen in `server` on `port`, connect from `client` to `dst`, return the source address
/// the server saw.
fn observed_source(server: &Ns, client: &Ns, dst: Ipv4Addr, port: u16) -> Ipv4Addr {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = flannel_net::netns::spawn_in_netns(
        &flannel_net::netns::netns_path(&server.name),
        move || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match l.accept() {
                    Ok((_, peer)) => return peer,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "no connection arrived");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        },
    )
    .expect("start the server thread");
    rx.recv_timeout(Duration::from_secs(60))
        .expect("server ready");
    in_netns(&client.name, move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(5))
            {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect to {dst}:{port}: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    match srv
        .join()
        .expect("server thread")
        .expect("server enters its namespace")
    {
        SocketAddr::V4(a) => *a.ip(),
        other => panic!("unexpected peer {other}"),
    }
}

/// pod1 (10.244.1.2) and pod2 (10.244.2.2) behind a router `host` that owns
/// 10.244.1.0/24 and routes 10.244.2.0/24 (standing in for a peer's subnet), and an
/// `out` namespace on 198.18.1.0/24 that can route back to the pods (so an unmasqueraded
/// packet would arrive with its pod address and the test could tell).
struct Lab {
    pod1: Ns,
    pod2: Ns,
    host: Ns,
    out: Ns,
}

impl Lab {
    fn new() -> Lab {
        let lab = Lab {
            pod1: Ns::new("pod1"),
            pod2: Ns::new("pod2"),
            host: Ns::new("host"),
            out: Ns::new("out"),
        };
        let h = &lab.host.name;
        for (pod, hn, pn, hostip, podip) in [
            (&lab.pod1, "h1", "p1", "10.244.1.1/24", "10.244.1.2/24"),
            (&lab.pod2, "h2", "p2", "10.244.2.1/24", "10.244.2.2/24"),
            (&lab.out, "ho", "o0", "198.18.1.1/24", "198.18.1.2/24"),
        ] {
            lab.host.sh(&format!(
                "ip link add {hn} type veth peer name {pn} netns {}",
                pod.name
            ));
            lab.host.sh(&format!("ip addr add {hostip} dev {hn}"));
            lab.host.sh(&format!("ip link set {hn} up"));
            pod.sh(&format!("ip addr add {podip} dev {pn}"));
            pod.sh(&format!("ip link set {pn} up"));
        }
        lab.pod1.sh("ip route add default via 10.244.1.1");
        lab.pod2.sh("ip route add default via 10.244.2.1");
        lab.out.sh("ip route add 10.244.0.0/16 via 198.18.1.1");
        lab.host.sh("sysctl -qw net.ipv4.ip_forward=1");
        let _ = h;
        lab
    }

    fn check_sources(&self, what: &str) {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // pod → outside: masqueraded to the host's address on the outside link.
        assert_eq!(
            observed_source(&self.out, &self.pod1, a("198.18.1.2"), 8081),
            a("198.18.1.1"),
            "{what}: pod→out"
        );
        // pod → pod (other subnet of the cluster): keeps the pod address.
        assert_eq!(
            observed_source(&self.pod2, &self.pod1, a("10.244.2.2"), 8082),
            a("10.244.1.2"),
            "{what}: pod→pod"
        );
        // outside → own pod: not masqueraded.
        assert_eq!(
            observed_source(&self.pod1, &self.out, a("10.244.1.2"), 8083),
            a("198.18.1.2"),
            "{what}: out→own pod"
        );
        // outside → a pod of another subnet: masqueraded (iptables rule 6; unreachable in
        // upstream's nft rules; docs/compatibility.md, "nftables masquerade uses the
        // iptables rule set").
        assert_eq!(
            observed_source(&self.pod2, &self.out, a("10.244.2.2"), 8084),
            a("10.244.2.1"),
            "{what}: out→other pod"
        );
    }
}

#[test]
fn masquerade_behaviour_nftables() {
    if !require(&["ip", "nft", "sysctl"]) {
        return;
    }
    let lab = Lab::new();
    let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    // Without rules nothing is masqueraded: the test can tell the difference.
    assert_eq!(
        observed_source(&lab.out, &lab.pod1, a("198.18.1.2"), 8080),
        a("10.244.1.2")
    );
    let mut e = NftEngine::new(lab.host.opts()).unwrap();
    e.apply(&rules_v4()).unwrap();
    lab.check_sources("nftables");
}

#[test]
fn masquerade_behaviour_iptables() {
    if !require(&["ip", "iptables", "sysctl"]) {
        return;
    }
    let lab = Lab::new();
    let mut e = IptablesEngine::new(lab.host.opts()).unwrap();
    e.apply(&rules_v4()).unwrap();
    lab.check_sources("iptables");
}

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
) -> (Box<dyn RuleEngine>, super::cmd::counts::Counts) {
    super::cmd::counts::take(&ns.name);
    let e = startup(kind, opts, rs);
    (e, super::cmd::counts::take(&ns.name))
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
    let mut nl = super::nfnl::NfNetlink::open(Some(&ns.name)).unwrap();
    let got = nl
        .table_rules(super::nfnl::NFPROTO_IPV4, "nat", |chain, attrs| {
            (chain == b"POSTROUTING")
                .then(|| super::nfnl::is_plain_jump(attrs, "flanneld masq", "FLANNEL-POSTRTG"))
        })
        .unwrap();
    assert_eq!(
        got,
        [true, false, false, false, false, false, false, false, false]
    );
    // A missing table has no rules; existence checks answer without an error.
    assert!(nl
        .table_rules(super::nfnl::NFPROTO_IPV6, "nat", |_, _| Some(()))
        .unwrap()
        .is_empty());
    assert!(nl
        .chain_exists(super::nfnl::NFPROTO_IPV4, "nat", "FLANNEL-POSTRTG")
        .unwrap());
    assert!(!nl
        .chain_exists(super::nfnl::NFPROTO_IPV4, "nat", "FLANNEL-FWD")
        .unwrap());
    assert!(!nl
        .chain_exists(super::nfnl::NFPROTO_IPV4, "filter", "FLANNEL-FWD")
        .unwrap());
    assert!(!nl
        .table_exists(super::nfnl::NFPROTO_IPV4, "flannel-ipv4")
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
    super::cmd::counts::take(&ns.name);
    assert!(
        e.check(&rs).unwrap(),
        "baseline taken without iptables-save"
    );
    assert!(
        super::cmd::counts::take(&ns.name).spawned.is_empty(),
        "check forks nothing"
    );
    drop(e);

    // A restart (our rules in place): iptables-save shows them exactly as wanted, so
    // nothing is rewritten (no commit at all).
    let gen = |ns: &Ns| {
        super::nfnl::NfNetlink::open(Some(&ns.name))
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
    super::cmd::counts::take(&ns.name);
    assert!(e.check(&rs).unwrap());
    assert!(super::cmd::counts::take(&ns.name).spawned.is_empty());
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
