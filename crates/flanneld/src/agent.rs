//! The agent: wires the lease store, the backend and the host together in upstream's
//! startup order (docs/compatibility.md, "Startup order"), then keeps the lease and
//! the data plane current.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use flannel_backend::{Backend, BackendOptions};
use flannel_core::{Lease, LeaseEvent, LeaseUpdate, PeerFilter, PeerScope, SubnetEnv};
use flannel_store::etcd::WatchHealth;
use flannel_store::{AcquireRequest, OwnLeaseEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::http::Readiness;
use crate::iface_select::{self, IfaceRequest};
use crate::metrics::{LeaseEventKind, Metrics};
use crate::options::Options;
use crate::stores::OpenedStore;
use crate::{subnet_file, traffic_rules};

/// How the agent ended (both exit 0: a supervisor restarts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT: lease, devices, routes and rules stay for a hitless restart.
    Signal,
    /// Our lease key was deleted or expired.
    LeaseRevoked,
}

/// Retry delay after a failed renewal (upstream: one minute).
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// Retry delay after the backend failed to apply a change.
const APPLY_RETRY: Duration = Duration::from_secs(1);

pub struct Agent {
    pub opts: Options,
    pub store: OpenedStore,
    pub cancel: CancellationToken,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
}

impl Agent {
    pub async fn run(self) -> Result<Exit> {
        let started = Instant::now();
        let store = self.store.store.clone();
        let Some(config) = self.until_cancelled(store.network_config()).await else {
            return Ok(Exit::Signal);
        };
        let config = config.context("reading the network config")?;
        self.metrics.set_store_connected(true);
        if config.backend_defaulted {
            warn!(
                "the network config has no \"Backend\": using {:?} as upstream flannel does; \
                 set \"Backend\":{{\"Type\":\"vxlan\"}} for the recommended backend",
                config.backend.backend_type
            );
        }
        info!(backend = %config.backend.backend_type, network = ?config.network, ipv6_network = ?config.ipv6_network, "network config read");
        if !config.enable_nftables {
            crate::host_checks::bridge_netfilter(&config)?;
        }
        for w in crate::host_checks::forwarding_off(&config, |p| std::fs::read_to_string(p).ok()) {
            warn!("{w}");
        }

        let netlink = flannel_net::Netlink::connect()
            .await
            .context("opening a netlink socket")?;
        let mut req =
            IfaceRequest::from_options(&self.opts, config.enable_ipv4, config.enable_ipv6)
                .map_err(|e| anyhow!(e))?;
        let overrides = &self.store.overrides;
        req.public_ip = overrides.public_ip.or(req.public_ip);
        req.public_ipv6 = overrides.public_ipv6.or(req.public_ipv6);
        let ext = iface_select::select(&netlink, &req).await?;
        info!(iface = %ext.name, addr = ?ext.addr, public_ip = ?ext.public_ip, public_ipv6 = ?ext.public_ipv6, mtu = ext.mtu, "using interface");

        let backend_opts = BackendOptions {
            vtep_mac: overrides.vtep_mac,
            vtep_mac_v6: overrides.vtep_mac_v6,
        };
        let mut backend =
            crate::backends::new(&config, ext.clone(), netlink.clone(), backend_opts)?;
        let resync_every = backend.resync_interval();
        let mut attrs = backend
            .register(&config)
            .await
            .context("registering the backend")?;
        attrs.public_ip = ext.public_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        attrs.public_ipv6 = ext.public_ipv6;

        let previous = subnet_file::read_previous(&self.opts.subnet_file);
        match previous.subnet {
            Some(s) => {
                info!(subnet = %s, "previous subnet found in {}", self.opts.subnet_file.display())
            }
            None => info!("no previous subnet in {}", self.opts.subnet_file.display()),
        }
        let request = AcquireRequest { attrs, previous };
        let Some(lease) = self.until_cancelled(store.acquire(&config, &request)).await else {
            return Ok(Exit::Signal);
        };
        let mut lease = lease.context("acquiring a subnet lease")?;
        info!(key = %lease.key, expiration = ?lease.expiration, "lease acquired");
        self.metrics.set_lease(true, lease.expiration);
        self.readiness.set_lease_held(true);

        backend
            .start(&config, &lease)
            .await
            .context("starting the backend")?;
        // After start: a backend's data path (and so its counters) may exist only now.
        if let Some(source) = backend.packet_stats() {
            self.metrics
                .set_packet_source(&config.backend.backend_type, source);
        }
        self.readiness.set_backend_ready(true);

        let rules = traffic_rules::wanted(&self.opts, &config, &lease);
        let _rules_resync =
            traffic_rules::install(&self.opts, &config, rules, self.metrics.clone()).await?;
        self.readiness.set_rules_in_place(true);
        let _blackhole = if self.opts.ip_blackhole_route {
            let routes = crate::blackhole::wanted(&lease, config.enable_ipv4);
            let every = Duration::from_secs(self.opts.iptables_resync.max(1));
            Some(
                crate::blackhole::install(netlink, routes, every)
                    .await
                    .context("adding the blackhole route (--ip-blackhole-route)")?,
            )
        } else {
            None
        };

        let env = SubnetEnv {
            network: config.network.filter(|_| config.enable_ipv4),
            subnet: Some(lease.subnet()).filter(|_| config.enable_ipv4),
            ipv6_network: config.ipv6_network.filter(|_| config.enable_ipv6),
            ipv6_subnet: lease.ipv6_subnet(),
            mtu: backend.mtu(),
            ip_masq: self.opts.ip_masq,
        };
        match subnet_file::write(&self.opts.subnet_file, &env) {
            Ok(()) => {
                info!(path = %self.opts.subnet_file.display(), elapsed_ms = started.elapsed().as_millis() as u64, "subnet file written");
                self.readiness.set_subnet_file_written(true);
            }
            // Upstream only logs this: the data plane still works for existing pods.
            Err(e) => {
                error!(path = %self.opts.subnet_file.display(), error = %e, "failed to write the subnet file")
            }
        }
        crate::sd_notify_ready();

        let (upd_tx, mut upd_rx) = mpsc::channel::<LeaseUpdate>(256);
        let watch_store = store.clone();
        let own_key = lease.key;
        let watcher = tokio::spawn(async move {
            if let Err(e) = watch_store.watch_leases(own_key, upd_tx).await {
                error!(error = %e, "lease watch ended");
            }
        });
        let (own_tx, mut own_rx) = mpsc::channel::<OwnLeaseEvent>(16);
        let own_store = store.clone();
        let own_lease = lease.clone();
        // As upstream: in Kubernetes mode the node's podCIDR is the lease and does not
        // expire, so a deleted node object does not stop the agent.
        let watch_own = !self.opts.kube_subnet_mgr;
        let own_watcher = tokio::spawn(async move {
            if !watch_own {
                // Keep the sender alive so the loop's receive arm simply stays idle.
                let _keep = own_tx;
                return std::future::pending::<()>().await;
            }
            if let Err(e) = own_store.watch_own_lease(&own_lease, own_tx).await {
                error!(error = %e, "own lease watch ended");
            }
        });
        let health_task = self
            .store
            .watch_health
            .clone()
            .map(|rx| tokio::spawn(report_watch_health(rx, self.metrics.clone())));
        info!("watching for new subnet leases");
        if let Err(e) = store.complete_lease(&lease).await {
            // Upstream only logs a failed node-condition update.
            warn!(error = %e, "completing the lease (node condition) failed");
        }

        let margin = Duration::from_secs(u64::from(self.opts.subnet_lease_renew_margin) * 60);
        let mut renew_at = renew_deadline(&lease, margin);
        if let Some(at) = renew_at {
            info!(
                in_secs = at
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs(),
                "lease renewal scheduled"
            );
        }
        let mut filter = PeerFilter::new(PeerScope {
            network: config.network.filter(|_| config.enable_ipv4),
            network6: config.ipv6_network.filter(|_| config.enable_ipv6),
            own: lease.key,
        });
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut resync_at = resync_every.map(|d| tokio::time::Instant::now() + d);

        let exit = loop {
            let renew_sleep = sleep_until_opt(renew_at);
            let retry_sleep = sleep_until_opt(retry_at);
            let resync_sleep = sleep_until_opt(resync_at);
            tokio::select! {
                _ = self.cancel.cancelled() => break Exit::Signal,
                Some(update) = upd_rx.recv() => {
                    if self.store.watch_health.is_none() {
                        self.metrics.set_watch_active(true);
                    }
                    let t = Instant::now();
                    let admitted = self.admit(&mut filter, update);
                    tracing::debug!(elapsed_us = t.elapsed().as_micros() as u64, "peer leases checked");
                    let ok = match admitted {
                        Some(update) => self.apply_update(&mut *backend, filter.accepted_count(), update).await,
                        None => true,
                    };
                    if !ok {
                        retry_at = Some(tokio::time::Instant::now() + APPLY_RETRY);
                    }
                }
                _ = retry_sleep => {
                    retry_at = None;
                    let t = Instant::now();
                    let peers: Vec<Lease> = filter.accepted().cloned().collect();
                    match backend.reconcile(&peers).await {
                        Ok(()) => self.metrics.observe_kernel_apply("reconcile", t.elapsed()),
                        Err(e) => {
                            error!(error = %e, "reconcile failed; retrying");
                            self.metrics.reconcile_error("reconcile");
                            retry_at = Some(tokio::time::Instant::now() + APPLY_RETRY);
                        }
                    }
                }
                _ = resync_sleep => {
                    // The backend's own periodic check (e.g. host-gw re-adds routes
                    // someone deleted).
                    if let Err(e) = backend.resync().await {
                        warn!(error = %e, "backend resync failed");
                        self.metrics.reconcile_error("resync");
                    }
                    resync_at = resync_every.map(|d| tokio::time::Instant::now() + d);
                }
                Some(ev) = own_rx.recv() => match ev {
                    OwnLeaseEvent::Renewed(l) => {
                        lease = l;
                        self.metrics.set_lease(true, lease.expiration);
                        renew_at = renew_deadline(&lease, margin);
                    }
                    OwnLeaseEvent::Revoked => {
                        error!(key = %lease.key, "our lease was revoked (deleted or expired); exiting so the supervisor restarts us");
                        self.metrics.set_lease(false, None);
                        self.readiness.set_lease_held(false);
                        break Exit::LeaseRevoked;
                    }
                },
                _ = renew_sleep => {
                    match store.renew(&lease).await {
                        Ok(l) => {
                            info!(key = %l.key, expiration = ?l.expiration, "lease renewed");
                            lease = l;
                            self.metrics.set_lease(true, lease.expiration);
                            self.metrics.set_store_connected(true);
                            renew_at = renew_deadline(&lease, margin);
                        }
                        Err(e) => {
                            error!(error = %e, "lease renewal failed; retrying in a minute");
                            self.metrics.set_store_connected(false);
                            renew_at = Some(tokio::time::Instant::now() + RENEW_RETRY);
                        }
                    }
                }
            }
        };
        watcher.abort();
        own_watcher.abort();
        if let Some(t) = health_task {
            t.abort();
        }
        Ok(exit)
    }

    /// Takes out of a watch update the peer leases that must not reach the kernel,
    /// warning once per refused lease; `None` when nothing is left for the backend.
    fn admit(&self, filter: &mut PeerFilter, update: LeaseUpdate) -> Option<LeaseUpdate> {
        let out = filter.filter(update);
        for r in &out.rejected {
            self.metrics.lease_rejected(r.reason);
            match r.conflicts_with {
                Some(other) => warn!(
                    subnet = %r.key, reason = r.reason.as_str(), conflicts_with = %other,
                    "ignoring a peer lease that overlaps another peer's; it is used once that one is gone"
                ),
                None => warn!(
                    subnet = %r.key, reason = r.reason.as_str(),
                    "ignoring a peer lease that must not be routed (see docs/compatibility.md, \"Peer leases are checked\")"
                ),
            }
        }
        out.update
    }

    /// Hands one watch update to the backend; false when the kernel refused it.
    /// `peers`: how many peers are accepted once it is applied.
    async fn apply_update(
        &self,
        backend: &mut dyn Backend,
        peers: usize,
        update: LeaseUpdate,
    ) -> bool {
        let t = Instant::now();
        let (what, result) = match update {
            LeaseUpdate::Full(all) => {
                info!(peers = all.len(), "full lease set received");
                let r = backend.reconcile(&all).await;
                if r.is_ok() {
                    info!(
                        peers = all.len(),
                        elapsed_ms = t.elapsed().as_millis() as u64,
                        "full lease set programmed"
                    );
                }
                drop(all);
                // The listing, kernel dumps and plans of a full reconcile are freed
                // now, but the allocator keeps their pages: with 5000 peers that was
                // several MB of the agent's RSS for good.
                flannel_net::mem::release_free_memory();
                ("reconcile", r)
            }
            LeaseUpdate::Events(events) => {
                for e in &events {
                    self.metrics.lease_event(match e {
                        LeaseEvent::Added(_) => LeaseEventKind::Added,
                        LeaseEvent::Changed { .. } => LeaseEventKind::Changed,
                        LeaseEvent::Removed(_) => LeaseEventKind::Removed,
                    });
                }
                log_events(&events);
                ("events", backend.apply(&events).await)
            }
        };
        self.metrics.set_peers(peers);
        match result {
            Ok(()) => {
                self.metrics.observe_kernel_apply(what, t.elapsed());
                true
            }
            Err(e) => {
                error!(error = %e, "applying lease changes to the kernel failed; will reconcile again");
                self.metrics.reconcile_error(what);
                false
            }
        }
    }

    async fn until_cancelled<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            v = fut => Some(v),
        }
    }
}

async fn report_watch_health(
    mut rx: tokio::sync::watch::Receiver<WatchHealth>,
    metrics: Arc<Metrics>,
) {
    loop {
        let up = matches!(*rx.borrow_and_update(), WatchHealth::Watching);
        metrics.set_watch_active(up);
        metrics.set_store_connected(up);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn log_events(events: &[LeaseEvent]) {
    // A thousand leases in one etcd transaction should not mean a thousand log lines.
    if events.len() > 20 {
        info!(count = events.len(), "subnet changes received");
        return;
    }
    for e in events {
        match e {
            LeaseEvent::Added(l) => {
                info!(subnet = %l.key, public_ip = %l.attrs.public_ip, "subnet added")
            }
            LeaseEvent::Changed { current, .. } => {
                info!(subnet = %current.key, public_ip = %current.attrs.public_ip, "subnet changed")
            }
            LeaseEvent::Removed(l) => info!(subnet = %l.key, "subnet removed"),
        }
    }
}

/// When to renew: `margin` before expiry (None for leases without TTL).
fn renew_deadline(lease: &Lease, margin: Duration) -> Option<tokio::time::Instant> {
    let exp = lease.expiration?;
    let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
    Some(tokio::time::Instant::now() + left.saturating_sub(margin))
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
