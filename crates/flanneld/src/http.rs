//! Health, readiness and metrics over HTTP (`--healthz-ip`/`--healthz-port`;
//! docs/compatibility.md, "Health endpoint" and "Readiness reasons and metrics"):
//! `/healthz` → 200 `flanneld is running`; `/readyz` → 200 `flanneld is ready`, or 503
//! `flanneld is not ready yet: <what is missing>`; `/metrics` → OpenMetrics text.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::{Metrics, CONTENT_TYPE};

/// What the agent has done towards serving traffic; ready when every flag is set.
#[derive(Debug, Default)]
pub struct Readiness {
    lease: AtomicBool,
    subnet_file: AtomicBool,
    backend: AtomicBool,
    rules: AtomicBool,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// The node holds its subnet lease.
    pub fn set_lease_held(&self, v: bool) {
        self.lease.store(v, Ordering::Relaxed);
    }

    /// subnet.env was written.
    pub fn set_subnet_file_written(&self, v: bool) {
        self.subnet_file.store(v, Ordering::Relaxed);
    }

    /// The backend registered and runs.
    pub fn set_backend_ready(&self, v: bool) {
        self.backend.store(v, Ordering::Relaxed);
    }

    /// Masquerade/forward rules are in place (set it at start when none are wanted).
    pub fn set_rules_in_place(&self, v: bool) {
        self.rules.store(v, Ordering::Relaxed);
    }

    /// What is still missing, in startup order; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        [
            (&self.lease, "subnet lease not held"),
            (&self.backend, "backend not ready"),
            (&self.rules, "traffic rules not in place"),
            (&self.subnet_file, "subnet file not written"),
        ]
        .into_iter()
        .filter(|(flag, _)| !flag.load(Ordering::Relaxed))
        .map(|(_, what)| what)
        .collect()
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
}

/// The routes, for embedding or testing.
pub fn router(readiness: Arc<Readiness>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(AppState { readiness, metrics })
}

/// Serve on an already bound listener (e.g. `127.0.0.1:0` in tests) until `shutdown`
/// completes; connections in flight are finished first.
pub async fn serve_listener(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(readiness, metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "flanneld is running"
}

async fn readyz(State(st): State<AppState>) -> (StatusCode, String) {
    let missing = st.readiness.missing();
    if missing.is_empty() {
        (StatusCode::OK, "flanneld is ready".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("flanneld is not ready yet: {}", missing.join(", ")),
        )
    }
}

async fn metrics_page(State(st): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], st.metrics.encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A plain HTTP/1.1 GET; returns (status, headers, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let text = String::from_utf8(buf).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("header end");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        (status, head.to_string(), body.to_string())
    }

    struct Server {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(r: Arc<Readiness>, m: Arc<Metrics>) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve_listener(l, r, m, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task,
        }
    }

    #[tokio::test]
    async fn healthz_and_unknown_paths() {
        let srv = start(Arc::new(Readiness::new()), Arc::new(Metrics::new())).await;
        let (status, _, body) = get(srv.addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "flanneld is running"));
        let (status, _, _) = get(srv.addr, "/nope").await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn readyz_lists_what_is_missing_until_ready() {
        let r = Arc::new(Readiness::new());
        let srv = start(r.clone(), Arc::new(Metrics::new())).await;
        let (status, _, body) = get(srv.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "flanneld is not ready yet: subnet lease not held, backend not ready, traffic rules not in place, subnet file not written"
        );
        r.set_lease_held(true);
        r.set_backend_ready(true);
        r.set_rules_in_place(true);
        let (status, _, body) = get(srv.addr, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "flanneld is not ready yet: subnet file not written")
        );
        r.set_subnet_file_written(true);
        let (status, _, body) = get(srv.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "flanneld is ready"));
        // Losing the lease makes it unready again.
        r.set_lease_held(false);
        let (status, _, _) = get(srv.addr, "/readyz").await;
        assert_eq!(status, 503);
    }

    #[tokio::test]
    async fn metrics_page_parses_and_follows_updates() {
        let m = Arc::new(Metrics::new());
        let mut srv = start(Arc::new(Readiness::new()), m.clone()).await;
        let scrape = |body: String| {
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parse")
        };
        let peers = |s: &prometheus_parse::Scrape| {
            s.samples
                .iter()
                .find(|x| x.metric == "flanneld_peers")
                .map(|x| match x.value {
                    prometheus_parse::Value::Gauge(v) => v,
                    _ => f64::NAN,
                })
        };
        let (status, head, body) = get(srv.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        let s = scrape(body);
        assert_eq!(peers(&s), Some(0.0));
        m.set_peers(7);
        m.lease_event(crate::metrics::LeaseEventKind::Added);
        m.observe_kernel_apply("rules", std::time::Duration::from_millis(2));
        m.reconcile_error("rules");
        m.set_packet_source(
            "udp",
            Arc::new(|| flannel_backend::PacketStats {
                tx_packets: 1,
                tx_bytes: 10,
                drops: vec![("no_route", 1)],
                ..Default::default()
            }),
        );
        let (_, _, body) = get(srv.addr, "/metrics").await;
        let s = scrape(body);
        assert_eq!(peers(&s), Some(7.0));
        // Every family is on the page, with its HELP text.
        for f in m.families() {
            assert!(s.docs.contains_key(*f), "{f} missing: {:?}", s.docs.keys());
        }
        assert!(s
            .samples
            .iter()
            .any(|x| x.metric == "flanneld_lease_events_total"
                && x.labels.get("kind") == Some("added")));

        // Shutdown ends the server.
        srv.stop.take().map(|tx| tx.send(()));
        tokio::time::timeout(std::time::Duration::from_secs(60), &mut srv.task)
            .await
            .expect("server stops")
            .expect("join")
            .expect("serve");
    }
}
