//! The lab's etcd: one member or a cluster, every member listening on the underlay
//! bridge address inside the underlay namespace (each on its own client port),
//! reached through etcd's v3 JSON gateway (HTTP/1.0, base64 keys).
//!
//! Every request runs on a short-lived std thread that first enters the underlay
//! namespace, so the socket lives there; the root namespace never talks to it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use flannel_net::netns::run_in_netns;
use serde_json::{json, Value};

use crate::error::{LabError, Result};

/// How many operations one transaction may hold; the lab's etcd is started with
/// this as `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 10_000;
/// The lab's etcd `--max-request-bytes` (32 MiB: 10 000 lease puts fit easily).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// A client for the lab's etcd. With several members it sends each request to the
/// member that answered last and moves on to the next one when a member is down or
/// has no leader (HTTP 503), as a real etcd client fails over.
#[derive(Debug, Clone)]
pub struct Etcd {
    netns: PathBuf,
    members: Arc<[SocketAddrV4]>,
    /// Index into `members` of the member tried first.
    current: Arc<AtomicUsize>,
}

/// Where one member of the lab's etcd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdMember {
    /// Its `--name`.
    pub name: String,
    /// Its client URL's address (on the underlay bridge).
    pub client: SocketAddrV4,
    /// Its peer port, on the underlay namespace's loopback.
    pub peer_port: u16,
}

impl EtcdMember {
    /// Member `i` (0-based) of a lab etcd whose clients connect to `ip`: the first
    /// uses etcd's standard ports 2379/2380, the next ones 12379/12380, 22379/22380...
    pub fn nth(ip: Ipv4Addr, i: usize) -> EtcdMember {
        let offset = 10_000 * i as u16;
        EtcdMember {
            name: format!("lab{}", i + 1),
            client: SocketAddrV4::new(ip, 2379 + offset),
            peer_port: 2380 + offset,
        }
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

fn err(op: &str, msg: impl ToString) -> LabError {
    LabError::Etcd {
        op: op.to_string(),
        msg: msg.to_string(),
    }
}

/// The first key after every key starting with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): "to the end of the keyspace".
    vec![0]
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

fn unb64(op: &str, v: &Value) -> Result<String> {
    let s = v.as_str().unwrap_or("");
    let bytes = B64
        .decode(s)
        .map_err(|e| err(op, format!("bad base64 from etcd: {e}")))?;
    String::from_utf8(bytes).map_err(|e| err(op, format!("non-UTF-8 data: {e}")))
}

impl Etcd {
    /// A client for the etcd at `addr` inside the namespace `/run/netns/<netns>`.
    pub fn new(netns: &str, addr: SocketAddrV4) -> Self {
        Self::cluster(netns, &[addr])
    }

    /// A client for an etcd cluster whose members listen on `members` (at least one).
    pub fn cluster(netns: &str, members: &[SocketAddrV4]) -> Self {
        Etcd {
            netns: Path::new("/run/netns").join(netns),
            members: members.into(),
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A client that talks to member `i` only (e.g. to ask it for its status).
    pub fn member(&self, i: usize) -> Result<Etcd> {
        let addr = *self.members.get(i).ok_or_else(|| {
            LabError::Invalid(format!("no etcd member {i} (of {})", self.members.len()))
        })?;
        Ok(Etcd {
            netns: self.netns.clone(),
            members: Arc::new([addr]),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The namespace the members listen in (a client's sockets must be made there).
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// The first member's client URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.members[0])
    }

    /// Every member's client URL, comma-separated (flanneld's `--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One request, to the member that answered last and then to each other one
    /// while a member cannot be reached or answers 503 (down, or no leader).
    fn http(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let n = self.members.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            match self.http_to(self.members[i], method, path, body) {
                Ok((503, text)) if k + 1 < n => {
                    last = Some(err(
                        &format!("{method} {path}"),
                        format!("HTTP 503: {text}"),
                    ))
                }
                Ok(answer) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err(path, "no etcd member")))
    }

    /// One HTTP/1.0 exchange (the server closes the connection, so no chunked
    /// encoding to undo) with `addr` from inside the namespace.
    fn http_to(
        &self,
        addr: SocketAddrV4,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        let netns = self.netns.clone();
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        let op = format!("{method} {path}");
        let raw = run_in_netns(&netns, move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.set_write_timeout(Some(Duration::from_secs(60)))?;
            s.write_all(req.as_bytes())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out)
        })
        .map_err(|e| err(&op, e))?
        .map_err(|e| err(&op, e))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| err(&op, "response without header end"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err(&op, format!("bad status line in {head:?}")))?;
        Ok((status, body.to_string()))
    }

    fn call(&self, path: &str, body: Value) -> Result<Value> {
        let (status, text) = self.http("POST", path, Some(&body.to_string()))?;
        if status != 200 {
            return Err(err(path, format!("HTTP {status}: {}", text.trim())));
        }
        serde_json::from_str(&text).map_err(|e| err(path, format!("{e}: {text}")))
    }

    /// Whether etcd answers its health check.
    pub fn healthy(&self) -> bool {
        matches!(self.http("GET", "/health", None), Ok((200, body)) if body.contains("true"))
    }

    /// The id of the member that answers and of the leader it follows (0: it knows
    /// of none), from `/v3/maintenance/status`; ask a [`member`](Self::member)
    /// client to learn about that member.
    pub fn status(&self) -> Result<(u64, u64)> {
        let v = self.call("/v3/maintenance/status", json!({}))?;
        Ok((
            gateway_u64(v.pointer("/header/member_id")),
            gateway_u64(v.get("leader")),
        ))
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.call(
            "/v3/kv/put",
            json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())}),
        )?;
        Ok(())
    }

    /// Puts `key` on a fresh etcd lease of `ttl` seconds, as flanneld writes a lease.
    pub fn put_leased(&self, key: &str, value: &str, ttl: u64) -> Result<()> {
        let id = self.grant(ttl)?;
        self.call(
            "/v3/kv/put",
            json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes()), "lease": id.to_string()}),
        )?;
        Ok(())
    }

    /// Puts `key` on the existing etcd lease `id` (e.g. granted ahead of a timed put).
    pub fn put_on_lease(&self, key: &str, value: &str, id: i64) -> Result<()> {
        self.call(
            "/v3/kv/put",
            json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes()), "lease": id.to_string()}),
        )?;
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let v = self.call("/v3/kv/range", json!({"key": b64(key.as_bytes())}))?;
        match v
            .get("kvs")
            .and_then(|k| k.as_array())
            .and_then(|a| a.first())
        {
            Some(kv) => Ok(Some(unb64("range", &kv["value"])?)),
            None => Ok(None),
        }
    }

    /// The id of the etcd lease `key` is attached to (`Some(0)`: none; `None`: no
    /// such key). flanneld attaches every renewal to a fresh lease.
    pub fn lease_of(&self, key: &str) -> Result<Option<i64>> {
        let v = self.call("/v3/kv/range", json!({"key": b64(key.as_bytes())}))?;
        Ok(v.get("kvs")
            .and_then(|k| k.as_array())
            .and_then(|a| a.first())
            .map(|kv| i64::try_from(gateway_u64(kv.get("lease"))).unwrap_or(0)))
    }

    /// All keys starting with `prefix`, in key order, with their values.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let v = self.call(
            "/v3/kv/range",
            json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes()))}),
        )?;
        let mut out = Vec::new();
        for kv in v
            .get("kvs")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
        {
            out.push((unb64("range", &kv["key"])?, unb64("range", &kv["value"])?));
        }
        Ok(out)
    }

    /// Deletes `key`; returns whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        let v = self.call("/v3/kv/deleterange", json!({"key": b64(key.as_bytes())}))?;
        Ok(deleted_count(&v) > 0)
    }

    /// Deletes every key starting with `prefix`; returns how many.
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let v = self.call(
            "/v3/kv/deleterange",
            json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes()))}),
        )?;
        Ok(deleted_count(&v))
    }

    /// A new etcd lease with `ttl` seconds; its id.
    pub fn grant(&self, ttl: u64) -> Result<i64> {
        let v = self.call("/v3/lease/grant", json!({ "TTL": ttl }))?;
        // The gateway writes int64 as a JSON string.
        v.get("ID")
            .and_then(|id| id.as_str().and_then(|s| s.parse().ok()).or(id.as_i64()))
            .ok_or_else(|| err("lease grant", format!("no ID in {v}")))
    }

    /// Puts all pairs in as few transactions as etcd allows ([`MAX_TXN_OPS`] each).
    pub fn put_many(&self, kvs: &[(String, String)]) -> Result<()> {
        self.put_txns(kvs, &[])
    }

    /// Puts all pairs the way flanneld writes its leases: each key attached to an
    /// etcd lease of its own with `ttl` seconds (a benchmark must pay what a real
    /// cluster costs, e.g. one lease lookup per key where the agent does that).
    pub fn put_many_leased(&self, kvs: &[(String, String)], ttl: u64) -> Result<()> {
        let ids = kvs
            .iter()
            .map(|_| self.grant(ttl))
            .collect::<Result<Vec<i64>>>()?;
        self.put_txns(kvs, &ids)
    }

    /// Puts the pairs in transactions, the i-th on etcd lease `leases[i]` if given.
    fn put_txns(&self, kvs: &[(String, String)], leases: &[i64]) -> Result<()> {
        for (n, chunk) in kvs.chunks(MAX_TXN_OPS).enumerate() {
            let ops: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    let mut put = json!({"key": b64(k.as_bytes()), "value": b64(v.as_bytes())});
                    if let Some(id) = leases.get(n * MAX_TXN_OPS + i) {
                        put["lease"] = json!(id.to_string());
                    }
                    json!({ "requestPut": put })
                })
                .collect();
            let v = self.call("/v3/kv/txn", json!({"success": ops}))?;
            if v.get("succeeded").and_then(Value::as_bool) != Some(true) {
                return Err(err("txn", format!("not succeeded: {v}")));
            }
        }
        Ok(())
    }
}

fn deleted_count(v: &Value) -> u64 {
    gateway_u64(v.get("deleted"))
}

/// A 64-bit integer field of a gateway response: written as a JSON string (or a
/// number), and left out when zero.
fn gateway_u64(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// The etcd command line for member `me` of a lab etcd made of `cluster`: client
/// URL on the underlay, peer URL on the namespace's loopback, data in `data_dir`.
/// A member restarted with the same data directory rejoins (etcd then ignores the
/// `--initial-*` flags).
pub fn etcd_args(me: &EtcdMember, cluster: &[EtcdMember], data_dir: &Path) -> Vec<String> {
    let client = format!("http://{}", me.client);
    let initial: Vec<String> = cluster
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect();
    vec![
        format!("--name={}", me.name),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={}", me.peer_url()),
        format!("--initial-advertise-peer-urls={}", me.peer_url()),
        format!("--initial-cluster={}", initial.join(",")),
        "--initial-cluster-state=new".into(),
        format!("--max-txn-ops={MAX_TXN_OPS}"),
        format!("--max-request-bytes={MAX_REQUEST_BYTES}"),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/a/b"), b"/a/c".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn deleted_counts_read_both_encodings() {
        assert_eq!(deleted_count(&json!({"deleted": "3"})), 3);
        assert_eq!(deleted_count(&json!({"deleted": 2})), 2);
        assert_eq!(deleted_count(&json!({})), 0);
    }
}
