//! A Kubernetes Node object as the API server hands it over (JSON) and the lease
//! flanneld reads from it: pod CIDRs, the flannel annotations, the startup info.
#![no_main]

use flannel_core::{LeaseAttrs, LeaseKey};
use flannel_store::kube::fuzzing::{
    annotation_changes, is_managed, node_to_lease, pod_cidrs, startup_info,
};
use flannel_store::kube::{Annotations, DEFAULT_PREFIX};
use k8s_openapi::api::core::v1::Node;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(node) = serde_json::from_slice::<Node>(data) else {
        return;
    };
    let ann = Annotations::new(DEFAULT_PREFIX).unwrap();
    let _ = is_managed(&node, &ann);
    let _ = startup_info(&node, &ann);
    let cidrs = pod_cidrs(&node);
    if let Ok(c) = &cidrs {
        assert!(c.v4.is_none_or(|n| n == n.trunc()));
        assert!(c.v6.is_none_or(|n| n == n.trunc()));
    }

    for (v4, v6) in [(true, false), (false, true), (true, true)] {
        let Ok(lease) = node_to_lease(&node, &ann, v4, v6) else {
            continue;
        };
        let c = cidrs.as_ref().expect("a lease comes from valid pod CIDRs");
        if v4 {
            assert_eq!(Some(lease.key.v4), c.v4);
        }
        if v6 {
            assert_eq!(lease.key.v6, c.v6);
        }
        if lease.key.v4.prefix_len() < 32 && lease.key.v6.is_none_or(|n| n.prefix_len() < 128) {
            let shown = lease.key.to_string();
            assert_eq!(shown.parse::<LeaseKey>(), Ok(lease.key), "{shown}");
        }
        // The lease value encodes to something that decodes to the same fields.
        let enc = lease.attrs.encode();
        let back = LeaseAttrs::decode(&enc).unwrap_or_else(|e| panic!("{enc}: {e}"));
        assert_eq!(back.public_ip, lease.attrs.public_ip);
        assert_eq!(back.public_ipv6, lease.attrs.public_ipv6);
        assert_eq!(back.backend_type, lease.attrs.backend_type);

        // Publishing what the node says: after applying the changes there are none.
        let changes = annotation_changes(&node, &lease.attrs, &ann);
        let mut after = node.clone();
        after
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .extend(changes);
        assert!(annotation_changes(&after, &lease.attrs, &ann).is_empty());
        assert!(is_managed(&after, &ann));
    }
});
