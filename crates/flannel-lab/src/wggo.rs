//! The wireguard-go anchor of the bench: Debian's `wireguard-go`, configured with
//! `wg`, between two lab hosts, carrying traffic between two pod-like namespaces
//! (a veth into each host, as a pod has), so the wireguard backend's figures have
//! an independent userspace WireGuard measured on the same hosts in the same run.
//!
//! It runs beside the agents' own devices: its own device (`<tag>g<host number>`), port
//! (51830), key and addresses (10.98.<host>.0/24 "pods", 10.99.0.<host>/32 on the
//! device), so it shares nothing with flannel but the underlay.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::error::{LabError, Result};
use crate::lab::{poll_until, Lab};
use crate::process::{ip, Proc, ProcOutput};

/// wireguard-go's listen port (the agents use 51820).
const PORT: u16 = 51830;

/// A running pair; dropping it kills both wireguard-go processes (their devices
/// go with them, the namespaces with the lab).
pub struct WgGoPair {
    procs: Vec<Proc>,
    /// The pod-like namespace on each of the two hosts.
    pub pod_ns: [String; 2],
    /// Their addresses.
    pub pod_ip: [Ipv4Addr; 2],
}

impl WgGoPair {
    /// The wireguard-go processes' pids (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// iperf3 from the pod-like namespace on the first host to the second's,
    /// Gbit/s.
    pub fn iperf(&self, lab: &Lab, secs: u32, streams: u32) -> Result<f64> {
        lab.iperf(
            &self.pod_ns[1],
            self.pod_ip[1],
            &self.pod_ns[0],
            secs,
            streams,
        )
    }
}

fn dev_name(lab: &Lab, number: usize) -> String {
    format!("{}g{number}", lab.link_tag())
}

/// Sets up wireguard-go between hosts `hosts[0]` and `hosts[1]` of `lab`, with
/// `mtu` on the devices (the agents' MTU, for a like-for-like comparison).
pub fn start(lab: &Lab, hosts: [usize; 2], mtu: u32) -> Result<WgGoPair> {
    let mut procs = Vec::new();
    let mut pubkeys = Vec::new();
    let mut pod_ns: Vec<String> = Vec::new();
    let mut pod_ip = Vec::new();
    for &h in &hosts {
        let host = lab.host(h)?;
        let (ns, number, dir) = (host.ns.clone(), host.number, host.dir.clone());
        // The UAPI socket (/var/run/wireguard/<dev>.sock) is shared by all
        // namespaces: each host's device needs its own name.
        let dev = dev_name(lab, number);
        let keyfile = dir.join("wggo.key");
        let key = lab.run_in(&ns, &["wg", "genkey"])?;
        std::fs::write(&keyfile, key.trim())
            .map_err(|e| LabError::io(format!("write {}", keyfile.display()), e))?;
        let k = keyfile.display().to_string();
        pubkeys.push(
            lab.run_in(&ns, &["sh", "-c", &format!("wg pubkey < {k}")])?
                .trim()
                .to_string(),
        );
        procs.push(lab.spawn_in(
            &ns,
            &["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", &dev],
            ProcOutput::File(dir.join("wireguard-go.log")),
        )?);
        poll_until(
            "wireguard-go's device",
            lab.timeout(),
            Duration::from_millis(100),
            || {
                Ok(lab
                    .exec_in(&ns, &["ip", "link", "show", &dev])?
                    .status
                    .success())
            },
        )?;
        lab.run_in(
            &ns,
            &[
                "wg",
                "set",
                &dev,
                "listen-port",
                &PORT.to_string(),
                "private-key",
                &k,
            ],
        )?;
        lab.ip_in(
            &ns,
            &["addr", "add", &format!("10.99.0.{number}/32"), "dev", &dev],
        )?;
        lab.ip_in(&ns, &["link", "set", &dev, "mtu", &mtu.to_string(), "up"])?;
        lab.ip_in(
            &ns,
            &["route", "add", "10.98.0.0/16", "dev", &dev, "scope", "link"],
        )?;
        // The pod-like namespace: a veth pair created inside the host namespace
        // with its peer moved straight into the new one (nothing in the root
        // namespace); the name starts with the lab prefix, so teardown removes it.
        let pns = format!("{}-h{number}wg", lab.prefix());
        ip(&["netns", "add", &pns])?;
        ip(&["-n", &pns, "link", "set", "lo", "up"])?;
        let (a, b) = (
            format!("{}g{number}a", lab.link_tag()),
            format!("{}g{number}b", lab.link_tag()),
        );
        lab.ip_in(
            &ns,
            &[
                "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &pns,
            ],
        )?;
        lab.ip_in(
            &ns,
            &["addr", "add", &format!("10.98.{number}.1/24"), "dev", &a],
        )?;
        lab.ip_in(&ns, &["link", "set", &a, "up"])?;
        let pip = Ipv4Addr::new(10, 98, number as u8, 2);
        lab.ip_in(&pns, &["addr", "add", &format!("{pip}/24"), "dev", &b])?;
        lab.ip_in(&pns, &["link", "set", &b, "up"])?;
        lab.ip_in(
            &pns,
            &[
                "route",
                "add",
                "default",
                "via",
                &format!("10.98.{number}.1"),
            ],
        )?;
        pod_ns.push(pns);
        pod_ip.push(pip);
    }
    for (side, &h) in hosts.iter().enumerate() {
        let other = 1 - side;
        let peer = lab.host(hosts[other])?;
        let host = lab.host(h)?;
        let (ns, dev) = (host.ns.clone(), dev_name(lab, host.number));
        lab.run_in(
            &ns,
            &[
                "wg",
                "set",
                &dev,
                "peer",
                &pubkeys[other],
                "endpoint",
                &format!("{}:{PORT}", peer.ip),
                "allowed-ips",
                &format!("10.98.{}.0/24,10.99.0.{}/32", peer.number, peer.number),
            ],
        )?;
    }
    let pair = WgGoPair {
        procs,
        pod_ns: [pod_ns[0].clone(), pod_ns[1].clone()],
        pod_ip: [pod_ip[0], pod_ip[1]],
    };
    poll_until(
        "a ping over wireguard-go",
        lab.timeout(),
        Duration::from_millis(200),
        || {
            Ok(lab
                .ping_from(&pair.pod_ns[0], pair.pod_ip[1], 1)?
                .all_replied())
        },
    )?;
    Ok(pair)
}
