//! Kubernetes mode at scale (issue 14): one flanneld in `--kube-subnet-mgr` mode
//! against the fake API server holding 5000 realistic Node objects (pod CIDRs and
//! flannel annotations as each node's flanneld wrote them, ~13 KB of status, managed
//! fields and images each), whose kubelets rewrite every node's status every 10 s
//! (node leases off).
//!
//! Proven, in order, on one cluster:
//! 1. the agent programs a route to every one of the 5000 nodes;
//! 2. over a window of status churn (the agent receives the MODIFIED events, checked)
//!    it reports no lease event and no kernel apply, and `ip monitor` in its host
//!    shows no change to anything flannel programs;
//! 3. a node joining among the 5000 (churn still on) gets its route, and loses it
//!    when deleted.
//!
//! Nothing here is timed: every wait has a deadline far above what the step needs
//! on a slow machine (the figures are `flannel-lab bench-kube`'s job).

use std::time::{Duration, Instant};

use flannel_lab::bench_kube::{is_flannel_change, KubeScale};
use flannel_lab::bins::find_binary;
use flannel_lab::e2e::{ready, Needs};

const NODES: usize = 5000;
const CHURN: Duration = Duration::from_secs(10);
/// Churn observed for a round and a half: every node's status rewritten at least once.
const WINDOW: Duration = Duration::from_secs(15);
/// Per wait; a debug agent on two busy cores lists 5000 nodes in well under this.
const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn status_churn_of_5000_nodes_is_free_and_joins_are_routed() {
    const TEST: &str = "kube mode with 5000 nodes under status churn";
    if !ready(TEST, Needs::Agents) {
        return;
    }
    if let Err(e) = find_binary("flannel-kube-fake") {
        flannel_testkit::skip_or_fail(TEST, format!("{e} (cargo build --workspace --bins)"));
        return;
    }
    let t0 = Instant::now();
    let mut ks = KubeScale::start(CHURN, DEADLINE).expect("lab and fake API server");
    ks.populate(NODES).expect("populate the fake API server");
    eprintln!("{NODES} nodes in the fake after {:?}", t0.elapsed());

    // 1. Every node routed.
    let took = ks
        .start_agent_until_routes(NODES)
        .expect("the agent routes every node");
    eprintln!("agent start -> {NODES} routes: {took:?}");
    assert_eq!(ks.routes().expect("routes"), NODES);

    // 2. Churn reaches the agent and costs it nothing flannel-visible.
    let mut mon = ks.monitor().expect("ip monitor");
    mon.barrier();
    let a = ks.snapshot().expect("snapshot before the window");
    std::thread::sleep(WINDOW);
    let b = ks.snapshot().expect("snapshot after the window");
    let changes: Vec<String> = mon
        .barrier()
        .into_iter()
        .filter(|l| is_flannel_change(l))
        .collect();
    ks.lab.check_agent(0).expect("agent still running");
    let updates = b.resource_version - a.resource_version;
    let events = b.watch_events - a.watch_events;
    eprintln!(
        "window of {WINDOW:?}: {updates} status updates, {events} watch events and {} bytes to the agent",
        b.bytes - a.bytes
    );
    // Without these the rest would pass on an idle cluster or a dead watch.
    assert!(updates > 0, "the fake made no status updates in the window");
    assert!(
        events > 0,
        "the agent's watch got none of the status updates"
    );
    assert_eq!(
        b.lease_events - a.lease_events,
        0,
        "status churn produced lease events"
    );
    assert_eq!(
        b.kernel_applies - a.kernel_applies,
        0,
        "status churn produced kernel applies"
    );
    assert!(
        changes.is_empty(),
        "status churn changed flannel's kernel state: {:?}",
        &changes[..changes.len().min(10)]
    );

    // 3. A node joining among them is routed, and unrouted when it leaves.
    let (join, leave, _) = ks
        .join_leave(
            &mut mon,
            "joiner-000",
            200_000,
            "10.251.0.0/24",
            "198.18.1.1",
        )
        .expect("a joining node is routed and a deleted one unrouted");
    eprintln!("join {join:?}, leave {leave:?} with {NODES} nodes present");
    let after = ks.snapshot().expect("snapshot after join/leave");
    assert_eq!(
        after.lease_events - b.lease_events,
        2,
        "one added and one removed lease for the joiner"
    );
    assert_eq!(ks.routes().expect("routes"), NODES);
    ks.lab.check_agent(0).expect("agent still running");
}
