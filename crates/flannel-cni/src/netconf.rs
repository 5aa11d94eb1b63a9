//! The plugin's network configuration (stdin).

use std::path::PathBuf;
use std::time::Duration;

use flannel_core::gojson::FoldedObject;
use serde_json::{Map, Value};

use crate::error::{code, CniError};

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
/// How long ADD waits for flanneld to write subnet.env unless told otherwise.
pub const DEFAULT_SUBNET_FILE_WAIT: Duration = Duration::from_secs(10);
/// Upper bound for `subnetFileWait`: a runtime's own ADD timeout is of this order.
pub const MAX_SUBNET_FILE_WAIT: Duration = Duration::from_secs(600);

/// A wait in seconds as given by the operator (netconf or environment), capped at
/// [`MAX_SUBNET_FILE_WAIT`]; `None` for a negative or non-finite number. The cap is
/// applied before the conversion, which panics on values a `Duration` cannot hold
/// (1e20 s): that would make the pod impossible to delete.
pub fn wait_from_secs(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::from_secs_f64(secs.min(MAX_SUBNET_FILE_WAIT.as_secs_f64())))
}

/// Standard and flannel keys; Go matches them case-insensitively.
const FIELDS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "capabilities",
    "ipam",
    "dns",
    "prevResult",
    "subnetFile",
    "dataDir",
    "delegate",
    "runtimeConfig",
    "subnetFileWait",
];

const DNS_FIELDS: &[&str] = &["nameservers", "domain", "search", "options"];

/// A JSON object as Go decodes it into `map[string]interface{}`.
pub type JsonMap = Map<String, Value>;

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// As given; empty when absent.
    pub cni_version: String,
    pub name: String,
    pub ipam: Option<JsonMap>,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub delegate: Option<JsonMap>,
    pub runtime_config: Option<JsonMap>,
    /// flannel-rs only: how long ADD waits for subnet.env to appear.
    pub subnet_file_wait: Option<Duration>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_NETCONF, msg)
}

/// `[a-zA-Z0-9][a-zA-Z0-9_.-]*`: the CNI rule for network names and container IDs.
pub fn is_valid_cni_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Checks the fields every CNI plugin requires (libcni's skel does this before the
/// plugin's own code runs): stdin is a JSON object with a valid `name`.
pub fn validate_common(stdin: &str) -> Result<(), CniError> {
    let obj = FoldedObject::parse(stdin, &["name"]).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("error unmarshalling network config: {e}"),
        )
    })?;
    let name = obj.get::<String>("name").map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("error unmarshalling network config: {e}"),
        )
    })?;
    match name {
        None => Err(invalid("missing network name")),
        Some(n) if n.is_empty() => Err(invalid("missing network name")),
        Some(n) if !is_valid_cni_name(&n) => {
            Err(invalid("invalid characters found in network name").with_details(n))
        }
        Some(_) => Ok(()),
    }
}

impl NetConf {
    /// Parses stdin the way upstream's Go struct decoding does (folded keys, unknown
    /// keys ignored, `null` meaning "default"), with type errors reported per field.
    pub fn parse(stdin: &str) -> Result<NetConf, CniError> {
        let obj = FoldedObject::parse(stdin, FIELDS).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                format!("failed to load netconf: {e}"),
            )
        })?;
        let field_err =
            |e: flannel_core::gojson::FieldError| invalid(format!("failed to load netconf: {e}"));
        // Typed only to reject what Go's decoder would reject; the values are unused.
        obj.get::<String>("type").map_err(field_err)?;
        obj.get::<std::collections::HashMap<String, bool>>("capabilities")
            .map_err(field_err)?;
        obj.get::<JsonMap>("prevResult").map_err(field_err)?;
        if let Some(raw) = obj.raw("dns") {
            let dns = FoldedObject::from_raw(raw, DNS_FIELDS)
                .map_err(|e| invalid(format!("failed to load netconf: field dns: {e}")))?;
            for list in ["nameservers", "search", "options"] {
                dns.get::<Vec<String>>(list).map_err(field_err)?;
            }
            dns.get::<String>("domain").map_err(field_err)?;
        }

        let non_empty_path = |field: &str, default: &str| -> Result<PathBuf, CniError> {
            match obj.get::<String>(field).map_err(field_err)? {
                None => Ok(PathBuf::from(default)),
                Some(s) if s.is_empty() => Err(invalid(format!("{field} must not be empty"))),
                Some(s) => Ok(PathBuf::from(s)),
            }
        };
        let subnet_file = non_empty_path("subnetFile", DEFAULT_SUBNET_FILE)?;
        let data_dir = non_empty_path("dataDir", DEFAULT_DATA_DIR)?;

        let subnet_file_wait = match obj.get::<f64>("subnetFileWait").map_err(field_err)? {
            None => None,
            Some(secs) => Some(wait_from_secs(secs).ok_or_else(|| {
                invalid(format!(
                    "subnetFileWait must be a non-negative number of seconds, got {secs}"
                ))
            })?),
        };

        Ok(NetConf {
            cni_version: obj
                .get::<String>("cniVersion")
                .map_err(field_err)?
                .unwrap_or_default(),
            name: obj
                .get::<String>("name")
                .map_err(field_err)?
                .unwrap_or_default(),
            ipam: obj.get::<JsonMap>("ipam").map_err(field_err)?,
            subnet_file,
            data_dir,
            delegate: obj.get::<JsonMap>("delegate").map_err(field_err)?,
            runtime_config: obj.get::<JsonMap>("runtimeConfig").map_err(field_err)?,
            subnet_file_wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let n = NetConf::parse(r#"{"name":"cbr0","type":"flannel"}"#).unwrap();
        assert_eq!(n.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(n.data_dir, PathBuf::from("/var/lib/cni/flannel"));
        assert_eq!(n.cni_version, "");
        assert_eq!(n.delegate, None);
        assert_eq!(n.ipam, None);
        assert_eq!(n.runtime_config, None);
        assert_eq!(n.subnet_file_wait, None);
    }

    #[test]
    fn keys_fold_and_null_keeps_defaults() {
        let n = NetConf::parse(
            r#"{"Name":"cbr0","CNIVersion":"1.0.0","SubnetFile":"/tmp/s.env","datadir":"/tmp/d",
                "Delegate":{"hairpinMode":true},"IPAM":null,"RuntimeConfig":{"portMappings":[]},
                "subnetFileWait":2.5,"unknown":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(n.name, "cbr0");
        assert_eq!(n.cni_version, "1.0.0");
        assert_eq!(n.subnet_file, PathBuf::from("/tmp/s.env"));
        assert_eq!(n.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(n.delegate.unwrap()["hairpinMode"], Value::Bool(true));
        assert_eq!(n.ipam, None);
        assert!(n.runtime_config.is_some());
        assert_eq!(n.subnet_file_wait, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn wrong_types_are_invalid_netconf() {
        for bad in [
            r#"{"name":"a","delegate":[]}"#,
            r#"{"name":"a","delegate":"bridge"}"#,
            r#"{"name":"a","ipam":1}"#,
            r#"{"name":"a","subnetFile":5}"#,
            r#"{"name":"a","dataDir":""}"#,
            r#"{"name":"a","runtimeConfig":true}"#,
            r#"{"name":"a","capabilities":{"portMappings":"yes"}}"#,
            r#"{"name":"a","dns":{"nameservers":"1.1.1.1"}}"#,
            r#"{"name":"a","type":7}"#,
            r#"{"name":"a","subnetFileWait":-1}"#,
            r#"{"name":"a","subnetFileWait":"10s"}"#,
        ] {
            let e = NetConf::parse(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_NETCONF, "{bad}: {e}");
        }
        assert_eq!(
            NetConf::parse("[1]").unwrap_err().code,
            code::DECODING_FAILURE
        );
        assert_eq!(
            NetConf::parse("{").unwrap_err().code,
            code::DECODING_FAILURE
        );
    }

    #[test]
    fn waits_beyond_what_a_duration_holds_are_capped_not_a_panic() {
        for huge in ["1e20", "1.7976931348623157e308"] {
            let n = NetConf::parse(&format!(r#"{{"name":"a","subnetFileWait":{huge}}}"#)).unwrap();
            assert_eq!(n.subnet_file_wait, Some(MAX_SUBNET_FILE_WAIT), "{huge}");
        }
        assert_eq!(wait_from_secs(f64::INFINITY), None);
        assert_eq!(wait_from_secs(f64::NAN), None);
        assert_eq!(wait_from_secs(-0.5), None);
        assert_eq!(wait_from_secs(1.5), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn wait_is_capped() {
        let n = NetConf::parse(r#"{"name":"a","subnetFileWait":1e9}"#).unwrap();
        assert_eq!(n.subnet_file_wait, Some(MAX_SUBNET_FILE_WAIT));
    }

    #[test]
    fn common_validation() {
        validate_common(r#"{"name":"cbr0"}"#).unwrap();
        validate_common(r#"{"NAME":"k8s-pod-network"}"#).unwrap();
        assert_eq!(
            validate_common("{}").unwrap_err().code,
            code::INVALID_NETCONF
        );
        assert_eq!(
            validate_common(r#"{"name":""}"#).unwrap_err().code,
            code::INVALID_NETCONF
        );
        assert_eq!(
            validate_common(r#"{"name":"../etc"}"#).unwrap_err().code,
            code::INVALID_NETCONF
        );
        assert_eq!(
            validate_common(r#"{"name":3}"#).unwrap_err().code,
            code::DECODING_FAILURE
        );
        assert_eq!(
            validate_common("not json").unwrap_err().code,
            code::DECODING_FAILURE
        );
    }

    #[test]
    fn cni_names() {
        assert!(is_valid_cni_name("abc"));
        assert!(is_valid_cni_name("0a_b.c-d"));
        assert!(!is_valid_cni_name(""));
        assert!(!is_valid_cni_name("-a"));
        assert!(!is_valid_cni_name(".hidden"));
        assert!(!is_valid_cni_name("a/b"));
        assert!(!is_valid_cni_name("a b"));
        assert!(!is_valid_cni_name("é"));
    }
}
