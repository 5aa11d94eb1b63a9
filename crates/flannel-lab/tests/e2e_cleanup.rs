//! End-to-end: `flanneld --cleanup` after a real run removes everything flanneld put
//! on the host and nothing else.
//!
//! Host 1's state is listed before its agent ever starts (`ip -d link`, routes of every
//! table, permanent neighbours, `bridge fdb`, `nft list ruleset`, `iptables-save` and
//! friends), then the cluster runs with pods talking across hosts, the pods go (CNI
//! DEL), the agent gets SIGTERM (which leaves its state in place for a hitless
//! restart), and `flanneld --cleanup --subnet-file=<host 1's>` runs inside host 1's
//! namespace. Afterwards the listings must equal the first ones; a second cleanup is
//! a successful no-op.
//!
//! Normalised before comparing: rule counters and iptables-save's comment lines;
//! line order where the kernel's dump order carries no meaning (links, routes,
//! neighbours, FDB); neighbour entries the kernel learns by itself (everything not
//! PERMANENT/NOARP: ARP/ND cache entries come and go with traffic and age out).
//!
//! Not flanneld's and therefore expected to survive the cleanup: the CNI bridge
//! `cni0` (the bridge plugin creates it and leaves it on DEL). The test checks that
//! it survives, then deletes it itself before the final comparison.

use std::collections::BTreeMap;

use flannel_lab::bins::find_tool;
use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::Lab;

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(90);

#[test]
fn vxlan_iptables_mode_cleanup_restores_the_host_with_foreign_state() {
    cleanup_scenario("e2e_cleanup vxlan/iptables", "vxlan", false, true);
}

#[test]
fn host_gw_nftables_mode_cleanup_restores_a_fresh_host() {
    cleanup_scenario("e2e_cleanup host-gw/nftables", "host-gw", true, false);
}

/// iptables-nft creates the `nat` and `filter` tables for flannel's rules on a host
/// that had none: the cleanup removes them again once they are empty.
#[test]
fn host_gw_iptables_mode_cleanup_restores_a_fresh_host() {
    cleanup_scenario("e2e_cleanup host-gw/iptables", "host-gw", false, false);
}

#[test]
fn vxlan_nftables_mode_cleanup_restores_the_host_with_foreign_state() {
    cleanup_scenario("e2e_cleanup vxlan/nftables", "vxlan", true, true);
}

fn tools_ready(what: &str) -> bool {
    ready_with(
        what,
        Needs::Agents,
        &["nft", "iptables", "iptables-save", "ip6tables-save"],
    )
}

// ----- listings -----

/// Each listing by name, normalised.
type Snapshot = BTreeMap<&'static str, Vec<String>>;

/// Runs `args` inside `ns`; the output, or a marker with the exit status if the tool
/// fails (e.g. a legacy iptables the kernel lacks: the same marker both times).
fn listing(lab: &Lab, ns: &str, args: &[&str]) -> String {
    let out = lab.exec_in(ns, args).unwrap();
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        format!("<{} failed: {}>", args.join(" "), out.status)
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// `ip -d link` prints one entry over several lines; an entry starts with `<index>:`.
fn link_entries(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        if l.starts_with(|c: char| c.is_ascii_digit()) || out.is_empty() {
            out.push(l.trim().to_string());
        } else if let Some(last) = out.last_mut() {
            last.push_str(" | ");
            last.push_str(l.trim());
        }
    }
    sorted(out)
}

/// `counter packets N bytes M` → `counter`.
fn without_nft_counters(text: &str) -> Vec<String> {
    lines(text)
        .into_iter()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let mut kept = Vec::new();
            let mut i = 0;
            while i < words.len() {
                if words[i] == "packets"
                    && words.get(i + 2) == Some(&"bytes")
                    && i + 3 < words.len()
                {
                    i += 4;
                    continue;
                }
                kept.push(words[i]);
                i += 1;
            }
            kept.join(" ")
        })
        .collect()
}

/// Drops `#` comment lines (timestamps) and zeroes `[packets:bytes]` chain counters.
fn without_iptables_counters(text: &str) -> Vec<String> {
    lines(text)
        .into_iter()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind('[')) {
            (true, Some(at)) if l.ends_with(']') => format!("{}[0:0]", &l[..at]),
            _ => l,
        })
        .collect()
}

/// Waits until no IPv6 address in `ns` is tentative: the kernel adds an address's
/// local route only once duplicate address detection is done, so a listing taken
/// earlier would miss it.
fn wait_ipv6_settled(lab: &Lab, ns: &str) {
    flannel_lab::poll_until(
        &format!("IPv6 duplicate address detection in {ns}"),
        DEADLINE,
        std::time::Duration::from_millis(100),
        || {
            Ok(lab
                .ip_in(ns, &["-6", "addr", "show", "tentative"])?
                .trim()
                .is_empty())
        },
    )
    .unwrap();
}

fn snapshot(lab: &Lab, ns: &str) -> Snapshot {
    wait_ipv6_settled(lab, ns);
    let mut s = Snapshot::new();
    s.insert(
        "ip -d link",
        link_entries(&listing(lab, ns, &["ip", "-d", "link", "show"])),
    );
    let mut routes = lines(&listing(
        lab,
        ns,
        &["ip", "-4", "route", "show", "table", "all"],
    ));
    routes.extend(lines(&listing(
        lab,
        ns,
        &["ip", "-6", "route", "show", "table", "all"],
    )));
    s.insert("ip route show table all", sorted(routes));
    let mut neigh = lines(&listing(lab, ns, &["ip", "-4", "neigh", "show"]));
    neigh.extend(lines(&listing(lab, ns, &["ip", "-6", "neigh", "show"])));
    s.insert(
        "ip neigh (PERMANENT/NOARP)",
        sorted(
            neigh
                .into_iter()
                .filter(|l| l.contains("PERMANENT") || l.contains("NOARP"))
                .collect(),
        ),
    );
    s.insert(
        "bridge fdb",
        sorted(lines(&listing(lab, ns, &["bridge", "fdb", "show"]))),
    );
    s.insert(
        "nft list ruleset",
        without_nft_counters(&listing(lab, ns, &["nft", "list", "ruleset"])),
    );
    for tool in [
        "iptables-save",
        "ip6tables-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        let text = if find_tool(tool).is_ok() {
            listing(lab, ns, &[tool])
        } else {
            format!("<{tool} not installed>")
        };
        s.insert(tool, without_iptables_counters(&text));
    }
    s
}

/// Human-readable differences between two snapshots (empty if equal).
fn differences(before: &Snapshot, after: &Snapshot) -> String {
    let mut out = String::new();
    for (name, b) in before {
        let a = &after[name];
        if a == b {
            continue;
        }
        let gone: Vec<&String> = b.iter().filter(|l| !a.contains(l)).collect();
        let new: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
        out.push_str(&format!("== {name}\n"));
        for l in gone {
            out.push_str(&format!("  - {l}\n"));
        }
        for l in new {
            out.push_str(&format!("  + {l}\n"));
        }
        if out.ends_with(&format!("== {name}\n")) {
            out.push_str(&format!(
                "  (same lines, different order)\n  before: {b:#?}\n  after: {a:#?}\n"
            ));
        }
    }
    out
}

// ----- state that is not flannel's -----

/// Puts things on host `h` that look a bit like flannel's but are not: a vxlan device
/// with another name, an FDB entry on it, a permanent neighbour, a `proto boot` route
/// outside the cluster network, a static route, iptables rules in the chains flannel
/// uses and an own chain, and an nftables table with a forward hook.
fn seed_foreign_state(lab: &Lab, h: usize) {
    let host = &lab.hosts()[h];
    let (ns, link) = (host.ns.clone(), host.link.clone());
    let vx = format!("{}vf", lab.link_tag());
    let local = host.ip.to_string();
    let run = |args: &[&str]| {
        lab.run_in(&ns, args)
            .unwrap_or_else(|e| panic!("seeding {args:?}: {e}"));
    };
    run(&[
        "ip",
        "link",
        "add",
        &vx,
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "4790",
        "local",
        &local,
        "dev",
        &link,
        "nolearning",
    ]);
    run(&["ip", "link", "set", &vx, "up"]);
    run(&[
        "bridge",
        "fdb",
        "append",
        "00:00:00:00:00:00",
        "dev",
        &vx,
        "dst",
        "198.18.0.99",
    ]);
    run(&[
        "ip",
        "neigh",
        "add",
        "198.18.0.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        &link,
        "nud",
        "permanent",
    ]);
    run(&[
        "ip",
        "route",
        "add",
        "192.0.2.0/24",
        "via",
        "198.18.0.254",
        "proto",
        "boot",
    ]);
    run(&[
        "ip",
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "198.18.0.254",
        "proto",
        "static",
    ]);
    run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-d",
        "192.0.2.0/24",
        "-m",
        "comment",
        "--comment",
        "foreign",
        "-j",
        "RETURN",
    ]);
    run(&[
        "iptables",
        "-A",
        "FORWARD",
        "-d",
        "192.0.2.0/24",
        "-j",
        "ACCEPT",
    ]);
    run(&["iptables", "-N", "FOREIGN-FWD"]);
    run(&["iptables", "-A", "FOREIGN-FWD", "-j", "RETURN"]);
    run(&["nft", "add", "table", "inet", "foreign"]);
    run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "foreign",
        "forward_extra",
        "{ type filter hook forward priority 10 ; policy accept ; }",
    ]);
    run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "foreign",
        "forward_extra",
        "ip",
        "daddr",
        "192.0.2.7",
        "counter",
        "accept",
    ]);
}

// ----- the scenario -----

fn run_cleanup(lab: &Lab, h: usize, round: &str) {
    let host = &lab.hosts()[h];
    let flanneld = lab.agent_command(h).unwrap()[0].clone();
    let subnet_file = format!("--subnet-file={}", host.subnet_file().display());
    let out = lab
        .exec_in(&host.ns, &[&flanneld, "--cleanup", &subnet_file])
        .unwrap();
    assert!(
        out.status.success(),
        "{round}: flanneld --cleanup failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cleanup_scenario(what: &str, backend: &str, nft: bool, foreign: bool) {
    if !tools_ready(what) {
        return;
    }
    let config = serde_json::json!({
        "Network": flannel_lab::lab::DEFAULT_NETWORK,
        "EnableNFTables": nft,
        "Backend": {"Type": backend},
    })
    .to_string();
    let mut lab = Lab::builder()
        .hosts(2)
        .config_json(&config)
        .ip_masq(true)
        // A blackhole route for the own subnet, checked every second: the cleanup
        // must remove it too, and a deleted one must come back.
        .agent_arg("--ip-blackhole-route")
        .agent_arg("--iptables-resync=1")
        .start_agents(false)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let ns = lab.hosts()[0].ns.clone();
    if foreign {
        seed_foreign_state(&lab, 0);
    }
    let before = snapshot(&lab, &ns);

    // A real run: both agents, pods on both hosts talking to each other.
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    let p0 = lab.add_pod(0).unwrap();
    let p1 = lab.add_pod(1).unwrap();
    let (ip0, ip1) = (lab.pod(p0).unwrap().ip, lab.pod(p1).unwrap().ip);
    lab.wait_reachable(p0, ip1).unwrap();
    lab.wait_reachable(p1, ip0).unwrap();
    let peer_subnet = lab.host_subnet(1).unwrap();
    let running = snapshot(&lab, &ns);
    // The run left its marks (so the comparison below can fail).
    let routes = running["ip route show table all"].join("\n");
    assert!(
        routes.contains(&format!("{peer_subnet} via ")),
        "no route to the peer's {peer_subnet}:\n{routes}"
    );
    let own = lab.host_subnet(0).unwrap();
    let blackhole = format!("blackhole {own} proto 70 metric 1000000");
    assert!(
        routes.lines().any(|l| l.trim() == blackhole),
        "no `{blackhole}`:\n{routes}"
    );
    // The pods reached each other above: the bridge's route beats the blackhole.
    // Deleted by hand, the blackhole is back within the resync period.
    lab.ip_in(
        &ns,
        &[
            "route",
            "del",
            "blackhole",
            &own.to_string(),
            "metric",
            "1000000",
        ],
    )
    .unwrap();
    flannel_lab::poll_until(
        "the blackhole route to be restored",
        DEADLINE,
        std::time::Duration::from_millis(100),
        || {
            Ok(lab
                .ip_in(&ns, &["route", "show", "type", "blackhole"])?
                .contains(&own.to_string()))
        },
    )
    .unwrap();
    if backend == "vxlan" {
        let links = running["ip -d link"].join("\n");
        assert!(links.contains(" flannel.1: "), "{links}");
    }
    if nft {
        let rules = running["nft list ruleset"].join("\n");
        assert!(rules.contains("table ip flannel-ipv4"), "{rules}");
    } else {
        let rules = running["iptables-save"].join("\n");
        assert!(rules.contains("FLANNEL-POSTRTG"), "{rules}");
        assert!(rules.contains("FLANNEL-FWD"), "{rules}");
    }

    lab.remove_pod(p0).unwrap();
    lab.remove_pod(p1).unwrap();
    let st = lab.stop_agent(0).unwrap();
    assert!(st.success(), "flanneld exit on SIGTERM: {st}");
    // SIGTERM leaves everything in place (hitless restart): the cleanup has work.
    assert!(lab.subnet_file(0).unwrap().is_some());
    assert_ne!(differences(&before, &snapshot(&lab, &ns)), "");

    run_cleanup(&lab, 0, "first cleanup");
    assert!(
        !lab.hosts()[0].subnet_file().exists(),
        "subnet.env still there after cleanup"
    );
    // The CNI bridge is not flanneld's: it must survive; then it goes by hand.
    let links = snapshot(&lab, &ns)["ip -d link"].join("\n");
    assert!(
        links.contains(" cni0: "),
        "cleanup deleted the CNI bridge:\n{links}"
    );
    lab.ip_in(&ns, &["link", "del", "cni0"]).unwrap();
    let after = snapshot(&lab, &ns);
    let diff = differences(&before, &after);
    assert!(
        diff.is_empty(),
        "{what}: host state after cleanup differs from before the agent started:\n{diff}"
    );

    run_cleanup(&lab, 0, "second cleanup");
    let again = snapshot(&lab, &ns);
    let diff = differences(&before, &again);
    assert!(
        diff.is_empty(),
        "{what}: a second cleanup changed the host:\n{diff}"
    );
    // The other host is untouched by this host's cleanup and its agent still runs.
    lab.check_agent(1).unwrap();
}
