//! Throw-away network namespaces for tests, veth pairs between them, and running a
//! closure inside one (through flannel_net's one namespace hop).
//!
//! Everything here works only inside namespaces it created; nothing touches the
//! namespace the test process runs in.

use std::io;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use flannel_net::netns::{netns_path, run_in_netns};
use flannel_net::{Netlink, NetlinkError};

/// Runs `f` on a fresh thread inside the named namespace and returns its result;
/// panics (failing the test) if the namespace cannot be entered.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    run_in_netns(&netns_path(ns), f).unwrap_or_else(|e| panic!("{e}"))
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace named `fl-<pid>-<n>-<tag>`, deleted on drop (also when the
/// test panics). Processes still running inside it are killed first.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

fn check(what: &str, out: io::Result<Output>) -> io::Result<String> {
    let out = out?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl TestNetns {
    /// Creates the namespace and sets its loopback up.
    pub fn new(tag: &str) -> io::Result<TestNetns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("fl-{}-{n}-{tag}", std::process::id());
        check(
            &format!("ip netns add {name}"),
            Command::new("ip").args(["netns", "add", &name]).output(),
        )?;
        let ns = TestNetns { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Runs a command inside the namespace (`ip netns exec`) and returns its output
    /// whatever its status.
    pub fn exec(&self, args: &[&str]) -> io::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
    }

    /// Runs a command inside the namespace; non-zero exit is an error carrying stderr.
    pub fn run(&self, args: &[&str]) -> io::Result<String> {
        check(
            &format!("[{}] {}", self.name, args.join(" ")),
            self.exec(args),
        )
    }

    /// A netlink connection inside the namespace.
    pub async fn netlink(&self) -> Result<Netlink, NetlinkError> {
        Netlink::connect_in(self.path()).await
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Only processes inside this namespace, which the test itself created.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Creates a veth pair with one end `a_if` in `a` and the other `b_if` in `b`. The
/// pair is created inside `a`, never in the caller's namespace.
pub fn veth_pair(a: &TestNetns, a_if: &str, b: &TestNetns, b_if: &str) -> io::Result<()> {
    a.run(&[
        "ip",
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_created_and_removed() {
        if !crate::gate::privileged("namespaces_are_created_and_removed") {
            return;
        }
        let path;
        {
            let a = TestNetns::new("t").unwrap();
            let b = TestNetns::new("t").unwrap();
            assert_ne!(a.name(), b.name());
            path = a.path();
            assert!(path.exists());
            veth_pair(&a, "va", &b, "vb").unwrap();
            assert!(a.run(&["ip", "link", "show", "va"]).is_ok());
            assert!(b.run(&["ip", "link", "show", "vb"]).is_ok());
        }
        assert!(!path.exists(), "namespace left behind");
    }
}
