//! Linux plumbing with no policy: netlink (links, addresses, routes, neighbours, FDB),
//! interface lookup, network namespaces and sysctls. Firewall policy lives in
//! flannel-rules.

pub mod mem;
pub mod netlink;
pub mod netns;
pub mod sysctl;

pub use netlink::{
    Address, FdbEntry, IfAddr, Interface, IpFamily, LinkInfo, Neighbour, Netlink, NetlinkError,
    Route, RouteFilter, VxlanInfo, VxlanSpec,
};
