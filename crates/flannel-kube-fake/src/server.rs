//! HTTP routes: the core/v1 node and pod endpoints, plus `/fake/v1/` control calls.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::store::{
    selected_event, ClientCounters, FakeError, ListParams, RequestRecord, Selectors, Shared,
    WatchMsg, WatchStart,
};

type Q = Query<HashMap<String, String>>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/nodes", get(list_nodes).post(create_node))
        .route(
            "/api/v1/nodes/{name}",
            get(get_node)
                .put(put_node)
                .patch(patch_node)
                .delete(delete_node),
        )
        .route(
            "/api/v1/nodes/{name}/status",
            get(get_node_status).patch(patch_node_status),
        )
        .route("/api/v1/namespaces/{ns}/pods", post(create_pod))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            get(get_pod).delete(delete_pod),
        )
        .route("/version", get(version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/fake/v1/deny", post(ctl_deny).delete(ctl_allow))
        .route("/fake/v1/compact", post(ctl_compact))
        .route("/fake/v1/expire-watches", post(ctl_expire))
        .route("/fake/v1/close-watches", post(ctl_close))
        .route("/fake/v1/requests", get(ctl_requests))
        .route("/fake/v1/traffic", get(ctl_traffic))
        .route("/fake/v1/realistic-node", post(ctl_realistic_node))
        .route("/fake/v1/populate", post(ctl_populate))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .with_state(shared)
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error_response(e: FakeError) -> Response {
    let code = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.status())
}

fn result(code: StatusCode, r: Result<Value, FakeError>) -> Response {
    match r {
        Ok(v) => json_response(code, &v),
        Err(e) => error_response(e),
    }
}

async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the server could not find the requested resource",
            "reason": "NotFound", "details": {}, "code": 404
        }),
    )
}

fn verb_of(method: &Method, path: &str, query: &str) -> &'static str {
    let collection = path == "/api/v1/nodes" || path.ends_with("/pods");
    let watching = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    match *method {
        Method::GET if watching => "watch",
        Method::GET if collection => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
}

/// Records every API request (with the status it got) for tests to count, and what
/// each client (by address) was sent.
async fn record(State(shared): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| shared.client(c.0.ip()));
    if let Some(c) = &client {
        req.extensions_mut().insert(c.clone());
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let resp = next.run(req).await;
    if !path.starts_with("/fake/") && path != "/healthz" {
        let verb = verb_of(&method, &path, &query);
        let resp = match client {
            Some(c) => {
                c.request(verb);
                let (parts, body) = resp.into_parts();
                let counted = body.into_data_stream().inspect(move |chunk| {
                    if let Ok(b) = chunk {
                        c.sent(b.len());
                    }
                });
                Response::from_parts(parts, Body::from_stream(counted))
            }
            None => resp,
        };
        shared.record(RequestRecord {
            verb: verb.to_string(),
            method: method.to_string(),
            path,
            query,
            content_type,
            status: resp.status().as_u16(),
        });
        return resp;
    }
    resp
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-flannel-kube-fake",
            "platform": "linux/amd64"
        }),
    )
}

fn param<'a>(q: &'a HashMap<String, String>, k: &str) -> Option<&'a str> {
    q.get(k).map(String::as_str)
}

fn is_true(v: Option<&str>) -> bool {
    matches!(v, Some("true") | Some("1"))
}

async fn list_nodes(
    State(shared): State<Arc<Shared>>,
    client: Option<Extension<Arc<ClientCounters>>>,
    Query(q): Q,
) -> Response {
    let watching = is_true(param(&q, "watch"));
    let verb = if watching { "watch" } else { "list" };
    if let Err(e) = shared.authorize(verb, "nodes", None, None) {
        return error_response(e);
    }
    let selectors = match Selectors::parse(param(&q, "fieldSelector"), param(&q, "labelSelector")) {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    if watching {
        return watch_nodes(shared, &q, selectors, client.map(|c| c.0));
    }
    let limit = match param(&q, "limit").filter(|l| !l.is_empty()) {
        None => None,
        Some(l) => match l.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(FakeError::BadRequest(format!(
                    "limit: Invalid value: {l:?}"
                )))
            }
        },
    };
    let p = ListParams {
        resource_version: param(&q, "resourceVersion").map(String::from),
        resource_version_match: param(&q, "resourceVersionMatch")
            .filter(|s| !s.is_empty())
            .map(String::from),
        limit,
        continue_token: param(&q, "continue").map(String::from),
        selectors,
    };
    result(StatusCode::OK, shared.list_nodes(&p))
}

fn watch_nodes(
    shared: Arc<Shared>,
    q: &HashMap<String, String>,
    selectors: Selectors,
    client: Option<Arc<ClientCounters>>,
) -> Response {
    if is_true(param(q, "sendInitialEvents")) {
        return error_response(FakeError::BadRequest(
            "this fake API server does not implement streaming lists (sendInitialEvents)".into(),
        ));
    }
    let timeout = match param(q, "timeoutSeconds").filter(|t| !t.is_empty()) {
        None => shared.opts.default_watch_timeout,
        Some(t) => match t.parse::<u64>() {
            Ok(s) => Duration::from_secs(s),
            Err(_) => {
                return error_response(FakeError::BadRequest(format!(
                    "timeoutSeconds: Invalid value: {t:?}"
                )))
            }
        },
    };
    let bookmarks = is_true(param(q, "allowWatchBookmarks"));
    let start = match shared.watch_nodes(param(q, "resourceVersion"), &selectors) {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let w = Watch {
        tx,
        client,
        shared: shared.clone(),
    };
    tokio::spawn(run_watch(shared, start, selectors, bookmarks, timeout, w));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

struct WatchGuard(Arc<Shared>);
impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watch_closed();
    }
}

/// One watch stream being sent.
struct Watch {
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    client: Option<Arc<ClientCounters>>,
    shared: Arc<Shared>,
}

impl Watch {
    async fn send(&self, ev: &Value) -> bool {
        let mut line = ev.to_string();
        line.push('\n');
        if let Some(c) = &self.client {
            c.watch_event();
        }
        self.tx.send(Ok(Bytes::from(line))).await.is_ok()
    }
}

async fn run_watch(
    shared: Arc<Shared>,
    start: WatchStart,
    selectors: Selectors,
    bookmarks: bool,
    timeout: Duration,
    w: Watch,
) {
    shared.watch_opened();
    let _guard = WatchGuard(w.shared.clone());
    let WatchStart {
        initial,
        end,
        mut rx,
        mut last_rv,
    } = start;
    for ev in &initial {
        if !w.send(ev).await {
            return;
        }
    }
    if end {
        return;
    }
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let period = shared.opts.bookmark_interval.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let gone = |rv: u64, shared: &Shared| {
        let e = FakeError::Gone(format!(
            "too old resource version: {rv} ({})",
            shared.compacted_rv()
        ));
        json!({"type": "ERROR", "object": e.status()})
    };
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            _ = w.tx.closed() => return,
            _ = ticks.tick(), if bookmarks => {
                let bm = json!({"type": "BOOKMARK", "object": {
                    "kind": "Node", "apiVersion": "v1",
                    "metadata": {"resourceVersion": last_rv.to_string()}
                }});
                if !w.send(&bm).await { return; }
            }
            m = rx.recv() => match m {
                Ok(WatchMsg::Event(e)) => {
                    if e.rv <= last_rv { continue; }
                    last_rv = e.rv;
                    if let Some(ev) = selected_event(&e, &selectors) {
                        if !w.send(&ev).await { return; }
                    }
                }
                Ok(WatchMsg::Expire) => {
                    let _ = w.send(&gone(last_rv, &shared)).await;
                    return;
                }
                // A watcher too slow for the live events: kube-apiserver's watch
                // cache ends such a watch without an error ("forcing watcher close
                // due to unresponsiveness") and the client resumes from the last
                // resource version it saw, replayed from history if still there
                // (410 only once it is not).
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Ok(WatchMsg::Close) | Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

async fn create_node(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    if let Err(e) = shared.authorize("create", "nodes", None, None) {
        return error_response(e);
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(FakeError::BadRequest(format!("error decoding Node: {e}")))
        }
    };
    result(StatusCode::CREATED, shared.create_node_value(v))
}

fn read_node(shared: &Shared, name: &str, resource: &str) -> Response {
    if let Err(e) = shared.authorize("get", resource, Some(name), None) {
        return error_response(e);
    }
    result(StatusCode::OK, shared.node_value(name))
}

async fn get_node(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    read_node(&shared, &name, "nodes")
}

async fn get_node_status(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    read_node(&shared, &name, "nodes/status")
}

async fn put_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(e) = shared.authorize("update", "nodes", Some(&name), None) {
        return error_response(e);
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(FakeError::BadRequest(format!("error decoding Node: {e}")))
        }
    };
    result(StatusCode::OK, shared.update_node_value(&name, v, true))
}

fn do_patch(
    shared: &Shared,
    name: &str,
    status: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let resource = if status { "nodes/status" } else { "nodes" };
    if let Err(e) = shared.authorize("patch", resource, Some(name), None) {
        return error_response(e);
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    result(StatusCode::OK, shared.patch_node(name, status, ct, body))
}

async fn patch_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    do_patch(&shared, &name, false, &headers, &body)
}

async fn patch_node_status(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    do_patch(&shared, &name, true, &headers, &body)
}

async fn delete_node(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if let Err(e) = shared.authorize("delete", "nodes", Some(&name), None) {
        return error_response(e);
    }
    result(StatusCode::OK, shared.delete_node_value(&name))
}

async fn create_pod(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(e) = shared.authorize("create", "pods", None, Some(&ns)) {
        return error_response(e);
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_response(FakeError::BadRequest(format!("error decoding Pod: {e}"))),
    };
    result(StatusCode::CREATED, shared.create_pod_value(&ns, v))
}

async fn get_pod(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    if let Err(e) = shared.authorize("get", "pods", Some(&name), Some(&ns)) {
        return error_response(e);
    }
    result(StatusCode::OK, shared.pod_value(&ns, &name))
}

async fn delete_pod(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    if let Err(e) = shared.authorize("delete", "pods", Some(&name), Some(&ns)) {
        return error_response(e);
    }
    result(StatusCode::OK, shared.delete_pod_value(&ns, &name))
}

#[derive(serde::Deserialize)]
struct DenyRule {
    verb: String,
    resource: String,
}

async fn ctl_deny(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<DenyRule>(&body) {
        Ok(r) => {
            shared.deny(&r.verb, &r.resource);
            json_response(StatusCode::OK, &json!({}))
        }
        Err(e) => error_response(FakeError::BadRequest(format!(
            "expected {{\"verb\":..,\"resource\":..}}: {e}"
        ))),
    }
}

async fn ctl_allow(State(shared): State<Arc<Shared>>) -> Response {
    shared.allow_all();
    json_response(StatusCode::OK, &json!({}))
}

async fn ctl_compact(State(shared): State<Arc<Shared>>) -> Response {
    shared.compact();
    json_response(
        StatusCode::OK,
        &json!({"resourceVersion": shared.resource_version().to_string()}),
    )
}

async fn ctl_expire(State(shared): State<Arc<Shared>>) -> Response {
    shared.expire_watches();
    json_response(StatusCode::OK, &json!({}))
}

async fn ctl_close(State(shared): State<Arc<Shared>>) -> Response {
    shared.close_watches();
    json_response(StatusCode::OK, &json!({}))
}

/// A node as a real cluster has it, for scale tests in other processes.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RealisticNode {
    name: String,
    /// Seeds the generated details (images, MAC, IDs).
    index: usize,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "publicIP")]
    public_ip: Option<String>,
    /// With flannel's annotations (prefix `flannel.alpha.coreos.com`), or none of
    /// them (a node whose flanneld has not started yet).
    #[serde(default)]
    annotate: bool,
}

async fn ctl_realistic_node(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let r: RealisticNode = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error_response(FakeError::BadRequest(format!("realistic-node: {e}"))),
    };
    let prefix = "flannel.alpha.coreos.com";
    let now = crate::now_rfc3339();
    let mut v = crate::population::realistic_node(&r.name, r.index, prefix, &now, &now);
    if let Some(c) = &r.pod_cidr {
        v["spec"]["podCIDR"] = json!(c);
        v["spec"]["podCIDRs"] = json!([c]);
    }
    if let Some(ip) = &r.public_ip {
        v["status"]["addresses"][0]["address"] = json!(ip);
        v["metadata"]["annotations"][format!("{prefix}/public-ip")] = json!(ip);
    }
    if !r.annotate {
        if let Some(a) = v["metadata"]["annotations"].as_object_mut() {
            a.retain(|k, _| !k.starts_with(prefix));
        }
        if let Some(c) = v["status"]["conditions"].as_array_mut() {
            c.retain(|c| c["type"] != "NetworkUnavailable");
        }
        if let Some(m) = v["metadata"]["managedFields"].as_array_mut() {
            m.retain(|m| m["manager"] != "flanneld");
        }
    }
    result(StatusCode::CREATED, shared.create_node_value(v))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Populate {
    count: usize,
    #[serde(default = "default_node_prefix")]
    name_prefix: String,
}

fn default_node_prefix() -> String {
    "node-".into()
}

async fn ctl_populate(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let p: Populate = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return error_response(FakeError::BadRequest(format!("populate: {e}"))),
    };
    let r = shared.populate(p.count, &p.name_prefix, "flannel.alpha.coreos.com");
    result(
        StatusCode::OK,
        r.map(|()| json!({"resourceVersion": shared.resource_version().to_string()})),
    )
}

async fn ctl_traffic(State(shared): State<Arc<Shared>>) -> Response {
    let by_client: serde_json::Map<String, Value> = shared
        .traffic()
        .into_iter()
        .filter_map(|(ip, t)| Some((ip.to_string(), serde_json::to_value(t).ok()?)))
        .collect();
    json_response(StatusCode::OK, &Value::Object(by_client))
}

async fn ctl_requests(State(shared): State<Arc<Shared>>) -> Response {
    match serde_json::to_value(shared.requests()) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(FakeError::Io(e.to_string())),
    }
}
