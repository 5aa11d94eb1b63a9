//! Kernel tests: two hosts in namespaces, each running the udp data path with the
//! other as its peer, a pod behind each. Root only (skipped otherwise, failed with
//! FLANNEL_E2E=1).

mod common;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use common::*;
use flannel_udp::{csum, packet, CounterValues, DataPath, Mode};

fn counters(dp: &DataPath) -> CounterValues {
    dp.counters().values()
}

fn assert_no_security_drops(c: &CounterValues) {
    assert_eq!(c.rx_drop_unknown_peer, 0, "{c:?}");
    assert_eq!(c.rx_drop_spoofed_source, 0, "{c:?}");
    assert_eq!(c.rx_drop_malformed, 0, "{c:?}");
}

#[test]
fn offload_path_carries_ping_and_tcp_both_ways() {
    if !prerequisites(&["ip", "ping", "iperf3"]) {
        return;
    }
    let mut lab = Lab::new();
    let dpa = start_datapath(&lab.a, config('a', Mode::Offload), peers_of('a'));
    let dpb = start_datapath(&lab.b, config('b', Mode::Offload), peers_of('b'));
    assert!(dpa.features().vnet_hdr);
    assert!(lab.wait_ping(&lab.pa, B_POD), "pod A cannot reach pod B");
    // TTL chain as upstream: 64 from the pod, -1 per kernel forward, -1 per
    // flanneld hop: the reply arrives with 60 (Appendix A.3).
    let (ok, out) = lab.ping(&lab.pa, B_POD, 5);
    assert!(ok, "{out}");
    assert!(out.contains("ttl=60"), "{out}");
    let (ok, out) = lab.ping(&lab.pb, A_POD, 5);
    assert!(ok && out.contains("ttl=60"), "{out}");

    let pa = lab.pa.clone();
    let pb = lab.pb.clone();
    let ab = lab.iperf(&pa, &pb, B_POD, 2, 1);
    let ba = lab.iperf(&pb, &pa, A_POD, 2, 4);
    assert!(ab > 0.0 && ba > 0.0, "iperf3 {ab} {ba}");
    let (ca, cb) = (counters(&dpa), counters(&dpb));
    assert!(
        ca.tx_packets > 1000 && cb.rx_packets > 1000,
        "{ca:?} {cb:?}"
    );
    assert!(
        cb.tx_packets > 1000 && ca.rx_packets > 1000,
        "{ca:?} {cb:?}"
    );
    assert_no_security_drops(&ca);
    assert_no_security_drops(&cb);

    // A destination no peer leases: upstream answers ICMP net-unreachable into
    // the TUN (not for ICMP offenders, so send UDP).
    in_netns(&lab.pa, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"x", "10.244.99.1:9").unwrap();
    });
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = counters(&dpa);
            c.tx_drop_no_route >= 1 && c.tx_icmp_unreachable >= 1
        }),
        "{:?}",
        counters(&dpa)
    );
}

#[test]
fn plain_mode_interoperates_with_offload_mode() {
    if !prerequisites(&["ip", "ping", "iperf3"]) {
        return;
    }
    let mut lab = Lab::new();
    let dpa = start_datapath(&lab.a, config('a', Mode::Offload), peers_of('a'));
    let dpb = start_datapath(&lab.b, config('b', Mode::Plain), peers_of('b'));
    let fb = dpb.features();
    assert!(
        !fb.vnet_hdr && !fb.udp_gso && !fb.udp_gro && fb.queues == 1,
        "{fb:?}"
    );
    assert!(lab.wait_ping(&lab.pa, B_POD));
    let (ok, out) = lab.ping(&lab.pb, A_POD, 5);
    assert!(ok && out.contains("ttl=60"), "{out}");
    let pa = lab.pa.clone();
    let pb = lab.pb.clone();
    // Offload sender → plain receiver (GSO batches must arrive as single
    // datagrams), and plain sender → offload receiver (GRO + coalescing).
    assert!(lab.iperf(&pa, &pb, B_POD, 2, 1) > 0.0);
    assert!(lab.iperf(&pb, &pa, A_POD, 2, 2) > 0.0);
    let (ca, cb) = (counters(&dpa), counters(&dpb));
    assert!(
        cb.rx_packets > 1000 && ca.rx_packets > 1000,
        "{ca:?} {cb:?}"
    );
    assert_no_security_drops(&ca);
    assert_no_security_drops(&cb);
}

/// An inner IPv4/ICMP echo request `src` → `dst` with `ttl`, valid checksums.
fn inner_packet(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0x12,
        0x34, 0, 1,
    ];
    p.extend_from_slice(&[0xab; 24]);
    let len = p.len() as u16;
    packet::put16(&mut p, 2, len);
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = csum::ipv4_header(&p[..20]);
    packet::put16(&mut p, 10, c);
    let c = csum::finish(csum::add(0, &p[20..]));
    packet::put16(&mut p, 22, c);
    p
}

#[test]
fn hostile_datagrams_are_dropped_and_counted() {
    if !prerequisites(&["ip", "ping"]) {
        return;
    }
    let lab = Lab::new();
    let _dpa = start_datapath(&lab.a, config('a', Mode::Offload), peers_of('a'));
    let dpb = start_datapath(&lab.b, config('b', Mode::Offload), peers_of('b'));
    assert!(lab.wait_ping(&lab.pa, B_POD));
    // A second address on host A that is no peer's public IP.
    run(&[
        "ip",
        "-n",
        &lab.a,
        "addr",
        "add",
        "198.18.0.3/24",
        "dev",
        "va",
    ]);
    let before = counters(&dpb);

    let pod_a: Ipv4Addr = A_POD.parse().unwrap();
    let pod_b: Ipv4Addr = B_POD.parse().unwrap();
    let good = inner_packet(pod_a, pod_b, 62);
    let target = "198.18.0.2:8285";
    in_netns(&lab.a, || {
        let peer = UdpSocket::bind("198.18.0.1:0").unwrap();
        let stranger = UdpSocket::bind("198.18.0.3:0").unwrap();
        // Malformed: junk, not IPv4, a truncated packet, trailing bytes, a
        // corrupted header checksum, an empty datagram.
        peer.send_to(b"junk", target).unwrap();
        peer.send_to(&[0x60; 48], target).unwrap();
        peer.send_to(&good[..30], target).unwrap();
        let mut long = good.clone();
        long.extend_from_slice(&[0; 8]);
        peer.send_to(&long, target).unwrap();
        let mut bad = good.clone();
        bad[10] ^= 0xff;
        peer.send_to(&bad, target).unwrap();
        peer.send_to(&[], target).unwrap();
        // Spoofed inner source (outside the peer's 10.244.1.0/24).
        peer.send_to(
            &inner_packet(Ipv4Addr::new(10, 244, 7, 7), pod_b, 62),
            target,
        )
        .unwrap();
        // Outer source that is not a peer.
        stranger.send_to(&good, target).unwrap();
        // TTL that runs out at the receiver.
        peer.send_to(&inner_packet(pod_a, pod_b, 1), target)
            .unwrap();
        // And one good packet, which must get through.
        peer.send_to(&good, target).unwrap();
    });
    let want = |c: &CounterValues| {
        c.rx_drop_malformed - before.rx_drop_malformed == 6
            && c.rx_drop_spoofed_source - before.rx_drop_spoofed_source == 1
            && c.rx_drop_unknown_peer - before.rx_drop_unknown_peer == 1
            && c.rx_drop_ttl - before.rx_drop_ttl == 1
            && c.rx_packets > before.rx_packets
    };
    assert!(
        eventually(Duration::from_secs(10), || want(&counters(&dpb))),
        "before {before:?} after {:?}",
        counters(&dpb)
    );
    // The path still works.
    let (ok, out) = lab.ping(&lab.pa, B_POD, 3);
    assert!(ok, "{out}");
}

fn node_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flannel-udp-node")
}

/// Waits for the node's "ready" line and returns it.
fn ready_line(lab: &mut Lab, pid: u32) -> String {
    let mut child = lab.take_child(pid).expect("child");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("ready") {
                let _ = tx.send(line);
            }
        }
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = child.kill();
        let o = child.wait_with_output();
        panic!("node never became ready: {o:?}")
    };
    lab.adopt(child);
    line
}

fn ifindex(lab: &Lab, ns: &str) -> Option<String> {
    let out = lab.exec(ns, &["cat", "/sys/class/net/flannel0/ifindex"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn persistent_device_and_keeper_survive_kill_9() {
    if !prerequisites(&["ip", "ping"]) {
        return;
    }
    let mut lab = Lab::new();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let mut args_a = vec![node_bin().to_string(), "--keeper".into()];
    args_a.extend(node_args('a', "offload"));
    let mut args_b = vec![node_bin().to_string()];
    args_b.extend(node_args('b', "offload"));
    fn argv(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let pid_a = lab.spawn(&a, &argv(&args_a));
    let first = ready_line(&mut lab, pid_a);
    assert_eq!(field(&first, "inherited"), Some("false"), "{first}");
    let keeper: u32 = field(&first, "keeper")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no keeper in {first}"));
    let pid_b = lab.spawn(&b, &argv(&args_b));
    ready_line(&mut lab, pid_b);
    assert!(lab.wait_ping(&lab.pa, B_POD));
    let index = ifindex(&lab, &a).expect("flannel0 exists");

    // SIGKILL: nothing runs on the way out.
    lab.kill(pid_a);
    // Device, address and route stay.
    assert_eq!(ifindex(&lab, &a).as_deref(), Some(index.as_str()));
    let routes = lab.exec(&a, &["ip", "route", "show", "dev", "flannel0"]);
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(routes.contains("10.244.0.0/16"), "{routes}");
    assert!(std::path::Path::new(&format!("/proc/{keeper}")).exists());

    let pid_a2 = lab.spawn(&a, &argv(&args_a));
    let second = ready_line(&mut lab, pid_a2);
    assert_eq!(field(&second, "inherited"), Some("true"), "{second}");
    assert_eq!(ifindex(&lab, &a).as_deref(), Some(index.as_str()));
    assert!(lab.wait_ping(&lab.pa, B_POD));
    let (ok, out) = lab.ping(&lab.pb, A_POD, 3);
    assert!(ok, "{out}");

    // Cleanup removes the device, and the keeper goes with it.
    lab.kill(pid_a2);
    let out = lab.exec(&a, &[node_bin(), "--cleanup"]);
    assert!(out.status.success(), "{out:?}");
    assert!(ifindex(&lab, &a).is_none(), "flannel0 still there");
    assert!(
        eventually(Duration::from_secs(20), || {
            let stat = std::fs::read_to_string(format!("/proc/{keeper}/stat")).unwrap_or_default();
            stat.is_empty() || stat.contains(") Z ")
        }),
        "keeper {keeper} still running"
    );
}
