//! Running commands and owning the processes a lab starts.
//!
//! Every long-lived process a lab starts is a [`Proc`]: registered in a process-wide
//! registry under its lab's prefix so that a signal handler can kill it by PID, and
//! killed when dropped. Reaping happens under the registry lock, so a PID is never
//! signalled after it was reaped (and possibly reused).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{LabError, Result};

/// One lab as the process-wide registry knows it.
#[derive(Debug)]
pub(crate) struct LabRecord {
    pub prefix: String,
    pub run_dir: PathBuf,
    pub pids: Vec<u32>,
}

#[derive(Debug)]
pub(crate) struct Registry {
    /// Set by the signal path: from then on nothing new is created.
    pub shutting_down: bool,
    pub labs: Vec<LabRecord>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    shutting_down: false,
    labs: Vec::new(),
});

pub(crate) fn registry() -> MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves the data consistent (plain pushes and
    // removes), so poisoning is ignored: teardown must work after a panic.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn register_lab(prefix: &str, run_dir: &Path) -> Result<()> {
    let mut reg = registry();
    if reg.shutting_down {
        return Err(LabError::ShuttingDown);
    }
    reg.labs.push(LabRecord {
        prefix: prefix.to_string(),
        run_dir: run_dir.to_path_buf(),
        pids: Vec::new(),
    });
    Ok(())
}

pub(crate) fn unregister_lab(prefix: &str) {
    registry().labs.retain(|l| l.prefix != prefix);
}

/// Runs `f` while no signal teardown can start, failing if one already ran. Used
/// around every step that creates a namespace, so none is created after the
/// teardown listed them.
pub(crate) fn while_alive<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let reg = registry();
    if reg.shutting_down {
        return Err(LabError::ShuttingDown);
    }
    let out = f();
    drop(reg);
    out
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion with `input` on its stdin; returns its output
/// whatever the exit status.
pub fn output_with_input(mut cmd: Command, input: Option<&[u8]>) -> Result<Output> {
    let what = describe(&cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .map_err(|e| LabError::io(format!("spawn `{what}`"), e))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A child that exits without reading its stdin gives EPIPE: its output and
        // status tell what happened, so the write error itself is not interesting.
        let _ = stdin.write_all(input);
    }
    child
        .wait_with_output()
        .map_err(|e| LabError::io(format!("wait for `{what}`"), e))
}

/// Runs a command and requires success; returns its stdout.
pub fn run(cmd: Command) -> Result<String> {
    let what = describe(&cmd);
    let out = output_with_input(cmd, None)?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `Command::new(program).args(args)` without the boilerplate.
pub fn command<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// `ip <args>`, required to succeed.
pub fn ip(args: &[&str]) -> Result<String> {
    run(command("ip", args))
}

/// A process the lab started and owns. Dropping it kills it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pid: u32,
    name: String,
    lab: String,
    status: Option<ExitStatus>,
}

/// Where a spawned process's stdout and stderr go.
pub enum ProcOutput {
    /// Both appended to this file.
    File(PathBuf),
    /// stdout piped (take it with [`Proc::take_stdout`]), stderr discarded.
    PipeStdout,
    /// Both discarded.
    Null,
}

impl Proc {
    /// Spawns `cmd` for the lab `lab` (its prefix). With `die_with_parent` the
    /// process gets SIGKILL when the spawning thread exits, so nothing outlives a
    /// killed test run.
    pub(crate) fn spawn(
        mut cmd: Command,
        name: &str,
        lab: &str,
        out: ProcOutput,
        die_with_parent: bool,
    ) -> Result<Proc> {
        let what = describe(&cmd);
        cmd.stdin(Stdio::null());
        match out {
            ProcOutput::File(path) => {
                let f = File::options()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| LabError::io(format!("open {}", path.display()), e))?;
                let f2 = f
                    .try_clone()
                    .map_err(|e| LabError::io(format!("dup {}", path.display()), e))?;
                cmd.stdout(f).stderr(f2);
            }
            ProcOutput::PipeStdout => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::null());
            }
            ProcOutput::Null => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        if die_with_parent {
            // SAFETY: the closure runs in the forked child before exec and only calls
            // prctl(2) and getppid(2), both async-signal-safe; it touches no memory
            // shared with the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died between fork and prctl.
                    if libc::getppid() == 1 {
                        return Err(std::io::Error::other("parent exited"));
                    }
                    Ok(())
                });
            }
        }
        let mut reg = registry();
        if reg.shutting_down {
            return Err(LabError::ShuttingDown);
        }
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io(format!("spawn `{what}`"), e))?;
        let pid = child.id();
        if let Some(rec) = reg.labs.iter_mut().find(|l| l.prefix == lab) {
            rec.pids.push(pid);
        }
        drop(reg);
        Ok(Proc {
            child,
            pid,
            name: name.to_string(),
            lab: lab.to_string(),
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The piped stdout (once), for processes spawned with [`ProcOutput::PipeStdout`].
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Sends `sig` unless the process was already reaped.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_wait().is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid)
            .map_err(|_| LabError::Invalid(format!("pid {} out of range", self.pid)))?;
        match kill(Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(LabError::io(
                format!("kill -{sig} {} ({})", self.pid, self.name),
                e.into(),
            )),
        }
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let mut reg = registry();
        if let Ok(Some(st)) = self.child.try_wait() {
            self.status = Some(st);
            if let Some(rec) = reg.labs.iter_mut().find(|l| l.prefix == self.lab) {
                rec.pids.retain(|p| *p != self.pid);
            }
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_timeout(Duration::from_secs(30))
            .ok_or_else(|| LabError::Timeout {
                what: format!("{} (pid {}) to die after SIGKILL", self.name, self.pid),
                after: Duration::from_secs(30),
            })
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`. Returns the exit
    /// status and whether SIGKILL was needed.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        self.signal(Signal::SIGTERM)?;
        if let Some(st) = self.wait_timeout(grace) {
            return Ok((st, false));
        }
        Ok((self.kill()?, true))
    }

    pub fn exited(&mut self) -> bool {
        self.try_wait().is_some()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Text for an exit status: `exit 0`, `signal 9`.
pub fn status_text(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => st.to_string(),
    }
}
