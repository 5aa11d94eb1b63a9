//! CNI spec versions: which ones the plugin speaks and how a config's version is read.

use flannel_core::gojson::FoldedObject;

use crate::error::{code, CniError};

/// Spec versions accepted in `cniVersion`. Upstream's plugin accepts 0.1.0 through
/// 1.0.0; 1.1.0 is added because STATUS (and GC) exist only from 1.1.0 on, and a
/// runtime sends those commands only with a 1.1.0 config.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest spec version; used for VERSION output and for errors whose config gave
/// no usable version.
pub const CURRENT_VERSION: &str = "1.1.0";

/// A `major.minor.patch` triple. An empty string means 0.1.0 (the CNI rule for
/// configs that predate `cniVersion`); one or two parts are allowed, as in libcni.
pub fn parse_version(v: &str) -> Result<(u64, u64, u64), String> {
    if v.is_empty() {
        return Ok((0, 1, 0));
    }
    let parts: Vec<&str> = v.split('.').collect();
    if parts.len() > 3 {
        return Err(format!("invalid version {v:?}: too many parts"));
    }
    let mut nums = [0u64; 3];
    for (slot, part) in nums.iter_mut().zip(&parts) {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid version {v:?}: {part:?} is not a number"));
        }
        *slot = part
            .parse()
            .map_err(|_| format!("invalid version {v:?}: {part:?} is out of range"))?;
    }
    Ok((nums[0], nums[1], nums[2]))
}

/// `a >= b` for two version strings.
pub fn at_least(a: &str, b: &str) -> Result<bool, String> {
    Ok(parse_version(a)? >= parse_version(b)?)
}

/// The version a config declares; absent or empty means "0.1.0". Keys fold
/// case-insensitively as Go's decoder does.
pub fn config_version(conf: &str) -> Result<String, CniError> {
    let decode_err = |what: String| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("decoding version from network config: {what}"),
        )
    };
    let obj = FoldedObject::parse(conf, &["cniVersion"]).map_err(|e| decode_err(e.to_string()))?;
    match obj.get::<String>("cniVersion") {
        Ok(None) => Ok("0.1.0".to_string()),
        Ok(Some(s)) if s.is_empty() => Ok("0.1.0".to_string()),
        Ok(Some(s)) => Ok(s),
        Err(e) => Err(decode_err(e.to_string())),
    }
}

/// Fails with the CNI "incompatible version" error unless `v` is one we speak.
pub fn check_supported(v: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        return Ok(());
    }
    let list: Vec<String> = SUPPORTED_VERSIONS
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    Err(
        CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(
            format!("config is {v:?}, plugin supports [{}]", list.join(" ")),
        ),
    )
}

/// The VERSION command's output.
pub fn version_json() -> String {
    let v = serde_json::json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    });
    format!("{v}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions_like_libcni() {
        assert_eq!(parse_version(""), Ok((0, 1, 0)));
        assert_eq!(parse_version("1"), Ok((1, 0, 0)));
        assert_eq!(parse_version("0.4"), Ok((0, 4, 0)));
        assert_eq!(parse_version("1.1.0"), Ok((1, 1, 0)));
        assert!(parse_version("1.0.0.0").is_err());
        assert!(parse_version("a.b").is_err());
        assert!(parse_version("1..0").is_err());
        assert!(parse_version("+1.0.0").is_err());
        assert_eq!(at_least("0.4.0", "0.4.0"), Ok(true));
        assert_eq!(at_least("0.3.1", "0.4.0"), Ok(false));
        assert_eq!(at_least("1.0.0", "0.4.0"), Ok(true));
        assert_eq!(
            at_least("0.10.0", "0.4.0"),
            Ok(true),
            "numeric, not lexical"
        );
    }

    #[test]
    fn config_version_defaults_and_case() {
        let v = config_version;
        assert_eq!(v("{}").unwrap(), "0.1.0");
        assert_eq!(v(r#"{"cniVersion":""}"#).unwrap(), "0.1.0");
        assert_eq!(v(r#"{"cniVersion":null}"#).unwrap(), "0.1.0");
        assert_eq!(v(r#"{"cniVersion":"1.0.0"}"#).unwrap(), "1.0.0");
        assert_eq!(v(r#"{"CNIVERSION":"0.3.1"}"#).unwrap(), "0.3.1");
        assert_eq!(
            v(r#"{"cniVersion":"1.0.0","cniversion":"0.3.1"}"#).unwrap(),
            "0.3.1",
            "the last spelling wins, as in Go"
        );
        assert_eq!(
            v(r#"{"cniVersion":1}"#).unwrap_err().code,
            code::DECODING_FAILURE
        );
        assert_eq!(v("[]").unwrap_err().code, code::DECODING_FAILURE);
    }

    #[test]
    fn support_check_names_both_sides() {
        for v in [
            "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
        ] {
            check_supported(v).unwrap();
        }
        let e = check_supported("9.9.9").unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e
            .details
            .starts_with(r#"config is "9.9.9", plugin supports ["0.1.0" "0.2.0""#));
        assert!(
            check_supported("1.0").is_err(),
            "membership is by exact string"
        );
    }

    #[test]
    fn version_output() {
        assert_eq!(
            version_json(),
            "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.1.0\",\"0.2.0\",\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
        );
    }
}
