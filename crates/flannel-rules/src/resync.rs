//! The periodic resync (`--iptables-resync`): a plain thread that sleeps, checks cheaply
//! and re-applies the whole set only when something is missing.
//!
//! A dedicated thread rather than a tokio task: every step blocks (netlink, forks), and a
//! thread parked in a timed wait costs nothing between ticks.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{RuleEngine, RuleSet, RulesError};

/// What one resync tick did (only ticks that did something are reported).
#[derive(Debug)]
pub enum ResyncEvent {
    /// Rules were missing or different and the whole set was applied again.
    Restored { took: Duration },
    /// Checking or re-applying failed; the next tick tries again.
    Failed(RulesError),
}

/// The running resync thread; dropping it stops the thread (and waits for it).
pub struct ResyncHandle {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<Box<dyn RuleEngine>>>,
}

impl ResyncHandle {
    /// Stop the thread and get the engine back (e.g. to clean up).
    pub fn stop(mut self) -> Option<Box<dyn RuleEngine>> {
        self.stop.take();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for ResyncHandle {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Check `rules` every `interval` and re-apply them when `check` says they are not in place.
/// `observer` hears about every re-apply and failure (metrics, logs, readiness).
///
/// The first check happens one interval after the start: apply the rules before.
pub fn spawn_resync(
    mut engine: Box<dyn RuleEngine>,
    rules: RuleSet,
    interval: Duration,
    mut observer: impl FnMut(&ResyncEvent) + Send + 'static,
) -> Result<ResyncHandle, RulesError> {
    let (tx, rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("{}-resync", engine.kind()))
        .spawn(move || {
            loop {
                match rx.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    // Sender dropped (or, never, a message): stop.
                    _ => return engine,
                }
                if let Some(ev) = tick(engine.as_mut(), &rules) {
                    match &ev {
                        ResyncEvent::Restored { took } => {
                            tracing::info!(
                                "{} rules were not in place, re-applied in {took:?}",
                                engine.kind()
                            )
                        }
                        ResyncEvent::Failed(e) => {
                            tracing::warn!("{} rule resync failed: {e}", engine.kind())
                        }
                    }
                    observer(&ev);
                }
            }
        })
        .map_err(RulesError::Thread)?;
    Ok(ResyncHandle {
        stop: Some(tx),
        thread: Some(thread),
    })
}

/// One resync step; `None` when everything was in place.
pub(crate) fn tick(engine: &mut dyn RuleEngine, rules: &RuleSet) -> Option<ResyncEvent> {
    match engine.check(rules) {
        Ok(true) => None,
        Ok(false) => {
            let start = Instant::now();
            Some(match engine.apply(rules) {
                Ok(()) => ResyncEvent::Restored {
                    took: start.elapsed(),
                },
                Err(e) => ResyncEvent::Failed(e),
            })
        }
        Err(e) => Some(ResyncEvent::Failed(e)),
    }
}
