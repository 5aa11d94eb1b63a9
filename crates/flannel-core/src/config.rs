//! The cluster network configuration (`<prefix>/config` in etcd, or net-conf.json).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;

use crate::gojson::{FieldError, FoldedObject};
use crate::subnet::{Window4, Window6};

/// The backend type used when the config names none. Upstream's code picks `udp`
/// (its docs say vxlan); a mixed cluster must agree, so we follow the code.
pub const DEFAULT_BACKEND: &str = "udp";

const FIELDS: &[&str] = &[
    "EnableIPv4",
    "EnableIPv6",
    "EnableNFTables",
    "Network",
    "Networks",
    "IPv6Network",
    "IPv6Networks",
    "SubnetMin",
    "SubnetMax",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "SubnetLen",
    "IPv6SubnetLen",
    "Backend",
];

/// Why a network config was refused. Each variant's text is the message an operator sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("network config is not a JSON object: {0}")]
    NotJson(String),
    #[error("network config {0}")]
    Field(#[from] FieldError),
    #[error("network config: {field}: {value:?} is not a valid {family} CIDR")]
    BadCidr {
        field: &'static str,
        value: String,
        family: &'static str,
    },
    #[error("network config: {field}: {value:?} is not a valid {family} address")]
    BadAddr {
        field: &'static str,
        value: String,
        family: &'static str,
    },
    #[error("network config: the Backend value must be a JSON object: {0}")]
    BackendNotObject(String),
    #[error("network config: neither IPv4 nor IPv6 is enabled (none defined stack)")]
    NoStack,
    #[error("network config: {0} is required when {1} is enabled")]
    MissingNetwork(&'static str, &'static str),
    #[error("network config: {field} /{len} is too long (at most /{max})")]
    SubnetLenTooLong {
        field: &'static str,
        len: u32,
        max: u8,
    },
    #[error("network config: {field} /{len} leaves {network} room for fewer than four subnets (need /{min} or longer)")]
    SubnetLenTooShort {
        field: &'static str,
        len: u32,
        network: IpNet,
        min: u8,
    },
    #[error("network config: {network} is too small to split into subnets (the network must be /{max} or shorter)")]
    NetworkTooSmall { network: IpNet, max: u8 },
    #[error("network config: {field} {addr} is not inside {network}")]
    OutsideNetwork {
        field: &'static str,
        addr: IpAddr,
        network: IpNet,
    },
    #[error("network config: {field} {addr} is not on a /{len} boundary")]
    Unaligned {
        field: &'static str,
        addr: IpAddr,
        len: u8,
    },
    #[error(
        "network config: {min_field} {min} is above {max_field} {max}: the window holds no subnet"
    )]
    EmptyWindow {
        min_field: &'static str,
        min: IpAddr,
        max_field: &'static str,
        max: IpAddr,
    },
}

/// The backend section: its lower-cased type and the whole object, for the backend
/// to read its own keys from.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub backend_type: String,
    pub raw: Box<RawValue>,
}

impl PartialEq for BackendConfig {
    fn eq(&self, other: &Self) -> bool {
        self.backend_type == other.backend_type && self.raw.get() == other.raw.get()
    }
}

/// A parsed network config. `subnet_len`, `subnet_min` etc. hold what the JSON said
/// until [`NetworkConfig::validate`] derives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub enable_nftables: bool,
    pub network: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub subnet_len: u8,
    pub subnet_min: Option<Ipv4Addr>,
    pub subnet_max: Option<Ipv4Addr>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    pub backend: BackendConfig,
    /// The config had no `Backend`, so [`DEFAULT_BACKEND`] was chosen.
    pub backend_defaulted: bool,
}

impl NetworkConfig {
    /// Parses the JSON as Go flanneld does (case-insensitive keys, unknown keys
    /// ignored, CIDRs masked to their network). No defaults are derived here.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let obj =
            FoldedObject::parse(text, FIELDS).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let network = match obj.get::<String>("Network")? {
            Some(s) => Some(parse_cidr4("Network", &s)?),
            None => match obj
                .get::<Vec<String>>("Networks")?
                .and_then(|v| v.into_iter().next())
            {
                Some(s) => Some(parse_cidr4("Networks", &s)?),
                None => None,
            },
        };
        let ipv6_network = match obj.get::<String>("IPv6Network")? {
            Some(s) => Some(parse_cidr6("IPv6Network", &s)?),
            None => match obj
                .get::<Vec<String>>("IPv6Networks")?
                .and_then(|v| v.into_iter().next())
            {
                Some(s) => Some(parse_cidr6("IPv6Networks", &s)?),
                None => None,
            },
        };
        let (backend, backend_defaulted) = match obj.raw("Backend") {
            None => (
                BackendConfig {
                    backend_type: DEFAULT_BACKEND.to_string(),
                    raw: RawValue::from_string("{}".into()).expect("literal JSON"),
                },
                true,
            ),
            Some(raw) => {
                let b = FoldedObject::from_raw(raw, &["Type"])
                    .map_err(|_| ConfigError::BackendNotObject(raw.get().to_string()))?;
                let t: String = b
                    .get("Type")
                    .map_err(|e| {
                        ConfigError::Field(FieldError {
                            field: "Backend.Type".into(),
                            ..e
                        })
                    })?
                    .unwrap_or_default();
                (
                    BackendConfig {
                        backend_type: t.to_lowercase(),
                        raw: raw.to_owned(),
                    },
                    false,
                )
            }
        };
        Ok(NetworkConfig {
            enable_ipv4: obj.get("EnableIPv4")?.unwrap_or(true),
            enable_ipv6: obj.get("EnableIPv6")?.unwrap_or(false),
            enable_nftables: obj.get("EnableNFTables")?.unwrap_or(false),
            network,
            ipv6_network,
            subnet_len: prefix_field(&obj, "SubnetLen")?,
            subnet_min: addr4_field(&obj, "SubnetMin")?,
            subnet_max: addr4_field(&obj, "SubnetMax")?,
            ipv6_subnet_len: prefix_field(&obj, "IPv6SubnetLen")?,
            ipv6_subnet_min: addr6_field(&obj, "IPv6SubnetMin")?,
            ipv6_subnet_max: addr6_field(&obj, "IPv6SubnetMax")?,
            backend,
            backend_defaulted,
        })
    }

    /// Parses and validates (the etcd-mode path: upstream validates on every read).
    pub fn parse_and_validate(text: &str) -> Result<Self, ConfigError> {
        let mut c = Self::parse(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the config and derives SubnetLen/Min/Max (and the IPv6 ones) as upstream
    /// does in etcd mode.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if !self.enable_ipv4 && !self.enable_ipv6 {
            return Err(ConfigError::NoStack);
        }
        if self.enable_ipv4 {
            let net = self
                .network
                .ok_or(ConfigError::MissingNetwork("Network", "IPv4"))?;
            let w = derive_window::<Ipv4Addr>(
                net.network(),
                net.prefix_len(),
                IpNet::V4(net),
                self.subnet_len,
                self.subnet_min,
                self.subnet_max,
                ["SubnetLen", "SubnetMin", "SubnetMax"],
                30,
                28,
                22,
                24,
            )?;
            self.subnet_len = w.len;
            self.subnet_min = Some(w.min);
            self.subnet_max = Some(w.max);
        }
        if self.enable_ipv6 {
            let net = self
                .ipv6_network
                .ok_or(ConfigError::MissingNetwork("IPv6Network", "IPv6"))?;
            let w = derive_window::<Ipv6Addr>(
                net.network(),
                net.prefix_len(),
                IpNet::V6(net),
                self.ipv6_subnet_len,
                self.ipv6_subnet_min,
                self.ipv6_subnet_max,
                ["IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax"],
                126,
                124,
                62,
                64,
            )?;
            self.ipv6_subnet_len = w.len;
            self.ipv6_subnet_min = Some(w.min);
            self.ipv6_subnet_max = Some(w.max);
        }
        Ok(())
    }

    /// The IPv4 allocation window (after [`validate`](Self::validate)).
    pub fn window_v4(&self) -> Option<Window4> {
        Some(Window4 {
            len: self.subnet_len,
            min: self.subnet_min?,
            max: self.subnet_max?,
        })
        .filter(|_| self.enable_ipv4 && self.subnet_len > 0)
    }

    /// The IPv6 allocation window (after [`validate`](Self::validate)).
    pub fn window_v6(&self) -> Option<Window6> {
        Some(Window6 {
            len: self.ipv6_subnet_len,
            min: self.ipv6_subnet_min?,
            max: self.ipv6_subnet_max?,
        })
        .filter(|_| self.enable_ipv6 && self.ipv6_subnet_len > 0)
    }
}

/// Window derivation shared by both families: explicit length within
/// `[prefix+2, max_len]`; default length `small_default` for prefixes up to
/// `small_prefix`, else prefix+2 (refused past `max_prefix`).
#[allow(clippy::too_many_arguments)]
fn derive_window<A: crate::subnet::Family + Into<IpAddr>>(
    net_addr: A,
    prefix: u8,
    network: IpNet,
    len: u8,
    min: Option<A>,
    max: Option<A>,
    names: [&'static str; 3],
    max_len: u8,
    max_prefix: u8,
    small_prefix: u8,
    small_default: u8,
) -> Result<crate::subnet::Window<A>, ConfigError> {
    let len = if len == 0 {
        if prefix > max_prefix {
            return Err(ConfigError::NetworkTooSmall {
                network,
                max: max_prefix,
            });
        }
        if prefix <= small_prefix {
            small_default
        } else {
            prefix + 2
        }
    } else {
        if len > max_len {
            return Err(ConfigError::SubnetLenTooLong {
                field: names[0],
                len: len.into(),
                max: max_len,
            });
        }
        if len < prefix + 2 {
            return Err(ConfigError::SubnetLenTooShort {
                field: names[0],
                len: len.into(),
                network,
                min: prefix + 2,
            });
        }
        len
    };
    let bits = A::BITS;
    let step = 1u128 << (bits - len);
    let base = net_addr.to_u128();
    let net_size = if prefix == 0 {
        u128::MAX
    } else {
        (1u128 << (bits - prefix)) - 1
    };
    let last = base + net_size; // inclusive last address of the network
    let inside = |a: u128| a >= base && a <= last;
    let check = |name: &'static str, v: Option<A>, default: u128| -> Result<A, ConfigError> {
        match v {
            None => Ok(A::from_u128(default)),
            Some(a) if !inside(a.to_u128()) => Err(ConfigError::OutsideNetwork {
                field: name,
                addr: a.into(),
                network,
            }),
            Some(a) if a.to_u128() % step != 0 => Err(ConfigError::Unaligned {
                field: name,
                addr: a.into(),
                len,
            }),
            Some(a) => Ok(a),
        }
    };
    let min = check(names[1], min, base + step)?;
    // `last - (step - 1)` is the network address of the last subnet.
    let max = check(names[2], max, last - (step - 1))?;
    if min.to_u128() > max.to_u128() {
        return Err(ConfigError::EmptyWindow {
            min_field: names[1],
            min: min.into(),
            max_field: names[2],
            max: max.into(),
        });
    }
    Ok(crate::subnet::Window { len, min, max })
}

fn prefix_field(obj: &FoldedObject, name: &'static str) -> Result<u8, ConfigError> {
    let v: Option<u64> = obj.get(name)?;
    match v {
        None => Ok(0),
        Some(v) if v <= 128 => Ok(v as u8),
        Some(v) => Err(ConfigError::SubnetLenTooLong {
            field: name,
            len: v.min(u32::MAX as u64) as u32,
            max: 128,
        }),
    }
}

fn addr4_field(obj: &FoldedObject, name: &'static str) -> Result<Option<Ipv4Addr>, ConfigError> {
    obj.get::<String>(name)?
        .map(|s| {
            s.parse().map_err(|_| ConfigError::BadAddr {
                field: name,
                value: s.clone(),
                family: "IPv4",
            })
        })
        .transpose()
}

fn addr6_field(obj: &FoldedObject, name: &'static str) -> Result<Option<Ipv6Addr>, ConfigError> {
    obj.get::<String>(name)?
        .map(|s| {
            s.parse().map_err(|_| ConfigError::BadAddr {
                field: name,
                value: s.clone(),
                family: "IPv6",
            })
        })
        .transpose()
}

/// Parses an IPv4 CIDR and masks it to its network (`10.5.3.7/16` → `10.5.0.0/16`).
pub fn parse_cidr4(field: &'static str, s: &str) -> Result<Ipv4Net, ConfigError> {
    s.parse::<Ipv4Net>()
        .map(|n| n.trunc())
        .map_err(|_| ConfigError::BadCidr {
            field,
            value: s.to_string(),
            family: "IPv4",
        })
}

/// Parses an IPv6 CIDR and masks it to its network.
pub fn parse_cidr6(field: &'static str, s: &str) -> Result<Ipv6Net, ConfigError> {
    s.parse::<Ipv6Net>()
        .map(|n| n.trunc())
        .map_err(|_| ConfigError::BadCidr {
            field,
            value: s.to_string(),
            family: "IPv6",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> NetworkConfig {
        NetworkConfig::parse_and_validate(s).unwrap()
    }

    #[test]
    fn defaults_for_a_16() {
        let c = v(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"VXLAN","VNI":3}}"#);
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Some("10.5.1.0".parse().unwrap()));
        assert_eq!(c.subnet_max, Some("10.5.255.0".parse().unwrap()));
        assert_eq!(c.backend.backend_type, "vxlan");
        assert_eq!(c.backend.raw.get(), r#"{"Type":"VXLAN","VNI":3}"#);
        assert!(c.enable_ipv4 && !c.enable_ipv6 && !c.enable_nftables);
    }

    #[test]
    fn derived_lengths() {
        assert_eq!(v(r#"{"Network":"10.0.0.0/8"}"#).subnet_len, 24);
        assert_eq!(v(r#"{"Network":"10.0.0.0/22"}"#).subnet_len, 24);
        let c = v(r#"{"Network":"10.0.0.0/26"}"#);
        assert_eq!(c.subnet_len, 28);
        assert_eq!(c.subnet_min, Some("10.0.0.16".parse().unwrap()));
        assert_eq!(c.subnet_max, Some("10.0.0.48".parse().unwrap()));
        assert!(matches!(
            NetworkConfig::parse_and_validate(r#"{"Network":"10.0.0.0/29"}"#),
            Err(ConfigError::NetworkTooSmall { .. })
        ));
    }

    #[test]
    fn case_insensitive_keys_and_masking() {
        let c = v(r#"{"network":"10.5.3.7/16","subnetlen":20,"backend":{"type":"host-gw"}}"#);
        assert_eq!(c.network, Some("10.5.0.0/16".parse().unwrap()));
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.backend.backend_type, "host-gw");
    }

    #[test]
    fn missing_backend_defaults_to_udp_and_untyped_is_empty() {
        let c = v(r#"{"Network":"10.5.0.0/16"}"#);
        assert_eq!(c.backend.backend_type, "udp");
        assert!(c.backend_defaulted);
        let c = v(r#"{"Network":"10.5.0.0/16","Backend":{"VNI":3}}"#);
        assert_eq!(c.backend.backend_type, "");
        assert!(!c.backend_defaulted);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let cases = [
            ("{not json", "not a JSON object"),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#, "too long"),
            (
                r#"{"Network":"10.5.0.0/16","SubnetLen":17}"#,
                "fewer than four subnets",
            ),
            (r#"{"Network":"fd00::/16"}"#, "not a valid IPv4 CIDR"),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}"#,
                "not inside",
            ),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.4"}"#,
                "boundary",
            ),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.99.0","SubnetMax":"10.5.10.0"}"#,
                "SubnetMin 10.5.99.0 is above SubnetMax 10.5.10.0",
            ),
            (
                r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:8::"}"#,
                "IPv6SubnetMin fd00:0:0:9:: is above IPv6SubnetMax fd00:0:0:8::",
            ),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":"24"}"#, "SubnetLen"),
            (r#"{"EnableIPv4":false}"#, "none defined stack"),
            (r#"{}"#, "Network is required"),
            (
                r#"{"Network":"10.5.0.0/16","Backend":"vxlan"}"#,
                "must be a JSON object",
            ),
        ];
        for (text, want) in cases {
            let e = NetworkConfig::parse_and_validate(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn ipv6_window() {
        let c = v(r#"{"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Network":"10.5.0.0/16"}"#);
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(c.ipv6_subnet_min, Some("fd00:10:0:1::".parse().unwrap()));
        assert_eq!(c.ipv6_subnet_max, Some("fd00:10:0:ffff::".parse().unwrap()));
        let c = v(r#"{"EnableIPv6":true,"IPv6Network":"fd00::/120","EnableIPv4":false}"#);
        assert_eq!(c.ipv6_subnet_len, 122);
    }

    #[test]
    fn old_networks_list_is_read() {
        let c = v(r#"{"Networks":["10.7.0.0/16","10.8.0.0/16"]}"#);
        assert_eq!(c.network, Some("10.7.0.0/16".parse().unwrap()));
    }
}
