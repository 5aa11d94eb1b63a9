//! End to end: `--ip-blackhole-route` in a dual-stack host-gw cluster (etcd mode) and
//! in an IPv6-only one (Kubernetes mode): a blackhole route for the own IPv6 subnet
//! (and the IPv4 one where IPv4 is on), put back by the resync after someone deletes
//! it, while the pods behind it keep working (their connected route wins), and
//! removed by `flanneld --cleanup`.

use std::time::Duration;

use flannel_lab::e2e::{ready, Needs};
use flannel_lab::kube_fake::{node_name, KubeFake};
use flannel_lab::{poll_until, Lab};

const DEADLINE: Duration = Duration::from_secs(90);
const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"host-gw"}}"#;
const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"host-gw"}}"#;

/// A subnet.env value as its network (`fd10:244:0:5::1/64` → `fd10:244:0:5::/64`).
fn subnet(lab: &Lab, h: usize, key: &str) -> Option<String> {
    let t = std::fs::read_to_string(lab.hosts()[h].subnet_file()).ok()?;
    let v = t.lines().find_map(|l| l.strip_prefix(key))?;
    let n: ipnet::IpNet = v.parse().ok()?;
    Some(n.trunc().to_string())
}

fn blackholes(lab: &Lab, h: usize, family: &str) -> String {
    lab.ip_in(
        &lab.hosts()[h].ns,
        &[family, "route", "show", "type", "blackhole"],
    )
    .unwrap()
    .trim()
    .to_string()
}

/// The exact blackhole lines, the resync restoring a deleted one, pods still
/// reachable beside it, and `--cleanup` removing it. `s4`: the own IPv4 subnet, if
/// IPv4 is on.
fn check_blackholes(lab: &mut Lab, s6: &str, s4: Option<&str>, peer_pod_ok: impl Fn(&Lab)) {
    // The kernel puts an IPv6 blackhole on `lo` by itself.
    let want6 = format!("blackhole {s6} dev lo proto 70 metric 1000000 pref medium");
    assert_eq!(blackholes(lab, 0, "-6"), want6);
    match s4 {
        Some(s4) => assert_eq!(
            blackholes(lab, 0, "-4"),
            format!("blackhole {s4} proto 70 metric 1000000")
        ),
        None => assert_eq!(blackholes(lab, 0, "-4"), "", "IPv6-only: no IPv4 blackhole"),
    }
    peer_pod_ok(lab);
    // Over routes in place the resync changes nothing: three periods without a
    // restore (the resync once compared the `lo` the kernel adds and re-added the
    // v6 route every period).
    std::thread::sleep(Duration::from_secs(3));
    let restored = |lab: &Lab| {
        lab.agent_log(0)
            .unwrap()
            .matches("blackhole routes were missing")
            .count()
    };
    assert_eq!(restored(lab), 0, "{}", lab.agent_log(0).unwrap());

    // Deleted behind the agent's back: the resync (--iptables-resync=1) puts it back.
    let ns = lab.hosts()[0].ns.clone();
    // With its metric: IPv6 deletes match by prefix, and the pods' connected route
    // to the same subnet comes first.
    lab.ip_in(
        &ns,
        &["-6", "route", "del", "blackhole", s6, "metric", "1000000"],
    )
    .unwrap();
    assert_eq!(blackholes(lab, 0, "-6"), "");
    poll_until(
        "the v6 blackhole route to be restored",
        DEADLINE,
        Duration::from_millis(100),
        || Ok(blackholes(lab, 0, "-6") == want6),
    )
    .unwrap();
    lab.check_agents().unwrap();
    poll_until(
        "the agent to log the restore",
        DEADLINE,
        Duration::from_millis(100),
        || Ok(restored(lab) == 1),
    )
    .unwrap();
    peer_pod_ok(lab);

    // --cleanup takes both families' blackholes away.
    lab.stop_agent(0).unwrap();
    let host = &lab.hosts()[0];
    let flanneld = flannel_lab::bins::find_binary("flanneld").unwrap();
    let out = lab
        .exec_in(
            &host.ns,
            &[
                &flanneld.display().to_string(),
                "--cleanup",
                &format!("--subnet-file={}", host.subnet_file().display()),
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "--cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(blackholes(lab, 0, "-6"), "");
    assert_eq!(blackholes(lab, 0, "-4"), "");
}

#[test]
fn dual_stack_blackhole_routes_kept_by_resync_and_removed_by_cleanup() {
    if !ready("v6 blackhole route", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .ipv6(true)
        .config_json(DUAL)
        .agent_arg("--ip-blackhole-route")
        .agent_arg("--iptables-resync=1")
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let s6 = subnet(&lab, 0, "FLANNEL_IPV6_SUBNET=").expect("v6 subnet");
    let s4 = subnet(&lab, 0, "FLANNEL_SUBNET=").expect("v4 subnet");
    let pod0 = lab.add_pod(0).unwrap();
    let pod1 = lab.add_pod(1).unwrap();
    let (ip0, ip6_0) = {
        let p = lab.pod(pod0).unwrap();
        (p.ip, p.ip6.unwrap())
    };
    check_blackholes(&mut lab, &s6, Some(&s4), |lab| {
        lab.wait_reachable_ip(pod1, ip6_0.into()).unwrap();
        lab.wait_reachable(pod1, ip0).unwrap();
    });
}

#[test]
fn ipv6_only_kube_blackhole_route_kept_by_resync_and_removed_by_cleanup() {
    if !ready("v6-only blackhole route", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .ipv6(true)
        .backend("host-gw")
        .agent_arg("--ip-blackhole-route")
        .agent_arg("--iptables-resync=1")
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let fake = KubeFake::start(&mut lab, V6_ONLY).expect("fake API server");
    let cidrs = ["fd10:244:0:11::/64", "fd10:244:0:22::/64"];
    for (h, c) in cidrs.iter().enumerate() {
        fake.create_node(&node_name(h), &[c]).unwrap();
    }
    for h in 0..2 {
        lab.spawn_agent(h).unwrap();
    }
    for h in 0..2 {
        poll_until("subnet.env", DEADLINE, Duration::from_millis(20), || {
            lab.check_agent(h)?;
            Ok(subnet(&lab, h, "FLANNEL_IPV6_SUBNET=").is_some())
        })
        .unwrap();
    }
    poll_until(
        "the blackhole route",
        DEADLINE,
        Duration::from_millis(20),
        || Ok(!blackholes(&lab, 0, "-6").is_empty()),
    )
    .unwrap();
    let pod0 = lab.add_pod_ipv6_only(0).unwrap();
    let pod1 = lab.add_pod_ipv6_only(1).unwrap();
    let ip6_0 = lab.pod(pod0).unwrap().ip6.unwrap();
    check_blackholes(&mut lab, cidrs[0], None, |lab| {
        lab.wait_reachable_ip(pod1, ip6_0.into()).unwrap();
    });
    drop(fake);
}
