//! flannel's backends, one module per backend `Type`. Each registers (returning the
//! lease attributes it publishes), is told its lease, then reconciles the kernel to
//! the set of other hosts' leases.

use std::net::{Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, NetworkConfig};

/// The host interface flannel sends encapsulated or routed traffic through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// The interface's own IPv4 address.
    pub addr: Option<Ipv4Addr>,
    /// The address published to peers (`--public-ip`, else `addr`).
    pub public_ip: Option<Ipv4Addr>,
    pub addr6: Option<Ipv6Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

/// Why a backend failed. Variant text is the operator's message.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend type {0:?}")]
    UnknownType(String),
    #[error("backend config: {0}")]
    Config(String),
    #[error("{context}: {reason}")]
    Kernel { context: String, reason: String },
    #[error("{0}")]
    Other(String),
}

/// One backend instance for the life of the agent.
#[async_trait]
pub trait Backend: Send {
    /// The attributes to publish in our lease (backend type and data). May create
    /// devices (e.g. flannel.1, whose MAC goes into the data).
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError>;

    /// Our lease is known: finish local setup (device address, routes for our side).
    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError>;

    /// The MTU pods should use (FLANNEL_MTU).
    fn mtu(&self) -> u32;

    /// Makes the kernel match exactly this set of other hosts' leases: adds what is
    /// missing, replaces what differs, removes entries we own for hosts not in `peers`.
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError>;

    /// Applies incremental changes.
    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<(), BackendError>;
}
