//! Routes: dumps, replace, delete and the kernel's lookup (`ip route get`).

use std::net::IpAddr;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::codec::*;
use super::*;

impl Netlink {
    /// Routes of one family matching `filter` (all tables unless filtered).
    pub async fn routes(
        &self,
        family: IpFamily,
        filter: &RouteFilter,
    ) -> Result<Vec<Route>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = family.af();
        let msgs = self
            .dump(RouteNetlinkMessage::GetRoute(req))
            .await
            .map_err(|c| NetlinkError::new("list routes", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if !r.header.flags.contains(RouteFlags::Cloned) =>
                {
                    parse_route(r)
                }
                _ => None,
            })
            .filter(|r| {
                filter.table.is_none_or(|t| t == r.table)
                    && filter.protocol.is_none_or(|p| p == r.protocol)
                    && filter.oif.is_none_or(|o| Some(o) == r.oif)
            })
            .collect())
    }

    /// Adds or replaces the route for `route.dst` (in its table, same metric).
    pub async fn route_replace(&self, route: &Route) -> Result<(), NetlinkError> {
        self.ack(
            RouteNetlinkMessage::NewRoute(route_message(route)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|c| NetlinkError::new(format!("replace route {}", describe_route(route)), c))
    }

    /// Deletes a route (matched by destination, table and, if set, gateway, device
    /// and metric); a route that is already gone is success.
    pub async fn route_del(&self, route: &Route) -> Result<(), NetlinkError> {
        let mut m = route_message(route);
        // The kernel matches a non-zero protocol/scope too; leave them out so a
        // route is found whoever added it.
        m.header.protocol = RouteProtocol::Unspec;
        m.header.scope = RouteScope::NoWhere;
        m.header.flags = RouteFlags::empty();
        match self.ack(RouteNetlinkMessage::DelRoute(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ESRCH)) => Ok(()),
            Err(c) => Err(NetlinkError::new(
                format!("delete route {}", describe_route(route)),
                c,
            )),
        }
    }

    /// The kernel's route lookup for `dst` (`ip route get`).
    pub async fn route_get(&self, dst: IpAddr) -> Result<Route, NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = match dst {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let op = || format!("route get {dst}");
        let msgs = self
            .exchange(RouteNetlinkMessage::GetRoute(m), NLM_F_REQUEST)
            .await
            .map_err(|c| NetlinkError::new(op(), c))?;
        msgs.iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::new(op(), Cause::Unexpected("no route in reply".into())))
    }
}
