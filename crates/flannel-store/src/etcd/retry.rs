//! Retry helpers: an error log that reports each distinct failure once (a loop that
//! retries every second must not flood the log) and the watch reconnect backoff.

use std::time::Duration;

/// Remembers which failures were already logged since the last success.
#[derive(Debug)]
pub(crate) struct DistinctErrors {
    what: &'static str,
    seen: Vec<String>,
}

/// Enough to cover the handful of ways a retry loop fails, small enough that an
/// error text carrying a changing detail cannot grow it without bound.
const MAX_REMEMBERED: usize = 32;

impl DistinctErrors {
    pub fn new(what: &'static str) -> Self {
        DistinctErrors {
            what,
            seen: Vec::new(),
        }
    }

    /// Whether this failure is new since the last success (and so should be logged).
    pub fn first_time(&mut self, error: &str) -> bool {
        if self.seen.iter().any(|s| s == error) {
            return false;
        }
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen.remove(0);
        }
        self.seen.push(error.to_string());
        true
    }

    /// Logs a failure at warn level the first time it is seen.
    pub fn warn(&mut self, error: &str) {
        if self.first_time(error) {
            tracing::warn!(target: "flannel_store::etcd", "{}: {error} (retrying; repeats are not logged)", self.what);
        }
    }

    /// Logs a failure at error level the first time it is seen.
    pub fn error(&mut self, error: &str) {
        if self.first_time(error) {
            tracing::error!(target: "flannel_store::etcd", "{}: {error} (retrying; repeats are not logged)", self.what);
        }
    }

    /// The operation worked: say so if it had been failing, and forget the failures.
    pub fn recovered(&mut self) {
        if !self.seen.is_empty() {
            tracing::info!(target: "flannel_store::etcd", "{}: working again", self.what);
            self.seen.clear();
        }
    }
}

/// Reconnect delay: 100 ms doubling up to 5 s, back to 100 ms after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Backoff {
    pub fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_errors_are_reported_once_until_recovery() {
        let mut e = DistinctErrors::new("test");
        assert!(e.first_time("a"));
        assert!(!e.first_time("a"));
        assert!(e.first_time("b"));
        assert!(!e.first_time("a"));
        e.recovered();
        assert!(e.first_time("a"));
        for i in 0..100 {
            e.first_time(&i.to_string());
        }
        assert!(e.seen.len() <= MAX_REMEMBERED);
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }
}
