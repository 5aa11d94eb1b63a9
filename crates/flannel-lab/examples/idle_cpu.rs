//! Idle CPU of flanneld: a 2-host lab (vxlan, `--ip-masq`), agents left alone for 60 s
//! after startup; prints the CPU time each agent used in that window, its own
//! (utime+stime of all its threads) plus that of the children it reaped
//! (cutime+cstime: iptables-save, nft...), from /proc/<pid>/stat. Once in iptables
//! mode and once in nftables mode.
//!
//! Reference: upstream flanneld v0.20.2 used 380–460 ms per 60 s idle in the same lab;
//! the goal for flannel-rs is ≤ 20 ms.
//!
//! ```text
//! cargo build --release -p flanneld
//! FLANNEL_BIN_DIR=target/release cargo run --release -p flannel-lab --example idle_cpu
//! ```
//! Options (env): `IDLE_SECS` (default 60), `SETTLE_SECS` after startup (default 5).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flannel_lab::Lab;

/// CPU times of one process in clock ticks.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn read_cpu(pid: u32) -> Result<Cpu> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // stat(5) fields 14..=17; `rest` starts at field 3.
    let field = |n: usize| -> Result<u64> {
        f.get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {n} of {path}"))
    };
    Ok(Cpu {
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// On-CPU time of every thread of `pid` in ns (/proc/<pid>/task/<tid>/schedstat).
fn thread_ns(pid: u32) -> Vec<(u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            Some((tid, s.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// Per-thread on-CPU time with ns resolution, sampled every 100 ms so that threads
/// that come and go (tokio's blocking pool) are counted too: a thread seen first
/// after the start counts from zero; a thread's time after its last sample is lost.
#[derive(Default)]
struct ThreadTimes {
    /// tid → (ns at first sight, ns at last sight).
    seen: std::collections::HashMap<u64, (u64, u64)>,
    samples: usize,
    max_threads: usize,
}

impl ThreadTimes {
    fn sample(&mut self, pid: u32) {
        let now = thread_ns(pid);
        self.max_threads = self.max_threads.max(now.len());
        let first = self.samples == 0;
        for (tid, ns) in now {
            let e = self
                .seen
                .entry(tid)
                .or_insert((if first { ns } else { 0 }, ns));
            e.1 = ns;
        }
        self.samples += 1;
    }

    fn total_ms(&self) -> f64 {
        self.seen
            .values()
            .map(|(a, b)| b.saturating_sub(*a))
            .sum::<u64>() as f64
            / 1e6
    }
}

fn env_secs(name: &str, default: u64) -> Result<Duration> {
    match std::env::var(name) {
        Ok(v) => Ok(Duration::from_secs(
            v.parse().with_context(|| format!("{name}={v}"))?,
        )),
        Err(_) => Ok(Duration::from_secs(default)),
    }
}

fn main() -> Result<()> {
    if !flannel_lab::is_root() {
        bail!("the lab needs root");
    }
    let idle = env_secs("IDLE_SECS", 60)?;
    let settle = env_secs("SETTLE_SECS", 5)?;
    // SAFETY: sysconf only reads a configuration value.
    let tick_ms = 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    println!(
        "idle CPU of flanneld, 2 hosts, {} s idle after {} s settling (clock tick {tick_ms} ms)",
        idle.as_secs(),
        settle.as_secs()
    );
    println!("reference: upstream v0.20.2 380-460 ms per 60 s; goal <= 20 ms");
    for (label, nft) in [
        ("vxlan, --ip-masq, iptables mode", false),
        ("vxlan, --ip-masq, nftables mode", true),
    ] {
        let mut lab = Lab::builder()
            .hosts(2)
            .nftables(nft)
            .ip_masq(true)
            .build()
            .context("building the lab")?;
        std::thread::sleep(settle);
        let pids: Vec<u32> = (0..2)
            .map(|h| lab.agent_pid(h).context("agent not running"))
            .collect::<Result<_>>()?;
        let mut threads: Vec<ThreadTimes> = pids.iter().map(|_| ThreadTimes::default()).collect();
        for (t, p) in threads.iter_mut().zip(&pids) {
            t.sample(*p);
        }
        let before: Vec<Cpu> = pids.iter().map(|p| read_cpu(*p)).collect::<Result<_>>()?;
        let t0 = Instant::now();
        while t0.elapsed() < idle {
            std::thread::sleep(Duration::from_millis(100).min(idle.saturating_sub(t0.elapsed())));
            for (t, p) in threads.iter_mut().zip(&pids) {
                t.sample(*p);
            }
        }
        let after: Vec<Cpu> = pids.iter().map(|p| read_cpu(*p)).collect::<Result<_>>()?;
        let window = t0.elapsed().as_secs_f64();
        lab.check_agents()?;
        println!("{label}:");
        for (h, ((b, a), t)) in before.iter().zip(&after).zip(&threads).enumerate() {
            let own = (a.utime + a.stime - b.utime - b.stime) as f64 * tick_ms;
            let children = (a.cutime + a.cstime - b.cutime - b.cstime) as f64 * tick_ms;
            let per60 = (own + children) * 60.0 / window;
            let threads_ms = t.total_ms();
            println!(
                "  host {}: {:.0} ms own + {:.0} ms children = {:.0} ms in {:.1} s ({:.0} ms per 60 s); \
                 threads' schedstat {:.2} ms (up to {} threads)",
                h + 1,
                own,
                children,
                own + children,
                window,
                per60,
                threads_ms,
                t.max_threads
            );
        }
        lab.teardown()?;
    }
    Ok(())
}
