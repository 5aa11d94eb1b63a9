//! Between the engines: the other engine's artifacts, and the resync thread.

use super::*;

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
