//! Prerequisite checks for tests that need the lab.

use std::path::Path;

use flannel_testkit::skip_or_fail;

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

/// True if the test `what` can run. Otherwise flannel_testkit's gate decides: skip
/// with a line saying why, or fail under `FLANNEL_E2E=1`.
pub fn ready(what: &str, needs: Needs) -> bool {
    match missing(needs) {
        None => true,
        Some(reason) => skip_or_fail(what, reason),
    }
}

/// [`ready`], and also every tool in `tools` (e.g. the firewall tools).
pub fn ready_with(what: &str, needs: Needs, tools: &[&str]) -> bool {
    if !ready(what, needs) {
        return false;
    }
    for tool in tools {
        if let Err(e) = find_tool(tool) {
            return skip_or_fail(what, e);
        }
    }
    true
}
