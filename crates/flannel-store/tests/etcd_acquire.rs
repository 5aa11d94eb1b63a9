//! Lease acquisition against a real etcd on 127.0.0.1: the exact bytes flanneld
//! writes, reuse across restarts, reservations, races between many hosts, a full
//! window and garbage in the store.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use etcd_client::GetOptions;
use flannel_core::{Lease, LeaseKey, NetworkConfig, PreviousSubnets, SubnetEnv};
use flannel_store::etcd::{EtcdStore, LEASE_TTL_SECS};
use flannel_store::testing::{put_config, vxlan_attrs, EtcdServer, LogCapture, StoreOptions};
use flannel_store::{AcquireRequest, LeaseStore, StoreError};

const SUBNETS: &str = "/coreos.com/network/subnets/";
const VXLAN_CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn request(ip: &str, mac: &str) -> AcquireRequest {
    AcquireRequest {
        attrs: vxlan_attrs(ip, 1, mac),
        previous: PreviousSubnets::default(),
    }
}

/// What etcd holds under the subnets prefix: key → (value, etcd lease id, version).
async fn stored(etcd: &EtcdServer) -> Result<Vec<(String, String, i64, i64)>> {
    let mut c = etcd.client().await?;
    let resp = c
        .get(SUBNETS, Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.lease(),
                kv.version(),
            )
        })
        .collect())
}

async fn setup(config: &str) -> Result<Option<(EtcdServer, NetworkConfig)>> {
    let Some(etcd) = EtcdServer::start_or_skip().await else {
        return Ok(None);
    };
    put_config(&mut etcd.client().await?, config).await?;
    let store = EtcdStore::connect(etcd.options()).await?;
    let cfg = store.network_config().await?;
    Ok(Some((etcd, cfg)))
}

fn assert_expires_in_a_day(lease: &Lease) {
    let exp = lease.expiration.expect("a leased key has an expiry");
    let left = exp
        .duration_since(SystemTime::now())
        .expect("expiry in the future");
    assert!(
        left > Duration::from_secs(86_000) && left <= Duration::from_secs(86_401),
        "expiry {left:?} from now"
    );
}

#[tokio::test]
async fn acquire_writes_flannels_key_value_and_ttl() -> Result<()> {
    let Some((etcd, cfg)) = setup(VXLAN_CONFIG).await? else {
        return Ok(());
    };
    assert_eq!(cfg.backend.backend_type, "vxlan");
    let store = EtcdStore::connect(etcd.options()).await?;
    let lease = store
        .acquire(&cfg, &request("10.10.0.1", "d6:2d:b9:3b:e2:ab"))
        .await?;
    assert_eq!(lease.key.v4.prefix_len(), 24);
    assert!(lease.key.v6.is_none());
    assert_expires_in_a_day(&lease);

    let all = stored(&etcd).await?;
    assert_eq!(all.len(), 1, "exactly one lease key: {all:?}");
    let (key, value, lease_id, version) = &all[0];
    let octet = lease.key.v4.addr().octets()[2];
    assert_eq!(
        key,
        &format!("/coreos.com/network/subnets/10.5.{octet}.0-24")
    );
    assert!((1..=255).contains(&octet), "inside the default window");
    assert_eq!(
        value,
        r#"{"PublicIP":"10.10.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"d6:2d:b9:3b:e2:ab"}}"#
    );
    assert_eq!(*version, 1);
    assert_ne!(*lease_id, 0, "the key is attached to an etcd lease");
    let ttl = etcd
        .client()
        .await?
        .lease_time_to_live(*lease_id, None)
        .await?;
    assert_eq!(ttl.granted_ttl(), LEASE_TTL_SECS);
    assert!(ttl.ttl() > 86_000, "remaining TTL {}", ttl.ttl());
    Ok(())
}

#[tokio::test]
async fn restart_reuses_the_subnet_and_previous_subnet_survives_an_ip_change() -> Result<()> {
    let Some((etcd, cfg)) = setup(VXLAN_CONFIG).await? else {
        return Ok(());
    };
    let first = EtcdStore::connect(etcd.options())
        .await?
        .acquire(&cfg, &request("10.10.0.1", "d6:2d:b9:3b:e2:ab"))
        .await?;
    let before = stored(&etcd).await?;

    // A new process (new client) with the same public IP and a new VTEP MAC.
    let second = EtcdStore::connect(etcd.options())
        .await?
        .acquire(&cfg, &request("10.10.0.1", "aa:bb:cc:dd:ee:01"))
        .await?;
    assert_eq!(second.key, first.key, "same subnet after a restart");
    let after = stored(&etcd).await?;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].0, before[0].0);
    assert!(after[0].1.contains("aa:bb:cc:dd:ee:01"), "attrs rewritten");
    assert_eq!(after[0].3, 2, "re-put: key version 2");
    assert_ne!(after[0].2, before[0].2, "re-put under a new etcd lease");
    assert_expires_in_a_day(&second);

    // The host's etcd lease is gone (expired, data lost...) and its IP changed; the
    // subnet.env it wrote still names the subnet.
    etcd.client()
        .await?
        .delete(after[0].0.clone(), None)
        .await?;
    let env = SubnetEnv {
        network: cfg.network,
        subnet: Some(first.key.v4),
        ipv6_network: None,
        ipv6_subnet: None,
        mtu: 1450,
        ip_masq: true,
    }
    .render();
    let req = AcquireRequest {
        attrs: vxlan_attrs("10.10.0.99", 1, "aa:bb:cc:dd:ee:02"),
        previous: PreviousSubnets::parse(&env),
    };
    let third = EtcdStore::connect(etcd.options())
        .await?
        .acquire(&cfg, &req)
        .await?;
    assert_eq!(
        third.key, first.key,
        "previous subnet from subnet.env reused"
    );

    // The same subnet.env on another host while the subnet is held: never shared.
    let req = AcquireRequest {
        attrs: vxlan_attrs("10.10.0.100", 1, "aa:bb:cc:dd:ee:03"),
        previous: PreviousSubnets::parse(&env),
    };
    let fourth = EtcdStore::connect(etcd.options())
        .await?
        .acquire(&cfg, &req)
        .await?;
    assert_ne!(fourth.key, first.key);
    assert_eq!(stored(&etcd).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn reservations_stay_permanent_and_misfits_are_replaced() -> Result<()> {
    let Some((etcd, cfg)) = setup(VXLAN_CONFIG).await? else {
        return Ok(());
    };
    let mut c = etcd.client().await?;
    let reserved = "/coreos.com/network/subnets/10.5.200.0-24";
    c.put(reserved, r#"{"PublicIP":"10.10.0.7"}"#, None).await?;
    // An old lease of another host whose subnet length no longer fits the config.
    let misfit = "/coreos.com/network/subnets/10.5.64.0-26";
    c.put(misfit, r#"{"PublicIP":"10.10.0.8"}"#, None).await?;

    let store = EtcdStore::connect(etcd.options()).await?;
    let lease = store
        .acquire(&cfg, &request("10.10.0.7", "d6:2d:b9:3b:e2:07"))
        .await?;
    assert_eq!(lease.key.to_string(), "10.5.200.0-24");
    assert_eq!(lease.expiration, None, "a reservation has no expiry");
    let kv = c.get(reserved, None).await?;
    let kv = &kv.kvs()[0];
    assert_eq!(kv.lease(), 0, "the reservation stays without an etcd lease");
    assert!(kv.value_str()?.contains(r#""VtepMAC":"d6:2d:b9:3b:e2:07""#));
    // Renewing a reservation keeps it permanent too.
    let renewed = store.renew(&lease).await?;
    assert_eq!(renewed.expiration, None);
    assert_eq!(c.get(reserved, None).await?.kvs()[0].lease(), 0);

    let lease8 = store
        .acquire(&cfg, &request("10.10.0.8", "d6:2d:b9:3b:e2:08"))
        .await?;
    assert_eq!(lease8.key.v4.prefix_len(), 24);
    assert!(
        c.get(misfit, None).await?.kvs().is_empty(),
        "the lease that no longer fits was deleted"
    );
    Ok(())
}

#[tokio::test]
async fn twenty_hosts_racing_get_twenty_distinct_subnets() -> Result<()> {
    // 24 subnets for 20 hosts that all start with the same previous subnet: the first
    // round is a 20-way collision and later rounds keep colliding.
    let config = r#"{"Network":"10.7.0.0/16","SubnetMin":"10.7.1.0","SubnetMax":"10.7.24.0","Backend":{"Type":"vxlan"}}"#;
    let Some((etcd, cfg)) = setup(config).await? else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    let mut stores = Vec::new();
    for _ in 0..20 {
        stores.push(EtcdStore::connect(etcd.options()).await?);
    }
    let previous = PreviousSubnets::parse("FLANNEL_SUBNET=10.7.5.1/24\n");
    let attempts = stores.iter().enumerate().map(|(i, s)| {
        let req = AcquireRequest {
            attrs: vxlan_attrs(
                &format!("10.20.0.{}", i + 1),
                1,
                &format!("02:00:00:00:00:{:02x}", i + 1),
            ),
            previous: previous.clone(),
        };
        let cfg = cfg.clone();
        async move { s.acquire(&cfg, &req).await }
    });
    let leases: Vec<Lease> = futures_join_all(attempts).await?;
    let subnets: BTreeSet<LeaseKey> = leases.iter().map(|l| l.key).collect();
    assert_eq!(subnets.len(), 20, "distinct subnets: {subnets:?}");
    let window = cfg.window_v4().context("window")?;
    assert!(leases.iter().all(|l| window.contains(&l.key.v4)));
    let all = stored(&etcd).await?;
    assert_eq!(all.len(), 20);
    for l in &leases {
        let key = format!("{SUBNETS}{}", l.key);
        let row = all
            .iter()
            .find(|r| r.0 == key)
            .context("lease key in etcd")?;
        assert_eq!(row.1, l.attrs.encode(), "each key holds its winner's value");
    }
    let lost = logs.count(&["was taken by another host meanwhile"]);
    eprintln!("creation races lost and retried: {lost}");
    assert!(
        lost >= 1,
        "the shared previous subnet must have caused races"
    );
    Ok(())
}

#[tokio::test]
async fn dual_stack_hosts_racing_never_share_a_subnet_of_either_family() -> Result<()> {
    // 24 IPv4 subnets and 256 IPv6 ones for 20 hosts starting with the same previous
    // IPv4 subnet: create-if-absent on `<v4>&<v6>` keys cannot see two hosts that pick
    // the same IPv4 subnet with different IPv6 ones, so the later one must back off.
    let config = r#"{"Network":"10.7.0.0/16","SubnetMin":"10.7.1.0","SubnetMax":"10.7.24.0","EnableIPv6":true,"IPv6Network":"fd00:7::/56","Backend":{"Type":"vxlan"}}"#;
    let Some((etcd, cfg)) = setup(config).await? else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    let mut stores = Vec::new();
    for _ in 0..20 {
        stores.push(EtcdStore::connect(etcd.options()).await?);
    }
    let previous = PreviousSubnets::parse("FLANNEL_SUBNET=10.7.5.1/24\n");
    let attempts = stores.iter().enumerate().map(|(i, s)| {
        let mut attrs = vxlan_attrs(
            &format!("10.20.0.{}", i + 1),
            1,
            &format!("02:00:00:00:00:{:02x}", i + 1),
        );
        attrs.public_ipv6 = Some(format!("fd01::{}", i + 1).parse().expect("v6"));
        let req = AcquireRequest {
            attrs,
            previous: previous.clone(),
        };
        let cfg = cfg.clone();
        async move { s.acquire(&cfg, &req).await }
    });
    let leases: Vec<Lease> = futures_join_all(attempts).await?;
    let v4: BTreeSet<_> = leases.iter().map(|l| l.key.v4).collect();
    let v6: BTreeSet<_> = leases.iter().filter_map(|l| l.key.v6).collect();
    assert_eq!((v4.len(), v6.len()), (20, 20), "distinct: {v4:?} {v6:?}");
    // What etcd holds is exactly the winners' keys: the losers removed theirs.
    let keys: BTreeSet<String> = stored(&etcd).await?.into_iter().map(|r| r.0).collect();
    let want: BTreeSet<String> = leases
        .iter()
        .map(|l| format!("{SUBNETS}{}", l.key))
        .collect();
    assert_eq!(keys, want);
    eprintln!(
        "dual-stack races: {} lost on create, {} given up after an overlapping create",
        logs.count(&["was taken by another host meanwhile"]),
        logs.count(&["created just before it by another host"])
    );
    Ok(())
}

/// Polls all futures on this task (the current-thread runtime interleaves them).
async fn futures_join_all<F, T>(futs: impl IntoIterator<Item = F>) -> Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<Result<T, StoreError>>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => *slot = Some(r),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|r| r.context("future finished").and_then(|r| Ok(r?)))
        .collect()
}

#[tokio::test]
async fn a_full_window_is_a_clear_error() -> Result<()> {
    let config = r#"{"Network":"10.8.0.0/16","SubnetMin":"10.8.1.0","SubnetMax":"10.8.2.0"}"#;
    let Some((etcd, cfg)) = setup(config).await? else {
        return Ok(());
    };
    let store = EtcdStore::connect(etcd.options()).await?;
    store
        .acquire(&cfg, &request("10.10.0.1", "02:00:00:00:00:01"))
        .await?;
    store
        .acquire(&cfg, &request("10.10.0.2", "02:00:00:00:00:02"))
        .await?;
    let err = store
        .acquire(&cfg, &request("10.10.0.3", "02:00:00:00:00:03"))
        .await
        .expect_err("window full");
    assert!(matches!(err, StoreError::OutOfSubnets { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("no free subnet"), "{msg}");
    assert!(msg.contains("10.8.1.0/24 … 10.8.2.0/24"), "{msg}");
    assert_eq!(stored(&etcd).await?.len(), 2, "nothing written");
    Ok(())
}

#[tokio::test]
async fn garbage_in_the_subnets_prefix_is_skipped_with_a_log() -> Result<()> {
    let Some((etcd, cfg)) = setup(VXLAN_CONFIG).await? else {
        return Ok(());
    };
    let (logs, _guard) = LogCapture::install();
    let mut c = etcd.client().await?;
    c.put(
        format!("{SUBNETS}garbage"),
        r#"{"PublicIP":"10.10.0.1"}"#,
        None,
    )
    .await?;
    c.put(format!("{SUBNETS}10.5.9.0-24"), "not json at all", None)
        .await?;
    c.put(
        format!("{SUBNETS}10.5.10.0-24"),
        r#"{"PublicIP":"300.1.1.1"}"#,
        None,
    )
    .await?;
    c.put(
        format!("{SUBNETS}10.5.11.0-24"),
        r#"{"PublicIP":"10.10.0.5"}"#,
        None,
    )
    .await?;

    let store = EtcdStore::connect(etcd.options()).await?;
    // Our previous subnet is the one holding garbage: it must not be handed out
    // (nor retried until giving up), and the good lease of 10.10.0.5 is still seen.
    let req = AcquireRequest {
        attrs: vxlan_attrs("10.10.0.1", 1, "02:00:00:00:00:01"),
        previous: PreviousSubnets::parse("FLANNEL_SUBNET=10.5.9.1/24\n"),
    };
    let lease = store.acquire(&cfg, &req).await?;
    assert!(
        !["10.5.9.0-24", "10.5.10.0-24", "10.5.11.0-24"].contains(&lease.key.to_string().as_str()),
        "{}",
        lease.key
    );
    let reused = store
        .acquire(&cfg, &request("10.10.0.5", "02:00:00:00:00:05"))
        .await?;
    assert_eq!(
        reused.key.to_string(),
        "10.5.11.0-24",
        "good lease found and reused"
    );
    assert!(logs.count(&["WARN", "/coreos.com/network/subnets/garbage"]) >= 1);
    assert!(logs.count(&["WARN", "/coreos.com/network/subnets/10.5.9.0-24"]) >= 1);
    assert!(
        logs.count(&[
            "WARN",
            "/coreos.com/network/subnets/10.5.10.0-24",
            "300.1.1.1"
        ]) >= 1
    );
    let garbage = c.get(format!("{SUBNETS}10.5.9.0-24"), None).await?;
    assert_eq!(
        garbage.kvs()[0].value(),
        b"not json at all",
        "garbage left alone"
    );
    Ok(())
}

#[tokio::test]
async fn dual_stack_keys_carry_both_subnets_and_reuse_needs_both_addresses() -> Result<()> {
    let config = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:5::/48","Backend":{"Type":"vxlan"}}"#;
    let Some((etcd, cfg)) = setup(config).await? else {
        return Ok(());
    };
    let dual = |v6: &str| {
        let mut r = request("10.10.0.1", "d6:2d:b9:3b:e2:ab");
        r.attrs.public_ipv6 = Some(v6.parse().expect("v6"));
        r
    };
    let store = EtcdStore::connect(etcd.options()).await?;
    let lease = store.acquire(&cfg, &dual("fd01::1")).await?;
    let v6 = lease.key.v6.context("dual-stack lease has a v6 subnet")?;
    assert_eq!(v6.prefix_len(), 64);
    assert!(cfg.window_v6().context("v6 window")?.contains(&v6));
    let all = stored(&etcd).await?;
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0].0,
        format!("{SUBNETS}{}-24&{}-64", lease.key.v4.addr(), v6.addr())
    );
    assert_eq!(
        all[0].1,
        r#"{"PublicIP":"10.10.0.1","PublicIPv6":"fd01::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"d6:2d:b9:3b:e2:ab"}}"#
    );

    // Same addresses: the lease is reused.
    let again = EtcdStore::connect(etcd.options())
        .await?
        .acquire(&cfg, &dual("fd01::1"))
        .await?;
    assert_eq!(again.key, lease.key);
    // Same IPv4 but another IPv6 address is another host: it gets its own lease.
    let other = EtcdStore::connect(etcd.options())
        .await?
        .acquire(&cfg, &dual("fd01::2"))
        .await?;
    assert_ne!(other.key.v4, lease.key.v4);
    assert_ne!(other.key.v6, lease.key.v6);
    assert_eq!(stored(&etcd).await?.len(), 2);
    Ok(())
}
