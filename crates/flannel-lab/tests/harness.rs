//! The lab itself, without flanneld: namespaces, underlay, etcd reachable from a
//! host, CNI pods on one host (with a hand-written subnet.env) reaching each other,
//! complete teardown, and `down` for a kept lab.

use std::time::Duration;

use flannel_lab::cleanup::{self, list_namespaces};
use flannel_lab::e2e::{ready, Needs};
use flannel_lab::Lab;

fn root_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn underlay_etcd_and_cni_pods_without_agents() {
    if !ready("harness", Needs::CniOnly) {
        return;
    }
    let mut lab = Lab::builder()
        .hosts(2)
        .start_agents(false)
        .build()
        .expect("lab");
    let prefix = lab.prefix().to_string();
    let tag = lab.link_tag().to_string();
    let run_dir = lab.run_dir().to_path_buf();

    let names = list_namespaces().unwrap();
    for ns in [lab.under_ns(), &lab.hosts()[0].ns, &lab.hosts()[1].ns] {
        assert!(names.iter().any(|n| n == ns), "{ns} missing from {names:?}");
    }
    // Nothing of ours in the root namespace.
    assert!(
        !root_links().iter().any(|l| l.starts_with(&tag)),
        "a lab link leaked into the root namespace"
    );

    // Underlay: host 1 reaches host 2 and the etcd address.
    let h2 = lab.hosts()[1].ip;
    let s = lab.ping_from(&lab.hosts()[0].ns.clone(), h2, 2).unwrap();
    assert!(s.all_replied(), "underlay ping h1 -> h2: {s:?}");

    // etcd answers from inside a host namespace with the config the lab wrote.
    let out = lab
        .run_in(
            &lab.hosts()[0].ns.clone(),
            &[
                "env",
                "ETCDCTL_API=3",
                "etcdctl",
                "--endpoints=http://198.18.0.254:2379",
                "get",
                "--print-value-only",
                "/coreos.com/network/config",
            ],
        )
        .unwrap();
    assert_eq!(out.trim(), lab.config());
    // And through the lab's own client: put, get, prefix get, delete.
    let etcd = lab.etcd().clone();
    etcd.put("/lab-test/a", "1").unwrap();
    etcd.put_many(&[
        ("/lab-test/b".into(), "2".into()),
        ("/lab-test/c".into(), "3".into()),
    ])
    .unwrap();
    assert_eq!(etcd.get("/lab-test/b").unwrap().as_deref(), Some("2"));
    assert_eq!(etcd.get_prefix("/lab-test/").unwrap().len(), 3);
    assert!(etcd.delete("/lab-test/a").unwrap());
    assert!(!etcd.delete("/lab-test/a").unwrap());
    assert_eq!(etcd.delete_prefix("/lab-test/").unwrap(), 2);

    // Pods through the CNI plugin with a hand-written subnet.env.
    let subnet = "10.244.7.0/24".parse().unwrap();
    lab.write_subnet_file(0, subnet, 1500).unwrap();
    let a = lab.add_pod(0).unwrap();
    let b = lab.add_pod(0).unwrap();
    let (ia, ib) = (lab.pod(a).unwrap().ip, lab.pod(b).unwrap().ip);
    for ip in [ia, ib] {
        assert!(subnet.contains(&ip), "{ip} not in {subnet}");
    }
    assert_ne!(ia, ib);
    lab.wait_reachable(a, ib).unwrap();
    lab.wait_reachable(b, ia).unwrap();
    let s = lab.ping(a, ib, 3).unwrap();
    assert!(s.all_replied(), "{s:?}");

    // A monitor sees route events in a host.
    let host0 = lab.hosts()[0].ns.clone();
    let mut mon = lab.monitor(&host0, &["route"]).unwrap();
    lab.ip_in(
        &host0,
        &["route", "add", "10.244.99.0/24", "via", "198.18.0.2"],
    )
    .unwrap();
    assert!(mon
        .wait_for(Duration::from_secs(30), |l| l.starts_with("10.244.99.0/24"))
        .is_some());
    drop(mon);

    let pod_ns = lab.pod(b).unwrap().ns.clone();
    lab.remove_pod(b).unwrap();
    assert!(!list_namespaces().unwrap().contains(&pod_ns));

    lab.teardown().unwrap();
    let left: Vec<String> = list_namespaces()
        .unwrap()
        .into_iter()
        .filter(|n| cleanup::belongs(n, &prefix))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
}

#[test]
fn drop_while_panicking_cleans_up() {
    if !ready("harness", Needs::CniOnly) {
        return;
    }
    let mut prefix = String::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::builder().hosts(1).start_agents(false).build().unwrap();
        prefix = lab.prefix().to_string();
        panic!("deliberate");
    }));
    assert!(r.is_err());
    assert!(!prefix.is_empty());
    assert!(!list_namespaces()
        .unwrap()
        .iter()
        .any(|n| cleanup::belongs(n, &prefix)));
}

#[test]
fn kept_lab_is_removed_by_down() {
    if !ready("harness", Needs::CniOnly) {
        return;
    }
    let lab = Lab::builder()
        .hosts(1)
        .start_agents(false)
        .keepable(true)
        .build()
        .unwrap();
    let under = lab.under_ns().to_string();
    let (prefix, run_dir) = lab.into_kept().unwrap();
    // etcd still runs in the kept lab.
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &under])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&pids.stdout).trim().is_empty());
    // Without a prefix, `down` leaves labs of live processes (this one) alone.
    let r = cleanup::down(None).unwrap();
    assert!(r.skipped.iter().any(|(p, _)| *p == prefix), "{r:?}");
    let r = cleanup::down(Some(&prefix)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.killed.iter().any(|(_, comm)| comm == "etcd"), "{r:?}");
    assert!(!list_namespaces()
        .unwrap()
        .iter()
        .any(|n| cleanup::belongs(n, &prefix)));
    assert!(!run_dir.exists());
    assert!(cleanup::down(Some("not-ours")).is_err());
}
