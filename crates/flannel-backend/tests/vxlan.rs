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
        ..Default::default()
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

const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;

/// Gives host `h` of [`two_hosts`] the underlay address `fd18::<n>`, and its pod the
/// address `fd10:244:0:<n>::2` behind `fd10:244:0:<n>::1`.
fn dual_stack(h: &mut Host, n: u8) {
    let ifname = h.ext.name.clone();
    let addr = format!("fd18::{n}");
    let gw = format!("fd10:244:0:{n}::1");
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
    h.sh(&[
        "ip",
        "addr",
        "add",
        &format!("{gw}/64"),
        "dev",
        "pod0",
        "nodad",
    ]);
    let pod = format!("fd10:244:0:{n}::2/64");
    h.pod
        .run(&["ip", "addr", "add", &pod, "dev", "eth0", "nodad"])
        .unwrap();
    h.pod
        .run(&["ip", "-6", "route", "add", "default", "via", &gw])
        .unwrap();
    h.ext.addr6 = Some(addr.parse().unwrap());
    h.ext.public_ipv6 = h.ext.addr6;
}

/// `h`'s lease for `attrs` with the v6 subnet `fd10:244:0:<n>::/64`, published as the
/// agent does (with the interface's PublicIPv6).
fn dual_lease(h: &Host, attrs: &LeaseAttrs, n: u8) -> Lease {
    let mut attrs = attrs.clone();
    attrs.public_ipv6 = h.ext.public_ipv6;
    let mut l = h.lease(&attrs);
    let key = format!(
        "{}-24&fd10:244:0:{n}::-64",
        h.subnet.trim_end_matches("/24")
    );
    l.key = key.parse().unwrap();
    l
}

fn mac6_of(attrs: &LeaseAttrs) -> String {
    VxlanData::decode(attrs.backend_v6_data.as_ref().unwrap())
        .unwrap()
        .vtep_mac
        .to_string()
}

/// A dual-stack backend on `h` (host number `n`), registered and started.
async fn started_dual(h: &Host, n: u8, vxlan: &str, opts: BackendOptions) -> (VxlanBackend, Lease) {
    let cfg =
        flannel_core::NetworkConfig::parse(&DUAL.replace(r#"{"Type":"vxlan"}"#, vxlan)).unwrap();
    let mut be = VxlanBackend::new(&raw(vxlan), h.ext.clone(), h.nl.clone(), opts).unwrap();
    let attrs = be.register(&cfg).await.unwrap();
    let lease = dual_lease(h, &attrs, n);
    be.start(&cfg, &lease).await.unwrap();
    (be, lease)
}

/// The lines of `text` that mention `needle`.
fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test]
async fn vxlan_dual_stack_v6_device_entries_and_zero_write_restart() {
    let test = "vxlan_dual_stack_v6_device_entries_and_zero_write_restart";
    let Some((mut a, mut b)) = hosts(test).await else {
        return;
    };
    dual_stack(&mut a, 1);
    dual_stack(&mut b, 2);
    let vx = r#"{"Type":"vxlan"}"#;
    let (mut ba, la) = started_dual(&a, 1, vx, BackendOptions::default()).await;
    let (mut bb, lb) = started_dual(&b, 2, vx, BackendOptions::default()).await;
    // The lease value is byte-for-byte Go's, BackendV6Data last.
    assert_eq!(
        lb.attrs.encode(),
        format!(
            r#"{{"PublicIP":"198.18.0.2","PublicIPv6":"fd18::2","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            mac_of(&lb.attrs),
            mac6_of(&lb.attrs)
        )
    );
    assert_ne!(mac_of(&lb.attrs), mac6_of(&lb.attrs));
    assert_eq!(ba.mtu(), 1450, "FLANNEL_MTU stays the IPv4 device's");

    // Bad peers: no PublicIPv6, no BackendV6Data, a v6 subnet outside IPv6Network.
    // Each keeps its IPv4 entries and gets no IPv6 entry.
    let mut no_public6 = moved(
        &lb,
        Some("10.244.3.0-24&fd10:244:0:3::-64"),
        "198.18.0.2",
        "0a:58:00:00:00:03",
    );
    std::sync::Arc::make_mut(&mut no_public6.attrs).public_ipv6 = None;
    let mut no_data6 = moved(
        &lb,
        Some("10.244.4.0-24&fd10:244:0:4::-64"),
        "198.18.0.2",
        "0a:58:00:00:00:04",
    );
    std::sync::Arc::make_mut(&mut no_data6.attrs).backend_v6_data = None;
    let outside = moved(
        &lb,
        Some("10.244.5.0-24&fd10:9::-64"),
        "198.18.0.2",
        "0a:58:00:00:00:05",
    );
    let bad = [no_public6.clone(), no_data6.clone(), outside.clone()];
    let mut peers = vec![lb.clone()];
    peers.extend(bad.iter().cloned());
    ba.reconcile(&peers).await.unwrap();
    bb.reconcile(std::slice::from_ref(&la)).await.unwrap();

    // Appendix A.1's lines, for the IPv6 device.
    let link = a.sh(&["ip", "-d", "link", "show", "flannel-v6.1"]);
    let mac6a = mac6_of(&la.attrs);
    assert!(link.contains("mtu 1430 "), "{link}");
    assert!(link.contains(&format!("link/ether {mac6a} ")), "{link}");
    assert!(
        link.contains("vxlan id 1 local fd18::1 dev ua srcport 0 0 dstport 8472 nolearning ttl auto ageing 300"),
        "{link}"
    );
    // Exact once DAD is over (the kernel marks a new address tentative first).
    let addrs = || {
        a.sh(&[
            "ip",
            "-6",
            "addr",
            "show",
            "dev",
            "flannel-v6.1",
            "scope",
            "global",
        ])
    };
    eventually(|| !addrs().contains("tentative"));
    let addrs = addrs();
    assert_eq!(
        lines_with(&addrs, "inet6"),
        vec!["    inet6 fd10:244:0:1::/128 scope global "],
        "{addrs}"
    );
    let mac6b = mac6_of(&lb.attrs);
    let neigh = a.sh(&[
        "ip",
        "-6",
        "neigh",
        "show",
        "dev",
        "flannel-v6.1",
        "nud",
        "permanent",
    ]);
    assert_eq!(
        neigh.lines().collect::<Vec<_>>(),
        vec![format!("fd10:244:0:2:: lladdr {mac6b} PERMANENT ")],
        "{neigh}"
    );
    let fdb = a.sh(&["bridge", "fdb", "show", "dev", "flannel-v6.1"]);
    assert_eq!(
        lines_with(&fdb, " dst "),
        vec![format!("{mac6b} dst fd18::2 self permanent")],
        "{fdb}"
    );
    let routes = a.sh(&["ip", "-d", "-6", "route", "show", "table", "all"]);
    assert_eq!(
        lines_with(&routes, "fd10:244:0:2"),
        vec!["unicast fd10:244:0:2::/64 via fd10:244:0:2:: dev flannel-v6.1 table main proto 70 scope global metric 1024 onlink pref medium"],
        "{routes}"
    );
    assert!(!routes.contains("fd10:9::"), "{routes}");
    // The IPv4 device is as before, and every bad peer still has its IPv4 route.
    let r4 = a.sh(&["ip", "route"]);
    for s in ["10.244.2.0", "10.244.3.0", "10.244.4.0", "10.244.5.0"] {
        assert!(
            r4.contains(&format!("{s}/24 via {s} dev flannel.1 proto 70 onlink")),
            "{s}: {r4}"
        );
    }

    assert!(
        pod_ping(&a.pod, "fd10:244:0:2::2"),
        "pod a -> pod b over v6"
    );
    assert!(
        pod_ping(&b.pod, "fd10:244:0:1::2"),
        "pod b -> pod a over v6"
    );
    assert!(pod_ping(&a.pod, &b.pod_ip), "and over v4");

    // Over a matching kernel: no writes, by the same backend or a restarted one,
    // which keeps both devices and so both published MACs.
    let w = ba.peer_writes();
    ba.reconcile(&peers).await.unwrap();
    ba.resync().await.unwrap();
    assert_eq!(ba.peer_writes(), w);
    drop(ba);
    let mut mon = monitor(&a.ns);
    mon.barrier();
    let (mut ba, la2) = started_dual(&a, 1, vx, BackendOptions::default()).await;
    assert_eq!(
        la2.attrs.encode(),
        la.attrs.encode(),
        "same MACs after a restart"
    );
    ba.reconcile(&peers).await.unwrap();
    ba.resync().await.unwrap();
    assert_eq!(ba.peer_writes(), 0, "restart over a matching kernel");
    let seen = mon.barrier();
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("fd10:244:") || l.contains("flannel-v6")),
        "{seen:?}"
    );

    // Deleted behind our back: the periodic check puts each entry back.
    a.sh(&["ip", "-6", "route", "del", "fd10:244:0:2::/64"]);
    a.sh(&[
        "ip",
        "-6",
        "neigh",
        "del",
        "fd10:244:0:2::",
        "dev",
        "flannel-v6.1",
    ]);
    a.sh(&[
        "bridge",
        "fdb",
        "del",
        &mac6b,
        "dev",
        "flannel-v6.1",
        "dst",
        "fd18::2",
    ]);
    ba.resync().await.unwrap();
    assert_eq!(
        lines_with(&a.sh(&["ip", "-d", "-6", "route", "show", "table", "all"]), "fd10:244:0:2"),
        vec!["unicast fd10:244:0:2::/64 via fd10:244:0:2:: dev flannel-v6.1 table main proto 70 scope global metric 1024 onlink pref medium"]
    );
    assert!(a
        .sh(&["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"])
        .contains(&format!("fd10:244:0:2:: lladdr {mac6b} PERMANENT")));
    assert!(a
        .sh(&["bridge", "fdb", "show", "dev", "flannel-v6.1"])
        .contains(&format!("{mac6b} dst fd18::2 self permanent")));
    assert!(pod_ping(&a.pod, "fd10:244:0:2::2"));

    // The device deleted: recreated with the same MAC by the resync.
    a.sh(&["ip", "link", "del", "flannel-v6.1"]);
    ba.resync().await.unwrap();
    assert!(a
        .sh(&["ip", "-d", "link", "show", "flannel-v6.1"])
        .contains(&format!("link/ether {mac6a} ")));
    assert!(
        pod_ping(&a.pod, "fd10:244:0:2::2"),
        "after the device came back"
    );

    // Lease deleted: the v6 neighbour, FDB entry and route go with the v4 ones.
    ba.apply(&[LeaseEvent::Removed(lb.clone())]).await.unwrap();
    assert!(!a.sh(&["ip", "-6", "route"]).contains("fd10:244:0:2::"));
    assert_eq!(
        a.sh(&[
            "ip",
            "-6",
            "neigh",
            "show",
            "dev",
            "flannel-v6.1",
            "nud",
            "permanent"
        ]),
        ""
    );
    assert!(lines_with(
        &a.sh(&["bridge", "fdb", "show", "dev", "flannel-v6.1"]),
        " dst "
    )
    .is_empty());
    assert!(!a.sh(&["ip", "route"]).contains("10.244.2.0"));
    // And a device made anew uses the MAC published before (kube annotation).
    drop(ba);
    a.sh(&["ip", "link", "del", "flannel-v6.1"]);
    let opts = BackendOptions {
        vtep_mac_v6: Some("0a:58:66:66:66:66".parse().unwrap()),
        ..Default::default()
    };
    let (_ba, la3) = started_dual(&a, 1, vx, opts).await;
    assert_eq!(mac6_of(&la3.attrs), "0a:58:66:66:66:66");
    assert_eq!(mac_of(&la3.attrs), mac_of(&la.attrs));
}

#[tokio::test]
async fn vxlan_dual_stack_direct_routing_v6() {
    let Some((mut a, mut b)) = hosts("vxlan_dual_stack_direct_routing_v6").await else {
        return;
    };
    dual_stack(&mut a, 1);
    dual_stack(&mut b, 2);
    let vx = r#"{"Type":"vxlan","DirectRouting":true}"#;
    let (mut ba, la) = started_dual(&a, 1, vx, BackendOptions::default()).await;
    let (mut bb, lb) = started_dual(&b, 2, vx, BackendOptions::default()).await;
    ba.reconcile(std::slice::from_ref(&lb)).await.unwrap();
    bb.reconcile(std::slice::from_ref(&la)).await.unwrap();
    let routes = a.sh(&["ip", "-d", "-6", "route", "show", "table", "all"]);
    assert_eq!(
        lines_with(&routes, "fd10:244:0:2"),
        vec!["unicast fd10:244:0:2::/64 via fd18::2 dev ua table main proto 70 scope global metric 1024 pref medium"],
        "{routes}"
    );
    assert_eq!(
        a.sh(&[
            "ip",
            "-6",
            "neigh",
            "show",
            "dev",
            "flannel-v6.1",
            "nud",
            "permanent"
        ]),
        ""
    );
    assert!(pod_ping(&a.pod, "fd10:244:0:2::2"));
    assert!(pod_ping(&b.pod, "fd10:244:0:1::2"));
    let w = ba.peer_writes();
    ba.resync().await.unwrap();
    assert_eq!(ba.peer_writes(), w);
}

const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;

/// An IPv6-only lease as the Kubernetes store builds it: the `0.0.0.0/0` IPv4
/// placeholder and the v6 pod CIDR `fd10:244:0:<n>::/64`.
fn v6_only_lease(attrs: &LeaseAttrs, public6: &str, n: u8) -> Lease {
    let mut attrs = attrs.clone();
    attrs.public_ipv6 = Some(public6.parse().unwrap());
    Lease {
        key: format!("0.0.0.0-0&fd10:244:0:{n}::-64").parse().unwrap(),
        attrs: attrs.into(),
        expiration: None,
    }
}

/// An IPv6-only backend on `h` (host number `n`, without an IPv4 address, as the
/// interface selection leaves it), registered and started.
async fn started_v6_only(h: &mut Host, n: u8) -> (VxlanBackend, Lease) {
    h.ext.addr = None;
    h.ext.public_ip = None;
    let cfg = flannel_core::NetworkConfig::parse(V6_ONLY).unwrap();
    let vx = r#"{"Type":"vxlan"}"#;
    let opts = BackendOptions::default();
    let mut be = VxlanBackend::new(&raw(vx), h.ext.clone(), h.nl.clone(), opts).unwrap();
    let attrs = be.register(&cfg).await.unwrap();
    let lease = v6_only_lease(&attrs, &format!("fd18::{n}"), n);
    be.start(&cfg, &lease).await.unwrap();
    (be, lease)
}

#[tokio::test]
async fn vxlan_ipv6_only_has_the_v6_device_alone() {
    let Some((mut a, mut b)) = hosts("vxlan_ipv6_only_has_the_v6_device_alone").await else {
        return;
    };
    dual_stack(&mut a, 1);
    dual_stack(&mut b, 2);
    let (mut ba, la) = started_v6_only(&mut a, 1).await;
    let (mut bb, lb) = started_v6_only(&mut b, 2).await;
    assert_eq!(
        lb.attrs.encode(),
        format!(
            r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::2","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            mac6_of(&lb.attrs)
        )
    );
    assert_eq!(ba.mtu(), 1430, "the v6 device is the only one pods cross");
    assert!(a.sh(&["ip", "-br", "link"]).contains("flannel-v6.1"));
    assert!(!a.sh(&["ip", "-br", "link"]).contains("flannel.1 "));
    // Two peers share the IPv4 placeholder: both are programmed, our own lease is not.
    let p3 = v6_only_lease(&lb.attrs, "fd18::2", 3);
    let mut p3_attrs = (*p3.attrs).clone();
    p3_attrs.backend_v6_data = Some(raw(r#"{"VNI":1,"VtepMAC":"0a:58:00:00:00:03"}"#));
    let p3 = Lease {
        attrs: p3_attrs.into(),
        ..p3
    };
    ba.reconcile(&[la.clone(), lb.clone(), p3.clone()])
        .await
        .unwrap();
    bb.reconcile(std::slice::from_ref(&la)).await.unwrap();
    let r6 = a.sh(&["ip", "-6", "route", "show", "proto", "70"]);
    assert_eq!(
        r6.lines().collect::<Vec<_>>(),
        vec![
            "fd10:244:0:2::/64 via fd10:244:0:2:: dev flannel-v6.1 metric 1024 onlink pref medium",
            "fd10:244:0:3::/64 via fd10:244:0:3:: dev flannel-v6.1 metric 1024 onlink pref medium",
        ],
        "{r6}"
    );
    assert!(a
        .sh(&["ip", "-4", "route", "show", "proto", "70"])
        .trim()
        .is_empty());
    assert!(
        pod_ping(&a.pod, "fd10:244:0:2::2"),
        "pod a -> pod b over v6"
    );
    assert!(
        pod_ping(&b.pod, "fd10:244:0:1::2"),
        "pod b -> pod a over v6"
    );
    let w = ba.peer_writes();
    ba.resync().await.unwrap();
    assert_eq!(ba.peer_writes(), w, "resync over a matching kernel");
    // One peer leaves: only its entries go.
    ba.apply(&[LeaseEvent::Removed(p3)]).await.unwrap();
    assert_eq!(
        a.sh(&["ip", "-6", "route", "show", "proto", "70"]).trim(),
        "fd10:244:0:2::/64 via fd10:244:0:2:: dev flannel-v6.1 metric 1024 onlink pref medium"
    );
    let neigh = a.sh(&[
        "ip",
        "-6",
        "neigh",
        "show",
        "dev",
        "flannel-v6.1",
        "nud",
        "permanent",
    ]);
    assert_eq!(
        neigh.trim(),
        format!("fd10:244:0:2:: lladdr {} PERMANENT", mac6_of(&lb.attrs))
    );
}
