//! Device configuration over rtnetlink, as upstream leaves flannel0: MTU, up,
//! `<subnet IP>/32` scope global as the only address from the network, and the route
//! `<Network> dev flannel0` (scope global, main table; upstream's protocol is `boot`,
//! the agent passes its own so its routes are recognisable). Idempotent, so a
//! restarted agent re-applies it over a persistent device without disturbing it.

use std::net::{IpAddr, Ipv4Addr};

use flannel_net::netlink::{IpFamily, Netlink, Route};
use ipnet::{IpNet, Ipv4Net};

use crate::UdpError;

/// Applies MTU, state, address and route to device `name`; the route gets
/// protocol `proto` (upstream: `RTPROT_BOOT`). Returns the device's index.
pub async fn configure(
    nl: &Netlink,
    name: &str,
    addr: Ipv4Addr,
    mtu: u32,
    network: Ipv4Net,
    proto: u8,
) -> Result<u32, UdpError> {
    let network = network.trunc();
    let link = nl
        .link_by_name(name)
        .await?
        .ok_or_else(|| UdpError::NoDevice(name.to_string()))?;
    let index = link.index;
    if link.mtu != mtu {
        nl.link_set_mtu(index, mtu).await?;
    }
    nl.link_set_up(index).await?;

    let mut have = false;
    for a in nl.addresses(IpFamily::V4, Some(index)).await? {
        let IpAddr::V4(ip) = a.addr else { continue };
        if ip == addr && a.prefix_len == 32 {
            have = true;
        } else if network.contains(&ip) {
            nl.addr_del(index, a.addr, a.prefix_len).await?;
        }
    }
    if !have {
        nl.addr_add(index, IpAddr::V4(addr), 32).await?;
    }
    let route = Route::new(IpNet::V4(network)).dev(index).protocol(proto);
    nl.route_replace(&route).await?;
    Ok(index)
}
