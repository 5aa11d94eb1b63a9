//! Where leases live: the [`LeaseStore`] trait and its implementations.
//!
//! A store never touches the kernel; it reads the network config, acquires and renews
//! this host's lease and reports the other hosts' leases as [`LeaseUpdate`]s.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseKey, LeaseUpdate, NetworkConfig, PreviousSubnets};
use tokio::sync::mpsc;

pub mod etcd;
#[cfg(feature = "kube")]
pub mod kube;
#[cfg(feature = "testing")]
pub mod testing;

/// What a host asks for when it acquires its lease.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// The attributes to publish (public IP, backend type and data).
    pub attrs: LeaseAttrs,
    /// Subnets from the subnet.env of a previous run, tried before a fresh pick.
    pub previous: PreviousSubnets,
}

/// News about this host's own lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnLeaseEvent {
    /// The lease was written again (by us or someone else); its new expiry.
    Renewed(Lease),
    /// The lease key was deleted or expired: the agent must stop.
    Revoked,
}

/// Why a store operation failed. The variant text is the operator's message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no free subnet left in the allocation window {window}")]
    OutOfSubnets { window: String },
    #[error("network config: {0}")]
    Config(#[from] flannel_core::ConfigError),
    #[error("{0}")]
    Unsupported(String),
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
    #[error("lease {key}: {reason}")]
    Lease { key: String, reason: String },
}

/// A lease store (etcd or the Kubernetes API).
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// The network config. Implementations keep retrying while the config is missing
    /// or unreadable (logging each distinct error once) and only return a fatal error.
    async fn network_config(&self) -> Result<NetworkConfig, StoreError>;

    /// Acquires (or re-takes) this host's lease.
    async fn acquire(
        &self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, StoreError>;

    /// Writes the lease again with a fresh TTL; returns it with its new expiry.
    async fn renew(&self, lease: &Lease) -> Result<Lease, StoreError>;

    /// Watches the other hosts' leases until `tx` is closed. The first update sent is
    /// [`LeaseUpdate::Full`]; broken or compacted watches are resynced internally and
    /// never end this call. `own` is excluded from what is reported.
    async fn watch_leases(
        &self,
        own: LeaseKey,
        tx: mpsc::Sender<LeaseUpdate>,
    ) -> Result<(), StoreError>;

    /// Watches this host's own lease key until `tx` is closed.
    async fn watch_own_lease(
        &self,
        lease: &Lease,
        tx: mpsc::Sender<OwnLeaseEvent>,
    ) -> Result<(), StoreError>;

    /// Called once the backend runs (upstream's CompleteLease). The Kubernetes store
    /// sets the node condition `NetworkUnavailable=False` here; others do nothing.
    async fn complete_lease(&self, _lease: &Lease) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The public addresses a lease is looked up by (reuse-by-IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicAddrs {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}
