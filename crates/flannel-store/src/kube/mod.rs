//! The Kubernetes subnet manager (`--kube-subnet-mgr`): leases are the nodes' pod
//! CIDRs, published and read as node annotations.
//!
//! * The network config is `--net-config-path`, parsed once (no etcd-style
//!   validation); only `Network`/`IPv6Network` and the enabled stacks matter here.
//! * [`acquire`](LeaseStore::acquire) reads the own node's pod CIDR(s) and writes the
//!   lease attributes as annotations with one strategic-merge patch of
//!   `nodes/<name>/status`, and only when a value differs.
//! * [`watch_leases`](LeaseStore::watch_leases) is one list + watch of all nodes (with
//!   bookmarks; resumed from the last resource version, re-listed only on 410 Gone),
//!   turned into lease events by a [`LeaseTracker`](flannel_core::LeaseTracker), so
//!   node heartbeats cause no events. There is no periodic re-list.
//! * The own node's deletion is seen by that same watch and reported by
//!   [`watch_own_lease`](LeaseStore::watch_own_lease) as `Revoked`.
//! * [`complete_lease`](LeaseStore::complete_lease) sets the node condition
//!   `NetworkUnavailable=False` once the backend runs.

mod annotations;
mod counter;
mod lite;
mod node;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flannel_core::{ConfigError, Lease, LeaseKey, LeaseUpdate, MacAddr, NetworkConfig};
use ipnet::Ipv4Net;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use tokio::sync::{mpsc, watch as tokio_watch};

use crate::{AcquireRequest, LeaseStore, OwnLeaseEvent, StoreError};

pub use annotations::{Annotations, PrefixError, DEFAULT_PREFIX};
pub use counter::ApiRequestCounts;
pub use node::NodeStartupInfo;

/// The pure node conversions, for the fuzz targets in `fuzz/` only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use super::node::{annotation_changes, is_managed, node_to_lease, pod_cidrs, startup_info};
}

use counter::{CountLayer, Counters};

/// The RBAC rules flanneld needs (resource, verbs), all in the core API group. The
/// ClusterRole in `deploy/kube-flannel.yml` must grant exactly these.
pub const REQUIRED_RBAC: &[(&str, &[&str])] = &[
    ("pods", &["get"]),
    ("nodes", &["get", "list", "watch"]),
    ("nodes/status", &["patch"]),
];

/// How to reach the API server and which node this is.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `--kube-api-url`; overrides the kubeconfig's server when both are set.
    pub api_url: String,
    /// `--kubeconfig-file`; with `api_url` also empty the in-cluster config is used.
    pub kubeconfig_file: String,
    /// `--net-config-path`.
    pub net_config_path: PathBuf,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// The node's name (env `NODE_NAME`); when unset it is read from the pod
    /// `pod_namespace`/`pod_name` (env `POD_NAMESPACE`/`POD_NAME`).
    pub node_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// `--set-node-network-unavailable`: set the node condition in `complete_lease`.
    pub set_node_network_unavailable: bool,
    /// The first node list must succeed within this time (upstream: 10 min)...
    pub cache_sync_timeout: Duration,
    /// ...unless this is set (env `CONT_WHEN_CACHE_NOT_READY=true`).
    pub continue_when_cache_not_ready: bool,
    /// Server-side duration of one watch request (`timeoutSeconds`); the watch is
    /// then resumed from the last resource version. Must stay below the client's
    /// 295 s read timeout.
    pub watch_timeout: Duration,
    /// How long node reads and annotation patches are retried (upstream: 30 s)...
    pub request_timeout: Duration,
    /// ...and how often (upstream: 3 s).
    pub retry_interval: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            api_url: String::new(),
            kubeconfig_file: String::new(),
            net_config_path: PathBuf::from("/etc/kube-flannel/net-conf.json"),
            annotation_prefix: DEFAULT_PREFIX.to_string(),
            node_name: None,
            pod_namespace: None,
            pod_name: None,
            set_node_network_unavailable: true,
            cache_sync_timeout: Duration::from_secs(600),
            continue_when_cache_not_ready: false,
            watch_timeout: Duration::from_secs(290),
            request_timeout: Duration::from_secs(30),
            retry_interval: Duration::from_secs(3),
        }
    }
}

impl KubeOptions {
    /// Fills the fields upstream takes from the environment: `NODE_NAME`,
    /// `POD_NAMESPACE`, `POD_NAME`, `CONT_WHEN_CACHE_NOT_READY`.
    pub fn with_env(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        self.node_name = self.node_name.or_else(|| var("NODE_NAME"));
        self.pod_namespace = self.pod_namespace.or_else(|| var("POD_NAMESPACE"));
        self.pod_name = self.pod_name.or_else(|| var("POD_NAME"));
        if var("CONT_WHEN_CACHE_NOT_READY").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            self.continue_when_cache_not_ready = true;
        }
        self
    }
}

/// Why the Kubernetes subnet manager cannot work. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read the network config {path}: {source}. In Kubernetes mode flanneld reads net-conf.json from --net-config-path: mount the net-conf.json key of the kube-flannel-cfg ConfigMap there (deploy/kube-flannel.yml mounts it at /etc/kube-flannel/net-conf.json)")]
    NetConfUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("network config {path}: {source}")]
    NetConf { path: PathBuf, source: ConfigError },
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    #[error("cannot tell which node this is: set NODE_NAME (e.g. from the downward API field spec.nodeName), or POD_NAMESPACE and POD_NAME so the node can be read from this pod")]
    NoNodeName,
    #[error(
        "pod {namespace}/{name} has no spec.nodeName (is it scheduled?); set NODE_NAME instead"
    )]
    PodNotScheduled { namespace: String, name: String },
    #[error("Kubernetes client configuration: {0}")]
    ClientConfig(String),
    #[error("permission denied: flanneld needs RBAC permission to {verb} {resource} (for {what}); grant it in the flannel ClusterRole (see deploy/kube-flannel.yml: pods get; nodes get, list, watch; nodes/status patch). The API server said: {message}")]
    Forbidden {
        what: String,
        verb: &'static str,
        resource: &'static str,
        message: String,
    },
    #[error(
        "node {0:?} not found in the Kubernetes API: NODE_NAME must be the node's registered name"
    )]
    NodeNotFound(String),
    #[error("node {node:?} has no pod CIDR assigned (spec.podCIDR and spec.podCIDRs are empty). The Kubernetes subnet manager uses the pod CIDR the controller manager assigns to each node: run kube-controller-manager with --allocate-node-cidrs=true --cluster-cidr={network} (with kubeadm: kubeadm init --pod-network-cidr={network}), or set spec.podCIDR on the node")]
    NoPodCidr { node: String, network: String },
    #[error("node {node:?} has no {family} pod CIDR (spec.podCIDRs: {cidrs:?}) but net-conf.json enables {family}: give kube-controller-manager an {family} --cluster-cidr (dual stack: --cluster-cidr=<v4>,<v6>) or disable {family} in net-conf.json")]
    MissingFamily {
        node: String,
        family: &'static str,
        cidrs: Vec<String>,
    },
    #[error("node {node:?}: {reason}")]
    BadPodCidr { node: String, reason: String },
    #[error("the {field} {network} in net-conf.json does not contain the pod CIDR {cidr} of node {node:?}: the controller manager's --cluster-cidr and net-conf.json must name the same network")]
    OutsideNetwork {
        node: String,
        field: &'static str,
        network: String,
        cidr: String,
    },
    #[error("net-conf.json enables {family} but has no {field}")]
    NoNetwork {
        family: &'static str,
        field: &'static str,
    },
    #[error("Kubernetes API, {what}: {message}")]
    Api { what: String, message: String },
    #[error("the node list could not be read within {timeout:?} (set CONT_WHEN_CACHE_NOT_READY=true to keep waiting instead of exiting); last error: {last}")]
    CacheSyncTimeout { timeout: Duration, last: String },
}

impl From<KubeError> for StoreError {
    fn from(e: KubeError) -> Self {
        match e {
            KubeError::NetConf { source, .. } => StoreError::Config(source),
            KubeError::NodeNotFound(ref node)
            | KubeError::NoPodCidr { ref node, .. }
            | KubeError::MissingFamily { ref node, .. }
            | KubeError::BadPodCidr { ref node, .. }
            | KubeError::OutsideNetwork { ref node, .. } => StoreError::Lease {
                key: format!("node/{node}"),
                reason: e.to_string(),
            },
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// Which request an API error came from, to name the missing permission.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Op {
    pub verb: &'static str,
    pub resource: &'static str,
}

pub(crate) const GET_NODE: Op = Op {
    verb: "get",
    resource: "nodes",
};
pub(crate) const LIST_NODES: Op = Op {
    verb: "list",
    resource: "nodes",
};
pub(crate) const WATCH_NODES: Op = Op {
    verb: "watch",
    resource: "nodes",
};
pub(crate) const PATCH_STATUS: Op = Op {
    verb: "patch",
    resource: "nodes/status",
};
pub(crate) const GET_POD: Op = Op {
    verb: "get",
    resource: "pods",
};

/// A short text for an API error (the client's own Display repeats the Status).
pub(crate) fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

pub(crate) fn api_error(op: Op, what: &str, e: kube::Error) -> KubeError {
    match &e {
        kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden {
            what: what.to_string(),
            verb: op.verb,
            resource: op.resource,
            message: s.message.clone(),
        },
        _ => KubeError::Api {
            what: what.to_string(),
            message: describe(&e),
        },
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether retrying the same request can help (transport trouble, 404 of a node that
/// is still registering, 409, 429, 5xx) rather than a refusal that stays (403, 400,
/// 415, 422).
fn retryable(e: &kube::Error) -> bool {
    match status_code(e) {
        None => true,
        Some(c) => matches!(c, 404 | 409 | 429) || c >= 500,
    }
}

/// What the lease watch knows about the own node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnNode {
    Unknown,
    Present,
    Deleted,
}

/// The Kubernetes lease store.
pub struct KubeStore {
    /// Nodes decoded only as far as flannel reads them (the own node's reads and
    /// patches too: the typed Node's decoder would be most of the binary's serde
    /// code, resident in every agent, for fields nobody reads).
    nodes: Api<lite::NodeLite>,
    node_name: String,
    ann: Annotations,
    config: NetworkConfig,
    opts: KubeOptions,
    counters: Arc<Counters>,
    own: tokio_watch::Sender<OwnNode>,
}

async fn client_config(o: &KubeOptions) -> Result<kube::Config, KubeError> {
    let url = |s: &str| {
        s.parse::<http::Uri>()
            .map_err(|e| KubeError::ClientConfig(format!("--kube-api-url {s:?}: {e}")))
    };
    if !o.kubeconfig_file.is_empty() {
        let kc = kube::config::Kubeconfig::read_from(&o.kubeconfig_file).map_err(|e| {
            KubeError::ClientConfig(format!("--kubeconfig-file {}: {e}", o.kubeconfig_file))
        })?;
        let mut c = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| {
                KubeError::ClientConfig(format!("--kubeconfig-file {}: {e}", o.kubeconfig_file))
            })?;
        if !o.api_url.is_empty() {
            c.cluster_url = url(&o.api_url)?;
        }
        return Ok(c);
    }
    if !o.api_url.is_empty() {
        return Ok(kube::Config::new(url(&o.api_url)?));
    }
    kube::Config::incluster().map_err(|e| {
        KubeError::ClientConfig(format!(
            "no --kube-api-url or --kubeconfig-file given and the in-cluster config is unusable ({e}); outside a pod pass one of them"
        ))
    })
}

fn read_net_conf(o: &KubeOptions) -> Result<NetworkConfig, KubeError> {
    let path = &o.net_config_path;
    let text = std::fs::read_to_string(path).map_err(|source| KubeError::NetConfUnreadable {
        path: path.clone(),
        source,
    })?;
    let config = NetworkConfig::parse(&text).map_err(|source| KubeError::NetConf {
        path: path.clone(),
        source,
    })?;
    let err = |source| KubeError::NetConf {
        path: path.clone(),
        source,
    };
    if !config.enable_ipv4 && !config.enable_ipv6 {
        return Err(err(ConfigError::NoStack));
    }
    if config.enable_ipv4 && config.network.is_none() {
        return Err(err(ConfigError::MissingNetwork("Network", "IPv4")));
    }
    if config.enable_ipv6 && config.ipv6_network.is_none() {
        return Err(err(ConfigError::MissingNetwork("IPv6Network", "IPv6")));
    }
    Ok(config)
}

/// Whole-second RFC 3339 UTC time, as Go's metav1.Time marshals.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match k8s_openapi::jiff::Timestamp::from_second(secs) {
        Ok(t) => t.to_string(),
        Err(_) => "1970-01-01T00:00:00Z".to_string(),
    }
}

impl KubeStore {
    /// Validates the prefix, reads net-conf.json, builds the API client and finds the
    /// node's name (reading the pod when `NODE_NAME` is not given).
    pub async fn new(opts: KubeOptions) -> Result<Self, KubeError> {
        let ann = Annotations::new(&opts.annotation_prefix)?;
        let config = read_net_conf(&opts)?;
        let counters = Arc::new(Counters::default());
        let client_cfg = client_config(&opts).await?;
        let client = kube::client::ClientBuilder::try_from(client_cfg)
            .map_err(|e| KubeError::ClientConfig(e.to_string()))?
            .with_layer(&CountLayer(counters.clone()))
            .build();
        let node_name = match &opts.node_name {
            Some(n) => n.clone(),
            None => Self::node_from_pod(&client, &opts).await?,
        };
        let (own, _) = tokio_watch::channel(OwnNode::Unknown);
        tracing::info!(
            node = %node_name,
            prefix = %ann.prefix,
            "Kubernetes subnet manager for node {node_name}"
        );
        Ok(KubeStore {
            nodes: Api::all(client),
            node_name,
            ann,
            config,
            opts,
            counters,
            own,
        })
    }

    async fn node_from_pod(client: &Client, o: &KubeOptions) -> Result<String, KubeError> {
        let (Some(ns), Some(name)) = (&o.pod_namespace, &o.pod_name) else {
            return Err(KubeError::NoNodeName);
        };
        let pods: Api<lite::PodLite> = Api::namespaced(client.clone(), ns);
        let what = format!("reading pod {ns}/{name} to find the node name");
        let pod = pods
            .get(name)
            .await
            .map_err(|e| api_error(GET_POD, &what, e))?;
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| KubeError::PodNotScheduled {
                namespace: ns.clone(),
                name: name.clone(),
            })
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn annotations(&self) -> &Annotations {
        &self.ann
    }

    /// Requests sent to the API server so far, by kind.
    pub fn api_requests(&self) -> ApiRequestCounts {
        self.counters.snapshot()
    }

    /// Reads the own node, retrying transient failures for `request_timeout`.
    async fn own_node(&self, what: &str) -> Result<lite::NodeLite, KubeError> {
        let deadline = Instant::now() + self.opts.request_timeout;
        loop {
            match self.nodes.get(&self.node_name).await {
                Ok(n) => return Ok(n),
                Err(e) if retryable(&e) && Instant::now() < deadline => {
                    tracing::warn!(
                        "{what}: reading node {}: {}; retrying",
                        self.node_name,
                        describe(&e)
                    );
                    tokio::time::sleep(self.opts.retry_interval).await;
                }
                Err(e) if status_code(&e) == Some(404) => {
                    return Err(KubeError::NodeNotFound(self.node_name.clone()))
                }
                Err(e) => return Err(api_error(GET_NODE, what, e)),
            }
        }
    }

    /// Patches the own node's status subresource (strategic merge), retrying
    /// transient failures every `retry_interval` for `request_timeout`.
    async fn patch_status(&self, body: serde_json::Value, what: &str) -> Result<(), KubeError> {
        let deadline = Instant::now() + self.opts.request_timeout;
        let params = PatchParams::default();
        loop {
            match self
                .nodes
                .patch_status(&self.node_name, &params, &Patch::Strategic(&body))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if retryable(&e) && Instant::now() < deadline => {
                    tracing::warn!("{what}: {}; retrying", describe(&e));
                    tokio::time::sleep(self.opts.retry_interval).await;
                }
                Err(e) if status_code(&e) == Some(404) => {
                    return Err(KubeError::NodeNotFound(self.node_name.clone()))
                }
                Err(e) => return Err(api_error(PATCH_STATUS, what, e)),
            }
        }
    }

    /// The own node's VTEP MACs from a previous run and its `node-public-ip(v6)`
    /// overrides. Call before the backend registers (vxlan reuses the MAC when it
    /// creates its device) and before choosing the public IP.
    pub async fn startup_info(&self) -> Result<NodeStartupInfo, KubeError> {
        let n = self
            .own_node("reading the node's previous annotations")
            .await?;
        Ok(node::startup_info(&n, &self.ann))
    }

    /// The IPv4 VTEP MAC the own node published last time, if any.
    pub async fn previous_vtep_mac(&self) -> Result<Option<MacAddr>, KubeError> {
        Ok(self.startup_info().await?.vtep_mac)
    }

    /// Sets the node condition `NetworkUnavailable=False` (reason `FlannelIsUp`).
    pub async fn set_network_available(&self) -> Result<(), KubeError> {
        let body = node::network_available_patch(&now_rfc3339());
        self.patch_status(body, "setting the NetworkUnavailable condition")
            .await?;
        tracing::info!("node condition NetworkUnavailable=False set");
        Ok(())
    }

    async fn acquire_inner(
        &self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, KubeError> {
        let node = self.own_node("acquiring the lease").await?;
        let name = self.node_name.clone();
        let cidrs = node::pod_cidrs(&node).map_err(|reason| KubeError::BadPodCidr {
            node: name.clone(),
            reason,
        })?;
        if cidrs.raw.is_empty() {
            let network = [
                config.network.map(|n| n.to_string()),
                config.ipv6_network.map(|n| n.to_string()),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(",");
            return Err(KubeError::NoPodCidr {
                node: name,
                network,
            });
        }
        let mut key = LeaseKey::v4(Ipv4Net::default());
        if config.enable_ipv4 {
            let v4 = cidrs.v4.ok_or_else(|| KubeError::MissingFamily {
                node: name.clone(),
                family: "IPv4",
                cidrs: cidrs.raw.clone(),
            })?;
            let net = config.network.ok_or(KubeError::NoNetwork {
                family: "IPv4",
                field: "Network",
            })?;
            if !net.contains(&v4) {
                return Err(KubeError::OutsideNetwork {
                    node: name,
                    field: "Network",
                    network: net.to_string(),
                    cidr: v4.to_string(),
                });
            }
            key.v4 = v4;
        }
        if config.enable_ipv6 {
            let v6 = cidrs.v6.ok_or_else(|| KubeError::MissingFamily {
                node: name.clone(),
                family: "IPv6",
                cidrs: cidrs.raw.clone(),
            })?;
            let net = config.ipv6_network.ok_or(KubeError::NoNetwork {
                family: "IPv6",
                field: "IPv6Network",
            })?;
            if !net.contains(&v6) {
                return Err(KubeError::OutsideNetwork {
                    node: name,
                    field: "IPv6Network",
                    network: net.to_string(),
                    cidr: v6.to_string(),
                });
            }
            key.v6 = Some(v6);
        }
        let changes = node::annotation_changes(&node, &req.attrs, &self.ann);
        if changes.is_empty() {
            tracing::info!("node annotations already publish lease {key}");
        } else {
            tracing::info!(
                "publishing lease {key} on node {}: {:?}",
                self.node_name,
                changes.keys().collect::<Vec<_>>()
            );
            self.patch_status(
                node::annotations_patch(&changes),
                "publishing the lease annotations",
            )
            .await?;
        }
        self.own.send_replace(OwnNode::Present);
        Ok(Lease {
            key,
            attrs: req.attrs.clone().into(),
            expiration: None,
        })
    }
}

#[async_trait]
impl LeaseStore for KubeStore {
    async fn network_config(&self) -> Result<NetworkConfig, StoreError> {
        Ok(self.config.clone())
    }

    async fn acquire(
        &self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, StoreError> {
        Ok(self.acquire_inner(config, req).await?)
    }

    /// Node annotations carry no TTL: nothing to renew.
    async fn renew(&self, lease: &Lease) -> Result<Lease, StoreError> {
        Ok(lease.clone())
    }

    async fn watch_leases(
        &self,
        own: LeaseKey,
        tx: mpsc::Sender<LeaseUpdate>,
    ) -> Result<(), StoreError> {
        Ok(watch::run(self, own, tx).await?)
    }

    /// Fires `Revoked` when the lease watch sees the own node deleted; relies on
    /// [`watch_leases`](LeaseStore::watch_leases) running (no second watch is opened).
    async fn watch_own_lease(
        &self,
        _lease: &Lease,
        tx: mpsc::Sender<OwnLeaseEvent>,
    ) -> Result<(), StoreError> {
        let mut rx = self.own.subscribe();
        tokio::select! {
            _ = tx.closed() => Ok(()),
            deleted = async { rx.wait_for(|s| *s == OwnNode::Deleted).await.is_ok() } => {
                if deleted {
                    tracing::warn!("node {} was deleted: lease revoked", self.node_name);
                    let _ = tx.send(OwnLeaseEvent::Revoked).await;
                }
                Ok(())
            }
        }
    }

    async fn complete_lease(&self, _lease: &Lease) -> Result<(), StoreError> {
        if self.opts.set_node_network_unavailable {
            self.set_network_available().await?;
        }
        Ok(())
    }
}
