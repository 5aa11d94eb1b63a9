//! Leases as flannel stores them: the key naming the subnet(s) and the JSON value
//! (`LeaseAttrs`), byte-compatible with Go flanneld.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use regex::Regex;
use serde_json::value::RawValue;

use crate::gojson::{FieldError, FoldedObject};

/// The subnet(s) a lease holds; its text form is the etcd key's last element
/// (`10.5.52.0-24` or `10.5.52.0-24&fd00:10:5:34::-64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

/// A lease key that does not follow flannel's naming.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a flannel subnet key (expected e.g. 10.5.52.0-24)")]
pub struct BadLeaseKey(pub String);

fn key_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // Upstream's pattern, kept as it is: anchored at the end only, unescaped dots
    // included, so keys Go flanneld accepts are accepted here too.
    RE.get_or_init(|| {
        Regex::new(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$").expect("static regex")
    })
}

impl LeaseKey {
    pub fn v4(net: Ipv4Net) -> Self {
        LeaseKey { v4: net, v6: None }
    }
}

impl FromStr for LeaseKey {
    type Err = BadLeaseKey;
    fn from_str(s: &str) -> Result<Self, BadLeaseKey> {
        let bad = || BadLeaseKey(s.to_string());
        let c = key_pattern().captures(s).ok_or_else(bad)?;
        let ip: Ipv4Addr = c[1].parse().map_err(|_| bad())?;
        let len: u8 = c[2].parse().ok().filter(|l| *l < 32).ok_or_else(bad)?;
        let v4 = Ipv4Net::new(ip, len).map_err(|_| bad())?;
        let v6 = match (c.get(3), c.get(4)) {
            (Some(ip6), Some(len6)) => {
                let ip6: Ipv6Addr = ip6.as_str().parse().map_err(|_| bad())?;
                let len6: u8 = len6
                    .as_str()
                    .parse()
                    .ok()
                    .filter(|l| *l < 128)
                    .ok_or_else(bad)?;
                Some(Ipv6Net::new(ip6, len6).map_err(|_| bad())?)
            }
            _ => None,
        };
        Ok(LeaseKey { v4, v6 })
    }
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}-{}", self.v4.addr(), self.v4.prefix_len())?;
        if let Some(v6) = self.v6 {
            write!(f, "&{}-{}", v6.addr(), v6.prefix_len())?;
        }
        Ok(())
    }
}

/// The value stored under a lease key.
#[derive(Debug, Clone)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend_type: String,
    pub backend_data: Option<Box<RawValue>>,
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, o: &Self) -> bool {
        let raw = |r: &Option<Box<RawValue>>| r.as_ref().map(|r| r.get().to_string());
        self.public_ip == o.public_ip
            && self.public_ipv6 == o.public_ipv6
            && self.backend_type == o.backend_type
            && raw(&self.backend_data) == raw(&o.backend_data)
            && raw(&self.backend_v6_data) == raw(&o.backend_v6_data)
    }
}
impl Eq for LeaseAttrs {}

/// A lease value that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadLeaseValue {
    #[error("lease value is not a JSON object: {0}")]
    NotJson(String),
    #[error("lease value {0}")]
    Field(#[from] FieldError),
    #[error("lease value: {field}: {value:?} is not an {family} address")]
    BadAddr {
        field: &'static str,
        value: String,
        family: &'static str,
    },
}

const ATTR_FIELDS: &[&str] = &[
    "PublicIP",
    "PublicIPv6",
    "BackendType",
    "BackendData",
    "BackendV6Data",
];

impl LeaseAttrs {
    pub fn new(public_ip: Ipv4Addr) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// Compact JSON in Go's field order, as flanneld writes it.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(128);
        s.push_str("{\"PublicIP\":\"");
        s.push_str(&self.public_ip.to_string());
        s.push_str("\",\"PublicIPv6\":");
        match self.public_ipv6 {
            Some(ip) => {
                s.push('"');
                s.push_str(&ip.to_string());
                s.push('"');
            }
            None => s.push_str("null"),
        }
        if !self.backend_type.is_empty() {
            s.push_str(",\"BackendType\":");
            s.push_str(&serde_json::to_string(&self.backend_type).expect("string encodes"));
        }
        for (name, raw) in [
            ("BackendData", &self.backend_data),
            ("BackendV6Data", &self.backend_v6_data),
        ] {
            if let Some(raw) = raw {
                s.push_str(",\"");
                s.push_str(name);
                s.push_str("\":");
                s.push_str(&compact(raw));
            }
        }
        s.push('}');
        s
    }

    /// Decodes a lease value as Go does (case-insensitive keys; a missing PublicIP
    /// reads as 0.0.0.0).
    pub fn decode(text: &str) -> Result<Self, BadLeaseValue> {
        let mut o = FoldedObject::parse(text, ATTR_FIELDS)
            .map_err(|e| BadLeaseValue::NotJson(e.to_string()))?;
        let public_ip = match o.get::<String>("PublicIP")? {
            None => Ipv4Addr::UNSPECIFIED,
            Some(s) => s.parse().map_err(|_| BadLeaseValue::BadAddr {
                field: "PublicIP",
                value: s,
                family: "IPv4",
            })?,
        };
        let public_ipv6 = match o.get::<String>("PublicIPv6")? {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| BadLeaseValue::BadAddr {
                field: "PublicIPv6",
                value: s,
                family: "IPv6",
            })?),
        };
        Ok(LeaseAttrs {
            public_ip,
            public_ipv6,
            backend_type: o.get::<String>("BackendType")?.unwrap_or_default(),
            backend_data: o.take_raw("BackendData"),
            backend_v6_data: o.take_raw("BackendV6Data"),
        })
    }
}

/// Go's `json.Marshal` compacts an embedded `RawMessage` (drops insignificant
/// whitespace) and otherwise keeps its bytes, escapes included; so do we.
fn compact(raw: &RawValue) -> String {
    let text = raw.get();
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\n' | '\t' | '\r') {
            out.push(c);
        }
    }
    out
}

/// One host's lease: its subnet(s), attributes and (where the store knows it) expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: LeaseKey,
    pub attrs: LeaseAttrs,
    /// For this host's own lease: when it expires (`None`: a reservation, a key
    /// without TTL). Other hosts' leases carry `None`: their expiry is not looked
    /// up (one etcd round trip per lease) because nothing needs it.
    pub expiration: Option<SystemTime>,
}

impl Lease {
    pub fn subnet(&self) -> Ipv4Net {
        self.key.v4
    }
    pub fn ipv6_subnet(&self) -> Option<Ipv6Net> {
        self.key.v6
    }
}

/// A MAC address, printed as Go prints it (lower-case, colon-separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A MAC address string that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(BadMac(s.to_string()));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(BadMac(s.to_string()));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.to_string()))?;
        }
        Ok(MacAddr(out))
    }
}

impl MacAddr {
    /// A random locally-administered unicast address (what Go flanneld picks for a
    /// new VXLAN device).
    pub fn random_local<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        let mut m: [u8; 6] = rng.random();
        m[0] = (m[0] & 0xfe) | 0x02;
        MacAddr(m)
    }
}

/// The vxlan backend's BackendData, `{"VNI":1,"VtepMAC":"d6:2d:b9:3b:e2:ab"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    pub vni: u32,
    pub vtep_mac: MacAddr,
}

/// BackendData of another node that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadBackendData {
    #[error("backend data is not a JSON object: {0}")]
    NotJson(String),
    #[error("backend data {0}")]
    Field(#[from] FieldError),
    #[error("backend data has no {0}")]
    Missing(&'static str),
    #[error("backend data: {0}")]
    Mac(#[from] BadMac),
    #[error("backend data: {0}")]
    Key(String),
}

impl VxlanData {
    pub fn encode(&self) -> Box<RawValue> {
        RawValue::from_string(format!(
            "{{\"VNI\":{},\"VtepMAC\":\"{}\"}}",
            self.vni, self.vtep_mac
        ))
        .expect("well-formed JSON")
    }

    pub fn decode(raw: &RawValue) -> Result<Self, BadBackendData> {
        let o = FoldedObject::from_raw(raw, &["VNI", "VtepMAC"])
            .map_err(|e| BadBackendData::NotJson(e.to_string()))?;
        let mac: String = o
            .get("VtepMAC")?
            .ok_or(BadBackendData::Missing("VtepMAC"))?;
        Ok(VxlanData {
            vni: o.get("VNI")?.unwrap_or(0),
            vtep_mac: mac.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_round_trip_and_match_upstream_text() {
        for k in ["10.5.52.0-24", "10.5.52.0-24&fd00:10:5:34::-64"] {
            assert_eq!(k.parse::<LeaseKey>().unwrap().to_string(), k);
        }
        // End-anchored only, like upstream's pattern.
        let k: LeaseKey = "/coreos.com/network/subnets/10.5.52.0-24".parse().unwrap();
        assert_eq!(k.to_string(), "10.5.52.0-24");
        for bad in [
            "10.5.52.0-32",
            "10.5.52.0",
            "garbage",
            "10.5.52.0-24&fd00::-128",
            "999.1.1.1-24",
            "10.5.52.0-24x",
        ] {
            assert!(bad.parse::<LeaseKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn encodes_exactly_like_flanneld() {
        let mut a = LeaseAttrs::new("10.10.0.1".parse().unwrap());
        assert_eq!(a.encode(), r#"{"PublicIP":"10.10.0.1","PublicIPv6":null}"#);
        a.backend_type = "host-gw".into();
        assert_eq!(
            a.encode(),
            r#"{"PublicIP":"10.10.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        a.backend_type = "vxlan".into();
        a.backend_data = Some(
            VxlanData {
                vni: 1,
                vtep_mac: "d6:2d:b9:3b:e2:ab".parse().unwrap(),
            }
            .encode(),
        );
        assert_eq!(
            a.encode(),
            r#"{"PublicIP":"10.10.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"d6:2d:b9:3b:e2:ab"}}"#
        );
        a.public_ipv6 = Some("fd00::1".parse().unwrap());
        assert!(a.encode().contains(r#""PublicIPv6":"fd00::1""#));
    }

    #[test]
    fn embedded_data_is_compacted_but_keeps_go_escapes() {
        let mut a = LeaseAttrs::new("10.10.0.1".parse().unwrap());
        a.backend_type = "extension".into();
        a.backend_data =
            Some(RawValue::from_string(r#" "ca:fe \u003c\u0026 x" "#.trim().into()).unwrap());
        assert!(
            a.encode()
                .ends_with(r#""BackendData":"ca:fe \u003c\u0026 x"}"#),
            "{}",
            a.encode()
        );
        a.backend_data = Some(
            RawValue::from_string("{ \"VNI\" : 1,\n \"VtepMAC\": \"a b\\\" c\" }".into()).unwrap(),
        );
        assert!(
            a.encode()
                .ends_with(r#""BackendData":{"VNI":1,"VtepMAC":"a b\" c"}}"#),
            "{}",
            a.encode()
        );
    }

    #[test]
    fn decodes_reservations_and_folds_case() {
        let a = LeaseAttrs::decode(r#"{"publicip":"10.10.0.1"}"#).unwrap();
        assert_eq!(a.public_ip, "10.10.0.1".parse::<Ipv4Addr>().unwrap());
        assert!(a.backend_data.is_none() && a.backend_type.is_empty());
        assert!(LeaseAttrs::decode("garbage").is_err());
        assert!(LeaseAttrs::decode(r#"{"PublicIP":"300.1.1.1"}"#).is_err());
        assert!(LeaseAttrs::decode(r#"{"PublicIP":7}"#).is_err());
    }

    #[test]
    fn vxlan_data_rejects_bad_macs() {
        let raw = RawValue::from_string(r#"{"vni":1,"vtepmac":"zz"}"#.into()).unwrap();
        assert!(VxlanData::decode(&raw).is_err());
        let raw = RawValue::from_string(r#"{"VNI":1}"#.into()).unwrap();
        assert_eq!(
            VxlanData::decode(&raw),
            Err(BadBackendData::Missing("VtepMAC"))
        );
    }

    proptest! {
        #[test]
        fn attrs_round_trip(ip: u32, ip6: Option<u128>, ty in "[a-z-]{0,8}", vni: u32, mac: [u8; 6]) {
            let a = LeaseAttrs {
                public_ip: Ipv4Addr::from(ip),
                public_ipv6: ip6.map(Ipv6Addr::from),
                backend_type: ty,
                backend_data: Some(VxlanData { vni, vtep_mac: MacAddr(mac) }.encode()),
                backend_v6_data: None,
            };
            let b = LeaseAttrs::decode(&a.encode()).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(b.encode(), a.encode());
            let d = VxlanData::decode(b.backend_data.as_ref().unwrap()).unwrap();
            prop_assert_eq!(d.vtep_mac, MacAddr(mac));
        }

        #[test]
        fn keys_round_trip(ip: u32, len in 0u8..32, ip6: Option<(u128, u8)>) {
            let k = LeaseKey {
                v4: Ipv4Net::new(Ipv4Addr::from(ip), len).unwrap(),
                v6: ip6.map(|(a, l)| Ipv6Net::new(Ipv6Addr::from(a), l % 128).unwrap()),
            };
            prop_assert_eq!(k.to_string().parse::<LeaseKey>().unwrap(), k);
        }

        #[test]
        fn garbage_never_panics(s in ".{0,64}") {
            let _ = LeaseAttrs::decode(&s);
            let _ = s.parse::<LeaseKey>();
        }
    }
}
