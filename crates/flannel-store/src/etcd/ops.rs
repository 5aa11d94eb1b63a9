//! The etcd calls the store makes, each bounded in time and sent again while the
//! member it went to cannot serve it.
//!
//! A tonic balanced channel with no reachable endpoint holds requests instead of
//! failing them, so without a deadline a call made while etcd is down would hang
//! forever; every call here has one and turns into `StoreError::Unavailable`.
//! With several endpoints, the channel keeps a dead member's connection and hands
//! it requests, which fail at once (broken pipe, connection refused); the Go client
//! that upstream flanneld uses retries those on another member, and so do we, so
//! one member down costs no renewal.

use std::future::Future;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Compare, CompareOp, GetOptions, GetResponse, KvClient, LeaseClient, PutOptions, Txn, TxnOp,
};

use crate::StoreError;

/// Deadline of one unary request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// TTL of every lease write, as upstream (24 h).
pub const LEASE_TTL_SECS: i64 = 24 * 60 * 60;

/// First pause before sending a failed request again; it doubles up to the cap.
const RETRY_PAUSE: Duration = Duration::from_millis(25);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(500);

/// Whether a failed request is worth sending again (the balancer may pick another
/// member): the connection broke or was refused, or the member cannot serve now
/// (no leader, request timed out in raft). etcd's answers about the request itself
/// (invalid, denied, compacted, not found) are final.
fn worth_retrying(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() as i32 {
            // UNAVAILABLE.
            14 => true,
            // UNKNOWN: tonic's code for a connection that broke under the request.
            2 => s.message() == "transport error",
            _ => false,
        },
        _ => false,
    }
}

/// Sends the request `send` makes until it succeeds, fails for good, or `limit`
/// has passed; returns the result and how many times it was sent.
pub(crate) async fn timed_counted<T, F, Fut>(
    what: &str,
    limit: Duration,
    mut send: F,
) -> (Result<T, StoreError>, u32)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = RETRY_PAUSE;
    let mut sent = 0;
    loop {
        sent += 1;
        match tokio::time::timeout_at(deadline, send()).await {
            Ok(Ok(v)) => return (Ok(v), sent),
            Ok(Err(e)) if worth_retrying(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(target: "flannel_store::etcd", "etcd {what}: {e}; sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_PAUSE_MAX);
            }
            Ok(Err(e)) => {
                return (
                    Err(StoreError::Unavailable(format!("etcd {what}: {e}"))),
                    sent,
                )
            }
            Err(_) => {
                return (
                    Err(StoreError::Unavailable(format!(
                        "etcd {what}: no answer within {} s",
                        limit.as_secs()
                    ))),
                    sent,
                )
            }
        }
    }
}

/// [`timed_counted`] without the count.
pub(crate) async fn timed<T, F, Fut>(what: &str, limit: Duration, send: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    timed_counted(what, limit, send).await.0
}

/// The etcd clients a store uses (cheap to clone: they share one channel).
#[derive(Clone)]
pub(crate) struct Ops {
    pub kv: KvClient,
    pub lease: LeaseClient,
}

/// The longest TTL taken as given: ~285 years. A server answering more (a hostile
/// or broken etcd) gets this, rather than an overflow.
const MAX_TTL_SECS: i64 = 9_000_000_000;

/// `now + ttl` seconds as etcd reported them: a negative TTL is 0, a huge one is
/// capped, and the sum never overflows `SystemTime`.
pub(crate) fn expiry_after(now: SystemTime, ttl: i64) -> SystemTime {
    let secs = ttl.clamp(0, MAX_TTL_SECS).unsigned_abs();
    now.checked_add(Duration::from_secs(secs)).unwrap_or(now)
}

impl Ops {
    pub async fn get(
        &self,
        key: &str,
        prefix: bool,
        limit: Duration,
    ) -> Result<GetResponse, StoreError> {
        timed(&format!("get {key}"), limit, || {
            let mut kv = self.kv.clone();
            let opts = prefix.then(|| GetOptions::new().with_prefix());
            async move { kv.get(key, opts).await }
        })
        .await
    }

    /// A new 24 h etcd lease: its id and the expiry it gives.
    pub async fn grant(&self) -> Result<(i64, SystemTime), StoreError> {
        let resp = timed("lease grant", REQUEST_TIMEOUT, || {
            let mut lc = self.lease.clone();
            async move { lc.grant(LEASE_TTL_SECS, None).await }
        })
        .await?;
        Ok((resp.id(), expiry_after(SystemTime::now(), resp.ttl())))
    }

    /// Revokes an etcd lease we granted but did not use; failure only leaves an empty
    /// lease behind until its TTL, so it is logged, not returned.
    pub async fn revoke_quietly(&self, id: i64) {
        let revoke = || {
            let mut lc = self.lease.clone();
            async move { lc.revoke(id).await }
        };
        if let Err(e) = timed("lease revoke", REQUEST_TIMEOUT, revoke).await {
            tracing::warn!(lease_id = id, "could not revoke an unused etcd lease: {e}");
        }
    }

    /// Plain put, attached to `lease` when it is non-zero.
    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), StoreError> {
        // Sending a put twice is harmless: the same value on the same lease.
        timed(&format!("put {key}"), REQUEST_TIMEOUT, || {
            let mut kv = self.kv.clone();
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            async move { kv.put(key, value, opts).await }
        })
        .await?;
        Ok(())
    }

    /// Puts `key` only if it does not exist; false when someone else holds it.
    pub async fn create(&self, key: &str, value: &str, lease: i64) -> Result<bool, StoreError> {
        let (resp, sent) = timed_counted(&format!("create {key}"), REQUEST_TIMEOUT, || {
            let mut kv = self.kv.clone();
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            let txn = Txn::new()
                .when([Compare::version(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, opts)]);
            async move { kv.txn(txn).await }
        })
        .await;
        if resp?.succeeded() {
            return Ok(true);
        }
        if sent == 1 {
            return Ok(false);
        }
        // A create sent again after a broken connection may find the key written by
        // its own first attempt: ours if it holds our value on our lease.
        let now = self.get(key, false, REQUEST_TIMEOUT).await?;
        Ok(now
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == value.as_bytes() && kv.lease() == lease))
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        timed(&format!("delete {key}"), REQUEST_TIMEOUT, || {
            let mut kv = self.kv.clone();
            async move { kv.delete(key, None).await }
        })
        .await?;
        Ok(())
    }

    /// When the etcd lease `id` expires. A lease that no longer exists reads as
    /// expired a second ago, as upstream computes it from TTL −1.
    pub async fn expiry(&self, id: i64) -> Result<SystemTime, StoreError> {
        let mut lc = self.lease.clone();
        let now = SystemTime::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, lc.time_to_live(id, None)).await {
            Ok(Ok(resp)) if resp.ttl() >= 0 => Ok(expiry_after(now, resp.ttl())),
            Ok(Ok(_)) => Ok(now - Duration::from_secs(1)),
            // gRPC NOT_FOUND (5): "requested lease not found".
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() as i32 == 5 => {
                Ok(now - Duration::from_secs(1))
            }
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "etcd lease time-to-live {id:x}: {e}"
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd lease time-to-live {id:x}: no answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ttls_neither_panic_nor_wrap() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(expiry_after(now, 30), now + Duration::from_secs(30));
        assert_eq!(expiry_after(now, -5), now, "a negative TTL is 0");
        let far = expiry_after(now, i64::MAX);
        assert_eq!(
            far,
            now + Duration::from_secs(MAX_TTL_SECS as u64),
            "capped"
        );
        // Even at the end of SystemTime's range the sum cannot overflow.
        let late = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
        let _ = expiry_after(late, i64::MAX);
    }
}
