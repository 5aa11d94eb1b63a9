//! The udp backend data path: flannel's wire format (each UDP datagram carries one
//! bare IPv4 packet, sent from and to `<Port>`, default 8285), with a userspace
//! forwarder built for speed and safety.
//!
//! * Wire-compatible with Go flanneld in both directions: the sender decrements the
//!   TTL (upstream's incremental checksum fix), sends to `<peer PublicIP>:<Port>`,
//!   answers ICMP net-unreachable for unknown destinations; the receiver decrements
//!   the TTL and writes to the TUN.
//! * Fast ([`Mode::Offload`]): the TUN carries a virtio-net header with TSO/USO and
//!   checksum offloads, so one read yields up to 64 KiB; it is segmented once
//!   (headers built, payloads gathered in place) and sent with UDP GSO via
//!   sendmmsg. Received datagrams come in UDP GRO batches (recvmmsg) and TCP
//!   segments are coalesced back into one GSO write. One worker pair per TUN queue
//!   (multi-queue, one per CPU). No per-packet allocation.
//! * Safe: datagrams from anything but a current peer's public IP, inner packets
//!   with a source outside that peer's subnet, and malformed packets are dropped
//!   and counted ([`Counters`]).
//! * Hitless restart: the device is persistent and an fd keeper ([`keeper`]) holds
//!   the queues and sockets across an agent restart (even `kill -9`).

pub mod counters;
pub mod csum;
pub mod datapath;
pub mod engine;
mod gso;
pub mod keeper;
pub mod netconf;
#[cfg(feature = "node")]
pub mod node;
pub mod packet;
pub mod peers;
pub mod rx;
pub mod sock;
pub mod tun;
pub mod tx;
pub mod vnet;
pub mod wireguard;

pub use counters::{CounterValues, Counters};
pub use datapath::{remove_device, Config, DataPath, Features, Mode};
pub use peers::{Peer, PeerTable};

/// The default UDP port of the udp backend.
pub const DEFAULT_PORT: u16 = 8285;
/// Encapsulation overhead: outer IPv4 (20) + UDP (8) headers.
pub const OVERHEAD: u32 = 28;

/// Errors of the udp data path. Each variant's text is the operator's message.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] flannel_net::NetlinkError),
    #[error("no device {0}")]
    NoDevice(String),
    #[error("cannot take over the previous data path: {0}")]
    Inherit(String),
}

impl UdpError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        UdpError::Io {
            context: context.into(),
            source,
        }
    }
}
