//! End-to-end with the `alloc` backend (leases only, no data plane): distinct
//! leases in etcd in flannel's format, subnet.env, clean SIGTERM, restart keeps the
//! subnet.

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
