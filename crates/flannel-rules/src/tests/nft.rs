//! The nftables engine: tables, check/resync, recycling, cleanup.

use super::*;

// ---------------------------------------------------------------- nftables

pub(super) const NFT_V4: &str = "
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

pub(super) fn nft_table(ns: &Ns, fam: &str, table: &str) -> String {
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

/// Go flanneld's nftables tables for the same dual-stack set (its comment, its
/// exact-match mark rule and its rule 4 `saddr != S daddr C return`, SPEC §9).
const GO_NFT_DUAL: &str = "
table ip flannel-ipv4 {
	comment \"rules for ipv4\"
	chain forward {
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}
	chain postrtg {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x4000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}
}
table ip6 flannel-ipv6 {
	comment \"rules for ipv6\"
	chain forward {
		type filter hook forward priority filter; policy accept;
		ip6 saddr 2001:cafe:42::/56 accept
		ip6 daddr 2001:cafe:42::/56 accept
	}
	chain postrtg {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x4000 return
		ip6 saddr 2001:cafe:42:1::/64 ip6 daddr 2001:cafe:42::/56 return
		ip6 saddr 2001:cafe:42::/56 ip6 daddr 2001:cafe:42:1::/64 return
		ip6 saddr != 2001:cafe:42:1::/64 ip6 daddr 2001:cafe:42::/56 return
		ip6 saddr 2001:cafe:42::/56 ip6 daddr != ff00::/8 masquerade fully-random
		ip6 saddr != 2001:cafe:42::/56 ip6 daddr 2001:cafe:42::/56 masquerade fully-random
	}
}
";

#[test]
fn nft_takes_over_go_flanneld_tables_in_both_families() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Ns::new("nft-go");
    ns.run(&["nft", "-f", "-"], Some(GO_NFT_DUAL));
    let go6 = nft_table(&ns, "ip6", "flannel-ipv6");
    assert!(
        go6.contains("ip6 saddr != 2001:cafe:42:1::/64 ip6 daddr 2001:cafe:42::/56 return"),
        "{go6}"
    );
    let mut e = NftEngine::new(ns.opts()).unwrap();
    let rs = rules_dual();
    assert!(!e.check(&rs).unwrap(), "Go's rule set is not ours");
    e.apply(&rs).unwrap();
    e.apply(&rs).unwrap();
    let without_comment = |t: String| -> Vec<String> {
        lines(&t)
            .into_iter()
            .filter(|l| !l.starts_with("comment "))
            .collect()
    };
    // Our rules replace Go's in place, the v6 chain exactly like the v4 one.
    assert_eq!(
        without_comment(nft_table(&ns, "ip", "flannel-ipv4")),
        lines(NFT_V4)
    );
    assert_eq!(
        without_comment(nft_table(&ns, "ip6", "flannel-ipv6")),
        lines(NFT_V6)
    );
    assert!(e.check(&rs).unwrap());
}
