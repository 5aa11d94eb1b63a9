//! End-to-end: the lab's IPv6 underlay, and dual-stack (IPv4 + IPv6) pod networks.

use std::time::Duration;

use flannel_lab::checks::{kill_9_restart_pinging, paths_around};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::Lab;

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn hosts_reach_each_other_over_the_ipv6_underlay() {
    if !ready("ipv6 underlay", Needs::CniOnly) {
        return;
    }
    let lab = Lab::builder()
        .hosts(3)
        .ipv6(true)
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let addrs: Vec<_> = lab
        .hosts()
        .iter()
        .map(|h| h.ip6.expect("an IPv6 underlay address"))
        .collect();
    for (i, h) in lab.hosts().iter().enumerate() {
        let fwd = lab
            .run_in(&h.ns, &["sysctl", "-n", "net.ipv6.conf.all.forwarding"])
            .expect("sysctl");
        assert_eq!(fwd.trim(), "1", "{}: IPv6 forwarding", h.ns);
        for (j, to) in addrs.iter().enumerate() {
            if i == j {
                continue;
            }
            let st = lab.ping_ip_from(&h.ns, (*to).into(), 3).expect("ping");
            assert!(st.all_replied(), "{} -> {to}: {st:?}", h.ns);
        }
        let gw = flannel_lab::lab::UNDERLAY_V6_GATEWAY;
        let st = lab.ping_ip_from(&h.ns, gw.into(), 1).expect("ping");
        assert!(st.all_replied(), "{} -> {gw}: {st:?}", h.ns);
    }
    // Without ipv6(true) nothing changes: no v6 address on the hosts.
    let v4 = Lab::builder()
        .hosts(1)
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    assert_eq!(v4.hosts()[0].ip6, None);
    let a = v4
        .ip_in(
            &v4.hosts()[0].ns,
            &["-6", "addr", "show", "scope", "global"],
        )
        .expect("ip");
    assert!(a.trim().is_empty(), "{a}");
}

const DUAL_HOST_GW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"host-gw"}}"#;

/// The `FLANNEL_IPV6_SUBNET` of a subnet.env text, as its network (`…::/64`).
fn ipv6_subnet(text: &str) -> Option<ipnet::Ipv6Net> {
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .and_then(|v| v.trim().parse::<ipnet::Ipv6Net>().ok())
        .map(|n| n.trunc())
}

#[test]
fn host_gw_dual_stack_all_pairs_and_lease_deletion() {
    if !ready("host-gw dual stack", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(3)
        .ipv6(true)
        .config_json(DUAL_HOST_GW)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let mut subnets6 = Vec::new();
    for h in lab.hosts() {
        let text = std::fs::read_to_string(h.subnet_file()).expect("subnet.env");
        assert!(
            text.contains("FLANNEL_IPV6_NETWORK=fd10:244::/56\n"),
            "{text}"
        );
        let s6 = ipv6_subnet(&text).unwrap_or_else(|| panic!("no v6 subnet: {text}"));
        assert_eq!(s6.prefix_len(), 64, "{text}");
        subnets6.push(s6);
    }
    // Each lease publishes the host's v6 underlay address.
    let leases = lab
        .etcd()
        .get_prefix(&format!("{}/subnets/", flannel_lab::lab::ETCD_PREFIX))
        .expect("leases");
    assert_eq!(leases.len(), 3, "{leases:?}");
    for h in lab.hosts() {
        let ip6 = h.ip6.unwrap().to_string();
        assert!(
            leases
                .iter()
                .any(|(_, v)| v.contains(&format!(r#""PublicIPv6":"{ip6}""#))),
            "{ip6} in {leases:?}"
        );
    }
    let pods: Vec<_> = (0..3).map(|h| lab.add_pod(h).expect("pod")).collect();
    for (i, p) in pods.iter().enumerate() {
        let pod = lab.pod(*p).unwrap();
        let ip6 = pod
            .ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", pod.ns));
        assert!(subnets6[i].contains(&ip6), "{ip6} not in {}", subnets6[i]);
    }
    lab.wait_all_pairs(&pods)
        .expect("all pairs reach each other over both families");
    // Exact v6 route on host 0 for host 1's subnet.
    let r = lab
        .ip_in(
            &lab.hosts()[0].ns,
            &["-6", "route", "show", "exact", &subnets6[1].to_string()],
        )
        .unwrap();
    let gw = lab.hosts()[1].ip6.unwrap();
    let link = lab.hosts()[0].link.clone();
    assert_eq!(
        r.trim(),
        format!(
            "{} via {gw} dev {link} proto 70 metric 1024 pref medium",
            subnets6[1]
        ),
    );

    // A pod added later (host 1's second) reaches and is reached over both
    // families.
    let later = lab.add_pod(1).expect("pod added later");
    lab.wait_all_pairs(&[pods[0], later, pods[2]])
        .expect("the later pod and the others reach each other");

    // Host 2's lease deleted (its agent stopped first, so it does not renew):
    // the others drop both its routes.
    lab.stop_agent(2).expect("stop agent");
    let key = leases
        .iter()
        .find(|(_, v)| v.contains(&format!(r#""PublicIP":"{}""#, lab.hosts()[2].ip)))
        .map(|(k, _)| k.clone())
        .expect("host 2's lease");
    assert!(lab.etcd().delete(&key).unwrap());
    for h in 0..2 {
        let ns = lab.hosts()[h].ns.clone();
        flannel_lab::poll_until(
            "v6 route of the deleted lease to go",
            DEADLINE,
            Duration::from_millis(200),
            || {
                let r = lab.ip_in(
                    &ns,
                    &["-6", "route", "show", "exact", &subnets6[2].to_string()],
                )?;
                Ok(r.trim().is_empty())
            },
        )
        .expect("route gone");
    }
    // The remaining pair still talks over both families.
    let p1 = lab.pod(pods[1]).unwrap().clone();
    assert!(lab.ping(pods[0], p1.ip, 3).unwrap().all_replied());
    assert!(lab
        .ping_ip(pods[0], p1.ip6.unwrap().into(), 3)
        .unwrap()
        .all_replied());
}

#[test]
fn host_gw_dual_stack_agent_kill_9_restart_loses_no_v6_ping() {
    if !ready("host-gw dual stack restart", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .ipv6(true)
        .config_json(DUAL_HOST_GW)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let pods: Vec<_> = (0..2).map(|h| lab.add_pod(h).expect("pod")).collect();
    let paths = paths_around(&lab, &pods, 1).unwrap();
    for p in &paths {
        lab.wait_reachable_ip(p.from, p.to).expect("reachable");
    }
    // 40 pings 0.2 s apart span the kill, the restart and its first reconcile.
    let outcome = kill_9_restart_pinging(&mut lab, 1, &paths, 40, &networks()).unwrap();
    assert_eq!(outcome.failures(), Vec::<String>::new(), "{outcome:#?}");
}

/// The pod networks of the dual-stack configs, for the deletion check.
fn networks() -> [ipnet::IpNet; 2] {
    [
        "10.244.0.0/16".parse().unwrap(),
        "fd10:244::/56".parse().unwrap(),
    ]
}
