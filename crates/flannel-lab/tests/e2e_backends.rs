//! End-to-end: 3 hosts in namespaces, real etcd, real flanneld, pods through the
//! real CNI plugin, for every backend with a data plane. Adding a backend to the
//! matrix is one line in `backend_matrix!` below.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use flannel_lab::checks::{is_flannel_deletion, peer_entries, PeerModel};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::measure::{ping_gaps, ping_reply_seqs};
use flannel_lab::process::ProcOutput;
use flannel_lab::{poll_until, Lab, PodId};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;

/// One module per backend, each with every scenario below.
macro_rules! backend_matrix {
    ($($name:ident => $backend:expr;)*) => {$(
        mod $name {
            #[test]
            fn every_pod_reaches_every_other_pod() {
                super::every_pod_reaches_every_other_pod(stringify!($name), $backend);
            }
            #[test]
            fn pod_added_later_is_reachable() {
                super::pod_added_later_is_reachable(stringify!($name), $backend);
            }
            #[test]
            fn removed_host_disappears_from_the_others() {
                super::removed_host_disappears_from_the_others(stringify!($name), $backend);
            }
            #[test]
            fn agent_kill_and_restart_is_hitless() {
                super::agent_kill_and_restart_is_hitless(stringify!($name), $backend);
            }
            #[test]
            fn deleted_lease_goes_and_restored_lease_comes_back() {
                super::deleted_lease_goes_and_restored_lease_comes_back(stringify!($name), $backend);
            }
        }
    )*};
}

// The matrix: `<module name> => <Backend object of the network config>;`
backend_matrix! {
    vxlan => r#"{"Type":"vxlan"}"#;
    host_gw => r#"{"Type":"host-gw"}"#;
    vxlan_direct_routing => r#"{"Type":"vxlan","DirectRouting":true}"#;
    udp => r#"{"Type":"udp"}"#;
}

const DEADLINE: Duration = Duration::from_secs(60);

struct Cluster {
    lab: Lab,
    /// One pod per host, pods[i] on host i.
    pods: Vec<PodId>,
    model: PeerModel,
    network: Ipv4Net,
}

/// A 3-host lab with one pod per host, or `None` when the test must skip.
fn cluster(test: &str, backend: &str) -> Option<Cluster> {
    if !ready(test, Needs::Agents) {
        return None;
    }
    let model = PeerModel::for_backend(&serde_json::from_str(backend).expect("backend JSON"));
    let mut lab = Lab::builder()
        .hosts(3)
        .backend_json(backend)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let pods = (0..3).map(|h| lab.add_pod(h).expect("pod")).collect();
    let network = flannel_lab::lab::DEFAULT_NETWORK.parse().unwrap();
    Some(Cluster {
        lab,
        pods,
        model,
        network,
    })
}

impl Cluster {
    fn ip(&self, p: PodId) -> Ipv4Addr {
        self.lab.pod(p).unwrap().ip
    }

    fn wait_mesh(&self) {
        for &a in &self.pods {
            for &b in &self.pods {
                if a != b {
                    self.lab.wait_reachable(a, self.ip(b)).expect("reachable");
                }
            }
        }
    }

    /// Waits until every host but `peer` has all entries for `peer`'s lease.
    fn wait_peer_present(&self, peer: usize, subnet: Ipv4Net) {
        let pip = self.lab.hosts()[peer].ip;
        for h in (0..3).filter(|h| *h != peer) {
            poll_until(
                &format!("host {h} to have entries for {subnet}"),
                DEADLINE,
                Duration::from_millis(100),
                || Ok(peer_entries(&self.lab, h, subnet, pip)?.complete(self.model, pip)),
            )
            .unwrap();
        }
    }

    /// Waits until no host but `peer` has any entry for `peer`'s lease.
    fn wait_peer_gone(&self, peer: usize, subnet: Ipv4Net) {
        let pip = self.lab.hosts()[peer].ip;
        for h in (0..3).filter(|h| *h != peer) {
            poll_until(
                &format!("host {h} to drop its entries for {subnet}"),
                DEADLINE,
                Duration::from_millis(100),
                || Ok(peer_entries(&self.lab, h, subnet, pip)?.is_empty()),
            )
            .unwrap();
        }
    }

    /// Waits until a ping from `from` to `to` no longer gets through.
    fn wait_unreachable(&self, from: PodId, to: Ipv4Addr) {
        poll_until(
            &format!("{to} to become unreachable"),
            DEADLINE,
            Duration::from_millis(200),
            || Ok(self.lab.ping(from, to, 1)?.received == 0),
        )
        .unwrap();
    }
}

fn every_pod_reaches_every_other_pod(name: &str, backend: &str) {
    let Some(c) = cluster(name, backend) else {
        return;
    };
    // Each pod sits in its own host's lease, and the leases differ.
    let mut subnets = BTreeSet::new();
    for (h, &p) in c.pods.iter().enumerate() {
        let subnet = c.lab.host_subnet(h).unwrap();
        assert!(subnet.contains(&c.ip(p)), "pod {} not in {subnet}", c.ip(p));
        assert!(c.network.contains(&subnet));
        subnets.insert(subnet);
    }
    assert_eq!(subnets.len(), 3, "{subnets:?}");
    c.wait_mesh();
    for h in 0..3 {
        c.wait_peer_present(h, c.lab.host_subnet(h).unwrap());
    }
}

fn pod_added_later_is_reachable(name: &str, backend: &str) {
    let Some(mut c) = cluster(name, backend) else {
        return;
    };
    c.wait_mesh();
    let late = c.lab.add_pod(2).unwrap();
    let late_ip = c.ip(late);
    assert!(c.lab.host_subnet(2).unwrap().contains(&late_ip));
    for &p in &c.pods[..2] {
        c.lab.wait_reachable(p, late_ip).unwrap();
        c.lab.wait_reachable(late, c.ip(p)).unwrap();
    }
}

fn removed_host_disappears_from_the_others(name: &str, backend: &str) {
    let Some(mut c) = cluster(name, backend) else {
        return;
    };
    c.wait_mesh();
    let subnet = c.lab.host_subnet(2).unwrap();
    c.wait_peer_present(2, subnet);
    let status = c.lab.stop_agent(2).unwrap();
    assert!(status.success(), "flanneld exit on SIGTERM: {status}");
    assert!(
        c.lab.delete_lease(2).unwrap(),
        "host 2 had no lease in etcd"
    );
    c.wait_peer_gone(2, subnet);
    let gone = c.ip(c.pods[2]);
    c.wait_unreachable(c.pods[0], gone);
    c.wait_unreachable(c.pods[1], gone);
    // The remaining hosts still reach each other.
    c.lab.wait_reachable(c.pods[0], c.ip(c.pods[1])).unwrap();
}

/// Output file of a background ping.
struct BgPing {
    proc_: flannel_lab::process::Proc,
    out: PathBuf,
}

impl BgPing {
    fn start(lab: &Lab, from: PodId, to: Ipv4Addr, tag: &str) -> BgPing {
        let ns = lab.pod(from).unwrap().ns.clone();
        let out = lab.run_dir().join(format!("ping-{tag}.txt"));
        let proc_ = lab
            .spawn_in(
                &ns,
                &["ping", "-n", "-i", "0.2", "-W", "2", &to.to_string()],
                ProcOutput::File(out.clone()),
            )
            .unwrap();
        BgPing { proc_, out }
    }
    fn replies(&self) -> BTreeSet<u32> {
        ping_reply_seqs(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }
    fn wait_replies(&self, n: usize) {
        poll_until(
            &format!("{n} replies in {}", self.out.display()),
            DEADLINE,
            Duration::from_millis(100),
            || Ok(self.replies().len() >= n),
        )
        .unwrap();
    }
    fn stop(mut self) -> BTreeSet<u32> {
        self.proc_.signal(Signal::SIGINT).unwrap();
        self.proc_.wait_timeout(DEADLINE);
        self.replies()
    }
}

fn agent_kill_and_restart_is_hitless(name: &str, backend: &str) {
    let Some(mut c) = cluster(name, backend) else {
        return;
    };
    c.wait_mesh();
    for h in 0..3 {
        c.wait_peer_present(h, c.lab.host_subnet(h).unwrap());
    }
    let restarted = 1;
    let subnet_before = c.lab.host_subnet(restarted).unwrap();
    let lease_key = c.lab.lease_key(restarted).unwrap();

    let mut monitors: Vec<_> = (0..3)
        .map(|h| {
            let ns = c.lab.hosts()[h].ns.clone();
            c.lab.monitor(&ns, &["link", "route", "neigh"]).unwrap()
        })
        .collect();
    let into = BgPing::start(&c.lab, c.pods[0], c.ip(c.pods[restarted]), "into");
    let out_of = BgPing::start(&c.lab, c.pods[restarted], c.ip(c.pods[2]), "out-of");
    into.wait_replies(5);
    out_of.wait_replies(5);

    c.lab.kill_agent(restarted).unwrap();
    c.lab.start_agent(restarted).unwrap();
    // Let the new agent apply its initial snapshot while traffic keeps flowing:
    // another ~4 s of replies after it wrote subnet.env.
    let (n_into, n_out) = (into.replies().len(), out_of.replies().len());
    into.wait_replies(n_into + 20);
    out_of.wait_replies(n_out + 20);
    c.lab.check_agents().unwrap();

    // udp too: its TUN queues and socket are held by the fd keeper across the
    // restart (upstream's TUN dies with the process and traffic stops for seconds).
    for (what, p) in [("into", into), ("out of", out_of)] {
        let seqs = p.stop();
        assert!(seqs.len() >= 25, "ping {what} the restarted host: {seqs:?}");
        assert_eq!(
            ping_gaps(&seqs),
            Vec::<u32>::new(),
            "replies lost pinging {what} the restarted host"
        );
    }
    assert_eq!(c.lab.host_subnet(restarted).unwrap(), subnet_before);
    assert!(c.lab.etcd().get(&lease_key).unwrap().is_some());
    for (h, m) in monitors.iter_mut().enumerate() {
        let deleted: Vec<String> = m
            .lines()
            .into_iter()
            .filter(|l| is_flannel_deletion(l, c.network))
            .collect();
        assert!(
            deleted.is_empty(),
            "host {h} saw flannel entries deleted during the restart: {deleted:#?}"
        );
    }
    // And the restarted agent still follows changes: a new pod elsewhere is reachable.
    let late = c.lab.add_pod(2).unwrap();
    c.lab.wait_reachable(c.pods[restarted], c.ip(late)).unwrap();
}

fn deleted_lease_goes_and_restored_lease_comes_back(name: &str, backend: &str) {
    let Some(mut c) = cluster(name, backend) else {
        return;
    };
    c.wait_mesh();
    let peer = 2;
    let subnet = c.lab.host_subnet(peer).unwrap();
    c.wait_peer_present(peer, subnet);
    let key = c.lab.lease_key(peer).unwrap();
    let value = c.lab.etcd().get(&key).unwrap().expect("lease value");

    assert!(c.lab.etcd().delete(&key).unwrap());
    c.wait_peer_gone(peer, subnet);
    c.wait_unreachable(c.pods[0], c.ip(c.pods[peer]));
    // The owner learns its lease was revoked and exits cleanly (its kernel state
    // stays, so the restored lease below makes it reachable again).
    let st = c
        .lab
        .wait_agent_exit(peer, "after losing its lease")
        .unwrap();
    assert!(st.success(), "exit after lease revocation: {st}");

    c.lab.etcd().put(&key, &value).unwrap();
    if c.model == PeerModel::Tunnel {
        // udp forwards in the agent process: the peer needs its agent back.
        c.lab.start_agent(peer).unwrap();
    }
    c.wait_peer_present(peer, subnet);
    for &p in &c.pods[..2] {
        c.lab.wait_reachable(p, c.ip(c.pods[peer])).unwrap();
    }
}

/// The benchmarks' lease writer writes a peer lease as flanneld does: on an etcd
/// lease of its own with a TTL, only if the key is absent; the agent routes what it
/// writes and unroutes what it deletes, and the times it reports are ordered.
#[test]
fn lease_writer_writes_leases_as_flanneld_does() {
    use flannel_lab::lease_writer::LeaseWriter;
    if !ready("lease_writer_writes_leases_as_flanneld_does", Needs::Agents) {
        return;
    }
    let lab = Lab::builder()
        .hosts(1)
        .backend_json(r#"{"Type":"host-gw"}"#)
        .timeout(DEADLINE)
        .build()
        .expect("lab");
    let writer = LeaseWriter::connect(lab.etcd()).expect("gRPC client");
    let subnet: Ipv4Net = "10.244.250.0/24".parse().unwrap();
    let key = Lab::lease_key_for(subnet);
    let value = flannel_lab::leases::peer_lease_value("host-gw", Ipv4Addr::new(198, 18, 0, 77));
    let ns = lab.hosts()[0].ns.clone();
    let mut mon = lab.monitor(&ns, &["route"]).expect("monitor");
    let mark = mon.mark();
    let t = writer.create(&key, &value, 3600).expect("create");
    assert!(t.answered >= t.sent);
    assert_eq!(
        lab.etcd().get(&key).unwrap().as_deref(),
        Some(value.as_str())
    );
    let id = lab.etcd().lease_of(&key).unwrap().expect("the key exists");
    assert_ne!(id, 0, "the key must be attached to an etcd lease");
    let routed = mon
        .wait_for_after(mark, DEADLINE, |l| {
            l.starts_with(&format!("{subnet} via 198.18.0.77 "))
        })
        .expect("the agent routes the written lease");
    assert!(routed >= t.sent);
    // Create-if-absent: a second create of the same key is refused.
    let e = writer.create(&key, &value, 3600).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    let mark = mon.mark();
    writer.delete(&key).expect("delete");
    assert_eq!(lab.etcd().get(&key).unwrap(), None);
    mon.wait_for_after(mark, DEADLINE, |l| {
        l.starts_with(&format!("Deleted {subnet} "))
    })
    .expect("the agent unroutes the deleted lease");
}
