//! IP neighbours (ARP/NDP) and bridge FDB entries.

use std::net::IpAddr;

use flannel_core::MacAddr;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::codec::*;
use super::*;

impl Netlink {
    /// IP neighbour entries of one family, of one link or all.
    pub async fn neighbours(
        &self,
        family: IpFamily,
        index: Option<u32>,
    ) -> Result<Vec<Neighbour>, NetlinkError> {
        let mut req = NeighbourMessage::default();
        req.header.family = family.af();
        let msgs = self
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .await
            .map_err(|c| NetlinkError::new("list neighbours", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neigh(n),
                _ => None,
            })
            .filter(|n| index.is_none_or(|i| i == n.index))
            .collect())
    }

    /// Adds or replaces a permanent neighbour entry `ip lladdr mac` on the link.
    pub async fn neigh_replace(
        &self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<(), NetlinkError> {
        let m = Self::neigh_message(index, ip, Some(mac));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|c| {
            NetlinkError::new(
                format!("replace neighbour {ip} lladdr {mac} on link #{index}"),
                c,
            )
        })
    }

    /// Deletes a neighbour entry; gone already is success.
    pub async fn neigh_del(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let m = Self::neigh_message(index, ip, None);
        match self.ack(RouteNetlinkMessage::DelNeighbour(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ENOENT)) | Err(Cause::Errno(libc::ENODEV)) => Ok(()),
            Err(c) => Err(NetlinkError::new(
                format!("delete neighbour {ip} on link #{index}"),
                c,
            )),
        }
    }

    /// FDB entries of the link (`bridge fdb show dev <link>`).
    pub async fn fdb_entries(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        let msgs = self
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .await
            .map_err(|c| NetlinkError::new("list fdb entries", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_fdb(n),
                _ => None,
            })
            .filter(|e| e.index == index)
            .collect())
    }

    /// A neighbour entry `ip` on the link: permanent with `mac` (a write), or
    /// just the key (a delete).
    pub(crate) fn neigh_message(index: u32, ip: IpAddr, mac: Option<MacAddr>) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = IpFamily::of(&ip).af();
        m.header.ifindex = index;
        if mac.is_some() {
            m.header.state = NeighbourState::Permanent;
        }
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_address(ip)));
        if let Some(mac) = mac {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        }
        m
    }

    pub(crate) fn fdb_message(index: u32, mac: MacAddr, dst: Option<IpAddr>) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        if let Some(ip) = dst {
            m.attributes
                .push(NeighbourAttribute::Destination(neigh_address(ip)));
        }
        m
    }

    /// Adds or replaces the permanent entry `mac dst <dst> self` on the (vxlan) link.
    pub async fn fdb_replace(
        &self,
        index: u32,
        mac: MacAddr,
        dst: IpAddr,
    ) -> Result<(), NetlinkError> {
        let m = Self::fdb_message(index, mac, Some(dst));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|c| NetlinkError::new(format!("replace fdb {mac} dst {dst} on link #{index}"), c))
    }

    /// Deletes the entry for `mac` (only the remote `dst` if given); gone is success.
    pub async fn fdb_del(
        &self,
        index: u32,
        mac: MacAddr,
        dst: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let m = Self::fdb_message(index, mac, dst);
        match self.ack(RouteNetlinkMessage::DelNeighbour(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ENOENT)) | Err(Cause::Errno(libc::ENODEV)) => Ok(()),
            Err(c) => Err(NetlinkError::new(
                format!("delete fdb {mac} on link #{index}"),
                c,
            )),
        }
    }
}
