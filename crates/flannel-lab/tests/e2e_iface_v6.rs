//! End to end: choosing the IPv6 address in dual stack (beyond upstream, which
//! finds only the IPv4 address with these flags). One host with its underlay
//! link and a second interface (one end of a veth pair inside the host's namespace) holding an
//! IPv4 and two IPv6 addresses, each of the latter the source of its own route.
//!
//! * `--iface-can-reach <v6>`: the interface of `ip -6 route get <v6>` and that
//!   route's source address as PublicIPv6 (both sources in turn, so the result
//!   cannot be the interface's preferred address by chance), the interface's
//!   IPv4 address as PublicIP; a destination behind the underlay chooses the
//!   underlay.
//! * `--iface-regex` matching one IPv6 address: that interface and address.
//!
//! Checked in subnet.env (both families' subnets) and in the etcd lease.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use flannel_core::{LeaseAttrs, LeaseKey};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::Lab;

const DEADLINE: Duration = Duration::from_secs(90);
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"host-gw"}}"#;
const SECOND4: &str = "192.168.77.1";
const SECOND6_A: &str = "fd77::1";
const SECOND6_B: &str = "fd77::2";

/// Starts host 0's agent with `args` choosing the interface and returns the
/// (PublicIP, PublicIPv6) of the lease its subnet.env names, after checking that
/// subnet.env carries both families.
fn run_with(lab: &mut Lab, args: &[&str]) -> (Ipv4Addr, Option<Ipv6Addr>) {
    lab.set_agent_iface_args(0, args).unwrap();
    lab.start_agent(0).expect("flanneld");
    let env = lab.subnet_file(0).unwrap().expect("subnet.env");
    let v6 = env
        .ipv6_subnet
        .unwrap_or_else(|| panic!("{args:?}: no FLANNEL_IPV6_SUBNET in {}", env.text));
    assert!(
        env.text.contains("FLANNEL_IPV6_NETWORK=fd10:244::/56\n"),
        "{}",
        env.text
    );
    let key = format!(
        "{}/subnets/{}",
        flannel_lab::lab::ETCD_PREFIX,
        LeaseKey {
            v4: env.subnet,
            v6: Some(v6),
        }
    );
    let value = lab
        .etcd()
        .get(&key)
        .unwrap()
        .unwrap_or_else(|| panic!("{args:?}: no lease {key}"));
    let attrs = LeaseAttrs::decode(&value).unwrap();
    lab.stop_agent(0).expect("flanneld stops");
    (attrs.public_ip, attrs.public_ipv6)
}

#[test]
fn iface_can_reach_and_regex_find_the_ipv6_address() {
    if !ready("iface v6 selection", Needs::Agents) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(1)
        .ipv6(true)
        .config_json(CONFIG)
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let ns = lab.hosts()[0].ns.clone();
    let under4 = lab.hosts()[0].ip;
    let under6 = lab.hosts()[0].ip6.unwrap();
    // A veth pair with both ends inside the host's namespace (the kernel here has
    // no dummy links): it goes with the namespace.
    let second = format!("{}d2", lab.link_tag());
    let other_end = format!("{}e2", lab.link_tag());
    for args in [
        vec![
            "link", "add", &second, "type", "veth", "peer", "name", &other_end,
        ],
        vec!["link", "set", &other_end, "up"],
        vec!["link", "set", &second, "up"],
        vec!["addr", "add", &format!("{SECOND4}/24"), "dev", &second],
        vec![
            "addr",
            "add",
            &format!("{SECOND6_A}/64"),
            "dev",
            &second,
            "nodad",
        ],
        vec![
            "addr",
            "add",
            &format!("{SECOND6_B}/64"),
            "dev",
            &second,
            "nodad",
        ],
        vec![
            "-6",
            "route",
            "add",
            "fd77:a::/64",
            "dev",
            &second,
            "src",
            SECOND6_A,
        ],
        vec![
            "-6",
            "route",
            "add",
            "fd77:b::/64",
            "dev",
            &second,
            "src",
            SECOND6_B,
        ],
    ] {
        lab.ip_in(&ns, &args).unwrap();
    }
    let get = lab
        .ip_in(&ns, &["-6", "route", "get", "fd77:b::9"])
        .unwrap();
    assert!(get.contains(&format!("src {SECOND6_B}")), "{get}");

    let second4: Ipv4Addr = SECOND4.parse().unwrap();
    for (dst, want6) in [("fd77:b::9", SECOND6_B), ("fd77:a::9", SECOND6_A)] {
        let got = run_with(&mut lab, &[&format!("--iface-can-reach={dst}")]);
        assert_eq!(
            got,
            (second4, Some(want6.parse().unwrap())),
            "--iface-can-reach={dst}"
        );
    }
    // A destination on the underlay's prefix: the underlay and its addresses.
    let got = run_with(&mut lab, &["--iface-can-reach=fd18:198:18::77"]);
    assert_eq!(
        got,
        (under4, Some(under6)),
        "--iface-can-reach to the underlay"
    );

    // `--iface-regex` matching only an IPv6 address (upstream matches IPv4
    // addresses in dual stack and would find nothing).
    let got = run_with(&mut lab, &["--iface-regex=^fd77::2$"]);
    assert_eq!(
        got,
        (second4, Some(SECOND6_B.parse().unwrap())),
        "--iface-regex=^fd77::2$"
    );
    let got = run_with(&mut lab, &["--iface-regex=^fd77::1$"]);
    assert_eq!(
        got,
        (second4, Some(SECOND6_A.parse().unwrap())),
        "--iface-regex=^fd77::1$"
    );
    println!("--iface-can-reach and --iface-regex chose each IPv6 address asked for");
}
