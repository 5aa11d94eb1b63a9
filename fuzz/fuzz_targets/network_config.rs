//! The network config (etcd `/coreos.com/network/config`, kube-flannel-cfg
//! net-conf.json) and the Go-style object folding under every JSON parser.
#![no_main]

use flannel_core::gojson::FoldedObject;
use flannel_core::NetworkConfig;
use libfuzzer_sys::fuzz_target;

const FIELDS: &[&str] = &["Network", "network", "Backend", "SubnetLen", "Type", "VNI"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(mut o) = FoldedObject::parse(text, FIELDS) {
        for f in FIELDS {
            if let Some(raw) = o.raw(f) {
                // Every kept field is JSON (numbers may be out of f64 range, which
                // serde_json's Value refuses) and never a bare null.
                assert_ne!(raw.get(), "null");
                let _: serde::de::IgnoredAny = o.get(f).unwrap().unwrap();
            }
        }
        let _ = o.take_raw("Backend");
        assert!(o.raw("Backend").is_none());
    }

    let Ok(parsed) = NetworkConfig::parse(text) else {
        return;
    };
    let mut c = parsed.clone();
    let validated = c.validate();
    match &validated {
        Ok(()) => {
            if c.enable_ipv4 {
                let net = c.network.expect("validated v4 config has a Network");
                let (min, max) = (c.subnet_min.unwrap(), c.subnet_max.unwrap());
                assert!(c.subnet_len >= net.prefix_len(), "{c:?}");
                assert!(c.subnet_len <= 32, "{c:?}");
                assert!(min <= max, "{c:?}");
                assert!(net.contains(&min) && net.contains(&max), "{c:?}");
                assert!(c.window_v4().is_some());
            }
            if c.enable_ipv6 {
                let net = c
                    .ipv6_network
                    .expect("validated v6 config has an IPv6Network");
                let (min, max) = (c.ipv6_subnet_min.unwrap(), c.ipv6_subnet_max.unwrap());
                assert!(c.ipv6_subnet_len >= net.prefix_len(), "{c:?}");
                assert!(c.ipv6_subnet_len <= 128, "{c:?}");
                assert!(min <= max, "{c:?}");
                assert!(net.contains(&min) && net.contains(&max), "{c:?}");
                assert!(c.window_v6().is_some());
            }
            // Validating what validation derived changes nothing.
            let mut again = c.clone();
            assert_eq!(again.validate(), Ok(()), "{c:?}");
            assert_eq!(again, c);
        }
        Err(_) => {}
    }
    // parse_and_validate is parse + validate.
    match NetworkConfig::parse_and_validate(text) {
        Ok(pv) => assert_eq!(Some(pv), validated.ok().map(|_| c)),
        Err(_) => assert!(validated.is_err()),
    }
});
