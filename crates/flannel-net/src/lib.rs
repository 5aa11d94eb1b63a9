//! Linux plumbing with no policy: netlink (links, addresses, routes, neighbours, FDB),
//! interface lookup and network namespaces. Firewall policy lives in flannel-rules.

pub mod iface;
pub mod netlink;
pub mod netns;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use netlink::{
    Address, FdbEntry, IpFamily, LinkInfo, Neighbour, Netlink, NetlinkError, Route, RouteFilter,
    VxlanInfo, VxlanSpec,
};
