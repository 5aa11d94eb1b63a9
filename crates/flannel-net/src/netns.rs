//! Running code inside a named network namespace without moving any tokio thread.
//!
//! `setns(2)` changes the namespace of the calling *thread* only. A tokio worker that
//! entered another namespace would run every later task there, so namespace work
//! happens on a fresh, short-lived std thread: it enters the namespace, does the
//! namespace-bound part (open a socket, open a /proc/sys file, run a closure) and
//! exits. Sockets keep the namespace they were created in, so a netlink socket made
//! there can then be driven from any tokio thread.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The bind-mount path of the named namespace `name` (`/run/netns/<name>`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Why code could not be run inside a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened (usually: no such namespace).
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// The kernel refused to switch the thread into the namespace.
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    /// The helper thread could not be started.
    #[error("cannot start a thread for network namespace {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    /// The closure panicked on the helper thread.
    #[error("the work inside network namespace {0} panicked")]
    Panicked(PathBuf),
}

fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `f` on a new std thread that first enters the network namespace at `path`,
/// and waits for it. Blocks the caller: from async code use [`run_in_netns_async`].
pub fn run_in_netns<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("flannel-netns".into())
            .spawn_scoped(s, || {
                enter(path)?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Spawn {
                path: path.to_path_buf(),
                source,
            })?;
        handle
            .join()
            .map_err(|_| NetnsError::Panicked(path.to_path_buf()))?
    })
}

/// Starts `f` on a new std thread that first enters the network namespace at `path`,
/// and returns at once: for work that must run beside the caller (a server that
/// accepts while the caller connects). Join the handle for `f`'s result.
pub fn spawn_in_netns<T, F>(
    path: &Path,
    f: F,
) -> Result<std::thread::JoinHandle<Result<T, NetnsError>>, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let thread_path = path.to_path_buf();
    std::thread::Builder::new()
        .name("flannel-netns".into())
        .spawn(move || enter(&thread_path).map(|()| f()))
        .map_err(|source| NetnsError::Spawn {
            path: path.to_path_buf(),
            source,
        })
}

/// Like [`run_in_netns`], but awaits the helper thread instead of blocking. The
/// thread is a plain std thread, never one of tokio's (blocking-pool threads are
/// reused, so a namespace switch there would leak into unrelated work).
pub async fn run_in_netns_async<T, F>(path: PathBuf, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("flannel-netns".into())
        .spawn(move || {
            let result = enter(&thread_path).map(|()| f());
            // The receiver only goes away if the caller was cancelled; nothing to do.
            let _ = tx.send(result);
        })
        .map_err(|source| NetnsError::Spawn {
            path: path.clone(),
            source,
        })?;
    rx.await.map_err(|_| NetnsError::Panicked(path))?
}

/// Runs `f` in the namespace at `path` if given, else directly on the calling thread
/// (which is then in the process's own namespace: we never move our threads).
pub(crate) async fn run_maybe_in_netns<T, F>(path: Option<&Path>, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match path {
        Some(p) => run_in_netns_async(p.to_path_buf(), f).await,
        None => Ok(f()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = run_in_netns(&netns_path("fl-no-such-namespace-x"), || 1).unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }), "{err}");
        assert!(err.to_string().contains("fl-no-such-namespace-x"));
    }

    #[test]
    fn own_namespace_runs_the_closure() {
        // Entering our own namespace is allowed for root and needs no setup; without
        // CAP_SYS_ADMIN the kernel refuses, which must surface as an error.
        let r = run_in_netns(Path::new("/proc/self/ns/net"), || 7);
        match r {
            Ok(v) => assert_eq!(v, 7),
            Err(e) => assert!(matches!(e, NetnsError::Enter { .. }), "{e}"),
        }
    }
}
