//! The `host-gw` backend: per peer a route `<subnet> via <peer public IP> dev <ext>`
//! (docs/compatibility.md, "host-gw routes"). Works only when every peer is on a network
//! directly connected to the external interface; other peers are refused with an error.
//! Dual stack: also `<v6 subnet> via <peer PublicIPv6> dev <ext>` for each peer that
//! has both (SPEC §4.2), owned and reconciled exactly like the IPv4 routes.
//! IPv6-only (`EnableIPv4:false`, Kubernetes mode): the v6 routes alone; the leases'
//! IPv4 part is the `0.0.0.0/0` placeholder and is never looked at.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, LeaseKey, NetworkConfig};
use flannel_net::netlink::{Netlink, Route, RTN_UNICAST};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;

use crate::dataplane::{self, Desired, Ownership, Plan, State};
use crate::peers::{self, PeerSet, RouteLookups, Warnings};
use crate::{Backend, BackendError, ExternalInterface};

const TYPE: &str = "host-gw";
/// Upstream re-checks its routes every 10 s.
const RESYNC: Duration = Duration::from_secs(10);
/// The metric the kernel gives an IPv6 route added without one (IP6_RT_PRIO_USER);
/// set explicitly so our routes compare equal to what a dump returns.
const V6_METRIC: u32 = 1024;

/// The routes planned for a set of peers, by lease key (the lease's identity, so an
/// event's key names both families' entries; the IPv4 subnet alone is not unique in
/// an IPv6-only network, where every lease has the `0.0.0.0/0` placeholder).
#[derive(Debug, Default, Clone)]
struct Planned {
    v4: BTreeMap<LeaseKey, (Ipv4Net, Ipv4Addr)>,
    v6: BTreeMap<LeaseKey, (Ipv6Net, Ipv6Addr)>,
}

pub struct HostGwBackend {
    ext: ExternalInterface,
    nl: Netlink,
    /// Set by `start`.
    started: bool,
    /// `Network` when IPv4 is enabled (None: IPv6-only).
    network: Option<Ipv4Net>,
    own: Option<Ipv4Net>,
    /// `IPv6Network` when IPv6 is enabled (dual stack).
    network6: Option<Ipv6Net>,
    own6: Option<Ipv6Net>,
    peers: PeerSet,
    /// Per peer the routes as programmed.
    programmed: Planned,
    warnings: Warnings,
    /// IPv6 problems of a peer whose IPv4 route is fine, kept apart so that the
    /// IPv4 success does not clear them (each is said once).
    warnings6: Warnings,
    /// Neighbour/FDB/route writes issued for peers so far.
    peer_writes: u64,
    lookups: RouteLookups,
}

impl HostGwBackend {
    /// host-gw has no config keys; any object is accepted.
    pub fn new(_raw: &RawValue, ext: ExternalInterface, nl: Netlink) -> Result<Self, BackendError> {
        Ok(HostGwBackend {
            ext,
            nl,
            started: false,
            network: None,
            own: None,
            network6: None,
            own6: None,
            peers: PeerSet::default(),
            programmed: Planned::default(),
            warnings: Warnings::default(),
            warnings6: Warnings::default(),
            peer_writes: 0,
            lookups: RouteLookups::default(),
        })
    }

    /// Route writes issued for peers since creation (a reconcile over a kernel that
    /// already matches issues none).
    pub fn peer_writes(&self) -> u64 {
        self.peer_writes
    }

    /// Whether the kernel's answer for a peer's public IP lets host-gw route to it:
    /// a unicast route without gateway out of the external interface.
    fn verdict(&self, ip: IpAddr, answer: &Result<Route, String>) -> Result<(), String> {
        let name = &self.ext.name;
        match answer {
            Ok(r) if r.kind != RTN_UNICAST => Err(format!("{ip} is not a unicast remote address")),
            Ok(r) if r.gateway.is_some() => Err(format!(
                "{ip} is not on a network directly connected to {name} (reached via {})",
                r.gateway.map(|g| g.to_string()).unwrap_or_default()
            )),
            Ok(r) if r.oif != Some(self.ext.index) => Err(format!(
                "{ip} is reached through another interface (#{:?}), not {name}",
                r.oif
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Decides which leases get a route. `refresh` picks cached lookups to redo.
    async fn plan_peers(
        &mut self,
        leases: &[Lease],
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) -> Planned {
        let ipv4 = self.network.is_some();
        let usable: Vec<&Lease> = leases.iter().filter(|l| self.usable(l)).collect();
        let v6: Vec<(&Lease, Ipv6Net, Ipv6Addr)> = usable
            .iter()
            .filter_map(|l| self.v6_part(l).map(|(n, gw)| (*l, n, gw)))
            .collect();
        self.lookups
            .update(
                &self.nl,
                usable
                    .iter()
                    .filter(|_| ipv4)
                    .map(|l| IpAddr::V4(l.attrs.public_ip))
                    .chain(v6.iter().map(|(_, _, gw)| IpAddr::V6(*gw))),
                refresh,
            )
            .await;
        let mut out = Planned::default();
        for l in usable.into_iter().filter(|_| ipv4) {
            let ip = l.attrs.public_ip;
            match self.lookup_verdict(IpAddr::V4(ip)) {
                Ok(()) => {
                    self.warnings.clear(&l.key);
                    out.v4.insert(l.key, (l.subnet().trunc(), ip));
                }
                // An error, not a warning: this peer's pods are unreachable.
                Err(why) => self.warnings.error(
                    l.key,
                    format!("host-gw: no route for {} via {ip}: {why}", l.subnet()),
                ),
            }
        }
        for (l, net6, gw) in v6 {
            match self.lookup_verdict(IpAddr::V6(gw)) {
                Ok(()) => {
                    self.warnings6.clear(&l.key);
                    out.v6.insert(l.key, (net6, gw));
                }
                Err(why) => self.warnings6.error(
                    l.key,
                    format!("host-gw: no route for {net6} via {gw}: {why}"),
                ),
            }
        }
        out
    }

    /// Whether `l` is a peer of ours at all: of our type and not our own lease
    /// (IPv6-only: told by the v6 subnet; there is no IPv4 public IP to require).
    fn usable(&mut self, l: &Lease) -> bool {
        if self.network.is_some() {
            return peers::usable(l, TYPE, self.own, &mut self.warnings);
        }
        peers::type_matches(l, TYPE, &mut self.warnings)
            && (self.own6.is_none() || self.own6 != l.ipv6_subnet().map(|n| n.trunc()))
    }

    fn lookup_verdict(&self, ip: IpAddr) -> Result<(), String> {
        match self.lookups.get(ip) {
            Some(answer) => self.verdict(ip, answer),
            None => Err(format!("no route lookup for {ip}")),
        }
    }

    /// The IPv6 subnet and gateway of a usable lease, when this node runs dual
    /// stack and the lease can be routed over IPv6; a lease that cannot gets its
    /// warning (once) and keeps its IPv4 route.
    fn v6_part(&mut self, l: &Lease) -> Option<(Ipv6Net, Ipv6Addr)> {
        let side = peers::V6Side {
            network: self.network6,
            own: self.own6,
            dual_stack: self.network.is_some(),
        };
        peers::v6_route_part(l, side, &mut self.warnings6)
    }

    /// Runs `plan`, counting its writes.
    async fn run_plan(
        &mut self,
        desired: &Desired,
        plan: &Plan,
        context: &str,
    ) -> Result<(), BackendError> {
        dataplane::run(
            &self.nl,
            None,
            desired,
            plan,
            &mut self.peer_writes,
            context,
        )
        .await
    }

    fn desired(&self, peers: &Planned) -> Desired {
        let mut d = Desired::default();
        for (subnet, gw) in peers.v4.values() {
            let dst = IpNet::V4(*subnet);
            d.routes.insert(
                dst,
                Route::new(dst).via(IpAddr::V4(*gw)).dev(self.ext.index),
            );
        }
        for (subnet, gw) in peers.v6.values() {
            let dst = IpNet::V6(*subnet);
            let mut r = Route::new(dst).via(IpAddr::V6(*gw)).dev(self.ext.index);
            r.priority = Some(V6_METRIC);
            d.routes.insert(dst, r);
        }
        d
    }

    async fn full_reconcile(
        &mut self,
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) -> Result<(), BackendError> {
        if !self.started {
            return Err(not_started());
        }
        let t = std::time::Instant::now();
        let leases = self.peers.all();
        let peers = self.plan_peers(&leases, refresh).await;
        let planned_us = t.elapsed().as_micros() as u64;
        self.peers
            .prune(&leases, &mut self.lookups, &mut self.warnings);
        self.warnings6
            .retain(|k| leases.iter().any(|l| l.key == *k));
        let desired = self.desired(&peers);
        let mut owners = Vec::new();
        if let Some(network) = self.network {
            owners.push(Ownership {
                network: IpNet::V4(network),
                own: self.own.map(IpNet::V4),
                devices: vec![self.ext.index],
            });
        }
        if let Some(network6) = self.network6 {
            owners.push(Ownership {
                network: IpNet::V6(network6),
                own: self.own6.map(IpNet::V6),
                devices: vec![self.ext.index],
            });
        }
        let mut current = State::default();
        for own in &owners {
            for r in dataplane::owned_routes(&self.nl, own)
                .await
                .map_err(BackendError::kernel("host-gw: read routes"))?
            {
                current.add_route(r);
            }
        }
        let plan = dataplane::diff(&desired, &current);
        tracing::debug!(
            planned_us,
            diffed_us = t.elapsed().as_micros() as u64,
            "host-gw reconcile planned"
        );
        self.programmed = peers;
        if plan.is_empty() {
            return Ok(());
        }
        // A line per route is useful for a few peers; thousands of lines at start
        // cost more than the routes.
        if plan.route_set.len() + plan.route_del.len() > 20 {
            tracing::info!(
                "host-gw: {} routes to set, {} to remove",
                plan.route_set.len(),
                plan.route_del.len()
            );
        } else {
            for r in &plan.route_set {
                tracing::info!("host-gw: route {} via {:?}", r.dst, r.gateway);
            }
            for r in &plan.route_del {
                tracing::info!("host-gw: removing route {} via {:?}", r.dst, r.gateway);
            }
        }
        self.run_plan(&desired, &plan, "host-gw reconcile").await
    }
}

fn not_started() -> BackendError {
    BackendError::Other("host-gw backend used before start".into())
}

#[async_trait]
impl Backend for HostGwBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        if config.enable_ipv6 {
            let addr6 = self.ext.addr6.ok_or_else(|| {
                BackendError::Config(format!(
                    "host-gw: EnableIPv6 is set but interface {} has no IPv6 address",
                    self.ext.name
                ))
            })?;
            let public6 = self.ext.public_ipv6.unwrap_or(addr6);
            if public6 != addr6 {
                return Err(BackendError::Config(format!(
                    "host-gw: the public IPv6 {public6} differs from the address {addr6} of {}; \
                     host-gw needs every host reachable at its own interface address (no NAT)",
                    self.ext.name
                )));
            }
        }
        if !config.enable_ipv4 {
            // IPv6-only: nothing IPv4 is published (the agent fills in 0.0.0.0).
            let mut attrs = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED);
            attrs.backend_type = TYPE.to_string();
            return Ok(attrs);
        }
        let addr = self.ext.addr.ok_or_else(|| {
            BackendError::Config(format!(
                "host-gw: interface {} has no IPv4 address",
                self.ext.name
            ))
        })?;
        let public = self.ext.public_ip.unwrap_or(addr);
        if public != addr {
            return Err(BackendError::Config(format!(
                "host-gw: the public IP {public} differs from the address {addr} of {}; \
                 host-gw needs every host reachable at its own interface address (no NAT)",
                self.ext.name
            )));
        }
        self.network = config.network;
        let mut attrs = LeaseAttrs::new(public);
        attrs.backend_type = TYPE.to_string();
        Ok(attrs)
    }

    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError> {
        self.started = true;
        if config.enable_ipv4 {
            self.network = config.network;
            self.own = Some(own.subnet().trunc());
        }
        if config.enable_ipv6 {
            self.network6 = config.ipv6_network;
            self.own6 = own.ipv6_subnet().map(|n| n.trunc());
        }
        Ok(())
    }

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        self.peers.replace_all(peers);
        // A full update re-asks the kernel about every peer.
        self.full_reconcile(|_| true).await
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<(), BackendError> {
        if !self.started {
            return Err(not_started());
        }
        let batch = self.peers.apply_batch(events, &mut self.warnings, |l| {
            tracing::info!("host-gw: subnet {} removed", l.key);
        });
        for e in events {
            if let LeaseEvent::Removed(l) = e {
                self.warnings6.clear(&l.key);
            }
        }
        let new_peers = self.plan_peers(&batch.current, |_| false).await;
        let old = Planned {
            v4: peers::swap_touched(&mut self.programmed.v4, &batch.touched, &new_peers.v4),
            v6: peers::swap_touched(&mut self.programmed.v6, &batch.touched, &new_peers.v6),
        };
        let desired = self.desired(&new_peers);
        let plan = dataplane::diff(&desired, &self.desired(&old).as_state());
        self.run_plan(&desired, &plan, "host-gw lease events").await
    }

    fn resync_interval(&self) -> Option<Duration> {
        Some(RESYNC)
    }

    /// One route dump; re-adds missing routes, fixes wrong ones, removes stale ones.
    async fn resync(&mut self) -> Result<(), BackendError> {
        // Peers refused before are asked about again (their network may have
        // come up); the others keep their answer.
        let ext = self.ext.index;
        self.full_reconcile(move |a| {
            !matches!(a, Ok(r) if r.kind == RTN_UNICAST && r.gateway.is_none() && r.oif == Some(ext))
        })
        .await
    }
}
