//! The backend factory, alloc and extension (extension commands are real programs).

mod common;

use std::net::Ipv4Addr;

use common::*;
use flannel_backend::{new_backend, BackendError, BackendOptions, ExternalInterface};
use flannel_core::{Lease, LeaseAttrs, LeaseEvent};
use flannel_net::Netlink;
use serde_json::value::RawValue;

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_string()).unwrap()
}

fn ext() -> ExternalInterface {
    ExternalInterface {
        name: "eth9".into(),
        index: 9,
        mtu: 1500,
        addr: Some(Ipv4Addr::new(198, 18, 0, 1)),
        public_ip: Some(Ipv4Addr::new(198, 18, 0, 1)),
        addr6: None,
        public_ipv6: None,
    }
}

async fn nl() -> Netlink {
    // A connection in our own namespace; the backends below never write with it.
    Netlink::connect().await.unwrap()
}

#[tokio::test]
async fn unknown_and_unbuilt_types_are_clear_errors() {
    let e = new_backend(
        "bogus",
        &raw("{}"),
        ext(),
        nl().await,
        BackendOptions::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, BackendError::UnknownType(_)));
    let msg = e.to_string();
    for t in [
        "bogus",
        "vxlan",
        "host-gw",
        "udp",
        "wireguard",
        "alloc",
        "extension",
    ] {
        assert!(msg.contains(t), "{msg}");
    }
    let e = new_backend(
        "ipsec",
        &raw("{}"),
        ext(),
        nl().await,
        BackendOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not supported"), "{e}");
    let e = new_backend(
        "vxlan",
        &raw(r#"{"VNI":"one"}"#),
        ext(),
        nl().await,
        BackendOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("VNI"), "{e}");
    // Type names are matched case-insensitively, as upstream lower-cases them.
    assert!(new_backend(
        "ALLOC",
        &raw("{}"),
        ext(),
        nl().await,
        BackendOptions::default()
    )
    .is_ok());
}

#[tokio::test]
async fn alloc_publishes_only_the_public_ip() {
    let mut be = new_backend(
        "alloc",
        &raw(r#"{"Type":"alloc"}"#),
        ext(),
        nl().await,
        BackendOptions::default(),
    )
    .unwrap();
    let attrs = be.register(&config(r#"{"Type":"alloc"}"#)).await.unwrap();
    assert_eq!(
        attrs.encode(),
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#
    );
    assert_eq!(be.mtu(), 1500);
}

#[tokio::test]
async fn extension_runs_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let log_s = log.display().to_string();
    let script = dir.path().join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nread data\nn=\"\"\n[ \"$1\" = post ] && n=\" NETWORK=$NETWORK\"\necho \"$1 SUBNET=$SUBNET PUBLIC_IP=$PUBLIC_IP$n DATA=$data\" >> {log_s}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hook = script.display().to_string();
    let cfg = format!(
        r#"{{"Type":"extension","PreStartupCommand":"echo ca:fe <&>","PostStartupCommand":"{hook} post","SubnetAddCommand":"{hook} add","SubnetRemoveCommand":"{hook} remove"}}"#
    );
    let mut be = new_backend(
        "extension",
        &raw(&cfg),
        ext(),
        nl().await,
        BackendOptions::default(),
    )
    .unwrap();
    let conf = config(&cfg);
    let attrs = be.register(&conf).await.unwrap();
    // Go's json.Marshal escapes <, > and &.
    assert_eq!(
        attrs.backend_data.as_ref().unwrap().get(),
        r#""ca:fe \u003c\u0026\u003e""#
    );
    assert_eq!(attrs.backend_type, "extension");
    assert_eq!(attrs.public_ip.to_string(), "198.18.0.1");
    let own = Lease {
        key: "10.244.1.0-24".parse().unwrap(),
        attrs: attrs.clone(),
        expiration: None,
    };
    be.start(&conf, &own).await.unwrap();
    let mut peer_attrs = LeaseAttrs::new("198.18.0.2".parse().unwrap());
    peer_attrs.backend_type = "extension".into();
    peer_attrs.backend_data = Some(raw(r#""peer-data""#));
    let peer = Lease {
        key: "10.244.2.0-24".parse().unwrap(),
        attrs: peer_attrs,
        expiration: None,
    };
    let mut other = peer.clone();
    other.key = "10.244.3.0-24".parse().unwrap();
    other.attrs.backend_type = "vxlan".into();
    be.reconcile(&[peer.clone(), other]).await.unwrap();
    // Same set again: nothing runs.
    be.reconcile(std::slice::from_ref(&peer)).await.unwrap();
    be.apply(&[LeaseEvent::Removed(peer.clone())])
        .await
        .unwrap();
    let got = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        got,
        "post SUBNET=10.244.1.0/24 PUBLIC_IP=198.18.0.1 NETWORK=10.244.0.0/16 DATA=\n\
         add SUBNET=10.244.2.0/24 PUBLIC_IP=198.18.0.2 DATA=peer-data\n\
         remove SUBNET=10.244.2.0/24 PUBLIC_IP=198.18.0.2 DATA=peer-data\n"
    );
}

#[tokio::test]
async fn failing_pre_startup_command_fails_register() {
    let cfg = r#"{"Type":"extension","PreStartupCommand":"false"}"#;
    let mut be = new_backend(
        "extension",
        &raw(cfg),
        ext(),
        nl().await,
        BackendOptions::default(),
    )
    .unwrap();
    let e = be.register(&config(cfg)).await.unwrap_err().to_string();
    assert!(
        e.contains("pre-startup") && e.contains("exit status"),
        "{e}"
    );
}
