//! A fake Kubernetes API server for nodes and pods, good enough to run flannel's
//! Kubernetes subnet manager against: real URL paths and JSON shapes (k8s-openapi
//! types), resource versions, list pagination, `watch=true` streams with bookmarks and
//! `410 Gone` for expired resource versions, strategic-merge / merge / JSON patches of
//! `nodes/<name>/status`, and `403 Forbidden` for verbs a test denies.
//!
//! It keeps the real server's rules where a client could tell the difference: unknown
//! patch content types get 415, malformed bodies 400, missing objects 404, invalid
//! annotation keys 422, resource-version preconditions 409, and a no-op write does not
//! bump the resource version or emit a watch event. What it does not do: auth, other
//! resources, server-side apply, field managers, admission.
//!
//! Tests drive it in-process ([`FakeApiServer::start`] and the methods on it); the
//! `flannel-kube-fake` binary serves the same thing plus a small control API under
//! `/fake/v1/` for tests in other processes.

#![forbid(unsafe_code)]

mod patch;
pub mod population;
mod server;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use patch::{merge_patch, strategic_merge, PatchError};
pub use store::{FakeError, RequestRecord, Traffic};

use store::Shared;

/// Knobs of the fake server.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// How often a watch that asked for bookmarks gets one (the real server: ~1 min).
    pub bookmark_interval: Duration,
    /// Watch events kept for resuming watches; older resource versions get 410 Gone.
    pub history: usize,
    /// Watch duration when the client sends no `timeoutSeconds` (the real server picks
    /// 30–60 min).
    pub default_watch_timeout: Duration,
    /// Where the nodes and pods are loaded from at start and saved to after each write.
    pub state_file: Option<PathBuf>,
    /// The user named in 403 messages.
    pub user: String,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            bookmark_interval: Duration::from_secs(60),
            history: 1000,
            default_watch_timeout: Duration::from_secs(1800),
            state_file: None,
            user: "system:serviceaccount:kube-flannel:flannel".into(),
        }
    }
}

/// A running fake API server. Dropping it stops the server.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts serving on `listen` (use `127.0.0.1:0` for a free port).
    pub async fn start(listen: SocketAddr, opts: FakeOptions) -> Result<Self, FakeError> {
        let shared = Arc::new(Shared::new(opts)?);
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| FakeError::Io(format!("binding {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| FakeError::Io(e.to_string()))?;
        let (tx, rx) = oneshot::channel::<()>();
        let app = server::router(shared.clone());
        let task = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = rx.await;
            });
            if let Err(e) = serve.await {
                tracing::warn!("fake API server stopped: {e}");
            }
        });
        Ok(FakeApiServer {
            addr,
            shared,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Starts on 127.0.0.1 with a free port and default options.
    pub async fn start_local() -> Result<Self, FakeError> {
        Self::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            FakeOptions::default(),
        )
        .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for `--kube-api-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a node (fails if it exists).
    pub fn create_node(&self, node: Node) -> Result<Node, FakeError> {
        self.shared.create_node(node)
    }

    /// Replaces a node's spec, status and metadata (keeps uid and creation time).
    pub fn replace_node(&self, node: Node) -> Result<Node, FakeError> {
        self.shared.replace_node(node)
    }

    /// Reads a node, changes it with `f` and writes it back.
    pub fn modify_node(&self, name: &str, f: impl FnOnce(&mut Node)) -> Result<Node, FakeError> {
        let mut n = self.node(name).ok_or_else(|| FakeError::NotFound {
            kind: "nodes",
            name: name.to_string(),
        })?;
        f(&mut n);
        self.shared.replace_node(n)
    }

    pub fn delete_node(&self, name: &str) -> Result<Node, FakeError> {
        self.shared.delete_node(name)
    }

    pub fn node(&self, name: &str) -> Option<Node> {
        self.shared.node(name)
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.shared.nodes()
    }

    pub fn create_pod(&self, pod: Pod) -> Result<Pod, FakeError> {
        self.shared.create_pod(pod)
    }

    /// Makes every request with `verb` on `resource` (`nodes`, `nodes/status`, `pods`)
    /// fail with 403 Forbidden, as a missing RBAC rule would.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared.deny(verb, resource);
    }

    /// Lifts every [`deny`](Self::deny).
    pub fn allow_all(&self) {
        self.shared.allow_all();
    }

    /// Forgets the watch history: resuming a watch from any resource version issued so
    /// far gets 410 Gone (as after an etcd compaction).
    pub fn compact(&self) {
        self.shared.compact();
    }

    /// Ends every open watch without an error, as a server-side watch timeout does.
    pub fn close_watches(&self) {
        self.shared.close_watches();
    }

    /// Compacts and sends every open watch an ERROR event with a 410 Status, then
    /// closes it (what a client sees when the server drops it as too far behind).
    pub fn expire_watches(&self) {
        self.shared.expire_watches();
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches()
    }

    /// What the server sent each API client so far, by client address.
    pub fn traffic(&self) -> std::collections::BTreeMap<std::net::IpAddr, Traffic> {
        self.shared.traffic()
    }

    /// Adds `count` nodes as a flannel cluster of that size has them
    /// ([`population::realistic_node`], named `<name_prefix>00000`...), each
    /// already annotated by its flanneld with annotation prefix `ann_prefix`.
    pub fn populate(
        &self,
        count: usize,
        name_prefix: &str,
        ann_prefix: &str,
    ) -> Result<(), FakeError> {
        self.shared.populate(count, name_prefix, ann_prefix)
    }

    /// One kubelet status update of node `name` (heartbeats at `now`); false when
    /// nothing changed (node gone, no kubelet conditions, same time).
    pub fn heartbeat_node(&self, name: &str, now: &str) -> bool {
        self.shared.heartbeat_node(name, now)
    }

    /// Rewrites every node's status once per `period`, spread evenly over it, as
    /// kubelets with node leases off do (nodeStatusUpdateFrequency 10 s), until the
    /// server stops. Nodes added later are included from the next round on.
    pub fn start_status_churn(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Batches every 50 ms: one timer per node would cost more than the writes.
            // Node k of a round is due at k/N of the period into it.
            let tick = Duration::from_millis(50);
            let mut ticker = tokio::time::interval(tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let names = shared.node_names();
                let round = tokio::time::Instant::now();
                let mut done = 0;
                while done < names.len() {
                    ticker.tick().await;
                    let into = round.elapsed().as_secs_f64() / period.as_secs_f64();
                    let due = ((into * names.len() as f64).ceil() as usize).min(names.len());
                    let now = now_rfc3339();
                    for n in &names[done..due.max(done)] {
                        shared.heartbeat_node(n, &now);
                    }
                    done = due.max(done);
                }
                tokio::time::sleep_until(round + period).await;
            }
        })
    }

    /// Every API request served so far (control calls excluded).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests()
    }

    /// The latest resource version issued.
    pub fn resource_version(&self) -> u64 {
        self.shared.resource_version()
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    fn stop(&mut self) {
        self.shared.close_watches();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Whole-second RFC 3339 UTC time, as metav1.Time marshals.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A node as `kubelet` registers it and the controller manager assigns it a pod CIDR.
pub fn node(name: &str, pod_cidrs: &[&str]) -> Node {
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().map(|s| s.to_string()),
            pod_cidrs: if pod_cidrs.is_empty() {
                None
            } else {
                Some(pod_cidrs.iter().map(|s| s.to_string()).collect())
            },
            ..Default::default()
        }),
        status: None,
    }
}
