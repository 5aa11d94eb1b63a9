//! End-to-end: the wireguard backend's IPv6 modes on the lab's dual-stack
//! underlay (`fd18:198:18::/64` beside the IPv4 one).
//!
//! * `separate`: `flannel-wg` for IPv4 and `flannel-wg-v6` on ListenPortV6 for
//!   IPv6, each with its own UAPI socket; a kill -9 restart takes the v6 device
//!   over from its keeper; a peer lease without a v6 key is warned about once
//!   and kept off the v6 device only.
//! * `auto` and `ipv6`: one `flannel-wg` with both families' allowed IPs, the
//!   endpoint family as upstream picks it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use flannel_core::{LeaseAttrs, LeaseKey, WireguardData};
use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::uapi::{hex, parse_get as uapi};
use flannel_lab::{poll_until, Family, Lab, PodId};
use ipnet::{Ipv4Net, Ipv6Net};

const DEADLINE: Duration = Duration::from_secs(90);
const HEALTH_PORT: u16 = 10262;

fn config(mode: &str) -> String {
    format!(
        r#"{{"Network":"10.244.0.0/16","SubnetMax":"10.244.200.0","EnableIPv6":true,"IPv6Network":"fd10:244::/56","IPv6SubnetLen":64,"Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
    )
}

/// Host `h`'s lease (a dual-stack key, so found by its PublicIP).
fn lease_attrs(lab: &Lab, h: usize) -> LeaseAttrs {
    let leases = lab
        .etcd()
        .get_prefix(&format!("{}/subnets/", flannel_lab::lab::ETCD_PREFIX))
        .unwrap();
    leases
        .iter()
        .map(|(_, v)| LeaseAttrs::decode(v).unwrap())
        .find(|a| a.public_ip == lab.hosts()[h].ip)
        .unwrap_or_else(|| panic!("no lease of host {h} in {leases:?}"))
}

fn subnet6(lab: &Lab, h: usize) -> Ipv6Net {
    let text = std::fs::read_to_string(lab.hosts()[h].subnet_file()).expect("subnet.env");
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .and_then(|v| v.trim().parse::<Ipv6Net>().ok())
        .map(|n| n.trunc())
        .unwrap_or_else(|| panic!("no v6 subnet in {text}"))
}

fn pods_and_mesh(lab: &mut Lab) -> Vec<PodId> {
    let pods: Vec<_> = (0..lab.hosts().len())
        .map(|h| lab.add_pod(h).expect("pod"))
        .collect();
    for &from in &pods {
        for &to in &pods {
            if from == to {
                continue;
            }
            let dst = lab.pod(to).unwrap().clone();
            lab.wait_reachable(from, dst.ip).expect("v4 reachable");
            lab.wait_reachable_ip(from, dst.ip6.expect("pod v6 address").into())
                .expect("v6 reachable");
            let st = lab.ping_ip(from, dst.ip6.unwrap().into(), 3).unwrap();
            assert!(st.all_replied(), "v6 {from:?} -> {to:?}: {st:?}");
            let st = lab.ping(from, dst.ip, 3).unwrap();
            assert!(st.all_replied(), "v4 {from:?} -> {to:?}: {st:?}");
        }
    }
    pods
}

/// `flanneld_backend_drops_total{backend="wireguard",reason}` on host `h`.
fn drops(lab: &Lab, h: usize, reason: &str) -> f64 {
    let host = &lab.hosts()[h];
    let r = flannel_lab::http::http_get(
        &host.ns,
        std::net::SocketAddrV4::new(host.ip, HEALTH_PORT),
        "/metrics",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    flannel_lab::checks::backend_drops(&r.body, "wireguard", reason).unwrap()
}

/// Bulk IPv6 TCP between two pods on different hosts, both ways: it travels as
/// TSO6 super-packets split by the sender's device and coalesced by the
/// receiver's; none may be refused as malformed.
fn v6_bulk_tcp(lab: &Lab, pods: &[PodId]) {
    for (from, to) in [(pods[0], pods[1]), (pods[1], pods[0])] {
        let gbit = lab
            .iperf_pods_over(Family::V6, from, to, 2, 2)
            .expect("iperf3 over IPv6");
        assert!(gbit > 0.0, "{from:?} -> {to:?}: {gbit} Gbit/s");
    }
    for h in 0..2 {
        assert_eq!(drops(lab, h, "malformed"), 0.0, "host {h}");
    }
}

#[test]
fn separate_mode_runs_flannel_wg_v6() {
    if !ready_with("e2e_wireguard_dualstack", Needs::Agents, &["wg"]) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(3)
        .ipv6(true)
        .config_json(&config("separate"))
        .agent_arg("--healthz-ip=0.0.0.0")
        .agent_arg(&format!("--healthz-port={HEALTH_PORT}"))
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let mut keys = Vec::new();
    for h in 0..3 {
        let a = lease_attrs(&lab, h);
        let d4 = WireguardData::decode(a.backend_data.as_ref().expect("BackendData")).unwrap();
        let raw6 = a.backend_v6_data.as_ref().expect("BackendV6Data");
        // Go's bytes, and one key for both devices (the key file's).
        assert_eq!(
            raw6.get(),
            format!(r#"{{"PublicKey":"{}","Port":51821}}"#, d4.public_key)
        );
        assert_eq!(
            d4.public_key.to_string(),
            lab.wireguard_public_key(h).unwrap()
        );
        assert_eq!(a.public_ipv6, lab.hosts()[h].ip6);
        keys.push(d4.public_key);

        let ns = lab.hosts()[h].ns.clone();
        let link = lab
            .ip_in(&ns, &["-o", "link", "show", "flannel-wg-v6"])
            .unwrap();
        assert!(link.contains("mtu 1420"), "{link}");
        let s6 = subnet6(&lab, h);
        let addr = lab
            .ip_in(
                &ns,
                &[
                    "-o",
                    "-6",
                    "addr",
                    "show",
                    "dev",
                    "flannel-wg-v6",
                    "scope",
                    "global",
                ],
            )
            .unwrap();
        assert!(addr.contains(&format!("{}/128", s6.network())), "{addr}");
        let route = lab
            .ip_in(&ns, &["-6", "route", "show", "exact", "fd10:244::/56"])
            .unwrap();
        assert!(route.contains("dev flannel-wg-v6"), "{route}");
        // IPv4 stays on flannel-wg, as without IPv6.
        let route4 = lab
            .ip_in(&ns, &["route", "show", "exact", "10.244.0.0/16"])
            .unwrap();
        assert!(
            route4.contains("dev flannel-wg") && route4.contains("scope link"),
            "{route4}"
        );
    }
    let pods = pods_and_mesh(&mut lab);
    v6_bulk_tcp(&lab, &pods);

    // `wg show flannel-wg-v6`: the two other hosts, each at [PublicIPv6]:51821
    // with its v6 subnet; `wg show flannel-wg` keeps the IPv4 view.
    for h in 0..3 {
        let (port, peers) = uapi(&lab.wireguard_uapi_get_of(h, "flannel-wg-v6").unwrap());
        assert_eq!(port, "51821", "host {h}");
        let want: BTreeMap<_, _> = (0..3)
            .filter(|&o| o != h)
            .map(|o| {
                (
                    hex(&keys[o].0),
                    (
                        format!("[{}]:51821", lab.hosts()[o].ip6.unwrap()),
                        vec![subnet6(&lab, o).to_string()],
                    ),
                )
            })
            .collect();
        assert_eq!(peers, want, "host {h}: flannel-wg-v6 peers");
        let (port4, peers4) = uapi(&lab.wireguard_uapi_get(h).unwrap());
        assert_eq!(port4, "51820");
        for (o, key) in keys.iter().enumerate().filter(|&(o, _)| o != h) {
            let (ep, allowed) = &peers4[&hex(&key.0)];
            assert_eq!(ep, &format!("{}:51820", lab.hosts()[o].ip));
            assert_eq!(allowed, &vec![lab.host_subnet(o).unwrap().to_string()]);
        }
    }

    // A peer lease with a v6 part but no v6 key (BackendData only): warned once,
    // an IPv4 peer, no IPv6 peer.
    let used4: Vec<Ipv4Net> = (0..3).map(|h| lab.host_subnet(h).unwrap()).collect();
    let used6: Vec<Ipv6Net> = (0..3).map(|h| subnet6(&lab, h)).collect();
    let net4: Ipv4Net = (180..200)
        .map(|i| format!("10.244.{i}.0/24").parse().unwrap())
        .find(|n| !used4.contains(n))
        .unwrap();
    let net6: Ipv6Net = (0xf0..0x100)
        .map(|i| format!("fd10:244:0:{i:x}::/64").parse().unwrap())
        .find(|n| !used6.contains(n))
        .unwrap();
    let stray_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    let value = format!(
        r#"{{"PublicIP":"198.18.0.91","PublicIPv6":"fd18:198:18::91","BackendType":"wireguard","BackendData":{{"PublicKey":"{stray_key}","Port":51820}}}}"#
    );
    let key = format!(
        "{}/subnets/{}",
        flannel_lab::lab::ETCD_PREFIX,
        LeaseKey {
            v4: net4,
            v6: Some(net6)
        }
    );
    lab.etcd().put_leased(&key, &value, 3600).unwrap();
    let warned = |lab: &Lab, h: usize| {
        lab.agent_log(h)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    && l.contains(&net4.network().to_string())
                    && l.contains("not added to flannel-wg-v6")
            })
            .count()
    };
    poll_until(
        "the v6 warning",
        DEADLINE,
        Duration::from_millis(100),
        || Ok((0..3).all(|h| warned(&lab, h) >= 1)),
    )
    .unwrap();
    let stray_hex = hex(&stray_key.parse::<flannel_core::WgPublicKey>().unwrap().0);
    poll_until(
        "the stray IPv4 peer",
        DEADLINE,
        Duration::from_millis(100),
        || {
            Ok((0..3).all(|h| {
                uapi(&lab.wireguard_uapi_get(h).unwrap_or_default())
                    .1
                    .contains_key(&stray_hex)
            }))
        },
    )
    .unwrap();
    // Another lease event makes every agent look at the peer set again: still one
    // warning, and still no IPv6 peer for it.
    lab.etcd()
        .put_leased(&key, &value.replace("198.18.0.91", "198.18.0.92"), 3600)
        .unwrap();
    poll_until(
        "the changed stray endpoint",
        DEADLINE,
        Duration::from_millis(100),
        || {
            Ok((0..3).all(|h| {
                uapi(&lab.wireguard_uapi_get(h).unwrap_or_default())
                    .1
                    .get(&stray_hex)
                    .is_some_and(|p| p.0 == "198.18.0.92:51820")
            }))
        },
    )
    .unwrap();
    for h in 0..3 {
        assert_eq!(warned(&lab, h), 1, "host {h}: warned once");
        let (_, peers6) = uapi(&lab.wireguard_uapi_get_of(h, "flannel-wg-v6").unwrap());
        assert_eq!(peers6.len(), 2, "host {h}: {peers6:?}");
        assert!(!peers6.contains_key(&stray_hex));
    }
    assert!(lab.etcd().delete(&key).unwrap());
    lab.check_agents().unwrap();

    // kill -9 and restart host 1: the keeper held flannel-wg-v6 and the new agent
    // takes it over; v6 pings out of the restarted host lose nothing.
    let ip6: Vec<Ipv6Addr> = pods
        .iter()
        .map(|p| lab.pod(*p).unwrap().ip6.unwrap())
        .collect();
    let out_of = lab.start_ping_ip(pods[1], IpAddr::V6(ip6[2]), 40).unwrap();
    let into = lab.start_ping_ip(pods[0], IpAddr::V6(ip6[1]), 40).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    lab.kill_agent(1).unwrap();
    lab.start_agent(1).unwrap();
    let out_st = out_of.finish(DEADLINE).expect("ping");
    let into_st = into.finish(DEADLINE).expect("ping");
    eprintln!("kill -9 restart, v6: out of the restarted host {out_st:?}; into it {into_st:?}");
    assert!(
        out_st.all_replied(),
        "v6 pings out of the restarted host lost: {out_st:?}"
    );
    lab.check_agents().unwrap();
    let log = lab.agent_log(1).unwrap();
    let last_start = log.rsplit("===== flannel-lab: starting").next().unwrap();
    let v6_line = last_start
        .lines()
        .find(|l| l.contains("wireguard backend started") && l.contains("flannel-wg-v6"))
        .unwrap_or_else(|| panic!("no flannel-wg-v6 start line:\n{last_start}"));
    assert!(v6_line.contains("inherited=true"), "{v6_line}");
    let (_, peers6) = uapi(&lab.wireguard_uapi_get_of(1, "flannel-wg-v6").unwrap());
    assert_eq!(peers6.len(), 2, "{peers6:?}");

    // SIGTERM leaves both devices to their keepers; --cleanup removes both, with
    // their keepers and UAPI sockets.
    let st = lab.stop_agent(1).unwrap();
    assert!(st.success(), "flanneld exit on SIGTERM: {st}");
    let ns = lab.hosts()[1].ns.clone();
    let link_exists = |dev: &str| {
        lab.exec_in(&ns, &["ip", "link", "show", dev])
            .unwrap()
            .status
            .success()
    };
    assert!(link_exists("flannel-wg") && link_exists("flannel-wg-v6"));
    let host = &lab.hosts()[1];
    let flanneld = lab.agent_command(1).unwrap()[0].clone();
    let socket_dir = format!(
        "FLANNEL_WG_SOCKET_DIR={}",
        host.dir.join("wireguard").display()
    );
    let subnet_file = format!("--subnet-file={}", host.subnet_file().display());
    let out = lab
        .exec_in(
            &ns,
            &["env", &socket_dir, &flanneld, "--cleanup", &subnet_file],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "flanneld --cleanup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for dev in ["flannel-wg", "flannel-wg-v6"] {
        assert!(!link_exists(dev), "{dev} survived --cleanup");
        assert!(
            !host.wireguard_socket_of(dev).exists(),
            "{dev}'s UAPI socket survived --cleanup"
        );
    }
}

/// One device for both families: allowed IPs of both, the endpoint by mode.
fn one_device(mode: &str) {
    if !ready_with("e2e_wireguard_dualstack", Needs::Agents, &["wg"]) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(3)
        .ipv6(true)
        .config_json(&config(mode))
        .agent_arg("--healthz-ip=0.0.0.0")
        .agent_arg(&format!("--healthz-port={HEALTH_PORT}"))
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let mut keys = Vec::new();
    for h in 0..3 {
        let a = lease_attrs(&lab, h);
        let d4 = WireguardData::decode(a.backend_data.as_ref().unwrap()).unwrap();
        // The one device listens on ListenPort, so that is the v6 data's port.
        assert_eq!(
            a.backend_v6_data.as_ref().expect("BackendV6Data").get(),
            format!(r#"{{"PublicKey":"{}","Port":51820}}"#, d4.public_key)
        );
        keys.push(d4.public_key);
        let ns = lab.hosts()[h].ns.clone();
        assert!(!lab
            .exec_in(&ns, &["ip", "link", "show", "flannel-wg-v6"])
            .unwrap()
            .status
            .success());
        let route = lab
            .ip_in(&ns, &["-6", "route", "show", "exact", "fd10:244::/56"])
            .unwrap();
        assert!(route.contains("dev flannel-wg "), "{route}");
        let addr = lab
            .ip_in(
                &ns,
                &[
                    "-o",
                    "-6",
                    "addr",
                    "show",
                    "dev",
                    "flannel-wg",
                    "scope",
                    "global",
                ],
            )
            .unwrap();
        assert!(
            addr.contains(&format!("{}/128", subnet6(&lab, h).network())),
            "{addr}"
        );
    }
    let pods = pods_and_mesh(&mut lab);
    v6_bulk_tcp(&lab, &pods);
    for h in 0..3 {
        let (port, peers) = uapi(&lab.wireguard_uapi_get(h).unwrap());
        assert_eq!(port, "51820");
        let want: BTreeMap<_, _> = (0..3)
            .filter(|&o| o != h)
            .map(|o| {
                let (r, l) = (&lab.hosts()[o], &lab.hosts()[h]);
                // auto: the peer's IPv6 is a ULA (Go's IsPrivate), so IPv4.
                assert!(r.ip6.unwrap().segments()[0] & 0xfe00 == 0xfc00 && l.ip6.is_some());
                let v6 = mode == "ipv6";
                let ep = if v6 {
                    format!("[{}]:51820", r.ip6.unwrap())
                } else {
                    format!("{}:51820", r.ip)
                };
                (
                    hex(&keys[o].0),
                    (
                        ep,
                        vec![
                            lab.host_subnet(o).unwrap().to_string(),
                            subnet6(&lab, o).to_string(),
                        ],
                    ),
                )
            })
            .collect();
        assert_eq!(peers, want, "host {h}: flannel-wg peers in mode {mode}");
    }
    lab.check_agents().unwrap();
}

#[test]
fn auto_mode_one_device_for_both_families() {
    // The lab's underlay is a ULA, so auto reaches every peer over IPv4 (as
    // upstream does): v6 pods over a v4 endpoint.
    one_device("auto");
}

#[test]
fn ipv6_mode_one_device_over_ipv6_endpoints() {
    one_device("ipv6");
}
