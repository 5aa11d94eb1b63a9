//! Masquerade and forward rules for this host (docs/compatibility.md, "iptables rules"
//! and "nftables tables"): installed once the
//! lease is known, then kept in place by a resync thread that costs nothing while
//! nothing changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flannel_core::{Lease, NetworkConfig};
use flannel_rules::{self as rules, EngineKind, EngineOptions, ResyncEvent, ResyncHandle, RuleSet};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::options::Options;

/// The rule set this host should have.
pub fn wanted(opts: &Options, config: &NetworkConfig, lease: &Lease) -> RuleSet {
    let mut set = RuleSet::new(opts.ip_masq, opts.iptables_forward_rules);
    if let (true, Some(net)) = (config.enable_ipv4, config.network) {
        set = set.with_ipv4(net, lease.subnet());
    }
    if let (true, Some(net), Some(sub)) =
        (config.enable_ipv6, config.ipv6_network, lease.ipv6_subnet())
    {
        set = set.with_ipv6(net, sub);
    }
    set
}

/// Removes the other engine's leftovers, applies `set` and starts the resync thread.
/// With no rule wanted, a failure (e.g. no iptables binary) is only logged.
pub async fn install(
    opts: &Options,
    config: &NetworkConfig,
    set: RuleSet,
    metrics: Arc<Metrics>,
) -> Result<Option<ResyncHandle>> {
    let kind = EngineKind::from_enable_nftables(config.enable_nftables);
    let engine_opts = EngineOptions {
        fully_random: !opts.ip_masq_fully_random_disable,
        ..EngineOptions::default()
    };
    let interval = Duration::from_secs(opts.iptables_resync.max(1));
    let required = set.ip_masq || set.forward;
    let started = Instant::now();
    let set_for_apply = set.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<ResyncHandle, rules::RulesError> {
        if let Err(e) = rules::remove_other_engine_artifacts(kind, &engine_opts) {
            warn!(error = %e, "could not remove the other rule engine's flannel rules");
        }
        let mut engine = rules::new_engine(kind, engine_opts)?;
        engine.apply(&set_for_apply)?;
        let observer_metrics = metrics.clone();
        rules::spawn_resync(engine, set_for_apply, interval, move |ev| match ev {
            ResyncEvent::Restored { took } => {
                info!(
                    took_ms = took.as_millis() as u64,
                    "traffic rules were missing and have been restored"
                );
                observer_metrics.rules_restored();
                observer_metrics.observe_kernel_apply("rules", *took);
            }
            ResyncEvent::Failed(e) => {
                warn!(error = %e, "traffic rules resync failed");
                observer_metrics.reconcile_error("rules");
            }
        })
    })
    .await
    .context("rule setup task")?;
    match result {
        Ok(handle) => {
            info!(engine = %kind, ip_masq = set.ip_masq, forward = set.forward, took_ms = started.elapsed().as_millis() as u64, "traffic rules in place");
            Ok(Some(handle))
        }
        Err(e) if required => Err(e).with_context(|| format!("setting up {kind} rules")),
        Err(e) => {
            warn!(error = %e, "no traffic rules wanted, and the {kind} rule engine is unusable");
            Ok(None)
        }
    }
}
