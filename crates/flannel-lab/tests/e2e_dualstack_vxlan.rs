//! End-to-end: dual-stack (IPv4 + IPv6) pod networks over vxlan, where each family
//! has its own device (`flannel.1`, `flannel-v6.1`).

use std::time::Duration;

use flannel_lab::checks::{kill_9_restart_pinging, paths_around};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::{poll_until, Lab};
use ipnet::Ipv6Net;

const DEADLINE: Duration = Duration::from_secs(60);

const DUAL_VXLAN: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;

/// The `FLANNEL_IPV6_SUBNET` of host `h`'s subnet.env, as its network (`…::/64`).
fn ipv6_subnet(lab: &Lab, h: usize) -> Ipv6Net {
    let text = std::fs::read_to_string(lab.hosts()[h].subnet_file()).expect("subnet.env");
    assert!(
        text.contains("FLANNEL_IPV6_NETWORK=fd10:244::/56\n"),
        "{text}"
    );
    // FLANNEL_MTU stays the IPv4 device's, as upstream's.
    assert!(text.contains("FLANNEL_MTU=1450\n"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .and_then(|v| v.trim().parse::<Ipv6Net>().ok())
        .map(|n| n.trunc())
        .unwrap_or_else(|| panic!("no v6 subnet: {text}"))
}

/// Host `h`'s lease key and value. The lab's `lease_key` names the IPv4-only key;
/// a dual-stack lease's key also carries the v6 subnet, so it is found by its
/// PublicIP.
fn lease_of(lab: &Lab, h: usize) -> (String, String) {
    let ip = lab.hosts()[h].ip;
    lab.etcd()
        .get_prefix(&format!("{}/subnets/", flannel_lab::lab::ETCD_PREFIX))
        .expect("leases")
        .into_iter()
        .find(|(_, v)| v.contains(&format!(r#""PublicIP":"{ip}""#)))
        .unwrap_or_else(|| panic!("no lease of host {h}"))
}

/// The MAC of host `h`'s `flannel-v6.1`.
fn v6_mac(lab: &Lab, h: usize) -> String {
    let out = lab
        .ip_in(&lab.hosts()[h].ns, &["-br", "link", "show", "flannel-v6.1"])
        .expect("flannel-v6.1");
    out.split_whitespace().nth(2).expect("a MAC").to_string()
}

/// `ip -6 route show exact <subnet>` on host `h`.
fn v6_route(lab: &Lab, h: usize, subnet: Ipv6Net) -> String {
    lab.ip_in(
        &lab.hosts()[h].ns,
        &["-6", "route", "show", "exact", &subnet.to_string()],
    )
    .expect("ip route")
    .trim()
    .to_string()
}

fn wait_v6_route(lab: &Lab, h: usize, subnet: Ipv6Net, present: bool) {
    poll_until(
        &format!("host {h}: v6 route for {subnet} present={present}"),
        DEADLINE,
        Duration::from_millis(200),
        || Ok(v6_route(lab, h, subnet).is_empty() != present),
    )
    .expect("v6 route");
}

#[test]
fn vxlan_dual_stack_all_pairs_lease_deleted_restored_and_host_removed() {
    if !ready("vxlan dual stack", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(3)
        .ipv6(true)
        .config_json(DUAL_VXLAN)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let subnets6: Vec<Ipv6Net> = (0..3).map(|h| ipv6_subnet(&lab, h)).collect();
    // Each lease publishes the host's v6 underlay address and its v6 VTEP MAC, in
    // Go's field order.
    for (h, s6) in subnets6.iter().enumerate() {
        let (key, value) = lease_of(&lab, h);
        assert!(key.ends_with(&format!("&{}-64", s6.addr())), "{key}");
        let ip6 = lab.hosts()[h].ip6.unwrap();
        let tail = format!(
            r#""PublicIPv6":"{ip6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"#
        );
        assert!(value.contains(&tail), "{value}");
        let v6data = format!(
            r#","BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            v6_mac(&lab, h)
        );
        assert!(value.ends_with(&v6data), "{value}");
    }
    let pods: Vec<_> = (0..3).map(|h| lab.add_pod(h).expect("pod")).collect();
    for (i, p) in pods.iter().enumerate() {
        let ip6 = lab.pod(*p).unwrap().ip6.expect("pod v6 address");
        assert!(subnets6[i].contains(&ip6), "{ip6} not in {}", subnets6[i]);
    }
    lab.wait_all_pairs(&pods)
        .expect("all pairs reach each other");

    // Host 0's exact v6 entries for host 1.
    let (ns0, s1) = (lab.hosts()[0].ns.clone(), subnets6[1]);
    let gw = s1.network();
    assert_eq!(
        v6_route(&lab, 0, s1),
        format!("{s1} via {gw} dev flannel-v6.1 proto 70 metric 1024 onlink pref medium")
    );
    let mac1 = v6_mac(&lab, 1);
    let neigh = lab
        .ip_in(
            &ns0,
            &[
                "-6",
                "neigh",
                "show",
                "dev",
                "flannel-v6.1",
                &gw.to_string(),
            ],
        )
        .unwrap();
    assert_eq!(neigh.trim(), format!("{gw} lladdr {mac1} PERMANENT"));
    let fdb = lab
        .run_in(&ns0, &["bridge", "fdb", "show", "dev", "flannel-v6.1"])
        .unwrap();
    let ip6_1 = lab.hosts()[1].ip6.unwrap();
    assert!(
        fdb.lines()
            .any(|l| l.trim() == format!("{mac1} dst {ip6_1} self permanent")),
        "{fdb}"
    );

    // A pod added later (host 1's second) reaches and is reached over both
    // families.
    let later = lab.add_pod(1).expect("pod added later");
    lab.wait_all_pairs(&[pods[0], later, pods[2]])
        .expect("the later pod and the others reach each other");

    // Lease deleted: the others drop its v6 route; restored: it comes back, and
    // the kernel state the exited agent left makes its pod reachable again.
    let (key, value) = lease_of(&lab, 2);
    assert!(lab.etcd().delete(&key).unwrap());
    for h in 0..2 {
        wait_v6_route(&lab, h, subnets6[2], false);
    }
    lab.wait_agent_exit(2, "after losing its lease").unwrap();
    lab.etcd().put(&key, &value).unwrap();
    for h in 0..2 {
        wait_v6_route(&lab, h, subnets6[2], true);
    }
    let p2 = lab.pod(pods[2]).unwrap().clone();
    for &p in &pods[..2] {
        lab.wait_reachable_ip(p, p2.ip6.unwrap().into()).unwrap();
    }
    lab.start_agent(2).unwrap();
    lab.wait_all_pairs(&pods)
        .expect("all pairs reach each other");

    // Host removed (agent stopped, lease deleted): its v6 route goes, the
    // remaining pair still talks over both families.
    let status = lab.stop_agent(2).unwrap();
    assert!(status.success(), "flanneld exit on SIGTERM: {status}");
    assert!(lab.etcd().delete(&lease_of(&lab, 2).0).unwrap());
    for h in 0..2 {
        wait_v6_route(&lab, h, subnets6[2], false);
        let neigh = lab
            .ip_in(
                &lab.hosts()[h].ns,
                &[
                    "-6",
                    "neigh",
                    "show",
                    "dev",
                    "flannel-v6.1",
                    "nud",
                    "permanent",
                ],
            )
            .unwrap();
        assert!(
            !neigh.contains(&subnets6[2].network().to_string()),
            "{neigh}"
        );
    }
    let p1 = lab.pod(pods[1]).unwrap().clone();
    assert!(lab.ping(pods[0], p1.ip, 3).unwrap().all_replied());
    assert!(lab
        .ping_ip(pods[0], p1.ip6.unwrap().into(), 3)
        .unwrap()
        .all_replied());
}

#[test]
fn vxlan_dual_stack_agent_kill_9_restart_loses_no_v6_ping() {
    if !ready("vxlan dual stack restart", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .ipv6(true)
        .config_json(DUAL_VXLAN)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let pods: Vec<_> = (0..2).map(|h| lab.add_pod(h).expect("pod")).collect();
    let paths = paths_around(&lab, &pods, 1).unwrap();
    for p in &paths {
        lab.wait_reachable_ip(p.from, p.to).expect("reachable");
    }
    let mac_before = v6_mac(&lab, 1);
    // 40 pings 0.2 s apart span the kill, the restart and its first reconcile.
    let outcome = kill_9_restart_pinging(&mut lab, 1, &paths, 40, &networks()).unwrap();
    assert_eq!(outcome.failures(), Vec::<String>::new(), "{outcome:#?}");
    assert_eq!(v6_mac(&lab, 1), mac_before, "the v6 VTEP MAC survives");

    // SIGTERM leaves the kernel state (hitless restart); `--cleanup` then removes
    // the v6 device and routes along with the v4 ones.
    let status = lab.stop_agent(0).unwrap();
    assert!(status.success(), "flanneld exit on SIGTERM: {status}");
    let (ns, subnet_file) = {
        let h = &lab.hosts()[0];
        (
            h.ns.clone(),
            format!("--subnet-file={}", h.subnet_file().display()),
        )
    };
    let links = lab.ip_in(&ns, &["-br", "link"]).unwrap();
    assert!(links.contains("flannel-v6.1"), "{links}");
    let flanneld = lab.agent_command(0).unwrap()[0].clone();
    let out = lab
        .exec_in(&ns, &[&flanneld, "--cleanup", &subnet_file])
        .unwrap();
    assert!(
        out.status.success(),
        "flanneld --cleanup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let links = lab.ip_in(&ns, &["-br", "link"]).unwrap();
    assert!(
        !links.contains("flannel-v6.1") && !links.contains("flannel.1"),
        "{links}"
    );
    let r6 = lab
        .ip_in(&ns, &["-6", "route", "show", "proto", "70"])
        .unwrap();
    assert!(r6.trim().is_empty(), "{r6}");
}

/// The pod networks of the dual-stack configs, for the deletion check.
fn networks() -> [ipnet::IpNet; 2] {
    [
        "10.244.0.0/16".parse().unwrap(),
        "fd10:244::/56".parse().unwrap(),
    ]
}
