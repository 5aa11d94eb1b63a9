//! Reading the output of ping, iperf3 and /proc.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::error::{LabError, Result};

fn parse_err(what: &str, msg: impl ToString) -> LabError {
    LabError::Parse {
        what: what.to_string(),
        msg: msg.to_string(),
    }
}

/// The summary of one `ping` run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    /// Average round-trip time, if any reply came back.
    pub rtt_avg_ms: Option<f64>,
}

impl PingStats {
    /// Lost replies as a fraction of probes sent (1.0 when nothing was sent).
    pub fn loss(&self) -> f64 {
        if self.transmitted == 0 {
            return 1.0;
        }
        f64::from(self.transmitted.saturating_sub(self.received)) / f64::from(self.transmitted)
    }

    pub fn all_replied(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// Parses iputils ping's summary lines:
/// `3 packets transmitted, 3 received, 0% packet loss, time 2003ms` and
/// `rtt min/avg/max/mdev = 0.045/0.061/0.081/0.014 ms`.
pub fn parse_ping(out: &str) -> Result<PingStats> {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| parse_err("ping", format!("no summary line in {out:?}")))?;
    let mut transmitted = None;
    let mut received = None;
    for part in line.split(',') {
        let mut w = part.split_whitespace();
        let (Some(n), Some(label)) = (w.next(), w.next()) else {
            continue;
        };
        match label {
            "packets" => transmitted = n.parse().ok(),
            "received" => received = n.parse().ok(),
            _ => {}
        }
    }
    let rtt_avg_ms = out
        .lines()
        .find(|l| l.starts_with("rtt ") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok());
    Ok(PingStats {
        transmitted: transmitted.ok_or_else(|| parse_err("ping", line))?,
        received: received.ok_or_else(|| parse_err("ping", line))?,
        rtt_avg_ms,
    })
}

/// Sequence numbers of the echo replies in ping's per-packet lines
/// (`64 bytes from 10.244.1.2: icmp_seq=7 ttl=62 time=0.3 ms`).
pub fn ping_reply_seqs(out: &str) -> BTreeSet<u32> {
    out.lines()
        .filter(|l| l.contains(" bytes from ") && !l.contains("(DUP!)"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|s| s.parse().ok())
        })
        .collect()
}

/// Sequence numbers missing between the first and the last reply: replies lost
/// while later ones arrived. (The last probe may still be in flight when ping is
/// stopped; it is not counted.)
pub fn ping_gaps(seqs: &BTreeSet<u32>) -> Vec<u32> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Vec::new();
    };
    (first..=last).filter(|s| !seqs.contains(s)).collect()
}

/// Throughput of one iperf3 run, from its `-J` output, in bits per second (what
/// the receiver got).
pub fn parse_iperf_bps(json: &str) -> Result<f64> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| parse_err("iperf3", format!("{e}")))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(parse_err("iperf3", e));
    }
    let end = &v["end"];
    end["sum_received"]["bits_per_second"]
        .as_f64()
        .or_else(|| end["sum"]["bits_per_second"].as_f64())
        .ok_or_else(|| parse_err("iperf3", "no end.sum_received.bits_per_second"))
}

/// Resident set size of a process in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    Ok(rss(pid)?.total_kib)
}

/// A process's resident memory, split by what backs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Rss {
    /// `VmRSS`: everything resident.
    pub total_kib: u64,
    /// `RssAnon`: the process's own memory (heap, stacks, written data). The rest
    /// of `VmRSS` is mostly the executable and libraries, mapped from the page
    /// cache: clean, shared with every other process running the same file, and
    /// how much of it is mapped depends on the file system (ext4 maps whole large
    /// folios, so nearly the entire binary shows up).
    pub anon_kib: u64,
}

/// [`Rss`] of a process (/proc/<pid>/status).
pub fn rss(pid: u32) -> Result<Rss> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| LabError::io(path.clone(), e))?;
    rss_of_status(&text).ok_or_else(|| parse_err(&path, "no VmRSS or RssAnon line"))
}

fn rss_of_status(text: &str) -> Option<Rss> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Rss {
        total_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
    })
}

/// CPU time (user + system) a process has used so far, seconds
/// (/proc/<pid>/stat fields 14 and 15).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| LabError::io(path.clone(), e))?;
    cpu_seconds_of_stat(&text).ok_or_else(|| parse_err(&path, "no utime/stime"))
}

fn cpu_seconds_of_stat(text: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: count from the
    // last ')'. utime is then the 12th field, stime the 13th.
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) as f64 / hz)
}

/// The median (p50) of some durations; `None` if empty.
pub fn median(samples: &[Duration]) -> Option<Duration> {
    percentile(samples, 50)
}

/// The `p`-th percentile (nearest rank) of some durations; `None` if empty.
pub fn percentile(samples: &[Duration], p: u32) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = (p.min(100) as usize * v.len()).div_ceil(100).max(1);
    v.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_reads_total_and_anonymous_from_status() {
        let status =
            "Name:\tflanneld\nVmRSS:\t   14772 kB\nRssAnon:\t    5980 kB\nRssFile:\t    8792 kB\n";
        assert_eq!(
            rss_of_status(status),
            Some(Rss {
                total_kib: 14772,
                anon_kib: 5980
            })
        );
        // A kernel without the split (before 4.5) is an error, not a zero.
        assert_eq!(rss_of_status("VmRSS:\t 100 kB\n"), None);
    }

    #[test]
    fn cpu_seconds_count_from_the_last_parenthesis() {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat = "4242 (wg (x) y) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 3";
        assert_eq!(cpu_seconds_of_stat(stat), Some(400.0 / hz));
        assert_eq!(cpu_seconds_of_stat("4242 (x) S 1 2"), None);
    }

    const PING: &str = "PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.
64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.081 ms
64 bytes from 10.244.2.2: icmp_seq=3 ttl=62 time=0.045 ms

--- 10.244.2.2 ping statistics ---
3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms
rtt min/avg/max/mdev = 0.045/0.061/0.081/0.014 ms
";

    #[test]
    fn ping_summary_and_seqs() {
        let s = parse_ping(PING).unwrap();
        assert_eq!((s.transmitted, s.received), (3, 2));
        assert_eq!(s.rtt_avg_ms, Some(0.061));
        assert!((s.loss() - 1.0 / 3.0).abs() < 1e-9);
        let seqs = ping_reply_seqs(PING);
        assert_eq!(seqs.iter().copied().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(ping_gaps(&seqs), vec![2]);
    }

    #[test]
    fn ping_with_errors_only() {
        let out = "--- x ping statistics ---\n2 packets transmitted, 0 received, +2 errors, 100% packet loss, time 1001ms\n";
        let s = parse_ping(out).unwrap();
        assert_eq!((s.transmitted, s.received, s.rtt_avg_ms), (2, 0, None));
        assert!(parse_ping("garbage").is_err());
    }

    #[test]
    fn iperf_json() {
        let j = r#"{"end":{"sum_sent":{"bits_per_second":2e9},"sum_received":{"bits_per_second":1.5e9}}}"#;
        assert_eq!(parse_iperf_bps(j).unwrap(), 1.5e9);
        assert!(parse_iperf_bps(r#"{"error":"unable to connect"}"#).is_err());
        assert!(parse_iperf_bps("nope").is_err());
    }

    #[test]
    fn percentiles() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(median(&ms(&[5, 1, 3])), Some(Duration::from_millis(3)));
        assert_eq!(median(&ms(&[4, 1, 3, 2])), Some(Duration::from_millis(2)));
        assert_eq!(
            percentile(&ms(&[1, 2, 3, 4]), 100),
            Some(Duration::from_millis(4))
        );
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
