//! Opening the lease store the options ask for (etcd, or the Kubernetes API).

use std::sync::Arc;

use anyhow::{Context, Result};
use flannel_core::MacAddr;
use flannel_store::etcd::{EtcdOptions, EtcdStore, WatchHealth};
use flannel_store::kube::{KubeOptions, KubeStore};
use flannel_store::LeaseStore;
use tokio::sync::watch;

use crate::options::Options;

/// A store plus what the agent needs from its particular kind.
pub struct OpenedStore {
    pub store: Arc<dyn LeaseStore>,
    /// etcd: the state of the lease watch, for metrics.
    pub watch_health: Option<watch::Receiver<WatchHealth>>,
    /// Kubernetes: values the own node's annotations override.
    pub overrides: NodeOverrides,
}

/// Kubernetes mode reads these from the own node at start
/// (docs/compatibility.md, "Kubernetes subnet manager and node annotations").
#[derive(Debug, Default, Clone)]
pub struct NodeOverrides {
    pub public_ip: Option<std::net::Ipv4Addr>,
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// The VTEP MAC published before, reused when the vxlan device is recreated.
    pub vtep_mac: Option<MacAddr>,
    /// The same for the IPv6 vxlan device (`backend-v6-data`).
    pub vtep_mac_v6: Option<MacAddr>,
}

pub async fn open(o: &Options) -> Result<OpenedStore> {
    if o.kube_subnet_mgr {
        return open_kube(o).await;
    }
    let nonempty = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
    if o.etcd_certfile.is_empty() || o.etcd_keyfile.is_empty() {
        tracing::warn!(
            "etcd connection is plaintext (TLS needs both --etcd-certfile and --etcd-keyfile)"
        );
    }
    let opts = EtcdOptions {
        endpoints: o
            .etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        prefix: o.etcd_prefix.clone(),
        cafile: nonempty(&o.etcd_cafile).map(Into::into),
        certfile: nonempty(&o.etcd_certfile).map(Into::into),
        keyfile: nonempty(&o.etcd_keyfile).map(Into::into),
        username: nonempty(&o.etcd_username),
        password: nonempty(&o.etcd_password),
    };
    let store = EtcdStore::connect(opts)
        .await
        .context("connecting to etcd")?;
    Ok(OpenedStore {
        watch_health: Some(store.watch_health()),
        store: Arc::new(store),
        overrides: NodeOverrides::default(),
    })
}

async fn open_kube(o: &Options) -> Result<OpenedStore> {
    let opts = KubeOptions {
        api_url: o.kube_api_url.clone(),
        kubeconfig_file: o.kubeconfig_file.clone(),
        net_config_path: o.net_config_path.clone(),
        annotation_prefix: o.kube_annotation_prefix.clone(),
        set_node_network_unavailable: o.set_node_network_unavailable,
        ..KubeOptions::default()
    }
    .with_env();
    let store = KubeStore::new(opts)
        .await
        .context("connecting to the Kubernetes API")?;
    let info = store
        .startup_info()
        .await
        .context("reading this node from the Kubernetes API")?;
    Ok(OpenedStore {
        store: Arc::new(store),
        watch_health: None,
        overrides: NodeOverrides {
            public_ip: info.public_ip,
            public_ipv6: info.public_ipv6,
            vtep_mac: info.vtep_mac,
            vtep_mac_v6: info.vtep_mac_v6,
        },
    })
}
