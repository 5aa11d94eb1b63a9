//! flannel's backends, one module per backend `Type`. Each registers (returning the
//! lease attributes it publishes), is told its lease, then reconciles the kernel to
//! the set of other hosts' leases.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, MacAddr, NetworkConfig};
use flannel_net::Netlink;
use serde_json::value::RawValue;

pub mod alloc;
mod dataplane;
pub mod extension;
pub mod host_gw;
mod peers;
pub mod udp;
pub mod vxlan;
pub mod wireguard;

pub use flannel_net::netlink::RTPROT_FLANNEL;

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
    #[error("unknown backend type {0:?} (known types: {known})", known = KNOWN_TYPES.join(", "))]
    UnknownType(String),
    #[error("backend config: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Kernel {
        context: String,
        #[source]
        source: KernelError,
    },
    #[error("{0}")]
    Other(String),
}

/// What the kernel (or the data path below a backend) reported. Kept typed so that a
/// caller can still ask which errno the kernel gave after the context was added.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Netlink(#[from] flannel_net::NetlinkError),
    #[error(transparent)]
    Netns(#[from] flannel_net::netns::NetnsError),
    #[error(transparent)]
    Udp(#[from] flannel_udp::UdpError),
    /// Several operations of one batch failed; the first failure is the source.
    #[error("{failed} of {total} kernel operations failed; first: {first}")]
    Batch {
        failed: usize,
        total: usize,
        #[source]
        first: flannel_net::NetlinkError,
    },
    /// The kernel's state is not what the backend needs (no syscall failed).
    #[error("{0}")]
    State(String),
}

impl BackendError {
    /// A `map_err` adapter: wraps a kernel-side error with what was being done.
    pub fn kernel<E: Into<KernelError>>(
        context: impl Into<String>,
    ) -> impl FnOnce(E) -> BackendError {
        let context = context.into();
        move |e| BackendError::Kernel {
            context,
            source: e.into(),
        }
    }

    /// The errno the kernel answered with, if this error came from a refused
    /// netlink request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BackendError::Kernel {
                source: KernelError::Netlink(e) | KernelError::Batch { first: e, .. },
                ..
            } => e.errno(),
            _ => None,
        }
    }
}

/// Refuses a network that is not IPv4-only, for a backend of type `ty`.
pub(crate) fn ipv4_only(config: &NetworkConfig, ty: &str) -> Result<(), BackendError> {
    if !config.enable_ipv4 || config.enable_ipv6 {
        return Err(BackendError::Config(format!(
            "{ty}: only IPv4 is supported by this flannel-rs build (EnableIPv6 must be false)"
        )));
    }
    Ok(())
}

/// Counters of a backend that carries packets itself (udp): totals since start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PacketStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Dropped packets by reason.
    pub drops: Vec<(&'static str, u64)>,
}

/// Reads a backend's [`PacketStats`]; cheap, callable from any thread (the metrics
/// endpoint calls it on each scrape).
pub type PacketStatsSource = std::sync::Arc<dyn Fn() -> PacketStats + Send + Sync>;

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

    /// For backends that see packets: where to read their counters.
    fn packet_stats(&self) -> Option<PacketStatsSource> {
        None
    }

    /// How often the daemon should call [`resync`](Backend::resync); `None`: never.
    fn resync_interval(&self) -> Option<Duration> {
        None
    }

    /// Re-checks the kernel against the current peer set and repairs drift (routes
    /// deleted by someone else, a deleted device). Cheap: a few netlink dumps.
    async fn resync(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Extra inputs some backends use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// The VTEP MAC published before (kube mode: the node's `backend-data`
    /// annotation). Used if the vxlan device has to be created, so peers' entries
    /// stay valid.
    pub vtep_mac: Option<MacAddr>,
    /// The same for the IPv6 device (`backend-v6-data`).
    pub vtep_mac_v6: Option<MacAddr>,
}

/// Backend types this build knows, in the order error messages list them.
pub const KNOWN_TYPES: &[&str] = &["vxlan", "host-gw", "udp", "wireguard", "alloc", "extension"];

/// Types upstream flannel has that flannel-rs does not implement.
const UNSUPPORTED_TYPES: &[&str] = &["ipip", "ipsec", "tencent-vpc"];

/// Creates the backend named by the config's `Backend.Type` (matched
/// case-insensitively, as upstream lower-cases it). `raw_config` is the whole
/// `Backend` object; each backend reads its own keys from it.
pub fn new_backend(
    backend_type: &str,
    raw_config: &RawValue,
    ext: ExternalInterface,
    netlink: Netlink,
    opts: BackendOptions,
) -> Result<Box<dyn Backend>, BackendError> {
    let t = backend_type.to_ascii_lowercase();
    match t.as_str() {
        "vxlan" => Ok(Box::new(vxlan::VxlanBackend::new(
            raw_config, ext, netlink, opts,
        )?)),
        "host-gw" => Ok(Box::new(host_gw::HostGwBackend::new(
            raw_config, ext, netlink,
        )?)),
        "alloc" => Ok(Box::new(alloc::AllocBackend::new(ext))),
        "extension" => Ok(Box::new(extension::ExtensionBackend::new(raw_config, ext)?)),
        "udp" => Ok(Box::new(udp::UdpBackend::new(raw_config, ext, netlink)?)),
        "wireguard" => Ok(Box::new(wireguard::WireguardBackend::new(
            raw_config, ext, netlink,
        )?)),
        _ if UNSUPPORTED_TYPES.contains(&t.as_str()) => Err(BackendError::Config(format!(
            "backend type {t:?} is not supported by flannel-rs (supported: {})",
            KNOWN_TYPES.join(", ")
        ))),
        _ => Err(BackendError::UnknownType(backend_type.to_string())),
    }
}
