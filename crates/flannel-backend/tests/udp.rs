//! udp backend in two namespaces, through the `Backend` trait: lease attributes,
//! flannel0 as upstream leaves it, pods talking, peer removal, recreation of a
//! deleted device by resync, persistence and cleanup.

mod common;

use common::*;
use flannel_backend::udp::UdpBackend;
use flannel_backend::Backend;
use flannel_core::{LeaseAttrs, LeaseEvent};
use flannel_testkit::privileged;
use serde_json::value::RawValue;

const CFG: &str = r#"{"Type":"udp"}"#;

async fn backend(h: &Host) -> (UdpBackend, LeaseAttrs) {
    let raw = RawValue::from_string(CFG.to_string()).unwrap();
    let mut be = UdpBackend::new(&raw, h.ext.clone(), h.nl.clone()).unwrap();
    let attrs = be.register(&config(CFG)).await.unwrap();
    (be, attrs)
}

fn ping_once(h: &Host, dst: &str) -> bool {
    h.pod
        .exec(&["ping", "-c", "1", "-W", "1", dst])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn udp_pods_talk_through_flannel0() {
    if !privileged("udp_pods_talk_through_flannel0") {
        return;
    }
    let (a, b) = two_hosts(1, 2).await;
    let (mut ba, attrs_a) = backend(&a).await;
    let (mut bb, attrs_b) = backend(&b).await;
    // Only PublicIP: no BackendType, no BackendData (docs/compatibility.md, "udp device
    // and wire format").
    assert_eq!(
        attrs_a.encode(),
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#
    );
    assert_eq!(ba.mtu(), a.ext.mtu - 28);
    let (la, lb) = (a.lease(&attrs_a), b.lease(&attrs_b));
    ba.start(&config(CFG), &la).await.unwrap();
    bb.start(&config(CFG), &lb).await.unwrap();
    ba.reconcile(std::slice::from_ref(&lb)).await.unwrap();
    bb.reconcile(std::slice::from_ref(&la)).await.unwrap();
    assert!(pod_ping(&a.pod, &b.pod_ip));
    assert!(pod_ping(&b.pod, &a.pod_ip));

    // Appendix A.3: the device, its /32 and the network route.
    let link = a.sh(&["ip", "-d", "link", "show", "flannel0"]);
    assert!(
        link.contains("mtu 1472") && link.contains("tun type tun pi off"),
        "{link}"
    );
    let addr = a.sh(&["ip", "-4", "addr", "show", "flannel0"]);
    assert!(
        addr.contains("inet 10.244.1.0/32 scope global flannel0"),
        "{addr}"
    );
    let routes = a.sh(&["ip", "route", "show", "dev", "flannel0"]);
    assert!(routes.contains("10.244.0.0/16 proto 70"), "{routes}");
    let stats = ba.packet_stats().expect("udp has counters")();
    assert!(stats.tx_packets > 0 && stats.rx_packets > 0, "{stats:?}");
    assert!(stats
        .drops
        .iter()
        .any(|(k, _)| *k == "rx_drop_spoofed_source"));

    // The peer leaves: its pods are unreachable.
    ba.apply(&[LeaseEvent::Removed(lb.clone())]).await.unwrap();
    assert!(!ping_once(&a, &b.pod_ip));

    // Someone deletes flannel0: resync recreates it with address, route and peers.
    ba.apply(&[LeaseEvent::Added(lb.clone())]).await.unwrap();
    a.sh(&["ip", "link", "del", "flannel0"]);
    ba.resync().await.unwrap();
    let addr = a.sh(&["ip", "-4", "addr", "show", "flannel0"]);
    assert!(addr.contains("10.244.1.0/32"), "{addr}");
    assert!(pod_ping(&a.pod, &b.pod_ip));

    // The device outlives the backend (restart without a gap); cleanup removes it.
    drop(ba);
    assert!(a.sh(&["ip", "-o", "link"]).contains("flannel0"));
    let removed = flannel_net::netns::run_in_netns(&a.ns.path(), flannel_backend::udp::cleanup)
        .unwrap()
        .unwrap();
    assert!(removed);
    assert!(!a.sh(&["ip", "-o", "link"]).contains("flannel0"));
}
