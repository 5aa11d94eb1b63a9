//! End-to-end: the lab's IPv6 underlay, and dual-stack (IPv4 + IPv6) pod networks.

use std::time::Duration;

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
