//! Reaching a secured etcd: TLS with client certificates (used only when both
//! --etcd-certfile and --etcd-keyfile are given) and username/password auth.

use std::time::Duration;

use anyhow::{bail, Result};
use flannel_core::PreviousSubnets;
use flannel_store::etcd::{EtcdOptions, EtcdStore};
use flannel_store::testing::{put_config, vxlan_attrs, EtcdServer, StoreOptions};
use flannel_store::{AcquireRequest, LeaseStore, StoreError};

const WAIT: Duration = Duration::from_secs(60);
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn request() -> AcquireRequest {
    AcquireRequest {
        attrs: vxlan_attrs("10.10.0.1", 1, "02:00:00:00:00:01"),
        previous: PreviousSubnets::default(),
    }
}

/// Config read and lease acquisition through `opts`; the lease key is checked in etcd.
async fn works(etcd: &EtcdServer, opts: EtcdOptions) -> Result<()> {
    let store = EtcdStore::connect(opts).await?;
    let cfg = tokio::time::timeout(WAIT, store.network_config()).await??;
    let lease = store.acquire(&cfg, &request()).await?;
    let key = store.keys().lease_key(&lease.key);
    let mut c = etcd.client().await?;
    assert_eq!(c.get(key, None).await?.kvs().len(), 1);
    Ok(())
}

/// Acquisition through `opts` must fail (with an error, in bounded time).
async fn refused(opts: EtcdOptions) -> Result<()> {
    let store = match EtcdStore::connect(opts).await {
        Ok(s) => s,
        Err(_) => return Ok(()),
    };
    let cfg = config()?;
    match tokio::time::timeout(WAIT, store.acquire(&cfg, &request())).await? {
        Err(StoreError::Unavailable(_)) => Ok(()),
        other => bail!("expected the secured etcd to refuse, got {other:?}"),
    }
}

fn config() -> Result<flannel_core::NetworkConfig> {
    Ok(flannel_core::NetworkConfig::parse_and_validate(CONFIG)?)
}

#[tokio::test]
async fn tls_with_a_client_certificate() -> Result<()> {
    let Some(etcd) = EtcdServer::start_tls_or_skip().await else {
        return Ok(());
    };
    put_config(&mut etcd.client().await?, CONFIG).await?;
    let full = etcd.options();
    assert!(full.endpoints[0].starts_with("https://"));
    works(&etcd, full.clone()).await?;

    // Certificate without key (or key without certificate): no client TLS at all,
    // as upstream; etcd requires a client certificate, so nothing works.
    refused(EtcdOptions {
        keyfile: None,
        ..full.clone()
    })
    .await?;
    refused(EtcdOptions {
        certfile: None,
        ..full.clone()
    })
    .await?;
    // A CA etcd's certificate does not chain to: the server is not trusted.
    let other = tempfile::tempdir()?;
    let bogus_ca = other.path().join("ca.crt");
    std::fs::copy(full.certfile.clone().unwrap_or_default(), &bogus_ca)?;
    refused(EtcdOptions {
        cafile: Some(bogus_ca),
        ..full.clone()
    })
    .await?;

    // Unreadable files are a clear error at connect time.
    match EtcdStore::connect(EtcdOptions {
        keyfile: Some("/nonexistent/client.key".into()),
        ..full
    })
    .await
    {
        Err(StoreError::Unavailable(msg)) => {
            assert!(
                msg.contains("--etcd-keyfile /nonexistent/client.key"),
                "{msg}"
            )
        }
        other => bail!("expected a file error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn username_and_password() -> Result<()> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(());
    };
    let mut c = etcd.client().await?;
    put_config(&mut c, CONFIG).await?;
    c.user_add("root", "s3cret", None).await?;
    c.user_grant_role("root", "root").await?;
    c.user_add("flannel", "fl4nnel", None).await?;
    c.role_add("flannel").await?;
    c.role_grant_permission(
        "flannel",
        etcd_client::Permission::read_write("/coreos.com/network/").with_prefix(),
    )
    .await?;
    c.user_grant_role("flannel", "flannel").await?;
    c.auth_enable().await?;

    let with = |user: &str, pw: &str| EtcdOptions {
        username: Some(user.into()),
        password: Some(pw.into()),
        ..etcd.options()
    };
    works_with_auth(with("flannel", "fl4nnel")).await?;

    match tokio::time::timeout(WAIT, EtcdStore::connect(with("flannel", "wrong"))).await? {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains("etcd refused the login"), "{msg}")
        }
        other => bail!("expected a refused login, got {other:?}"),
    }
    // Without credentials the store cannot read anything.
    let anonymous = EtcdStore::connect(etcd.options()).await?;
    match tokio::time::timeout(WAIT, anonymous.acquire(&config()?, &request())).await? {
        Err(StoreError::Unavailable(_)) => {}
        other => bail!("expected anonymous access to fail, got {other:?}"),
    }
    Ok(())
}

async fn works_with_auth(opts: EtcdOptions) -> Result<()> {
    let store = EtcdStore::connect(opts).await?;
    let cfg = tokio::time::timeout(WAIT, store.network_config()).await??;
    let lease = store.acquire(&cfg, &request()).await?;
    assert_eq!(store.renew(&lease).await?.key, lease.key);
    Ok(())
}
