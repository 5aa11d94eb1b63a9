//! Linux plumbing with no policy: netlink (links, addresses, routes, neighbours, FDB),
//! interface lookup, network namespaces and firewall rules.

pub mod iface;
pub mod netlink;
pub mod netns;
pub mod rules;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use netlink::{
    Address, FdbEntry, IpFamily, LinkInfo, Neighbour, Netlink, NetlinkError, Route, RouteFilter,
    VxlanInfo, VxlanSpec,
};
