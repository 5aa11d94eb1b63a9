//! Waiting for a condition without a timing assertion: tests poll until the state
//! they expect shows up, and fail only after a generous deadline.

use std::time::{Duration, Instant};

/// How long [`eventually`] callers usually wait: long enough for a loaded CI machine.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);

/// Polls `cond` every 50 ms until it returns true (true) or `timeout` passes (false).
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
