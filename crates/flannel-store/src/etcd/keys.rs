//! Where flannel's data lives in etcd: `<prefix>/config` and `<prefix>/subnets/<key>`,
//! built with Go's `path.Join` semantics so every prefix spelling upstream accepts
//! (trailing slash, doubled slashes, `.` elements) maps to the same keys.

use flannel_core::LeaseKey;

/// The default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// The keys derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// `<prefix>/config`.
    pub config: String,
    /// `<prefix>/subnets` (no trailing slash; lease keys are below it).
    pub subnets: String,
    /// `<prefix>/subnets/`: what listings and watches range over, so that a sibling
    /// like `<prefix>/subnets2` is never mistaken for a lease.
    pub subnets_prefix: String,
}

impl KeyLayout {
    pub fn new(prefix: &str) -> Self {
        let subnets = path_join(&[prefix, "subnets"]);
        KeyLayout {
            config: path_join(&[prefix, "config"]),
            subnets_prefix: format!("{subnets}/"),
            subnets,
        }
    }

    /// The etcd key of a lease, e.g. `/coreos.com/network/subnets/10.5.52.0-24`.
    pub fn lease_key(&self, key: &LeaseKey) -> String {
        path_join(&[&self.subnets, &key.to_string()])
    }

    /// The lease key named by an etcd key below the subnets prefix.
    pub fn parse_lease_key(&self, etcd_key: &[u8]) -> Result<LeaseKey, String> {
        let text = std::str::from_utf8(etcd_key)
            .map_err(|_| format!("key {:?} is not UTF-8", String::from_utf8_lossy(etcd_key)))?;
        let name = text
            .strip_prefix(&self.subnets_prefix)
            .ok_or_else(|| format!("key {text:?} is not below {}", self.subnets_prefix))?;
        // Nested paths are not leases, even if upstream's end-anchored pattern would
        // match their last element.
        if name.contains('/') {
            return Err(format!(
                "key {text:?} is not a flannel subnet key (nested path)"
            ));
        }
        name.parse::<LeaseKey>()
            .map_err(|e| format!("key {text:?}: {e}"))
    }
}

/// Go's `path.Join`: joins the non-empty elements with `/` and cleans the result;
/// all elements empty gives "".
pub fn path_join(elems: &[&str]) -> String {
    let joined = elems
        .iter()
        .filter(|e| !e.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    if joined.is_empty() {
        String::new()
    } else {
        path_clean(&joined)
    }
}

/// Go's `path.Clean`: single slashes, no `.` elements, `..` resolved lexically, no
/// trailing slash (except for the root); an empty result is ".".
pub fn path_clean(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for elem in p.split('/') {
        match elem {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            e => out.push(e),
        }
    }
    let body = out.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_matches_go() {
        // Cases from Go's path.Clean tests.
        for (input, want) in [
            ("", "."),
            ("abc", "abc"),
            ("abc/def", "abc/def"),
            ("a/b/c", "a/b/c"),
            (".", "."),
            ("..", ".."),
            ("../..", "../.."),
            ("../../abc", "../../abc"),
            ("/abc", "/abc"),
            ("/", "/"),
            ("abc/", "abc"),
            ("abc/def/", "abc/def"),
            ("/abc/", "/abc"),
            ("//abc", "/abc"),
            ("abc//def//ghi", "abc/def/ghi"),
            ("abc/./def", "abc/def"),
            ("/./abc/def", "/abc/def"),
            ("abc/.", "abc"),
            ("abc/def/ghi/../jkl", "abc/def/jkl"),
            ("abc/def/../ghi/../jkl", "abc/jkl"),
            ("abc/def/..", "abc"),
            ("abc/def/../..", "."),
            ("/abc/def/../..", "/"),
            ("abc/def/../../..", ".."),
            ("/abc/def/../../..", "/"),
            ("abc/def/../../../ghi/jkl/../../../mno", "../../mno"),
            ("abc/./../def", "def"),
        ] {
            assert_eq!(path_clean(input), want, "{input:?}");
        }
    }

    #[test]
    fn layout_for_prefix_spellings() {
        for prefix in [
            "/coreos.com/network",
            "/coreos.com/network/",
            "//coreos.com//network/./",
        ] {
            let k = KeyLayout::new(prefix);
            assert_eq!(k.config, "/coreos.com/network/config");
            assert_eq!(k.subnets, "/coreos.com/network/subnets");
            assert_eq!(k.subnets_prefix, "/coreos.com/network/subnets/");
            let lk: LeaseKey = "10.5.52.0-24&fd00:10:5:34::-64".parse().unwrap();
            assert_eq!(
                k.lease_key(&lk),
                "/coreos.com/network/subnets/10.5.52.0-24&fd00:10:5:34::-64"
            );
            assert_eq!(k.parse_lease_key(k.lease_key(&lk).as_bytes()), Ok(lk));
        }
        assert_eq!(path_join(&["", "config"]), "config");
        assert_eq!(path_join(&["", ""]), "");
    }

    #[test]
    fn rejects_foreign_keys() {
        let k = KeyLayout::new(DEFAULT_PREFIX);
        for bad in [
            &b"/coreos.com/network/subnets/garbage"[..],
            b"/coreos.com/network/subnets/10.5.1.0-99",
            b"/coreos.com/network/subnets2/10.5.1.0-24",
            b"/coreos.com/network/subnets/x/10.5.1.0-24",
            b"/coreos.com/network/subnets/\xff",
        ] {
            assert!(k.parse_lease_key(bad).is_err(), "{bad:?}");
        }
    }
}
