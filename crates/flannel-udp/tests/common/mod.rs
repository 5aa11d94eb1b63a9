//! A two-host lab in throw-away network namespaces, shared by the kernel tests and
//! the benchmark. Everything is created inside namespaces named with a run-unique
//! prefix and removed on drop (also on panic); nothing touches the root namespace.
//!
//! ```text
//!  pod A (10.244.1.2) ── vpa │ host A │ va 198.18.0.1 ══ 198.18.0.2 vb │ host B │ vpb ── pod B (10.244.2.2)
//!                            flannel0 10.244.1.0           flannel0 10.244.2.0
//! ```

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flannel_udp::{netconf, Config, DataPath, Mode, Peer};

pub const NETWORK: &str = "10.244.0.0/16";
pub const MTU: u32 = 1472;

/// True when the test may run (root, the tools, /dev/net/tun); see flannel_testkit's
/// gate for what happens otherwise.
pub fn prerequisites(tools: &[&str]) -> bool {
    let test = flannel_testkit::gate::this_test();
    if !flannel_testkit::require(&test, tools) {
        return false;
    }
    std::path::Path::new("/dev/net/tun").exists()
        || flannel_testkit::skip_or_fail(&test, "missing /dev/net/tun")
}
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its output when it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub struct Lab {
    pub prefix: String,
    pub a: String,
    pub b: String,
    pub pa: String,
    pub pb: String,
    children: Vec<Child>,
}

pub const A_UNDER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const B_UNDER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const A_POD: &str = "10.244.1.2";
pub const B_POD: &str = "10.244.2.2";

impl Lab {
    pub fn new() -> Lab {
        let prefix = format!(
            "fu{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let lab = Lab {
            a: format!("{prefix}-a"),
            b: format!("{prefix}-b"),
            pa: format!("{prefix}-pa"),
            pb: format!("{prefix}-pb"),
            prefix,
            children: Vec::new(),
        };
        for n in [&lab.a, &lab.b, &lab.pa, &lab.pb] {
            run(&["ip", "netns", "add", n]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        // Links are created inside the lab namespaces, never in the root one.
        run(&[
            "ip", "-n", &lab.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
            &lab.b,
        ]);
        run(&[
            "ip",
            "-n",
            &lab.a,
            "addr",
            "add",
            "198.18.0.1/24",
            "dev",
            "va",
        ]);
        run(&[
            "ip",
            "-n",
            &lab.b,
            "addr",
            "add",
            "198.18.0.2/24",
            "dev",
            "vb",
        ]);
        run(&["ip", "-n", &lab.a, "link", "set", "va", "up"]);
        run(&["ip", "-n", &lab.b, "link", "set", "vb", "up"]);
        for (host, pod, hv, hostip, podip) in [
            (&lab.a, &lab.pa, "vpa", "10.244.1.1/24", "10.244.1.2/24"),
            (&lab.b, &lab.pb, "vpb", "10.244.2.1/24", "10.244.2.2/24"),
        ] {
            run(&[
                "ip", "-n", host, "link", "add", hv, "type", "veth", "peer", "name", "eth0",
                "netns", pod,
            ]);
            run(&["ip", "-n", host, "addr", "add", hostip, "dev", hv]);
            run(&[
                "ip",
                "-n",
                host,
                "link",
                "set",
                hv,
                "up",
                "mtu",
                &MTU.to_string(),
            ]);
            run(&["ip", "-n", pod, "addr", "add", podip, "dev", "eth0"]);
            run(&[
                "ip",
                "-n",
                pod,
                "link",
                "set",
                "eth0",
                "up",
                "mtu",
                &MTU.to_string(),
            ]);
            let gw = hostip.split('/').next().unwrap_or_default();
            run(&["ip", "-n", pod, "route", "add", "default", "via", gw]);
            run(&[
                "ip",
                "netns",
                "exec",
                host,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
        }
        lab
    }

    /// `ip netns exec <ns> args...` (not checked).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// Spawns a long-running command in a namespace; killed (by pid) on drop.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> u32 {
        let c = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let pid = c.id();
        self.children.push(c);
        pid
    }

    /// Takes a spawned child back (e.g. to read its output).
    pub fn take_child(&mut self, pid: u32) -> Option<Child> {
        let i = self.children.iter().position(|c| c.id() == pid)?;
        Some(self.children.remove(i))
    }

    /// Gives a child back to the lab (killed on drop).
    pub fn adopt(&mut self, c: Child) {
        self.children.push(c);
    }

    /// SIGKILLs a spawned child (by its pid) and reaps it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(mut c) = self.take_child(pid) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pings `dst` from namespace `ns` (count packets, 0.2 s apart). Returns the
    /// output; success means every reply came back.
    pub fn ping(&self, ns: &str, dst: &str, count: u32) -> (bool, String) {
        let c = count.to_string();
        let out = self.exec(ns, &["ping", "-n", "-c", &c, "-i", "0.2", "-W", "2", dst]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Pings until one reply arrives (the path may need a moment to come up).
    pub fn wait_ping(&self, ns: &str, dst: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = self.exec(ns, &["ping", "-n", "-c", "1", "-W", "1", dst]);
            if out.status.success() {
                return true;
            }
        }
        false
    }

    /// Runs an iperf3 client in `client_ns` against a one-off server in
    /// `server_ns` on `server_ip`; returns the receiver's bits per second.
    pub fn iperf(
        &mut self,
        client_ns: &str,
        server_ns: &str,
        server_ip: &str,
        secs: u32,
        streams: u32,
    ) -> f64 {
        let port = 5201 + (SEQ.fetch_add(1, Ordering::SeqCst) % 500) as u16;
        let port_s = port.to_string();
        let pid = self.spawn(
            server_ns,
            &["iperf3", "-s", "-1", "-B", server_ip, "-p", &port_s],
        );
        let t = secs.to_string();
        let p = streams.to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        let result = loop {
            let out = self.exec(
                client_ns,
                &[
                    "iperf3", "-c", server_ip, "-p", &port_s, "-t", &t, "-P", &p, "-J",
                ],
            );
            // iperf3 -J exits 0 even when it could not connect; the JSON says so.
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && !text.contains("\"error\"") {
                break parse_iperf_bps(&text)
                    .unwrap_or_else(|| panic!("no throughput in iperf3 output: {text}"));
            }
            // The server may not be listening yet.
            assert!(
                Instant::now() < deadline,
                "iperf3 client failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        self.kill(pid);
        result
    }
}

/// `end.sum_received.bits_per_second` from iperf3 -J output.
pub fn parse_iperf_bps(json: &str) -> Option<f64> {
    let at = json.find("\"sum_received\"")?;
    let rest = &json[at..];
    let k = rest.find("\"bits_per_second\"")?;
    let v = &rest[k + "\"bits_per_second\"".len()..];
    let v = v.trim_start_matches([':', ' ', '\t']);
    let end = v.find([',', '\n', '}']).unwrap_or(v.len());
    v[..end].trim().parse().ok()
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the persistent devices first also ends any keeper (it exits
        // when its device goes), which would otherwise keep the namespace alive.
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["-n", n, "link", "del", "flannel0"])
                .stderr(Stdio::null())
                .status();
        }
        for n in [&self.pa, &self.pb, &self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub use flannel_testkit::in_netns;

/// Opens, configures and starts a data path inside `ns`.
pub fn start_datapath(ns: &str, cfg: Config, peers: Vec<Peer>) -> DataPath {
    in_netns(ns, move || {
        let mut dp = DataPath::open(&cfg).expect("open data path");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let nl = flannel_net::Netlink::connect().await.expect("netlink");
            netconf::configure(
                &nl,
                dp.name(),
                cfg.tun_addr,
                MTU,
                NETWORK.parse().unwrap(),
                flannel_net::netlink::RTPROT_BOOT,
            )
            .await
            .expect("configure flannel0");
        });
        dp.set_peers(peers);
        dp.start().expect("start workers");
        dp
    })
}

pub fn config(host: char, mode: Mode) -> Config {
    let (bind, addr) = match host {
        'a' => (A_UNDER, Ipv4Addr::new(10, 244, 1, 0)),
        _ => (B_UNDER, Ipv4Addr::new(10, 244, 2, 0)),
    };
    Config {
        tun_name: "flannel0".into(),
        bind: SocketAddrV4::new(bind, flannel_udp::DEFAULT_PORT),
        tun_addr: addr,
        mode,
        queues: 0,
        persist: false,
        keeper: false,
    }
}

/// The peer list of host `host` (the other host).
pub fn peers_of(host: char) -> Vec<Peer> {
    match host {
        'a' => vec![Peer {
            subnet: "10.244.2.0/24".parse().unwrap(),
            public_ip: B_UNDER,
        }],
        _ => vec![Peer {
            subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: A_UNDER,
        }],
    }
}

/// Node-binary arguments for host `host`.
pub fn node_args(host: char, mode: &str) -> Vec<String> {
    let (bind, addr, peer) = match host {
        'a' => ("198.18.0.1:8285", "10.244.1.0", "10.244.2.0/24=198.18.0.2"),
        _ => ("198.18.0.2:8285", "10.244.2.0", "10.244.1.0/24=198.18.0.1"),
    };
    [
        "--bind", bind, "--addr", addr, "--peer", peer, "--mode", mode,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub use flannel_testkit::eventually;
