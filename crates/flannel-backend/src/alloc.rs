//! The `alloc` backend: acquires a lease and nothing else (docs/compatibility.md,
//! "alloc and extension"). Its lease
//! value has no type and no data: `{"PublicIP":"10.10.0.1","PublicIPv6":null}`.

use async_trait::async_trait;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, NetworkConfig};

use crate::{Backend, BackendError, ExternalInterface};

pub struct AllocBackend {
    ext: ExternalInterface,
}

impl AllocBackend {
    pub fn new(ext: ExternalInterface) -> Self {
        AllocBackend { ext }
    }
}

#[async_trait]
impl Backend for AllocBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        let public = self.ext.public_ip.or(self.ext.addr);
        let public = match (public, config.enable_ipv4) {
            (Some(ip), _) => ip,
            (None, false) => std::net::Ipv4Addr::UNSPECIFIED,
            (None, true) => {
                return Err(BackendError::Config(format!(
                    "alloc: interface {} has no IPv4 address",
                    self.ext.name
                )))
            }
        };
        let mut attrs = LeaseAttrs::new(public);
        if config.enable_ipv6 {
            attrs.public_ipv6 = self.ext.public_ipv6.or(self.ext.addr6);
        }
        Ok(attrs)
    }

    async fn start(&mut self, _: &NetworkConfig, _: &Lease) -> Result<(), BackendError> {
        Ok(())
    }

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }

    async fn reconcile(&mut self, _: &[Lease]) -> Result<(), BackendError> {
        Ok(())
    }

    async fn apply(&mut self, _: &[LeaseEvent]) -> Result<(), BackendError> {
        Ok(())
    }
}
