//! Reading `subnet.env` the way the CNI plugin needs it
//! (docs/compatibility.md, "CNI plugin netconf and delegate config").

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flannel_core::subnet_env::parse_env_lines;
use ipnet::IpNet;

use crate::error::{code, CniError};

/// What flanneld told the plugin. Subnets are masked to their network
/// (`FLANNEL_SUBNET=10.244.1.1/24` → `10.244.1.0/24`); the network lists are
/// deduplicated and keep file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelEnv {
    pub networks: Vec<IpNet>,
    pub subnet: Option<IpNet>,
    pub ipv6_networks: Vec<IpNet>,
    pub ipv6_subnet: Option<IpNet>,
    pub mtu: u32,
    pub ip_masq: bool,
}

/// subnet.env content that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// A key whose value does not parse.
    #[error("{key} has an invalid value {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// Required keys that are absent, listed as upstream lists them.
    #[error("is missing {0}")]
    Missing(String),
}

fn parse_cidr(key: &'static str, value: &str) -> Result<IpNet, EnvError> {
    value
        .trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|e| EnvError::Invalid {
            key,
            value: value.to_string(),
            reason: e.to_string(),
        })
}

fn parse_cidr_list(key: &'static str, value: &str) -> Result<Vec<IpNet>, EnvError> {
    let mut out: Vec<IpNet> = Vec::new();
    for part in value.split(',') {
        let net = parse_cidr(key, part)?;
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

impl FlannelEnv {
    /// Parses the file's text. A later line for the same key replaces an earlier one.
    pub fn parse(text: &str) -> Result<FlannelEnv, EnvError> {
        let mut networks = Vec::new();
        let mut subnet = None;
        let mut ipv6_networks = Vec::new();
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ip_masq = None;
        for (key, value) in parse_env_lines(text) {
            match key.as_str() {
                "FLANNEL_NETWORK" => networks = parse_cidr_list("FLANNEL_NETWORK", &value)?,
                "FLANNEL_SUBNET" => subnet = Some(parse_cidr("FLANNEL_SUBNET", &value)?),
                "FLANNEL_IPV6_NETWORK" => {
                    ipv6_networks = parse_cidr_list("FLANNEL_IPV6_NETWORK", &value)?
                }
                "FLANNEL_IPV6_SUBNET" => {
                    ipv6_subnet = Some(parse_cidr("FLANNEL_IPV6_SUBNET", &value)?)
                }
                "FLANNEL_MTU" => {
                    // Digits only, as Go's ParseUint: no sign, no spaces.
                    let parsed = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                        value.parse::<u32>().ok()
                    } else {
                        None
                    };
                    mtu = Some(parsed.ok_or_else(|| EnvError::Invalid {
                        key: "FLANNEL_MTU",
                        value: value.clone(),
                        reason: "not an unsigned 32-bit number".to_string(),
                    })?);
                }
                "FLANNEL_IPMASQ" => ip_masq = Some(value == "true"),
                _ => {}
            }
        }
        let mut missing: Vec<&str> = Vec::new();
        if networks.is_empty() && ipv6_networks.is_empty() {
            missing.extend(["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]);
        }
        if subnet.is_none() && ipv6_subnet.is_none() {
            missing.extend(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]);
        }
        if mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if ip_masq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        match (mtu, ip_masq) {
            (Some(mtu), Some(ip_masq)) if missing.is_empty() => Ok(FlannelEnv {
                networks,
                subnet,
                ipv6_networks,
                ipv6_subnet,
                mtu,
                ip_masq,
            }),
            _ => Err(EnvError::Missing(missing.join(", "))),
        }
    }
}

/// Why subnet.env could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "flanneld has not written {} yet (is the flannel agent running and has it acquired a lease?)",
        path.display()
    )]
    NotWritten { path: PathBuf, waited: Duration },
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("{} {source}", path.display())]
    Invalid { path: PathBuf, source: EnvError },
}

impl LoadError {
    /// The CNI error for an ADD that needed the file.
    pub fn to_cni(&self) -> CniError {
        match self {
            LoadError::NotWritten { waited, .. } => {
                CniError::new(code::TRY_AGAIN_LATER, self.to_string())
                    .with_details(format!("waited {:.1} s for the file", waited.as_secs_f64()))
            }
            LoadError::Unreadable { .. } => CniError::new(code::IO_FAILURE, self.to_string()),
            LoadError::Invalid { .. } => CniError::new(code::INTERNAL, self.to_string()),
        }
    }
}

/// Reads and parses the file once.
pub fn load(path: &Path) -> Result<FlannelEnv, LoadError> {
    load_waiting(path, Duration::ZERO)
}

/// Reads and parses the file, waiting up to `wait` for it to appear: on a booting
/// node the runtime may ask for a pod network before flanneld has its lease.
/// Only absence is waited out; an unreadable or invalid file fails at once.
pub fn load_waiting(path: &Path, wait: Duration) -> Result<FlannelEnv, LoadError> {
    const POLL: Duration = Duration::from_millis(100);
    let start = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                return FlannelEnv::parse(&text).map_err(|source| LoadError::Invalid {
                    path: path.to_path_buf(),
                    source,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let waited = start.elapsed();
                if waited >= wait {
                    return Err(LoadError::NotWritten {
                        path: path.to_path_buf(),
                        waited,
                    });
                }
                std::thread::sleep(POLL.min(wait - waited));
            }
            Err(source) => {
                return Err(LoadError::Unreadable {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn upstream_file_parses() {
        let e = FlannelEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.48.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        assert_eq!(e.networks, vec![net("10.244.0.0/16")]);
        assert_eq!(e.subnet, Some(net("10.244.48.0/24")), "masked");
        assert_eq!(e.ipv6_networks, vec![]);
        assert_eq!(e.ipv6_subnet, None);
        assert_eq!(e.mtu, 1450);
        assert!(e.ip_masq);
    }

    #[test]
    fn dual_stack_and_comma_lists() {
        let e = FlannelEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16,10.244.7.7/16\n\
             FLANNEL_SUBNET=10.244.1.1/24\n\
             FLANNEL_IPV6_NETWORK=2001:cafe:42::/56,2001:cafe:42::/56\n\
             FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        assert_eq!(e.networks, vec![net("10.244.0.0/16"), net("10.245.0.0/16")]);
        assert_eq!(e.ipv6_networks, vec![net("2001:cafe:42::/56")]);
        assert_eq!(e.ipv6_subnet, Some(net("2001:cafe:42::/64")));
        assert!(!e.ip_masq);
    }

    #[test]
    fn ipv6_only_is_enough() {
        let e = FlannelEnv::parse(
            "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42:1::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        assert!(e.networks.is_empty());
        assert_eq!(e.ipv6_subnet, Some(net("2001:cafe:42:1::/64")));
    }

    #[test]
    fn ipmasq_true_only_for_exact_true() {
        for (v, want) in [
            ("true", true),
            ("True", false),
            ("1", false),
            ("yes", false),
            ("", false),
        ] {
            let e = FlannelEnv::parse(&format!(
                "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.1.0.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ={v}\n"
            ))
            .unwrap();
            assert_eq!(e.ip_masq, want, "FLANNEL_IPMASQ={v}");
        }
    }

    #[test]
    fn missing_keys_are_listed() {
        assert_eq!(
            FlannelEnv::parse("").unwrap_err().to_string(),
            "is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
        );
        assert_eq!(
            FlannelEnv::parse(
                "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.1.0.1/24\nFLANNEL_IPMASQ=true\n"
            )
            .unwrap_err(),
            EnvError::Missing("FLANNEL_MTU".into())
        );
    }

    #[test]
    fn invalid_values_name_the_key() {
        let base = "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.1.0.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n";
        for (line, key) in [
            ("FLANNEL_MTU=-1", "FLANNEL_MTU"),
            ("FLANNEL_MTU=+1500", "FLANNEL_MTU"),
            ("FLANNEL_MTU=4294967296", "FLANNEL_MTU"),
            ("FLANNEL_SUBNET=10.1.0.1", "FLANNEL_SUBNET"),
            ("FLANNEL_NETWORK=10.0.0.0/8,", "FLANNEL_NETWORK"),
            ("FLANNEL_IPV6_SUBNET=garbage", "FLANNEL_IPV6_SUBNET"),
        ] {
            let err = FlannelEnv::parse(&format!("{base}{line}\n")).unwrap_err();
            match &err {
                EnvError::Invalid { key: k, .. } => assert_eq!(*k, key, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
            assert!(err.to_string().starts_with(key));
        }
    }

    #[test]
    fn load_reports_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let err = load(&path).unwrap_err();
        assert!(matches!(err, LoadError::NotWritten { .. }));
        let cni = err.to_cni();
        assert_eq!(cni.code, code::TRY_AGAIN_LATER);
        assert!(cni.msg.contains("flanneld has not written"), "{}", cni.msg);
        assert!(cni.msg.contains(&path.display().to_string()));

        std::fs::write(&path, "FLANNEL_MTU=1450\n").unwrap();
        let cni = load(&path).unwrap_err().to_cni();
        assert_eq!(cni.code, code::INTERNAL);
        assert!(
            cni.msg.contains("is missing FLANNEL_NETWORK"),
            "{}",
            cni.msg
        );

        // A directory in place of the file: unreadable, reported at once.
        let cni = load(dir.path()).unwrap_err().to_cni();
        assert_eq!(cni.code, code::IO_FAILURE);
        assert!(cni.msg.starts_with("cannot read"), "{}", cni.msg);
    }

    #[test]
    fn load_waits_for_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let tmp = path.with_extension("tmp");
                std::fs::write(
                    &tmp,
                    "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.1.0.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n",
                )
                .unwrap();
                std::fs::rename(tmp, path).unwrap();
            })
        };
        // Generous bound: the test only needs the file to appear within it.
        let env = load_waiting(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(env.mtu, 1500);
        writer.join().unwrap();
    }
}
