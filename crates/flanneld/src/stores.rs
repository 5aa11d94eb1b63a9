//! Opening the lease store the options ask for.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use flannel_store::etcd::{EtcdOptions, EtcdStore};
use flannel_store::LeaseStore;

use crate::options::Options;

pub async fn open(o: &Options) -> Result<Arc<dyn LeaseStore>> {
    if o.kube_subnet_mgr {
        bail!("--kube-subnet-mgr is not wired into this build yet");
    }
    let nonempty = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
    if o.etcd_certfile.is_empty() || o.etcd_keyfile.is_empty() {
        tracing::warn!(
            "etcd connection is plaintext (TLS needs both --etcd-certfile and --etcd-keyfile)"
        );
    }
    let opts = EtcdOptions {
        endpoints: o
            .etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        prefix: o.etcd_prefix.clone(),
        cafile: nonempty(&o.etcd_cafile).map(Into::into),
        certfile: nonempty(&o.etcd_certfile).map(Into::into),
        keyfile: nonempty(&o.etcd_keyfile).map(Into::into),
        username: nonempty(&o.etcd_username),
        password: nonempty(&o.etcd_password),
    };
    let store = EtcdStore::connect(opts)
        .await
        .context("connecting to etcd")?;
    Ok(Arc::new(store))
}
