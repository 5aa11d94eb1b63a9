//! What masquerade does to real traffic between namespaces, for both engines.

use super::*;

// ------------------------------------------------------- masquerade behaviour

use flannel_testkit::in_netns;

/// Listen in `server` on `port`, connect from `client` to `dst`, return the source address
/// the server saw.
pub(super) fn observed_source(server: &Ns, client: &Ns, dst: Ipv4Addr, port: u16) -> Ipv4Addr {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = flannel_net::netns::spawn_in_netns(
        &flannel_net::netns::netns_path(&server.name),
        move || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match l.accept() {
                    Ok((_, peer)) => return peer,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "no connection arrived");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        },
    )
    .expect("start the server thread");
    rx.recv_timeout(Duration::from_secs(60))
        .expect("server ready");
    in_netns(&client.name, move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(5))
            {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect to {dst}:{port}: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    match srv
        .join()
        .expect("server thread")
        .expect("server enters its namespace")
    {
        SocketAddr::V4(a) => *a.ip(),
        other => panic!("unexpected peer {other}"),
    }
}

/// pod1 (10.244.1.2) and pod2 (10.244.2.2) behind a router `host` that owns
/// 10.244.1.0/24 and routes 10.244.2.0/24 (standing in for a peer's subnet), and an
/// `out` namespace on 198.18.1.0/24 that can route back to the pods (so an unmasqueraded
/// packet would arrive with its pod address and the test could tell).
struct Lab {
    pod1: Ns,
    pod2: Ns,
    host: Ns,
    out: Ns,
}

impl Lab {
    fn new() -> Lab {
        let lab = Lab {
            pod1: Ns::new("pod1"),
            pod2: Ns::new("pod2"),
            host: Ns::new("host"),
            out: Ns::new("out"),
        };
        let h = &lab.host.name;
        for (pod, hn, pn, hostip, podip) in [
            (&lab.pod1, "h1", "p1", "10.244.1.1/24", "10.244.1.2/24"),
            (&lab.pod2, "h2", "p2", "10.244.2.1/24", "10.244.2.2/24"),
            (&lab.out, "ho", "o0", "198.18.1.1/24", "198.18.1.2/24"),
        ] {
            lab.host.sh(&format!(
                "ip link add {hn} type veth peer name {pn} netns {}",
                pod.name
            ));
            lab.host.sh(&format!("ip addr add {hostip} dev {hn}"));
            lab.host.sh(&format!("ip link set {hn} up"));
            pod.sh(&format!("ip addr add {podip} dev {pn}"));
            pod.sh(&format!("ip link set {pn} up"));
        }
        lab.pod1.sh("ip route add default via 10.244.1.1");
        lab.pod2.sh("ip route add default via 10.244.2.1");
        lab.out.sh("ip route add 10.244.0.0/16 via 198.18.1.1");
        lab.host.sh("sysctl -qw net.ipv4.ip_forward=1");
        let _ = h;
        lab
    }

    fn check_sources(&self, what: &str) {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // pod → outside: masqueraded to the host's address on the outside link.
        assert_eq!(
            observed_source(&self.out, &self.pod1, a("198.18.1.2"), 8081),
            a("198.18.1.1"),
            "{what}: pod→out"
        );
        // pod → pod (other subnet of the cluster): keeps the pod address.
        assert_eq!(
            observed_source(&self.pod2, &self.pod1, a("10.244.2.2"), 8082),
            a("10.244.1.2"),
            "{what}: pod→pod"
        );
        // outside → own pod: not masqueraded.
        assert_eq!(
            observed_source(&self.pod1, &self.out, a("10.244.1.2"), 8083),
            a("198.18.1.2"),
            "{what}: out→own pod"
        );
        // outside → a pod of another subnet: masqueraded (iptables rule 6; unreachable in
        // upstream's nft rules; docs/compatibility.md, "nftables masquerade uses the
        // iptables rule set").
        assert_eq!(
            observed_source(&self.pod2, &self.out, a("10.244.2.2"), 8084),
            a("10.244.2.1"),
            "{what}: out→other pod"
        );
    }
}

#[test]
fn masquerade_behaviour_nftables() {
    if !require(&["ip", "nft", "sysctl"]) {
        return;
    }
    let lab = Lab::new();
    let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    // Without rules nothing is masqueraded: the test can tell the difference.
    assert_eq!(
        observed_source(&lab.out, &lab.pod1, a("198.18.1.2"), 8080),
        a("10.244.1.2")
    );
    let mut e = NftEngine::new(lab.host.opts()).unwrap();
    e.apply(&rules_v4()).unwrap();
    lab.check_sources("nftables");
}

#[test]
fn masquerade_behaviour_iptables() {
    if !require(&["ip", "iptables", "sysctl"]) {
        return;
    }
    let lab = Lab::new();
    let mut e = IptablesEngine::new(lab.host.opts()).unwrap();
    e.apply(&rules_v4()).unwrap();
    lab.check_sources("iptables");
}
