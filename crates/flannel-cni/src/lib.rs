//! The flannel CNI plugin (`flannel`), a meta-plugin: it reads the lease flanneld
//! wrote to subnet.env, turns the netconf's `delegate` into a complete config for
//! `bridge` + `host-local` (docs/compatibility.md, "CNI plugin netconf and delegate
//! config"), saves that config for DEL and runs the
//! delegate. Compatible with flannel-io/cni-plugin: same netconf keys, same saved
//! file bytes, same delegate config.

#![forbid(unsafe_code)]

pub mod delegate;
pub mod error;
pub mod exec;
pub mod flannel_env;
pub mod gomarshal;
pub mod netconf;
pub mod plugin;
pub mod version;

pub use error::CniError;
pub use flannel_env::FlannelEnv;
pub use netconf::NetConf;
pub use plugin::{run, Outcome};
