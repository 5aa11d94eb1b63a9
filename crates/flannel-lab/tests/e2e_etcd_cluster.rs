//! End-to-end: flanneld on a real 3-member etcd cluster while members fail.
//!
//! Every test runs two hosts with a pod each (vxlan), the agents given all three
//! endpoints, a pod pinging the other host's pod every 0.2 s throughout, and
//! `ip monitor` recording every route host 1's kernel gets. A writer plays the other
//! nodes of the cluster: it puts made-up peer leases (each on its own etcd lease,
//! as flanneld writes them) and deletes them again, retrying through the failover
//! as a client would.
//! * `member_and_leader_kills_lose_nothing`: the member host 1's agent talks to is
//!   killed, later the leader; every lease written and deleted meanwhile gives
//!   exactly one route add and one route delete (nothing lost, nothing twice), the
//!   agents keep their leases and the pods lose no ping.
//! * `a_member_down_for_a_minute`: the same with one member stopped for 60 s, long
//!   enough for the agents to renew their leases on the remaining two.
//! * `quorum_loss_keeps_the_data_plane`: two of three members stopped for 20 s. The
//!   data plane stays as it was, the agent's metrics say the lease watch is down,
//!   and once quorum is back the same agent routes a new lease.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flannel_lab::e2e::{ready_with, Needs};
use flannel_lab::etcd::Etcd;
use flannel_lab::http::http_get;
use flannel_lab::leases::peer_lease_value;
use flannel_lab::{poll_until, BackgroundPing, Lab, Monitor, PodId};
use ipnet::Ipv4Net;

const DEADLINE: Duration = Duration::from_secs(90);
const HEALTH_PORT: u16 = 10262;
/// The agents lease from 10.1.0.0/16 only; the writer's made-up peers live in
/// 10.200.0.0/16, so they can never overlap a real host's subnet.
const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetMin":"10.1.0.0","SubnetMax":"10.1.255.0","Backend":{"Type":"vxlan"}}"#;
/// Made-up peers' public addresses: on the underlay, but no host has them.
const FAKE_PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);

fn fake_subnet(i: usize) -> Ipv4Net {
    Ipv4Net::new(
        Ipv4Addr::new(10, 200 + (i / 256) as u8, (i % 256) as u8, 0),
        24,
    )
    .expect("a /24")
}

fn is_fake(subnet: &Ipv4Net) -> bool {
    Ipv4Net::new(Ipv4Addr::new(10, 200, 0, 0), 13)
        .expect("a /13")
        .contains(subnet)
}

/// A lab of two hosts with a pod each on a 3-member etcd; host 1's agent serves
/// metrics on 127.0.0.1 of its namespace.
struct Cluster {
    lab: Lab,
    pods: (PodId, PodId),
    monitor: Monitor,
    /// Each host's lease key and subnet at the start.
    leases: Vec<(String, Ipv4Net)>,
    agent_pids: Vec<Option<u32>>,
}

impl Cluster {
    fn start(extra_agent_args: &[&str]) -> Cluster {
        let mut b = Lab::builder()
            .hosts(2)
            .etcd_members(3)
            .config_json(CONFIG)
            .agent_arg("--healthz-ip=127.0.0.1")
            .agent_arg(&format!("--healthz-port={HEALTH_PORT}"))
            .timeout(DEADLINE);
        for a in extra_agent_args {
            b = b.agent_arg(a);
        }
        let mut lab = b.build().expect("lab");
        let p0 = lab.add_pod(0).expect("pod on host 1");
        let p1 = lab.add_pod(1).expect("pod on host 2");
        lab.wait_reachable(p0, lab.pod(p1).unwrap().ip)
            .expect("pods reach each other");
        let monitor = lab
            .monitor(&lab.hosts()[0].ns.clone(), &["route"])
            .expect("ip monitor");
        let leases = (0..2)
            .map(|h| (lab.lease_key(h).unwrap(), lab.host_subnet(h).unwrap()))
            .collect();
        let agent_pids = (0..2).map(|h| lab.agent_pid(h)).collect();
        Cluster {
            lab,
            pods: (p0, p1),
            monitor,
            leases,
            agent_pids,
        }
    }

    /// Pings from host 1's pod to host 2's for about `secs` seconds.
    fn ping_for(&self, secs: u32) -> BackgroundPing {
        let to = self.lab.pod(self.pods.1).unwrap().ip;
        self.lab
            .start_ping(self.pods.0, to, secs * 5)
            .expect("ping")
    }

    /// The member host 1's agent has a connection to, preferring one that is not
    /// the leader (the leader has its own test).
    fn member_host1_talks_to(&mut self) -> usize {
        let ip = self.lab.hosts()[0].ip;
        let leader = self.lab.etcd_leader().unwrap();
        let connected: Vec<usize> = (0..3)
            .filter(|&i| self.lab.etcd_connections_from(i, ip).unwrap() > 0)
            .collect();
        assert!(
            !connected.is_empty(),
            "host 1's agent holds no connection to any etcd member"
        );
        eprintln!("host 1's agent is connected to members {connected:?}; leader {leader:?}");
        connected
            .iter()
            .copied()
            .find(|&i| Some(i) != leader)
            .unwrap_or(connected[0])
    }

    fn leader(&mut self) -> usize {
        let mut leader = None;
        poll_until(
            "an etcd leader",
            DEADLINE,
            Duration::from_millis(50),
            || {
                leader = self.lab.etcd_leader()?;
                Ok(leader.is_some())
            },
        )
        .unwrap();
        leader.unwrap()
    }

    /// Made-up peer routes host 1 has now.
    fn fake_routes(&self) -> BTreeSet<Ipv4Net> {
        self.lab
            .routes(0)
            .unwrap()
            .iter()
            .filter_map(|l| l.split_whitespace().next()?.parse::<Ipv4Net>().ok())
            .filter(is_fake)
            .collect()
    }

    /// Made-up peer leases etcd holds now.
    fn fake_leases(&self) -> BTreeSet<Ipv4Net> {
        self.lab
            .etcd()
            .get_prefix("/coreos.com/network/subnets/")
            .unwrap()
            .iter()
            .filter_map(|(k, _)| {
                let (net, len) = k.rsplit('/').next()?.split_once('-')?;
                Ipv4Net::new(net.parse().ok()?, len.parse().ok()?).ok()
            })
            .filter(is_fake)
            .collect()
    }

    /// Waits until host 1 routes exactly the made-up leases etcd holds, then checks
    /// from the monitor that each subnet the writer touched got exactly as many
    /// route adds and deletes as the writer made it appear and disappear.
    fn check_no_event_lost_or_doubled(&mut self, written: &[Ipv4Net], deleted: &[Ipv4Net]) {
        poll_until(
            "host 1's routes to match etcd's leases",
            DEADLINE,
            Duration::from_millis(200),
            || Ok(self.fake_routes() == self.fake_leases()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}: routes {:?}, leases {:?}",
                self.fake_routes(),
                self.fake_leases()
            )
        });
        let lines = self.monitor.barrier();
        let mut adds: BTreeMap<Ipv4Net, usize> = BTreeMap::new();
        let mut dels: BTreeMap<Ipv4Net, usize> = BTreeMap::new();
        for l in &lines {
            let (deleted, rest) = match l.strip_prefix("Deleted ") {
                Some(r) => (true, r),
                None => (false, l.as_str()),
            };
            let Some(net) = rest
                .split_whitespace()
                .next()
                .and_then(|w| w.parse::<Ipv4Net>().ok())
                .filter(is_fake)
            else {
                continue;
            };
            *if deleted { &mut dels } else { &mut adds }
                .entry(net)
                .or_default() += 1;
        }
        let still_there = self.fake_leases();
        for net in written {
            assert_eq!(
                adds.get(net).copied().unwrap_or(0),
                1,
                "{net}: route adds on host 1 (written once)"
            );
        }
        for net in deleted {
            assert_eq!(
                dels.get(net).copied().unwrap_or(0),
                1,
                "{net}: route deletes on host 1 (deleted once)"
            );
            assert!(!still_there.contains(net), "{net} still in etcd");
        }
        let touched: BTreeSet<&Ipv4Net> = adds.keys().chain(dels.keys()).collect();
        let expected: BTreeSet<&Ipv4Net> = written.iter().collect();
        assert_eq!(touched, expected, "routes for subnets nobody wrote");
        eprintln!(
            "{} leases written, {} deleted: {} route adds, {} route deletes on host 1",
            written.len(),
            deleted.len(),
            adds.values().sum::<usize>(),
            dels.values().sum::<usize>()
        );
    }

    /// Both agents still run (the same processes) and hold the lease they started
    /// with, in etcd and in their subnet.env.
    fn check_agents_kept_their_leases(&mut self) {
        for h in 0..2 {
            assert_eq!(
                self.lab.agent_pid(h),
                self.agent_pids[h],
                "agent {h} restarted"
            );
            self.lab.check_agent(h).unwrap();
            let (key, subnet) = &self.leases[h];
            assert!(
                self.lab.etcd().get(key).unwrap().is_some(),
                "host {}'s lease {key} is gone from etcd",
                h + 1
            );
            assert_eq!(self.lab.host_subnet(h).unwrap(), *subnet);
        }
    }

    /// A metric of host 1's agent.
    fn metric(&self, name: &str) -> Option<f64> {
        let ns = &self.lab.hosts()[0].ns;
        let r = http_get(
            ns,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, HEALTH_PORT),
            "/metrics",
        )
        .ok()?;
        r.body.lines().find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
    }
}

/// Puts a new made-up peer lease every `every` and deletes the one put `lag` puts
/// earlier, retrying each operation until etcd takes it (a retried put carries the
/// same value, so the agents see it once).
struct Writer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<Ipv4Net>, Vec<Ipv4Net>)>,
}

impl Writer {
    fn start(etcd: Etcd, every: Duration, lag: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let retry = |what: &str, op: &mut dyn FnMut() -> bool| {
                let t = Instant::now();
                while !op() {
                    assert!(t.elapsed() < DEADLINE, "etcd never took {what}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            };
            let (mut written, mut deleted) = (Vec::new(), Vec::new());
            while !flag.load(Ordering::Relaxed) {
                let net = fake_subnet(written.len());
                let key = Lab::lease_key_for(net);
                let value = peer_lease_value("vxlan", FAKE_PEER_IP);
                retry(&format!("put {key}"), &mut || {
                    etcd.put_leased(&key, &value, 24 * 3600).is_ok()
                });
                written.push(net);
                if written.len() > lag {
                    let old = written[written.len() - 1 - lag];
                    let key = Lab::lease_key_for(old);
                    retry(&format!("delete {key}"), &mut || etcd.delete(&key).is_ok());
                    deleted.push(old);
                }
                std::thread::sleep(every);
            }
            (written, deleted)
        });
        Writer { stop, handle }
    }

    fn finish(self) -> (Vec<Ipv4Net>, Vec<Ipv4Net>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer thread")
    }
}

fn sleep_secs(s: u64) {
    std::thread::sleep(Duration::from_secs(s));
}

#[test]
fn member_and_leader_kills_lose_nothing() {
    if !ready_with("etcd cluster failover", Needs::Agents, &["ss"]) {
        return;
    }
    let mut c = Cluster::start(&[]);
    let ping = c.ping_for(30);
    let writer = Writer::start(c.lab.etcd().clone(), Duration::from_millis(150), 3);
    sleep_secs(3);

    let m = c.member_host1_talks_to();
    eprintln!("killing member {} (host 1's agent talks to it)", m + 1);
    c.lab.stop_etcd_member(m).unwrap();
    sleep_secs(5);
    c.lab.restart_etcd_member(m).unwrap();
    c.lab.wait_etcd_member(m).unwrap();
    sleep_secs(2);

    let leader = c.leader();
    eprintln!("killing the leader, member {}", leader + 1);
    c.lab.stop_etcd_member(leader).unwrap();
    let killed = Instant::now();
    poll_until("a new leader", DEADLINE, Duration::from_millis(20), || {
        Ok(c.lab.etcd_leader()?.is_some())
    })
    .unwrap();
    let elected = killed.elapsed();
    // The first event after the election: a lease of our own, timed to host 1's
    // route. (A write sent to a follower before the election waits for etcd's
    // request timeout, about 7 s, which would hide the agent's part.)
    let marker = Ipv4Net::new(Ipv4Addr::new(10, 199, 0, 0), 24).unwrap();
    let value = peer_lease_value("vxlan", FAKE_PEER_IP);
    poll_until(
        "etcd to take a write",
        DEADLINE,
        Duration::from_millis(20),
        || {
            Ok(c.lab
                .etcd()
                .put_leased(&Lab::lease_key_for(marker), &value, 24 * 3600)
                .is_ok())
        },
    )
    .unwrap();
    let written = killed.elapsed();
    poll_until(
        "host 1 to route the marker",
        DEADLINE,
        Duration::from_millis(10),
        || Ok(c.lab.route_to(0, marker)?.is_some()),
    )
    .unwrap();
    let routed = killed.elapsed();
    sleep_secs(3);
    c.lab.restart_etcd_member(leader).unwrap();
    c.lab.wait_etcd_member(leader).unwrap();
    sleep_secs(2);

    let (written_leases, deleted_leases) = writer.finish();
    c.check_no_event_lost_or_doubled(&written_leases, &deleted_leases);
    c.check_agents_kept_their_leases();
    let p = ping.finish(DEADLINE).unwrap();
    eprintln!(
        "figures: leader kill -> new leader {:.0} ms, -> first write taken {:.0} ms, \
         -> its route on host 1 {:.0} ms; events lost 0; pings {}/{} answered",
        elected.as_secs_f64() * 1e3,
        written.as_secs_f64() * 1e3,
        routed.as_secs_f64() * 1e3,
        p.received,
        p.transmitted
    );
    assert!(
        p.all_replied(),
        "pods lost pings during the failover: {p:?}"
    );
}

#[test]
fn a_member_down_for_a_minute() {
    if !ready_with("etcd cluster member outage", Needs::Agents, &["ss"]) {
        return;
    }
    // Renew one minute after each grant (24 h TTL − 1439 min), so the agents renew
    // while the member is down.
    let mut c = Cluster::start(&["--subnet-lease-renew-margin=1439"]);
    let ping = c.ping_for(80);
    let writer = Writer::start(c.lab.etcd().clone(), Duration::from_millis(500), 3);
    let leases_before: Vec<Option<i64>> = (0..2)
        .map(|h| c.lab.etcd().lease_of(&c.leases[h].0).unwrap())
        .collect();
    sleep_secs(2);
    let m = c.member_host1_talks_to();
    eprintln!("stopping member {} for 60 s", m + 1);
    c.lab.stop_etcd_member(m).unwrap();
    sleep_secs(60);
    c.lab.restart_etcd_member(m).unwrap();
    c.lab.wait_etcd_member(m).unwrap();
    sleep_secs(2);
    let (written, deleted) = writer.finish();
    c.check_no_event_lost_or_doubled(&written, &deleted);
    c.check_agents_kept_their_leases();
    for (h, before) in leases_before.iter().enumerate() {
        let now = c.lab.etcd().lease_of(&c.leases[h].0).unwrap();
        assert_ne!(
            now,
            *before,
            "host {}'s lease was not renewed (same etcd lease) while a member was down",
            h + 1
        );
    }
    let p = ping.finish(DEADLINE).unwrap();
    eprintln!("pings {}/{} answered", p.received, p.transmitted);
    assert!(p.all_replied(), "pods lost pings: {p:?}");
}

#[test]
fn quorum_loss_keeps_the_data_plane() {
    if !ready_with("etcd quorum loss", Needs::Agents, &["ss"]) {
        return;
    }
    let mut c = Cluster::start(&[]);
    poll_until(
        "the lease watch metric",
        DEADLINE,
        Duration::from_millis(200),
        || Ok(c.metric("flanneld_lease_watch_active") == Some(1.0)),
    )
    .unwrap();
    let routes_before = c.lab.routes(0).unwrap();
    let ping = c.ping_for(35);
    sleep_secs(2);
    let leader = c.leader();
    let stopped = [leader, (leader + 1) % 3];
    eprintln!(
        "stopping members {} and {} for 20 s",
        stopped[0] + 1,
        stopped[1] + 1
    );
    let t = Instant::now();
    for &m in &stopped {
        c.lab.stop_etcd_member(m).unwrap();
    }
    poll_until(
        "host 1's agent to report the lease watch down",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || Ok(c.metric("flanneld_lease_watch_active") == Some(0.0)),
    )
    .unwrap();
    let noticed = t.elapsed();
    assert_eq!(c.metric("flanneld_store_connected"), Some(0.0));
    std::thread::sleep(Duration::from_secs(20).saturating_sub(t.elapsed()));
    assert_eq!(
        c.lab.routes(0).unwrap(),
        routes_before,
        "host 1's routes changed without quorum"
    );
    c.lab.check_agent(0).unwrap();
    for &m in &stopped {
        c.lab.restart_etcd_member(m).unwrap();
    }
    for &m in &stopped {
        c.lab.wait_etcd_member(m).unwrap();
    }
    let back = Instant::now();
    let peer = fake_subnet(0);
    let value = peer_lease_value("vxlan", FAKE_PEER_IP);
    poll_until(
        "etcd to take a write",
        DEADLINE,
        Duration::from_millis(50),
        || {
            Ok(c.lab
                .etcd()
                .put_leased(&Lab::lease_key_for(peer), &value, 24 * 3600)
                .is_ok())
        },
    )
    .unwrap();
    poll_until(
        "host 1 to route the new lease",
        DEADLINE,
        Duration::from_millis(20),
        || Ok(c.lab.route_to(0, peer)?.is_some()),
    )
    .unwrap();
    let recovered = back.elapsed();
    poll_until(
        "the lease watch metric",
        DEADLINE,
        Duration::from_millis(200),
        || Ok(c.metric("flanneld_lease_watch_active") == Some(1.0)),
    )
    .unwrap();
    c.check_agents_kept_their_leases();
    let p = ping.finish(DEADLINE).unwrap();
    eprintln!(
        "figures: watch reported down {:.1} s after quorum loss; quorum back -> new lease routed {:.0} ms; pings {}/{} answered",
        noticed.as_secs_f64(),
        recovered.as_secs_f64() * 1e3,
        p.received,
        p.transmitted
    );
    assert!(p.all_replied(), "pods lost pings without quorum: {p:?}");
}
