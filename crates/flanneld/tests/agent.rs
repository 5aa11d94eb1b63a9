//! flanneld as a whole process: in a throw-away network namespace with a real etcd
//! listening on that namespace's loopback, backend `alloc`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const FLANNELD: &str = env!("CARGO_BIN_EXE_flanneld");
const DEADLINE: Duration = Duration::from_secs(60);

/// Whether this test can run (root, etcd); see flannel_testkit's gate.
fn prerequisites() -> bool {
    flannel_testkit::require(&flannel_testkit::gate::this_test(), &["etcd", "etcdctl"])
}

/// A network namespace with only `lo` up, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fl-{}-d{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(ns.cmd("ip").args(["link", "set", "lo", "up"]));
        ns
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(c: &mut Command) -> Output {
    let out = c.output().expect("spawn");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed (by PID, through its handle) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Etcd<'a> {
    ns: &'a Netns,
    endpoint: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl<'a> Etcd<'a> {
    fn start(ns: &'a Netns) -> Etcd<'a> {
        let dir = tempfile::tempdir().unwrap();
        // Ports are free in the new namespace; any pair works there.
        let port = free_port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let child = ns
            .cmd("/usr/bin/etcd")
            .args([
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", port + 1),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", port + 1),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{}", port + 1),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let etcd = Etcd {
            ns,
            endpoint,
            _proc: Proc(child),
            _dir: dir,
        };
        wait_for("etcd to answer", || {
            etcd.ctl(&["endpoint", "health"]).status.success()
        });
        etcd
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.ns
            .cmd("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint)
            .args(args)
            .output()
            .unwrap()
    }

    fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.ctl(&["get", "--prefix", prefix]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect()
    }
}

fn free_port() -> u16 {
    // A port free on the host is as good as any inside a fresh namespace.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    if p >= 65000 {
        20000 + p % 1000
    } else {
        p
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Agent {
    proc: Proc,
    log: PathBuf,
}

impl Agent {
    fn start(
        ns: &Netns,
        etcd: &Etcd,
        subnet_file: &Path,
        log: PathBuf,
        extra_env: &[(&str, &str)],
    ) -> Agent {
        let logf = std::fs::File::create(&log).unwrap();
        let mut c = ns.cmd(FLANNELD);
        c.args(["-iface=lo", "--ip-masq=false"])
            .arg(format!("--subnet-file={}", subnet_file.display()))
            .env("FLANNELD_ETCD_ENDPOINTS", &etcd.endpoint)
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        Agent {
            proc: Proc(c.spawn().unwrap()),
            log,
        }
    }

    fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; flanneld log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) -> ExitStatus {
        let pid = self.proc.0.id().to_string();
        // `ip netns exec` execs the program, so the PID is flanneld's own.
        run(Command::new("kill").args(["-TERM", &pid]));
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.proc.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "flanneld did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#;

#[test]
fn alloc_lease_subnet_env_sigterm_and_restart() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let etcd = Etcd::start(&ns);
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    assert!(etcd
        .ctl(&["put", "/coreos.com/network/config", CONFIG])
        .status
        .success());

    let mut agent = Agent::start(&ns, &etcd, &subnet_file, dir.path().join("a1.log"), &[]);
    agent.wait_for("subnet.env", || subnet_file.exists());
    let env = std::fs::read_to_string(&subnet_file).unwrap();
    let leases = etcd.get_prefix("/coreos.com/network/subnets");
    assert_eq!(leases.len(), 1, "{leases:?}");
    let (key, value) = &leases[0];
    assert_eq!(value, r#"{"PublicIP":"127.0.0.1","PublicIPv6":null}"#);
    let subnet = key
        .strip_prefix("/coreos.com/network/subnets/")
        .unwrap()
        .replace('-', "/");
    let third = subnet.split('.').nth(2).unwrap().to_string();
    assert_eq!(
        env,
        format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{third}.1/24\nFLANNEL_MTU=65536\nFLANNEL_IPMASQ=false\n")
    );

    let status = agent.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must exit 0:\n{}",
        agent.log()
    );
    assert_eq!(
        etcd.get_prefix("/coreos.com/network/subnets").len(),
        1,
        "lease left in place"
    );
    assert!(subnet_file.exists(), "subnet.env left in place");

    // A restart keeps the subnet (found by public IP).
    std::fs::remove_file(&subnet_file).unwrap();
    let mut again = Agent::start(&ns, &etcd, &subnet_file, dir.path().join("a2.log"), &[]);
    again.wait_for("subnet.env after restart", || subnet_file.exists());
    assert_eq!(std::fs::read_to_string(&subnet_file).unwrap(), env);
    let leases = etcd.get_prefix("/coreos.com/network/subnets");
    assert_eq!(leases.len(), 1);
    assert_eq!(&leases[0].0, key);

    // Deleting our lease makes the agent exit 0 (a supervisor restarts it).
    assert!(etcd.ctl(&["del", key]).status.success());
    let status = again.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", again.log());
    assert!(again.log().contains("revoked"), "{}", again.log());
}

#[test]
fn waits_for_a_valid_config_and_logs_why() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let etcd = Etcd::start(&ns);
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    assert!(etcd
        .ctl(&[
            "put",
            "/coreos.com/network/config",
            r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#
        ])
        .status
        .success());
    let mut agent = Agent::start(
        &ns,
        &etcd,
        &subnet_file,
        dir.path().join("a.log"),
        &[("FLANNELD_ETCD_PREFIX", "/coreos.com/network")],
    );
    let log = agent.log.clone();
    agent.wait_for("the config error in the log", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("SubnetLen")
    });
    assert!(
        agent.proc.0.try_wait().unwrap().is_none(),
        "must keep waiting, not exit"
    );
    assert!(!subnet_file.exists());
    assert!(etcd
        .ctl(&["put", "/coreos.com/network/config", CONFIG])
        .status
        .success());
    agent.wait_for("subnet.env once the config is fixed", || {
        subnet_file.exists()
    });
    assert_eq!(agent.terminate().code(), Some(0));
}

#[test]
fn version_and_bad_flags() {
    let out = Command::new(FLANNELD).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(FLANNELD)
        .arg("-subnet-lease-renew-margin=0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(FLANNELD).arg("-h").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--etcd-endpoints"));
}
