//! Reading the network config from a real etcd: missing, malformed and invalid
//! configs and an unreachable etcd are logged once each and retried until fixed;
//! an IPv6-only config is refused for good.

use std::time::Duration;

use anyhow::{bail, Result};
use flannel_store::etcd::EtcdStore;
use flannel_store::testing::{put_config, EtcdServer, LogCapture, StoreOptions, TcpProxy};
use flannel_store::{LeaseStore, StoreError};

const CONFIG_KEY: &str = "/coreos.com/network/config";
const WAIT: Duration = Duration::from_secs(60);
/// Long enough for the one-second retry loop to have gone round more than once.
const SEVERAL_RETRIES: Duration = Duration::from_millis(2500);

/// Waits until a line with all `needles` was logged, then lets the retry loop go
/// round a few more times and returns how many such lines there are.
async fn logged_after_retries(logs: &LogCapture, needles: &[&str]) -> Result<usize> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while logs.count(needles) == 0 {
        if tokio::time::Instant::now() > deadline {
            bail!("never logged {needles:?}: {:#?}", logs.lines());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(SEVERAL_RETRIES).await;
    Ok(logs.count(needles))
}

#[tokio::test]
async fn bad_configs_are_logged_once_and_retried_until_a_good_one_appears() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    let mut c = etcd.client().await?;
    let store = std::sync::Arc::new(EtcdStore::connect(etcd.options()).await?);
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.network_config().await })
    };

    // No config at all yet; then malformed JSON; then well-formed configs whose
    // SubnetLen does not fit the network. Each problem is logged exactly once
    // however often the loop retries.
    let missing = ["ERROR", CONFIG_KEY, "does not exist"];
    assert_eq!(logged_after_retries(&logs, &missing).await?, 1);
    put_config(&mut c, r#"{"Network":"10.5.0.0/16""#).await?;
    let malformed = ["ERROR", CONFIG_KEY, "not a JSON object"];
    assert_eq!(logged_after_retries(&logs, &malformed).await?, 1);
    put_config(&mut c, r#"{"Network":"10.5.0.0/16","SubnetLen":15}"#).await?;
    let too_short = ["ERROR", CONFIG_KEY, "SubnetLen /15"];
    assert_eq!(logged_after_retries(&logs, &too_short).await?, 1);
    put_config(&mut c, r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#).await?;
    let too_long = ["ERROR", CONFIG_KEY, "SubnetLen /31 is too long"];
    assert_eq!(logged_after_retries(&logs, &too_long).await?, 1);
    assert!(!reader.is_finished());

    put_config(
        &mut c,
        r#"{"network":"10.5.0.0/16","backend":{"type":"VXLAN","VNI":4}}"#,
    )
    .await?;
    let cfg = tokio::time::timeout(WAIT, reader).await???;
    assert_eq!(cfg.network, Some("10.5.0.0/16".parse()?));
    assert_eq!(cfg.subnet_len, 24);
    assert_eq!(cfg.backend.backend_type, "vxlan");
    assert_eq!(logs.count(&["network config: working again"]), 1);
    Ok(())
}

#[tokio::test]
async fn ipv6_only_is_refused_with_a_pointer_to_the_kube_manager() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    put_config(
        &mut etcd.client().await?,
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let store = EtcdStore::connect(etcd.options()).await?;
    match tokio::time::timeout(WAIT, store.network_config()).await? {
        Err(StoreError::Unsupported(msg)) => {
            assert!(msg.contains("IPv6-only"), "{msg}");
            assert!(msg.contains("--kube-subnet-mgr"), "{msg}");
        }
        other => bail!("expected a fatal Unsupported error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn an_unreachable_etcd_is_waited_for() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    put_config(&mut etcd.client().await?, r#"{"Network":"10.6.0.0/16"}"#).await?;
    let proxy = TcpProxy::for_etcd(&etcd).await?;
    proxy.block();
    let store = std::sync::Arc::new(EtcdStore::connect(proxy.options()).await?);
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.network_config().await })
    };
    let unreachable = ["WARN", "network config", CONFIG_KEY];
    let failures = logged_after_retries(&logs, &unreachable).await?;
    assert!(!reader.is_finished());
    // Logging every one-second attempt would give a line per retry; the connection
    // can fail in a couple of distinct ways.
    assert!(
        (1..=3).contains(&failures),
        "each distinct failure logged once, not every second: {:#?}",
        logs.lines()
    );
    proxy.unblock();
    let cfg = tokio::time::timeout(WAIT, reader).await???;
    assert_eq!(cfg.network, Some("10.6.0.0/16".parse()?));
    // No Backend in the config: upstream's code default.
    assert_eq!(cfg.backend.backend_type, "udp");
    Ok(())
}
