//! Lease and own-lease watches against a real etcd on 127.0.0.1: another writer's
//! puts and deletes, a 1000-lease transaction, compaction while disconnected,
//! garbage values, and the own lease being renewed and revoked.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{DeleteOptions, Txn, TxnOp};
use flannel_core::{LeaseEvent, LeaseKey, LeaseUpdate, PreviousSubnets};
use flannel_store::etcd::{EtcdStore, WatchHealth};
use flannel_store::testing::{
    etcd_leases, put_config, vxlan_attrs, EtcdServer, LeaseView, LogCapture, StoreOptions, TcpProxy,
};
use flannel_store::{AcquireRequest, LeaseStore, OwnLeaseEvent};
use tokio::sync::mpsc;

const SUBNETS: &str = "/coreos.com/network/subnets/";
const PREFIX: &str = "/coreos.com/network";
/// Generous: the machine running the tests may be busy.
const WAIT: Duration = Duration::from_secs(60);

async fn next<T>(rx: &mut mpsc::Receiver<T>) -> Result<T> {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => bail!("the watch ended"),
        Err(_) => bail!("no update within {WAIT:?}"),
    }
}

fn own_key() -> LeaseKey {
    "10.5.1.0-24".parse().expect("key")
}

/// Starts watch_leases on a store and returns the receiver of its updates.
fn spawn_watch(
    store: std::sync::Arc<EtcdStore>,
) -> (mpsc::Receiver<LeaseUpdate>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let r = store.watch_leases(own_key(), tx).await;
        assert!(r.is_ok(), "watch_leases ended with {r:?}");
    });
    (rx, task)
}

fn value(ip: &str, mac: &str) -> String {
    vxlan_attrs(ip, 1, mac).encode()
}

#[tokio::test]
async fn another_writers_leases_arrive_as_added_changed_removed() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let mut c = etcd.client().await?;
    c.put(
        format!("{SUBNETS}10.5.2.0-24"),
        value("10.10.0.2", "02:00:00:00:00:02"),
        None,
    )
    .await?;
    // Our own lease is never reported.
    c.put(
        format!("{SUBNETS}10.5.1.0-24"),
        value("10.10.0.1", "02:00:00:00:00:01"),
        None,
    )
    .await?;
    let store = std::sync::Arc::new(EtcdStore::connect(etcd.options()).await?);
    let mut health = store.watch_health();
    let (mut rx, task) = spawn_watch(store.clone());

    match next(&mut rx).await? {
        LeaseUpdate::Full(all) => {
            assert_eq!(all.len(), 1, "{all:?}");
            assert_eq!(all[0].key.to_string(), "10.5.2.0-24");
        }
        other => bail!("first update must be Full, got {other:?}"),
    }

    // Another writer (flanneld elsewhere, or etcdctl) adds a lease with an etcd lease.
    let grant = c.lease_grant(3600, None).await?;
    let v3 = value("10.10.0.3", "02:00:00:00:00:03");
    c.put(
        format!("{SUBNETS}10.5.3.0-24"),
        v3.clone(),
        Some(etcd_client::PutOptions::new().with_lease(grant.id())),
    )
    .await?;
    match next(&mut rx).await? {
        LeaseUpdate::Events(ev) => match ev.as_slice() {
            [LeaseEvent::Added(l)] => {
                assert_eq!(l.key.to_string(), "10.5.3.0-24");
                assert_eq!(l.attrs.encode(), v3);
                // A peer's expiry is not looked up: no backend needs it, and the
                // lookup cost one etcd round trip per lease.
                assert_eq!(l.expiration, None);
            }
            other => bail!("expected one Added, got {other:?}"),
        },
        other => bail!("expected events, got {other:?}"),
    }

    // A renewal (same value, new etcd lease) is no change; then a real change.
    c.put(format!("{SUBNETS}10.5.3.0-24"), v3.clone(), None)
        .await?;
    c.put(
        format!("{SUBNETS}10.5.1.0-24"),
        value("10.10.0.1", "02:00:00:00:00:11"),
        None,
    )
    .await?;
    let v3b = value("10.10.0.3", "02:00:00:00:00:33");
    c.put(format!("{SUBNETS}10.5.3.0-24"), v3b.clone(), None)
        .await?;
    match next(&mut rx).await? {
        LeaseUpdate::Events(ev) => match ev.as_slice() {
            [LeaseEvent::Changed { previous, current }] => {
                assert_eq!(previous.attrs.encode(), v3);
                assert_eq!(current.attrs.encode(), v3b);
                assert_eq!(current.expiration, None, "now a key without etcd lease");
            }
            other => bail!("expected one Changed (renewal and own lease silent), got {other:?}"),
        },
        other => bail!("expected events, got {other:?}"),
    }

    c.delete(format!("{SUBNETS}10.5.3.0-24"), None).await?;
    match next(&mut rx).await? {
        LeaseUpdate::Events(ev) => match ev.as_slice() {
            [LeaseEvent::Removed(l)] => {
                assert_eq!(l.key.to_string(), "10.5.3.0-24");
                assert_eq!(l.attrs.encode(), v3b, "Removed carries the last attrs");
            }
            other => bail!("expected one Removed, got {other:?}"),
        },
        other => bail!("expected events, got {other:?}"),
    }
    assert_eq!(*health.borrow_and_update(), WatchHealth::Watching);

    // Closing the receiver ends the watch cleanly.
    drop(rx);
    tokio::time::timeout(WAIT, task).await??;
    Ok(())
}

#[tokio::test]
async fn a_thousand_leases_in_one_transaction_all_arrive() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let store = std::sync::Arc::new(EtcdStore::connect(etcd.options()).await?);
    let (mut rx, _task) = spawn_watch(store);
    let mut view = LeaseView::default();
    view.apply(next(&mut rx).await?);
    assert!(view.leases.is_empty());

    let mut c = etcd.client().await?;
    let grant = c.lease_grant(3600, None).await?;
    let ops: Vec<TxnOp> = (0..1000u32)
        .map(|i| {
            let key = format!("{SUBNETS}10.{}.{}.0-24", 100 + i / 256, i % 256);
            let v = value(
                &format!("172.16.{}.{}", i / 256, i % 256),
                "02:00:00:00:00:01",
            );
            TxnOp::put(
                key,
                v,
                Some(etcd_client::PutOptions::new().with_lease(grant.id())),
            )
        })
        .collect();
    c.txn(Txn::new().and_then(ops)).await?;

    let update = next(&mut rx).await?;
    match &update {
        LeaseUpdate::Events(ev) => {
            assert_eq!(ev.len(), 1000, "one response, every event applied");
            assert!(ev.iter().all(|e| matches!(e, LeaseEvent::Added(_))));
        }
        other => bail!("expected events, got {other:?}"),
    }
    view.apply(update);
    assert_eq!(view.encoded(), etcd_leases(&mut c, PREFIX).await?);

    // And all of them deleted at once.
    c.delete(SUBNETS, Some(DeleteOptions::new().with_prefix()))
        .await?;
    while !view.leases.is_empty() {
        view.apply(next(&mut rx).await?);
    }
    Ok(())
}

#[tokio::test]
async fn compaction_while_disconnected_is_survived_with_nothing_missed() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    let proxy = TcpProxy::for_etcd(&etcd).await?;
    let mut c = etcd.client().await?;
    let a = format!("{SUBNETS}10.5.10.0-24");
    let b = format!("{SUBNETS}10.5.11.0-24");
    c.put(a.clone(), value("10.10.0.10", "02:00:00:00:00:10"), None)
        .await?;
    c.put(b.clone(), value("10.10.0.11", "02:00:00:00:00:11"), None)
        .await?;

    let store = std::sync::Arc::new(EtcdStore::connect(proxy.options()).await?);
    let mut health = store.watch_health();
    let (mut rx, task) = spawn_watch(store);
    let mut view = LeaseView::default();
    view.apply(next(&mut rx).await?);
    assert_eq!(view.leases.len(), 2);
    // Make sure the watch stream itself is up before cutting it.
    tokio::time::timeout(WAIT, health.wait_for(|h| *h == WatchHealth::Watching)).await??;

    proxy.block();
    tokio::time::timeout(
        WAIT,
        health.wait_for(|h| matches!(h, WatchHealth::Reconnecting { .. })),
    )
    .await??;
    // While the watcher is cut off: a change, a delete, a lease that comes and goes,
    // new leases; then the history of all that is compacted away.
    c.put(a.clone(), value("10.10.0.10", "02:00:00:00:00:aa"), None)
        .await?;
    c.delete(b.clone(), None).await?;
    c.put(
        format!("{SUBNETS}10.5.12.0-24"),
        value("10.10.0.12", "02:00:00:00:00:12"),
        None,
    )
    .await?;
    c.delete(format!("{SUBNETS}10.5.12.0-24"), None).await?;
    for i in 13..20 {
        c.put(
            format!("{SUBNETS}10.5.{i}.0-24"),
            value(&format!("10.10.0.{i}"), "02:00:00:00:00:13"),
            None,
        )
        .await?;
    }
    etcd.compact(etcd.revision().await?).await?;
    proxy.unblock();

    let want = etcd_leases(&mut c, PREFIX).await?;
    assert_eq!(want.len(), 8);
    let deadline = tokio::time::Instant::now() + WAIT;
    while view.encoded() != want {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "watch did not converge: have {:?}, want {want:?}",
                view.encoded()
            );
        }
        view.apply(next(&mut rx).await?);
    }
    assert!(
        logs.count(&["compacted the lease history"]) >= 1,
        "the compaction path was exercised"
    );
    assert!(!task.is_finished(), "the watch keeps running");

    // And the resumed watch is live again.
    c.put(
        format!("{SUBNETS}10.5.30.0-24"),
        value("10.10.0.30", "02:00:00:00:00:30"),
        None,
    )
    .await?;
    let update = next(&mut rx).await?;
    assert!(
        matches!(&update, LeaseUpdate::Events(ev) if matches!(ev.as_slice(), [LeaseEvent::Added(l)] if l.key.to_string() == "10.5.30.0-24")),
        "{update:?}"
    );
    Ok(())
}

#[tokio::test]
async fn garbage_in_a_watch_response_is_skipped_and_the_rest_applied() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    let mut c = etcd.client().await?;
    let store = std::sync::Arc::new(EtcdStore::connect(etcd.options()).await?);
    let (mut rx, task) = spawn_watch(store);
    let mut view = LeaseView::default();
    view.apply(next(&mut rx).await?);

    // One transaction: garbage first, then good leases.
    let good = value("10.10.0.21", "02:00:00:00:00:21");
    c.txn(Txn::new().and_then([
        TxnOp::put(format!("{SUBNETS}garbage-key"), good.clone(), None),
        TxnOp::put(format!("{SUBNETS}10.5.20.0-24"), "{not json", None),
        TxnOp::put(
            format!("{SUBNETS}10.5.22.0-24"),
            r#"{"PublicIP":"1.2.3"}"#,
            None,
        ),
        TxnOp::put(format!("{SUBNETS}10.5.21.0-24"), good.clone(), None),
        TxnOp::put(
            format!("{SUBNETS}10.5.23.0-24"),
            value("10.10.0.23", "02:00:00:00:00:23"),
            None,
        ),
    ]))
    .await?;
    let update = next(&mut rx).await?;
    match &update {
        LeaseUpdate::Events(ev) => {
            let keys: Vec<String> = ev.iter().map(|e| e.key().to_string()).collect();
            assert_eq!(keys, ["10.5.21.0-24", "10.5.23.0-24"]);
        }
        other => bail!("expected events, got {other:?}"),
    }
    view.apply(update);
    for key in ["garbage-key", "10.5.20.0-24", "10.5.22.0-24"] {
        assert_eq!(
            logs.count(&["WARN", &format!("{SUBNETS}{key}")]),
            1,
            "one warning naming {key}"
        );
    }

    // A known lease overwritten with garbage is no longer usable: it goes away, as
    // it would from a fresh listing.
    c.put(format!("{SUBNETS}10.5.21.0-24"), "garbage", None)
        .await?;
    let update = next(&mut rx).await?;
    assert!(
        matches!(&update, LeaseUpdate::Events(ev) if matches!(ev.as_slice(), [LeaseEvent::Removed(l)] if l.attrs.encode() == good)),
        "{update:?}"
    );
    view.apply(update);
    assert_eq!(view.encoded(), etcd_leases(&mut c, PREFIX).await?);
    assert!(!task.is_finished());
    Ok(())
}

#[tokio::test]
async fn own_lease_watch_reports_renewals_and_revocation() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let mut c = etcd.client().await?;
    put_config(
        &mut c,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let store = std::sync::Arc::new(EtcdStore::connect(etcd.options()).await?);
    let cfg = store.network_config().await?;
    let lease = store
        .acquire(
            &cfg,
            &AcquireRequest {
                attrs: vxlan_attrs("10.10.0.1", 1, "02:00:00:00:00:01"),
                previous: PreviousSubnets::default(),
            },
        )
        .await?;
    let (tx, mut rx) = mpsc::channel(4);
    let watcher = {
        let store = store.clone();
        let lease = lease.clone();
        tokio::spawn(async move { store.watch_own_lease(&lease, tx).await })
    };
    // The watch starts by reporting the lease as it is.
    let first = match next(&mut rx).await? {
        OwnLeaseEvent::Renewed(l) => l,
        other => bail!("expected the current lease, got {other:?}"),
    };
    assert_eq!(first.key, lease.key);
    assert_eq!(first.attrs, lease.attrs);
    let first_exp = first.expiration.context("expiry")?;

    // Let the clock move past the second granularity of etcd TTLs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let renewed = store.renew(&lease).await?;
    assert!(renewed.expiration > lease.expiration);
    match next(&mut rx).await? {
        OwnLeaseEvent::Renewed(l) => {
            assert_eq!(l.key, lease.key);
            assert_eq!(l.attrs, lease.attrs);
            assert!(l.expiration.context("expiry")? > first_exp, "later expiry");
        }
        other => bail!("expected Renewed, got {other:?}"),
    }

    // A neighbouring dual-stack key that shares our key's text as a prefix is not ours.
    c.put(
        format!("{SUBNETS}{}&fd00::-64", lease.key),
        value("10.10.0.9", "02:00:00:00:00:09"),
        None,
    )
    .await?;
    c.delete(format!("{SUBNETS}{}", lease.key), None).await?;
    assert_eq!(next(&mut rx).await?, OwnLeaseEvent::Revoked);
    tokio::time::timeout(WAIT, watcher).await???;
    Ok(())
}

/// The lease watch of an agent starts from the listing its acquisition made (one
/// listing of every lease fewer at start). Nothing may go missing or linger: a
/// lease written between acquisition and watch still arrives, our own lease is
/// never reported, and our stale lease that acquisition deleted is not in the
/// first update.
#[tokio::test]
async fn the_watch_after_acquisition_misses_nothing_and_shows_no_deleted_lease() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let mut c = etcd.client().await?;
    put_config(
        &mut c,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    c.put(
        format!("{SUBNETS}10.5.2.0-24"),
        value("10.10.0.2", "02:00:00:00:00:02"),
        None,
    )
    .await?;
    // Ours (same public IP) but outside the network: acquisition deletes it.
    c.put(
        format!("{SUBNETS}10.6.0.0-24"),
        value("10.10.0.1", "02:00:00:00:00:01"),
        None,
    )
    .await?;
    let store = std::sync::Arc::new(EtcdStore::connect(etcd.options()).await?);
    let cfg = store.network_config().await?;
    let req = AcquireRequest {
        attrs: vxlan_attrs("10.10.0.1", 1, "02:00:00:00:00:01"),
        previous: PreviousSubnets::default(),
    };
    let own = store.acquire(&cfg, &req).await?;
    assert!(!etcd_leases(&mut c, PREFIX)
        .await?
        .contains_key(&format!("{SUBNETS}10.6.0.0-24")));
    // Written after the acquisition's listing, before the watch starts.
    c.put(
        format!("{SUBNETS}10.5.3.0-24"),
        value("10.10.0.3", "02:00:00:00:00:03"),
        None,
    )
    .await?;
    let (tx, mut rx) = mpsc::channel(16);
    let w = store.clone();
    let own_key = own.key;
    let task = tokio::spawn(async move {
        let r = w.watch_leases(own_key, tx).await;
        assert!(r.is_ok(), "watch_leases ended with {r:?}");
    });
    let mut seen: Vec<String> = match next(&mut rx).await? {
        LeaseUpdate::Full(all) => all.iter().map(|l| l.key.to_string()).collect(),
        other => bail!("first update must be Full, got {other:?}"),
    };
    assert!(
        !seen.iter().any(|k| k == "10.6.0.0-24"),
        "the deleted stale lease is in the first update: {seen:?}"
    );
    while !seen.iter().any(|k| k == "10.5.3.0-24") {
        match next(&mut rx).await? {
            LeaseUpdate::Events(ev) => {
                for e in ev {
                    match e {
                        LeaseEvent::Added(l) => seen.push(l.key.to_string()),
                        other => bail!("only additions expected, got {other:?}"),
                    }
                }
            }
            other => bail!("expected events, got {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        ["10.5.2.0-24", "10.5.3.0-24"],
        "own lease never reported"
    );
    assert!(!seen.contains(&own.key.to_string()));
    drop(rx);
    tokio::time::timeout(WAIT, task).await??;
    Ok(())
}
