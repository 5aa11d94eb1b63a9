//! The wireguard backend (docs/compatibility.md, "wireguard"): upstream's config keys,
//! key file and lease data, so flannel-rs and Go flanneld nodes can be peers.
//!
//! The data path is userspace WireGuard (`flannel_udp::wireguard`) on TUN
//! `flannel-wg` (and `flannel-wg-v6` in `separate` mode with IPv6), each with its
//! `wg` UAPI socket.

pub mod backend;
pub mod config;
pub mod key;

pub use backend::{auto_uses_ipv6, cleanup, WireguardBackend, DEVICE, DEVICE_V6};
pub use config::{Mode, WireguardConfig};
pub use key::{key_file_path, PresharedKey, PrivateKey};
