//! Running the firewall tools, optionally inside a named network namespace.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStderr, ChildStdout, Command, Output, Stdio};
use std::sync::OnceLock;

use super::nfnl::CommitWatch;
use super::RulesError;

/// Where commands run: the current namespace, or `ip netns exec <name>`.
#[derive(Clone, Debug)]
pub(crate) struct Runner {
    netns: Option<String>,
}

impl Runner {
    pub(crate) fn new(netns: Option<String>) -> Self {
        Runner { netns }
    }

    pub(crate) fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Run `program args…`, feed `stdin` if given, and return stdout. A non-zero exit is an
    /// error carrying stderr.
    pub(crate) fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, RulesError> {
        let child = self.spawn(program, args, stdin)?;
        let out = child
            .wait_with_output()
            .map_err(|source| RulesError::Spawn {
                command: describe(program, args),
                source,
            })?;
        self.finish(program, args, out)
    }

    /// Run a tool that writes `commits` nf_tables batches (one `iptables-restore` COMMIT
    /// section each, or one `nft -f`), and return as soon as `watch` has seen all of
    /// them committed by that process, without waiting for it to exit: every batch
    /// either commits whole or not at all, so at that point the tool's work is in place,
    /// and its exit is only the netlink socket close, which can wait for an RCU grace
    /// period. The exit status is then collected by a thread that logs a failure.
    ///
    /// Without a usable watch (legacy iptables, or a pid namespace whose pids differ
    /// from the global ones the kernel reports) this is [`Runner::run`].
    pub(crate) fn run_commit(
        &self,
        program: &str,
        args: &[&str],
        stdin: &str,
        commits: usize,
        watch: Option<&mut CommitWatch>,
    ) -> Result<String, RulesError> {
        let watch = match watch {
            Some(w) if commits > 0 && in_init_pid_namespace() && w.subscribe(true).is_ok() => w,
            _ => return self.run(program, args, Some(stdin)),
        };
        // Anything queued before the tool started is not the tool's.
        let mut watching = watch.read_commits(|_| {}).is_ok();
        let mut child = match self.spawn(program, args, Some(stdin)) {
            Ok(c) => c,
            Err(e) => {
                watch.stop();
                return Err(e);
            }
        };
        let pid = child.id();
        let mut pipes = Pipes::new(&mut child);
        let mut seen = 0usize;
        let committed = loop {
            if pipes.done() {
                break false;
            }
            let mut fds = pipes.pollfds();
            if watching {
                fds.push(libc::pollfd {
                    fd: watch.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length, all open fds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // poll itself failed: fall back to a plain wait below.
                break false;
            }
            if watching && fds.last().is_some_and(|p| p.revents != 0) {
                let res = watch.read_commits(|p| {
                    if p == pid {
                        seen += 1;
                    }
                });
                if res.is_err() {
                    // Notifications were lost: only the exit status can tell now.
                    watching = false;
                }
                if seen >= commits {
                    break true;
                }
            }
            pipes.read_ready(&fds);
        };
        watch.stop();
        if committed {
            #[cfg(test)]
            counts::note(self.netns.as_deref(), |c| c.committed_early += 1);
            let command = describe(program, args);
            let stdout = String::from_utf8_lossy(&pipes.out).into_owned();
            let reaper = std::thread::Builder::new()
                .name("rules-reap".into())
                .spawn(move || {
                    while !pipes.done() {
                        let mut fds = pipes.pollfds();
                        // SAFETY: as above.
                        let r =
                            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                        if r < 0 {
                            break;
                        }
                        pipes.read_ready(&fds);
                    }
                    match child.wait() {
                        Ok(st) if st.success() => {}
                        Ok(st) => tracing::warn!(
                            "{command} exited with {st} after its changes were committed: {}",
                            String::from_utf8_lossy(&pipes.err).trim()
                        ),
                        Err(e) => tracing::debug!("waiting for {command}: {e}"),
                    }
                });
            // If no thread can be started, waiting here is still correct, only slower.
            if let Err(e) = reaper {
                tracing::debug!("cannot start a thread to reap {program}: {e}");
            }
            return Ok(stdout);
        }
        // Read the rest (if the loop ended early) and wait for the exit status.
        while !pipes.done() {
            let mut fds = pipes.pollfds();
            // SAFETY: as above.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
            pipes.read_ready(&fds);
        }
        let status = child.wait().map_err(|source| RulesError::Spawn {
            command: describe(program, args),
            source,
        })?;
        self.finish(
            program,
            args,
            Output {
                status,
                stdout: std::mem::take(&mut pipes.out),
                stderr: std::mem::take(&mut pipes.err),
            },
        )
    }

    fn spawn(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Child, RulesError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The tools print localised messages otherwise; our parsers want the C locale.
            .env("LC_ALL", "C");
        #[cfg(test)]
        counts::note(self.netns.as_deref(), |c| {
            c.spawned.push(program.to_string())
        });
        let mut child = cmd.spawn().map_err(|source| RulesError::Spawn {
            command: describe(program, args),
            source,
        })?;
        if let Some(input) = stdin {
            if let Some(mut pipe) = child.stdin.take() {
                // A tool that exits early closes its stdin; its exit status says why.
                let _ = pipe.write_all(input.as_bytes());
            }
        }
        Ok(child)
    }

    fn finish(&self, program: &str, args: &[&str], out: Output) -> Result<String, RulesError> {
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            // `ip netns exec` reports a missing tool with exit status 255 and this text;
            // treat it like a failed spawn so "tool missing" stays recognisable.
            if self.netns.is_some()
                && stderr.contains("No such file or directory")
                && stderr.contains("exec of")
            {
                return Err(RulesError::Spawn {
                    command: describe(program, args),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, stderr),
                });
            }
            return Err(RulesError::Command {
                command: describe(program, args),
                status: out.status.to_string(),
                stderr,
            });
        }
        String::from_utf8(out.stdout).map_err(|e| RulesError::Output {
            command: describe(program, args),
            detail: e.to_string(),
        })
    }
}

fn describe(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// The kernel reports a committing process by its pid in the initial pid namespace; only
/// there is that the pid `Child::id` returns. (Elsewhere the same number may belong to
/// another process, e.g. a host daemon sharing the network namespace.)
fn in_init_pid_namespace() -> bool {
    static INIT: OnceLock<bool> = OnceLock::new();
    *INIT.get_or_init(|| {
        // PROC_PID_INIT_INO: the fixed inode number of the initial pid namespace.
        std::fs::read_link("/proc/self/ns/pid")
            .map(|l| l.as_os_str() == "pid:[4026531836]")
            .unwrap_or(false)
    })
}

/// A child's stdout and stderr, read as they become ready so it never blocks on a full
/// pipe while we wait for something else.
struct Pipes {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out: Vec<u8>,
    err: Vec<u8>,
}

impl Pipes {
    fn new(child: &mut Child) -> Self {
        Pipes {
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            out: Vec::new(),
            err: Vec::new(),
        }
    }

    fn done(&self) -> bool {
        self.stdout.is_none() && self.stderr.is_none()
    }

    /// stdout's pollfd first (if open), then stderr's.
    fn pollfds(&self) -> Vec<libc::pollfd> {
        let mut v = Vec::with_capacity(3);
        for fd in [
            self.stdout.as_ref().map(|p| p.as_raw_fd()),
            self.stderr.as_ref().map(|p| p.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        {
            v.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        v
    }

    /// Read from the pipes `poll` marked in `fds` (as laid out by `pollfds`); a pipe at
    /// end of file (or failing) is closed.
    fn read_ready(&mut self, fds: &[libc::pollfd]) {
        let mut i = 0;
        let mut buf = [0u8; 8192];
        if let Some(p) = self.stdout.as_mut() {
            if fds[i].revents != 0 {
                match p.read(&mut buf) {
                    Ok(0) | Err(_) => self.stdout = None,
                    Ok(n) => self.out.extend_from_slice(&buf[..n]),
                }
            }
            i += 1;
        }
        if let Some(p) = self.stderr.as_mut() {
            if fds[i].revents != 0 {
                match p.read(&mut buf) {
                    Ok(0) | Err(_) => self.stderr = None,
                    Ok(n) => self.err.extend_from_slice(&buf[..n]),
                }
            }
        }
    }
}

/// What the runner did per namespace, for tests that count forks.
#[cfg(test)]
pub(crate) mod counts {
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Clone, Debug, Default)]
    pub(crate) struct Counts {
        /// Programs started, in order.
        pub(crate) spawned: Vec<String>,
        /// `run_commit` calls that returned on the commit notification.
        pub(crate) committed_early: usize,
    }

    static BY_NETNS: Mutex<Option<HashMap<String, Counts>>> = Mutex::new(None);

    pub(crate) fn note(netns: Option<&str>, f: impl FnOnce(&mut Counts)) {
        let Some(ns) = netns else { return };
        let mut g = BY_NETNS.lock().unwrap_or_else(|e| e.into_inner());
        f(g.get_or_insert_with(HashMap::new)
            .entry(ns.to_string())
            .or_default());
    }

    /// Return and reset the counts of `netns`.
    pub(crate) fn take(netns: &str) -> Counts {
        let mut g = BY_NETNS.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(HashMap::new)
            .remove(netns)
            .unwrap_or_default()
    }
}
