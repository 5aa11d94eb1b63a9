//! Linux plumbing with no policy: netlink (links, addresses, routes, neighbours, FDB),
//! interface lookup, network namespaces and firewall rules.

pub mod iface;
pub mod rules;
