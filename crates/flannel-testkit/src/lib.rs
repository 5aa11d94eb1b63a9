//! Test helpers shared by every crate's tests (a dev-only crate: nothing shipped
//! depends on it, except the lab, which is a test tool itself).
//!
//! * [`gate`]: the FLANNEL_E2E skip-or-fail gate, one message format.
//! * [`netns`]: throw-away namespaces ([`TestNetns`]), veth pairs and running a
//!   closure inside a namespace.
//! * [`monitor`]: `ip monitor` with a barrier, for "nothing was deleted" checks.
//! * [`wait`]: polling until a condition holds ([`eventually`]).
//! * [`etcd`]: a real etcd process on 127.0.0.1 and a proxy that can cut it off.
//! * [`logs`]: a capture of what the code under test logs.

pub mod etcd;
pub mod gate;
pub mod logs;
pub mod monitor;
pub mod netns;
pub mod wait;

pub use gate::{e2e_required, privileged, require, skip_or_fail, tool_exists};
pub use logs::LogCapture;
pub use monitor::Monitor;
pub use netns::{in_netns, veth_pair, TestNetns};
pub use wait::eventually;
