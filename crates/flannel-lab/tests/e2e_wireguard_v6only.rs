//! End to end: the wireguard backend in an IPv6-only network (`EnableIPv4: false`),
//! which upstream allows in Kubernetes mode. Three hosts on the lab's dual-stack
//! underlay, the fake API server holding nodes with only an IPv6 pod CIDR.
//!
//! `separate` mode (the default) runs `flannel-wg-v6` alone on ListenPortV6: no
//! `flannel-wg`, no IPv4 route or address of ours, `backend-v6-data` in Go's
//! bytes and no IPv4 annotations; every pod pings every other over IPv6 through
//! WireGuard, a kill -9 restart takes the device over without losing a ping, and
//! a deleted node's peer goes. The one-device modes are refused
//! with an error naming `separate`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::kube_fake::{node_name, KubeFake};
use flannel_lab::uapi::{key_hex, parse_get as uapi};
use flannel_lab::{poll_until, Lab, PodId};
use ipnet::Ipv6Net;

const DEADLINE: Duration = Duration::from_secs(90);

/// Pod CIDRs as kube-controller-manager would give them for `fd10:244::/56`.
const V6_CIDRS: [&str; 3] = [
    "fd10:244:0:11::/64",
    "fd10:244:0:22::/64",
    "fd10:244:0:33::/64",
];

fn net_conf(backend: &str) -> String {
    format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{backend}}}"#
    )
}

fn kube_lab(test: &str, hosts: usize, conf: &str) -> Option<(Lab, KubeFake)> {
    if !ready_with(test, Needs::Agents, &["wg"]) {
        return None;
    }
    let mut lab = Lab::builder()
        .hosts(hosts)
        .ipv6(true)
        .backend("wireguard")
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let fake = KubeFake::start(&mut lab, conf).expect("fake API server");
    for (h, c) in V6_CIDRS.iter().enumerate().take(hosts) {
        fake.create_node(&node_name(h), &[c]).expect("create node");
    }
    Some((lab, fake))
}

fn pod_ip6(lab: &Lab, p: PodId) -> IpAddr {
    lab.pod(p)
        .unwrap()
        .ip6
        .expect("pod has an IPv6 address")
        .into()
}

#[test]
fn kube_wireguard_ipv6_only_end_to_end() {
    let conf = net_conf(r#"{"Type":"wireguard"}"#);
    let Some((mut lab, fake)) = kube_lab("kube wireguard IPv6-only", 3, &conf) else {
        return;
    };
    for h in 0..3 {
        lab.spawn_agent(h).expect("flanneld");
    }
    let mut keys = Vec::new();
    for (h, c) in V6_CIDRS.iter().enumerate() {
        let text = lab.wait_subnet_env_text(h).unwrap();
        let gw6 = c.replace("::/64", "::1/64");
        assert_eq!(
            text,
            format!(
                "FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET={gw6}\n\
                 FLANNEL_MTU=1420\nFLANNEL_IPMASQ=true\n"
            ),
            "subnet.env of host {h}"
        );
        // `wg pubkey` of the key file: an independent derivation of what the
        // agent must publish.
        let key = lab.wireguard_public_key(h).unwrap();
        // Go's newSubnetAttrs: BackendV6Data only; the store then publishes
        // neither backend-data nor public-ip (wireguard with null v4 data).
        let want: BTreeMap<String, String> = [
            ("backend-type", "wireguard".to_string()),
            (
                "backend-v6-data",
                format!(r#"{{"PublicKey":"{key}","Port":51821}}"#),
            ),
            ("public-ipv6", lab.hosts()[h].ip6.unwrap().to_string()),
            ("kube-subnet-manager", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(
            fake.annotations(&node_name(h)).unwrap(),
            want,
            "annotations of {}",
            node_name(h)
        );
        keys.push(key);

        let ns = lab.hosts()[h].ns.clone();
        let link = lab
            .ip_in(&ns, &["-o", "link", "show", "flannel-wg-v6"])
            .expect("flannel-wg-v6 exists");
        assert!(link.contains("mtu 1420") && link.contains(",UP"), "{link}");
        assert!(
            lab.ip_in(&ns, &["link", "show", "flannel-wg"]).is_err(),
            "host {h}: flannel-wg in an IPv6-only network"
        );
        let addr = lab
            .ip_in(
                &ns,
                &[
                    "-o",
                    "-6",
                    "addr",
                    "show",
                    "dev",
                    "flannel-wg-v6",
                    "scope",
                    "global",
                ],
            )
            .unwrap();
        let own: Ipv6Net = c.parse().unwrap();
        assert_eq!(addr.lines().count(), 1, "{addr}");
        assert!(
            addr.contains(&format!("inet6 {}/128", own.network())),
            "{addr}"
        );
        let route = lab
            .ip_in(&ns, &["-6", "route", "show", "exact", "fd10:244::/56"])
            .unwrap();
        assert!(
            route.contains("dev flannel-wg-v6 proto 70") && route.contains("pref medium"),
            "{route}"
        );
        assert!(
            !std::path::Path::new(&lab.hosts()[h].wireguard_socket()).exists(),
            "host {h}: a UAPI socket for flannel-wg"
        );
    }

    // `wg show flannel-wg-v6`: the two other nodes at [public-ipv6]:51821.
    for h in 0..3 {
        let want: BTreeMap<_, _> = (0..3)
            .filter(|&o| o != h)
            .map(|o| {
                (
                    key_hex(&keys[o]),
                    (
                        format!("[{}]:51821", lab.hosts()[o].ip6.unwrap()),
                        vec![V6_CIDRS[o].to_string()],
                    ),
                )
            })
            .collect();
        poll_until(
            &format!("host {h}: both peers on flannel-wg-v6"),
            DEADLINE,
            Duration::from_millis(100),
            || {
                let (port, peers) = uapi(&lab.wireguard_uapi_get_of(h, "flannel-wg-v6")?);
                Ok(port == "51821" && peers == want)
            },
        )
        .unwrap();
    }

    let pods: Vec<PodId> = (0..3)
        .map(|h| lab.add_pod_ipv6_only(h).expect("IPv6-only pod"))
        .collect();
    for &a in &pods {
        for &b in &pods {
            if a != b {
                lab.wait_reachable_ip(a, pod_ip6(&lab, b))
                    .expect("v6 reachable");
                let st = lab.ping_ip(a, pod_ip6(&lab, b), 3).unwrap();
                assert!(st.all_replied(), "{a:?} -> {b:?}: {st:?}");
            }
        }
    }
    for h in 0..3 {
        let v4 = lab
            .ip_in(&lab.hosts()[h].ns, &["-4", "route", "show", "proto", "70"])
            .unwrap();
        assert!(v4.trim().is_empty(), "host {h}: IPv4 routes {v4}");
        // The pings went through WireGuard: handshakes with both peers.
        let text = lab.wireguard_uapi_get_of(h, "flannel-wg-v6").unwrap();
        let handshakes = text
            .lines()
            .filter(|l| {
                l.strip_prefix("last_handshake_time_sec=")
                    .is_some_and(|v| v != "0")
            })
            .count();
        assert_eq!(handshakes, 2, "host {h}: {text}");
    }
    println!("IPv6-only kube cluster on wireguard: flannel-wg-v6 alone, every pair of pods pings");

    // kill -9 and restart host 1: the keeper held flannel-wg-v6 and the new agent
    // takes it over; v6 pings out of the restarted host lose nothing.
    let out_of = lab
        .start_ping_ip(pods[1], pod_ip6(&lab, pods[2]), 40)
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    lab.kill_agent(1).unwrap();
    lab.spawn_agent(1).unwrap();
    let mut v6_line = String::new();
    poll_until(
        "the restarted agent's flannel-wg-v6",
        DEADLINE,
        Duration::from_millis(50),
        || {
            lab.check_agent(1)?;
            let log = lab.agent_log(1)?;
            let last_start = log
                .rsplit("===== flannel-lab: starting")
                .next()
                .unwrap_or("");
            v6_line = last_start
                .lines()
                .find(|l| l.contains("wireguard backend started"))
                .unwrap_or("")
                .to_string();
            Ok(!v6_line.is_empty())
        },
    )
    .unwrap();
    assert!(
        v6_line.contains("flannel-wg-v6") && v6_line.contains("inherited=true"),
        "{v6_line}"
    );
    let st = out_of.finish(DEADLINE).expect("ping");
    eprintln!("kill -9 restart, IPv6-only: pings out of the restarted host {st:?}");
    assert!(
        st.all_replied(),
        "v6 pings out of the restarted host lost: {st:?}"
    );
    assert!(
        lab.ip_in(&lab.hosts()[1].ns, &["link", "show", "flannel-wg"])
            .is_err(),
        "flannel-wg after the restart"
    );
    poll_until(
        "host 1: both peers again after the restart",
        DEADLINE,
        Duration::from_millis(100),
        || {
            let (_, peers) = uapi(&lab.wireguard_uapi_get_of(1, "flannel-wg-v6")?);
            Ok(peers.len() == 2)
        },
    )
    .unwrap();

    // A deleted node's peer goes; the others keep talking.
    fake.delete_node(&node_name(2)).unwrap();
    for h in 0..2 {
        poll_until(
            &format!("host {h}: node-3's peer to go"),
            DEADLINE,
            Duration::from_millis(100),
            || {
                let (_, peers) = uapi(&lab.wireguard_uapi_get_of(h, "flannel-wg-v6")?);
                Ok(!peers.contains_key(&key_hex(&keys[2])) && peers.len() == 1)
            },
        )
        .unwrap();
    }
    assert!(lab
        .ping_ip(pods[0], pod_ip6(&lab, pods[1]), 2)
        .unwrap()
        .all_replied());
    lab.check_agents().unwrap();
}

/// `auto`, `ipv4` and `ipv6` in an IPv6-only network: flanneld exits 1 naming
/// `separate`, and publishes nothing.
#[test]
fn kube_wireguard_ipv6_only_single_device_modes_are_refused() {
    for mode in ["auto", "ipv4", "ipv6"] {
        let conf = net_conf(&format!(r#"{{"Type":"wireguard","Mode":"{mode}"}}"#));
        let Some((mut lab, fake)) = kube_lab("kube wireguard IPv6-only refusal", 1, &conf) else {
            return;
        };
        lab.spawn_agent(0).expect("flanneld");
        let st = lab
            .wait_agent_exit(0, &format!("refusing Mode {mode}"))
            .unwrap();
        assert_eq!(st.code(), Some(1), "Mode {mode}: exit status {st}");
        let log = lab.agent_log(0).unwrap();
        assert!(
            log.contains(&format!(
                "Mode \"{mode}\" is not supported in an IPv6-only network"
            )) && log.contains("use Mode \"separate\""),
            "{log}"
        );
        let ns = lab.hosts()[0].ns.clone();
        for dev in ["flannel-wg", "flannel-wg-v6"] {
            assert!(
                lab.ip_in(&ns, &["link", "show", dev]).is_err(),
                "{mode}: {dev}"
            );
        }
        assert!(
            !fake
                .annotations(&node_name(0))
                .unwrap()
                .contains_key("backend-type"),
            "Mode {mode}: published"
        );
    }
}
