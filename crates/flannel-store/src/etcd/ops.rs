//! The etcd calls the store makes, each bounded in time.
//!
//! A tonic balanced channel with no reachable endpoint holds requests instead of
//! failing them, so without a deadline a call made while etcd is down would hang
//! forever; every call here has one and turns into `StoreError::Unavailable`.

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

pub(crate) async fn timed<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("etcd {what}: {e}"))),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd {what}: no answer within {} s",
            limit.as_secs()
        ))),
    }
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
        let mut kv = self.kv.clone();
        let opts = prefix.then(|| GetOptions::new().with_prefix());
        timed(&format!("get {key}"), limit, kv.get(key, opts)).await
    }

    /// A new 24 h etcd lease: its id and the expiry it gives.
    pub async fn grant(&self) -> Result<(i64, SystemTime), StoreError> {
        let mut lc = self.lease.clone();
        let resp = timed(
            "lease grant",
            REQUEST_TIMEOUT,
            lc.grant(LEASE_TTL_SECS, None),
        )
        .await?;
        Ok((resp.id(), expiry_after(SystemTime::now(), resp.ttl())))
    }

    /// Revokes an etcd lease we granted but did not use; failure only leaves an empty
    /// lease behind until its TTL, so it is logged, not returned.
    pub async fn revoke_quietly(&self, id: i64) {
        let mut lc = self.lease.clone();
        if let Err(e) = timed("lease revoke", REQUEST_TIMEOUT, lc.revoke(id)).await {
            tracing::warn!(lease_id = id, "could not revoke an unused etcd lease: {e}");
        }
    }

    /// Plain put, attached to `lease` when it is non-zero.
    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), StoreError> {
        let mut kv = self.kv.clone();
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        timed(
            &format!("put {key}"),
            REQUEST_TIMEOUT,
            kv.put(key, value, opts),
        )
        .await?;
        Ok(())
    }

    /// Puts `key` only if it does not exist; false when someone else holds it.
    pub async fn create(&self, key: &str, value: &str, lease: i64) -> Result<bool, StoreError> {
        let mut kv = self.kv.clone();
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, opts)]);
        let resp = timed(&format!("create {key}"), REQUEST_TIMEOUT, kv.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut kv = self.kv.clone();
        timed(
            &format!("delete {key}"),
            REQUEST_TIMEOUT,
            kv.delete(key, None),
        )
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
