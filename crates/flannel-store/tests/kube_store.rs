//! The Kubernetes lease store against the fake API server (in-process, 127.0.0.1).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flannel_core::{
    Lease, LeaseAttrs, LeaseEvent, LeaseKey, LeaseUpdate, PreviousSubnets, VxlanData,
};
use flannel_kube_fake::{FakeApiServer, FakeOptions, RequestRecord};
use flannel_store::kube::{KubeOptions, KubeStore};
use flannel_store::{AcquireRequest, LeaseStore, OwnLeaseEvent};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus, Pod, PodSpec};
use std::sync::Arc;
use tokio::sync::mpsc;

const P: &str = "flannel.alpha.coreos.com/";
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// Generous: the machine is shared and loaded.
const WAIT: Duration = Duration::from_secs(60);

struct Env {
    fake: FakeApiServer,
    _dir: tempfile::TempDir,
    conf: PathBuf,
}

async fn env_with(opts: FakeOptions) -> Result<Env> {
    let fake = FakeApiServer::start(([127, 0, 0, 1], 0).into(), opts).await?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("net-conf.json");
    std::fs::write(&conf, NET_CONF)?;
    Ok(Env {
        fake,
        _dir: dir,
        conf,
    })
}

async fn env() -> Result<Env> {
    env_with(FakeOptions::default()).await
}

impl Env {
    fn opts(&self, node: &str) -> KubeOptions {
        KubeOptions {
            api_url: self.fake.url(),
            net_config_path: self.conf.clone(),
            node_name: Some(node.to_string()),
            request_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(200),
            ..KubeOptions::default()
        }
    }

    async fn store(&self, node: &str) -> Result<KubeStore> {
        Ok(KubeStore::new(self.opts(node)).await?)
    }

    /// Ends the node watch and refuses re-watching while `changes` are made, then
    /// lets the client back in.
    async fn changes_while_away(&self, changes: impl FnOnce(&Env) -> Result<()>) -> Result<()> {
        self.fake.deny("watch", "nodes");
        self.fake.close_watches();
        wait_until("a refused re-watch", || {
            self.requests("watch").iter().any(|r| r.status == 403)
        })
        .await?;
        changes(self)?;
        self.fake.allow_all();
        Ok(())
    }

    fn set_public_ip(&self, node: &str, ip: &str) -> Result<()> {
        self.fake.modify_node(node, |n| {
            n.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(format!("{P}public-ip"), ip.into());
        })?;
        Ok(())
    }

    fn requests(&self, verb: &str) -> Vec<RequestRecord> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.verb == verb)
            .collect()
    }
}

fn vxlan_attrs(ip: &str, mac: &str) -> LeaseAttrs {
    let mut a = LeaseAttrs::new(ip.parse().unwrap());
    a.backend_type = "vxlan".into();
    a.backend_data = Some(
        VxlanData {
            vni: 1,
            vtep_mac: mac.parse().unwrap(),
        }
        .encode(),
    );
    a
}

fn request(attrs: LeaseAttrs) -> AcquireRequest {
    AcquireRequest {
        attrs,
        previous: PreviousSubnets::default(),
    }
}

/// A node as another flanneld (Go or ours) leaves it.
fn flannel_node(name: &str, cidr: &str, ip: &str, mac: &str) -> Node {
    let mut n = flannel_kube_fake::node(name, &[cidr]);
    n.metadata.annotations = Some(
        [
            ("backend-data", format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)),
            ("backend-type", "vxlan".into()),
            ("kube-subnet-manager", "true".into()),
            ("public-ip", ip.into()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{P}{k}"), v))
        .collect(),
    );
    n
}

/// Creates annotated flannel nodes: (name, podCIDR, public IP, VTEP MAC) each.
fn create_nodes(env: &Env, nodes: &[(&str, &str, &str, &str)]) -> Result<()> {
    for (name, cidr, ip, mac) in nodes {
        env.fake.create_node(flannel_node(name, cidr, ip, mac))?;
    }
    Ok(())
}

fn annotations(n: &Node) -> BTreeMap<String, String> {
    n.metadata.annotations.clone().unwrap_or_default()
}

fn heartbeat(n: &mut Node, beat: u32) {
    let status = n.status.get_or_insert_with(NodeStatus::default);
    let ready = NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KubeletReady".into()),
        message: Some(format!("kubelet is posting ready status (beat {beat})")),
        ..Default::default()
    };
    status.conditions = Some(vec![ready]);
}

async fn next_update(rx: &mut mpsc::Receiver<LeaseUpdate>) -> Result<LeaseUpdate> {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => bail!("lease watch ended"),
        Err(_) => bail!("no lease update within {WAIT:?}"),
    }
}

async fn next_events(rx: &mut mpsc::Receiver<LeaseUpdate>) -> Result<Vec<LeaseEvent>> {
    match next_update(rx).await? {
        LeaseUpdate::Events(e) => Ok(e),
        other => bail!("expected events, got {other:?}"),
    }
}

fn key(s: &str) -> LeaseKey {
    s.parse().unwrap()
}

fn start_watch(
    store: &Arc<KubeStore>,
    own: &str,
) -> (mpsc::Receiver<LeaseUpdate>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let s = store.clone();
    let own = key(own);
    let task = tokio::spawn(async move {
        if let Err(e) = s.watch_leases(own, tx).await {
            panic!("watch_leases failed: {e}");
        }
    });
    (rx, task)
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > WAIT {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_publishes_annotations_exactly_once() -> Result<()> {
    let env = env().await?;
    let mut n1 = flannel_kube_fake::node("n1", &["10.244.1.0/24"]);
    heartbeat(&mut n1, 0);
    env.fake.create_node(n1)?;
    let store = env.store("n1").await?;
    let config = store.network_config().await?;
    assert_eq!(config.backend.backend_type, "vxlan");

    // A first start has no MAC to reuse.
    assert_eq!(store.previous_vtep_mac().await?, None);

    let attrs = vxlan_attrs("192.168.10.1", "12:c6:65:89:b4:e3");
    let lease = store.acquire(&config, &request(attrs.clone())).await?;
    assert_eq!(lease.key, key("10.244.1.0-24"));
    assert_eq!(*lease.attrs, attrs);

    let node = env.fake.node("n1").context("n1")?;
    let want: BTreeMap<String, String> = [
        ("backend-data", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
        ("backend-type", "vxlan"),
        ("kube-subnet-manager", "true"),
        ("public-ip", "192.168.10.1"),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{P}{k}"), v.to_string()))
    .collect();
    assert_eq!(annotations(&node), want);

    let patches = env.requests("patch");
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].path, "/api/v1/nodes/n1/status");
    assert_eq!(
        patches[0].content_type,
        "application/strategic-merge-patch+json"
    );
    assert_eq!(patches[0].status, 200);

    // A restart publishes nothing new: no second patch, and the MAC is offered back.
    let again = env.store("n1").await?;
    assert_eq!(
        again.previous_vtep_mac().await?.map(|m| m.to_string()),
        Some("12:c6:65:89:b4:e3".to_string())
    );
    let lease2 = again.acquire(&config, &request(attrs.clone())).await?;
    assert_eq!(lease2, lease);
    assert_eq!(env.requests("patch").len(), 1);

    // renew is a no-op that hands the lease back.
    assert_eq!(again.renew(&lease).await?, lease);

    // complete_lease sets NetworkUnavailable=False next to the kubelet's conditions.
    again.complete_lease(&lease).await?;
    let node = env.fake.node("n1").context("n1")?;
    let conds = node
        .status
        .clone()
        .and_then(|s| s.conditions)
        .unwrap_or_default();
    assert_eq!(conds.len(), 2, "{conds:?}");
    assert_eq!(conds[0].type_, "Ready");
    let c = &conds[1];
    assert_eq!(c.type_, "NetworkUnavailable");
    assert_eq!(c.status, "False");
    assert_eq!(c.reason.as_deref(), Some("FlannelIsUp"));
    assert_eq!(
        c.message.as_deref(),
        Some("Flannel is running on this node")
    );
    assert!(c.last_heartbeat_time.is_some() && c.last_transition_time.is_some());
    // Annotations are untouched by the condition patch.
    assert_eq!(annotations(&node), want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_honours_overwrite_and_changed_mac() -> Result<()> {
    let env = env().await?;
    let mut n1 = flannel_node("n1", "10.244.1.0/24", "192.168.10.1", "aa:aa:aa:aa:aa:01");
    n1.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(format!("{P}public-ip-overwrite"), "203.0.113.7".into());
    env.fake.create_node(n1)?;
    let store = env.store("n1").await?;
    let config = store.network_config().await?;
    let lease = store
        .acquire(
            &config,
            &request(vxlan_attrs("192.168.10.1", "aa:aa:aa:aa:aa:02")),
        )
        .await?;
    // The local lease keeps the detected address; the node publishes the overwrite.
    assert_eq!(lease.attrs.public_ip.to_string(), "192.168.10.1");
    let a = annotations(&env.fake.node("n1").context("n1")?);
    assert_eq!(a[&format!("{P}public-ip")], "203.0.113.7");
    assert_eq!(
        a[&format!("{P}backend-data")],
        r#"{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:02"}"#
    );
    assert_eq!(a[&format!("{P}public-ip-overwrite")], "203.0.113.7");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_changes_become_lease_events_and_heartbeats_do_not() -> Result<()> {
    let env = env().await?;
    create_nodes(
        &env,
        &[
            ("n1", "10.244.1.0/24", "192.168.10.1", "aa:aa:aa:aa:aa:01"),
            ("n2", "10.244.2.0/24", "192.168.10.2", "aa:aa:aa:aa:aa:02"),
        ],
    )?;
    // Registered but not (yet) running flannel.
    env.fake
        .create_node(flannel_kube_fake::node("n3", &["10.244.3.0/24"]))?;
    let store = Arc::new(env.store("n1").await?);
    let (mut rx, task) = start_watch(&store, "10.244.1.0-24");

    let full = match next_update(&mut rx).await? {
        LeaseUpdate::Full(l) => l,
        other => bail!("first update must be Full, got {other:?}"),
    };
    assert_eq!(
        full.len(),
        1,
        "own node and unannotated n3 excluded: {full:?}"
    );
    assert_eq!(full[0].key, key("10.244.2.0-24"));
    assert_eq!(
        full[0].attrs.encode(),
        r#"{"PublicIP":"192.168.10.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:02"}}"#
    );

    // n3 starts flannel: Added.
    env.fake.replace_node(flannel_node(
        "n3",
        "10.244.3.0/24",
        "192.168.10.3",
        "aa:aa:aa:aa:aa:03",
    ))?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Added(l)] if l.key == key("10.244.3.0-24") && l.attrs.public_ip.to_string() == "192.168.10.3"),
        "{ev:?}"
    );

    // Heartbeats on every node (status and resourceVersion change only): no events.
    let rv_before = env.fake.resource_version();
    for beat in 1..=5 {
        for name in ["n1", "n2", "n3"] {
            env.fake.modify_node(name, |n| heartbeat(n, beat))?;
        }
    }
    assert_eq!(env.fake.resource_version(), rv_before + 15);

    // n2 restarts with a new VTEP MAC: Changed. Being the next update proves the
    // heartbeats before it produced none.
    env.fake.modify_node("n2", |n| {
        n.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                format!("{P}backend-data"),
                r#"{"VNI":1,"VtepMAC":"bb:bb:bb:bb:bb:02"}"#.into(),
            );
    })?;
    let ev = next_events(&mut rx).await?;
    match &ev[..] {
        [LeaseEvent::Changed { previous, current }] => {
            assert_eq!(current.key, key("10.244.2.0-24"));
            assert!(previous
                .attrs
                .backend_data
                .as_ref()
                .unwrap()
                .get()
                .contains("aa:aa:aa:aa:aa:02"));
            assert!(current
                .attrs
                .backend_data
                .as_ref()
                .unwrap()
                .get()
                .contains("bb:bb:bb:bb:bb:02"));
        }
        other => bail!("expected Changed, got {other:?}"),
    }

    // An IPv6 podCIDR and v6 annotations do not matter to an IPv4-only network.
    env.fake.modify_node("n2", |n| {
        if let Some(s) = n.spec.as_mut() {
            s.pod_cidrs = Some(vec!["10.244.2.0/24".into(), "fd00:2::/64".into()]);
        }
        n.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(format!("{P}public-ipv6"), "fd00::2".into());
    })?;

    // n3 loses its kube-subnet-manager annotation: Removed with its last attrs.
    env.fake.modify_node("n3", |n| {
        n.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .remove(&format!("{P}kube-subnet-manager"));
    })?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Removed(l)] if l.key == key("10.244.3.0-24") && l.attrs.public_ip.to_string() == "192.168.10.3"),
        "{ev:?}"
    );

    // n2 is deleted: Removed.
    env.fake.delete_node("n2")?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Removed(l)] if l.key == key("10.244.2.0-24")),
        "{ev:?}"
    );

    // A node whose public-ip is garbage is skipped, not fatal; fixed, it is Added.
    let mut bad = flannel_node("n4", "10.244.4.0/24", "not-an-ip", "aa:aa:aa:aa:aa:04");
    env.fake.create_node(bad.clone())?;
    bad.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(format!("{P}public-ip"), "192.168.10.4".into());
    env.fake.replace_node(bad)?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Added(l)] if l.key == key("10.244.4.0-24")),
        "{ev:?}"
    );

    // One list, one watch: everything above came over the same stream.
    assert_eq!(env.requests("list").len(), 1);
    assert_eq!(env.requests("watch").len(), 1);
    assert_eq!(env.requests("get").len(), 0);
    drop(rx);
    tokio::time::timeout(WAIT, task).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_watch_resumes_without_relisting() -> Result<()> {
    let env = env().await?;
    env.fake.create_node(flannel_node(
        "n2",
        "10.244.2.0/24",
        "192.168.10.2",
        "aa:aa:aa:aa:aa:02",
    ))?;
    env.fake
        .create_node(flannel_kube_fake::node("n1", &["10.244.1.0/24"]))?;
    let store = Arc::new(env.store("n1").await?);
    let (mut rx, _task) = start_watch(&store, "10.244.1.0-24");
    assert!(matches!(next_update(&mut rx).await?, LeaseUpdate::Full(l) if l.len() == 1));
    wait_until("the watch to open", || env.fake.open_watches() == 1).await?;

    env.changes_while_away(|env| {
        create_nodes(
            env,
            &[("n5", "10.244.5.0/24", "192.168.10.5", "aa:aa:aa:aa:aa:05")],
        )?;
        env.fake.delete_node("n2")?;
        Ok(())
    })
    .await?;

    // The resumed watch replays both changes from the history.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(next_events(&mut rx).await?);
    }
    assert!(
        matches!(&seen[0], LeaseEvent::Added(l) if l.key == key("10.244.5.0-24")),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[1], LeaseEvent::Removed(l) if l.key == key("10.244.2.0-24")),
        "{seen:?}"
    );
    assert_eq!(env.requests("list").len(), 1, "resumed, not re-listed");
    let watches = env.requests("watch");
    assert!(
        watches.iter().any(|r| r.status == 403),
        "a re-watch was refused: {watches:?}"
    );
    assert!(
        watches
            .last()
            .is_some_and(|r| r.status == 200 && r.query.contains("resourceVersion=")),
        "{watches:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_watch_relists_and_loses_nothing() -> Result<()> {
    let env = env().await?;
    env.fake
        .create_node(flannel_kube_fake::node("n1", &["10.244.1.0/24"]))?;
    create_nodes(
        &env,
        &[
            ("n2", "10.244.2.0/24", "192.168.10.2", "aa:aa:aa:aa:aa:02"),
            ("n3", "10.244.3.0/24", "192.168.10.3", "aa:aa:aa:aa:aa:03"),
        ],
    )?;
    let store = Arc::new(env.store("n1").await?);
    let (mut rx, _task) = start_watch(&store, "10.244.1.0-24");
    assert!(matches!(next_update(&mut rx).await?, LeaseUpdate::Full(l) if l.len() == 2));
    wait_until("the watch to open", || env.fake.open_watches() == 1).await?;

    // Changes the client never sees as watch events, and then the history is gone:
    // resuming gets 410, the client must re-list.
    env.changes_while_away(|env| {
        env.fake.delete_node("n2")?;
        env.set_public_ip("n3", "192.168.10.33")?;
        create_nodes(
            env,
            &[("n5", "10.244.5.0/24", "192.168.10.5", "aa:aa:aa:aa:aa:05")],
        )?;
        env.fake.compact();
        Ok(())
    })
    .await?;

    let ev = next_events(&mut rx).await?;
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert!(ev
        .iter()
        .any(|e| matches!(e, LeaseEvent::Removed(l) if l.key == key("10.244.2.0-24"))));
    assert!(ev.iter().any(|e| matches!(e, LeaseEvent::Changed { current, .. } if current.attrs.public_ip.to_string() == "192.168.10.33")));
    assert!(ev
        .iter()
        .any(|e| matches!(e, LeaseEvent::Added(l) if l.key == key("10.244.5.0-24"))));
    assert_eq!(env.requests("list").len(), 2, "exactly one re-list");

    // A watch expired by the server while open (ERROR 410 event) also re-lists.
    wait_until("the new watch to open", || env.fake.open_watches() == 1).await?;
    env.fake.expire_watches();
    wait_until("a third list", || env.requests("list").len() == 3).await?;
    env.fake.delete_node("n5")?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Removed(l)] if l.key == key("10.244.5.0-24")),
        "{ev:?}"
    );
    Ok(())
}

/// A list longer than one page (the store asks for 100 nodes at a time) is folded
/// in page by page: every node of every page is seen once, and a re-list over
/// several pages yields exactly the changes, wherever in the list they fall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_page_lists_see_every_node_once() -> Result<()> {
    let env = env().await?;
    env.fake
        .create_node(flannel_kube_fake::node("n1", &["10.244.1.0/24"]))?;
    for i in 2..=250u32 {
        env.fake.create_node(flannel_node(
            &format!("n{i}"),
            &format!("10.244.{i}.0/24"),
            &format!("192.168.10.{i}"),
            &format!("aa:aa:aa:aa:aa:{i:02x}"),
        ))?;
    }
    let store = Arc::new(env.store("n1").await?);
    let (mut rx, _task) = start_watch(&store, "10.244.1.0-24");
    match next_update(&mut rx).await? {
        LeaseUpdate::Full(l) => {
            let keys: std::collections::BTreeSet<LeaseKey> = l.iter().map(|l| l.key).collect();
            assert_eq!((l.len(), keys.len()), (249, 249), "one lease per node");
            assert!(keys.contains(&key("10.244.2.0-24")) && keys.contains(&key("10.244.250.0-24")));
        }
        other => bail!("expected a full list, got {other:?}"),
    }
    assert_eq!(env.requests("list").len(), 3, "250 nodes in pages of 100");
    wait_until("the watch to open", || env.fake.open_watches() == 1).await?;

    // Changes on the first, middle and last page while the watch is refused, then
    // the history is compacted away: the store must re-list all three pages.
    env.changes_while_away(|env| {
        env.fake.delete_node("n7")?;
        env.fake.delete_node("n240")?;
        env.set_public_ip("n150", "192.168.9.150")?;
        env.fake.compact();
        Ok(())
    })
    .await?;

    let ev = next_events(&mut rx).await?;
    assert_eq!(ev.len(), 3, "{ev:?}");
    for gone in ["10.244.7.0-24", "10.244.240.0-24"] {
        assert!(
            ev.iter()
                .any(|e| matches!(e, LeaseEvent::Removed(l) if l.key == key(gone))),
            "{gone} removed: {ev:?}"
        );
    }
    assert!(ev
        .iter()
        .any(|e| matches!(e, LeaseEvent::Changed { current, .. }
        if current.attrs.public_ip.to_string() == "192.168.9.150")));
    assert_eq!(env.requests("list").len(), 6, "one re-list of three pages");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_node_deleted_revokes_the_lease() -> Result<()> {
    let env = env().await?;
    env.fake
        .create_node(flannel_kube_fake::node("n1", &["10.244.1.0/24"]))?;
    let store = Arc::new(env.store("n1").await?);
    let config = store.network_config().await?;
    let lease = store
        .acquire(
            &config,
            &request(vxlan_attrs("192.168.10.1", "aa:aa:aa:aa:aa:01")),
        )
        .await?;
    let (mut rx, _task) = start_watch(&store, "10.244.1.0-24");
    assert!(matches!(next_update(&mut rx).await?, LeaseUpdate::Full(l) if l.is_empty()));
    let (otx, mut orx) = mpsc::channel(4);
    let s = store.clone();
    let l: Lease = lease.clone();
    tokio::spawn(async move { s.watch_own_lease(&l, otx).await });
    env.fake.delete_node("n1")?;
    let ev = tokio::time::timeout(WAIT, orx.recv()).await?;
    assert_eq!(ev, Some(OwnLeaseEvent::Revoked));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_requests_name_the_missing_permission() -> Result<()> {
    let env = env().await?;
    env.fake
        .create_node(flannel_kube_fake::node("n1", &["10.244.1.0/24"]))?;
    let store = env.store("n1").await?;
    let config = store.network_config().await?;
    let req = request(vxlan_attrs("192.168.10.1", "aa:aa:aa:aa:aa:01"));

    env.fake.deny("patch", "nodes/status");
    let err = store.acquire(&config, &req).await.unwrap_err().to_string();
    println!("patch denied: {err}");
    for want in [
        "permission denied",
        "patch nodes/status",
        "ClusterRole",
        "cannot patch resource \"nodes/status\"",
    ] {
        assert!(err.contains(want), "{want:?} missing in: {err}");
    }
    // Refusals are not retried: one attempt only.
    assert_eq!(env.requests("patch").len(), 1);

    env.fake.allow_all();
    env.fake.deny("get", "nodes");
    let err = store.acquire(&config, &req).await.unwrap_err().to_string();
    assert!(err.contains("get nodes"), "{err}");

    env.fake.allow_all();
    env.fake.deny("get", "pods");
    let mut o = env.opts("unused");
    o.node_name = None;
    o.pod_namespace = Some("kube-flannel".into());
    o.pod_name = Some("kube-flannel-ds-abcde".into());
    let err = KubeStore::new(o)
        .await
        .err()
        .context("pod read must fail")?
        .to_string();
    assert!(
        err.contains("get pods") && err.contains("forbidden"),
        "{err}"
    );

    env.fake.allow_all();
    env.fake.deny("list", "nodes");
    let mut o = env.opts("n1");
    o.cache_sync_timeout = Duration::from_secs(2);
    let store = KubeStore::new(o).await?;
    let (tx, _rx) = mpsc::channel(4);
    let err = tokio::time::timeout(WAIT, store.watch_leases(key("10.244.1.0-24"), tx))
        .await?
        .unwrap_err()
        .to_string();
    println!("list denied: {err}");
    assert!(
        err.contains("list nodes") && err.contains("CONT_WHEN_CACHE_NOT_READY"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_name_comes_from_the_pod() -> Result<()> {
    let env = env().await?;
    env.fake
        .create_node(flannel_kube_fake::node("worker-7", &["10.244.7.0/24"]))?;
    let mut pod = Pod::default();
    pod.metadata.name = Some("kube-flannel-ds-x1".into());
    pod.metadata.namespace = Some("kube-flannel".into());
    pod.spec = Some(PodSpec {
        node_name: Some("worker-7".into()),
        ..Default::default()
    });
    env.fake.create_pod(pod)?;
    let mut o = env.opts("unused");
    o.node_name = None;
    o.pod_namespace = Some("kube-flannel".into());
    o.pod_name = Some("kube-flannel-ds-x1".into());
    let store = KubeStore::new(o.clone()).await?;
    assert_eq!(store.node_name(), "worker-7");

    o.pod_name = Some("missing".into());
    let err = KubeStore::new(o.clone())
        .await
        .err()
        .context("missing pod")?
        .to_string();
    assert!(err.contains("404") && err.contains("missing"), "{err}");
    o.pod_name = None;
    let err = KubeStore::new(o)
        .await
        .err()
        .context("no names")?
        .to_string();
    assert!(err.contains("NODE_NAME"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actionable_errors_for_missing_cidr_config_and_prefix() -> Result<()> {
    let env = env().await?;
    env.fake.create_node(flannel_kube_fake::node("n1", &[]))?;
    env.fake
        .create_node(flannel_kube_fake::node("n2", &["10.99.2.0/24"]))?;
    let req = request(vxlan_attrs("192.168.10.1", "aa:aa:aa:aa:aa:01"));

    let store = env.store("n1").await?;
    let config = store.network_config().await?;
    let err = store.acquire(&config, &req).await.unwrap_err().to_string();
    println!("no podCIDR: {err}");
    assert!(err.contains("no pod CIDR assigned"), "{err}");
    assert!(
        err.contains("--allocate-node-cidrs=true --cluster-cidr=10.244.0.0/16"),
        "{err}"
    );

    let err = env
        .store("n2")
        .await?
        .acquire(&config, &req)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10.244.0.0/16") && err.contains("10.99.2.0/24"),
        "{err}"
    );
    // Nothing was published for nodes that could not take a lease.
    assert!(env.requests("patch").is_empty());

    let mut o = env.opts("n1");
    o.net_config_path = env._dir.path().join("absent/net-conf.json");
    let err = KubeStore::new(o)
        .await
        .err()
        .context("missing net-conf")?
        .to_string();
    println!("no net-conf: {err}");
    assert!(
        err.contains("absent/net-conf.json") && err.contains("mount"),
        "{err}"
    );

    let bad = env._dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"Network":"10.244.0.0/33"}"#)?;
    let mut o = env.opts("n1");
    o.net_config_path = bad;
    let err = KubeStore::new(o)
        .await
        .err()
        .context("bad net-conf")?
        .to_string();
    assert!(err.contains("bad.json") && err.contains("Network"), "{err}");

    let mut o = env.opts("n1");
    o.annotation_prefix = "a/b/c".into();
    let err = KubeStore::new(o)
        .await
        .err()
        .context("bad prefix")?
        .to_string();
    assert!(err.contains("at most one '/'"), "{err}");

    let ghost = env.store("ghost").await?;
    let err = ghost.acquire(&config, &req).await.unwrap_err().to_string();
    assert!(err.contains("\"ghost\" not found"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_prefix_and_dual_stack() -> Result<()> {
    let env = env().await?;
    std::fs::write(
        &env.conf,
        r#"{"Network":"10.244.0.0/16","IPv6Network":"fd00:10::/56","EnableIPv6":true,"Backend":{"Type":"host-gw"}}"#,
    )?;
    env.fake.create_node(flannel_kube_fake::node(
        "n1",
        &["10.244.1.0/24", "fd00:10:0:1::/64"],
    ))?;
    let mut o = env.opts("n1");
    o.annotation_prefix = "example.com/flannel".into();
    let store = KubeStore::new(o).await?;
    let config = store.network_config().await?;
    let mut attrs = LeaseAttrs::new("192.168.10.1".parse()?);
    attrs.public_ipv6 = Some("fd00::1".parse()?);
    attrs.backend_type = "host-gw".into();
    let lease = store.acquire(&config, &request(attrs)).await?;
    assert_eq!(lease.key, key("10.244.1.0-24&fd00:10:0:1::-64"));
    let a = annotations(&env.fake.node("n1").context("n1")?);
    let want: BTreeMap<String, String> = [
        ("backend-data", "null"),
        ("backend-type", "host-gw"),
        ("backend-v6-data", "null"),
        ("kube-subnet-manager", "true"),
        ("public-ip", "192.168.10.1"),
        ("public-ipv6", "fd00::1"),
    ]
    .into_iter()
    .map(|(k, v)| (format!("example.com/flannel-{k}"), v.to_string()))
    .collect();
    assert_eq!(a, want);
    Ok(())
}

/// API load of one agent at steady state: after the initial list nothing but watch
/// requests may be sent, however many nodes heartbeat. The fake ends each watch
/// after `watch_timeout` (shortened here) so reconnects are exercised; with the
/// default 290 s that is one request per 290 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_api_load() -> Result<()> {
    let env = env_with(FakeOptions {
        bookmark_interval: Duration::from_millis(300),
        ..FakeOptions::default()
    })
    .await?;
    env.fake
        .create_node(flannel_kube_fake::node("n1", &["10.244.1.0/24"]))?;
    for i in 2..=20 {
        env.fake.create_node(flannel_node(
            &format!("n{i}"),
            &format!("10.244.{i}.0/24"),
            &format!("192.168.10.{i}"),
            &format!("aa:aa:aa:aa:aa:{i:02x}"),
        ))?;
    }
    let mut o = env.opts("n1");
    o.watch_timeout = Duration::from_secs(2);
    let store = Arc::new(KubeStore::new(o).await?);
    let config = store.network_config().await?;
    let lease = store
        .acquire(
            &config,
            &request(vxlan_attrs("192.168.10.1", "aa:aa:aa:aa:aa:01")),
        )
        .await?;
    let (mut rx, _task) = start_watch(&store, "10.244.1.0-24");
    assert!(matches!(next_update(&mut rx).await?, LeaseUpdate::Full(l) if l.len() == 19));
    store.complete_lease(&lease).await?;
    let startup = store.api_requests();

    // Steady state: every node heartbeats every 100 ms for ~8 s.
    let t0 = Instant::now();
    let before = env.fake.requests().len();
    let mut beat = 0;
    while t0.elapsed() < Duration::from_secs(8) {
        beat += 1;
        for i in 1..=20 {
            env.fake
                .modify_node(&format!("n{i}"), |n| heartbeat(n, beat))?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = t0.elapsed();
    let steady = store.api_requests();
    let during: Vec<RequestRecord> = env.fake.requests()[before..].to_vec();

    // Heartbeats produced no lease updates.
    assert!(
        rx.try_recv().is_err(),
        "heartbeats must not produce updates"
    );
    // Only watches after startup; the store's counter agrees with the server's log.
    assert!(during.iter().all(|r| r.verb == "watch"), "{during:?}");
    assert_eq!(steady.list, startup.list);
    assert_eq!(steady.get, startup.get);
    assert_eq!(steady.patch, startup.patch);
    wait_until(
        "the server's request log to match the client's counter",
        || store.api_requests().total() == env.fake.requests().len() as u64,
    )
    .await?;
    let watches = steady.watch - startup.watch;
    let per_min = watches as f64 * 60.0 / elapsed.as_secs_f64();
    println!(
        "startup requests: {} (get {}, list {}, watch {}, patch {}); steady state: {} watch requests in {:.1} s with watch_timeout 2 s = {:.1} req/min, {} heartbeats of 20 nodes seen; at the default watch_timeout (290 s) that is {:.2} req/min per agent",
        startup.total(),
        startup.get,
        startup.list,
        startup.watch,
        startup.patch,
        watches,
        elapsed.as_secs_f64(),
        per_min,
        beat,
        60.0 / 290.0
    );
    Ok(())
}

/// Two nodes publishing the same podCIDR: the first keeps the routes, the second is
/// refused; deleting the refused one changes nothing, deleting the owner hands the
/// key to the waiting node (a change of public IP, not a removal); a node whose
/// podCIDRs has two IPv4 entries is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_pod_cidr_do_not_alias() -> Result<()> {
    let env = env().await?;
    create_nodes(
        &env,
        &[
            ("n1", "10.244.1.0/24", "192.168.10.1", "aa:aa:aa:aa:aa:01"),
            ("n2", "10.244.2.0/24", "192.168.10.2", "aa:aa:aa:aa:aa:02"),
            ("n3", "10.244.2.0/24", "192.168.10.3", "aa:aa:aa:aa:aa:03"),
        ],
    )?;
    let store = Arc::new(env.store("n1").await?);
    let (mut rx, task) = start_watch(&store, "10.244.1.0-24");
    let full = match next_update(&mut rx).await? {
        LeaseUpdate::Full(l) => l,
        other => bail!("first update must be Full, got {other:?}"),
    };
    assert_eq!(full.len(), 1, "{full:?}");
    assert_eq!(
        full[0].attrs.public_ip.to_string(),
        "192.168.10.2",
        "first by name"
    );

    // The refused node goes: nothing changes for the routed one. A later node with
    // an unrelated CIDR proves the watch delivered the deletion first.
    env.fake.delete_node("n3")?;
    env.fake.create_node(flannel_node(
        "n4",
        "10.244.4.0/24",
        "192.168.10.4",
        "aa:aa:aa:aa:aa:04",
    ))?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Added(l)] if l.key == key("10.244.4.0-24")),
        "deleting the refused node must not remove the owner's lease: {ev:?}"
    );

    // A waiting node takes over when the owner goes.
    env.fake.create_node(flannel_node(
        "n5",
        "10.244.2.0/24",
        "192.168.10.5",
        "aa:aa:aa:aa:aa:05",
    ))?;
    env.fake.delete_node("n2")?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Changed { current, .. }] if current.key == key("10.244.2.0-24") && current.attrs.public_ip.to_string() == "192.168.10.5"),
        "{ev:?}"
    );

    // Two IPv4 entries in podCIDRs: skipped, not the second overwriting the first.
    let mut twice = flannel_node("n6", "10.244.6.0/24", "192.168.10.6", "aa:aa:aa:aa:aa:06");
    if let Some(s) = twice.spec.as_mut() {
        s.pod_cidrs = Some(vec!["10.244.6.0/24".into(), "10.244.7.0/24".into()]);
    }
    env.fake.create_node(twice)?;
    env.fake.create_node(flannel_node(
        "n8",
        "10.244.8.0/24",
        "192.168.10.8",
        "aa:aa:aa:aa:aa:08",
    ))?;
    let ev = next_events(&mut rx).await?;
    assert!(
        matches!(&ev[..], [LeaseEvent::Added(l)] if l.key == key("10.244.8.0-24")),
        "{ev:?}"
    );
    task.abort();
    Ok(())
}
