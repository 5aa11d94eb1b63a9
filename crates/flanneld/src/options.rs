//! flanneld's command line: upstream's flag names, defaults and `FLANNELD_*`
//! environment variables, read with Go `flag` syntax (`-name`, `--name`, `=value`,
//! booleans that take a value only after `=`).

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::Parser;

/// Go's `strconv.ParseBool`, which `flag` uses for boolean flags.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?} (use true or false)")),
    }
}

fn parse_renew_margin(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of minutes"))?;
    if (1..=1439).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 1 and 1439 minutes (a lease lasts 24 h)".into())
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "flanneld",
    about = "flannel-rs: the flannel overlay network agent",
    disable_version_flag = true,
    long_about = None
)]
pub struct Options {
    /// a comma-delimited list of etcd endpoints
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    /// etcd prefix
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// SSL key file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", default_value = "")]
    pub etcd_keyfile: String,
    /// SSL certification file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", default_value = "")]
    pub etcd_certfile: String,
    /// SSL Certificate Authority file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", default_value = "")]
    pub etcd_cafile: String,
    /// username for BasicAuth to etcd
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", default_value = "")]
    pub etcd_username: String,
    /// password for BasicAuth to etcd
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub etcd_password: String,

    /// interface to use (IP or name) for inter-host communication; may be repeated
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,
    /// regex expression to match the first interface to use (IP or name); may be repeated
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// detect the interface to use from the route to this IP
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IP accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IP", default_value = "")]
    pub public_ip: String,
    /// IPv6 accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", default_value = "")]
    pub public_ipv6: String,

    /// filename where env variables (subnet, MTU, ...) will be written to
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// minutes before lease expiry at which it is renewed (1..1439)
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value = "60", value_parser = parse_renew_margin)]
    pub subnet_lease_renew_margin: u32,

    /// setup IP masquerade rule for traffic destined outside of the overlay network
    #[arg(long, env = "FLANNELD_IP_MASQ", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_masq: bool,
    /// disable the fully-random option of the masquerade rules
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_masq_fully_random_disable: bool,

    /// contact the Kubernetes API for subnet assignment instead of etcd
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL (in-cluster config when empty)
    #[arg(long, env = "FLANNELD_KUBE_API_URL", default_value = "")]
    pub kube_api_url: String,
    /// kubeconfig file location (in-cluster config when empty)
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", default_value = "")]
    pub kubeconfig_file: String,
    /// Kubernetes annotation prefix
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,
    /// path to the network configuration file (Kubernetes mode)
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,
    /// set the NetworkUnavailable node condition to False once the network is up
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub set_node_network_unavailable: bool,

    /// the IP address for the healthz server to listen on
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// the port for the healthz server to listen on (0 disables it)
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value = "0")]
    pub healthz_port: u16,

    /// resync period for the masquerade/forward rules, in seconds
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value = "5")]
    pub iptables_resync: u64,
    /// add default accept rules to the FORWARD chain
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub iptables_forward_rules: bool,
    /// add a blackhole route for this host's subnet(s)
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_blackhole_route: bool,

    /// print the version and exit
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub version: bool,
    /// remove what flanneld created on this host (devices, routes, rules, subnet.env) and exit
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub cleanup: bool,

    /// log verbosity (klog -v): 0 info, 1..3 more info, 4+ debug, 6+ trace
    #[arg(long = "v", env = "FLANNELD_V", default_value = "0")]
    pub verbosity: u8,
    /// accepted for compatibility with klog; ignored
    #[arg(long, env = "FLANNELD_VMODULE", default_value = "")]
    pub vmodule: String,
    /// accepted for compatibility with klog; ignored
    #[arg(
        long = "log_backtrace_at",
        env = "FLANNELD_LOG_BACKTRACE_AT",
        default_value = ""
    )]
    pub log_backtrace_at: String,
}

impl Options {
    /// Parses a Go-style command line (`-name=value` accepted as `--name=value`).
    pub fn parse_go_style<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Options::try_parse_from(go_style_args(args))
    }

    pub fn public_ip(&self) -> Result<Option<Ipv4Addr>, String> {
        parse_optional_ip(&self.public_ip, "--public-ip")
    }

    pub fn public_ipv6(&self) -> Result<Option<Ipv6Addr>, String> {
        parse_optional_ip(&self.public_ipv6, "--public-ipv6")
    }
}

fn parse_optional_ip<T: std::str::FromStr>(s: &str, flag: &str) -> Result<Option<T>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| format!("{flag}: {s:?} is not a valid address"))
}

/// Go's `flag` package accepts one or two dashes for every flag; clap wants two for
/// long names. `-h` stays the short help flag.
fn go_style_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut rest_is_positional = false;
    for (i, a) in args.into_iter().enumerate() {
        let a: OsString = a.into();
        if i == 0 || rest_is_positional {
            out.push(a);
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--" {
            rest_is_positional = true;
            out.push(a);
            continue;
        }
        if let Some(body) = s.strip_prefix('-') {
            if !body.starts_with('-') && body != "h" && !body.is_empty() {
                out.push(OsString::from(format!("--{body}")));
                continue;
            }
        }
        out.push(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        let mut v = vec!["flanneld"];
        v.extend_from_slice(args);
        Options::parse_go_style(v).unwrap()
    }

    #[test]
    fn upstream_defaults() {
        let o = parse(&[]);
        assert_eq!(
            o.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert_eq!(o.etcd_prefix, "/coreos.com/network");
        assert_eq!(o.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(o.subnet_lease_renew_margin, 60);
        assert!(!o.ip_masq && o.iptables_forward_rules && o.set_node_network_unavailable);
        assert_eq!(o.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(
            o.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert_eq!(o.healthz_port, 0);
        assert_eq!(o.iptables_resync, 5);
    }

    #[test]
    fn go_syntax() {
        let o = parse(&[
            "-etcd-endpoints=http://10.0.0.1:2379",
            "-iface",
            "eth0",
            "--iface=10.1.1.1",
            "-ip-masq",
            "--iptables-forward-rules=false",
            "-v=2",
            "--kube-subnet-mgr=t",
        ]);
        assert_eq!(o.etcd_endpoints, "http://10.0.0.1:2379");
        assert_eq!(o.iface, vec!["eth0", "10.1.1.1"]);
        assert!(o.ip_masq);
        assert!(!o.iptables_forward_rules);
        assert!(o.kube_subnet_mgr);
        assert_eq!(o.verbosity, 2);
    }

    #[test]
    fn bool_does_not_swallow_next_word() {
        let mut v = vec!["flanneld", "-ip-masq", "false"];
        // Go stops flag parsing at the first non-flag word; clap rejects the stray
        // positional, which is the clearer outcome.
        assert!(Options::parse_go_style(v.drain(..)).is_err());
        assert!(Options::parse_go_style(["flanneld", "--ip-masq=maybe"]).is_err());
    }

    #[test]
    fn renew_margin_bounds() {
        assert!(Options::parse_go_style(["flanneld", "--subnet-lease-renew-margin=0"]).is_err());
        assert!(Options::parse_go_style(["flanneld", "--subnet-lease-renew-margin=1440"]).is_err());
        assert_eq!(
            parse(&["--subnet-lease-renew-margin=1439"]).subnet_lease_renew_margin,
            1439
        );
    }

    #[test]
    fn go_bools() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false));
        }
        assert!(parse_go_bool("yes").is_err());
    }
}
