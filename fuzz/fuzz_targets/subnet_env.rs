//! `/run/flannel/subnet.env`: flanneld reads the previous run's subnets from it at
//! start (flannel-core) and the CNI plugin reads the whole file (flannel-cni).
#![no_main]

use flannel_cni::FlannelEnv;
use flannel_core::subnet_env::parse_env_lines;
use flannel_core::{PreviousSubnets, SubnetEnv};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    for (k, v) in parse_env_lines(text) {
        assert_eq!(k, k.trim());
        assert!(!k.contains('\n') && !v.contains('\n'));
    }

    let prev = PreviousSubnets::parse(text);
    for n in [prev.network, prev.subnet].into_iter().flatten() {
        assert_eq!(n, n.trunc());
    }
    for n in [prev.ipv6_network, prev.ipv6_subnet].into_iter().flatten() {
        assert_eq!(n, n.trunc());
    }

    let Ok(env) = FlannelEnv::parse(text) else {
        return;
    };
    // Both readers agree on the subnets a valid file names.
    match env.subnet {
        Some(IpNet::V4(s)) => assert_eq!(prev.subnet, Some(s), "{text:?}"),
        Some(IpNet::V6(_)) | None => {}
    }
    match env.ipv6_subnet {
        Some(IpNet::V6(s)) => assert_eq!(prev.ipv6_subnet, Some(s), "{text:?}"),
        Some(IpNet::V4(_)) | None => {}
    }

    // A file of the shape flanneld writes renders back to what the plugin read.
    let v4 = |n: &Option<IpNet>| match n {
        Some(IpNet::V4(n)) if n.prefix_len() < 32 => Some(*n),
        _ => None,
    };
    let v6 = |n: &Option<IpNet>| match n {
        Some(IpNet::V6(n)) if n.prefix_len() < 128 => Some(*n),
        _ => None,
    };
    let network = env.networks.first().copied();
    let ipv6_network = env.ipv6_networks.first().copied();
    let shaped = env.networks.len() <= 1
        && env.ipv6_networks.len() <= 1
        && v4(&network).is_some() == network.is_some()
        && v4(&env.subnet).is_some() == env.subnet.is_some()
        && v6(&ipv6_network).is_some() == ipv6_network.is_some()
        && v6(&env.ipv6_subnet).is_some() == env.ipv6_subnet.is_some()
        && network.is_some() == env.subnet.is_some()
        && ipv6_network.is_some() == env.ipv6_subnet.is_some();
    if shaped {
        let rendered = SubnetEnv {
            network: v4(&network),
            subnet: v4(&env.subnet),
            ipv6_network: v6(&ipv6_network),
            ipv6_subnet: v6(&env.ipv6_subnet),
            mtu: env.mtu,
            ip_masq: env.ip_masq,
        }
        .render();
        let back = FlannelEnv::parse(&rendered).unwrap_or_else(|e| panic!("{rendered:?}: {e}"));
        assert_eq!(back, env, "{text:?} -> {rendered:?}");
    }
});
