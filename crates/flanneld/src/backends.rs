//! Creating the backend the network config names.

use anyhow::{Context, Result};
use flannel_backend::{Backend, BackendOptions, ExternalInterface};
use flannel_core::NetworkConfig;
use flannel_net::Netlink;

pub fn new(
    config: &NetworkConfig,
    ext: ExternalInterface,
    netlink: Netlink,
    opts: BackendOptions,
) -> Result<Box<dyn Backend>> {
    flannel_backend::new_backend(
        &config.backend.backend_type,
        &config.backend.raw,
        ext,
        netlink,
        opts,
    )
    .with_context(|| format!("creating the {:?} backend", config.backend.backend_type))
}
