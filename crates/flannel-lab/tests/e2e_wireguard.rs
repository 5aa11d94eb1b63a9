//! End-to-end: the wireguard backend (userspace, no kernel module) in a namespace lab.
//!
//! Three hosts run flanneld with `{"Type":"wireguard"}`, a fourth runs wireguard-go
//! (an independent WireGuard) configured by hand from the leases, as a Go flanneld
//! node with kernel WireGuard would be. Checked:
//! * the lease is upstream's (`BackendType` wireguard, `{"PublicKey","Port"}`) and its
//!   key is the key file's (derived by `wg pubkey`, not by us);
//! * the device: `flannel-wg`, MTU 1420 on a 1500 underlay, `<subnet IP>/32`, the
//!   network routed over it with scope link;
//! * every pod reaches every other pod, and reaches the wireguard-go node, whose
//!   traffic shows up in its own `wg show` transfer counters;
//! * a restarted agent keeps its key (the same public key in its lease) and the mesh
//!   comes back.

use std::time::Duration;

use flannel_core::{LeaseAttrs, WireguardData};
use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::{poll_until, Lab, PodId};
use ipnet::Ipv4Net;

const DEADLINE: Duration = Duration::from_secs(90);
const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.200.0","Backend":{"Type":"wireguard"}}"#;
/// The wireguard-go node's made-up lease.
const WGGO_SUBNET: &str = "10.244.250.0/24";

fn lease_attrs(lab: &Lab, h: usize) -> LeaseAttrs {
    let v = lab.get_lease(h).unwrap().expect("lease in etcd");
    LeaseAttrs::decode(&v).unwrap()
}

fn wg_pubkey_of_file(lab: &Lab, h: usize) -> String {
    let key = std::fs::read_to_string(lab.hosts()[h].dir.join("wgkey")).expect("key file");
    let out = lab
        .exec_in(
            &lab.hosts()[h].ns,
            &[
                "sh",
                "-c",
                &format!("printf %s '{}' | wg pubkey", key.trim()),
            ],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn wireguard_mesh_with_a_wireguard_go_peer() {
    if !ready_with("e2e_wireguard", Needs::Agents, &["wg", "wireguard-go"]) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(4)
        .config_json(CONFIG)
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    for h in 0..3 {
        lab.start_agent(h).unwrap();
    }

    // Leases and devices as upstream's.
    for h in 0..3 {
        let a = lease_attrs(&lab, h);
        assert_eq!(a.backend_type, "wireguard");
        let raw = a.backend_data.as_ref().expect("BackendData");
        let d = WireguardData::decode(raw).unwrap();
        assert_eq!(
            raw.get(),
            format!(r#"{{"PublicKey":"{}","Port":51820}}"#, d.public_key)
        );
        assert_eq!(d.public_key.to_string(), wg_pubkey_of_file(&lab, h));
        let ns = lab.hosts()[h].ns.clone();
        let link = lab
            .ip_in(&ns, &["-o", "link", "show", "flannel-wg"])
            .unwrap();
        assert!(link.contains("mtu 1420"), "{link}");
        let sub = lab.host_subnet(h).unwrap();
        let addr = lab
            .ip_in(&ns, &["-o", "-4", "addr", "show", "dev", "flannel-wg"])
            .unwrap();
        assert!(addr.contains(&format!("{}/32", sub.network())), "{addr}");
        let route = lab
            .ip_in(&ns, &["route", "show", "exact", "10.244.0.0/16"])
            .unwrap();
        assert!(
            route.contains("dev flannel-wg") && route.contains("scope link"),
            "{route}"
        );
        assert_eq!(lab.subnet_file(h).unwrap().unwrap().mtu, 1420);
    }

    // The wireguard-go node: its own device, address, route and key, and a lease
    // written as a flanneld would write it.
    let wgns = lab.hosts()[3].ns.clone();
    let dev = format!("{}wg", lab.link_tag());
    let key = lab
        .run_in(&wgns, &["wg", "genkey"])
        .unwrap()
        .trim()
        .to_string();
    let keyfile = lab.hosts()[3].dir.join("wggo.key");
    std::fs::write(&keyfile, &key).unwrap();
    let pubkey = lab
        .run_in(
            &wgns,
            &["sh", "-c", &format!("wg pubkey < {}", keyfile.display())],
        )
        .unwrap()
        .trim()
        .to_string();
    let mut wggo = lab
        .spawn_in(
            &wgns,
            &["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", &dev],
            flannel_lab::process::ProcOutput::File(lab.hosts()[3].dir.join("wireguard-go.log")),
        )
        .unwrap();
    poll_until(
        "wireguard-go's device",
        DEADLINE,
        Duration::from_millis(100),
        || {
            Ok(lab
                .exec_in(&wgns, &["ip", "link", "show", &dev])?
                .status
                .success())
        },
    )
    .unwrap();
    let subnet: Ipv4Net = WGGO_SUBNET.parse().unwrap();
    let wg_ip = "10.244.250.1";
    lab.run_in(
        &wgns,
        &[
            "wg",
            "set",
            &dev,
            "listen-port",
            "51820",
            "private-key",
            &keyfile.display().to_string(),
        ],
    )
    .unwrap();
    lab.ip_in(&wgns, &["addr", "add", &format!("{wg_ip}/32"), "dev", &dev])
        .unwrap();
    lab.ip_in(&wgns, &["link", "set", &dev, "mtu", "1420", "up"])
        .unwrap();
    lab.ip_in(
        &wgns,
        &[
            "route",
            "add",
            "10.244.0.0/16",
            "dev",
            &dev,
            "scope",
            "link",
        ],
    )
    .unwrap();
    for h in 0..3 {
        let a = lease_attrs(&lab, h);
        let d = WireguardData::decode(a.backend_data.as_ref().unwrap()).unwrap();
        lab.run_in(
            &wgns,
            &[
                "wg",
                "set",
                &dev,
                "peer",
                &d.public_key.to_string(),
                "endpoint",
                &format!("{}:{}", a.public_ip, d.port),
                "allowed-ips",
                &lab.host_subnet(h).unwrap().to_string(),
            ],
        )
        .unwrap();
    }
    let mut attrs = LeaseAttrs::new(lab.hosts()[3].ip);
    attrs.backend_type = "wireguard".into();
    attrs.backend_data = Some(
        WireguardData {
            public_key: pubkey.parse().unwrap(),
            port: 51820,
        }
        .encode(),
    );
    lab.etcd()
        .put_leased(&Lab::lease_key_for(subnet), &attrs.encode(), 24 * 3600)
        .unwrap();

    // Pods on the three flanneld hosts reach each other and the wireguard-go node.
    let pods: Vec<PodId> = (0..3).map(|h| lab.add_pod(h).unwrap()).collect();
    for &a in &pods {
        for &b in &pods {
            if a != b {
                lab.wait_reachable(a, lab.pod(b).unwrap().ip).unwrap();
            }
        }
        lab.wait_reachable(a, wg_ip.parse().unwrap()).unwrap();
    }
    let dump = lab.run_in(&wgns, &["wg", "show", &dev, "dump"]).unwrap();
    for line in dump.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_ne!(
            f[4], "0",
            "wireguard-go never completed a handshake with a peer: {dump}"
        );
        assert!(
            f[5].parse::<u64>().unwrap() > 0,
            "no bytes from a peer: {dump}"
        );
    }

    // A restart keeps the key, and the mesh comes back.
    let before = lease_attrs(&lab, 0).backend_data.unwrap().get().to_string();
    lab.stop_agent(0).unwrap();
    lab.start_agent(0).unwrap();
    assert_eq!(lease_attrs(&lab, 0).backend_data.unwrap().get(), before);
    lab.wait_reachable(pods[1], lab.pod(pods[0]).unwrap().ip)
        .unwrap();
    lab.wait_reachable(pods[0], wg_ip.parse().unwrap()).unwrap();
    let _ = wggo.kill();
}
