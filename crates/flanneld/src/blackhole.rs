//! `--ip-blackhole-route`: a blackhole route for this host's own subnet(s), so that
//! traffic to a pod address that does not exist (yet) on this host is dropped here
//! instead of leaving by the default route. The pods' own route (the bridge's
//! connected route, metric 0) is more specific in metric and wins while it exists.
//! Kept in place every `--iptables-resync` seconds; `--cleanup` removes it with the
//! other `proto 70` routes.

use std::time::Duration;

use flannel_core::Lease;
use flannel_net::netlink::{RTN_BLACKHOLE, RT_TABLE_MAIN};
use flannel_net::{IpFamily, Netlink, Route, RouteFilter};
use ipnet::IpNet;
use tracing::{info, warn};

/// The metric of the blackhole routes: far behind any route a host has for the
/// subnet, so the blackhole only applies when there is none (docs/compatibility.md,
/// "The blackhole route").
pub const BLACKHOLE_METRIC: u32 = 1_000_000;

/// The blackhole routes for a lease: its IPv4 subnet and, with one, its IPv6 subnet.
pub fn wanted(lease: &Lease, ipv4: bool) -> Vec<Route> {
    let mut dsts: Vec<IpNet> = Vec::new();
    if ipv4 {
        dsts.push(lease.subnet().into());
    }
    if let Some(v6) = lease.ipv6_subnet() {
        dsts.push(v6.into());
    }
    dsts.into_iter()
        .map(|dst| Route {
            kind: RTN_BLACKHOLE,
            priority: Some(BLACKHOLE_METRIC),
            ..Route::new(dst)
        })
        .collect()
}

/// Adds the routes `wanted` lacks; returns how many it added.
async fn ensure(nl: &Netlink, wanted: &[Route]) -> Result<usize, flannel_net::NetlinkError> {
    let mut added = 0;
    for family in [IpFamily::V4, IpFamily::V6] {
        let mine: Vec<&Route> = wanted
            .iter()
            .filter(|r| IpFamily::of(&r.dst.addr()) == family)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let present = nl
            .routes(
                family,
                &RouteFilter {
                    table: Some(RT_TABLE_MAIN),
                    ..Default::default()
                },
            )
            .await?;
        for r in mine {
            if !present.iter().any(|p| is_same_blackhole(p, r)) {
                nl.route_replace(r).await?;
                added += 1;
            }
        }
    }
    Ok(added)
}

/// Whether `present` (from a dump) is the blackhole route `wanted`. The device is
/// not compared: the kernel reports an IPv6 blackhole on `lo` though none was
/// given, and comparing it made every resync re-add the route.
fn is_same_blackhole(present: &Route, wanted: &Route) -> bool {
    present.kind == wanted.kind
        && present.dst == wanted.dst
        && present.table == wanted.table
        && present.priority.unwrap_or(0) == wanted.priority.unwrap_or(0)
}

/// Keeps the routes in place until dropped.
pub struct Keeper(tokio::task::JoinHandle<()>);

impl Drop for Keeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Adds the routes now (an error is fatal: the operator asked for them) and then
/// checks them every `every`, restoring what someone deleted.
pub async fn install(nl: Netlink, routes: Vec<Route>, every: Duration) -> anyhow::Result<Keeper> {
    ensure(&nl, &routes).await?;
    for r in &routes {
        info!(route = %flannel_net::netlink::describe_route(r), "blackhole route in place");
    }
    Ok(Keeper(tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::time::sleep(every).await;
            match ensure(&nl, &routes).await {
                Ok(0) => failing = false,
                Ok(n) => {
                    failing = false;
                    info!(
                        restored = n,
                        "blackhole routes were missing and have been restored"
                    );
                }
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %e, "checking the blackhole routes failed; retrying");
                }
                Err(_) => {}
            }
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::{LeaseAttrs, LeaseKey};

    #[test]
    fn one_route_per_own_subnet() {
        let mut key: LeaseKey = "10.244.3.0-24".parse().unwrap();
        let lease = Lease {
            key,
            attrs: LeaseAttrs::new("192.0.2.1".parse().unwrap()).into(),
            expiration: None,
        };
        let r = wanted(&lease, true);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].dst, "10.244.3.0/24".parse::<IpNet>().unwrap());
        assert_eq!(
            (r[0].kind, r[0].priority),
            (RTN_BLACKHOLE, Some(BLACKHOLE_METRIC))
        );
        assert!(r[0].oif.is_none() && r[0].gateway.is_none());
        key.v6 = Some("fd00:10:244:3::/64".parse().unwrap());
        let lease = Lease { key, ..lease };
        let r = wanted(&lease, true);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].dst, "fd00:10:244:3::/64".parse::<IpNet>().unwrap());
        assert_eq!(
            wanted(&lease, false).len(),
            1,
            "IPv6-only: the v6 subnet alone"
        );
    }
}
