//! The agent's Prometheus metrics: one registry, typed update methods, and a record of
//! which families were ever updated (the lab's end-to-end test asserts every family
//! shows a non-default value after a run; [`Metrics::families_never_updated`] makes a
//! unit test fail as soon as a declared family has no update path).
//!
//! Hot paths (per-packet counters of the udp backend) get [`BackendCounters`]: plain
//! clones of the registry's counters, i.e. one relaxed atomic add per update.

use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(test)]
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flannel_backend::{PacketStats, PacketStatsSource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Kinds of lease events from the store's watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseEventKind {
    Added,
    Changed,
    Removed,
}

impl LeaseEventKind {
    fn label(self) -> &'static str {
        match self {
            LeaseEventKind::Added => "added",
            LeaseEventKind::Changed => "changed",
            LeaseEventKind::Removed => "removed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabels {
    what: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficLabels {
    backend: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    backend: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Families whose updates are recorded by the update methods (index into `touched`).
#[derive(Clone, Copy)]
enum Fam {
    LeaseHeld,
    LeaseExpiry,
    StoreConnected,
    WatchActive,
    LeaseEvents,
    Peers,
    KernelApply,
    ReconcileErrors,
    RulesRestored,
    LeasesRejected,
}

const TRACKED: [(Fam, &str); 10] = [
    (Fam::LeaseHeld, "flanneld_lease_held"),
    (Fam::LeaseExpiry, "flanneld_lease_expiry_timestamp_seconds"),
    (Fam::StoreConnected, "flanneld_store_connected"),
    (Fam::WatchActive, "flanneld_lease_watch_active"),
    (Fam::LeaseEvents, "flanneld_lease_events"),
    (Fam::Peers, "flanneld_peers"),
    (Fam::KernelApply, "flanneld_kernel_apply_duration_seconds"),
    (Fam::ReconcileErrors, "flanneld_reconcile_errors"),
    (Fam::RulesRestored, "flanneld_rules_restored"),
    (Fam::LeasesRejected, "flanneld_leases_rejected"),
];

/// Families updated through [`BackendCounters`] handles: "updated" = some value > 0.
const PACKETS: &str = "flanneld_backend_packets";
const BYTES: &str = "flanneld_backend_bytes";
const DROPS: &str = "flanneld_backend_drops";
const BUILD: &str = "flanneld_build";

/// All of the agent's metrics.
pub struct Metrics {
    registry: Registry,
    declared: Vec<&'static str>,
    touched: [AtomicBool; TRACKED.len()],
    lease_held: Gauge,
    lease_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    store_connected: Gauge,
    watch_active: Gauge,
    lease_events: Family<KindLabels, Counter>,
    peers: Gauge,
    kernel_apply: Family<WhatLabels, Histogram, fn() -> Histogram>,
    reconcile_errors: Family<WhatLabels, Counter>,
    rules_restored: Counter,
    leases_rejected: Family<ReasonLabels, Counter>,
    packets: Family<TrafficLabels, Counter>,
    bytes: Family<TrafficLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    /// Every counter handed out to a backend, to tell whether any moved.
    handed_out: Mutex<Vec<(&'static str, Counter)>>,
    /// A backend's own packet counters, copied into the families on each scrape.
    packet_source: Mutex<Option<PacketSource>>,
}

struct PacketSource {
    backend: String,
    read: PacketStatsSource,
    counters: BackendCounters,
    last: PacketStats,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("families", &self.declared)
            .finish()
    }
}

/// Registers metrics and remembers their names.
#[derive(Default)]
struct Reg {
    registry: Registry,
    declared: Vec<&'static str>,
}

impl Reg {
    fn add(&mut self, name: &'static str, help: &str, metric: impl Metric) {
        self.declared.push(name);
        self.registry.register(name, help, metric);
    }
}

fn apply_histogram() -> Histogram {
    // 0.5 ms … ~16 s: a netlink route is sub-millisecond, an iptables-restore on a busy
    // node can take seconds.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Reg::default();
        let lease_held = Gauge::default();
        r.add(
            "flanneld_lease_held",
            "1 while this node holds its subnet lease, else 0",
            lease_held.clone(),
        );
        let lease_expiry = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        r.add(
            "flanneld_lease_expiry_timestamp_seconds",
            "When the held lease expires unless renewed (Unix time; 0 = no expiry known)",
            lease_expiry.clone(),
        );
        let store_connected = Gauge::default();
        r.add(
            "flanneld_store_connected",
            "1 while the last request to the lease store (etcd or Kubernetes API) succeeded",
            store_connected.clone(),
        );
        let watch_active = Gauge::default();
        r.add(
            "flanneld_lease_watch_active",
            "1 while the watch on other nodes' leases is established",
            watch_active.clone(),
        );
        let lease_events = Family::<KindLabels, Counter>::default();
        // Known kinds start at 0 so rate() works from the first scrape.
        for k in [
            LeaseEventKind::Added,
            LeaseEventKind::Changed,
            LeaseEventKind::Removed,
        ] {
            let _ = lease_events.get_or_create(&KindLabels { kind: k.label() });
        }
        r.add(
            "flanneld_lease_events",
            "Lease events from the store by kind (added, changed, removed)",
            lease_events.clone(),
        );
        let peers = Gauge::default();
        r.add(
            "flanneld_peers",
            "Other nodes' leases the backend currently programs",
            peers.clone(),
        );
        let kernel_apply = Family::<WhatLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            apply_histogram,
        );
        r.add(
            "flanneld_kernel_apply_duration_seconds",
            "Time to apply a change to the kernel, by what was applied (rules, routes, ...)",
            kernel_apply.clone(),
        );
        let reconcile_errors = Family::<WhatLabels, Counter>::default();
        r.add(
            "flanneld_reconcile_errors",
            "Failed attempts to bring the kernel in line, by what failed",
            reconcile_errors.clone(),
        );
        let rules_restored = Counter::default();
        r.add(
            "flanneld_rules_restored",
            "Times the periodic resync found masquerade/forward rules missing and re-applied them",
            rules_restored.clone(),
        );
        let leases_rejected = Family::<ReasonLabels, Counter>::default();
        for reason in flannel_core::RejectReason::ALL {
            let _ = leases_rejected.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
        r.add(
            "flanneld_leases_rejected",
            "Peer leases refused before reaching the kernel (outside the network, host bits, overlapping ours or another peer), by reason",
            leases_rejected.clone(),
        );
        let packets = Family::<TrafficLabels, Counter>::default();
        r.add(
            PACKETS,
            "Packets the backend carried, by backend and direction (tx, rx)",
            packets.clone(),
        );
        let bytes = Family::<TrafficLabels, Counter>::default();
        r.add(
            BYTES,
            "Bytes of inner packets the backend carried, by backend and direction",
            bytes.clone(),
        );
        let drops = Family::<DropLabels, Counter>::default();
        r.add(
            DROPS,
            "Packets the backend dropped, by backend and reason",
            drops.clone(),
        );
        r.add(
            BUILD,
            "Build information (value 1)",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        Metrics {
            registry: r.registry,
            declared: r.declared,
            touched: Default::default(),
            lease_held,
            lease_expiry,
            store_connected,
            watch_active,
            lease_events,
            peers,
            kernel_apply,
            reconcile_errors,
            rules_restored,
            leases_rejected,
            packets,
            bytes,
            drops,
            handed_out: Mutex::new(Vec::new()),
            packet_source: Mutex::new(None),
        }
    }

    fn touch(&self, f: Fam) {
        self.touched[f as usize].store(true, Ordering::Relaxed);
    }

    /// Lease state: held or not, and when it expires (`None`: unknown / no expiry).
    pub fn set_lease(&self, held: bool, expires: Option<SystemTime>) {
        self.lease_held.set(i64::from(held));
        self.touch(Fam::LeaseHeld);
        let ts = expires
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.lease_expiry.set(ts);
        self.touch(Fam::LeaseExpiry);
    }

    /// Whether the last request to the lease store succeeded.
    pub fn set_store_connected(&self, up: bool) {
        self.store_connected.set(i64::from(up));
        self.touch(Fam::StoreConnected);
    }

    /// Whether the lease watch is established.
    pub fn set_watch_active(&self, up: bool) {
        self.watch_active.set(i64::from(up));
        self.touch(Fam::WatchActive);
    }

    /// One lease event from the watch.
    pub fn lease_event(&self, kind: LeaseEventKind) {
        self.lease_events
            .get_or_create(&KindLabels { kind: kind.label() })
            .inc();
        self.touch(Fam::LeaseEvents);
    }

    /// Number of peers the backend programs now.
    pub fn set_peers(&self, n: usize) {
        self.peers.set(i64::try_from(n).unwrap_or(i64::MAX));
        self.touch(Fam::Peers);
    }

    /// One kernel change of kind `what` (e.g. `rules`, `routes`) took `took`.
    pub fn observe_kernel_apply(&self, what: &str, took: Duration) {
        self.kernel_apply
            .get_or_create(&WhatLabels {
                what: what.to_string(),
            })
            .observe(took.as_secs_f64());
        self.touch(Fam::KernelApply);
    }

    /// One failed attempt to reconcile `what` with the kernel.
    pub fn reconcile_error(&self, what: &str) {
        self.reconcile_errors
            .get_or_create(&WhatLabels {
                what: what.to_string(),
            })
            .inc();
        self.touch(Fam::ReconcileErrors);
    }

    /// A peer lease was refused (counted once per refusal, not per resync).
    pub fn lease_rejected(&self, reason: flannel_core::RejectReason) {
        self.leases_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
        self.touch(Fam::LeasesRejected);
    }

    /// The rule resync found rules missing and re-applied them.
    pub fn rules_restored(&self) {
        self.rules_restored.inc();
        self.touch(Fam::RulesRestored);
    }

    /// Counters for a backend that sees packets (udp). Clone the handle into each
    /// data-path thread; updates are single relaxed atomic adds.
    pub fn backend_counters(&self, backend: &str) -> BackendCounters {
        let traffic = |fam: &Family<TrafficLabels, Counter>, direction: &'static str| {
            fam.get_or_create_owned(&TrafficLabels {
                backend: backend.to_string(),
                direction,
            })
        };
        let c = BackendCounters {
            tx_packets: traffic(&self.packets, "tx"),
            rx_packets: traffic(&self.packets, "rx"),
            tx_bytes: traffic(&self.bytes, "tx"),
            rx_bytes: traffic(&self.bytes, "rx"),
        };
        if let Ok(mut h) = self.handed_out.lock() {
            h.push((PACKETS, c.tx_packets.clone()));
            h.push((PACKETS, c.rx_packets.clone()));
            h.push((BYTES, c.tx_bytes.clone()));
            h.push((BYTES, c.rx_bytes.clone()));
        }
        c
    }

    /// A drop counter for `backend` and `reason`, to keep in the data path.
    pub fn drop_counter(&self, backend: &str, reason: &str) -> Counter {
        let c = self.drops.get_or_create_owned(&DropLabels {
            backend: backend.to_string(),
            reason: reason.to_string(),
        });
        if let Ok(mut h) = self.handed_out.lock() {
            h.push((DROPS, c.clone()));
        }
        c
    }

    /// Reads the backend's packet counters at every scrape (rather than on a timer, so
    /// an idle agent does no work for them).
    pub fn set_packet_source(&self, backend: &str, read: PacketStatsSource) {
        let counters = self.backend_counters(backend);
        if let Ok(mut s) = self.packet_source.lock() {
            *s = Some(PacketSource {
                backend: backend.to_string(),
                read,
                counters,
                last: PacketStats::default(),
            });
        }
    }

    fn pull_packet_stats(&self) {
        let Ok(mut guard) = self.packet_source.lock() else {
            return;
        };
        let Some(src) = guard.as_mut() else { return };
        let now = (src.read)();
        let c = &src.counters;
        c.tx_packets
            .inc_by(now.tx_packets.saturating_sub(src.last.tx_packets));
        c.tx_bytes
            .inc_by(now.tx_bytes.saturating_sub(src.last.tx_bytes));
        c.rx_packets
            .inc_by(now.rx_packets.saturating_sub(src.last.rx_packets));
        c.rx_bytes
            .inc_by(now.rx_bytes.saturating_sub(src.last.rx_bytes));
        for (reason, n) in &now.drops {
            let before = src
                .last
                .drops
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, v)| *v);
            if *n > before {
                self.drop_counter(&src.backend, reason).inc_by(n - before);
            }
        }
        src.last = now;
    }

    /// The text exposition (OpenMetrics) of every family.
    pub fn encode(&self) -> String {
        self.pull_packet_stats();
        let mut out = String::new();
        // Writing into a String cannot fail; an error would only come from a broken
        // metric implementation, and then a partial page beats none.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }

    /// Names (as registered, without `_total`) of all families.
    #[cfg(test)]
    pub fn families(&self) -> &[&'static str] {
        &self.declared
    }

    /// Families that were declared but never updated since start: for update-method
    /// families "never called", for backend traffic families "no handed-out counter moved"
    /// (build info counts as updated at start).
    #[cfg(test)]
    pub fn families_never_updated(&self) -> Vec<String> {
        let handed = self
            .handed_out
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        self.declared
            .iter()
            .filter(|name| {
                if **name == BUILD {
                    return false;
                }
                if let Some((f, _)) = TRACKED.iter().find(|(_, n)| n == *name) {
                    return !self.touched[*f as usize].load(Ordering::Relaxed);
                }
                !handed.iter().any(|(n, c)| n == *name && c.get() > 0)
            })
            .map(|n| n.to_string())
            .collect()
    }
}

/// Traffic counters of one backend (cheap to clone; all clones share the values).
#[derive(Clone, Debug)]
pub struct BackendCounters {
    pub tx_packets: Counter,
    pub rx_packets: Counter,
    pub tx_bytes: Counter,
    pub rx_bytes: Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics) -> prometheus_parse::Scrape {
        let text = m.encode();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse")
    }

    fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        s.samples
            .iter()
            .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match &x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    }

    /// Calls every update method once. A new family needs a line here, or the test below
    /// fails.
    fn exercise(m: &Metrics) {
        m.set_lease(true, Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        m.set_store_connected(true);
        m.set_watch_active(true);
        m.lease_event(LeaseEventKind::Added);
        m.lease_event(LeaseEventKind::Changed);
        m.lease_event(LeaseEventKind::Removed);
        m.set_peers(3);
        m.observe_kernel_apply("rules", Duration::from_millis(3));
        m.reconcile_error("routes");
        m.rules_restored();
        m.lease_rejected(flannel_core::RejectReason::OutsideNetwork);
        // The udp backend's counters as the data path would advance them.
        let mut src = m.packet_source.lock().unwrap();
        if src.is_none() {
            drop(src);
            let stats = Arc::new(Mutex::new(PacketStats::default()));
            let read = stats.clone();
            m.set_packet_source("udp", Arc::new(move || read.lock().unwrap().clone()));
            src = m.packet_source.lock().unwrap();
            STATS.with(|s| *s.borrow_mut() = Some(stats));
        }
        drop(src);
        STATS.with(|s| {
            let stats = s.borrow();
            let mut st = stats.as_ref().unwrap().lock().unwrap();
            st.tx_packets += 1;
            st.tx_bytes += 100;
            st.rx_packets += 1;
            st.rx_bytes += 60;
            for reason in ["no_route", "bad_packet"] {
                match st.drops.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, n)) => *n += 1,
                    None => st.drops.push((reason, 1)),
                }
            }
        });
        m.pull_packet_stats();
    }

    thread_local! {
        static STATS: std::cell::RefCell<Option<Arc<Mutex<PacketStats>>>> = const { std::cell::RefCell::new(None) };
    }

    #[test]
    fn every_declared_family_has_an_update_path() {
        let m = Metrics::new();
        assert_eq!(m.families().len(), 14);
        let before = m.families_never_updated();
        assert!(
            before.contains(&"flanneld_lease_held".to_string()),
            "{before:?}"
        );
        assert!(
            before.contains(&"flanneld_backend_packets".to_string()),
            "{before:?}"
        );
        assert!(!before.contains(&"flanneld_build".to_string()));
        exercise(&m);
        assert_eq!(m.families_never_updated(), Vec::<String>::new());
        // A backend handle that never counted anything does not count as an update.
        let m = Metrics::new();
        m.set_packet_source("udp", Arc::new(PacketStats::default));
        assert!(m
            .families_never_updated()
            .contains(&"flanneld_backend_packets".to_string()));
    }

    #[test]
    fn exposition_parses_and_values_follow_updates() {
        let m = Metrics::new();
        let s = scrape(&m);
        assert_eq!(value(&s, "flanneld_lease_held", &[]), Some(0.0));
        assert_eq!(
            value(
                &s,
                "flanneld_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        exercise(&m);
        exercise(&m);
        let s = scrape(&m);
        assert_eq!(value(&s, "flanneld_lease_held", &[]), Some(1.0));
        assert_eq!(
            value(&s, "flanneld_lease_expiry_timestamp_seconds", &[]),
            Some(1.7e9)
        );
        assert_eq!(value(&s, "flanneld_store_connected", &[]), Some(1.0));
        assert_eq!(value(&s, "flanneld_lease_watch_active", &[]), Some(1.0));
        for kind in ["added", "changed", "removed"] {
            assert_eq!(
                value(&s, "flanneld_lease_events_total", &[("kind", kind)]),
                Some(2.0),
                "{kind}"
            );
        }
        assert_eq!(value(&s, "flanneld_peers", &[]), Some(3.0));
        assert_eq!(
            value(&s, "flanneld_reconcile_errors_total", &[("what", "routes")]),
            Some(2.0)
        );
        assert_eq!(value(&s, "flanneld_rules_restored_total", &[]), Some(2.0));
        let tx = [("backend", "udp"), ("direction", "tx")];
        assert_eq!(value(&s, "flanneld_backend_packets_total", &tx), Some(2.0));
        assert_eq!(value(&s, "flanneld_backend_bytes_total", &tx), Some(200.0));
        let rx = [("backend", "udp"), ("direction", "rx")];
        assert_eq!(value(&s, "flanneld_backend_bytes_total", &rx), Some(120.0));
        for reason in ["no_route", "bad_packet"] {
            assert_eq!(
                value(
                    &s,
                    "flanneld_backend_drops_total",
                    &[("backend", "udp"), ("reason", reason)]
                ),
                Some(2.0),
                "{reason}"
            );
        }
        // Histogram: two observations, the +Inf bucket holds both.
        assert_eq!(
            value(
                &s,
                "flanneld_kernel_apply_duration_seconds",
                &[("what", "rules")]
            ),
            Some(2.0)
        );
        m.set_lease(false, None);
        m.set_peers(0);
        let s = scrape(&m);
        assert_eq!(value(&s, "flanneld_lease_held", &[]), Some(0.0));
        assert_eq!(
            value(&s, "flanneld_lease_expiry_timestamp_seconds", &[]),
            Some(0.0)
        );
        assert_eq!(value(&s, "flanneld_peers", &[]), Some(0.0));
    }
}
