//! The `host-gw` backend: per peer a route `<subnet> via <peer public IP> dev <ext>`
//! (docs/compatibility.md, "host-gw routes"). Works only when every peer is on a network
//! directly connected to the external interface; other peers are refused with an error.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, NetworkConfig};
use flannel_net::netlink::{Netlink, Route, RTN_UNICAST};
use ipnet::{IpNet, Ipv4Net};
use serde_json::value::RawValue;

use crate::dataplane::{self, Desired, Ownership, Plan, State};
use crate::peers::{self, PeerSet, RouteLookups, Warnings};
use crate::{Backend, BackendError, ExternalInterface};

const TYPE: &str = "host-gw";
/// Upstream re-checks its routes every 10 s.
const RESYNC: Duration = Duration::from_secs(10);

pub struct HostGwBackend {
    ext: ExternalInterface,
    nl: Netlink,
    network: Option<Ipv4Net>,
    own: Option<Ipv4Net>,
    peers: PeerSet,
    /// Peer subnet → gateway (its public IP), as programmed.
    programmed: BTreeMap<Ipv4Net, Ipv4Addr>,
    warnings: Warnings,
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
            network: None,
            own: None,
            peers: PeerSet::default(),
            programmed: BTreeMap::new(),
            warnings: Warnings::default(),
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
    fn verdict(&self, ip: Ipv4Addr, answer: &Result<Route, String>) -> Result<(), String> {
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
    ) -> BTreeMap<Ipv4Net, Ipv4Addr> {
        let usable: Vec<&Lease> = leases
            .iter()
            .filter(|l| peers::usable(l, TYPE, self.own, &mut self.warnings))
            .collect();
        self.lookups
            .update(&self.nl, usable.iter().map(|l| l.attrs.public_ip), refresh)
            .await;
        let mut out = BTreeMap::new();
        for l in usable {
            let ip = l.attrs.public_ip;
            let verdict = match self.lookups.get(&ip) {
                Some(answer) => self.verdict(ip, answer),
                None => Err(format!("no route lookup for {ip}")),
            };
            match verdict {
                Ok(()) => {
                    self.warnings.clear(&l.key);
                    out.insert(l.subnet().trunc(), ip);
                }
                // An error, not a warning: this peer's pods are unreachable.
                Err(why) => self.warnings.error(
                    l.key,
                    format!("host-gw: no route for {} via {ip}: {why}", l.subnet()),
                ),
            }
        }
        out
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

    fn desired<'a>(&self, peers: impl IntoIterator<Item = (&'a Ipv4Net, &'a Ipv4Addr)>) -> Desired {
        let mut d = Desired::default();
        for (subnet, gw) in peers {
            let dst = IpNet::V4(*subnet);
            d.routes.insert(
                dst,
                Route::new(dst).via(IpAddr::V4(*gw)).dev(self.ext.index),
            );
        }
        d
    }

    async fn full_reconcile(
        &mut self,
        refresh: impl Fn(&Result<Route, String>) -> bool,
    ) -> Result<(), BackendError> {
        let network = self.network.ok_or_else(not_started)?;
        let t = std::time::Instant::now();
        let leases = self.peers.all();
        let peers = self.plan_peers(&leases, refresh).await;
        let planned_us = t.elapsed().as_micros() as u64;
        self.peers
            .prune(&leases, &mut self.lookups, &mut self.warnings);
        let desired = self.desired(&peers);
        let own = Ownership {
            network,
            own: self.own,
            devices: vec![self.ext.index],
        };
        let mut current = State::default();
        for r in dataplane::owned_routes(&self.nl, &own)
            .await
            .map_err(BackendError::kernel("host-gw: read routes"))?
        {
            current.add_route(r);
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
        crate::ipv4_only(config, TYPE)?;
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
        self.network = config.network;
        self.own = Some(own.subnet().trunc());
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
        self.network.ok_or_else(not_started)?;
        let batch = self.peers.apply_batch(events, &mut self.warnings, |l| {
            tracing::info!("host-gw: subnet {} removed", l.subnet());
        });
        let new_peers = self.plan_peers(&batch.current, |_| false).await;
        let old = peers::swap_touched(&mut self.programmed, &batch.touched, &new_peers);
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
