//! flannel-lab: a flannel cluster on one machine, built from network namespaces.
//!
//! An underlay namespace holds a bridge (198.18.0.254/24) and etcd; every host is a
//! namespace with one veth into that bridge (198.18.0.<n>/24), IP forwarding on and
//! flanneld running inside; pods are namespaces attached by the `flannel` CNI plugin
//! running in their host's namespace. The demo, the end-to-end tests and the
//! benchmarks all stand on [`Lab`].
//!
//! Safety: nothing is ever created in the root namespace. Namespaces are named
//! `flab-<pid>-<n>-...`, links are created from inside a lab namespace straight
//! into another, and everything is removed when the [`Lab`] is dropped (also while
//! panicking), on SIGINT/SIGTERM/SIGHUP ([`cleanup::install_signal_teardown`]), and
//! by [`cleanup::down`] for leftovers of a killed run. Processes get SIGKILL when the
//! thread that started them exits, unless the lab was built
//! [`keepable`](LabBuilder::keepable).

pub mod bench;
pub mod bench_kube;
pub mod bins;
pub mod checks;
pub mod cleanup;
pub mod e2e;
pub mod error;
pub mod etcd;
pub mod http;
pub mod kube_fake;
pub mod lab;
pub mod lease_writer;
pub mod leases;
pub mod measure;
pub mod process;
pub mod uapi;
pub mod wggo;

pub use error::{LabError, Result};
pub use flannel_testkit::Monitor;
pub use lab::{poll_until, BackgroundPing, Family, Host, Lab, LabBuilder, Pod, PodId, SubnetFile};
pub use measure::PingStats;

/// Whether this process runs as root (the lab needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
