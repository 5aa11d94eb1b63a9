//! Kernel-tier tests of the netlink wrapper, in throw-away namespaces (root needed;
//! skipped with a reason otherwise, failed under FLANNEL_E2E=1).

use std::net::IpAddr;
use std::time::Instant;

use flannel_core::MacAddr;
use flannel_net::netlink::{
    IpFamily, Netlink, Route, RouteFilter, VxlanSpec, WriteOp, NUD_PERMANENT, RTPROT_FLANNEL,
    RT_TABLE_MAIN,
};
use flannel_testkit::{privileged, veth_pair, TestNetns};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Two namespaces joined by a veth pair `ua` (198.18.0.1/24) ↔ `ub` (198.18.0.2/24).
async fn pair() -> (TestNetns, TestNetns, Netlink, u32) {
    let a = TestNetns::new("a").unwrap();
    let b = TestNetns::new("b").unwrap();
    veth_pair(&a, "ua", &b, "ub").unwrap();
    b.run(&["ip", "addr", "add", "198.18.0.2/24", "dev", "ub"])
        .unwrap();
    b.run(&["ip", "link", "set", "ub", "up"]).unwrap();
    let nl = a.netlink().await.unwrap();
    let ua = nl
        .link_by_name("ua")
        .await
        .unwrap()
        .expect("ua exists")
        .index;
    nl.addr_add(ua, ip("198.18.0.1"), 24).await.unwrap();
    nl.link_set_up(ua).await.unwrap();
    (a, b, nl, ua)
}

#[tokio::test]
async fn links_addresses_and_routes_are_idempotent() {
    if !privileged("links_addresses_and_routes_are_idempotent") {
        return;
    }
    let (a, _b, nl, ua) = pair().await;

    let l = nl.link_by_index(ua).await.unwrap().unwrap();
    assert_eq!(l.name, "ua");
    assert_eq!(l.kind.as_deref(), Some("veth"));
    assert!(l.up);
    assert!(nl.link_by_name("nosuchlink").await.unwrap().is_none());
    nl.link_set_mtu(ua, 1400).await.unwrap();
    assert_eq!(nl.link_by_index(ua).await.unwrap().unwrap().mtu, 1400);

    // Address add twice (exists = success), then visible, then delete twice.
    nl.addr_add(ua, ip("10.5.1.0"), 32).await.unwrap();
    nl.addr_add(ua, ip("10.5.1.0"), 32).await.unwrap();
    let addrs = nl.addresses(IpFamily::V4, Some(ua)).await.unwrap();
    assert!(addrs
        .iter()
        .any(|a| a.addr == ip("10.5.1.0") && a.prefix_len == 32 && a.scope == 0));
    assert!(a
        .run(&["ip", "-4", "addr", "show", "dev", "ua"])
        .unwrap()
        .contains("10.5.1.0/32"));
    nl.addr_del(ua, ip("10.5.1.0"), 32).await.unwrap();
    nl.addr_del(ua, ip("10.5.1.0"), 32).await.unwrap();
    assert!(!nl
        .addresses(IpFamily::V4, Some(ua))
        .await
        .unwrap()
        .iter()
        .any(|a| a.addr == ip("10.5.1.0")));

    // Route replace twice: one route, our protocol; then replace with a new
    // gateway keeps one route; delete twice.
    let r = Route::new("10.5.2.0/24".parse().unwrap())
        .via(ip("198.18.0.2"))
        .dev(ua);
    nl.route_replace(&r).await.unwrap();
    nl.route_replace(&r).await.unwrap();
    let mine = |nl: Netlink| async move {
        nl.routes(
            IpFamily::V4,
            &RouteFilter {
                protocol: Some(RTPROT_FLANNEL),
                table: Some(RT_TABLE_MAIN),
                oif: None,
            },
        )
        .await
        .unwrap()
    };
    let got = mine(nl.clone()).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].same_path(&r), "{got:?}");
    let shown = a.run(&["ip", "route", "show", "10.5.2.0/24"]).unwrap();
    assert!(shown.contains("via 198.18.0.2 dev ua proto 70"), "{shown}");
    let r2 = Route::new("10.5.2.0/24".parse().unwrap())
        .via(ip("10.5.2.0"))
        .dev(ua)
        .onlink();
    nl.route_replace(&r2).await.unwrap();
    let got = mine(nl.clone()).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].same_path(&r2) && got[0].onlink, "{got:?}");
    nl.route_del(&r2).await.unwrap();
    nl.route_del(&r2).await.unwrap();
    assert!(mine(nl.clone()).await.is_empty());

    // route get: a directly connected address has no gateway.
    let g = nl.route_get(ip("198.18.0.2")).await.unwrap();
    assert_eq!((g.gateway, g.oif), (None, Some(ua)));

    // A gateway that is not on a connected network is refused by the kernel.
    let bad = Route::new("10.5.3.0/24".parse().unwrap())
        .via(ip("203.0.113.9"))
        .dev(ua);
    let e = nl.route_replace(&bad).await.unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    assert!(e.to_string().contains("10.5.3.0/24"), "{e}");

    // Deleting a link that is gone is success.
    nl.link_del(99999).await.unwrap();
}

#[tokio::test]
async fn vxlan_device_neighbours_fdb_and_sysctl() {
    if !privileged("vxlan_device_neighbours_fdb_and_sysctl") {
        return;
    }
    let (a, _b, nl, ua) = pair().await;
    let mac = MacAddr([0x0a, 0x58, 1, 2, 3, 4]);
    let spec = VxlanSpec {
        name: "flannel.7".into(),
        vni: 7,
        link: ua,
        local: Some(ip("198.18.0.1")),
        port: Some(4789),
        learning: false,
        gbp: true,
        mtu: Some(1450),
        mac: Some(mac),
    };
    let l = nl.vxlan_create(&spec).await.unwrap();
    assert_eq!(l.kind.as_deref(), Some("vxlan"));
    assert_eq!((l.mtu, l.mac), (1450, Some(mac)));
    let v = l.vxlan.clone().unwrap();
    assert_eq!(
        (v.vni, v.link, v.port, v.learning, v.gbp, v.l2miss, v.l3miss),
        (7, Some(ua), 4789, false, true, false, false)
    );
    assert_eq!(v.local, Some("198.18.0.1".parse().unwrap()));
    assert!(v.group.is_none());
    let shown = a.run(&["ip", "-d", "link", "show", "flannel.7"]).unwrap();
    assert!(
        shown.contains("vxlan id 7 local 198.18.0.1 dev ua"),
        "{shown}"
    );
    assert!(
        shown.contains("dstport 4789 nolearning") && shown.contains("gbp"),
        "{shown}"
    );
    assert!(
        shown.contains("udpcsum"),
        "kernel default checksum expected: {shown}"
    );

    // A second create is refused: reuse is the caller's decision.
    let e = nl.vxlan_create(&spec).await.unwrap_err();
    assert_eq!(e.errno(), Some(libc_eexist()));

    // Default port when none is given.
    let mut spec8472 = spec.clone();
    spec8472.name = "flannel.8".into();
    spec8472.vni = 8;
    spec8472.port = None;
    let l8 = nl.vxlan_create(&spec8472).await.unwrap();
    assert_eq!(l8.vxlan.unwrap().port, 8472);

    // Neighbour: replace twice, then with a new MAC in place.
    let peer = MacAddr([0x0a, 0x58, 9, 9, 9, 9]);
    for _ in 0..2 {
        nl.neigh_replace(l.index, ip("10.5.2.0"), peer)
            .await
            .unwrap();
    }
    let n = nl.neighbours(IpFamily::V4, Some(l.index)).await.unwrap();
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(
        (n[0].dst, n[0].lladdr, n[0].state & NUD_PERMANENT != 0),
        (ip("10.5.2.0"), Some(peer), true)
    );
    let peer2 = MacAddr([0x0a, 0x58, 8, 8, 8, 8]);
    nl.neigh_replace(l.index, ip("10.5.2.0"), peer2)
        .await
        .unwrap();
    let n = nl.neighbours(IpFamily::V4, Some(l.index)).await.unwrap();
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].lladdr, Some(peer2));
    nl.neigh_del(l.index, ip("10.5.2.0")).await.unwrap();
    nl.neigh_del(l.index, ip("10.5.2.0")).await.unwrap();
    assert!(nl
        .neighbours(IpFamily::V4, Some(l.index))
        .await
        .unwrap()
        .is_empty());

    // FDB: replace twice, new dst in place, visible to `bridge fdb`, delete twice.
    for _ in 0..2 {
        nl.fdb_replace(l.index, peer, ip("198.18.0.2"))
            .await
            .unwrap();
    }
    let f = nl.fdb_entries(l.index).await.unwrap();
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].is_self() && f[0].is_permanent() && f[0].dst == Some(ip("198.18.0.2")));
    nl.fdb_replace(l.index, peer, ip("198.18.0.3"))
        .await
        .unwrap();
    let f = nl.fdb_entries(l.index).await.unwrap();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].dst, Some(ip("198.18.0.3")));
    let shown = a
        .run(&["bridge", "fdb", "show", "dev", "flannel.7"])
        .unwrap();
    assert!(
        shown.contains("0a:58:09:09:09:09 dst 198.18.0.3 self permanent"),
        "{shown}"
    );
    nl.fdb_del(l.index, peer, Some(ip("198.18.0.3")))
        .await
        .unwrap();
    nl.fdb_del(l.index, peer, Some(ip("198.18.0.3")))
        .await
        .unwrap();
    assert!(nl.fdb_entries(l.index).await.unwrap().is_empty());

    // sysctl goes to the connection's namespace: the device exists only there.
    flannel_net::sysctl::write(nl.netns(), "net/ipv6/conf/flannel.7/accept_ra", "0")
        .await
        .unwrap();
    assert_eq!(
        flannel_net::sysctl::read(nl.netns(), "net/ipv6/conf/flannel.7/accept_ra")
            .await
            .unwrap(),
        "0"
    );
    assert_eq!(
        a.run(&["cat", "/proc/sys/net/ipv6/conf/flannel.7/accept_ra"])
            .unwrap()
            .trim(),
        "0"
    );
    assert!(!std::path::Path::new("/proc/sys/net/ipv6/conf/flannel.7").exists());

    nl.link_del(l.index).await.unwrap();
    nl.link_del(l.index).await.unwrap();
    assert!(nl.link_by_name("flannel.7").await.unwrap().is_none());
}

fn libc_eexist() -> i32 {
    17
}

/// Many requests in flight on one socket: 5000 onlink routes, then all deleted.
/// Prints the time taken (a figure, not an assertion).
#[tokio::test]
async fn five_thousand_routes_pipelined() {
    if !privileged("five_thousand_routes_pipelined") {
        return;
    }
    let (_a, _b, nl, ua) = pair().await;
    let routes: Vec<Route> = (0..5000u32)
        .map(|i| {
            let net = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
            let gw = format!("10.{}.{}.0", 100 + i / 256, i % 256);
            Route::new(net.parse().unwrap())
                .via(ip(&gw))
                .dev(ua)
                .onlink()
        })
        .collect();
    let t = Instant::now();
    let futs: Vec<_> = routes
        .iter()
        .cloned()
        .map(|r| {
            let nl = nl.clone();
            async move { nl.route_replace(&r).await }
        })
        .collect();
    let res = nl.run_batch(futs).await;
    let took = t.elapsed();
    assert!(
        res.iter().all(|r| r.is_ok()),
        "{:?}",
        res.iter().find(|r| r.is_err())
    );
    let mine = nl
        .routes(
            IpFamily::V4,
            &RouteFilter {
                protocol: Some(RTPROT_FLANNEL),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(mine.len(), 5000);
    eprintln!(
        "5000 route replaces pipelined (window {}): {took:?}",
        nl.window()
    );
    let futs: Vec<_> = routes
        .into_iter()
        .map(|r| {
            let nl = nl.clone();
            async move { nl.route_del(&r).await }
        })
        .collect();
    assert!(nl.run_batch(futs).await.iter().all(|r| r.is_ok()));
    let left = nl
        .routes(
            IpFamily::V4,
            &RouteFilter {
                protocol: Some(RTPROT_FLANNEL),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(left.is_empty());
}

/// The kernel refuses a second dump on a socket while one runs (EBUSY); dumps of
/// one connection must take turns even when callers run them concurrently. (The
/// multi-thread runtime is where the race shows: there the socket's readiness can
/// lag, so the connection may send the next request before draining a dump.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dumps_on_one_connection() {
    if !privileged("concurrent_dumps_on_one_connection") {
        return;
    }
    let (_a, _b, nl, ua) = pair().await;
    // Enough entries that each dump spans many reads.
    let futs: Vec<_> = (0..3000u32)
        .map(|i| {
            let nl = nl.clone();
            async move {
                let sub = format!("10.{}.{}.0", 100 + i / 256, i % 256);
                let mac = MacAddr([2, 0, 0, 0, (i >> 8) as u8, i as u8]);
                nl.neigh_replace(ua, ip(&sub), mac).await?;
                nl.route_replace(
                    &Route::new(format!("{sub}/24").parse().unwrap())
                        .via(ip(&sub))
                        .dev(ua)
                        .onlink(),
                )
                .await
            }
        })
        .collect();
    assert!(nl.run_batch(futs).await.iter().all(|r| r.is_ok()));
    for _ in 0..20 {
        let f = RouteFilter::default();
        let (r, n, l, a) = futures::join!(
            nl.routes(IpFamily::V4, &f),
            nl.neighbours(IpFamily::V4, Some(ua)),
            nl.links(),
            nl.addresses(IpFamily::V4, None)
        );
        assert!(r.unwrap().len() >= 3000);
        assert_eq!(n.unwrap().len(), 3000);
        assert!(l.unwrap().len() >= 2);
        assert!(!a.unwrap().is_empty());
    }
}

/// Writes packed many to a datagram: every op gets its own result in order, a
/// refused one in the middle does not stop the rest, deleting what is gone is
/// success, and the entries really are in the kernel (of the connection's
/// namespace, not the test's).
#[tokio::test]
async fn write_batch_reports_each_op() {
    if !privileged("write_batch_reports_each_op") {
        return;
    }
    let (a, _b, nl, ua) = pair().await;
    let route = |i: u32| {
        Route::new(
            format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
                .parse()
                .unwrap(),
        )
        .via(ip(&format!("10.{}.{}.0", 100 + i / 256, i % 256)))
        .dev(ua)
        .onlink()
    };
    let mut ops: Vec<WriteOp> = (0..1000).map(|i| WriteOp::RouteReplace(route(i))).collect();
    // No such device: refused, and only this one.
    ops.insert(500, WriteOp::RouteReplace(route(5000).dev(999_999)));
    ops.push(WriteOp::NeighReplace {
        index: ua,
        ip: ip("10.100.0.0"),
        mac: MacAddr([2, 0, 0, 0, 0, 9]),
    });
    let res = nl.write_batch(ops.clone()).await;
    assert_eq!(res.len(), ops.len());
    for (i, r) in res.iter().enumerate() {
        if i == 500 {
            let e = r
                .as_ref()
                .expect_err("a route on a missing device is refused");
            assert_eq!(e.errno(), Some(libc_enodev()), "{e}");
            assert!(e.to_string().contains("replace route"), "{e}");
        } else {
            assert!(r.is_ok(), "op {i}: {r:?}");
        }
    }
    let mine = nl
        .routes(
            IpFamily::V4,
            &RouteFilter {
                protocol: Some(RTPROT_FLANNEL),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(mine.len(), 1000);
    let neigh = a.run(&["ip", "neigh", "show", "dev", "ua"]).unwrap();
    assert!(
        neigh.contains("10.100.0.0 lladdr 02:00:00:00:00:09 PERMANENT"),
        "{neigh}"
    );

    // Deleting twice: the second time everything is gone already, still success.
    let dels: Vec<WriteOp> = (0..1000)
        .map(|i| WriteOp::RouteDel(route(i)))
        .chain([WriteOp::NeighDel {
            index: ua,
            ip: ip("10.100.0.0"),
        }])
        .collect();
    for round in 0..2 {
        let res = nl.write_batch(dels.clone()).await;
        assert!(
            res.iter().all(|r| r.is_ok()),
            "round {round}: {:?}",
            res.iter().find(|r| r.is_err())
        );
    }
    let left = nl
        .routes(
            IpFamily::V4,
            &RouteFilter {
                protocol: Some(RTPROT_FLANNEL),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(left.is_empty());
}

fn libc_enodev() -> i32 {
    19
}
