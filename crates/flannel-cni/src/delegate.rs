//! Building the delegate's network config from the netconf and subnet.env
//! (docs/compatibility.md, "CNI plugin netconf and delegate config").

use std::collections::BTreeMap;
use std::net::IpAddr;

use flannel_core::gojson::FoldedObject;
use ipnet::IpNet;
use serde_json::Value;

use crate::error::{code, CniError};
use crate::flannel_env::FlannelEnv;
use crate::gomarshal::{marshal, GoValue};
use crate::netconf::{JsonMap, NetConf};

/// The config handed to the delegate plugin: its `type` and the exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegateConfig {
    pub plugin_type: String,
    pub bytes: Vec<u8>,
}

/// Rejects a `delegate` object flannel cannot complete: `name` and `ipam` are
/// flannel's to set, and `type` must name a plugin.
pub fn check_delegate(delegate: &JsonMap) -> Result<(), CniError> {
    if let Some(t) = delegate.get("type") {
        if !t.is_string() {
            return Err(CniError::new(
                code::INVALID_NETCONF,
                "'delegate' dictionary, if present, must have (string) 'type' field",
            ));
        }
    }
    if delegate.contains_key("name") {
        return Err(CniError::new(
            code::INVALID_NETCONF,
            "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
        ));
    }
    if delegate.contains_key("ipam") {
        return Err(CniError::new(
            code::INVALID_NETCONF,
            "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel",
        ));
    }
    Ok(())
}

/// One CNI route (`types.Route`), kept as Go re-encodes it: struct field order,
/// zero-valued optional fields dropped, unknown keys dropped.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    dst: IpNet,
    gw: Option<IpAddr>,
    mtu: i64,
    advmss: i64,
    priority: i64,
    table: Option<i64>,
    scope: Option<i64>,
}

impl Route {
    fn to_go(&self) -> GoValue {
        let mut fields = vec![("dst", GoValue::String(self.dst.to_string()))];
        if let Some(gw) = self.gw {
            fields.push(("gw", GoValue::String(go_ip(gw))));
        }
        for (name, v) in [
            ("mtu", self.mtu),
            ("advmss", self.advmss),
            ("priority", self.priority),
        ] {
            if v != 0 {
                fields.push((name, GoValue::Float(v as f64)));
            }
        }
        for (name, v) in [("table", self.table), ("scope", self.scope)] {
            if let Some(v) = v {
                fields.push((name, GoValue::Float(v as f64)));
            }
        }
        GoValue::Struct(fields)
    }
}

/// Go prints an IPv4-mapped IPv6 address as plain IPv4.
fn go_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

fn parse_route(i: usize, v: &Value) -> Result<Route, String> {
    const FIELDS: &[&str] = &["dst", "gw", "mtu", "advmss", "priority", "table", "scope"];
    let text = v.to_string();
    let obj = FoldedObject::parse(&text, FIELDS).map_err(|e| format!("route {i}: {e}"))?;
    let dst = obj
        .get::<String>("dst")
        .map_err(|e| format!("route {i}: {e}"))?
        .ok_or_else(|| format!("route {i}: missing dst"))?;
    // CNI keeps the address as written (host bits included), only checks the syntax.
    let dst: IpNet = dst
        .parse()
        .map_err(|e| format!("route {i}: dst {dst:?}: {e}"))?;
    let gw = match obj
        .get::<String>("gw")
        .map_err(|e| format!("route {i}: {e}"))?
    {
        None => None,
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|e| format!("route {i}: gw {s:?}: {e}"))?,
        ),
    };
    let int = |f: &str| -> Result<Option<i64>, String> {
        obj.get::<i64>(f).map_err(|e| format!("route {i}: {e}"))
    };
    Ok(Route {
        dst,
        gw,
        mtu: int("mtu")?.unwrap_or(0),
        advmss: int("advmss")?.unwrap_or(0),
        priority: int("priority")?.unwrap_or(0),
        table: int("table")?,
        scope: int("scope")?,
    })
}

/// The input `ipam.routes`, re-encoded as CNI routes.
fn ipam_routes(ipam: Option<&JsonMap>) -> Result<Vec<GoValue>, CniError> {
    let bad = |why: String| {
        CniError::new(
            code::INVALID_NETCONF,
            format!("failed to read IPAM routes: failed to parse ipam.routes: {why}"),
        )
    };
    match ipam.and_then(|m| m.get("routes")) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| parse_route(i, v).map(|r| r.to_go()).map_err(bad))
            .collect(),
        Some(other) => Err(bad(format!("expected a list, got {other}"))),
    }
}

fn subnet_range(net: &IpNet) -> GoValue {
    GoValue::Array(vec![GoValue::Map(BTreeMap::from([(
        "subnet".to_string(),
        GoValue::String(net.to_string()),
    )]))])
}

/// The delegate config for ADD: the netconf's `delegate` completed with the network
/// name, defaults from subnet.env, and an `ipam` section handing out the lease.
pub fn build(conf: &NetConf, env: &FlannelEnv) -> Result<DelegateConfig, CniError> {
    let empty = JsonMap::new();
    let input = conf.delegate.as_ref().unwrap_or(&empty);
    check_delegate(input)?;

    let mut d: BTreeMap<String, GoValue> = input
        .iter()
        .map(|(k, v)| (k.clone(), GoValue::from(v)))
        .collect();
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), GoValue::from(rc));
    }
    d.insert("name".into(), GoValue::String(conf.name.clone()));
    let plugin_type = match input.get("type") {
        Some(Value::String(t)) => t.clone(),
        _ => {
            d.insert("type".into(), GoValue::String("bridge".into()));
            "bridge".to_string()
        }
    };
    // flanneld masquerades pod traffic itself when started with --ip-masq; the
    // bridge should do it only when flanneld does not.
    d.entry("ipMasq".into())
        .or_insert(GoValue::Bool(!env.ip_masq));
    d.entry("mtu".into())
        .or_insert(GoValue::Uint(u64::from(env.mtu)));
    if plugin_type == "bridge" {
        d.entry("isGateway".into()).or_insert(GoValue::Bool(true));
    }
    if !conf.cni_version.is_empty() {
        d.insert(
            "cniVersion".into(),
            GoValue::String(conf.cni_version.clone()),
        );
    }

    let mut ipam: BTreeMap<String, GoValue> = conf
        .ipam
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), GoValue::from(v)))
        .collect();
    ipam.entry("type".into())
        .or_insert(GoValue::String("host-local".into()));
    let ranges: Vec<GoValue> = [env.subnet, env.ipv6_subnet]
        .iter()
        .flatten()
        .map(subnet_range)
        .collect();
    // Go marshals an empty nil slice as null; a lease always has one family.
    ipam.insert(
        "ranges".into(),
        if ranges.is_empty() {
            GoValue::Null
        } else {
            GoValue::Array(ranges)
        },
    );
    let mut routes = ipam_routes(conf.ipam.as_ref())?;
    for net in env.networks.iter().chain(&env.ipv6_networks) {
        routes.push(GoValue::Struct(vec![(
            "dst",
            GoValue::String(net.to_string()),
        )]));
    }
    ipam.insert("routes".into(), GoValue::Array(routes));
    d.insert("ipam".into(), GoValue::Map(ipam));

    Ok(DelegateConfig {
        plugin_type,
        bytes: marshal(&GoValue::Map(d)).into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_v4(masq: bool) -> FlannelEnv {
        FlannelEnv::parse(&format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ={masq}\n"
        ))
        .unwrap()
    }

    fn build_str(netconf: &str, env: &FlannelEnv) -> Result<String, CniError> {
        let conf = NetConf::parse(netconf).unwrap();
        build(&conf, env).map(|d| String::from_utf8(d.bytes).unwrap())
    }

    #[test]
    fn spec_example_byte_for_byte() {
        // The reference kube-flannel conflist entry.
        let got = build_str(
            r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
                "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#,
            &env_v4(true),
        )
        .unwrap();
        assert_eq!(
            got,
            r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
        );
    }

    #[test]
    fn minimal_netconf_defaults() {
        let conf = NetConf::parse(r#"{"name":"n1","type":"flannel"}"#).unwrap();
        let d = build(&conf, &env_v4(false)).unwrap();
        assert_eq!(d.plugin_type, "bridge");
        assert_eq!(
            String::from_utf8(d.bytes).unwrap(),
            r#"{"ipMasq":true,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isGateway":true,"mtu":1450,"name":"n1","type":"bridge"}"#,
            "no cniVersion when the input has none; ipMasq is the inverse of FLANNEL_IPMASQ"
        );
    }

    #[test]
    fn dual_stack_ranges_and_routes() {
        let env = FlannelEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
             FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42:1::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let got = build_str(r#"{"cniVersion":"1.0.0","name":"cbr0"}"#, &env).unwrap();
        assert_eq!(
            got,
            r#"{"cniVersion":"1.0.0","ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}],[{"subnet":"2001:cafe:42:1::/64"}]],"routes":[{"dst":"10.244.0.0/16"},{"dst":"10.245.0.0/16"},{"dst":"2001:cafe:42::/56"}],"type":"host-local"},"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
        );
    }

    #[test]
    fn ipv6_only() {
        let env = FlannelEnv::parse(
            "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42:1::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let got = build_str(r#"{"name":"cbr0"}"#, &env).unwrap();
        assert!(
            got.contains(r#""ranges":[[{"subnet":"2001:cafe:42:1::/64"}]],"routes":[{"dst":"2001:cafe:42::/56"}]"#),
            "{got}"
        );
    }

    #[test]
    fn input_ipam_kept_ranges_replaced_routes_appended() {
        let got = build_str(
            r#"{"name":"cbr0","ipam":{"type":"host-local","dataDir":"/tmp/x",
                "ranges":[[{"subnet":"192.168.0.0/24"}]],
                "routes":[{"dst":"0.0.0.0/0"},{"dst":"192.168.9.7/16","gw":"10.244.1.1","junk":1},
                          {"GW":"::ffff:10.1.1.1","DST":"10.9.0.0/16","priority":0,"table":100}]}}"#,
            &env_v4(true),
        )
        .unwrap();
        assert!(
            got.contains(r#""ipam":{"dataDir":"/tmp/x","ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"0.0.0.0/0"},{"dst":"192.168.9.7/16","gw":"10.244.1.1"},{"dst":"10.9.0.0/16","gw":"10.1.1.1","table":100},{"dst":"10.244.0.0/16"}],"type":"host-local"}"#),
            "{got}"
        );
    }

    #[test]
    fn bad_ipam_routes_rejected() {
        for bad in [
            r#"{"name":"c","ipam":{"routes":{"dst":"0.0.0.0/0"}}}"#,
            r#"{"name":"c","ipam":{"routes":[{"dst":"nonsense"}]}}"#,
            r#"{"name":"c","ipam":{"routes":[{"gw":"10.0.0.1"}]}}"#,
            r#"{"name":"c","ipam":{"routes":[{"dst":"10.0.0.0/8","gw":"x"}]}}"#,
            r#"{"name":"c","ipam":{"routes":[{"dst":"10.0.0.0/8","mtu":"big"}]}}"#,
            r#"{"name":"c","ipam":{"routes":[7]}}"#,
        ] {
            let e = build_str(bad, &env_v4(true)).unwrap_err();
            assert_eq!(e.code, code::INVALID_NETCONF, "{bad}");
            assert!(e.msg.contains("ipam.routes"), "{bad}: {e}");
        }
        // null routes count as none.
        build_str(r#"{"name":"c","ipam":{"routes":null}}"#, &env_v4(true)).unwrap();
    }

    #[test]
    fn delegate_keys_respected_and_passed_through() {
        let conf = NetConf::parse(
            r#"{"cniVersion":"0.4.0","name":"cbr0",
                "delegate":{"type":"ipvlan","master":"eth0","mtu":1400,"ipMasq":true,"nested":{"b":1,"a":2.50}},
                "runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":8080}]}}"#,
        )
        .unwrap();
        let d = build(&conf, &env_v4(true)).unwrap();
        assert_eq!(d.plugin_type, "ipvlan");
        assert_eq!(
            String::from_utf8(d.bytes).unwrap(),
            r#"{"cniVersion":"0.4.0","ipMasq":true,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"master":"eth0","mtu":1400,"name":"cbr0","nested":{"a":2.5,"b":1},"runtimeConfig":{"portMappings":[{"containerPort":8080,"hostPort":80}]},"type":"ipvlan"}"#,
            "no isGateway for non-bridge types; given mtu and ipMasq win"
        );
        let conf = NetConf::parse(r#"{"name":"c","delegate":{"isGateway":false}}"#).unwrap();
        let got = String::from_utf8(build(&conf, &env_v4(true)).unwrap().bytes).unwrap();
        assert!(got.contains(r#""isGateway":false"#), "{got}");
    }

    #[test]
    fn delegate_with_name_ipam_or_bad_type_rejected() {
        for (bad, what) in [
            (r#"{"name":"c","delegate":{"name":"x"}}"#, "'name'"),
            (r#"{"name":"c","delegate":{"ipam":{}}}"#, "'ipam'"),
            (r#"{"name":"c","delegate":{"ipam":null}}"#, "'ipam'"),
            (r#"{"name":"c","delegate":{"type":1}}"#, "'type'"),
            (r#"{"name":"c","delegate":{"type":null}}"#, "'type'"),
        ] {
            let e = build_str(bad, &env_v4(true)).unwrap_err();
            assert_eq!(e.code, code::INVALID_NETCONF, "{bad}");
            assert!(e.msg.contains(what), "{bad}: {e}");
        }
    }
}
