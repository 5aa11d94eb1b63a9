//! End to end: the wireguard backend (`separate` mode) in a dual-stack Kubernetes
//! cluster: nodes with an IPv4 and an IPv6 `podCIDRs` entry, both devices, the
//! four annotations in Go's bytes, and every pod pair pinging over both families.

use std::collections::BTreeMap;
use std::time::Duration;

use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::kube_fake::{node_name, KubeFake};
use flannel_lab::uapi::{key_hex, parse_get as uapi};
use flannel_lab::{poll_until, Lab, PodId};

const DEADLINE: Duration = Duration::from_secs(90);
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"wireguard"}}"#;
const V4_CIDRS: [&str; 2] = ["10.244.11.0/24", "10.244.22.0/24"];
const V6_CIDRS: [&str; 2] = ["fd10:244:0:11::/64", "fd10:244:0:22::/64"];

#[test]
fn kube_wireguard_dual_stack_end_to_end() {
    if !ready_with("kube wireguard dual stack", Needs::Agents, &["wg"]) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .ipv6(true)
        .backend("wireguard")
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let fake = KubeFake::start(&mut lab, NET_CONF).expect("fake API server");
    for h in 0..2 {
        fake.create_node(&node_name(h), &[V4_CIDRS[h], V6_CIDRS[h]])
            .expect("create node");
    }
    for h in 0..2 {
        lab.start_agent(h).expect("flanneld");
    }
    let mut keys = Vec::new();
    for h in 0..2 {
        let text = std::fs::read_to_string(lab.hosts()[h].subnet_file()).unwrap();
        assert_eq!(
            text,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}\n\
                 FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET={}\n\
                 FLANNEL_MTU=1420\nFLANNEL_IPMASQ=true\n",
                V4_CIDRS[h].replace(".0/24", ".1/24"),
                V6_CIDRS[h].replace("::/64", "::1/64")
            ),
            "subnet.env of host {h}"
        );
        let key = lab.wireguard_public_key(h).unwrap();
        let host = &lab.hosts()[h];
        let want: BTreeMap<String, String> = [
            ("backend-type", "wireguard".to_string()),
            (
                "backend-data",
                format!(r#"{{"PublicKey":"{key}","Port":51820}}"#),
            ),
            ("public-ip", host.ip.to_string()),
            (
                "backend-v6-data",
                format!(r#"{{"PublicKey":"{key}","Port":51821}}"#),
            ),
            ("public-ipv6", host.ip6.unwrap().to_string()),
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
    }
    for h in 0..2 {
        let o = 1 - h;
        let peer = |dev: &str, endpoint: String, allowed: &str| {
            let want: BTreeMap<_, _> =
                [(key_hex(&keys[o]), (endpoint, vec![allowed.to_string()]))].into();
            poll_until(
                &format!("host {h}: the peer on {dev}"),
                DEADLINE,
                Duration::from_millis(100),
                || Ok(uapi(&lab.wireguard_uapi_get_of(h, dev)?).1 == want),
            )
            .unwrap();
        };
        peer(
            "flannel-wg",
            format!("{}:51820", lab.hosts()[o].ip),
            V4_CIDRS[o],
        );
        peer(
            "flannel-wg-v6",
            format!("[{}]:51821", lab.hosts()[o].ip6.unwrap()),
            V6_CIDRS[o],
        );
    }
    let pods: Vec<PodId> = (0..2).map(|h| lab.add_pod(h).expect("pod")).collect();
    for (a, b) in [(pods[0], pods[1]), (pods[1], pods[0])] {
        let dst = lab.pod(b).unwrap().clone();
        let ip6 = dst.ip6.expect("a v6 pod address");
        lab.wait_reachable(a, dst.ip).expect("v4 reachable");
        lab.wait_reachable_ip(a, ip6.into()).expect("v6 reachable");
        assert!(lab.ping(a, dst.ip, 3).unwrap().all_replied());
        assert!(lab.ping_ip(a, ip6.into(), 3).unwrap().all_replied());
    }
    println!("dual-stack kube cluster on wireguard: both devices, both families ping");
    lab.check_agents().unwrap();
}
