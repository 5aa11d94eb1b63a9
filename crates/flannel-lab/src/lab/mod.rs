//! A flannel cluster on one machine: an underlay namespace with a bridge and etcd,
//! N host namespaces each running flanneld, pods made through the CNI plugin.

mod agents;
mod builder;
mod commands;
mod etcd_cluster;
mod pods;
mod teardown;

pub use builder::LabBuilder;
pub use commands::BackgroundPing;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flannel_core::lease::LeaseKey;
use flannel_core::subnet_env::{parse_env_lines, SubnetEnv};
use flannel_testkit::Monitor;
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{json, Value};

use crate::bins::{find_binary, find_tool};
use crate::cleanup::{
    delete_namespaces, install_signal_teardown, lab_prefix_of, runs_root, NAME_PREFIX,
};
use crate::error::{LabError, Result};
use crate::etcd::{etcd_args, Etcd, EtcdMember};
use crate::measure::{parse_iperf_bps, parse_ping, rss, PingStats, Rss};
use crate::process::{
    command, ip, output_with_input, register_lab, run, status_text, unregister_lab, while_alive,
    Proc, ProcOutput,
};

/// The underlay bridge's address inside the underlay namespace; etcd listens here
/// (every member of a cluster on its own port).
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Prefix length of the underlay (198.18.0.0/24).
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The IPv6 underlay (with [`LabBuilder::ipv6`]): a ULA /64 on the same bridge.
pub const UNDERLAY_V6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd18, 0x198, 0x18, 0, 0, 0, 0, 0);
/// Prefix length of the IPv6 underlay.
pub const UNDERLAY_V6_PREFIX_LEN: u8 = 64;
/// The underlay bridge's IPv6 address (`::fe` of the prefix).
pub const UNDERLAY_V6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd18, 0x198, 0x18, 0, 0, 0, 0, 0xfe);

/// Host `number`'s IPv6 underlay address (`::<number>` of the prefix).
pub fn underlay_v6(number: usize) -> Ipv6Addr {
    let mut s = UNDERLAY_V6_PREFIX.segments();
    s[7] = number as u16;
    Ipv6Addr::from(s)
}

/// etcd's client port (of the first member; see [`EtcdMember::nth`]).
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
    /// The IPv6 lease subnet (`FLANNEL_IPV6_SUBNET`), in a dual-stack network.
    pub ipv6_subnet: Option<Ipv6Net>,
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
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ip_masq = false;
        for (k, v) in parse_env_lines(text) {
            match k.as_str() {
                "FLANNEL_NETWORK" => network = v.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
                "FLANNEL_SUBNET" => subnet = v.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
                "FLANNEL_IPV6_SUBNET" => ipv6_subnet = v.parse::<Ipv6Net>().ok().map(|n| n.trunc()),
                "FLANNEL_MTU" => mtu = v.parse().ok(),
                "FLANNEL_IPMASQ" => ip_masq = v == "true",
                _ => {}
            }
        }
        Some(SubnetFile {
            network,
            subnet: subnet?,
            ipv6_subnet,
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
    /// Its IPv6 underlay address ([`underlay_v6`]) if the lab has an IPv6 underlay.
    pub ip6: Option<Ipv6Addr>,
    /// Its underlay interface (inside its namespace).
    pub link: String,
    /// Its directory in the run dir: subnet.env, flanneld.log, CNI state.
    pub dir: PathBuf,
    agent: Option<Proc>,
    /// Set by [`Lab::set_agent_wrapper`]: a command the agent runs under and the
    /// flanneld path as that command sees it.
    agent_wrapper: Option<(Vec<String>, PathBuf)>,
    /// Set by [`Lab::set_agent_iface_args`]: what replaces `--iface=<ip>`.
    iface_args: Option<Vec<String>>,
    next_pod: usize,
}

impl Host {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }
    /// The wireguard backend's private key file (`WIREGUARD_KEY_FILE`).
    pub fn wireguard_key_file(&self) -> PathBuf {
        self.dir.join("wgkey")
    }
    /// The environment that gives this host's agent its own files, as its own
    /// machine would have (the hosts share one filesystem): the wireguard key and
    /// the wireguard UAPI socket's directory.
    pub fn own_files_env(&self) -> [(&'static str, PathBuf); 2] {
        [
            ("WIREGUARD_KEY_FILE", self.wireguard_key_file()),
            ("FLANNEL_WG_SOCKET_DIR", self.dir.join("wireguard")),
        ]
    }
    /// The wireguard agent's UAPI socket (`wg show` finds it only under
    /// /var/run/wireguard, so the lab talks to it directly).
    pub fn wireguard_socket(&self) -> PathBuf {
        self.wireguard_socket_of("flannel-wg")
    }
    /// The UAPI socket of wireguard device `device` (e.g. `flannel-wg-v6`).
    pub fn wireguard_socket_of(&self, device: &str) -> PathBuf {
        self.dir.join(format!("wireguard/{device}.sock"))
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("flanneld.log")
    }
}

/// An address family of the lab (IPv6 needs [`LabBuilder::ipv6`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl Host {
    /// Its underlay address of `family` (None: IPv6 without an IPv6 underlay).
    pub fn addr(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => Some(IpAddr::V4(self.ip)),
            Family::V6 => self.ip6.map(IpAddr::V6),
        }
    }
}

impl Pod {
    /// Its address of `family` (None: the pod has no IPv6 address).
    pub fn addr(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => Some(IpAddr::V4(self.ip)),
            Family::V6 => self.ip6.map(IpAddr::V6),
        }
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
    /// The address the CNI plugin gave it (`0.0.0.0` for a pod of an IPv6-only
    /// network, [`Lab::add_pod_ipv6_only`]).
    pub ip: Ipv4Addr,
    /// Its IPv6 address, if the CNI plugin gave it one (dual stack).
    pub ip6: Option<Ipv6Addr>,
}

/// A callback receiving one line per build step.
pub type Progress = Box<dyn FnMut(&str)>;

/// A running lab. Dropping it tears everything down (also while panicking).
pub struct Lab {
    prefix: String,
    tag: String,
    run_dir: PathBuf,
    under: String,
    etcd: Etcd,
    /// The members of the lab's etcd, and their processes while they run.
    etcd_members: Vec<EtcdMember>,
    etcd_procs: Vec<Option<Proc>>,
    config: String,
    hosts: Vec<Host>,
    pods: Vec<Option<Pod>>,
    flanneld: Option<PathBuf>,
    cni: Option<PathBuf>,
    ipv6: bool,
    ip_masq: bool,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    die_with_parent: bool,
    timeout: Duration,
    torn_down: bool,
    kept: bool,
}

impl Lab {
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

/// The first IPv6 address of a CNI result.
pub fn parse_cni_ipv6(result: &str) -> Option<Ipv6Addr> {
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
        assert_eq!(parse_cni_ipv6(r), None);
        let dual = r#"{"ips":[{"address":"10.244.3.2/24"},{"address":"fd10:244:0:3::2/64"}]}"#;
        assert_eq!(parse_cni_ipv4(dual), Some(Ipv4Addr::new(10, 244, 3, 2)));
        assert_eq!(
            parse_cni_ipv6(dual),
            Some("fd10:244:0:3::2".parse().unwrap())
        );
    }

    #[test]
    fn underlay_v6_addresses() {
        assert_eq!(underlay_v6(3).to_string(), "fd18:198:18::3");
        assert_eq!(UNDERLAY_V6_GATEWAY.to_string(), "fd18:198:18::fe");
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
