//! The wireguard backend's lease data, `{"PublicKey":"<base64>","Port":51820}`, and
//! the public key it carries (docs/compatibility.md, "wireguard lease data").

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::value::RawValue;

use crate::gojson::FoldedObject;
use crate::lease::BadBackendData;

/// A WireGuard (Curve25519) public key; base64 text in leases, as `wg` prints it.
/// Only public keys have this type, so printing one never leaks a secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgPublicKey(pub [u8; 32]);

/// Text that is not a base64 WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WireGuard key (base64 of 32 bytes): {0}")]
pub struct BadKey(pub String);

/// Decodes a base64 key of exactly 32 bytes (padding required, as `wg genkey`
/// writes it and Go's `wgtypes.ParseKey` wants it).
pub fn decode_key(text: &str) -> Result<[u8; 32], BadKey> {
    let bytes = B64.decode(text.trim()).map_err(|e| BadKey(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| BadKey(format!("{} bytes", bytes.len())))
}

/// Base64 of a 32-byte key.
pub fn encode_key(key: &[u8; 32]) -> String {
    B64.encode(key)
}

impl FromStr for WgPublicKey {
    type Err = BadKey;
    fn from_str(s: &str) -> Result<Self, BadKey> {
        decode_key(s).map(WgPublicKey)
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_key(&self.0))
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({self})")
    }
}

/// The wireguard backend's BackendData (and BackendV6Data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireguardData {
    pub public_key: WgPublicKey,
    /// The peer's listen port; 0 when the lease has none (v0.20.2 wrote only
    /// `PublicKey`): then the peer listens where we do, as HEAD assumes.
    pub port: u16,
}

impl WireguardData {
    /// Go's bytes: `{"PublicKey":"<base64>","Port":<port>}`.
    pub fn encode(&self) -> Box<RawValue> {
        RawValue::from_string(format!(
            "{{\"PublicKey\":\"{}\",\"Port\":{}}}",
            self.public_key, self.port
        ))
        .expect("well-formed JSON")
    }

    /// Field names match case-insensitively, as Go's decoder does.
    pub fn decode(raw: &RawValue) -> Result<Self, BadBackendData> {
        let o = FoldedObject::from_raw(raw, &["PublicKey", "Port"])
            .map_err(|e| BadBackendData::NotJson(e.to_string()))?;
        let key: String = o
            .get("PublicKey")?
            .ok_or(BadBackendData::Missing("PublicKey"))?;
        let public_key = key
            .parse()
            .map_err(|e: BadKey| BadBackendData::Key(e.to_string()))?;
        Ok(WireguardData {
            public_key,
            port: o.get("Port")?.unwrap_or(0),
        })
    }

    /// The UDP port to send to: the lease's, or `own` when it has none.
    pub fn port_or(&self, own: u16) -> u16 {
        if self.port == 0 {
            own
        } else {
            self.port
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn encodes_go_bytes_and_reads_every_release() {
        let d = WireguardData {
            public_key: KEY.parse().unwrap(),
            port: 51820,
        };
        assert_eq!(
            d.encode().get(),
            format!(r#"{{"PublicKey":"{KEY}","Port":51820}}"#)
        );
        assert_eq!(WireguardData::decode(&d.encode()).unwrap(), d);
        // v0.20.2: no Port; the peer listens on our port.
        let old = WireguardData::decode(&raw(&format!(r#"{{"PublicKey":"{KEY}"}}"#))).unwrap();
        assert_eq!((old.port, old.port_or(51820)), (0, 51820));
        assert_eq!(d.port_or(1), 51820);
        let folded =
            WireguardData::decode(&raw(&format!(r#"{{"publickey":"{KEY}","port":7}}"#))).unwrap();
        assert_eq!(folded.port, 7);
    }

    #[test]
    fn bad_data_is_an_error() {
        for bad in [
            r#"{}"#.to_string(),
            r#"{"PublicKey":"abc"}"#.to_string(),
            r#"{"PublicKey":"AAAA"}"#.to_string(),
            format!(r#"{{"PublicKey":"{KEY}","Port":70000}}"#),
            format!(r#"{{"PublicKey":"{KEY}","Port":-1}}"#),
            r#"[1]"#.to_string(),
            r#"{"PublicKey":5}"#.to_string(),
        ] {
            assert!(WireguardData::decode(&raw(&bad)).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn keys_and_data_round_trip(bytes in any::<[u8; 32]>(), port in any::<u16>()) {
            let k = WgPublicKey(bytes);
            prop_assert_eq!(k.to_string().parse::<WgPublicKey>().unwrap(), k);
            let d = WireguardData { public_key: k, port };
            prop_assert_eq!(WireguardData::decode(&d.encode()).unwrap(), d);
        }
    }
}
