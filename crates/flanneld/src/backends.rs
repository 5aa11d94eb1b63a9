//! Creating the backend the network config names.

use anyhow::{bail, Result};
use async_trait::async_trait;
use flannel_backend::{Backend, BackendError, ExternalInterface};
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, NetworkConfig};

pub async fn new(
    config: &NetworkConfig,
    ext: ExternalInterface,
    _handle: rtnetlink::Handle,
) -> Result<Box<dyn Backend>> {
    match config.backend.backend_type.as_str() {
        "alloc" => Ok(Box::new(Alloc { mtu: ext.mtu })),
        other => bail!("unknown backend type {other:?}"),
    }
}

/// Interim: replaced by flannel-backend's factory.
struct Alloc {
    mtu: u32,
}

#[async_trait]
impl Backend for Alloc {
    async fn register(&mut self, _: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        Ok(LeaseAttrs::new(std::net::Ipv4Addr::UNSPECIFIED))
    }
    async fn start(&mut self, _: &NetworkConfig, _: &Lease) -> Result<(), BackendError> {
        Ok(())
    }
    fn mtu(&self) -> u32 {
        self.mtu
    }
    async fn reconcile(&mut self, _: &[Lease]) -> Result<(), BackendError> {
        Ok(())
    }
    async fn apply(&mut self, _: &[LeaseEvent]) -> Result<(), BackendError> {
        Ok(())
    }
}
