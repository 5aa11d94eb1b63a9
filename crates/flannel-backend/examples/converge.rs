//! Convergence micro-benchmark (not a test): programs N peers with the vxlan and
//! host-gw backends inside a throw-away namespace and prints the time taken, the
//! time of a restart over that state, and the latency of single joins. As a
//! baseline measured in the same run, the same kernel entries are written with
//! `ip -batch` (iproute2, one request at a time) into a fresh namespace.
//!
//! `cargo run --release -p flannel-backend --example converge -- 1000 5000`
//! (root needed; all work happens in namespaces named fl-<pid>-*).

use std::io::Write;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use flannel_backend::host_gw::HostGwBackend;
use flannel_backend::vxlan::VxlanBackend;
use flannel_backend::{Backend, BackendOptions, ExternalInterface};
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, MacAddr, NetworkConfig, VxlanData};
use flannel_testkit::{veth_pair, TestNetns};
use serde_json::value::RawValue;

const JOINS: usize = 200;

fn peer(i: usize, ty: &str) -> Lease {
    let mut attrs = LeaseAttrs::new(public_ip(i));
    attrs.backend_type = ty.into();
    if ty == "vxlan" {
        attrs.backend_data = Some(
            VxlanData {
                vni: 1,
                vtep_mac: MacAddr([0x0a, 0x58, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            }
            .encode(),
        );
    }
    Lease {
        key: format!("10.{}.{}.0-24", i / 256, i % 256).parse().unwrap(),
        attrs: attrs.into(),
        expiration: None,
    }
}

fn public_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// A host namespace whose `ua` (198.18.0.1/15) reaches every peer address directly.
async fn host() -> (
    TestNetns,
    TestNetns,
    ExternalInterface,
    flannel_net::Netlink,
) {
    let a = TestNetns::new("bench").unwrap();
    let b = TestNetns::new("benchpeer").unwrap();
    veth_pair(&a, "ua", &b, "ub").unwrap();
    a.run(&["ip", "addr", "add", "198.18.0.1/15", "dev", "ua"])
        .unwrap();
    a.run(&["ip", "link", "set", "ua", "up"]).unwrap();
    b.run(&["ip", "link", "set", "ub", "up"]).unwrap();
    let nl = a.netlink().await.unwrap();
    let l = nl.link_by_name("ua").await.unwrap().unwrap();
    let ext = ExternalInterface {
        name: "ua".into(),
        index: l.index,
        mtu: 1500,
        addr: Some(Ipv4Addr::new(198, 18, 0, 1)),
        public_ip: Some(Ipv4Addr::new(198, 18, 0, 1)),
        addr6: None,
        public_ipv6: None,
    };
    (a, b, ext, nl)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn make(ty: &str, ext: &ExternalInterface, nl: &flannel_net::Netlink) -> Box<dyn Backend> {
    let raw = RawValue::from_string(format!(r#"{{"Type":"{ty}"}}"#)).unwrap();
    match ty {
        "vxlan" => Box::new(
            VxlanBackend::new(&raw, ext.clone(), nl.clone(), BackendOptions::default()).unwrap(),
        ),
        _ => Box::new(HostGwBackend::new(&raw, ext.clone(), nl.clone()).unwrap()),
    }
}

async fn run(ty: &str, n: usize) {
    let (_a, _b, ext, nl) = host().await;
    let config = NetworkConfig::parse(&format!(
        r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"{ty}"}}}}"#
    ))
    .unwrap();
    let own = Lease {
        key: "10.255.255.0-24".parse().unwrap(),
        attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 1)).into(),
        expiration: None,
    };
    let peers: Vec<Lease> = (0..n).map(|i| peer(i, ty)).collect();

    let mut be = make(ty, &ext, &nl).await;
    be.register(&config).await.unwrap();
    be.start(&config, &own).await.unwrap();
    let t = Instant::now();
    be.reconcile(&peers).await.unwrap();
    let full = t.elapsed();
    drop(be);

    // A restart over the programmed state (first Full update after a restart).
    let mut be = make(ty, &ext, &nl).await;
    be.register(&config).await.unwrap();
    be.start(&config, &own).await.unwrap();
    let t = Instant::now();
    be.reconcile(&peers).await.unwrap();
    let restart = t.elapsed();

    // Joins on top of N peers, one event at a time.
    let mut lat = Vec::with_capacity(JOINS);
    for j in 0..JOINS {
        let l = peer(n + j, ty);
        let t = Instant::now();
        be.apply(&[LeaseEvent::Added(l)]).await.unwrap();
        lat.push(t.elapsed());
    }
    let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
    // The periodic check over N + JOINS peers (nothing to repair).
    let t = Instant::now();
    be.resync().await.unwrap();
    let resync = t.elapsed();
    let kernel = ip_batch_baseline(ty, n);
    println!(
        "{ty:8} N={n:5}: program {:>9} | ip -batch baseline {:>9} | restart reconcile {:>8} | join p50 {:>7} p99 {:>7} | resync {:>7}",
        ms(full),
        ms(kernel),
        ms(restart),
        ms(p50),
        ms(p99),
        ms(resync)
    );
}

/// The same kernel entries written by iproute2 from a batch file.
fn ip_batch_baseline(ty: &str, n: usize) -> Duration {
    let ns = TestNetns::new("base").unwrap();
    ns.run(&[
        "ip", "link", "add", "ua", "type", "veth", "peer", "name", "ub",
    ])
    .unwrap();
    ns.run(&["ip", "addr", "add", "198.18.0.1/15", "dev", "ua"])
        .unwrap();
    ns.run(&["ip", "link", "set", "ua", "up"]).unwrap();
    ns.run(&["ip", "link", "set", "ub", "up"]).unwrap();
    let dir = std::env::temp_dir().join(format!("fl-converge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ipf, brf) = (dir.join("ip.batch"), dir.join("bridge.batch"));
    let mut ip = std::fs::File::create(&ipf).unwrap();
    let mut br = std::fs::File::create(&brf).unwrap();
    if ty == "vxlan" {
        ns.run(&[
            "ip",
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dev",
            "ua",
            "local",
            "198.18.0.1",
            "nolearning",
        ])
        .unwrap();
        ns.run(&["ip", "link", "set", "flannel.1", "up"]).unwrap();
        for i in 0..n {
            let mac = format!(
                "0a:58:00:{:02x}:{:02x}:{:02x}",
                (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8
            );
            let sub = format!("10.{}.{}.0", i / 256, i % 256);
            writeln!(
                ip,
                "neigh replace {sub} lladdr {mac} dev flannel.1 nud permanent"
            )
            .unwrap();
            writeln!(
                br,
                "fdb replace {mac} dev flannel.1 dst {} self permanent",
                public_ip(i)
            )
            .unwrap();
        }
        for i in 0..n {
            let sub = format!("10.{}.{}.0", i / 256, i % 256);
            writeln!(ip, "route replace {sub}/24 via {sub} dev flannel.1 onlink").unwrap();
        }
    } else {
        for i in 0..n {
            writeln!(
                ip,
                "route replace 10.{}.{}.0/24 via {} dev ua",
                i / 256,
                i % 256,
                public_ip(i)
            )
            .unwrap();
        }
    }
    drop((ip, br));
    let t = Instant::now();
    if ty == "vxlan" {
        ns.run(&["bridge", "-batch", &brf.display().to_string()])
            .unwrap();
    }
    ns.run(&["ip", "-batch", &ipf.display().to_string()])
        .unwrap();
    let took = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    took
}

#[tokio::main]
async fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("converge: needs root (it creates network namespaces)");
        std::process::exit(2);
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("peer counts must be integers"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 5000]
    } else {
        sizes
    };
    for n in sizes {
        assert!(n + JOINS < 60000, "at most ~60000 peers");
        for ty in ["vxlan", "host-gw"] {
            run(ty, n).await;
        }
    }
}
