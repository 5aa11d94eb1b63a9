//! The wireguard backend's config keys, as upstream reads them: `ListenPort` (51820),
//! `ListenPortV6` (51821), `MTU`, `PSK`, `PersistentKeepaliveInterval` (seconds) and
//! `Mode` (`separate`, `auto`, `ipv4`, `ipv6`; exactly these, lower-case).

use flannel_core::gojson::FoldedObject;
use flannel_core::wireguard::decode_key;
use serde_json::value::RawValue;

use super::key::PresharedKey;
use crate::BackendError;

/// WireGuard's per-packet overhead on an IPv6 underlay (40 + 8 + 32), which upstream
/// subtracts for every device: 1500 → 1420.
pub const OVERHEAD: u32 = 80;

/// How the devices are laid out (upstream's `Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `flannel-wg` for IPv4 and `flannel-wg-v6` for IPv6 (the default).
    Separate,
    /// One device; each peer reached over IPv4 or IPv6 by upstream's choice.
    Auto,
    /// One device, peers reached over IPv4.
    Ipv4,
    /// One device, peers reached over IPv6.
    Ipv6,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "separate" => Mode::Separate,
            "auto" => Mode::Auto,
            "ipv4" => Mode::Ipv4,
            "ipv6" => Mode::Ipv6,
            _ => return None,
        })
    }

    /// One device for both families (`auto`, `ipv4`, `ipv6`).
    pub fn single_device(self) -> bool {
        self != Mode::Separate
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    pub listen_port: u16,
    pub listen_port_v6: u16,
    /// Underlay MTU to use instead of the interface's (0 = the interface's).
    pub mtu: u32,
    pub psk: Option<PresharedKey>,
    /// `PersistentKeepaliveInterval` in seconds (0 = off).
    pub keepalive_secs: u16,
    pub mode: Mode,
}

const FIELDS: &[&str] = &[
    "ListenPort",
    "ListenPortV6",
    "MTU",
    "PSK",
    "PersistentKeepaliveInterval",
    "Mode",
];

fn cfg_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Config(format!("wireguard: {e}"))
}

fn port(o: &FoldedObject, field: &str, default: u16) -> Result<u16, BackendError> {
    let v: i64 = o.get(field).map_err(cfg_err)?.unwrap_or(i64::from(default));
    match u16::try_from(v) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(cfg_err(format!("{field} {v} is not a UDP port (1..65535)"))),
    }
}

impl WireguardConfig {
    /// Reads the backend object.
    pub fn parse(raw: &RawValue) -> Result<Self, BackendError> {
        let o = FoldedObject::from_raw(raw, FIELDS).map_err(cfg_err)?;
        let mode_text: String = o.get("Mode").map_err(cfg_err)?.unwrap_or_default();
        let mode = if mode_text.is_empty() {
            Mode::Separate
        } else {
            Mode::parse(&mode_text).ok_or_else(|| {
                cfg_err(format!(
                    "Mode {mode_text:?} is not one of \"separate\", \"auto\", \"ipv4\", \"ipv6\""
                ))
            })?
        };
        let mtu: i64 = o.get("MTU").map_err(cfg_err)?.unwrap_or(0);
        if mtu != 0 && !((68 + i64::from(OVERHEAD))..=65535).contains(&mtu) {
            return Err(cfg_err(format!(
                "MTU {mtu} is outside {}..65535",
                68 + OVERHEAD
            )));
        }
        let keepalive: i64 = o
            .get("PersistentKeepaliveInterval")
            .map_err(cfg_err)?
            .unwrap_or(0);
        let keepalive_secs = u16::try_from(keepalive).map_err(|_| {
            cfg_err(format!(
                "PersistentKeepaliveInterval {keepalive} is not 0..65535 seconds"
            ))
        })?;
        let psk = match o.get::<String>("PSK").map_err(cfg_err)? {
            Some(s) if !s.is_empty() => Some(PresharedKey(
                // The error names no part of the secret.
                decode_key(&s).map_err(|_| cfg_err("PSK is not a base64 WireGuard key"))?,
            )),
            _ => None,
        };
        Ok(WireguardConfig {
            listen_port: port(&o, "ListenPort", 51820)?,
            listen_port_v6: port(&o, "ListenPortV6", 51821)?,
            mtu: mtu as u32,
            psk,
            keepalive_secs,
            mode,
        })
    }

    /// The device MTU on an underlay of `link_mtu` (the config's `MTU` wins).
    pub fn device_mtu(&self, link_mtu: u32) -> u32 {
        let base = if self.mtu > 0 { self.mtu } else { link_mtu };
        base.saturating_sub(OVERHEAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<WireguardConfig, BackendError> {
        WireguardConfig::parse(&RawValue::from_string(json.into()).unwrap())
    }

    #[test]
    fn defaults_are_upstreams() {
        let c = parse(r#"{"Type":"wireguard"}"#).unwrap();
        assert_eq!((c.listen_port, c.listen_port_v6), (51820, 51821));
        assert_eq!(
            (c.mode, c.keepalive_secs, c.psk.is_none()),
            (Mode::Separate, 0, true)
        );
        assert_eq!(c.device_mtu(1500), 1420);
        let c = parse(
            r#"{"Type":"wireguard","listenport":4000,"MTU":1400,"PersistentKeepaliveInterval":25,
                "PSK":"YJ9NRzvq2XQqAJcUiC4kBEoYUbsF0xl8ri2UbHjUyGM=","Mode":"ipv4"}"#,
        )
        .unwrap();
        assert_eq!(
            (c.listen_port, c.mode, c.keepalive_secs),
            (4000, Mode::Ipv4, 25)
        );
        assert_eq!(c.device_mtu(9000), 1320);
        assert!(c.psk.is_some());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (json, want) in [
            (r#"{"Mode":"Separate"}"#, "is not one of"),
            (r#"{"Mode":"IPv6"}"#, "is not one of"),
            (r#"{"ListenPort":0}"#, "not a UDP port"),
            (r#"{"ListenPort":70000}"#, "not a UDP port"),
            (r#"{"MTU":100}"#, "MTU 100"),
            (
                r#"{"PersistentKeepaliveInterval":-1}"#,
                "PersistentKeepaliveInterval",
            ),
            (r#"{"PSK":"secret-but-not-a-key"}"#, "PSK is not"),
            (r#"{"ListenPort":"x"}"#, "ListenPort"),
        ] {
            let e = parse(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
            assert!(!e.contains("secret-but"), "the PSK leaked into {e}");
        }
    }

    #[test]
    fn every_mode_parses() {
        for (m, want) in [
            ("separate", Mode::Separate),
            ("auto", Mode::Auto),
            ("ipv4", Mode::Ipv4),
            ("ipv6", Mode::Ipv6),
        ] {
            let c = parse(&format!(r#"{{"Mode":"{m}"}}"#)).unwrap();
            assert_eq!(c.mode, want);
            assert_eq!(c.mode.single_device(), want != Mode::Separate);
        }
    }
}
