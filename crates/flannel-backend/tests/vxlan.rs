//! vxlan backend in two namespaces: real devices, real encapsulation, kernel state
//! compared with Appendix A.1, reconcile behaviour observed with `ip monitor`.

mod common;

use common::*;
use flannel_backend::vxlan::VxlanBackend;
use flannel_backend::{Backend, BackendOptions};
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, VxlanData};
use flannel_testkit::privileged;
use serde_json::value::RawValue;

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_string()).unwrap()
}

/// Hosts a (1) and b (2), or `None` when `test` cannot run here.
async fn hosts(test: &str) -> Option<(Host, Host)> {
    if !privileged(test) {
        return None;
    }
    Some(two_hosts(1, 2).await)
}

async fn backend_with(h: &Host, cfg: &str, opts: BackendOptions) -> (VxlanBackend, LeaseAttrs) {
    let mut be = VxlanBackend::new(&raw(cfg), h.ext.clone(), h.nl.clone(), opts).unwrap();
    let attrs = be.register(&config(cfg)).await.unwrap();
    (be, attrs)
}

async fn backend(h: &Host, cfg: &str) -> (VxlanBackend, LeaseAttrs) {
    backend_with(h, cfg, BackendOptions::default()).await
}

/// A registered backend, its lease attributes and its lease.
struct Side {
    be: VxlanBackend,
    attrs: LeaseAttrs,
    lease: Lease,
}

/// A backend registered on `h` and started on its own lease.
async fn started(h: &Host, cfg: &str) -> Side {
    let (mut be, attrs) = backend(h, cfg).await;
    let lease = h.lease(&attrs);
    be.start(&config(cfg), &lease).await.unwrap();
    Side { be, attrs, lease }
}

/// The lease of a host whose backend registered (made its device) and went away.
async fn published(h: &Host, cfg: &str) -> Lease {
    let (_, attrs) = backend(h, cfg).await;
    h.lease(&attrs)
}

/// Backends on both hosts, each started and reconciled with the other as its peer.
async fn connected(a: &Host, b: &Host, cfg: &str) -> (Side, Side) {
    let (mut sa, mut sb) = (started(a, cfg).await, started(b, cfg).await);
    sa.be
        .reconcile(std::slice::from_ref(&sb.lease))
        .await
        .unwrap();
    sb.be
        .reconcile(std::slice::from_ref(&sa.lease))
        .await
        .unwrap();
    (sa, sb)
}

/// `l` published from `ip` with VTEP MAC `mac` (VNI 1), and with `key` for another
/// subnet.
fn moved(l: &Lease, key: Option<&str>, ip: &str, mac: &str) -> Lease {
    let mut m = l.clone();
    if let Some(k) = key {
        m.key = k.parse().unwrap();
    }
    std::sync::Arc::make_mut(&mut m.attrs).public_ip = ip.parse().unwrap();
    let data = format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#);
    std::sync::Arc::make_mut(&mut m.attrs).backend_data = Some(raw(&data));
    m
}

/// What Go flanneld programs on `h` for a peer with subnet IP `ip`, VTEP MAC `mac` and
/// public IP `public`: neighbour, FDB entry and onlink route (proto boot).
fn go_peer(h: &Host, ip: &str, mac: &str, public: &str) {
    for cmd in [
        format!("ip neigh replace {ip} lladdr {mac} dev flannel.1 nud permanent"),
        format!("bridge fdb replace {mac} dev flannel.1 dst {public} self permanent"),
        format!("ip route replace {ip}/24 via {ip} dev flannel.1 onlink"),
    ] {
        h.sh(&cmd.split(' ').collect::<Vec<_>>());
    }
}

/// `ip neigh` and `bridge fdb` of flannel.1 on `h`.
fn entries(h: &Host) -> (String, String) {
    (
        h.sh(&["ip", "neigh", "show", "dev", "flannel.1"]),
        h.sh(&["bridge", "fdb", "show", "dev", "flannel.1"]),
    )
}

/// `ip -s -j link show flannel.1` on `h`, as text and parsed.
fn tunnel_stats(h: &Host) -> (String, serde_json::Value) {
    let link = h.sh(&["ip", "-s", "-j", "link", "show", "flannel.1"]);
    let v = serde_json::from_str(&link).unwrap();
    (link, v)
}

fn mac_of(attrs: &LeaseAttrs) -> String {
    VxlanData::decode(attrs.backend_data.as_ref().unwrap())
        .unwrap()
        .vtep_mac
        .to_string()
}

#[tokio::test]
async fn vxlan_pods_talk_and_kernel_state_matches_flannel() {
    let Some((a, b)) = hosts("vxlan_pods_talk_and_kernel_state_matches_flannel").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan"}"#;
    let (sa, sb) = connected(&a, &b, cfg).await;
    let (mut ba, attrs_a, attrs_b, lb) = (sa.be, sa.attrs, sb.attrs, sb.lease);
    // The lease value is byte-for-byte flannel's.
    assert_eq!(
        attrs_a.encode(),
        format!(
            r#"{{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            mac_of(&attrs_a)
        )
    );
    assert_eq!(ba.mtu(), 1450);

    assert!(pod_ping(&a.pod, &b.pod_ip), "pod a -> pod b over vxlan");
    assert!(pod_ping(&b.pod, &a.pod_ip), "pod b -> pod a over vxlan");
    // And the traffic really went through the tunnel device.
    let (link, v) = tunnel_stats(&a);
    assert!(
        v[0]["stats64"]["tx"]["packets"].as_u64().unwrap() > 0,
        "{link}"
    );

    // Appendix A.1, host a.
    let link = a.sh(&["ip", "-d", "link", "show", "flannel.1"]);
    assert!(link.contains("mtu 1450"), "{link}");
    assert!(
        link.contains(&format!("link/ether {}", mac_of(&attrs_a))),
        "{link}"
    );
    assert!(
        link.contains("vxlan id 1 local 198.18.0.1 dev ua srcport 0 0 dstport 8472 nolearning ttl auto ageing 300 udpcsum"),
        "{link}"
    );
    assert!(
        !link.contains("gbp") && !link.contains("l2miss") && !link.contains("l3miss"),
        "{link}"
    );
    let addr = a.sh(&["ip", "-4", "addr", "show", "dev", "flannel.1"]);
    assert!(
        addr.contains("inet 10.244.1.0/32 scope global flannel.1"),
        "{addr}"
    );
    assert_eq!(addr.matches("inet ").count(), 1, "{addr}");
    let routes = a.sh(&[
        "ip",
        "-d",
        "route",
        "show",
        "table",
        "all",
        "dev",
        "flannel.1",
    ]);
    assert!(
        routes.contains(
            "unicast 10.244.2.0/24 via 10.244.2.0 table main proto 70 scope global onlink"
        ),
        "{routes}"
    );
    let (neigh, fdb) = entries(&a);
    assert_eq!(
        neigh.trim(),
        format!("10.244.2.0 lladdr {} PERMANENT", mac_of(&attrs_b))
    );
    assert_eq!(
        fdb.trim(),
        format!("{} dst 198.18.0.2 self permanent", mac_of(&attrs_b))
    );
    assert_eq!(
        a.sh(&["cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra"])
            .trim(),
        "0"
    );
    // No route for the whole network.
    assert!(!a.sh(&["ip", "route"]).contains("10.244.0.0/16"));

    // Removing the peer removes route, neighbour and FDB entry; traffic stops.
    ba.apply(&[LeaseEvent::Removed(lb.clone())]).await.unwrap();
    assert!(!a.sh(&["ip", "route"]).contains("10.244.2.0/24"));
    assert!(a
        .sh(&["ip", "neigh", "show", "dev", "flannel.1"])
        .trim()
        .is_empty());
    assert!(a
        .sh(&["bridge", "fdb", "show", "dev", "flannel.1"])
        .trim()
        .is_empty());
    assert!(!ping_once(&a.pod, &b.pod_ip));
    // And an Added event brings it back.
    ba.apply(&[LeaseEvent::Added(lb.clone())]).await.unwrap();
    assert!(pod_ping(&a.pod, &b.pod_ip));
}

#[tokio::test]
async fn vxlan_options_gbp_port_learning_and_mtu() {
    let Some((a, _b)) = hosts("vxlan_options_gbp_port_learning_and_mtu").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan","VNI":5,"Port":4789,"GBP":true,"Learning":true,"MTU":1400}"#;
    let (be, attrs) = backend(&a, cfg).await;
    assert!(attrs
        .backend_data
        .as_ref()
        .unwrap()
        .get()
        .starts_with(r#"{"VNI":5,"#));
    assert_eq!(be.mtu(), 1350);
    let link = a.sh(&["ip", "-d", "link", "show", "flannel.5"]);
    assert!(link.contains("mtu 1350"), "{link}");
    assert!(
        link.contains("vxlan id 5 local 198.18.0.1 dev ua srcport 0 0 dstport 4789 ttl auto"),
        "{link}"
    );
    assert!(
        link.contains("gbp") && !link.contains("nolearning"),
        "{link}"
    );
}

#[tokio::test]
async fn restart_reuses_device_and_changes_nothing() {
    let Some((a, b)) = hosts("restart_reuses_device_and_changes_nothing").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan"}"#;
    let lb = published(&b, cfg).await;
    // A third peer, so more than one entry is checked.
    let lc = moved(
        &lb,
        Some("10.244.3.0-24"),
        "198.18.0.3",
        "0a:58:0a:f4:03:00",
    );

    let Side {
        be: mut first,
        attrs: attrs1,
        lease: la,
    } = started(&a, cfg).await;
    first.reconcile(&[lb.clone(), lc.clone()]).await.unwrap();
    let before = a.sh(&["ip", "-d", "route", "show", "table", "all"]);
    drop(first);

    let mut mon = monitor(&a.ns);
    // "Restart": a new backend over the existing state.
    let (mut second, attrs2) = backend(&a, cfg).await;
    assert_eq!(
        mac_of(&attrs1),
        mac_of(&attrs2),
        "the device and its MAC are reused"
    );
    second.start(&config(cfg), &la).await.unwrap();
    second.reconcile(&[lb.clone(), lc.clone()]).await.unwrap();
    assert_eq!(
        second.peer_writes(),
        0,
        "a restart over correct state writes nothing"
    );
    // And a second reconcile of the same set.
    second.reconcile(&[lb.clone(), lc.clone()]).await.unwrap();
    second.resync().await.unwrap();
    assert_eq!(second.peer_writes(), 0);
    let events = mon.barrier();
    assert!(
        events.is_empty(),
        "restart/reconcile touched the kernel: {events:#?}"
    );
    assert_eq!(before, a.sh(&["ip", "-d", "route", "show", "table", "all"]));
}

#[tokio::test]
async fn reconcile_removes_stale_entries_and_adopts_go_routes() {
    let Some((a, b)) = hosts("reconcile_removes_stale_entries_and_adopts_go_routes").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan"}"#;
    let lb = published(&b, cfg).await;
    let mut be = started(&a, cfg).await.be;

    // What Go flanneld left: b's entries with proto boot (correct ones), plus a
    // peer that is gone (10.244.9.0/24).
    let mb = mac_of(&lb.attrs);
    go_peer(&a, "10.244.2.0", &mb, "198.18.0.2");
    go_peer(&a, "10.244.9.0", "0a:58:00:00:00:09", "198.18.0.9");
    for cmd in [
        // Not ours: an admin's static route in the network, a boot route outside it.
        vec![
            "ip",
            "route",
            "add",
            "10.244.50.0/24",
            "via",
            "198.18.0.2",
            "dev",
            "ua",
            "proto",
            "static",
        ],
        vec![
            "ip",
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            "198.18.0.2",
            "dev",
            "ua",
        ],
    ] {
        a.sh(&cmd);
    }
    let mut mon = monitor(&a.ns);
    be.reconcile(std::slice::from_ref(&lb)).await.unwrap();
    let events = mon.barrier();

    let routes = a.sh(&["ip", "route"]);
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 dev flannel.1 proto 70 onlink"),
        "{routes}"
    );
    assert!(!routes.contains("10.244.9.0"), "{routes}");
    assert!(
        routes.contains("10.244.50.0/24 via 198.18.0.2 dev ua proto static"),
        "{routes}"
    );
    assert!(
        routes.contains("192.0.2.0/24 via 198.18.0.2 dev ua"),
        "{routes}"
    );
    let (neigh, fdb) = entries(&a);
    assert_eq!(neigh.trim(), format!("10.244.2.0 lladdr {mb} PERMANENT"));
    assert_eq!(fdb.trim(), format!("{mb} dst 198.18.0.2 self permanent"));
    // b's route was re-marked in place (replace), never deleted; its neighbour and
    // FDB entries were already right and were not touched.
    assert!(
        !events
            .iter()
            .any(|l| l.starts_with("Deleted") && l.contains("10.244.2.0")),
        "{events:#?}"
    );
    assert!(!events.iter().any(|l| l.contains(&mb)), "{events:#?}");
    assert!(
        events
            .iter()
            .any(|l| l.starts_with("Deleted") && l.contains("10.244.9.0/24")),
        "{events:#?}"
    );
}

#[tokio::test]
async fn changed_peer_is_updated_in_place() {
    let Some((a, b)) = hosts("changed_peer_is_updated_in_place").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan"}"#;
    let lb = published(&b, cfg).await;
    let mut be = started(&a, cfg).await.be;
    be.reconcile(std::slice::from_ref(&lb)).await.unwrap();

    let changed = moved(&lb, None, "198.18.0.7", "0a:58:00:00:00:77");
    let mut mon = monitor(&a.ns);
    be.apply(&[LeaseEvent::Changed {
        previous: lb.clone(),
        current: changed.clone(),
    }])
    .await
    .unwrap();
    let events = mon.barrier();
    let (neigh, fdb) = entries(&a);
    assert_eq!(
        neigh.trim(),
        "10.244.2.0 lladdr 0a:58:00:00:00:77 PERMANENT"
    );
    assert_eq!(
        fdb.trim(),
        "0a:58:00:00:00:77 dst 198.18.0.7 self permanent"
    );
    assert!(
        !events.iter().any(|l| l.contains("10.244.2.0/24")),
        "route untouched: {events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|l| l.starts_with("Deleted") && l.contains("10.244.2.0 ")),
        "neighbour replaced, not deleted: {events:#?}"
    );

    // The same change through a full reconcile (e.g. after a resync) is a no-op.
    let _ = mon.barrier();
    let writes = be.peer_writes();
    be.reconcile(std::slice::from_ref(&changed)).await.unwrap();
    assert!(mon.barrier().is_empty());
    assert_eq!(be.peer_writes(), writes, "nothing to write");
}

#[tokio::test]
async fn bad_and_foreign_leases_are_skipped() {
    let Some((a, b)) = hosts("bad_and_foreign_leases_are_skipped").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan"}"#;
    let lb = published(&b, cfg).await;
    let mut be = started(&a, cfg).await.be;
    let mk = |key: &str, ty: &str, data: Option<&str>| {
        let mut l = lb.clone();
        l.key = key.parse().unwrap();
        std::sync::Arc::make_mut(&mut l.attrs).backend_type = ty.into();
        std::sync::Arc::make_mut(&mut l.attrs).backend_data = data.map(raw);
        l
    };
    let peers = vec![
        lb.clone(),
        mk("10.244.3.0-24", "host-gw", None),
        mk("10.244.4.0-24", "", None),
        mk(
            "10.244.5.0-24",
            "VXLAN",
            Some(r#"{"VNI":1,"VtepMAC":"0a:58:00:00:00:05"}"#),
        ),
        mk(
            "10.244.6.0-24",
            "vxlan",
            Some(r#"{"VNI":1,"VtepMAC":"zz"}"#),
        ),
        mk("10.244.7.0-24", "vxlan", Some(r#""just a string""#)),
        mk("10.244.8.0-24", "vxlan", None),
    ];
    be.reconcile(&peers).await.unwrap();
    let routes = a.sh(&["ip", "route", "show", "dev", "flannel.1"]);
    assert_eq!(
        routes.trim(),
        "10.244.2.0/24 via 10.244.2.0 proto 70 onlink",
        "{routes}"
    );
}

#[tokio::test]
async fn direct_routing_uses_the_underlay_for_neighbours() {
    let Some((a, b)) = hosts("direct_routing_uses_the_underlay_for_neighbours").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan","DirectRouting":true}"#;
    let (mut sa, mut sb) = (started(&a, cfg).await, started(&b, cfg).await);
    let (ba, bb, la, lb) = (&mut sa.be, &mut sb.be, &sa.lease, &sb.lease);
    // A third peer that is only reachable through a router: it gets the tunnel.
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
    let lc = moved(
        lb,
        Some("10.244.3.0-24"),
        "203.0.113.5",
        "0a:58:00:00:00:03",
    );
    ba.reconcile(&[lb.clone(), lc.clone()]).await.unwrap();
    bb.reconcile(std::slice::from_ref(la)).await.unwrap();

    let routes = a.sh(&["ip", "route"]);
    assert!(
        routes.contains("10.244.2.0/24 via 198.18.0.2 dev ua proto 70"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.3.0/24 via 10.244.3.0 dev flannel.1 proto 70 onlink"),
        "{routes}"
    );
    let (neigh, fdb) = entries(&a);
    assert_eq!(
        neigh.trim(),
        "10.244.3.0 lladdr 0a:58:00:00:00:03 PERMANENT"
    );
    assert_eq!(
        fdb.trim(),
        "0a:58:00:00:00:03 dst 203.0.113.5 self permanent"
    );
    assert!(pod_ping(&a.pod, &b.pod_ip));
    assert!(pod_ping(&b.pod, &a.pod_ip));
    // The pods' traffic went over the underlay, not the tunnel.
    let (link, v) = tunnel_stats(&a);
    assert_eq!(v[0]["stats64"]["tx"]["packets"], 0, "{link}");
}

#[tokio::test]
async fn deleted_device_is_recreated_with_its_entries_on_resync() {
    let Some((a, b)) = hosts("deleted_device_is_recreated_with_its_entries_on_resync").await else {
        return;
    };
    let cfg = r#"{"Type":"vxlan"}"#;
    let (mut sa, _sb) = connected(&a, &b, cfg).await;
    assert!(pod_ping(&a.pod, &b.pod_ip));
    a.sh(&["ip", "link", "del", "flannel.1"]);
    assert!(!ping_once(&a.pod, &b.pod_ip));
    sa.be.resync().await.unwrap();
    let link = a.sh(&["ip", "link", "show", "flannel.1"]);
    assert!(
        link.contains(&mac_of(&sa.attrs)),
        "same MAC after recreation: {link}"
    );
    assert!(pod_ping(&a.pod, &b.pod_ip));
}

#[tokio::test]
async fn incompatible_device_is_recreated_with_the_published_mac() {
    let Some((a, _b)) = hosts("incompatible_device_is_recreated_with_the_published_mac").await
    else {
        return;
    };
    let cfg = r#"{"Type":"vxlan"}"#;
    // A flannel.1 on another port (and learning on) cannot talk to the cluster.
    a.sh(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "address",
        "0a:58:11:11:11:11",
        "type",
        "vxlan",
        "id",
        "1",
        "dev",
        "ua",
        "dstport",
        "4789",
    ]);
    let published = "0a:58:22:22:22:22".parse().unwrap();
    let opts = BackendOptions {
        vtep_mac: Some(published),
    };
    let (_be, attrs) = backend_with(&a, cfg, opts).await;
    assert_eq!(mac_of(&attrs), "0a:58:22:22:22:22");
    let link = a.sh(&["ip", "-d", "link", "show", "flannel.1"]);
    assert!(link.contains("link/ether 0a:58:22:22:22:22"), "{link}");
    assert!(link.contains("dstport 8472 nolearning"), "{link}");

    // A compatible device is kept as it is, whatever MAC was published before.
    let (_be, attrs) = backend(&a, cfg).await;
    assert_eq!(mac_of(&attrs), "0a:58:22:22:22:22");
    // A non-vxlan device of that name is replaced too.
    a.sh(&["ip", "link", "del", "flannel.1"]);
    a.sh(&["ip", "link", "add", "flannel.1", "type", "bridge"]);
    let (_be, _) = backend(&a, cfg).await;
    assert!(a
        .sh(&["ip", "-d", "link", "show", "flannel.1"])
        .contains("vxlan id 1"));
}
