//! A capture of what the code under test logs (tracing events as text lines).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Collects the log events of the code under test.
///
/// The capture is installed for the current thread: use it from a current-thread
/// runtime (`#[tokio::test]`'s default), whose spawned tasks run on that thread too.
#[derive(Clone, Default)]
pub struct LogCapture {
    lines: Arc<Mutex<Vec<String>>>,
}

impl LogCapture {
    /// Starts capturing on this thread until the guard is dropped.
    pub fn install() -> (Self, tracing::subscriber::DefaultGuard) {
        let cap = LogCapture::default();
        let guard = tracing::subscriber::set_default(CaptureSubscriber {
            lines: cap.lines.clone(),
            next_span: AtomicU64::new(1),
        });
        (cap, guard)
    }

    /// Every captured line, `LEVEL target: message field=value…`.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many captured lines contain all of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.lines()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

struct CaptureSubscriber {
    lines: Arc<Mutex<Vec<String>>>,
    next_span: AtomicU64,
}

struct LineVisitor {
    message: String,
    fields: String,
}

impl tracing::field::Visit for LineVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl tracing::Subscriber for CaptureSubscriber {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        // Our own debug lines; only warnings from the libraries underneath (h2 and
        // tower are very chatty at debug level).
        let ours = meta.target().starts_with("flannel");
        *meta.level()
            <= if ours {
                tracing::Level::DEBUG
            } else {
                tracing::Level::WARN
            }
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut v = LineVisitor {
            message: String::new(),
            fields: String::new(),
        };
        event.record(&mut v);
        let meta = event.metadata();
        let line = format!(
            "{} {}: {}{}",
            meta.level(),
            meta.target(),
            v.message,
            v.fields
        );
        eprintln!("{line}");
        if let Ok(mut l) = self.lines.lock() {
            l.push(line);
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
