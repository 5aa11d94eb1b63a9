//! Links: lookup, vxlan creation, up/down, MTU, MAC, deletion.

use std::net::IpAddr;

use flannel_core::MacAddr;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::codec::*;
use super::*;

impl Netlink {
    async fn get_link(&self, m: LinkMessage, op: String) -> Result<Option<LinkInfo>, NetlinkError> {
        match self
            .exchange(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST)
            .await
        {
            Ok(msgs) => Ok(msgs.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })),
            Err(Cause::Errno(libc::ENODEV)) => Ok(None),
            Err(c) => Err(NetlinkError::new(op, c)),
        }
    }

    /// The link called `name`, or `None`.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(m, format!("get link {name}")).await
    }

    /// The link with index `index`, or `None`.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.get_link(m, format!("get link #{index}")).await
    }

    /// All links.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let msgs = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .await
            .map_err(|c| NetlinkError::new("list links", c))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a vxlan device (fails with EEXIST if the name is taken: whether an
    /// existing device is usable is the caller's decision). Never sends group,
    /// l2miss/l3miss on, ttl, tos or the UDP checksum attribute, so those keep the
    /// kernel defaults, as Go flanneld leaves them.
    pub async fn vxlan_create(&self, spec: &VxlanSpec) -> Result<LinkInfo, NetlinkError> {
        let op = format!("create vxlan device {}", spec.name);
        let mut data = vec![InfoVxlan::Id(spec.vni), InfoVxlan::Link(spec.link)];
        match spec.local {
            Some(IpAddr::V4(a)) => data.push(InfoVxlan::Local(a)),
            Some(IpAddr::V6(a)) => data.push(InfoVxlan::Local6(a)),
            None => {}
        }
        if let Some(p) = spec.port.filter(|p| *p > 0) {
            data.push(InfoVxlan::Port(p));
        }
        data.push(InfoVxlan::Learning(spec.learning));
        data.push(InfoVxlan::L2Miss(false));
        data.push(InfoVxlan::L3Miss(false));
        if spec.gbp {
            data.push(InfoVxlan::Gbp);
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(spec.name.clone()));
        if let Some(mtu) = spec.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = spec.mac {
            m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Vxlan),
            NlLinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
            .await
            .map_err(|c| NetlinkError::new(op.clone(), c))?;
        self.link_by_name(&spec.name)
            .await?
            .ok_or_else(|| NetlinkError::new(op, Cause::Errno(libc::ENODEV)))
    }

    async fn link_change(&self, m: LinkMessage, op: String) -> Result<(), NetlinkError> {
        self.ack(RouteNetlinkMessage::NewLink(m), 0)
            .await
            .map_err(|c| NetlinkError::new(op, c))
    }

    /// Sets the link administratively up.
    pub async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.link_change(m, format!("set link #{index} up")).await
    }

    /// Sets the link administratively down.
    pub async fn link_set_down(&self, index: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.change_mask = LinkFlags::Up;
        self.link_change(m, format!("set link #{index} down")).await
    }

    pub async fn link_set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.link_change(m, format!("set link #{index} mtu {mtu}"))
            .await
    }

    pub async fn link_set_mac(&self, index: u32, mac: MacAddr) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        self.link_change(m, format!("set link #{index} address {mac}"))
            .await
    }

    /// Deletes a link; a link that is already gone is success.
    pub async fn link_del(&self, index: u32) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.ack(RouteNetlinkMessage::DelLink(m), 0).await {
            Ok(()) | Err(Cause::Errno(libc::ENODEV)) => Ok(()),
            Err(c) => Err(NetlinkError::new(format!("delete link #{index}"), c)),
        }
    }
}
