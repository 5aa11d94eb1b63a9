//! Pure flannel types and rules, shared by the agent, the stores, the backends and the
//! CNI plugin. No I/O and no async here, so everything is testable without privileges.

#![forbid(unsafe_code)]

pub mod config;
pub mod events;
pub mod gojson;
pub mod lease;
pub mod peer_filter;
pub mod subnet;
pub mod subnet_env;
pub mod wireguard;

pub use config::{BackendConfig, ConfigError, NetworkConfig};
pub use events::{LeaseEvent, LeaseTracker, LeaseUpdate};
pub use lease::{Lease, LeaseAttrs, LeaseKey, MacAddr, VxlanData};
pub use peer_filter::{PeerFilter, PeerScope, RejectReason, Rejection};
pub use subnet::{Window, Window4, Window6};
pub use subnet_env::{PreviousSubnets, SubnetEnv};
pub use wireguard::{WgPublicKey, WireguardData};
