//! A two-host lab for backend tests: hosts `a` and `b` (network namespaces) on one
//! veth "underlay" (198.18.0.1/24 and 198.18.0.2/24), each with a pod namespace
//! behind a veth (pod subnet x.1 on the host side, x.2 in the pod).

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use flannel_backend::ExternalInterface;
use flannel_core::{Lease, LeaseAttrs, NetworkConfig};
use flannel_net::Netlink;
use flannel_testkit::{veth_pair, Monitor, TestNetns};

pub const NETWORK: &str = "10.244.0.0/16";

pub fn config(backend: &str) -> NetworkConfig {
    NetworkConfig::parse(&format!(r#"{{"Network":"{NETWORK}","Backend":{backend}}}"#)).unwrap()
}

pub struct Host {
    pub ns: TestNetns,
    pub nl: Netlink,
    pub ext: ExternalInterface,
    pub pod: TestNetns,
    /// e.g. 10.244.1.0/24
    pub subnet: String,
    pub pod_ip: String,
}

impl Host {
    pub fn lease(&self, attrs: &LeaseAttrs) -> Lease {
        let key = format!("{}-24", self.subnet.trim_end_matches("/24"));
        Lease {
            key: key.parse().unwrap(),
            attrs: attrs.clone().into(),
            expiration: None,
        }
    }

    pub fn sh(&self, args: &[&str]) -> String {
        self.ns.run(args).unwrap()
    }
}

/// Hosts a (198.18.0.1, pods 10.244.<sa>.0/24) and b (198.18.0.2, 10.244.<sb>.0/24).
pub async fn two_hosts(sa: u8, sb: u8) -> (Host, Host) {
    let a = TestNetns::new("ha").unwrap();
    let b = TestNetns::new("hb").unwrap();
    veth_pair(&a, "ua", &b, "ub").unwrap();
    let ha = host(a, "ua", "198.18.0.1", sa).await;
    let hb = host(b, "ub", "198.18.0.2", sb).await;
    (ha, hb)
}

async fn host(ns: TestNetns, ifname: &str, addr: &str, s: u8) -> Host {
    ns.run(&["ip", "addr", "add", &format!("{addr}/24"), "dev", ifname])
        .unwrap();
    ns.run(&["ip", "link", "set", ifname, "up"]).unwrap();
    ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    let pod = TestNetns::new("pod").unwrap();
    veth_pair(&ns, "pod0", &pod, "eth0").unwrap();
    let gw = format!("10.244.{s}.1");
    let pod_ip = format!("10.244.{s}.2");
    ns.run(&["ip", "addr", "add", &format!("{gw}/24"), "dev", "pod0"])
        .unwrap();
    ns.run(&["ip", "link", "set", "pod0", "up"]).unwrap();
    pod.run(&["ip", "addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])
        .unwrap();
    pod.run(&["ip", "link", "set", "eth0", "up"]).unwrap();
    pod.run(&["ip", "route", "add", "default", "via", &gw])
        .unwrap();
    let nl = ns.netlink().await.unwrap();
    let l = nl.link_by_name(ifname).await.unwrap().unwrap();
    let ip: Ipv4Addr = addr.parse().unwrap();
    Host {
        ext: ExternalInterface {
            name: ifname.into(),
            index: l.index,
            mtu: l.mtu,
            addr: Some(ip),
            public_ip: Some(ip),
            addr6: None,
            public_ipv6: None,
        },
        ns,
        nl,
        pod,
        subnet: format!("10.244.{s}.0/24"),
        pod_ip,
    }
}

/// Pings `dst` from the pod namespace until one reply arrives (up to ~20 s).
pub fn pod_ping(from: &TestNetns, dst: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(o) = from.exec(&["ping", "-c", "1", "-W", "1", dst]) {
            if o.status.success() {
                return true;
            }
        }
    }
    false
}

/// A single ping attempt (for "must not work" checks, after a positive check
/// showed the path works in principle).
pub fn ping_once(from: &TestNetns, dst: &str) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "1", dst])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Polls `f` until it returns true (up to flannel_testkit's default wait).
pub fn eventually(f: impl FnMut() -> bool) -> bool {
    flannel_testkit::eventually(flannel_testkit::wait::DEFAULT_WAIT, f)
}

/// `ip monitor` of routes, neighbours, links and addresses in `ns`; bracket the
/// interesting window with [`Monitor::barrier`].
pub fn monitor(ns: &TestNetns) -> Monitor {
    Monitor::start(ns.name(), &["route", "neigh", "link", "address"]).expect("start ip monitor")
}
