//! End to end: `--ip-masq` for IPv6 in a dual-stack host-gw cluster, in iptables
//! mode and in nftables mode, with the etcd subnet manager and with the Kubernetes
//! one (`--kube-subnet-mgr` against the fake API server, nodes with an IPv4 and an
//! IPv6 `podCIDRs` entry).
//!
//! An "outside" namespace of the lab joins the underlay bridge with an IPv6 address
//! and no route to the pod network: a pod's connection there only works if it
//! leaves its host masqueraded, and the listener there records the address it came
//! from, which must be the host's IPv6 underlay address. Pod-to-pod traffic across
//! hosts keeps the pods' addresses. The v6 rules are the v4 rules with the v6
//! networks, in the same order; `flanneld --cleanup` removes them.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::kube_fake::{node_name, KubeFake};
use flannel_lab::lab::UNDERLAY_V6_PREFIX_LEN;
use flannel_lab::Lab;
use flannel_net::netns::{netns_path, run_in_netns, spawn_in_netns, NetnsError};

const DEADLINE: Duration = Duration::from_secs(90);
/// The outside namespace's address on the underlay (no flannel host has it).
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0xfd18, 0x198, 0x18, 0, 0, 0, 0, 0x99);
const V4_NET: &str = "10.244.0.0/16";
const V6_NET: &str = "fd10:244::/56";

fn config(nft: bool) -> String {
    format!(
        r#"{{"Network":"{V4_NET}","EnableIPv6":true,"IPv6Network":"{V6_NET}","IPv6SubnetLen":64,"EnableNFTables":{nft},"Backend":{{"Type":"host-gw"}}}}"#
    )
}

/// Where the leases come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Etcd,
    /// `--kube-subnet-mgr`: the nodes' pod CIDRs are [`KUBE_POD_CIDRS`].
    Kube,
}

/// Per host its `podCIDRs`, as kube-controller-manager gives them with
/// `--cluster-cidr=10.244.0.0/16,fd10:244::/56`.
const KUBE_POD_CIDRS: [[&str; 2]; 2] = [
    ["10.244.11.0/24", "fd10:244:0:11::/64"],
    ["10.244.22.0/24", "fd10:244:0:22::/64"],
];

#[test]
fn iptables_mode_v6_masquerade_outward_pod_addresses_inside_cleanup() {
    scenario("v6 masquerade (iptables)", false, Store::Etcd);
}

#[test]
fn nftables_mode_v6_masquerade_outward_pod_addresses_inside_cleanup() {
    scenario("v6 masquerade (nftables)", true, Store::Etcd);
}

#[test]
fn kube_iptables_mode_v6_masquerade_outward_pod_addresses_inside_cleanup() {
    scenario("kube v6 masquerade (iptables)", false, Store::Kube);
}

#[test]
fn kube_nftables_mode_v6_masquerade_outward_pod_addresses_inside_cleanup() {
    scenario("kube v6 masquerade (nftables)", true, Store::Kube);
}

// ----- sockets inside namespaces (dedicated std threads, never the test's own) -----

/// One TCP round trip from namespace `ns` to `to`: a byte out, the answer back.
fn connect_from(ns: &str, to: SocketAddr) -> io::Result<()> {
    run_in_netns(&netns_path(ns), move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    })
    .map_err(io::Error::other)?
}

/// A TCP listener inside a namespace that records every peer address.
struct PeerRecorder {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl PeerRecorder {
    fn start(ns: &str, addr: SocketAddr) -> PeerRecorder {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<io::Result<()>>();
        let (p, s) = (peers.clone(), stop.clone());
        let thread = spawn_in_netns(&netns_path(ns), move || {
            let l = match TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut conn, peer)) => {
                        p.lock().unwrap().push(peer);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut b = [0u8; 1];
                        if conn.read_exact(&mut b).is_ok() {
                            let _ = conn.write_all(b"y");
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
        .expect("listener thread");
        rx.recv_timeout(DEADLINE)
            .expect("listener start")
            .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"));
        PeerRecorder {
            peers,
            stop,
            thread: Some(thread),
        }
    }

    fn peer_ips(&self) -> BTreeSet<IpAddr> {
        self.peers.lock().unwrap().iter().map(|a| a.ip()).collect()
    }
}

impl Drop for PeerRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ----- the lab -----

/// Adds namespace `<prefix>-o6` on the underlay bridge with [`OUTSIDE6`] and no
/// other route. The name starts with the lab's prefix, so the lab's teardown
/// removes it (and its veth).
fn add_outside(lab: &Lab) -> String {
    let ns = format!("{}-o6", lab.prefix());
    let (ul, ol) = (
        format!("{}uo", lab.link_tag()),
        format!("{}ox", lab.link_tag()),
    );
    let br = format!("{}br", lab.link_tag());
    let under = lab.under_ns().to_string();
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    // Made inside the underlay namespace with the peer moved straight into the new
    // one: no end of the pair ever exists in the root namespace.
    ip(&[
        "-n", &under, "link", "add", &ul, "type", "veth", "peer", "name", &ol, "netns", &ns,
    ]);
    ip(&["-n", &under, "link", "set", &ul, "master", &br, "up"]);
    let cidr = format!("{OUTSIDE6}/{UNDERLAY_V6_PREFIX_LEN}");
    ip(&["-n", &ns, "addr", "add", &cidr, "dev", &ol, "nodad"]);
    ip(&["-n", &ns, "link", "set", &ol, "up"]);
    ns
}

fn text(out: std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `FLANNEL_SUBNET` / `FLANNEL_IPV6_SUBNET` networks of host `h`'s subnet.env.
fn subnets(lab: &Lab, h: usize) -> (String, String) {
    let t = std::fs::read_to_string(lab.hosts()[h].subnet_file()).unwrap();
    let get = |k: &str| -> String {
        let v = t
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {t}"));
        let n: ipnet::IpNet = v.parse().unwrap();
        n.trunc().to_string()
    };
    (get("FLANNEL_SUBNET="), get("FLANNEL_IPV6_SUBNET="))
}

/// The IPv6 form of one of host `h`'s IPv4 rule lines.
fn to_v6(line: &str, s4: &str, s6: &str) -> String {
    line.replace(V4_NET, V6_NET)
        .replace(s4, s6)
        .replace("224.0.0.0/4", "ff00::/8")
        .replace("ip saddr", "ip6 saddr")
        .replace("ip daddr", "ip6 daddr")
}

/// The flannel rule lines of one family, in order: `iptables-save` / `ip6tables-save`
/// lines naming flannel's chains, or the statements of nft table `flannel-ipv4/6`.
fn rule_lines(lab: &Lab, h: usize, nft: bool, v6: bool) -> Vec<String> {
    let ns = lab.hosts()[h].ns.clone();
    if nft {
        let (fam, table) = if v6 {
            ("ip6", "flannel-ipv6")
        } else {
            ("ip", "flannel-ipv4")
        };
        let out = lab
            .exec_in(&ns, &["nft", "list", "table", fam, table])
            .unwrap();
        text(out)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("table") && !l.starts_with("comment"))
            .map(str::to_string)
            .collect()
    } else {
        let bin = if v6 {
            "ip6tables-save"
        } else {
            "iptables-save"
        };
        text(lab.exec_in(&ns, &[bin]).unwrap())
            .lines()
            .filter(|l| l.starts_with("-A ") && l.contains("FLANNEL-"))
            .map(str::to_string)
            .collect()
    }
}

/// A two-host dual-stack lab with both agents running (`--ip-masq`), its leases
/// from `store`; the fake API server with it in Kubernetes mode (keep it alive).
fn start_lab(nft: bool, store: Store) -> (Lab, Option<KubeFake>) {
    let mut lab = Lab::builder()
        .hosts(2)
        .ipv6(true)
        .config_json(&config(nft))
        .ip_masq(true)
        .start_agents(store == Store::Etcd)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    if store == Store::Etcd {
        return (lab, None);
    }
    let fake = KubeFake::start(&mut lab, &config(nft)).expect("fake API server");
    for (h, cidrs) in KUBE_POD_CIDRS.iter().enumerate() {
        fake.create_node(&node_name(h), cidrs).expect("create node");
    }
    for h in 0..2 {
        lab.start_agent(h).expect("flanneld");
    }
    for (h, [c4, c6]) in KUBE_POD_CIDRS.iter().enumerate() {
        // The subnets are the nodes' pod CIDRs, not an allocation from etcd.
        let (s4, s6) = subnets(&lab, h);
        assert_eq!((s4.as_str(), s6.as_str()), (*c4, *c6), "host {h}");
    }
    (lab, Some(fake))
}

fn scenario(what: &str, nft: bool, store: Store) {
    let tools = ["nft", "iptables-save", "ip6tables-save"];
    if !ready_with(what, Needs::Agents, &tools) {
        return;
    }
    let (mut lab, _fake) = start_lab(nft, store);
    let outside = add_outside(&lab);
    let pods: Vec<_> = (0..2).map(|h| lab.add_pod(h).expect("pod")).collect();
    let pod = |i: usize| lab.pod(pods[i]).unwrap().clone();
    let (p1, p2) = (pod(0), pod(1));
    let (ip1, ip2) = (p1.ip6.expect("pod v6"), p2.ip6.expect("pod v6"));

    // Rules: the v6 set is the v4 set with the v6 networks, in the same order.
    for h in 0..2 {
        let (s4, s6) = subnets(&lab, h);
        let v4 = rule_lines(&lab, h, nft, false);
        let v6 = rule_lines(&lab, h, nft, true);
        assert!(
            v4.iter()
                .filter(|l| l.contains("masquerade") || l.contains("MASQUERADE"))
                .count()
                == 2,
            "host {h}: {v4:#?}"
        );
        let want: Vec<String> = v4.iter().map(|l| to_v6(l, &s4, &s6)).collect();
        assert_eq!(v6, want, "host {h}: v6 rules against the v4 ones");
        if !nft {
            // The POSTROUTING jump is first in its chain in both families.
            let ns = lab.hosts()[h].ns.clone();
            let save = text(lab.exec_in(&ns, &["ip6tables-save", "-t", "nat"]).unwrap());
            let first = save
                .lines()
                .find(|l| l.starts_with("-A POSTROUTING"))
                .unwrap_or("");
            assert!(first.ends_with("-j FLANNEL-POSTRTG"), "{save}");
        }
    }

    // Pod to pod over IPv6: the pods' own addresses arrive.
    lab.wait_reachable_ip(pods[0], ip2.into()).unwrap();
    lab.wait_reachable_ip(pods[1], ip1.into()).unwrap();
    let at2 = PeerRecorder::start(&p2.ns, SocketAddrV6::new(ip2, 8081, 0, 0).into());
    let at1 = PeerRecorder::start(&p1.ns, SocketAddrV6::new(ip1, 8081, 0, 0).into());
    connect_from(&p1.ns, SocketAddrV6::new(ip2, 8081, 0, 0).into()).expect("pod1 -> pod2");
    connect_from(&p2.ns, SocketAddrV6::new(ip1, 8081, 0, 0).into()).expect("pod2 -> pod1");
    assert_eq!(at2.peer_ips(), BTreeSet::from([IpAddr::V6(ip1)]));
    assert_eq!(at1.peer_ips(), BTreeSet::from([IpAddr::V6(ip2)]));

    // Pod to the outside: the host's IPv6 underlay address arrives (the outside has
    // no route back to a pod address).
    let to_outside: SocketAddr = SocketAddrV6::new(OUTSIDE6, 8080, 0, 0).into();
    let rec = PeerRecorder::start(&outside, to_outside);
    for (i, p) in [&p1, &p2].into_iter().enumerate() {
        lab.wait_reachable_ip(pods[i], OUTSIDE6.into()).unwrap();
        connect_from(&p.ns, to_outside).expect("pod -> outside over TCP");
    }
    let hosts6: BTreeSet<IpAddr> = lab
        .hosts()
        .iter()
        .map(|h| IpAddr::V6(h.ip6.unwrap()))
        .collect();
    assert_eq!(
        rec.peer_ips(),
        hosts6,
        "masqueraded as the hosts' v6 addresses"
    );

    // --cleanup removes the v6 rules (and the v4 ones) of host 1.
    lab.stop_agent(0).unwrap();
    let host = &lab.hosts()[0];
    let flanneld = flannel_lab::bins::find_binary("flanneld").unwrap();
    let out = lab
        .exec_in(
            &host.ns,
            &[
                &flanneld.display().to_string(),
                "--cleanup",
                &format!("--subnet-file={}", host.subnet_file().display()),
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "--cleanup: {}{}",
        text(out.clone()),
        String::from_utf8_lossy(&out.stderr)
    );
    let ns = host.ns.clone();
    let ip6t = text(lab.exec_in(&ns, &["ip6tables-save"]).unwrap());
    assert!(!ip6t.contains("FLANNEL-"), "after --cleanup: {ip6t}");
    let tables = text(lab.exec_in(&ns, &["nft", "list", "tables"]).unwrap());
    assert!(!tables.contains("flannel-ipv"), "after --cleanup: {tables}");
    let r6 = lab
        .ip_in(&ns, &["-6", "route", "show", "proto", "70"])
        .unwrap();
    assert!(r6.trim().is_empty(), "after --cleanup: {r6}");
}
