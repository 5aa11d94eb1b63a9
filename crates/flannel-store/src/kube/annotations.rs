//! The node annotation names, derived from `--kube-annotation-prefix` as upstream does.

use std::sync::OnceLock;

use regex::Regex;

/// The default `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// A prefix that cannot name annotations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("--kube-annotation-prefix {0:?}: the prefix can contain at most one '/'")]
    TooManySlashes(String),
    #[error("--kube-annotation-prefix {0:?}: the prefix must look like fqdn/[0-9a-z-_]* (e.g. flannel.alpha.coreos.com or example.com/flannel)")]
    Format(String),
}

/// The full annotation keys flannel reads and writes on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    /// The normalised prefix (ends in `/` or `-`).
    pub prefix: String,
    pub kube_subnet_manager: String,
    pub backend_data: String,
    pub backend_v6_data: String,
    pub backend_type: String,
    pub public_ip: String,
    pub public_ipv6: String,
    pub public_ip_overwrite: String,
    pub public_ipv6_overwrite: String,
    pub node_public_ip: String,
    pub node_public_ipv6: String,
}

fn prefix_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // Upstream's pattern, unanchored at the start as Go's MatchString is.
    RE.get_or_init(|| {
        Regex::new(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$").expect("static regex")
    })
}

impl Annotations {
    /// Normalises the prefix (no `/` → append `/`; else append `-` unless it ends in
    /// `/` or `-`), validates it and builds the names.
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let slashes = prefix.matches('/').count();
        if slashes > 1 {
            return Err(PrefixError::TooManySlashes(prefix.to_string()));
        }
        let mut p = prefix.to_string();
        if slashes == 0 {
            p.push('/');
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        if !prefix_pattern().is_match(&p) {
            return Err(PrefixError::Format(prefix.to_string()));
        }
        let n = |s: &str| format!("{p}{s}");
        Ok(Annotations {
            kube_subnet_manager: n("kube-subnet-manager"),
            backend_data: n("backend-data"),
            backend_v6_data: n("backend-v6-data"),
            backend_type: n("backend-type"),
            public_ip: n("public-ip"),
            public_ipv6: n("public-ipv6"),
            public_ip_overwrite: n("public-ip-overwrite"),
            public_ipv6_overwrite: n("public-ipv6-overwrite"),
            // Upstream builds these two (and the stored-MAC lookup) as "<flag>/name"
            // even when the prefix got a '-' suffix, so they never match such
            // prefixes; we use the normalised prefix, which is identical for the
            // default prefix and correct for the others.
            node_public_ip: n("node-public-ip"),
            node_public_ipv6: n("node-public-ipv6"),
            prefix: p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_names() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        assert_eq!(a.prefix, "flannel.alpha.coreos.com/");
        assert_eq!(a.backend_data, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(
            a.kube_subnet_manager,
            "flannel.alpha.coreos.com/kube-subnet-manager"
        );
        assert_eq!(
            a.public_ip_overwrite,
            "flannel.alpha.coreos.com/public-ip-overwrite"
        );
        assert_eq!(
            a.backend_v6_data,
            "flannel.alpha.coreos.com/backend-v6-data"
        );
        assert_eq!(a.public_ipv6, "flannel.alpha.coreos.com/public-ipv6");
    }

    #[test]
    fn normalisation_and_validation_follow_upstream() {
        assert_eq!(
            Annotations::new("example.com/flannel")
                .unwrap()
                .backend_type,
            "example.com/flannel-backend-type"
        );
        assert_eq!(
            Annotations::new("example.com/flannel-").unwrap().prefix,
            "example.com/flannel-"
        );
        assert_eq!(
            Annotations::new("example.com/").unwrap().prefix,
            "example.com/"
        );
        assert!(matches!(
            Annotations::new("a.b/c/d"),
            Err(PrefixError::TooManySlashes(_))
        ));
        for bad in ["nodots", "example.com/UPPER", "example.com/a.b", ""] {
            assert!(
                matches!(Annotations::new(bad), Err(PrefixError::Format(_))),
                "{bad}"
            );
        }
        // Unanchored at the start like Go's MatchString: a leading upper-case
        // character is tolerated because the rest of the text matches.
        assert!(Annotations::new("Example.com").is_ok());
    }
}
