//! The wireguard backend (docs/compatibility.md, "wireguard"): upstream's config keys,
//! key file and lease data, so flannel-rs and Go flanneld nodes can be peers.
//!
//! What exists so far: the config ([`config`]) and the node key ([`key`]). The data
//! path (userspace WireGuard on a TUN, the `wg` UAPI socket) is not built yet, so the
//! backend type is still refused at startup.

pub mod config;
pub mod key;

pub use config::{Mode, WireguardConfig};
pub use key::{key_file_path, PresharedKey, PrivateKey};
