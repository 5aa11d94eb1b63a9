//! Interface addresses.

use std::net::IpAddr;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::*;

impl Netlink {
    /// Addresses of one family, of one link (`Some(index)`) or all.
    pub async fn addresses(
        &self,
        family: IpFamily,
        index: Option<u32>,
    ) -> Result<Vec<Address>, NetlinkError> {
        let mut req = AddressMessage::default();
        req.header.family = family.af();
        let msgs = self
            .dump(RouteNetlinkMessage::GetAddress(req))
            .await
            .map_err(|c| NetlinkError::new("list addresses", c))?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if index.is_some_and(|i| i != a.header.index) {
                continue;
            }
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
            // point-to-point links); prefer it when present.
            let mut local = None;
            let mut address = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(addr) = local.or(address) {
                out.push(Address {
                    index: a.header.index,
                    addr,
                    prefix_len: a.header.prefix_len,
                    scope: a.header.scope.into(),
                });
            }
        }
        Ok(out)
    }

    fn address_message(index: u32, addr: IpAddr, prefix_len: u8) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix_len;
        m.header.scope = AddressScope::Universe;
        match addr {
            IpAddr::V4(_) => {
                m.header.family = AddressFamily::Inet;
                m.attributes.push(AddressAttribute::Local(addr));
                m.attributes.push(AddressAttribute::Address(addr));
            }
            IpAddr::V6(_) => {
                m.header.family = AddressFamily::Inet6;
                m.attributes.push(AddressAttribute::Address(addr));
            }
        }
        m
    }

    /// Sends an add (`add`, replacing what is there) or a delete of `addr/prefix_len`
    /// on link `index` and waits for the kernel's answer.
    async fn addr_request(
        &self,
        add: bool,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), Cause> {
        let m = Self::address_message(index, addr, prefix_len);
        if add {
            let flags = NLM_F_CREATE | NLM_F_REPLACE;
            self.ack(RouteNetlinkMessage::NewAddress(m), flags).await
        } else {
            self.ack(RouteNetlinkMessage::DelAddress(m), 0).await
        }
    }

    /// Adds `addr/prefix_len` (scope global) to the link; present already is success.
    pub async fn addr_add(
        &self,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        self.addr_request(true, index, addr, prefix_len)
            .await
            .map_err(|c| {
                NetlinkError::new(
                    format!("add address {addr}/{prefix_len} to link #{index}"),
                    c,
                )
            })
    }

    /// Removes an address; an address that is not there is success.
    pub async fn addr_del(
        &self,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        match self.addr_request(false, index, addr, prefix_len).await {
            Ok(()) | Err(Cause::Errno(libc::EADDRNOTAVAIL)) | Err(Cause::Errno(libc::ENODEV)) => {
                Ok(())
            }
            Err(c) => Err(NetlinkError::new(
                format!("delete address {addr}/{prefix_len} from link #{index}"),
                c,
            )),
        }
    }
}
