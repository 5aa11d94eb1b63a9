//! Finding the binaries under test: `flanneld` and the CNI plugin `flannel`.

use std::path::PathBuf;

use crate::error::{LabError, Result};

/// Where to look for workspace binaries: `$FLANNEL_BIN_DIR` if set (only there),
/// else the directory of the running executable and its parent (tests run from
/// `target/<profile>/deps`, the binaries sit in `target/<profile>`).
pub fn search_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("FLANNEL_BIN_DIR") {
        return vec![PathBuf::from(d)];
    }
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    dirs
}

/// The path of workspace binary `name`.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let dirs = search_dirs();
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::MissingBinary {
            name: name.to_string(),
            looked: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The path of a system tool (`/usr/bin/etcd`, `iperf3`, ...), searched in `PATH`
/// when `name` has no slash.
pub fn find_tool(name: &str) -> Result<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(LabError::MissingBinary {
                name: name.to_string(),
                looked: name.to_string(),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::MissingBinary {
            name: name.to_string(),
            looked: "PATH".to_string(),
        })
}
