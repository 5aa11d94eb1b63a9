//! What another node wrote to the store: a lease key (the etcd key's last element),
//! a lease value (`LeaseAttrs` JSON) and the vxlan or wireguard BackendData inside it.
#![no_main]

use flannel_core::wireguard::{decode_key, encode_key};
use flannel_core::{LeaseAttrs, LeaseKey, MacAddr, VxlanData, WireguardData};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fn vxlan_round_trip(raw: &RawValue) {
    if let Ok(d) = VxlanData::decode(raw) {
        let enc = d.encode();
        assert_eq!(VxlanData::decode(&enc), Ok(d), "{}", enc.get());
    }
}

fn wireguard_round_trip(raw: &RawValue) {
    if let Ok(d) = WireguardData::decode(raw) {
        let enc = d.encode();
        assert_eq!(WireguardData::decode(&enc), Ok(d), "{}", enc.get());
    }
}

fn backend_data_round_trip(raw: &RawValue) {
    vxlan_round_trip(raw);
    wireguard_round_trip(raw);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(k) = text.parse::<LeaseKey>() {
        assert!(k.v4.prefix_len() < 32, "{k:?}");
        assert!(k.v6.is_none_or(|n| n.prefix_len() < 128), "{k:?}");
        let shown = k.to_string();
        assert_eq!(shown.parse::<LeaseKey>(), Ok(k), "{text:?} -> {shown:?}");
    }

    if let Ok(m) = text.parse::<MacAddr>() {
        assert_eq!(m.to_string().parse::<MacAddr>(), Ok(m));
    }

    if let Ok(a) = LeaseAttrs::decode(text) {
        // What we write back decodes to the same lease, and encoding is stable.
        let enc = a.encode();
        let back = LeaseAttrs::decode(&enc).unwrap_or_else(|e| panic!("{enc:?}: {e}"));
        assert_eq!(back.public_ip, a.public_ip);
        assert_eq!(back.public_ipv6, a.public_ipv6);
        assert_eq!(back.backend_type, a.backend_type);
        assert_eq!(back.encode(), enc);
        for raw in [&a.backend_data, &a.backend_v6_data].into_iter().flatten() {
            backend_data_round_trip(raw);
        }
    }

    if let Ok(raw) = RawValue::from_string(text.to_string()) {
        backend_data_round_trip(&raw);
    }

    // A public key as it stands in the lease or in the key file.
    if let Ok(k) = decode_key(text) {
        assert_eq!(decode_key(&encode_key(&k)), Ok(k), "{text:?}");
    }
});
