//! The etcd v3 lease store, with flannel's key layout and values
//! (docs/compatibility.md, "etcd keys and lease values").
//!
//! ```text
//! <prefix>/config                 network config JSON ("Network configuration")
//! <prefix>/subnets/10.5.52.0-24   {"PublicIP":"…","PublicIPv6":null,"BackendType":…}
//! ```
//! Every lease write grants a fresh 24 h etcd lease; keys without one are
//! reservations and stay without one.

mod acquire;
pub mod keys;
mod ops;
mod retry;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, WatchClient};
use flannel_core::{Lease, LeaseKey, LeaseUpdate, NetworkConfig};
use tokio::sync::{mpsc, watch as health_watch};

pub use acquire::MAX_CREATE_ATTEMPTS;
pub use keys::{KeyLayout, DEFAULT_PREFIX};
pub use ops::LEASE_TTL_SECS;

use crate::{AcquireRequest, LeaseStore, OwnLeaseEvent, StoreError};
use ops::Ops;
use retry::DistinctErrors;

/// How often a missing or broken network config is read again.
pub const CONFIG_RETRY: Duration = Duration::from_secs(1);
/// Deadline of one config read (short, so the one-second retry rhythm holds while
/// etcd is unreachable).
const CONFIG_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Watch responses of large clusters (thousands of leases changed by one
/// transaction) exceed gRPC's 4 MiB default.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// How to reach etcd (the `--etcd-*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix (`--etcd-prefix`), joined like a path.
    pub prefix: String,
    /// CA bundle to verify etcd with (system roots when unset).
    pub cafile: Option<PathBuf>,
    /// Client certificate; TLS is used only when both it and `keyfile` are set.
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec![
                "http://127.0.0.1:2379".to_string(),
                "http://127.0.0.1:4001".to_string(),
            ],
            prefix: DEFAULT_PREFIX.to_string(),
            cafile: None,
            certfile: None,
            keyfile: None,
            username: None,
            password: None,
        }
    }
}

/// State of the lease watch, for the daemon's health reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchHealth {
    /// No lease watch has been established yet.
    Starting,
    /// The lease watch is live.
    Watching,
    /// The lease watch is broken and being re-established; the last known leases
    /// stay in force meanwhile.
    Reconnecting { error: String },
}

/// A [`LeaseStore`] on etcd v3.
pub struct EtcdStore {
    ops: Ops,
    watch: WatchClient,
    keys: KeyLayout,
    health: health_watch::Sender<WatchHealth>,
    /// The listing the last acquisition decided from, for the lease watch to start
    /// from (one listing of every lease fewer at start; the watch then replays
    /// what changed since, including our own write).
    primed: std::sync::Mutex<Option<acquire::Listing>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn read_file(flag: &str, path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot read {flag} {}: {e}", path.display())))
}

impl EtcdStore {
    /// Builds the client. Without credentials this does not contact etcd (the
    /// first request does); with a username it logs in and keeps retrying every
    /// second while etcd is unreachable.
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let (Some(cert), Some(key)) = (&opts.certfile, &opts.keyfile) {
            let identity = Identity::from_pem(
                read_file("--etcd-certfile", cert)?,
                read_file("--etcd-keyfile", key)?,
            );
            let mut tls = TlsOptions::new().identity(identity);
            tls = match &opts.cafile {
                Some(ca) => {
                    tls.ca_certificate(Certificate::from_pem(read_file("--etcd-cafile", ca)?))
                }
                None => tls.with_native_roots(),
            };
            co = co.with_tls(tls);
        }
        if let Some(user) = opts.username.as_deref().filter(|u| !u.is_empty()) {
            // etcd's auth tokens expire (simple tokens after 5 minutes idle); a
            // long-running agent must log in again by itself.
            co = co
                .with_user(user, opts.password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }
        let client = connect_client(&opts.endpoints, co).await?;
        let (health, _) = health_watch::channel(WatchHealth::Starting);
        Ok(EtcdStore {
            ops: Ops {
                kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                lease: client.lease_client(),
            },
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            keys: KeyLayout::new(&opts.prefix),
            health,
            primed: std::sync::Mutex::new(None),
        })
    }

    /// The keys this store reads and writes.
    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    /// Follows the state of the lease watch.
    pub fn watch_health(&self) -> health_watch::Receiver<WatchHealth> {
        self.health.subscribe()
    }

    async fn read_config(&self) -> Result<NetworkConfig, ConfigRead> {
        let key = &self.keys.config;
        let resp = self
            .ops
            .get(key, false, CONFIG_READ_TIMEOUT)
            .await
            .map_err(|e| {
                ConfigRead::Unavailable(match e {
                    StoreError::Unavailable(m) => m,
                    e => e.to_string(),
                })
            })?;
        let kv = resp.kvs().first().ok_or_else(|| {
            ConfigRead::Invalid(format!(
                "{key} does not exist in etcd; write the network config there, e.g. \
                 {{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}"
            ))
        })?;
        let text = std::str::from_utf8(kv.value())
            .map_err(|_| ConfigRead::Invalid(format!("{key}: the value is not UTF-8 text")))?;
        let config = NetworkConfig::parse_and_validate(text).map_err(|e| {
            let e = e.to_string();
            let e = e.strip_prefix("network config: ").unwrap_or(&e);
            ConfigRead::Invalid(format!("{key}: {e}"))
        })?;
        if !config.enable_ipv4 {
            return Err(ConfigRead::Fatal(acquire::unsupported_ipv6_only()));
        }
        Ok(config)
    }
}

enum ConfigRead {
    Unavailable(String),
    Invalid(String),
    Fatal(StoreError),
}

/// etcd-client logs in while connecting when credentials are set; only bad
/// credentials are final, an unreachable etcd is waited for.
async fn connect_client(endpoints: &[String], co: ConnectOptions) -> Result<Client, StoreError> {
    let mut errors = DistinctErrors::new("connecting to etcd");
    loop {
        let attempt = Client::connect(endpoints, Some(co.clone()));
        let Ok(result) = tokio::time::timeout(ops::REQUEST_TIMEOUT, attempt).await else {
            errors.warn("no answer to the login request");
            tokio::time::sleep(CONFIG_RETRY).await;
            continue;
        };
        match result {
            Ok(c) => {
                errors.recovered();
                return Ok(c);
            }
            Err(e @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_))) => {
                return Err(StoreError::Unavailable(format!("etcd client: {e}")));
            }
            // InvalidArgument / Unauthenticated / PermissionDenied: wrong credentials.
            Err(etcd_client::Error::GRpcStatus(s)) if matches!(s.code() as i32, 3 | 7 | 16) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd refused the login: {}",
                    s.message()
                )));
            }
            Err(e) => errors.warn(&e.to_string()),
        }
        tokio::time::sleep(CONFIG_RETRY).await;
    }
}

#[async_trait]
impl LeaseStore for EtcdStore {
    /// Reads `<prefix>/config` every second until it holds a valid config; each
    /// distinct failure is logged once. An IPv6-only config is a fatal
    /// [`StoreError::Unsupported`].
    async fn network_config(&self) -> Result<NetworkConfig, StoreError> {
        let mut errors = DistinctErrors::new("network config");
        loop {
            match self.read_config().await {
                Ok(c) => {
                    errors.recovered();
                    return Ok(c);
                }
                Err(ConfigRead::Fatal(e)) => return Err(e),
                Err(ConfigRead::Unavailable(e)) => errors.warn(&e),
                Err(ConfigRead::Invalid(e)) => errors.error(&e),
            }
            tokio::time::sleep(CONFIG_RETRY).await;
        }
    }

    /// As in docs/compatibility.md, "Lease acquisition and renewal": reuse by public IP,
    /// else the previous subnet, else a random free
    /// one; a lost creation race is retried (up to [`MAX_CREATE_ATTEMPTS`] picks).
    async fn acquire(
        &self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, StoreError> {
        let (lease, listing) = acquire::acquire(&self.ops, &self.keys, config, req).await?;
        if let Ok(mut p) = self.primed.lock() {
            *p = Some(listing);
        }
        Ok(lease)
    }

    /// New 24 h etcd lease and a put with the same value; a reservation (no
    /// expiry) is put again without an etcd lease.
    async fn renew(&self, lease: &Lease) -> Result<Lease, StoreError> {
        acquire::renew(&self.ops, &self.keys, lease).await
    }

    /// Listing at revision R (sent as `Full`), then a watch from R+1 on
    /// `<prefix>/subnets/`; every event of a response goes into one `Events` update.
    /// Broken streams reconnect with backoff (100 ms doubling to 5 s), compacted
    /// history forces a new listing diffed into events. Returns only when `tx` closes.
    async fn watch_leases(
        &self,
        own: LeaseKey,
        tx: mpsc::Sender<LeaseUpdate>,
    ) -> Result<(), StoreError> {
        let primed = self.primed.lock().ok().and_then(|mut p| p.take());
        watch::watch_leases(
            &self.ops,
            &self.watch,
            &self.keys,
            &self.health,
            own,
            primed,
            tx,
        )
        .await
    }

    /// Watches exactly this host's key. The first event reports the lease as it
    /// is now (`Renewed`, or `Revoked` if the key is already gone); then every put
    /// is `Renewed` with the expiry etcd reports, and a delete or expiry is
    /// `Revoked`, after which the watch ends.
    async fn watch_own_lease(
        &self,
        lease: &Lease,
        tx: mpsc::Sender<OwnLeaseEvent>,
    ) -> Result<(), StoreError> {
        watch::watch_own_lease(&self.ops, &self.watch, &self.keys, lease, tx).await
    }
}
