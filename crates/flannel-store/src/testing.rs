//! Test helpers (cargo feature `testing`) specific to the store: the options that
//! point a store at a test etcd, a model of what a lease watcher believes, and lease
//! fixtures written the way flanneld writes them. The etcd process itself, the
//! log capture and the FLANNEL_E2E gate come from flannel-testkit (re-exported).
//!
//! ```ignore
//! let Some(etcd) = EtcdServer::start_or_skip().await else { return };
//! let store = EtcdStore::connect(etcd.options()).await?;
//! ```

pub use flannel_testkit::etcd::{EtcdCluster, EtcdServer, TcpProxy, TlsFiles};
pub use flannel_testkit::LogCapture;

use crate::etcd::EtcdOptions;

/// Store options for a test etcd endpoint.
pub trait StoreOptions {
    /// Options pointing at this endpoint (with the client certificate when it uses
    /// TLS), default prefix.
    fn options(&self) -> EtcdOptions;
}

impl StoreOptions for EtcdServer {
    fn options(&self) -> EtcdOptions {
        let tls = self.tls_files();
        EtcdOptions {
            endpoints: vec![self.endpoint()],
            cafile: tls.map(|t| t.ca.clone()),
            certfile: tls.map(|t| t.cert.clone()),
            keyfile: tls.map(|t| t.key.clone()),
            ..EtcdOptions::default()
        }
    }
}

impl StoreOptions for EtcdCluster {
    fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.endpoints(),
            ..EtcdOptions::default()
        }
    }
}

impl StoreOptions for TcpProxy {
    fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![self.endpoint()],
            ..EtcdOptions::default()
        }
    }
}

/// The set of leases a consumer of [`crate::LeaseStore::watch_leases`] believes in,
/// built only from the updates it received (what a backend would reconcile to).
#[derive(Debug, Default, Clone)]
pub struct LeaseView {
    pub leases: std::collections::BTreeMap<flannel_core::LeaseKey, flannel_core::Lease>,
    /// How many updates were applied.
    pub updates: usize,
}

impl LeaseView {
    /// Applies one update; panics on an impossible sequence (an Added for a known
    /// lease, a Removed or Changed for an unknown one), which would be a store bug.
    pub fn apply(&mut self, update: flannel_core::LeaseUpdate) {
        use flannel_core::{LeaseEvent, LeaseUpdate};
        self.updates += 1;
        match update {
            LeaseUpdate::Full(all) => {
                self.leases = all.into_iter().map(|l| (l.key, l)).collect();
            }
            LeaseUpdate::Events(events) => {
                for e in events {
                    match e {
                        LeaseEvent::Added(l) => {
                            let old = self.leases.insert(l.key, l);
                            assert!(old.is_none(), "Added for a known lease: {old:?}");
                        }
                        LeaseEvent::Changed { previous, current } => {
                            let old = self.leases.insert(current.key, current);
                            assert_eq!(
                                old.as_ref(),
                                Some(&previous),
                                "Changed with a wrong previous"
                            );
                        }
                        LeaseEvent::Removed(l) => {
                            let old = self.leases.remove(&l.key);
                            assert_eq!(
                                old.as_ref().map(|o| &o.attrs),
                                Some(&l.attrs),
                                "Removed with wrong attrs"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Lease key and value bytes, to compare with what etcd holds.
    pub fn encoded(&self) -> std::collections::BTreeMap<String, String> {
        self.leases
            .values()
            .map(|l| (l.key.to_string(), l.attrs.encode()))
            .collect()
    }
}

/// The leases under `<prefix>/subnets/` as etcd holds them now: lease key text →
/// value text, for entries that decode (what a correct watch converges to).
pub async fn etcd_leases(
    client: &mut etcd_client::Client,
    prefix: &str,
) -> Result<std::collections::BTreeMap<String, String>, etcd_client::Error> {
    let keys = crate::etcd::KeyLayout::new(prefix);
    let resp = client
        .get(
            keys.subnets_prefix.clone(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut out = std::collections::BTreeMap::new();
    for kv in resp.kvs() {
        let Ok(key) = keys.parse_lease_key(kv.key()) else {
            continue;
        };
        let Ok(value) = std::str::from_utf8(kv.value()) else {
            continue;
        };
        if let Ok(attrs) = flannel_core::LeaseAttrs::decode(value) {
            out.insert(key.to_string(), attrs.encode());
        }
    }
    Ok(out)
}

/// vxlan lease attributes as flanneld publishes them (`{"VNI":vni,"VtepMAC":mac}`).
/// Panics on a malformed IP or MAC (test input).
pub fn vxlan_attrs(public_ip: &str, vni: u32, mac: &str) -> flannel_core::LeaseAttrs {
    let mut a = flannel_core::LeaseAttrs::new(public_ip.parse().expect("test IPv4 address"));
    a.backend_type = "vxlan".into();
    a.backend_data = Some(
        flannel_core::VxlanData {
            vni,
            vtep_mac: mac.parse().expect("test MAC address"),
        }
        .encode(),
    );
    a
}

/// Writes the network config under the default prefix.
pub async fn put_config(
    client: &mut etcd_client::Client,
    json: &str,
) -> Result<(), etcd_client::Error> {
    let keys = crate::etcd::KeyLayout::new(crate::etcd::DEFAULT_PREFIX);
    client.put(keys.config, json, None).await?;
    Ok(())
}
