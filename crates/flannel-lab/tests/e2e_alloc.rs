//! End-to-end with the backends that have no data plane: `alloc` (distinct leases
//! in etcd in flannel's format, subnet.env, clean SIGTERM, restart keeps the subnet)
//! and, in dual stack, `alloc` and `extension` leasing both families.

use std::time::Duration;

use flannel_lab::e2e::{ready, Needs};
use flannel_lab::Lab;

#[test]
fn alloc_leases_subnet_files_and_restart() {
    if !ready("alloc", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(3)
        .backend("alloc")
        .timeout(Duration::from_secs(60))
        .build()
        .expect("lab");
    let mut subnets = Vec::new();
    for h in 0..3 {
        let sf = lab.subnet_file(h).unwrap().expect("subnet.env");
        assert_eq!(sf.network, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(sf.subnet.prefix_len(), 24);
        assert!(sf.ip_masq);
        assert_eq!(sf.mtu, 1500, "alloc uses the interface MTU");
        let value = lab.get_lease(h).unwrap().expect("lease in etcd");
        let v: serde_json::Value = serde_json::from_str(&value).unwrap();
        assert_eq!(v["PublicIP"], lab.hosts()[h].ip.to_string(), "{value}");
        subnets.push(sf.subnet);
    }
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 3);

    let before = lab.host_subnet(1).unwrap();
    let st = lab.stop_agent(1).unwrap();
    assert!(st.success(), "SIGTERM exit: {st}");
    // Lease and subnet.env stay after a clean stop.
    assert!(lab.get_lease(1).unwrap().is_some());
    lab.start_agent(1).unwrap();
    assert_eq!(lab.host_subnet(1).unwrap(), before);
    let rss = lab.agent_rss_kib(1).unwrap();
    assert!(rss > 0);
}

/// Host `h`'s IPv6 subnet from its subnet.env.
fn ipv6_subnet_of(lab: &Lab, h: usize) -> ipnet::Ipv6Net {
    let text = std::fs::read_to_string(lab.hosts()[h].subnet_file()).expect("subnet.env");
    assert!(
        text.contains("FLANNEL_IPV6_NETWORK=fd10:244::/56\n"),
        "{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no IPv6 subnet in {text}"))
}

/// Dual stack without a data plane: `alloc` leases both families (the lease
/// publishes PublicIPv6, subnet.env has both networks), and `extension` hands its
/// PostStartupCommand the IPv6 subnet and public address as upstream does.
#[test]
fn alloc_and_extension_lease_both_families_in_dual_stack() {
    if !ready("alloc and extension dual stack", Needs::Agents) {
        return;
    }
    for backend in [
        r#"{"Type":"alloc"}"#,
        r#"{"Type":"extension","PostStartupCommand":"env"}"#,
    ] {
        let config = format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{backend}}}"#
        );
        let lab = Lab::builder()
            .hosts(2)
            .ipv6(true)
            .config_json(&config)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("lab");
        let ty = if backend.contains("alloc") {
            "alloc"
        } else {
            "extension"
        };
        let mut subnets6 = Vec::new();
        for h in 0..2 {
            let s6 = ipv6_subnet_of(&lab, h);
            assert_eq!(s6.prefix_len(), 64, "{ty}");
            // The key names both subnets, as upstream writes a dual-stack lease.
            let sf = lab.subnet_file(h).unwrap().expect("subnet.env");
            let key = format!(
                "{}/subnets/{}-{}&{}-{}",
                flannel_lab::lab::ETCD_PREFIX,
                sf.subnet.network(),
                sf.subnet.prefix_len(),
                s6.network(),
                s6.prefix_len()
            );
            let value = lab.etcd().get(&key).unwrap().expect("lease in etcd");
            let v: serde_json::Value = serde_json::from_str(&value).unwrap();
            let host = &lab.hosts()[h];
            assert_eq!(v["PublicIP"], host.ip.to_string(), "{value}");
            assert_eq!(v["PublicIPv6"], host.ip6.unwrap().to_string(), "{value}");
            // Upstream's alloc leaves BackendType out (empty, `omitempty`).
            let want_type = if ty == "alloc" {
                serde_json::Value::Null
            } else {
                serde_json::json!(ty)
            };
            assert_eq!(v["BackendType"], want_type, "{value}");
            if ty == "extension" {
                let log = lab.agent_log(h).unwrap();
                for want in [
                    format!("IPV6SUBNET={}", s6.trunc()),
                    format!("PUBLIC_IPV6={}", host.ip6.unwrap()),
                    format!("SUBNET={}", sf.subnet),
                ] {
                    assert!(log.contains(&want), "{ty}: no {want} in the log:\n{log}");
                }
            }
            subnets6.push(s6);
        }
        assert_ne!(subnets6[0], subnets6[1], "{ty}");
    }
}
