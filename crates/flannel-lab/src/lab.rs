//! A flannel cluster on one machine: an underlay namespace with a bridge and etcd,
//! N host namespaces each running flanneld, pods made through the CNI plugin.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flannel_core::lease::LeaseKey;
use flannel_core::subnet_env::{parse_env_lines, SubnetEnv};
use flannel_testkit::Monitor;
use ipnet::Ipv4Net;
use serde_json::{json, Value};

use crate::bins::{find_binary, find_tool};
use crate::cleanup::{
    delete_namespaces, install_signal_teardown, lab_prefix_of, runs_root, NAME_PREFIX,
};
use crate::error::{LabError, Result};
use crate::etcd::{etcd_args, Etcd};
use crate::measure::{parse_iperf_bps, parse_ping, rss_kib, PingStats};
use crate::process::{
    command, ip, output_with_input, register_lab, run, status_text, unregister_lab, while_alive,
    Proc, ProcOutput,
};

/// The underlay bridge's address inside the underlay namespace; etcd listens here.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Prefix length of the underlay (198.18.0.0/24).
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// etcd's client port.
pub const ETCD_PORT: u16 = 2379;
/// flannel's default etcd prefix.
pub const ETCD_PREFIX: &str = "/coreos.com/network";
/// The pod network of flannel's Kubernetes manifests.
pub const DEFAULT_NETWORK: &str = "10.244.0.0/16";
/// Where the reference CNI plugins (bridge, host-local) live.
pub const CNI_PATH: &str = "/usr/lib/cni";
/// The etcd binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(1);

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Polls `cond` every `every` until it returns true or `timeout` passes.
pub fn poll_until(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(LabError::Timeout {
                what: what.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(every);
    }
}

/// What a flanneld wrote to its subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetFile {
    pub network: Option<Ipv4Net>,
    /// The lease subnet (network address, e.g. 10.244.5.0/24).
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ip_masq: bool,
    pub text: String,
}

impl SubnetFile {
    /// Reads subnet.env text; `None` if it lacks a subnet or an MTU (e.g. half
    /// written by a writer that does not rename atomically).
    pub fn parse(text: &str) -> Option<SubnetFile> {
        let mut network = None;
        let mut subnet = None;
        let mut mtu = None;
        let mut ip_masq = false;
        for (k, v) in parse_env_lines(text) {
            match k.as_str() {
                "FLANNEL_NETWORK" => network = v.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
                "FLANNEL_SUBNET" => subnet = v.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
                "FLANNEL_MTU" => mtu = v.parse().ok(),
                "FLANNEL_IPMASQ" => ip_masq = v == "true",
                _ => {}
            }
        }
        Some(SubnetFile {
            network,
            subnet: subnet?,
            mtu: mtu?,
            ip_masq,
            text: text.to_string(),
        })
    }
}

/// Identity of a file version: changes when it is rewritten (new inode on an
/// atomic rename, new mtime on an in-place write).
type FileStamp = Option<(u64, u64, i64, i64, u64)>;

fn stamp(path: &Path) -> FileStamp {
    fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// One host of the lab: a network namespace on the underlay running flanneld.
#[derive(Debug)]
pub struct Host {
    /// Its network namespace (`<prefix>-h<number>`).
    pub ns: String,
    /// 1-based, as in the namespace name and the address.
    pub number: usize,
    /// Its underlay address (198.18.0.<number>), the flanneld public IP.
    pub ip: Ipv4Addr,
    /// Its underlay interface (inside its namespace).
    pub link: String,
    /// Its directory in the run dir: subnet.env, flanneld.log, CNI state.
    pub dir: PathBuf,
    agent: Option<Proc>,
    /// Set by [`Lab::set_agent_wrapper`]: a command the agent runs under and the
    /// flanneld path as that command sees it.
    agent_wrapper: Option<(Vec<String>, PathBuf)>,
    next_pod: usize,
}

impl Host {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("flanneld.log")
    }
}

/// Index of a pod in the lab (stable while the lab lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId(pub usize);

/// A pod: a network namespace attached through the CNI plugin on one host.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: PodId,
    /// Its network namespace (`<prefix>-h<n>p<m>`), also its CNI container ID.
    pub ns: String,
    /// Index of its host in [`Lab::hosts`].
    pub host: usize,
    /// The address the CNI plugin gave it.
    pub ip: Ipv4Addr,
}

/// A callback receiving one line per build step.
pub type Progress = Box<dyn FnMut(&str)>;

/// Builds a [`Lab`]; see [`Lab::builder`].
pub struct LabBuilder {
    hosts: usize,
    backend: String,
    network: String,
    config: Option<String>,
    prefix: Option<String>,
    start_agents: bool,
    ip_masq: bool,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    keepable: bool,
    timeout: Duration,
    progress: Option<Progress>,
}

impl LabBuilder {
    /// Number of hosts (1..=253).
    pub fn hosts(mut self, n: usize) -> Self {
        self.hosts = n;
        self
    }
    /// Backend by type: `{"Type":"<ty>"}`.
    pub fn backend(mut self, ty: &str) -> Self {
        self.backend = json!({ "Type": ty }).to_string();
        self
    }
    /// The whole `Backend` object, e.g. `{"Type":"vxlan","DirectRouting":true}`.
    pub fn backend_json(mut self, json: &str) -> Self {
        self.backend = json.to_string();
        self
    }
    /// The pod network (`Network` of the config), default 10.244.0.0/16.
    pub fn network(mut self, cidr: &str) -> Self {
        self.network = cidr.to_string();
        self
    }
    /// The complete network config JSON, replacing `network` and `backend`.
    pub fn config_json(mut self, json: &str) -> Self {
        self.config = Some(json.to_string());
        self
    }
    /// A fixed prefix (`flab-<pid>-<n>`); default: this pid and a counter.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = Some(prefix.to_string());
        self
    }
    /// Whether `build` starts flanneld on every host (default true).
    pub fn start_agents(mut self, yes: bool) -> Self {
        self.start_agents = yes;
        self
    }
    /// flanneld's `--ip-masq` (default true, as in flannel's manifests; the CNI
    /// plugin then tells the bridge plugin not to masquerade).
    pub fn ip_masq(mut self, yes: bool) -> Self {
        self.ip_masq = yes;
        self
    }
    /// An extra flanneld argument.
    pub fn agent_arg(mut self, arg: &str) -> Self {
        self.agent_args.push(arg.to_string());
        self
    }
    /// An extra environment variable for flanneld.
    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.push((key.to_string(), value.to_string()));
        self
    }
    /// Lets the lab outlive this process ([`Lab::into_kept`]): its processes do
    /// not get SIGKILL when the thread that started them exits.
    pub fn keepable(mut self, yes: bool) -> Self {
        self.keepable = yes;
        self
    }
    /// Deadline for every wait (etcd up, subnet.env written, agent exit...);
    /// default 60 s, generous for a loaded 2-core machine.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Called with a line per build step.
    pub fn on_progress(mut self, f: impl FnMut(&str) + 'static) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    fn config_text(&self) -> Result<String> {
        if let Some(c) = &self.config {
            serde_json::from_str::<Value>(c)
                .map_err(|e| LabError::Invalid(format!("config JSON: {e}")))?;
            return Ok(c.clone());
        }
        let backend: Value = serde_json::from_str(&self.backend)
            .map_err(|e| LabError::Invalid(format!("backend JSON: {e}")))?;
        if !backend.is_object() {
            return Err(LabError::Invalid(format!(
                "backend JSON must be an object, got {backend}"
            )));
        }
        Ok(json!({"Network": self.network, "Backend": backend}).to_string())
    }

    /// Creates everything; on any failure what was created is removed again.
    pub fn build(mut self) -> Result<Lab> {
        if !(1..=253).contains(&self.hosts) {
            return Err(LabError::Invalid(format!(
                "hosts must be 1..=253, got {}",
                self.hosts
            )));
        }
        let config = self.config_text()?;
        install_signal_teardown()?;
        for tool in ["ip", ETCD_BIN] {
            find_tool(tool)?;
        }
        let flanneld = if self.start_agents {
            Some(find_binary("flanneld")?)
        } else {
            find_binary("flanneld").ok()
        };
        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = self
            .prefix
            .clone()
            .unwrap_or_else(|| format!("{NAME_PREFIX}{pid}-{n}"));
        let (lp, ppid) = lab_prefix_of(&prefix).ok_or_else(|| {
            LabError::Invalid(format!("prefix {prefix:?} is not {NAME_PREFIX}<pid>-<n>"))
        })?;
        if lp != prefix {
            return Err(LabError::Invalid(format!(
                "prefix {prefix:?} is not {NAME_PREFIX}<pid>-<n>"
            )));
        }
        let pn: u32 = prefix
            .rsplit('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(n);
        // Link names are created inside namespaces only, but still carry the run's
        // identity (and stay within 15 characters).
        let tag = format!("f{}x{}", base36(ppid), base36(pn));
        let run_dir = runs_root().join(&prefix);
        if run_dir.exists() {
            return Err(LabError::Invalid(format!(
                "{} exists: leftovers of an earlier run? `flannel-lab down {prefix}`",
                run_dir.display()
            )));
        }
        fs::create_dir_all(&run_dir)
            .map_err(|e| LabError::io(format!("create {}", run_dir.display()), e))?;
        register_lab(&prefix, &run_dir)?;
        let under = format!("{prefix}-u");
        let mut lab = Lab {
            etcd: Etcd::new(&under, SocketAddrV4::new(UNDERLAY_GATEWAY, ETCD_PORT)),
            under,
            prefix,
            tag,
            run_dir,
            config,
            hosts: Vec::new(),
            pods: Vec::new(),
            etcd_proc: None,
            flanneld,
            cni: None,
            ip_masq: self.ip_masq,
            agent_args: std::mem::take(&mut self.agent_args),
            agent_env: std::mem::take(&mut self.agent_env),
            die_with_parent: !self.keepable,
            timeout: self.timeout,
            torn_down: false,
            kept: false,
        };
        let mut progress = self.progress.take();
        let mut say = |s: &str| {
            if let Some(p) = progress.as_mut() {
                p(s)
            }
        };
        say(&format!(
            "underlay namespace {} with bridge {}br ({}/{})",
            lab.under, lab.tag, UNDERLAY_GATEWAY, UNDERLAY_PREFIX_LEN
        ));
        lab.create_underlay()?;
        say(&format!(
            "etcd on {} (inside {})",
            lab.etcd.endpoint(),
            lab.under
        ));
        lab.spawn_etcd()?;
        for i in 0..self.hosts {
            lab.create_host(i)?;
            let h = &lab.hosts[i];
            say(&format!("host {} at {} ({})", h.ns, h.ip, h.link));
        }
        lab.wait_etcd()?;
        say(&format!(
            "network config {}/config = {}",
            ETCD_PREFIX, lab.config
        ));
        lab.etcd.put(&lab.config_key(), &lab.config)?;
        if self.start_agents {
            say(&format!("starting flanneld on {} hosts", lab.hosts.len()));
            let stamps: Vec<FileStamp> =
                lab.hosts.iter().map(|h| stamp(&h.subnet_file())).collect();
            for i in 0..lab.hosts.len() {
                lab.spawn_agent(i)?;
            }
            for (i, st) in stamps.into_iter().enumerate() {
                let sub = lab.wait_subnet_file(i, st)?;
                say(&format!(
                    "{}: lease {} (MTU {})",
                    lab.hosts[i].ns, sub.subnet, sub.mtu
                ));
            }
        }
        Ok(lab)
    }
}

/// A running lab. Dropping it tears everything down (also while panicking).
pub struct Lab {
    prefix: String,
    tag: String,
    run_dir: PathBuf,
    under: String,
    etcd: Etcd,
    etcd_proc: Option<Proc>,
    config: String,
    hosts: Vec<Host>,
    pods: Vec<Option<Pod>>,
    flanneld: Option<PathBuf>,
    cni: Option<PathBuf>,
    ip_masq: bool,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    die_with_parent: bool,
    timeout: Duration,
    torn_down: bool,
    kept: bool,
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            hosts: 2,
            backend: json!({"Type": "vxlan"}).to_string(),
            network: DEFAULT_NETWORK.to_string(),
            config: None,
            prefix: None,
            start_agents: true,
            ip_masq: true,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            keepable: false,
            timeout: Duration::from_secs(60),
            progress: None,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// What every link name of this lab starts with (`f<pid36>x<n36>`).
    pub fn link_tag(&self) -> &str {
        &self.tag
    }
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
    /// The underlay namespace (bridge + etcd).
    pub fn under_ns(&self) -> &str {
        &self.under
    }
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }
    pub fn config(&self) -> &str {
        &self.config
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    pub fn config_key(&self) -> String {
        format!("{ETCD_PREFIX}/config")
    }
    /// The etcd key of the lease for `subnet`.
    pub fn lease_key_for(subnet: Ipv4Net) -> String {
        format!("{ETCD_PREFIX}/subnets/{}", LeaseKey::v4(subnet))
    }
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }
    pub fn host(&self, h: usize) -> Result<&Host> {
        self.hosts
            .get(h)
            .ok_or_else(|| LabError::Invalid(format!("no host {h} (lab has {})", self.hosts.len())))
    }
    fn host_mut(&mut self, h: usize) -> Result<&mut Host> {
        let n = self.hosts.len();
        self.hosts
            .get_mut(h)
            .ok_or_else(|| LabError::Invalid(format!("no host {h} (lab has {n})")))
    }
    /// The live pods, in creation order.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().flatten()
    }
    pub fn pod(&self, id: PodId) -> Result<&Pod> {
        self.pods
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| LabError::Invalid(format!("no pod {}", id.0)))
    }

    // ----- building -----

    fn add_namespace(&self, name: &str) -> Result<()> {
        while_alive(|| ip(&["netns", "add", name]).map(drop))?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn create_underlay(&mut self) -> Result<()> {
        let u = self.under.clone();
        let br = format!("{}br", self.tag);
        self.add_namespace(&u)?;
        ip(&["-n", &u, "link", "add", &br, "type", "bridge"])?;
        let addr = format!("{UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX_LEN}");
        ip(&["-n", &u, "addr", "add", &addr, "dev", &br])?;
        ip(&["-n", &u, "link", "set", &br, "up"])?;
        Ok(())
    }

    fn create_host(&mut self, i: usize) -> Result<()> {
        let number = i + 1;
        let ns = format!("{}-h{number}", self.prefix);
        let link = format!("{}h{number}", self.tag);
        let peer = format!("{}u{number}", self.tag);
        let br = format!("{}br", self.tag);
        let ip4 = Ipv4Addr::new(198, 18, 0, number as u8);
        let dir = self.run_dir.join(format!("h{number}"));
        fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
        self.add_namespace(&ns)?;
        self.hosts.push(Host {
            ns: ns.clone(),
            number,
            ip: ip4,
            link: link.clone(),
            dir,
            agent: None,
            agent_wrapper: None,
            next_pod: 1,
        });
        // Created from inside the host namespace with the peer placed directly in
        // the underlay: no end of the pair ever exists in the root namespace.
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.under,
        ])?;
        ip(&["-n", &self.under, "link", "set", &peer, "master", &br, "up"])?;
        let cidr = format!("{ip4}/{UNDERLAY_PREFIX_LEN}");
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", &link])?;
        ip(&["-n", &ns, "link", "set", &link, "up"])?;
        // flanneld sets no sysctl; a host needs forwarding for its pods. This is
        // per network namespace.
        self.run_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(())
    }

    fn spawn_etcd(&mut self) -> Result<()> {
        let data = self.run_dir.join("etcd");
        let mut cmd = command("ip", &["netns", "exec", &self.under, ETCD_BIN]);
        cmd.args(etcd_args(
            SocketAddrV4::new(UNDERLAY_GATEWAY, ETCD_PORT),
            &data,
        ));
        let p = Proc::spawn(
            cmd,
            "etcd",
            &self.prefix,
            ProcOutput::File(self.run_dir.join("etcd.log")),
            self.die_with_parent,
        )?;
        self.etcd_proc = Some(p);
        Ok(())
    }

    fn wait_etcd(&mut self) -> Result<()> {
        let log = self.run_dir.join("etcd.log");
        let etcd = self.etcd.clone();
        let proc_ = self.etcd_proc.as_mut();
        let Some(p) = proc_ else {
            return Err(LabError::Invalid("etcd was not started".into()));
        };
        poll_until(
            "etcd to answer",
            self.timeout,
            Duration::from_millis(100),
            || {
                if let Some(st) = p.try_wait() {
                    return Err(LabError::Invalid(format!(
                        "etcd exited ({}): {}",
                        status_text(&st),
                        tail(&log, 20)
                    )));
                }
                Ok(etcd.healthy())
            },
        )
    }

    // ----- agents -----

    fn flanneld(&self) -> Result<PathBuf> {
        match &self.flanneld {
            Some(p) => Ok(p.clone()),
            None => find_binary("flanneld"),
        }
    }

    /// From the next start on, host `h`'s flanneld runs as `<prefix...> <flanneld>
    /// <args...>` (after `ip netns exec <ns>`), e.g. prefix `["chroot", "<rootfs>"]`
    /// and flanneld `/opt/bin/flanneld`: the agent of an image's root filesystem.
    /// The prefix must exec flanneld in the end (the lab signals the process it
    /// started) and make the host's directory ([`Host::dir`]) visible at its path.
    pub fn set_agent_wrapper(&mut self, h: usize, prefix: &[&str], flanneld: &Path) -> Result<()> {
        self.host_mut(h)?.agent_wrapper = Some((
            prefix.iter().map(|s| s.to_string()).collect(),
            flanneld.to_path_buf(),
        ));
        Ok(())
    }

    /// The flanneld command line used for host `h` (after `ip netns exec <ns>`;
    /// starts with the wrapper prefix if [`Lab::set_agent_wrapper`] set one).
    pub fn agent_command(&self, h: usize) -> Result<Vec<String>> {
        let host = self.host(h)?;
        let (mut v, flanneld) = match &host.agent_wrapper {
            Some((prefix, bin)) => (prefix.clone(), bin.clone()),
            None => (Vec::new(), self.flanneld()?),
        };
        v.extend([
            flanneld.display().to_string(),
            format!("--etcd-endpoints={}", self.etcd.endpoint()),
            format!("--etcd-prefix={ETCD_PREFIX}"),
            format!("--iface={}", host.ip),
            format!("--subnet-file={}", host.subnet_file().display()),
            format!("--ip-masq={}", self.ip_masq),
        ]);
        v.extend(self.agent_args.iter().cloned());
        Ok(v)
    }

    /// Starts flanneld on host `h` without waiting for it.
    pub fn spawn_agent(&mut self, h: usize) -> Result<()> {
        if self.agent_running(h) {
            return Err(LabError::Invalid(format!(
                "flanneld already runs on {}",
                self.hosts[h].ns
            )));
        }
        let argv = self.agent_command(h)?;
        let host = self.host(h)?;
        let log = host.log_file();
        let marker = format!("===== flannel-lab: starting {}\n", argv.join(" "));
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, marker.as_bytes()));
        let mut cmd = command("ip", &["netns", "exec", &host.ns]);
        cmd.args(&argv);
        for (k, v) in &self.agent_env {
            cmd.env(k, v);
        }
        let p = Proc::spawn(
            cmd,
            &format!("flanneld@{}", host.ns),
            &self.prefix,
            ProcOutput::File(log),
            self.die_with_parent,
        )?;
        self.host_mut(h)?.agent = Some(p);
        Ok(())
    }

    /// Starts flanneld on host `h` and waits until it (re)wrote its subnet file;
    /// returns the time from spawn to that.
    pub fn start_agent(&mut self, h: usize) -> Result<Duration> {
        let before = stamp(&self.host(h)?.subnet_file());
        let t0 = Instant::now();
        self.spawn_agent(h)?;
        self.wait_subnet_file(h, before)?;
        Ok(t0.elapsed())
    }

    /// Waits until host `h`'s subnet file differs from `before` and is complete.
    fn wait_subnet_file(&mut self, h: usize, before: FileStamp) -> Result<SubnetFile> {
        let timeout = self.timeout;
        let path = self.host(h)?.subnet_file();
        let what = format!("{} to be written", path.display());
        let mut found = None;
        let start = Instant::now();
        loop {
            let now = stamp(&path);
            if now.is_some() && now != before {
                if let Some(s) = fs::read_to_string(&path)
                    .ok()
                    .as_deref()
                    .and_then(SubnetFile::parse)
                {
                    found = Some(s);
                }
            }
            if let Some(s) = found.take() {
                return Ok(s);
            }
            self.check_agent(h)?;
            if start.elapsed() >= timeout {
                return Err(LabError::Timeout {
                    what,
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// An error if host `h`'s flanneld was started and has exited since.
    pub fn check_agent(&mut self, h: usize) -> Result<()> {
        let host = self.host_mut(h)?;
        let Some(agent) = host.agent.as_mut() else {
            return Ok(());
        };
        match agent.try_wait() {
            None => Ok(()),
            Some(st) => {
                let log = host.log_file();
                Err(LabError::AgentExited {
                    host: host.ns.clone(),
                    status: status_text(&st),
                    log_tail: tail(&log, 30),
                    log_path: log,
                })
            }
        }
    }

    /// An error if any started flanneld has exited.
    pub fn check_agents(&mut self) -> Result<()> {
        for h in 0..self.hosts.len() {
            self.check_agent(h)?;
        }
        Ok(())
    }

    pub fn agent_running(&mut self, h: usize) -> bool {
        self.hosts
            .get_mut(h)
            .and_then(|host| host.agent.as_mut())
            .is_some_and(|a| !a.exited())
    }

    /// PID of host `h`'s flanneld while it runs.
    pub fn agent_pid(&mut self, h: usize) -> Option<u32> {
        if !self.agent_running(h) {
            return None;
        }
        self.hosts[h].agent.as_ref().map(Proc::pid)
    }

    /// The exit status of host `h`'s last flanneld, once it has exited.
    pub fn agent_exit_status(&mut self, h: usize) -> Option<ExitStatus> {
        self.hosts.get_mut(h)?.agent.as_mut()?.try_wait()
    }

    /// SIGTERM to host `h`'s flanneld; waits for it to exit and returns its status.
    /// An error if it had to be killed because it did not exit in time.
    pub fn stop_agent(&mut self, h: usize) -> Result<ExitStatus> {
        let timeout = self.timeout;
        let host = self.host_mut(h)?;
        let ns = host.ns.clone();
        let agent = host
            .agent
            .as_mut()
            .ok_or_else(|| LabError::Invalid(format!("no flanneld was started on {ns}")))?;
        let (st, killed) = agent.terminate(timeout)?;
        if killed {
            return Err(LabError::Timeout {
                what: format!("flanneld on {ns} to exit after SIGTERM (killed)"),
                after: timeout,
            });
        }
        Ok(st)
    }

    /// SIGKILL to host `h`'s flanneld (and reap it).
    pub fn kill_agent(&mut self, h: usize) -> Result<()> {
        let host = self.host_mut(h)?;
        let ns = host.ns.clone();
        let agent = host
            .agent
            .as_mut()
            .ok_or_else(|| LabError::Invalid(format!("no flanneld was started on {ns}")))?;
        agent.kill()?;
        Ok(())
    }

    /// VmRSS of host `h`'s flanneld in KiB.
    pub fn agent_rss_kib(&mut self, h: usize) -> Result<u64> {
        let pid = self
            .agent_pid(h)
            .ok_or_else(|| LabError::Invalid(format!("flanneld does not run on host {h}")))?;
        rss_kib(pid)
    }

    /// Everything host `h`'s flanneld processes have logged.
    pub fn agent_log(&self, h: usize) -> Result<String> {
        let p = self.host(h)?.log_file();
        fs::read_to_string(&p).map_err(|e| LabError::io(format!("read {}", p.display()), e))
    }

    /// Host `h`'s current subnet file, if there is a complete one.
    pub fn subnet_file(&self, h: usize) -> Result<Option<SubnetFile>> {
        let p = self.host(h)?.subnet_file();
        match fs::read_to_string(&p) {
            Ok(t) => Ok(SubnetFile::parse(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LabError::io(format!("read {}", p.display()), e)),
        }
    }

    /// Host `h`'s lease subnet, from its subnet file.
    pub fn host_subnet(&self, h: usize) -> Result<Ipv4Net> {
        self.subnet_file(h)?
            .map(|s| s.subnet)
            .ok_or_else(|| LabError::Invalid(format!("host {h} has no subnet file (yet)")))
    }

    /// Writes a subnet file by hand (for hosts without flanneld).
    pub fn write_subnet_file(&self, h: usize, subnet: Ipv4Net, mtu: u32) -> Result<()> {
        let network: Ipv4Net = serde_json::from_str::<Value>(&self.config)
            .ok()
            .and_then(|v| v.get("Network").and_then(Value::as_str).map(str::to_string))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| LabError::Invalid("config has no Network".into()))?;
        let env = SubnetEnv {
            network: Some(network.trunc()),
            subnet: Some(subnet.trunc()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu,
            ip_masq: self.ip_masq,
        };
        let p = self.host(h)?.subnet_file();
        fs::write(&p, env.render()).map_err(|e| LabError::io(format!("write {}", p.display()), e))
    }

    /// The etcd key of host `h`'s lease.
    pub fn lease_key(&self, h: usize) -> Result<String> {
        Ok(Self::lease_key_for(self.host_subnet(h)?))
    }

    /// Host `h`'s lease value in etcd, if present.
    pub fn get_lease(&self, h: usize) -> Result<Option<String>> {
        self.etcd.get(&self.lease_key(h)?)
    }

    /// Deletes host `h`'s lease from etcd; returns whether it was there.
    pub fn delete_lease(&self, h: usize) -> Result<bool> {
        self.etcd.delete(&self.lease_key(h)?)
    }

    // ----- pods -----

    fn cni_plugin(&mut self) -> Result<PathBuf> {
        if let Some(p) = &self.cni {
            return Ok(p.clone());
        }
        let p = find_binary("flannel")?;
        self.cni = Some(p.clone());
        Ok(p)
    }

    /// The netconf the lab hands the CNI plugin on host `h`.
    pub fn cni_netconf(&self, h: usize) -> Result<String> {
        let host = self.host(h)?;
        Ok(json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "type": "flannel",
            "subnetFile": host.subnet_file(),
            "dataDir": host.dir.join("cni-flannel"),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"dataDir": host.dir.join("cni-ipam")},
        })
        .to_string())
    }

    fn cni(&mut self, h: usize, pod_ns: &str, op: &str) -> Result<String> {
        let plugin = self.cni_plugin()?;
        let conf = self.cni_netconf(h)?;
        let host = self.host(h)?;
        let mut cmd = command("ip", &["netns", "exec", &host.ns]);
        cmd.arg(&plugin)
            .env("CNI_COMMAND", op)
            .env("CNI_CONTAINERID", pod_ns)
            .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH);
        let out = output_with_input(cmd, Some(conf.as_bytes()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(LabError::Cni {
                command: op.to_string(),
                pod: pod_ns.to_string(),
                host: host.ns.clone(),
                msg: format!(
                    "{}: {} {}",
                    status_text(&out.status),
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(stdout)
    }

    /// Creates a pod on host `h` through the CNI plugin; returns its id.
    pub fn add_pod(&mut self, h: usize) -> Result<PodId> {
        let host = self.host_mut(h)?;
        let ns = format!("{}p{}", host.ns, host.next_pod);
        host.next_pod += 1;
        self.add_namespace(&ns)?;
        let result = self.cni(h, &ns, "ADD").and_then(|out| {
            parse_cni_ipv4(&out).ok_or_else(|| LabError::Cni {
                command: "ADD".into(),
                pod: ns.clone(),
                host: self.hosts[h].ns.clone(),
                msg: format!("no IPv4 address in result {}", out.trim()),
            })
        });
        let ip4 = match result {
            Ok(a) => a,
            Err(e) => {
                let _ = self.cni(h, &ns, "DEL");
                let _ = ip(&["netns", "del", &ns]);
                return Err(e);
            }
        };
        let id = PodId(self.pods.len());
        self.pods.push(Some(Pod {
            id,
            ns,
            host: h,
            ip: ip4,
        }));
        Ok(id)
    }

    /// CNI DEL of a pod, then its namespace is deleted.
    pub fn remove_pod(&mut self, id: PodId) -> Result<()> {
        let pod = self
            .pods
            .get_mut(id.0)
            .and_then(Option::take)
            .ok_or_else(|| LabError::Invalid(format!("no pod {}", id.0)))?;
        let del = self.cni(pod.host, &pod.ns, "DEL");
        let rm = ip(&["netns", "del", &pod.ns]);
        del?;
        rm?;
        Ok(())
    }

    // ----- commands in namespaces -----

    /// `ip netns exec <ns> <args...>`; returns the output whatever the status.
    pub fn exec_in(&self, ns: &str, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = command("ip", &["netns", "exec", ns]);
        cmd.args(args);
        output_with_input(cmd, None)
    }

    /// `ip netns exec <ns> <args...>`, required to succeed; returns stdout.
    pub fn run_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut cmd = command("ip", &["netns", "exec", ns]);
        cmd.args(args);
        run(cmd)
    }

    /// `ip -n <ns> <args...>`, required to succeed; returns stdout.
    pub fn ip_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["-n", ns];
        v.extend_from_slice(args);
        ip(&v)
    }

    /// Starts a long-running command inside `ns` (killed when the returned
    /// [`Proc`] is dropped, and on teardown).
    pub fn spawn_in(&self, ns: &str, args: &[&str], out: ProcOutput) -> Result<Proc> {
        let mut cmd = command("ip", &["netns", "exec", ns]);
        cmd.args(args);
        Proc::spawn(
            cmd,
            &format!("{}@{ns}", args.first().copied().unwrap_or("?")),
            &self.prefix,
            out,
            self.die_with_parent,
        )
    }

    /// IPv4 routes of the main table in host `h`'s namespace, one line each.
    pub fn routes(&self, h: usize) -> Result<Vec<String>> {
        let ns = &self.host(h)?.ns;
        Ok(self
            .ip_in(ns, &["-4", "route", "show"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Host `h`'s route for exactly `subnet`, if any.
    pub fn route_to(&self, h: usize, subnet: Ipv4Net) -> Result<Option<String>> {
        let ns = &self.host(h)?.ns;
        let out = self.ip_in(ns, &["-4", "route", "show", "exact", &subnet.to_string()])?;
        Ok(out.lines().next().map(|l| l.trim().to_string()))
    }

    /// Neighbour entries on `dev` in host `h` (`ip neigh show dev <dev>`); empty
    /// if the device does not exist.
    pub fn neighbours(&self, h: usize, dev: &str) -> Result<Vec<String>> {
        let ns = &self.host(h)?.ns;
        Ok(self
            .ip_in(ns, &["neigh", "show", "dev", dev])
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// FDB entries of `dev` in host `h` (`bridge fdb show dev <dev>`); empty if
    /// the device does not exist.
    pub fn fdb(&self, h: usize, dev: &str) -> Result<Vec<String>> {
        let ns = &self.host(h)?.ns;
        Ok(
            run(command("bridge", &["-n", ns, "fdb", "show", "dev", dev]))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect(),
        )
    }

    /// `count` pings (0.2 s apart, 2 s reply timeout) from namespace `ns` to `to`.
    pub fn ping_from(&self, ns: &str, to: Ipv4Addr, count: u32) -> Result<PingStats> {
        let out = self.exec_in(
            ns,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                &to.to_string(),
            ],
        )?;
        parse_ping(&String::from_utf8_lossy(&out.stdout))
    }

    /// `count` pings from a pod to `to`.
    pub fn ping(&self, from: PodId, to: Ipv4Addr, count: u32) -> Result<PingStats> {
        let ns = self.pod(from)?.ns.clone();
        self.ping_from(&ns, to, count)
    }

    /// Waits until one ping from pod `from` to `to` gets its reply.
    pub fn wait_reachable(&self, from: PodId, to: Ipv4Addr) -> Result<()> {
        let ns = self.pod(from)?.ns.clone();
        poll_until(
            &format!("{to} to answer pings from {ns}"),
            self.timeout,
            Duration::from_millis(200),
            || Ok(self.ping_from(&ns, to, 1)?.all_replied()),
        )
    }

    /// iperf3 from `client_ns` to a one-shot server on `server_ip` in `server_ns`;
    /// returns the receiver's throughput in Gbit/s.
    pub fn iperf(
        &self,
        server_ns: &str,
        server_ip: Ipv4Addr,
        client_ns: &str,
        secs: u32,
        streams: u32,
    ) -> Result<f64> {
        let sip = server_ip.to_string();
        let mut server = self.spawn_in(
            server_ns,
            &["iperf3", "-s", "-1", "-B", &sip, "-p", "5201"],
            ProcOutput::Null,
        )?;
        let start = Instant::now();
        loop {
            let out = self.exec_in(
                client_ns,
                &[
                    "iperf3",
                    "-c",
                    &sip,
                    "-p",
                    "5201",
                    "-t",
                    &secs.to_string(),
                    "-P",
                    &streams.to_string(),
                    "-J",
                ],
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            match parse_iperf_bps(&text) {
                Ok(bps) => {
                    server.wait_timeout(Duration::from_secs(10));
                    return Ok(bps / 1e9);
                }
                // The server may not listen yet: retry until the deadline.
                Err(e) => {
                    if server.exited() || start.elapsed() >= self.timeout {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// iperf3 between two pods (`from` sends to `to`), Gbit/s.
    pub fn iperf_pods(&self, from: PodId, to: PodId, secs: u32, streams: u32) -> Result<f64> {
        let (a, b) = (self.pod(from)?.clone(), self.pod(to)?.clone());
        self.iperf(&b.ns, b.ip, &a.ns, secs, streams)
    }

    /// iperf3 between two hosts over the underlay, Gbit/s.
    pub fn iperf_hosts(&self, from: usize, to: usize, secs: u32, streams: u32) -> Result<f64> {
        let (a, b) = (self.host(from)?, self.host(to)?);
        self.iperf(&b.ns, b.ip, &a.ns, secs, streams)
    }

    /// Starts `ip monitor <objects>` in `ns` and waits until it demonstrably
    /// receives events.
    pub fn monitor(&self, ns: &str, objects: &[&str]) -> Result<Monitor> {
        Monitor::start(ns, objects).map_err(|e| LabError::io(format!("ip monitor in {ns}"), e))
    }

    // ----- teardown -----

    /// Leaves the lab running after this process exits; returns its prefix and run
    /// directory. Needs a lab built with [`LabBuilder::keepable`].
    pub fn into_kept(mut self) -> Result<(String, PathBuf)> {
        if self.die_with_parent {
            return Err(LabError::Invalid(
                "this lab's processes die with their parent: build it keepable".into(),
            ));
        }
        for h in &mut self.hosts {
            if let Some(a) = h.agent.take() {
                std::mem::forget(a);
            }
        }
        if let Some(e) = self.etcd_proc.take() {
            std::mem::forget(e);
        }
        self.kept = true;
        unregister_lab(&self.prefix);
        Ok((self.prefix.clone(), self.run_dir.clone()))
    }

    /// Tears everything down now: pods (CNI DEL), processes, namespaces, run
    /// directory. Every step runs even if an earlier one failed; the errors are
    /// returned together.
    pub fn teardown(mut self) -> Result<()> {
        let errors = self.teardown_inner();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LabError::Invalid(format!(
                "teardown of {}: {}",
                self.prefix,
                errors.join("; ")
            )))
        }
    }

    fn teardown_inner(&mut self) -> Vec<String> {
        if self.torn_down || self.kept {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        if std::thread::panicking() {
            self.dump_logs();
        }
        let ids: Vec<PodId> = self.pods().map(|p| p.id).collect();
        for id in ids {
            if let Err(e) = self.remove_pod(id) {
                // Only the CNI state in the run dir is left behind; it goes below.
                if !matches!(e, LabError::MissingBinary { .. }) {
                    errors.push(e.to_string());
                }
            }
        }
        for h in &mut self.hosts {
            if let Some(mut a) = h.agent.take() {
                if let Err(e) = a.kill() {
                    errors.push(e.to_string());
                }
            }
        }
        if let Some(mut e) = self.etcd_proc.take() {
            if let Err(e) = e.kill() {
                errors.push(e.to_string());
            }
        }
        errors.extend(
            delete_namespaces(&self.prefix)
                .into_iter()
                .map(|e| e.to_string()),
        );
        if std::env::var_os("FLANNEL_LAB_KEEP_RUN_DIR").is_none() {
            if let Err(e) = fs::remove_dir_all(&self.run_dir) {
                errors.push(format!("remove {}: {e}", self.run_dir.display()));
            }
        }
        unregister_lab(&self.prefix);
        errors
    }

    /// Prints the end of every log to stderr (used when a test panics).
    pub fn dump_logs(&self) {
        eprintln!(
            "===== flannel-lab {}: logs ({})",
            self.prefix,
            self.run_dir.display()
        );
        for h in &self.hosts {
            eprintln!(
                "----- {} flanneld.log (end)\n{}",
                h.ns,
                tail(&h.log_file(), 40)
            );
            if let Ok(s) = fs::read_to_string(h.subnet_file()) {
                eprintln!("----- {} subnet.env\n{s}", h.ns);
            }
        }
        eprintln!(
            "----- etcd.log (end)\n{}",
            tail(&self.run_dir.join("etcd.log"), 10)
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for e in self.teardown_inner() {
            eprintln!("flannel-lab: teardown of {}: {e}", self.prefix);
        }
    }
}

/// The last `n` lines of a file (empty if unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The first IPv4 address of a CNI result (`ips[].address`, `a.b.c.d/len`).
pub fn parse_cni_ipv4(result: &str) -> Option<Ipv4Addr> {
    let v: Value = serde_json::from_str(result).ok()?;
    v.get("ips")?.as_array()?.iter().find_map(|ipc| {
        let addr = ipc.get("address")?.as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_is_short() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        // The largest pid and a big counter still give link names within 15 bytes.
        let tag = format!("f{}x{}", base36(4_194_304), base36(99_999));
        assert!(format!("{tag}h253").len() <= 15, "{tag}");
    }

    #[test]
    fn cni_results() {
        let r = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.3.2/24","gateway":"10.244.3.1","interface":0}]}"#;
        assert_eq!(parse_cni_ipv4(r), Some(Ipv4Addr::new(10, 244, 3, 2)));
        assert_eq!(parse_cni_ipv4(r#"{"ips":[]}"#), None);
        assert_eq!(parse_cni_ipv4("{"), None);
    }

    #[test]
    fn subnet_files() {
        let s = SubnetFile::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.48.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        assert_eq!(s.subnet, "10.244.48.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!((s.mtu, s.ip_masq), (1450, true));
        assert!(SubnetFile::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.48.1/24\n"
        )
        .is_none());
    }

    #[test]
    fn lease_keys() {
        assert_eq!(
            Lab::lease_key_for("10.244.48.0/24".parse().unwrap()),
            "/coreos.com/network/subnets/10.244.48.0-24"
        );
    }
}
