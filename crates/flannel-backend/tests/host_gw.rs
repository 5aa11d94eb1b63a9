//! host-gw backend in two namespaces: routes via the peers' addresses, the periodic
//! re-check, refusal of peers that are not directly reachable.

mod common;

use common::*;
use flannel_backend::host_gw::HostGwBackend;
use flannel_backend::Backend;
use flannel_core::{LeaseAttrs, LeaseEvent};
use flannel_testkit::privileged;
use serde_json::value::RawValue;

const CFG: &str = r#"{"Type":"host-gw"}"#;

async fn backend(h: &Host) -> (HostGwBackend, LeaseAttrs) {
    let raw = RawValue::from_string(CFG.to_string()).unwrap();
    let mut be = HostGwBackend::new(&raw, h.ext.clone(), h.nl.clone()).unwrap();
    let attrs = be.register(&config(CFG)).await.unwrap();
    (be, attrs)
}

#[tokio::test]
async fn host_gw_pods_talk_with_one_route_per_peer() {
    if !privileged("host_gw_pods_talk_with_one_route_per_peer") {
        return;
    }
    let (a, b) = two_hosts(1, 2).await;
    let (mut ba, attrs_a) = backend(&a).await;
    let (mut bb, attrs_b) = backend(&b).await;
    assert_eq!(
        attrs_a.encode(),
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
    );
    assert_eq!(ba.mtu(), 1500);
    let (la, lb) = (a.lease(&attrs_a), b.lease(&attrs_b));
    ba.start(&config(CFG), &la).await.unwrap();
    bb.start(&config(CFG), &lb).await.unwrap();
    ba.reconcile(std::slice::from_ref(&lb)).await.unwrap();
    bb.reconcile(std::slice::from_ref(&la)).await.unwrap();
    assert!(pod_ping(&a.pod, &b.pod_ip));
    assert!(pod_ping(&b.pod, &a.pod_ip));

    // Appendix A.2: one route, no device, neighbour or FDB entry.
    let routes = a.sh(&["ip", "-d", "route", "show", "table", "all"]);
    let ours: Vec<&str> = routes.lines().filter(|l| l.contains("10.244.2.")).collect();
    assert_eq!(
        ours,
        vec!["unicast 10.244.2.0/24 via 198.18.0.2 dev ua table main proto 70 scope global "],
        "{routes}"
    );
    let links = a.sh(&["ip", "-o", "link"]);
    assert!(!links.contains("flannel"), "{links}");

    ba.apply(&[LeaseEvent::Removed(lb.clone())]).await.unwrap();
    assert!(!a.sh(&["ip", "route"]).contains("10.244.2.0/24"));
}

#[tokio::test]
async fn unreachable_peers_are_refused_others_kept() {
    if !privileged("unreachable_peers_are_refused_others_kept") {
        return;
    }
    let (a, b) = two_hosts(1, 2).await;
    let (mut ba, attrs_a) = backend(&a).await;
    let (_, attrs_b) = backend(&b).await;
    ba.start(&config(CFG), &a.lease(&attrs_a)).await.unwrap();
    let lb = b.lease(&attrs_b);
    a.sh(&[
        "ip",
        "route",
        "add",
        "203.0.113.0/24",
        "via",
        "198.18.0.2",
        "dev",
        "ua",
    ]);
    let mut far = lb.clone();
    far.key = "10.244.3.0-24".parse().unwrap();
    std::sync::Arc::make_mut(&mut far.attrs).public_ip = "203.0.113.5".parse().unwrap();
    let mut foreign = lb.clone();
    foreign.key = "10.244.4.0-24".parse().unwrap();
    std::sync::Arc::make_mut(&mut foreign.attrs).backend_type = "vxlan".into();
    ba.reconcile(&[lb.clone(), far.clone(), foreign])
        .await
        .unwrap();
    let routes = a.sh(&["ip", "route"]);
    assert!(
        routes.contains("10.244.2.0/24 via 198.18.0.2 dev ua proto 70"),
        "{routes}"
    );
    assert!(!routes.contains("10.244.3.0"), "{routes}");
    assert!(!routes.contains("10.244.4.0"), "{routes}");
    // The same through an event.
    let mut far2 = far.clone();
    far2.key = "10.244.5.0-24".parse().unwrap();
    ba.apply(&[LeaseEvent::Added(far2)]).await.unwrap();
    assert!(!a.sh(&["ip", "route"]).contains("10.244.5.0"));

    // The far network becomes directly connected: the next periodic check
    // routes to the peers it refused before.
    a.sh(&["ip", "route", "del", "203.0.113.0/24"]);
    a.sh(&["ip", "addr", "add", "203.0.113.1/24", "dev", "ua"]);
    ba.resync().await.unwrap();
    let routes = a.sh(&["ip", "route"]);
    assert!(
        routes.contains("10.244.3.0/24 via 203.0.113.5 dev ua proto 70"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.5.0/24 via 203.0.113.5 dev ua proto 70"),
        "{routes}"
    );
}

#[tokio::test]
async fn resync_repairs_and_reconcile_cleans_up() {
    if !privileged("resync_repairs_and_reconcile_cleans_up") {
        return;
    }
    let (a, b) = two_hosts(1, 2).await;
    let (mut ba, attrs_a) = backend(&a).await;
    let (_, attrs_b) = backend(&b).await;
    ba.start(&config(CFG), &a.lease(&attrs_a)).await.unwrap();
    let lb = b.lease(&attrs_b);
    // Left over by Go flanneld: a peer that is gone (proto boot, on the
    // interface); an admin's route must stay.
    a.sh(&[
        "ip",
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "198.18.0.9",
        "dev",
        "ua",
    ]);
    a.sh(&[
        "ip",
        "route",
        "add",
        "10.244.50.0/24",
        "via",
        "198.18.0.9",
        "dev",
        "ua",
        "proto",
        "static",
    ]);
    // b's route as Go made it: adopted without a delete.
    a.sh(&[
        "ip",
        "route",
        "add",
        "10.244.2.0/24",
        "via",
        "198.18.0.2",
        "dev",
        "ua",
    ]);
    let mut mon = monitor(&a.ns);
    ba.reconcile(std::slice::from_ref(&lb)).await.unwrap();
    let events = mon.barrier();
    let routes = a.sh(&["ip", "route"]);
    assert!(
        routes.contains("10.244.2.0/24 via 198.18.0.2 dev ua proto 70"),
        "{routes}"
    );
    assert!(!routes.contains("10.244.9.0"), "{routes}");
    assert!(
        routes.contains("10.244.50.0/24 via 198.18.0.9 dev ua proto static"),
        "{routes}"
    );
    assert!(
        !events
            .iter()
            .any(|l| l.starts_with("Deleted") && l.contains("10.244.2.0")),
        "{events:#?}"
    );

    // Nothing to do: no writes.
    let w = ba.peer_writes();
    ba.reconcile(std::slice::from_ref(&lb)).await.unwrap();
    ba.resync().await.unwrap();
    assert_eq!(ba.peer_writes(), w);
    assert!(mon.barrier().is_empty());

    // Someone deletes the route: the periodic check puts it back.
    a.sh(&["ip", "route", "del", "10.244.2.0/24"]);
    ba.resync().await.unwrap();
    assert!(a
        .sh(&["ip", "route"])
        .contains("10.244.2.0/24 via 198.18.0.2 dev ua proto 70"));
    // A wrong gateway is fixed too (upstream leaves it; we reconcile).
    a.sh(&[
        "ip",
        "route",
        "replace",
        "10.244.2.0/24",
        "via",
        "198.18.0.7",
        "dev",
        "ua",
        "proto",
        "70",
    ]);
    ba.resync().await.unwrap();
    let routes = a.sh(&["ip", "route"]);
    assert!(
        routes.contains("10.244.2.0/24 via 198.18.0.2 dev ua proto 70"),
        "{routes}"
    );
    assert_eq!(routes.matches("10.244.2.0/24").count(), 1, "{routes}");
}

#[tokio::test]
async fn host_gw_refuses_nat() {
    if !privileged("host_gw_refuses_nat") {
        return;
    }
    let (a, _b) = two_hosts(1, 2).await;
    let mut ext = a.ext.clone();
    ext.public_ip = Some("203.0.113.1".parse().unwrap());
    let raw = RawValue::from_string(CFG.to_string()).unwrap();
    let mut be = HostGwBackend::new(&raw, ext, a.nl.clone()).unwrap();
    let e = be.register(&config(CFG)).await.unwrap_err().to_string();
    assert!(e.contains("203.0.113.1") && e.contains("198.18.0.1"), "{e}");
}

const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"host-gw"}}"#;

/// Gives a host of [`two_hosts`] an IPv6 underlay address and its lease a v6 part.
fn dual_stack(h: &mut Host, n: u8) -> String {
    let ifname = h.ext.name.clone();
    let addr = format!("fd18::{n}");
    h.sh(&[
        "ip",
        "addr",
        "add",
        &format!("{addr}/64"),
        "dev",
        &ifname,
        "nodad",
    ]);
    h.sh(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    h.ext.addr6 = Some(addr.parse().unwrap());
    h.ext.public_ipv6 = h.ext.addr6;
    addr
}

fn dual_lease(h: &Host, attrs: &LeaseAttrs, v6: &str) -> flannel_core::Lease {
    let mut l = h.lease(attrs);
    let key = format!("{}-24&{v6}-64", h.subnet.trim_end_matches("/24"));
    l.key = key.parse().unwrap();
    l
}

#[tokio::test]
async fn host_gw_dual_stack_routes_v6_via_public_ipv6() {
    if !privileged("host_gw_dual_stack_routes_v6_via_public_ipv6") {
        return;
    }
    let cfg = flannel_core::NetworkConfig::parse(DUAL).unwrap();
    let (mut a, mut b) = two_hosts(1, 2).await;
    dual_stack(&mut a, 1);
    dual_stack(&mut b, 2);
    let raw = RawValue::from_string(CFG.to_string()).unwrap();
    let mut ba = HostGwBackend::new(&raw, a.ext.clone(), a.nl.clone()).unwrap();
    let mut bb = HostGwBackend::new(&raw, b.ext.clone(), b.nl.clone()).unwrap();
    let mut attrs_a = ba.register(&cfg).await.unwrap();
    let mut attrs_b = bb.register(&cfg).await.unwrap();
    // The agent publishes the interface's addresses.
    attrs_a.public_ipv6 = a.ext.public_ipv6;
    attrs_b.public_ipv6 = b.ext.public_ipv6;
    assert_eq!(
        attrs_b.encode(),
        r#"{"PublicIP":"198.18.0.2","PublicIPv6":"fd18::2","BackendType":"host-gw"}"#
    );
    let la = dual_lease(&a, &attrs_a, "fd10:244:0:1::");
    let lb = dual_lease(&b, &attrs_b, "fd10:244:0:2::");
    ba.start(&cfg, &la).await.unwrap();
    // An admin's route inside IPv6Network must stay.
    a.sh(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd10:244:0:50::/64",
        "via",
        "fd18::2",
        "dev",
        "ua",
        "proto",
        "static",
    ]);
    // A peer without PublicIPv6: its IPv4 route only.
    let mut c = lb.clone();
    c.key = "10.244.3.0-24&fd10:244:0:3::-64".parse().unwrap();
    std::sync::Arc::make_mut(&mut c.attrs).public_ipv6 = None;
    ba.reconcile(&[lb.clone(), c.clone()]).await.unwrap();
    let routes = a.sh(&["ip", "-d", "-6", "route", "show", "table", "all"]);
    let ours: Vec<&str> = routes
        .lines()
        .filter(|l| l.contains("fd10:244:0:2::"))
        .collect();
    assert_eq!(
        ours,
        vec!["unicast fd10:244:0:2::/64 via fd18::2 dev ua table main proto 70 scope global metric 1024 pref medium"],
        "{routes}"
    );
    assert!(!routes.contains("fd10:244:0:3::"), "{routes}");
    assert!(a
        .sh(&["ip", "route"])
        .contains("10.244.3.0/24 via 198.18.0.2 dev ua proto 70"));

    // The v6 path carries traffic: b's pod gets a v6 address behind b.
    b.sh(&[
        "ip",
        "addr",
        "add",
        "fd10:244:0:2::1/64",
        "dev",
        "pod0",
        "nodad",
    ]);
    b.pod
        .run(&[
            "ip",
            "addr",
            "add",
            "fd10:244:0:2::2/64",
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    b.pod
        .run(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd10:244:0:2::1",
        ])
        .unwrap();
    a.sh(&[
        "ip",
        "addr",
        "add",
        "fd10:244:0:1::1/64",
        "dev",
        "pod0",
        "nodad",
    ]);
    a.pod
        .run(&[
            "ip",
            "addr",
            "add",
            "fd10:244:0:1::2/64",
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    a.pod
        .run(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd10:244:0:1::1",
        ])
        .unwrap();
    bb.start(&cfg, &lb).await.unwrap();
    bb.reconcile(std::slice::from_ref(&la)).await.unwrap();
    assert!(pod_ping(&a.pod, "fd10:244:0:2::2"));
    assert!(pod_ping(&b.pod, "fd10:244:0:1::2"));

    // Over a matching kernel: no writes.
    let w = ba.peer_writes();
    ba.reconcile(&[lb.clone(), c.clone()]).await.unwrap();
    ba.resync().await.unwrap();
    assert_eq!(ba.peer_writes(), w);

    // Deleted behind our back: the periodic check puts it back.
    a.sh(&["ip", "-6", "route", "del", "fd10:244:0:2::/64"]);
    ba.resync().await.unwrap();
    assert!(a
        .sh(&["ip", "-6", "route"])
        .contains("fd10:244:0:2::/64 via fd18::2 dev ua proto 70"));

    // Lease deleted: both routes go, the admin's stays.
    ba.apply(&[LeaseEvent::Removed(lb.clone())]).await.unwrap();
    let r6 = a.sh(&["ip", "-6", "route"]);
    assert!(!r6.contains("fd10:244:0:2::"), "{r6}");
    assert!(
        r6.contains("fd10:244:0:50::/64 via fd18::2 dev ua proto static"),
        "{r6}"
    );
    assert!(!a.sh(&["ip", "route"]).contains("10.244.2.0"));
    // A full reconcile without the peer removes nothing else.
    ba.reconcile(std::slice::from_ref(&c)).await.unwrap();
    assert!(a.sh(&["ip", "-6", "route"]).contains("fd10:244:0:50::/64"));
}

#[tokio::test]
async fn ipv6_is_refused_by_the_other_backends() {
    let cfg = flannel_core::NetworkConfig::parse(DUAL).unwrap();
    if !privileged("ipv6_is_refused_by_the_other_backends") {
        return;
    }
    let (a, _b) = two_hosts(1, 2).await;
    for (ty, needle) in [("vxlan", "no IPv6 address"), ("udp", "only IPv4")] {
        let raw = RawValue::from_string(format!(r#"{{"Type":"{ty}"}}"#)).unwrap();
        let mut be =
            flannel_backend::new_backend(ty, &raw, a.ext.clone(), a.nl.clone(), Default::default())
                .unwrap();
        let e = be.register(&cfg).await.unwrap_err().to_string();
        assert!(e.contains(needle), "{ty}: {e}");
    }
    // host-gw without an IPv6 address on the interface: a clear error.
    let raw = RawValue::from_string(CFG.to_string()).unwrap();
    let mut be = HostGwBackend::new(&raw, a.ext.clone(), a.nl.clone()).unwrap();
    let e = be.register(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("no IPv6 address"), "{e}");
}

const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"host-gw"}}"#;

/// An IPv6-only lease as the Kubernetes store builds it: the `0.0.0.0/0` IPv4
/// placeholder and the v6 pod CIDR.
fn v6_only_lease(attrs: &LeaseAttrs, v6: &str) -> flannel_core::Lease {
    flannel_core::Lease {
        key: format!("0.0.0.0-0&{v6}-64").parse().unwrap(),
        attrs: attrs.clone().into(),
        expiration: None,
    }
}

#[tokio::test]
async fn host_gw_ipv6_only_routes_v6_alone() {
    if !privileged("host_gw_ipv6_only_routes_v6_alone") {
        return;
    }
    let cfg = flannel_core::NetworkConfig::parse(V6_ONLY).unwrap();
    let (mut a, mut b) = two_hosts(1, 2).await;
    dual_stack(&mut a, 1);
    dual_stack(&mut b, 2);
    // As the interface selection leaves it for IPv6-only: no IPv4 part.
    a.ext.addr = None;
    a.ext.public_ip = None;
    let raw = RawValue::from_string(CFG.to_string()).unwrap();
    let mut ba = HostGwBackend::new(&raw, a.ext.clone(), a.nl.clone()).unwrap();
    let mut attrs = ba.register(&cfg).await.unwrap();
    attrs.public_ipv6 = a.ext.public_ipv6;
    assert_eq!(
        attrs.encode(),
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::1","BackendType":"host-gw"}"#
    );
    assert!(
        ba.reconcile(&[]).await.is_err(),
        "a reconcile before start is an error"
    );
    let own = v6_only_lease(&attrs, "fd10:244:0:1::");
    ba.start(&cfg, &own).await.unwrap();
    // Two peers share the IPv4 placeholder; both are routed, our own lease is not.
    let mut peer_attrs = attrs.clone();
    peer_attrs.public_ipv6 = b.ext.public_ipv6;
    let p2 = v6_only_lease(&peer_attrs, "fd10:244:0:2::");
    let p3 = v6_only_lease(&peer_attrs, "fd10:244:0:3::");
    ba.reconcile(&[own.clone(), p2.clone(), p3.clone()])
        .await
        .unwrap();
    let r6 = a.sh(&["ip", "-6", "route", "show", "proto", "70"]);
    assert_eq!(
        r6.lines().collect::<Vec<_>>(),
        vec![
            "fd10:244:0:2::/64 via fd18::2 dev ua metric 1024 pref medium",
            "fd10:244:0:3::/64 via fd18::2 dev ua metric 1024 pref medium",
        ],
        "{r6}"
    );
    let r4 = a.sh(&["ip", "-4", "route", "show", "proto", "70"]);
    assert!(
        r4.trim().is_empty(),
        "IPv4 routes in an IPv6-only network: {r4}"
    );
    // Resync over a matching kernel writes nothing.
    let w = ba.peer_writes();
    ba.resync().await.unwrap();
    assert_eq!(ba.peer_writes(), w);
    // One peer leaves: only its route goes.
    ba.apply(&[LeaseEvent::Removed(p2)]).await.unwrap();
    let r6 = a.sh(&["ip", "-6", "route", "show", "proto", "70"]);
    assert_eq!(
        r6.trim(),
        "fd10:244:0:3::/64 via fd18::2 dev ua metric 1024 pref medium"
    );
}
