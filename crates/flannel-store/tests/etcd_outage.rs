//! etcd goes away for 20 s and comes back: the watches never end, keep the last
//! known leases meanwhile, and afterwards see what was written while they were
//! reconnecting. (The slow one of the etcd tests: about 25 s.)

use std::time::Duration;

use anyhow::{bail, Context, Result};
use flannel_core::{LeaseUpdate, PreviousSubnets};
use flannel_store::etcd::{EtcdStore, WatchHealth};
use flannel_store::testing::{
    etcd_leases, put_config, vxlan_attrs, EtcdServer, LeaseView, LogCapture, StoreOptions,
};
use flannel_store::{AcquireRequest, LeaseStore, OwnLeaseEvent, StoreError};
use tokio::sync::mpsc;

const SUBNETS: &str = "/coreos.com/network/subnets/";
const WAIT: Duration = Duration::from_secs(90);
const OUTAGE: Duration = Duration::from_secs(20);

async fn next<T>(rx: &mut mpsc::Receiver<T>) -> Result<T> {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => bail!("the watch ended"),
        Err(_) => bail!("no update within {WAIT:?}"),
    }
}

#[tokio::test]
async fn watches_survive_a_twenty_second_etcd_outage() -> Result<()> {
    let Some(mut etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    let mut c = etcd.client().await?;
    put_config(
        &mut c,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let peer_a = format!("{SUBNETS}10.5.50.0-24");
    c.put(
        peer_a.clone(),
        vxlan_attrs("10.10.0.50", 1, "02:00:00:00:00:50").encode(),
        None,
    )
    .await?;

    let store = std::sync::Arc::new(EtcdStore::connect(etcd.options()).await?);
    let cfg = store.network_config().await?;
    let own = store
        .acquire(
            &cfg,
            &AcquireRequest {
                attrs: vxlan_attrs("10.10.0.1", 1, "02:00:00:00:00:01"),
                // A fixed own subnet: a random one could be one of the peers' subnets
                // the test writes later (a flaky failure, about 1 run in 50).
                previous: PreviousSubnets {
                    subnet: Some("10.5.1.0/24".parse()?),
                    ..PreviousSubnets::default()
                },
            },
        )
        .await?;
    assert_eq!(own.key.to_string(), "10.5.1.0-24");
    let mut health = store.watch_health();

    let (tx, mut rx) = mpsc::channel(16);
    let leases_task = {
        let store = store.clone();
        let own = own.key;
        tokio::spawn(async move { store.watch_leases(own, tx).await })
    };
    let (own_tx, mut own_rx) = mpsc::channel(16);
    let own_task = {
        let store = store.clone();
        let own = own.clone();
        tokio::spawn(async move { store.watch_own_lease(&own, own_tx).await })
    };
    let mut view = LeaseView::default();
    view.apply(next(&mut rx).await?);
    assert_eq!(view.leases.len(), 1);
    assert!(matches!(
        next(&mut own_rx).await?,
        OwnLeaseEvent::Renewed(_)
    ));
    tokio::time::timeout(WAIT, health.wait_for(|h| *h == WatchHealth::Watching)).await??;

    etcd.stop();
    tokio::time::timeout(
        WAIT,
        health.wait_for(|h| matches!(h, WatchHealth::Reconnecting { .. })),
    )
    .await??;
    // Requests fail (in bounded time) instead of hanging while etcd is away.
    match tokio::time::timeout(WAIT, store.renew(&own)).await? {
        Err(StoreError::Unavailable(_)) => {}
        other => bail!("renew during the outage: {other:?}"),
    }
    tokio::time::sleep(OUTAGE).await;
    assert!(!leases_task.is_finished(), "the lease watch never gives up");
    assert!(
        !own_task.is_finished(),
        "the own-lease watch never gives up"
    );
    assert!(
        rx.try_recv().is_err(),
        "no updates invented during the outage"
    );
    assert_eq!(view.leases.len(), 1, "the last known set is kept");

    etcd.start_again().await?;
    // Written right after the restart, most likely while the watch is still in its
    // reconnect backoff.
    let mut c = etcd.client().await?;
    c.put(
        format!("{SUBNETS}10.5.51.0-24"),
        vxlan_attrs("10.10.0.51", 1, "02:00:00:00:00:51").encode(),
        None,
    )
    .await?;
    c.delete(peer_a, None).await?;
    c.put(
        format!("{SUBNETS}10.5.52.0-24"),
        vxlan_attrs("10.10.0.52", 1, "02:00:00:00:00:52").encode(),
        None,
    )
    .await?;
    let mut want = etcd_leases(&mut c, "/coreos.com/network").await?;
    want.remove(&own.key.to_string())
        .context("own lease still in etcd")?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while view.encoded() != want {
        if tokio::time::Instant::now() > deadline {
            bail!("no convergence: have {:?}, etcd {want:?}", view.encoded());
        }
        let u = next(&mut rx).await?;
        assert!(
            matches!(u, LeaseUpdate::Events(_)),
            "after the first, only events"
        );
        view.apply(u);
    }
    let keys: Vec<String> = view.leases.keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["10.5.51.0-24", "10.5.52.0-24"]);
    tokio::time::timeout(WAIT, health.wait_for(|h| *h == WatchHealth::Watching)).await??;
    assert!(
        logs.count(&["WARN", "etcd lease watch"]) >= 1,
        "the outage was logged"
    );

    // Renewal works again and the own-lease watch reports it.
    let renewed = store.renew(&own).await?;
    let mut got = None;
    while got.is_none() {
        match next(&mut own_rx).await? {
            OwnLeaseEvent::Renewed(l)
                if l.expiration >= renewed.expiration.map(|e| e - Duration::from_secs(2)) =>
            {
                got = Some(l)
            }
            OwnLeaseEvent::Renewed(_) => {}
            OwnLeaseEvent::Revoked => bail!("own lease reported revoked"),
        }
    }
    got.context("renewal seen")?;
    assert!(!leases_task.is_finished() && !own_task.is_finished());
    Ok(())
}
