//! Reading what a WireGuard device says on its cross-platform userspace API (the
//! answer to `get=1`, the text `wg show` is made from), for the tests that check a
//! device's peers.

use std::collections::BTreeMap;

/// A peer as the device reports it: its endpoint and allowed IPs, in the device's
/// order.
pub type UapiPeer = (String, Vec<String>);

/// A `get=1` answer as (listen_port, public key in hex → peer).
pub fn parse_get(text: &str) -> (String, BTreeMap<String, UapiPeer>) {
    let mut port = String::new();
    let mut peers: BTreeMap<String, UapiPeer> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for l in text.lines() {
        if let Some(p) = l.strip_prefix("listen_port=") {
            port = p.to_string();
        } else if let Some(k) = l.strip_prefix("public_key=") {
            peers.insert(k.to_string(), (String::new(), Vec::new()));
            cur = Some(k.to_string());
        } else if let (Some(e), Some(peer)) = (
            l.strip_prefix("endpoint="),
            cur.as_ref().and_then(|k| peers.get_mut(k)),
        ) {
            peer.0 = e.to_string();
        } else if let (Some(a), Some(peer)) = (
            l.strip_prefix("allowed_ip="),
            cur.as_ref().and_then(|k| peers.get_mut(k)),
        ) {
            peer.1.push(a.to_string());
        }
    }
    (port, peers)
}

/// Lower-case hex, as the UAPI writes keys.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

/// A base64 WireGuard key (public as leases carry it, private or preshared) in the
/// UAPI's hex.
pub fn key_hex(key_b64: &str) -> String {
    let k: flannel_core::WgPublicKey = key_b64.parse().expect("a WireGuard key");
    hex(&k.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_with_endpoints_and_allowed_ips() {
        let text = "private_key=00\nlisten_port=51820\npublic_key=aa\nendpoint=198.18.0.2:51820\n\
                    allowed_ip=10.244.2.0/24\nallowed_ip=fd10:244:0:2::/64\npublic_key=bb\n\
                    allowed_ip=10.244.3.0/24\nerrno=0\n";
        let (port, peers) = parse_get(text);
        assert_eq!(port, "51820");
        assert_eq!(
            peers["aa"],
            (
                "198.18.0.2:51820".to_string(),
                vec!["10.244.2.0/24".to_string(), "fd10:244:0:2::/64".to_string()]
            )
        );
        assert_eq!(
            peers["bb"],
            (String::new(), vec!["10.244.3.0/24".to_string()])
        );
        // Peer lines before any public_key belong to no peer.
        assert!(parse_get("endpoint=1.2.3.4:5\n").1.is_empty());
    }

    #[test]
    fn keys_in_hex() {
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
        let b64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert_eq!(
            key_hex(b64),
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        );
    }
}
