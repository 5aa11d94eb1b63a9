//! End to end: the Kubernetes subnet manager with IPv6. Three hosts on a dual-stack
//! underlay, the fake API server (`flannel-kube-fake`) holding their Node objects,
//! host-gw as the backend (and vxlan for IPv6-only).
//!
//! 1. Dual stack: nodes with an IPv4 and an IPv6 `podCIDRs` entry. subnet.env and
//!    the node annotations are exactly what upstream writes (`public-ipv6-overwrite`
//!    replacing the published v6 address), pods get an address of each family, every
//!    pair pings over both, and a deleted node's routes go.
//! 2. IPv6-only (`EnableIPv4:false`, which upstream allows in Kubernetes mode):
//!    nodes with only an IPv6 pod CIDR, no IPv4 route or pod address anywhere,
//!    IPv6 between all pods, a deleted node's route goes.
//! 3. IPv6-only with vxlan: the v6 device alone, its MAC in `backend-v6-data`.
//! 4. kill -9 of one agent of a dual-stack cluster (host-gw and vxlan) while pods
//!    ping into and out of its host over both families: no ping lost, no flannel
//!    route, neighbour or FDB entry deleted on any host, the node's annotations
//!    unchanged, and the new agent follows the cluster (a deleted node's routes go).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use flannel_lab::checks::{kill_9_restart_pinging, paths_around};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::kube_fake::{node_name, KubeFake};
use flannel_lab::{poll_until, Lab, PodId};
use ipnet::Ipv6Net;

const DEADLINE: Duration = Duration::from_secs(90);

/// A second underlay address of host 3, published through `public-ipv6-overwrite`.
const OVERWRITE6: &str = "fd18:198:18::33";
const DUAL_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"host-gw"}}"#;
const DUAL_VXLAN_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"vxlan"}}"#;
const V6_ONLY_NET_CONF: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"host-gw"}}"#;
/// Per host its pod CIDRs as kube-controller-manager gives them with
/// `--cluster-cidr=10.244.0.0/16,fd10:244::/56`; unlike anything an allocation
/// would pick, so a lease can only come from its node.
const V4_CIDRS: [&str; 3] = ["10.244.11.0/24", "10.244.22.0/24", "10.244.33.0/24"];
const V6_CIDRS: [&str; 3] = [
    "fd10:244:0:11::/64",
    "fd10:244:0:22::/64",
    "fd10:244:0:33::/64",
];

fn v6_cidr(h: usize) -> Ipv6Net {
    V6_CIDRS[h].parse().expect("constant CIDR")
}

/// A three-host lab with an IPv6 underlay and the fake API server; no agent yet.
fn kube_lab(test: &str, net_conf: &str) -> Option<(Lab, KubeFake)> {
    if !ready(test, Needs::Agents) {
        return None;
    }
    let mut lab = Lab::builder()
        .hosts(3)
        .ipv6(true)
        .backend("host-gw")
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let fake = KubeFake::start(&mut lab, net_conf).expect("fake API server");
    Some((lab, fake))
}

fn want_annotations(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Host `h`'s route for `dst` (one `ip route show exact` line, or empty).
fn route(lab: &Lab, h: usize, family: &str, dst: &str) -> String {
    lab.ip_in(&lab.hosts()[h].ns, &[family, "route", "show", "exact", dst])
        .expect("ip route")
        .trim()
        .to_string()
}

fn wait_route_gone(lab: &Lab, h: usize, family: &str, dst: &str) {
    poll_until(
        &format!("host {h}: route {dst} to go"),
        DEADLINE,
        Duration::from_millis(200),
        || Ok(route(lab, h, family, dst).is_empty()),
    )
    .unwrap();
}

fn pod_ip6(lab: &Lab, p: PodId) -> IpAddr {
    lab.pod(p)
        .unwrap()
        .ip6
        .expect("pod has an IPv6 address")
        .into()
}

#[test]
fn kube_host_gw_dual_stack_end_to_end() {
    let Some((mut lab, fake)) = kube_lab("kube dual stack", DUAL_NET_CONF) else {
        return;
    };
    // node-3's operator publishes a second v6 address of its host instead of the
    // detected one (`public-ipv6-overwrite`): peers must route to that one.
    let host3 = lab.hosts()[2].ns.clone();
    let link3 = lab.hosts()[2].link.clone();
    lab.ip_in(
        &host3,
        &[
            "addr",
            "add",
            &format!("{OVERWRITE6}/64"),
            "dev",
            &link3,
            "nodad",
        ],
    )
    .unwrap();
    for h in 0..3 {
        let overwrite = [("public-ipv6-overwrite", OVERWRITE6)];
        let ann: &[(&str, &str)] = if h == 2 { &overwrite } else { &[] };
        fake.create_node_annotated(&node_name(h), &[V4_CIDRS[h], V6_CIDRS[h]], ann)
            .expect("create node");
    }
    for h in 0..3 {
        lab.start_agent(h).expect("flanneld");
    }

    // subnet.env and annotations as upstream writes them.
    for h in 0..3 {
        let text = std::fs::read_to_string(lab.hosts()[h].subnet_file()).unwrap();
        let gw4 = V4_CIDRS[h].replace(".0/24", ".1/24");
        let gw6 = V6_CIDRS[h].replace("::/64", "::1/64");
        assert_eq!(
            text,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={gw4}\n\
                 FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET={gw6}\n\
                 FLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
            ),
            "subnet.env of host {h}"
        );
        let host = &lab.hosts()[h];
        // host-gw has no backend data: Go marshals the empty RawMessage as `null`
        // and writes it for both families.
        let mut want = want_annotations(&[
            ("backend-type", "host-gw".into()),
            ("backend-data", "null".into()),
            ("public-ip", host.ip.to_string()),
            ("backend-v6-data", "null".into()),
            ("public-ipv6", host.ip6.unwrap().to_string()),
            ("kube-subnet-manager", "true".into()),
        ]);
        if h == 2 {
            want.insert("public-ipv6".into(), OVERWRITE6.into());
            want.insert("public-ipv6-overwrite".into(), OVERWRITE6.into());
        }
        assert_eq!(
            fake.annotations(&node_name(h)).unwrap(),
            want,
            "annotations of {}",
            node_name(h)
        );
    }

    // Pods get both addresses, from their node's pod CIDRs.
    let pods: Vec<PodId> = (0..3).map(|h| lab.add_pod(h).expect("pod")).collect();
    for (h, p) in pods.iter().enumerate() {
        let pod = lab.pod(*p).unwrap();
        let v4: ipnet::Ipv4Net = V4_CIDRS[h].parse().unwrap();
        assert!(v4.contains(&pod.ip), "{} not in {v4}", pod.ip);
        let ip6 = pod.ip6.expect("an IPv6 address");
        assert!(v6_cidr(h).contains(&ip6), "{ip6} not in {}", v6_cidr(h));
    }
    for &a in &pods {
        for &b in &pods {
            if a != b {
                let dst = lab.pod(b).unwrap().clone();
                lab.wait_reachable(a, dst.ip).expect("v4 reachable");
                lab.wait_reachable_ip(a, pod_ip6(&lab, b))
                    .expect("v6 reachable");
                assert!(lab.ping(a, dst.ip, 2).unwrap().all_replied());
                assert!(lab.ping_ip(a, pod_ip6(&lab, b), 2).unwrap().all_replied());
            }
        }
    }
    let link = lab.hosts()[0].link.clone();
    assert_eq!(
        route(&lab, 0, "-6", V6_CIDRS[1]),
        format!(
            "{} via {} dev {link} proto 70 metric 1024 pref medium",
            V6_CIDRS[1],
            lab.hosts()[1].ip6.unwrap()
        )
    );
    assert_eq!(
        route(&lab, 0, "-4", V4_CIDRS[1]),
        format!(
            "{} via {} dev {link} proto 70",
            V4_CIDRS[1],
            lab.hosts()[1].ip
        )
    );
    assert_eq!(
        route(&lab, 0, "-6", V6_CIDRS[2]),
        format!(
            "{} via {OVERWRITE6} dev {link} proto 70 metric 1024 pref medium",
            V6_CIDRS[2]
        ),
        "node-3's v6 subnet via its public-ipv6-overwrite"
    );
    println!("3 kube nodes with dual podCIDRs: every pair pings over IPv4 and IPv6");

    // A deleted node takes both its routes with it.
    fake.delete_node(&node_name(2)).unwrap();
    for h in 0..2 {
        wait_route_gone(&lab, h, "-6", V6_CIDRS[2]);
        wait_route_gone(&lab, h, "-4", V4_CIDRS[2]);
    }
    assert!(lab
        .ping_ip(pods[0], pod_ip6(&lab, pods[1]), 2)
        .unwrap()
        .all_replied());
    assert!(lab
        .ping(pods[1], lab.pod(pods[0]).unwrap().ip, 2)
        .unwrap()
        .all_replied());
    lab.check_agents().unwrap();
}

/// Creates the IPv6-only nodes, starts their agents and checks each subnet.env is
/// upstream's IPv6-only one with `mtu`.
fn start_v6_only_cluster(lab: &mut Lab, fake: &KubeFake, mtu: u32) {
    for (h, c) in V6_CIDRS.iter().enumerate() {
        fake.create_node(&node_name(h), &[c]).expect("create node");
    }
    for h in 0..3 {
        lab.spawn_agent(h).expect("flanneld");
    }
    for (h, c) in V6_CIDRS.iter().enumerate() {
        let text = lab.wait_subnet_env_text(h).unwrap();
        let gw6 = c.replace("::/64", "::1/64");
        assert_eq!(
            text,
            format!(
                "FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET={gw6}\n\
                 FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n"
            ),
            "subnet.env of host {h}"
        );
    }
}

/// Every pod reaches every other over IPv6.
fn ping_all_pairs_v6(lab: &Lab, pods: &[PodId]) {
    for &a in pods {
        for &b in pods {
            if a != b {
                lab.wait_reachable_ip(a, pod_ip6(lab, b))
                    .expect("v6 reachable");
                assert!(lab.ping_ip(a, pod_ip6(lab, b), 2).unwrap().all_replied());
            }
        }
    }
}

#[test]
fn kube_host_gw_ipv6_only_end_to_end() {
    let Some((mut lab, fake)) = kube_lab("kube IPv6-only", V6_ONLY_NET_CONF) else {
        return;
    };
    start_v6_only_cluster(&mut lab, &fake, 1500);
    for h in 0..3 {
        // As upstream's AcquireLease: host-gw publishes its (here unset) IPv4 part
        // too, `0.0.0.0` being Go's String() of the zero IP4.
        let want = want_annotations(&[
            ("backend-type", "host-gw".into()),
            ("backend-data", "null".into()),
            ("public-ip", "0.0.0.0".into()),
            ("backend-v6-data", "null".into()),
            ("public-ipv6", lab.hosts()[h].ip6.unwrap().to_string()),
            ("kube-subnet-manager", "true".into()),
        ]);
        assert_eq!(
            fake.annotations(&node_name(h)).unwrap(),
            want,
            "annotations of {}",
            node_name(h)
        );
    }

    // The CNI plugin hands out the IPv6 range alone.
    let pods: Vec<PodId> = (0..3)
        .map(|h| lab.add_pod_ipv6_only(h).expect("IPv6-only pod"))
        .collect();
    for (h, p) in pods.iter().enumerate() {
        let ip6 = lab.pod(*p).unwrap().ip6.unwrap();
        assert!(v6_cidr(h).contains(&ip6), "{ip6} not in {}", v6_cidr(h));
        let v4 = lab
            .ip_in(
                &lab.pod(*p).unwrap().ns,
                &["-4", "addr", "show", "dev", "eth0"],
            )
            .unwrap();
        assert!(v4.trim().is_empty(), "IPv4 on an IPv6-only pod: {v4}");
    }
    ping_all_pairs_v6(&lab, &pods);
    let link = lab.hosts()[0].link.clone();
    for h in 0..3 {
        // No IPv4 route of ours at all (not even for the 0.0.0.0/0 placeholder).
        let v4 = lab
            .ip_in(&lab.hosts()[h].ns, &["-4", "route", "show", "proto", "70"])
            .unwrap();
        assert!(v4.trim().is_empty(), "host {h}: IPv4 routes {v4}");
        let v6 = lab
            .ip_in(&lab.hosts()[h].ns, &["-6", "route", "show", "proto", "70"])
            .unwrap();
        assert_eq!(v6.lines().count(), 2, "host {h}: {v6}");
    }
    assert_eq!(
        route(&lab, 0, "-6", V6_CIDRS[2]),
        format!(
            "{} via {} dev {link} proto 70 metric 1024 pref medium",
            V6_CIDRS[2],
            lab.hosts()[2].ip6.unwrap()
        )
    );
    println!("IPv6-only kube cluster: every pair of pods pings over IPv6, no IPv4 anywhere");

    fake.delete_node(&node_name(2)).unwrap();
    for h in 0..2 {
        wait_route_gone(&lab, h, "-6", V6_CIDRS[2]);
    }
    assert!(lab
        .ping_ip(pods[0], pod_ip6(&lab, pods[1]), 2)
        .unwrap()
        .all_replied());
    lab.check_agents().unwrap();
}

/// etcd mode cannot hold IPv6-only leases (upstream writes a bogus `0.0.0.0-0&…`
/// key): flanneld refuses at start, saying that IPv6-only needs the Kubernetes
/// subnet manager, and writes no lease.
#[test]
fn etcd_ipv6_only_is_refused_with_a_clear_error() {
    if !ready("etcd IPv6-only refusal", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(1)
        .ipv6(true)
        .config_json(V6_ONLY_NET_CONF)
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    lab.spawn_agent(0).expect("flanneld");
    let st = lab
        .wait_agent_exit(0, "refusing the IPv6-only etcd config")
        .unwrap();
    assert_eq!(st.code(), Some(1), "exit status {st}");
    let log = lab.agent_log(0).unwrap();
    assert!(
        log.contains("IPv6-only") && log.contains("--kube-subnet-mgr"),
        "{log}"
    );
    let leases = lab
        .etcd()
        .get_prefix(&format!("{}/subnets/", flannel_lab::lab::ETCD_PREFIX))
        .unwrap();
    assert!(leases.is_empty(), "{leases:?}");
    assert!(!lab.hosts()[0].subnet_file().exists());
}

/// 3. IPv6-only with vxlan: only `flannel-v6.1` (MTU link − 70), the v6 VTEP MAC
///    published in `backend-v6-data` and nothing of IPv4, IPv6 between all pods, a
///    deleted node's entries go.
#[test]
fn kube_vxlan_ipv6_only_end_to_end() {
    const NET_CONF: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"vxlan"}}"#;
    let Some((mut lab, fake)) = kube_lab("kube vxlan IPv6-only", NET_CONF) else {
        return;
    };
    start_v6_only_cluster(&mut lab, &fake, 1430);
    for h in 0..3 {
        let ns = lab.hosts()[h].ns.clone();
        let dev = lab
            .ip_in(&ns, &["-d", "link", "show", "flannel-v6.1"])
            .expect("flannel-v6.1 exists");
        let mac = dev
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("a MAC")
            .to_string();
        assert!(dev.contains("mtu 1430"), "{dev}");
        assert!(
            lab.ip_in(&ns, &["link", "show", "flannel.1"]).is_err(),
            "host {h}: an IPv4 vxlan device in an IPv6-only cluster"
        );
        let want = want_annotations(&[
            ("backend-type", "vxlan".into()),
            (
                "backend-v6-data",
                format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
            ),
            ("public-ipv6", lab.hosts()[h].ip6.unwrap().to_string()),
            ("kube-subnet-manager", "true".into()),
        ]);
        assert_eq!(
            fake.annotations(&node_name(h)).unwrap(),
            want,
            "annotations of {}",
            node_name(h)
        );
    }
    let pods: Vec<PodId> = (0..3)
        .map(|h| lab.add_pod_ipv6_only(h).expect("IPv6-only pod"))
        .collect();
    ping_all_pairs_v6(&lab, &pods);
    for h in 0..3 {
        let v4 = lab
            .ip_in(&lab.hosts()[h].ns, &["-4", "route", "show", "proto", "70"])
            .unwrap();
        assert!(v4.trim().is_empty(), "host {h}: IPv4 routes {v4}");
    }
    let gw2 = V6_CIDRS[2].replace("::/64", "::");
    assert_eq!(
        route(&lab, 0, "-6", V6_CIDRS[2]),
        format!(
            "{} via {gw2} dev flannel-v6.1 proto 70 metric 1024 onlink pref medium",
            V6_CIDRS[2]
        )
    );

    fake.delete_node(&node_name(2)).unwrap();
    for h in 0..2 {
        wait_route_gone(&lab, h, "-6", V6_CIDRS[2]);
    }
    assert!(lab
        .ping_ip(pods[0], pod_ip6(&lab, pods[1]), 2)
        .unwrap()
        .all_replied());
    lab.check_agents().unwrap();
}

/// The MAC of `dev` on host `h`.
fn link_mac(lab: &Lab, h: usize, dev: &str) -> String {
    let out = lab
        .ip_in(&lab.hosts()[h].ns, &["-br", "link", "show", dev])
        .unwrap_or_else(|e| panic!("host {h}: {dev}: {e}"));
    out.split_whitespace().nth(2).expect("a MAC").to_string()
}

#[test]
fn kube_host_gw_dual_stack_agent_kill_9_restart_is_hitless() {
    kill_9_restart_is_hitless("kube host-gw dual stack kill -9", DUAL_NET_CONF, "host-gw");
}

#[test]
fn kube_vxlan_dual_stack_agent_kill_9_restart_is_hitless() {
    kill_9_restart_is_hitless(
        "kube vxlan dual stack kill -9",
        DUAL_VXLAN_NET_CONF,
        "vxlan",
    );
}

/// 4. Three dual-stack nodes, a pod on each; host 1's flanneld is killed with
///    SIGKILL and started again while its pod pings and is pinged over IPv4 and
///    IPv6.
fn kill_9_restart_is_hitless(test: &str, net_conf: &str, backend: &str) {
    let Some((mut lab, fake)) = kube_lab(test, net_conf) else {
        return;
    };
    for h in 0..3 {
        fake.create_node(&node_name(h), &[V4_CIDRS[h], V6_CIDRS[h]])
            .expect("create node");
    }
    for h in 0..3 {
        lab.start_agent(h).expect("flanneld");
    }
    let pods: Vec<PodId> = (0..3).map(|h| lab.add_pod(h).expect("pod")).collect();
    let r = 1;
    let paths = paths_around(&lab, &pods, r).unwrap();
    assert_eq!(paths.len(), 4, "both families both ways: {paths:#?}");
    for p in &paths {
        lab.wait_reachable_ip(p.from, p.to).expect("reachable");
    }

    // What the node publishes before the restart is the dual-stack set (so that
    // "unchanged" below compares something real).
    let ann_before = fake.annotations(&node_name(r)).unwrap();
    let ip6 = lab.hosts()[r].ip6.unwrap().to_string();
    assert_eq!(ann_before.get("public-ipv6"), Some(&ip6), "{ann_before:?}");
    assert_eq!(
        ann_before.get("backend-type").map(String::as_str),
        Some(backend),
        "{ann_before:?}"
    );
    let macs_before = (backend == "vxlan").then(|| {
        let (m4, m6) = (
            link_mac(&lab, r, "flannel.1"),
            link_mac(&lab, r, "flannel-v6.1"),
        );
        assert_eq!(
            ann_before.get("backend-v6-data"),
            Some(&format!(r#"{{"VNI":1,"VtepMAC":"{m6}"}}"#)),
            "{ann_before:?}"
        );
        assert_eq!(
            ann_before.get("backend-data"),
            Some(&format!(r#"{{"VNI":1,"VtepMAC":"{m4}"}}"#)),
            "{ann_before:?}"
        );
        (m4, m6)
    });

    // 60 pings 0.2 s apart span the kill, the restart (informer sync included) and
    // the new agent's first reconcile.
    let outcome = kill_9_restart_pinging(&mut lab, r, &paths, 60, &networks()).unwrap();
    println!(
        "kube {backend} dual stack, kill -9 restart of {}: {:?}",
        node_name(r),
        outcome
            .pings
            .iter()
            .map(|(p, st)| format!("{}: {}/{}", p.what, st.received, st.transmitted))
            .collect::<Vec<_>>()
    );
    assert_eq!(outcome.failures(), Vec::<String>::new(), "{outcome:#?}");
    assert_eq!(
        fake.annotations(&node_name(r)).unwrap(),
        ann_before,
        "annotations of {} after the restart",
        node_name(r)
    );
    if let Some((m4, m6)) = macs_before {
        assert_eq!(
            link_mac(&lab, r, "flannel.1"),
            m4,
            "the v4 VTEP MAC survives"
        );
        assert_eq!(
            link_mac(&lab, r, "flannel-v6.1"),
            m6,
            "the v6 VTEP MAC survives"
        );
    }

    // The new agent watches the cluster: node-3 deleted, its routes go on host 1.
    fake.delete_node(&node_name(2)).unwrap();
    wait_route_gone(&lab, r, "-6", V6_CIDRS[2]);
    wait_route_gone(&lab, r, "-4", V4_CIDRS[2]);
    assert!(lab
        .ping_ip(pods[r], pod_ip6(&lab, pods[0]), 2)
        .unwrap()
        .all_replied());
    lab.check_agents().unwrap();
}

/// The pod networks of the dual-stack configs, for the deletion check.
fn networks() -> [ipnet::IpNet; 2] {
    [
        "10.244.0.0/16".parse().unwrap(),
        "fd10:244::/56".parse().unwrap(),
    ]
}
