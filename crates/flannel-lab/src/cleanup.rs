//! Removing what labs leave behind: namespaces by prefix, run directories, and the
//! signal path that tears every lab of this process down on SIGINT/SIGTERM/SIGHUP.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

use crate::error::{LabError, Result};
use crate::process::{ip, registry};

/// Every namespace and run directory a lab creates starts with this.
pub const NAME_PREFIX: &str = "flab-";

/// Where run directories (logs, etcd data, subnet.env, CNI state) live:
/// `$FLANNEL_LAB_DIR`, else /dev/shm (etcd fsyncs a lot; tmpfs keeps that cheap on a
/// busy disk), else the system temp dir.
pub fn runs_root() -> PathBuf {
    if let Some(d) = std::env::var_os("FLANNEL_LAB_DIR") {
        return PathBuf::from(d);
    }
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        return shm;
    }
    std::env::temp_dir()
}

/// Names of all network namespaces (`ip netns list`).
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Whether namespace `name` belongs to the lab with prefix `prefix` (`flab-1-1`
/// owns `flab-1-1-h1`, not `flab-1-10-h1`).
pub fn belongs(name: &str, prefix: &str) -> bool {
    name == prefix
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// Deletes every namespace of the lab `prefix`; keeps going on errors and returns
/// them.
pub fn delete_namespaces(prefix: &str) -> Vec<LabError> {
    let mut errors = Vec::new();
    let names = match list_namespaces() {
        Ok(n) => n,
        Err(e) => return vec![e],
    };
    for ns in names.iter().filter(|n| belongs(n, prefix)) {
        release_keepers(ns);
        if let Err(e) = ip(&["netns", "del", ns]) {
            errors.push(e);
        }
    }
    errors
}

/// Deletes the TUN devices in `ns` first. An agent's fd keeper (udp, wireguard)
/// lives in the namespace and holds its TUN device; it exits when the device is
/// deleted. `ip netns del` alone only drops the name: the keeper would keep the
/// namespace, its device and itself alive for good. Best effort: an error here
/// shows up as a leftover keeper, not as a failed teardown.
fn release_keepers(ns: &str) {
    let Ok(out) = ip(&["-n", ns, "-o", "link", "show", "type", "tun"]) else {
        return;
    };
    for name in out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| !n.is_empty())
    {
        let _ = ip(&["-n", ns, "link", "del", &name]);
    }
}

/// The lab prefix (`flab-<pid>-<n>`) a namespace or directory name starts with,
/// and the pid in it.
pub fn lab_prefix_of(name: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let n = parts.next()?;
    // Only digits: `<n>` ends where the namespace role suffix (`-u`, `-h1`) starts.
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((format!("{NAME_PREFIX}{pid}-{n}"), pid))
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 only checks existence; EPERM still means "exists".
    !matches!(
        kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// What `flannel-lab down` did.
#[derive(Debug, Default)]
pub struct DownReport {
    pub removed_namespaces: Vec<String>,
    pub removed_dirs: Vec<PathBuf>,
    pub killed: Vec<(u32, String)>,
    /// Labs left alone, with the reason.
    pub skipped: Vec<(String, String)>,
    pub errors: Vec<String>,
}

/// Removes the leftovers of labs whose process is gone: processes inside their
/// namespaces (started by that lab), the namespaces, and the run directories. With
/// `only` just that lab, even if the process that made it still runs (a `--keep`
/// demo's processes are what the user asked to remove). Only names starting with
/// `flab-` are ever touched.
pub fn down(only: Option<&str>) -> Result<DownReport> {
    if let Some(p) = only {
        match lab_prefix_of(p) {
            Some((lp, _)) if lp == p => {}
            _ => {
                return Err(LabError::Invalid(format!(
                    "{p:?} is not a lab prefix (expected {NAME_PREFIX}<pid>-<n>)"
                )))
            }
        }
    }
    let mut labs: BTreeMap<String, (u32, Vec<String>, Vec<PathBuf>)> = BTreeMap::new();
    for ns in list_namespaces()? {
        if let Some((lp, pid)) = lab_prefix_of(&ns) {
            labs.entry(lp).or_insert((pid, vec![], vec![])).1.push(ns);
        }
    }
    let root = runs_root();
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((lp, pid)) = lab_prefix_of(&name) {
                if lp == name {
                    labs.entry(lp)
                        .or_insert((pid, vec![], vec![]))
                        .2
                        .push(e.path());
                }
            }
        }
    }
    let me = std::process::id();
    let mut report = DownReport::default();
    for (lp, (pid, namespaces, dirs)) in labs {
        match only {
            Some(p) if p != lp => continue,
            Some(_) => {}
            None if pid == me || pid_alive(pid) => {
                report.skipped.push((
                    lp.clone(),
                    format!("process {pid} still runs; name the prefix to remove it anyway"),
                ));
                continue;
            }
            None => {}
        }
        for ns in &namespaces {
            if let Ok(out) = ip(&["netns", "pids", ns]) {
                for p in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    let comm = std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    match kill(Pid::from_raw(p), Signal::SIGKILL) {
                        Ok(()) => report.killed.push((p as u32, comm)),
                        Err(nix::errno::Errno::ESRCH) => {}
                        Err(e) => report.errors.push(format!("kill {p} ({comm}): {e}")),
                    }
                }
            }
            match ip(&["netns", "del", ns]) {
                Ok(_) => report.removed_namespaces.push(ns.clone()),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        for d in dirs {
            match std::fs::remove_dir_all(&d) {
                Ok(()) => report.removed_dirs.push(d),
                Err(e) => report.errors.push(format!("remove {}: {e}", d.display())),
            }
        }
    }
    Ok(report)
}

/// Tears down every lab of this process right now: SIGKILL to their processes,
/// their namespaces deleted, their run directories removed. Afterwards nothing new
/// can be created. For the signal path; normal code drops its `Lab`.
pub fn teardown_all() {
    let mut reg = registry();
    reg.shutting_down = true;
    for lab in reg.labs.drain(..) {
        for pid in &lab.pids {
            if let Ok(p) = i32::try_from(*pid) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        for e in delete_namespaces(&lab.prefix) {
            eprintln!("flannel-lab: teardown of {}: {e}", lab.prefix);
        }
        let _ = std::fs::remove_dir_all(&lab.run_dir);
    }
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `b` lives for the call and the fd is
        // the write end of a pipe that is never closed.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP tear down every lab of this process
/// ([`teardown_all`]) and then exit with 128 + signal. Idempotent; `Lab::build`
/// calls it, so tests interrupted with Ctrl-C leave nothing behind either.
pub fn install_signal_teardown() -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| result = install());
    result
}

fn install() -> Result<()> {
    let (r, w) = nix::unistd::pipe().map_err(|e| LabError::io("pipe", e.into()))?;
    SIGNAL_PIPE.store(w.into_raw_fd(), Ordering::Relaxed);
    std::thread::Builder::new()
        .name("flannel-lab-signal".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            loop {
                // SAFETY: reads one byte into a local buffer from a pipe fd owned by
                // this thread (`r` lives as long as the loop).
                let n = unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
                if n == 1 {
                    break;
                }
                if n == 0 {
                    return;
                }
            }
            eprintln!("flannel-lab: signal {}: tearing the lab down", b[0]);
            teardown_all();
            std::process::exit(128 + i32::from(b[0]));
        })
        .map_err(|e| LabError::io("spawn signal thread", e))?;
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only calls write(2) on a pipe (async-signal-safe) and
        // reads an atomic.
        unsafe { sigaction(sig, &action) }
            .map_err(|e| LabError::io(format!("sigaction {sig}"), e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_recognised_exactly() {
        assert_eq!(
            lab_prefix_of("flab-123-4-h1"),
            Some(("flab-123-4".to_string(), 123))
        );
        assert_eq!(
            lab_prefix_of("flab-123-4"),
            Some(("flab-123-4".to_string(), 123))
        );
        assert_eq!(
            lab_prefix_of("flab-123-4-h2p3"),
            Some(("flab-123-4".to_string(), 123))
        );
        assert_eq!(lab_prefix_of("flab-x-4-h1"), None);
        assert_eq!(lab_prefix_of("fl-123-4"), None);
        assert_eq!(lab_prefix_of("flab-123-h1"), None);
        assert!(belongs("flab-1-1-h1", "flab-1-1"));
        assert!(belongs("flab-1-1", "flab-1-1"));
        assert!(!belongs("flab-1-10-h1", "flab-1-1"));
        assert!(!belongs("flab-1-1x", "flab-1-1"));
    }
}
