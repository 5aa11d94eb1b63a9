//! The etcd store on a real 3-member cluster: with any one member down (killed,
//! its endpoint still configured), no request the agent makes fails — renewals,
//! config reads and acquisitions go to the members that are up, as the Go client
//! does for upstream flanneld.

use anyhow::Result;
use flannel_core::PreviousSubnets;
use flannel_store::etcd::EtcdStore;
use flannel_store::testing::{put_config, vxlan_attrs, EtcdCluster, StoreOptions};
use flannel_store::{AcquireRequest, LeaseStore};

#[tokio::test]
async fn no_request_fails_while_one_member_is_down() -> Result<()> {
    let Some(mut cluster) = EtcdCluster::start_or_skip(3).await else {
        return Ok(());
    };
    let mut c = cluster.client().await?;
    put_config(
        &mut c,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let store = EtcdStore::connect(cluster.options()).await?;
    let cfg = store.network_config().await?;
    let mut lease = store
        .acquire(
            &cfg,
            &AcquireRequest {
                attrs: vxlan_attrs("10.10.0.1", 1, "02:00:00:00:00:01"),
                previous: PreviousSubnets::default(),
            },
        )
        .await?;
    for down in 0..3 {
        cluster.member_mut(down).stop();
        // Enough requests that each live connection and the dead one are picked.
        for i in 0..12 {
            lease = store
                .renew(&lease)
                .await
                .map_err(|e| anyhow::anyhow!("renewal {i} with member {} down: {e}", down + 1))?;
            store.network_config().await?;
        }
        let other = store
            .acquire(
                &cfg,
                &AcquireRequest {
                    attrs: vxlan_attrs(&format!("10.10.1.{}", down + 1), 1, "02:00:00:00:01:01"),
                    previous: PreviousSubnets::default(),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("acquisition with member {} down: {e}", down + 1))?;
        assert_ne!(other.key, lease.key);
        cluster.member_mut(down).start_again().await?;
    }
    Ok(())
}
