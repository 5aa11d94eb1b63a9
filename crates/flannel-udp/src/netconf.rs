//! Device configuration over rtnetlink, as upstream leaves flannel0: MTU, up,
//! `<subnet IP>/32` scope global as the only address from the network, and the route
//! `<Network> dev flannel0` (scope global, main table; upstream's protocol is `boot`,
//! the agent passes its own so its routes are recognisable). Idempotent, so a
//! restarted agent re-applies it over a persistent device without disturbing it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteProtocol, RouteScope};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::UdpError;

/// The route protocol upstream's udp backend leaves (netlink's default).
pub const RTPROT_BOOT: u8 = 3;

fn nl(what: &str, e: rtnetlink::Error) -> UdpError {
    UdpError::Netlink {
        context: what.to_string(),
        reason: e.to_string(),
    }
}

/// The index of link `name`, if it exists.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, UdpError> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(&format!("look up link {name}"), e)),
    }
}

/// Applies MTU, state, address and route to device `name`; the route gets
/// protocol `proto` (upstream: [`RTPROT_BOOT`]).
pub async fn configure(
    h: &Handle,
    name: &str,
    addr: Ipv4Addr,
    mtu: u32,
    network: Ipv4Net,
    proto: u8,
) -> Result<u32, UdpError> {
    let network = network.trunc();
    let mut s = h.link().get().match_name(name.to_string()).execute();
    let link = s
        .try_next()
        .await
        .map_err(|e| nl(&format!("look up link {name}"), e))?
        .ok_or_else(|| UdpError::Netlink {
            context: format!("look up link {name}"),
            reason: "no such device".into(),
        })?;
    let index = link.header.index;
    let cur_mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    if cur_mtu != Some(mtu) {
        h.link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| nl(&format!("set MTU {mtu} on {name}"), e))?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl(&format!("set {name} up"), e))?;

    let mut have = false;
    let mut stale = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = addrs
        .try_next()
        .await
        .map_err(|e| nl(&format!("list addresses of {name}"), e))?
    {
        if m.header.family != AddressFamily::Inet {
            continue;
        }
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let Some(ip) = local.or_else(|| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
        }) else {
            continue;
        };
        if ip == addr && m.header.prefix_len == 32 {
            have = true;
        } else if network.contains(&ip) {
            stale.push(m);
        }
    }
    for m in stale {
        h.address()
            .del(m)
            .execute()
            .await
            .map_err(|e| nl(&format!("remove old address from {name}"), e))?;
    }
    if !have {
        h.address()
            .add(index, IpAddr::V4(addr), 32)
            .replace()
            .execute()
            .await
            .map_err(|e| nl(&format!("add {addr}/32 to {name}"), e))?;
    }
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(index)
        .protocol(RouteProtocol::from(proto))
        .scope(RouteScope::Universe)
        .build();
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| nl(&format!("route {network} dev {name}"), e))?;
    Ok(index)
}

/// Opens an rtnetlink connection on the current runtime (the socket belongs to the
/// calling thread's network namespace).
pub fn connect() -> Result<Handle, UdpError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| UdpError::io("netlink socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}
