//! Prerequisite checks for tests that need the lab.

use std::path::Path;

use crate::bins::{find_binary, find_tool};
use crate::lab::{CNI_PATH, ETCD_BIN};

/// What a lab test needs besides root and the system tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// The CNI plugin `flannel` (pods) but no agent.
    CniOnly,
    /// `flanneld` and the CNI plugin.
    Agents,
}

/// Why the lab cannot run here, if it cannot.
pub fn missing(needs: Needs) -> Option<String> {
    if !crate::is_root() {
        return Some("not running as root".into());
    }
    for tool in [
        "ip", "bridge", "ping", "iperf3", "sysctl", "etcdctl", ETCD_BIN,
    ] {
        if let Err(e) = find_tool(tool) {
            return Some(e.to_string());
        }
    }
    for plugin in ["bridge", "host-local"] {
        let p = Path::new(CNI_PATH).join(plugin);
        if !p.is_file() {
            return Some(format!("CNI plugin {} missing", p.display()));
        }
    }
    if !Path::new("/run/netns").exists() && std::fs::create_dir_all("/run/netns").is_err() {
        return Some("cannot create /run/netns".into());
    }
    let mut bins = vec!["flannel"];
    if needs == Needs::Agents {
        bins.push("flanneld");
    }
    for b in bins {
        if let Err(e) = find_binary(b) {
            return Some(e.to_string());
        }
    }
    None
}

/// True if the test `what` can run. Otherwise prints why and returns false, or
/// panics when `FLANNEL_E2E=1` (CI: a missing prerequisite is a failure there).
pub fn ready(what: &str, needs: Needs) -> bool {
    let Some(reason) = missing(needs) else {
        return true;
    };
    if std::env::var("FLANNEL_E2E").as_deref() == Ok("1") {
        panic!("{what}: FLANNEL_E2E=1 but {reason}");
    }
    eprintln!("skipping {what}: {reason} (set FLANNEL_E2E=1 to make this a failure)");
    false
}
