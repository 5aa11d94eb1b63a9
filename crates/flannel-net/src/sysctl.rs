//! Reading and writing sysctls (/proc/sys) in a given network namespace. Not netlink:
//! /proc/sys/net is per namespace, resolved by the namespace of the thread that opens
//! the file, so the open happens on a thread inside the namespace.

use std::io;
use std::path::{Path, PathBuf};

use crate::netns::{run_maybe_in_netns, NetnsError};

/// A failed sysctl read or write.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The key would leave /proc/sys or is empty.
    #[error("invalid sysctl key {0:?}")]
    InvalidKey(String),
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

fn sysctl_path(key: &str) -> Result<PathBuf, SysctlError> {
    // The dotted form cannot name devices with dots (flannel.1); a key with a slash
    // is taken as a path as it is.
    let key = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    if key.is_empty() || key.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(SysctlError::InvalidKey(key));
    }
    Ok(Path::new("/proc/sys").join(key))
}

/// Writes a sysctl (`net/ipv6/conf/flannel.1/accept_ra` or the dotted form) in the
/// namespace at `netns` (`None`: the process's own).
pub async fn write(netns: Option<&Path>, key: &str, value: &str) -> Result<(), SysctlError> {
    let path = sysctl_path(key)?;
    let value_owned = value.to_string();
    run_maybe_in_netns(netns, move || std::fs::write(&path, value_owned))
        .await?
        .map_err(|source| SysctlError::Io {
            op: format!("write sysctl {key}={value}"),
            source,
        })
}

/// Reads a sysctl in the namespace at `netns` (trimmed).
pub async fn read(netns: Option<&Path>, key: &str) -> Result<String, SysctlError> {
    let path = sysctl_path(key)?;
    run_maybe_in_netns(netns, move || std::fs::read_to_string(&path))
        .await?
        .map(|s| s.trim().to_string())
        .map_err(|source| SysctlError::Io {
            op: format!("read sysctl {key}"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_are_confined_to_proc_sys() {
        assert_eq!(
            sysctl_path("net/ipv6/conf/eth0/accept_ra").unwrap(),
            Path::new("/proc/sys/net/ipv6/conf/eth0/accept_ra")
        );
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv6/conf/flannel.1/accept_ra").unwrap(),
            Path::new("/proc/sys/net/ipv6/conf/flannel.1/accept_ra")
        );
        assert!(sysctl_path("net/../../etc/passwd").is_err());
        assert!(sysctl_path("").is_err());
    }
}
