//! `ip monitor` inside a namespace, every event line recorded with its arrival time.
//!
//! Checks must not depend on timing: [`Monitor::barrier`] adds and removes a marker
//! route and waits until the monitor shows it, so every kernel change made before
//! the barrier has been delivered by then.

use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long [`Monitor::start`] and [`Monitor::barrier`] wait for the monitor.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Live output of `ip monitor` in one namespace; the process is killed on drop.
pub struct Monitor {
    ns: String,
    child: Child,
    rx: mpsc::Receiver<(Instant, String)>,
    lines: Vec<(Instant, String)>,
    barriers: u32,
}

impl Monitor {
    /// Starts `ip monitor <objects>` (routes are always included: the barrier needs
    /// them) in namespace `ns` and returns once it demonstrably receives events, with
    /// no lines recorded yet.
    pub fn start(ns: &str, objects: &[&str]) -> io::Result<Monitor> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", ns, "monitor"]).args(objects);
        if !objects.contains(&"route") {
            cmd.arg("route");
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)
            });
        }
        let mut child = cmd.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("ip monitor without stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("monitor-{ns}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            })?;
        let mut m = Monitor {
            ns: ns.to_string(),
            child,
            rx,
            lines: Vec::new(),
            barriers: 0,
        };
        m.try_barrier()?;
        Ok(m)
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }

    fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
    }

    /// Every line seen since the monitor was ready (or last cleared).
    pub fn lines(&mut self) -> Vec<String> {
        self.drain();
        self.lines.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Number of lines seen so far: pass it to [`Monitor::wait_for_after`].
    pub fn mark(&mut self) -> usize {
        self.drain();
        self.lines.len()
    }

    pub fn clear(&mut self) {
        self.drain();
        self.lines.clear();
    }

    /// Waits up to `timeout` for a line matching `pred` (also among lines seen
    /// earlier); returns when it arrived.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<Instant> {
        self.wait_for_after(0, timeout, pred)
    }

    /// Like [`Monitor::wait_for`] but only lines after `mark`.
    pub fn wait_for_after(
        &mut self,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut checked = mark;
        loop {
            self.drain();
            if let Some((t, _)) = self.lines.iter().skip(checked).find(|(_, l)| pred(l)) {
                return Some(*t);
            }
            checked = self.lines.len().max(mark);
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.lines.push(l),
                Err(_) => return None,
            }
        }
    }

    /// Whether the `ip monitor` process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Adds and removes a marker route and waits until the monitor has shown both:
    /// everything the kernel did before was delivered. Returns the lines since the
    /// previous barrier, before the marker, and forgets everything seen so far.
    /// Panics (failing the test) if the monitor shows nothing.
    pub fn barrier(&mut self) -> Vec<String> {
        self.try_barrier()
            .unwrap_or_else(|e| panic!("ip monitor in {}: {e}", self.ns))
    }

    fn try_barrier(&mut self) -> io::Result<Vec<String>> {
        self.barriers += 1;
        // A fresh marker each time: replacing an identical route makes no event.
        let marker = format!("198.51.100.{}/32", 1 + self.barriers % 254);
        let shown = format!("{} ", marker.trim_end_matches("/32"));
        let deadline = Instant::now() + READY_TIMEOUT;
        let start = self.mark();
        loop {
            self.ip(&["route", "add", "blackhole", &marker])?;
            self.ip(&["route", "del", "blackhole", &marker])?;
            let added = self.wait_for_after(start, Duration::from_millis(300), |l| {
                !l.starts_with("Deleted") && l.contains(&shown)
            });
            if added.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other("ip monitor shows no events"));
            }
        }
        self.wait_for_after(start, READY_TIMEOUT, |l| {
            l.starts_with("Deleted") && l.contains(&shown)
        });
        self.drain();
        let pos = self
            .lines
            .iter()
            .position(|(_, l)| l.contains(&shown))
            .unwrap_or(self.lines.len());
        let before = self.lines.drain(..).take(pos).map(|(_, l)| l).collect();
        Ok(before)
    }

    fn ip(&self, args: &[&str]) -> io::Result<()> {
        let out = Command::new("ip")
            .args(["-n", &self.ns])
            .args(args)
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "ip -n {} {}: {}",
                self.ns,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
