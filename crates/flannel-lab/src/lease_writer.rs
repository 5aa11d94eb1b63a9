//! Writes single peer leases the way flanneld does: over etcd's gRPC API on a
//! connection that stays open, each key on an etcd lease of its own, created with
//! a create-if-absent transaction.
//!
//! The lab's [`Etcd`](crate::etcd::Etcd) client goes through etcd's JSON gateway on
//! a fresh thread and connection per request, which is right for setting up a lab
//! but puts a thread start, a TCP handshake and the gateway's own in-process gRPC hop
//! into every write. A latency benchmark (lease write → route) must time only what
//! a real cluster's write costs, so it writes through this.
//!
//! The client lives on one std thread that entered the underlay namespace once (its
//! sockets are made there) and runs a current-thread tokio runtime; callers talk to
//! it over a channel and get back the instants at which each transaction was sent and
//! answered, measured on that thread.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use flannel_net::netns::spawn_in_netns;

use crate::error::{LabError, Result};
use crate::etcd::Etcd;

/// When one write was sent and when etcd answered it.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub sent: Instant,
    pub answered: Instant,
}

enum Req {
    /// Grant an etcd lease of `ttl` seconds, then create `key` on it.
    Create {
        key: String,
        value: String,
        ttl: i64,
    },
    Delete {
        key: String,
    },
}

type Reply = std::result::Result<Timed, String>;

/// A gRPC client for the lab's etcd on its own thread; dropped, the thread ends.
pub struct LeaseWriter {
    tx: Option<mpsc::Sender<(Req, mpsc::Sender<Reply>)>>,
    thread: Option<JoinHandle<std::result::Result<(), flannel_net::netns::NetnsError>>>,
}

fn err(what: &str, e: impl std::fmt::Display) -> LabError {
    LabError::Invalid(format!("etcd gRPC {what}: {e}"))
}

impl LeaseWriter {
    /// Connects to every member of `etcd` (the client picks one, as flanneld's does).
    pub fn connect(etcd: &Etcd) -> Result<LeaseWriter> {
        let endpoints: Vec<String> = etcd.endpoints().split(',').map(str::to_string).collect();
        let (tx, rx) = mpsc::channel::<(Req, mpsc::Sender<Reply>)>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        let thread = spawn_in_netns(etcd.netns(), move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            rt.block_on(serve(endpoints, rx, ready_tx));
        })
        .map_err(|e| err("thread", e))?;
        let ready = ready_rx
            .recv()
            .map_err(|_| err("connect", "the client thread ended"))?;
        ready.map_err(|e| err("connect", e))?;
        Ok(LeaseWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn call(&self, req: Req) -> Result<Timed> {
        let (reply_tx, reply_rx) = mpsc::channel();
        let tx = self.tx.as_ref().ok_or_else(|| err("call", "closed"))?;
        tx.send((req, reply_tx))
            .map_err(|_| err("call", "the client thread ended"))?;
        reply_rx
            .recv()
            .map_err(|_| err("call", "the client thread ended"))?
            .map_err(|e| err("request", e))
    }

    /// Grants a lease of `ttl` seconds and creates `key` on it only if absent (as
    /// flanneld acquires a subnet); the times are the transaction's alone, since
    /// flanneld too grants before it writes.
    pub fn create(&self, key: &str, value: &str, ttl: u64) -> Result<Timed> {
        self.call(Req::Create {
            key: key.to_string(),
            value: value.to_string(),
            ttl: i64::try_from(ttl).map_err(|e| err("ttl", e))?,
        })
    }

    pub fn delete(&self, key: &str) -> Result<Timed> {
        self.call(Req::Delete {
            key: key.to_string(),
        })
    }
}

impl Drop for LeaseWriter {
    fn drop(&mut self) {
        // Closing the channel ends the serve loop.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    endpoints: Vec<String>,
    rx: mpsc::Receiver<(Req, mpsc::Sender<Reply>)>,
    ready: mpsc::Sender<std::result::Result<(), String>>,
) {
    let mut client = match Client::connect(&endpoints, None).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    // One round trip before the first timed one, so no sample pays for the
    // connection's set-up.
    if let Err(e) = client.status().await {
        let _ = ready.send(Err(e.to_string()));
        return;
    }
    let _ = ready.send(Ok(()));
    // A blocking receive is fine: this runtime has nothing else to do meanwhile.
    while let Ok((req, reply)) = rx.recv() {
        let _ = reply.send(one(&mut client, req).await);
    }
}

async fn one(client: &mut Client, req: Req) -> Reply {
    match req {
        Req::Create { key, value, ttl } => {
            let lease = client
                .lease_grant(ttl, None)
                .await
                .map_err(|e| format!("lease grant: {e}"))?;
            let txn = Txn::new()
                .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease.id())),
                )]);
            let sent = Instant::now();
            let r = client
                .txn(txn)
                .await
                .map_err(|e| format!("create {key}: {e}"))?;
            let answered = Instant::now();
            if !r.succeeded() {
                return Err(format!("create {key}: the key exists"));
            }
            Ok(Timed { sent, answered })
        }
        Req::Delete { key } => {
            let sent = Instant::now();
            client
                .delete(key.as_str(), None)
                .await
                .map_err(|e| format!("delete {key}: {e}"))?;
            Ok(Timed {
                sent,
                answered: Instant::now(),
            })
        }
    }
}
