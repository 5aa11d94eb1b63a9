//! End-to-end: flanneld's `--ip-masq` masquerade and forward rules, in iptables mode and
//! in nftables mode (`"EnableNFTables": true`), on real agents in a namespace lab.
//!
//! Host 1 gets an extra link into an "outside" namespace (203.0.113.0/24, TEST-NET-3)
//! that has no route back to the pod network: a pod's connection there only works if
//! it leaves host 1 masqueraded, and the TCP listener there records the address it
//! arrived from. Pod-to-pod traffic across hosts must keep the pods' addresses.
//! Then the agent on host 1 is restarted (SIGTERM + start) five times in a row while
//! the pod pings outward every 0.2 s and opens a new TCP connection every 0.2 s (each
//! a new conntrack entry, so each one needs the masquerade rule at that moment):
//! nothing may be lost.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::measure::{ping_gaps, ping_reply_seqs};
use flannel_lab::process::{Proc, ProcOutput};
use flannel_lab::{poll_until, Lab, PodId};
use flannel_net::netns::{netns_path, run_in_netns, spawn_in_netns, NetnsError};
use nix::sys::signal::Signal;

const DEADLINE: Duration = Duration::from_secs(90);
const RESTARTS: usize = 5;
/// Host 1's address on the outside link, and the outside namespace's.
const OUTSIDE_HOST_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

#[test]
fn iptables_mode_masquerades_outward_keeps_pod_addresses_and_survives_restarts() {
    masquerade_scenario("e2e_rules iptables", false);
}

#[test]
fn nftables_mode_masquerades_outward_keeps_pod_addresses_and_survives_restarts() {
    masquerade_scenario("e2e_rules nftables", true);
}

/// Besides what every lab test needs: the rule tools the checks below read with.
fn tools_ready(what: &str) -> bool {
    ready_with(what, Needs::Agents, &["nft", "iptables", "iptables-save"])
}

// ----- sockets inside namespaces (dedicated std threads, never the test's own) -----

/// Runs `f` on a fresh thread that first moves into network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    run_in_netns(&netns_path(ns), f).map_err(io::Error::other)?
}

/// One TCP connection from namespace `ns` to `to` (5 s connect timeout): sends a byte
/// and waits for the listener's one-byte answer, so success means the full round
/// trip worked.
fn connect_from(ns: &str, to: SocketAddrV4) -> io::Result<()> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    })
}

/// A TCP listener inside a namespace that records every peer address.
struct PeerRecorder {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl PeerRecorder {
    fn start(ns: &str, addr: SocketAddrV4) -> PeerRecorder {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<io::Result<()>>();
        let (p, s) = (peers.clone(), stop.clone());
        let thread = spawn_in_netns(&netns_path(ns), move || {
            let bound = TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let l = match bound {
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
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
        .expect("start the listener thread");
        rx.recv()
            .unwrap_or_else(|_| panic!("listener thread could not enter {ns}"))
            .unwrap_or_else(|e| panic!("listen on {addr} in {ns}: {e}"));
        PeerRecorder {
            peers,
            stop,
            thread: Some(thread),
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    fn peer_ips(&self) -> BTreeSet<std::net::IpAddr> {
        self.peers().iter().map(|p| p.ip()).collect()
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

/// Opens a new TCP connection from `ns` to `to` every 0.2 s until stopped; records
/// each attempt's outcome.
struct TcpProber {
    results: Arc<Mutex<Vec<Result<(), String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl TcpProber {
    fn start(ns: &str, to: SocketAddrV4) -> TcpProber {
        let results = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (results.clone(), stop.clone());
        let thread = spawn_in_netns(&netns_path(ns), move || {
            while !s.load(Ordering::Relaxed) {
                let outcome = (|| -> io::Result<()> {
                    let mut c =
                        TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5))?;
                    c.set_read_timeout(Some(Duration::from_secs(5)))?;
                    c.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    c.read_exact(&mut b)
                })();
                r.lock().unwrap().push(outcome.map_err(|e| e.to_string()));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .expect("start the prober thread");
        TcpProber {
            results,
            stop,
            thread: Some(thread),
        }
    }

    fn attempts(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    fn wait_attempts(&self, n: usize) {
        poll_until(
            &format!("{n} TCP probes"),
            DEADLINE,
            Duration::from_millis(100),
            || Ok(self.attempts() >= n),
        )
        .unwrap();
    }

    fn stop(mut self) -> Vec<Result<(), String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("prober thread")
                .expect("prober thread enters its namespace");
        }
        self.results.lock().unwrap().clone()
    }
}

impl Drop for TcpProber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A background `ping -i 0.2` whose output goes to a file.
struct BgPing {
    proc_: Proc,
    out: PathBuf,
}

impl BgPing {
    fn start(lab: &Lab, ns: &str, to: Ipv4Addr) -> BgPing {
        let out = lab.run_dir().join(format!("ping-{ns}-{to}.txt"));
        let proc_ = lab
            .spawn_in(
                ns,
                &["ping", "-n", "-i", "0.2", "-W", "2", &to.to_string()],
                ProcOutput::File(out.clone()),
            )
            .unwrap();
        BgPing { proc_, out }
    }
    fn replies(&self) -> BTreeSet<u32> {
        ping_reply_seqs(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }
    fn wait_replies(&self, n: usize) {
        poll_until(
            &format!("{n} replies in {}", self.out.display()),
            DEADLINE,
            Duration::from_millis(100),
            || Ok(self.replies().len() >= n),
        )
        .unwrap();
    }
    fn stop(mut self) -> BTreeSet<u32> {
        self.proc_.signal(Signal::SIGINT).unwrap();
        self.proc_.wait_timeout(DEADLINE);
        self.replies()
    }
}

// ----- the lab -----

/// Adds namespace `<prefix>-o` linked to host `h` by a veth (203.0.113.1 on the
/// host side, 203.0.113.2 outside). The name starts with the lab's prefix, so the
/// lab's teardown removes it (and the veth with it).
fn add_outside(lab: &Lab, h: usize) -> String {
    let ns = format!("{}-o", lab.prefix());
    let host = lab.hosts()[h].ns.clone();
    let (hl, ol) = (
        format!("{}o", lab.link_tag()),
        format!("{}x", lab.link_tag()),
    );
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
    // Made inside the host namespace with the peer moved straight out: no end of the
    // pair ever exists in the root namespace.
    ip(&[
        "-n", &host, "link", "add", &hl, "type", "veth", "peer", "name", &ol, "netns", &ns,
    ]);
    ip(&[
        "-n",
        &host,
        "addr",
        "add",
        &format!("{OUTSIDE_HOST_SIDE}/24"),
        "dev",
        &hl,
    ]);
    ip(&["-n", &host, "link", "set", &hl, "up"]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{OUTSIDE_ADDR}/24"),
        "dev",
        &ol,
    ]);
    ip(&["-n", &ns, "link", "set", &ol, "up"]);
    ns
}

fn text(out: std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks that host `h` has exactly one copy of the masquerade and forward sets, in
/// the engine the mode says, and nothing of the other engine.
fn assert_rules_in_engine(lab: &Lab, h: usize, nft: bool) {
    let ns = lab.hosts()[h].ns.clone();
    let ipt = text(lab.exec_in(&ns, &["iptables-save"]).unwrap());
    let tables = text(lab.exec_in(&ns, &["nft", "list", "tables"]).unwrap());
    if nft {
        assert!(
            !ipt.contains("FLANNEL-"),
            "nftables mode, but iptables holds flannel chains on {ns}:\n{ipt}"
        );
        let t = text(
            lab.exec_in(&ns, &["nft", "list", "table", "ip", "flannel-ipv4"])
                .unwrap(),
        );
        assert_eq!(
            t.matches("masquerade").count(),
            2,
            "nft table ip flannel-ipv4 on {ns}:\n{t}"
        );
        assert_eq!(t.matches("hook postrouting").count(), 1, "{t}");
        assert_eq!(t.matches("hook forward").count(), 1, "{t}");
    } else {
        assert!(
            !tables.contains("flannel-ipv"),
            "iptables mode, but nft tables of flannel exist on {ns}:\n{tables}"
        );
        let jumps = ipt
            .lines()
            .filter(|l| l.starts_with("-A POSTROUTING") && l.ends_with("-j FLANNEL-POSTRTG"))
            .count();
        let masq = ipt
            .lines()
            .filter(|l| l.starts_with("-A FLANNEL-POSTRTG") && l.contains("-j MASQUERADE"))
            .count();
        let fwd = ipt
            .lines()
            .filter(|l| l.starts_with("-A FORWARD") && l.ends_with("-j FLANNEL-FWD"))
            .count();
        assert_eq!(
            (jumps, masq, fwd),
            (1, 2, 1),
            "iptables-save on {ns}:\n{ipt}"
        );
    }
}

fn masquerade_scenario(what: &str, nft: bool) {
    if !tools_ready(what) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .nftables(nft)
        .ip_masq(true)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let outside = add_outside(&lab, 0);
    let pod1 = lab.add_pod(0).unwrap();
    let pod2 = lab.add_pod(1).unwrap();
    let ip = |lab: &Lab, p: PodId| lab.pod(p).unwrap().ip;
    let (ns1, ns2) = (
        lab.pod(pod1).unwrap().ns.clone(),
        lab.pod(pod2).unwrap().ns.clone(),
    );
    let (ip1, ip2) = (ip(&lab, pod1), ip(&lab, pod2));
    let (h1_ip, h2_ip) = (lab.hosts()[0].ip, lab.hosts()[1].ip);
    let h2_ns = lab.hosts()[1].ns.clone();
    for h in 0..2 {
        assert_rules_in_engine(&lab, h, nft);
        assert!(lab.subnet_file(h).unwrap().unwrap().ip_masq);
    }

    // Pod to pod, both ways: the pods' own addresses arrive.
    lab.wait_reachable(pod1, ip2).unwrap();
    lab.wait_reachable(pod2, ip1).unwrap();
    let at_pod2 = PeerRecorder::start(&ns2, SocketAddrV4::new(ip2, 8081));
    let at_pod1 = PeerRecorder::start(&ns1, SocketAddrV4::new(ip1, 8081));
    connect_from(&ns1, SocketAddrV4::new(ip2, 8081)).expect("pod1 -> pod2 over TCP");
    connect_from(&ns2, SocketAddrV4::new(ip1, 8081)).expect("pod2 -> pod1 over TCP");
    assert_eq!(at_pod2.peer_ips(), BTreeSet::from([ip1.into()]));
    assert_eq!(at_pod1.peer_ips(), BTreeSet::from([ip2.into()]));

    // Pod to an address outside the cluster network: the host's address arrives.
    // (a) the outside namespace, which could not even answer a pod address;
    let outside_rec = PeerRecorder::start(&outside, SocketAddrV4::new(OUTSIDE_ADDR, 8080));
    let to_outside = SocketAddrV4::new(OUTSIDE_ADDR, 8080);
    lab.wait_reachable(pod1, OUTSIDE_ADDR).unwrap();
    connect_from(&ns1, to_outside).expect("pod1 -> outside over TCP");
    assert_eq!(
        outside_rec.peer_ips(),
        BTreeSet::from([OUTSIDE_HOST_SIDE.into()]),
        "pod traffic to the outside must leave masqueraded as host 1's address there"
    );
    // (b) the other host's underlay address, which could answer the pod directly
    // (it routes the pod network), so only the masquerade decides what arrives.
    let at_h2 = PeerRecorder::start(&h2_ns, SocketAddrV4::new(h2_ip, 8082));
    connect_from(&ns1, SocketAddrV4::new(h2_ip, 8082)).expect("pod1 -> host 2 over TCP");
    assert_eq!(
        at_h2.peer_ips(),
        BTreeSet::from([h1_ip.into()]),
        "pod traffic to a non-pod address of another host must be masqueraded"
    );

    // Restarts while traffic flows outward.
    let ping = BgPing::start(&lab, &ns1, OUTSIDE_ADDR);
    let prober = TcpProber::start(&ns1, to_outside);
    ping.wait_replies(5);
    prober.wait_attempts(5);
    for i in 0..RESTARTS {
        let st = lab.stop_agent(0).unwrap();
        assert!(st.success(), "restart {i}: flanneld exit on SIGTERM: {st}");
        lab.start_agent(0).unwrap();
    }
    // Some more traffic through the last agent, after its startup.
    let (n_ping, n_tcp) = (ping.replies().len(), prober.attempts());
    ping.wait_replies(n_ping + 15);
    prober.wait_attempts(n_tcp + 10);
    lab.check_agents().unwrap();
    let seqs = ping.stop();
    let results = prober.stop();
    assert!(seqs.len() >= 20, "too few replies: {seqs:?}");
    assert_eq!(
        ping_gaps(&seqs),
        Vec::<u32>::new(),
        "ping replies lost while flanneld restarted {RESTARTS} times"
    );
    let failed: Vec<(usize, &String)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} new TCP connections to the outside failed across the restarts: {failed:?}",
        failed.len(),
        results.len()
    );
    let peers = outside_rec.peers();
    // Every connection the prober made arrived, and from the host's address.
    assert_eq!(peers.len(), results.len() + 1, "{peers:?}");
    assert_eq!(
        outside_rec.peer_ips(),
        BTreeSet::from([OUTSIDE_HOST_SIDE.into()])
    );
    // The restarts left exactly one copy of every rule, in the right engine.
    for h in 0..2 {
        assert_rules_in_engine(&lab, h, nft);
    }
    // Pod addresses are still kept between pods.
    connect_from(&ns1, SocketAddrV4::new(ip2, 8081)).expect("pod1 -> pod2 after restarts");
    assert_eq!(at_pod2.peer_ips(), BTreeSet::from([ip1.into()]));
    eprintln!(
        "{what}: {} ping replies and {} TCP connections across {RESTARTS} restarts, none lost",
        seqs.len(),
        results.len()
    );
}
