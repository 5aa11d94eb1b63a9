//! Writing JSON the way Go's `json.Marshal` writes the delegate config.
//!
//! Upstream builds the delegate as a `map[string]interface{}` and marshals it, so the
//! bytes it saves and hands to `bridge` have: object keys sorted bytewise at every
//! level, numbers that went through `float64`, `<`, `>`, `&`, U+2028 and U+2029
//! escaped, and structs (CNI routes) in field order. Matching this keeps the saved
//! `<dataDir>/<containerID>` files byte-identical to the Go plugin's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A JSON value as Go would hold it before marshalling.
#[derive(Debug, Clone, PartialEq)]
pub enum GoValue {
    Null,
    Bool(bool),
    /// A Go unsigned integer (e.g. the MTU read from subnet.env).
    Uint(u64),
    /// A number decoded into `interface{}`, i.e. a `float64`.
    Float(f64),
    String(String),
    Array(Vec<GoValue>),
    /// A Go map: written with sorted keys.
    Map(BTreeMap<String, GoValue>),
    /// A Go struct: written in field order.
    Struct(Vec<(&'static str, GoValue)>),
}

impl From<&serde_json::Value> for GoValue {
    fn from(v: &serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => GoValue::Null,
            serde_json::Value::Bool(b) => GoValue::Bool(*b),
            // Without serde_json's arbitrary_precision every number has an f64 view.
            serde_json::Value::Number(n) => GoValue::Float(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => GoValue::String(s.clone()),
            serde_json::Value::Array(a) => GoValue::Array(a.iter().map(GoValue::from).collect()),
            serde_json::Value::Object(o) => GoValue::Map(
                o.iter()
                    .map(|(k, v)| (k.clone(), GoValue::from(v)))
                    .collect(),
            ),
        }
    }
}

impl From<&serde_json::Map<String, serde_json::Value>> for GoValue {
    fn from(o: &serde_json::Map<String, serde_json::Value>) -> Self {
        GoValue::Map(
            o.iter()
                .map(|(k, v)| (k.clone(), GoValue::from(v)))
                .collect(),
        )
    }
}

/// Compact JSON, byte-compatible with Go's `json.Marshal`.
pub fn marshal(v: &GoValue) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

fn write_value(out: &mut String, v: &GoValue) {
    match v {
        GoValue::Null => out.push_str("null"),
        GoValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        GoValue::Uint(n) => {
            let _ = write!(out, "{n}");
        }
        GoValue::Float(f) => out.push_str(&go_float(*f)),
        GoValue::String(s) => write_string(out, s),
        GoValue::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        // A map's entries come sorted (BTreeMap), a struct's in field order; both are
        // written the same way.
        GoValue::Map(map) => write_object(out, map.iter().map(|(k, v)| (k.as_str(), v))),
        GoValue::Struct(fields) => write_object(out, fields.iter().map(|(k, v)| (*k, v))),
    }
}

fn write_object<'a>(out: &mut String, entries: impl Iterator<Item = (&'a str, &'a GoValue)>) {
    out.push('{');
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, k);
        out.push(':');
        write_value(out, v);
    }
    out.push('}');
}

/// A string literal with Go's escaping (HTML-safe, as `json.Marshal` does by default).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float64 as Go's encoder writes it: shortest round-trip digits, plain notation
/// for magnitudes in [1e-6, 1e21), exponent notation (`1e+21`, `1e-7`) outside.
pub fn go_float(f: f64) -> String {
    if !f.is_finite() {
        // Go refuses to marshal these; JSON input can never produce them.
        return "null".to_string();
    }
    let abs = f.abs();
    if abs == 0.0 || (1e-6..1e21).contains(&abs) {
        // Rust's Display is the shortest round-trip form and never uses an exponent.
        return format!("{f}");
    }
    let e = format!("{f:e}");
    match e.split_once('e') {
        Some((mantissa, exp)) => match exp.strip_prefix('-') {
            Some(neg) => format!("{mantissa}e-{neg}"),
            None => format!("{mantissa}e+{exp}"),
        },
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_like_go() {
        assert_eq!(go_float(1450.0), "1450");
        assert_eq!(go_float(1.5), "1.5");
        assert_eq!(go_float(-2.0), "-2");
        assert_eq!(go_float(0.0), "0");
        assert_eq!(go_float(1e20), "100000000000000000000");
        assert_eq!(go_float(1e21), "1e+21");
        assert_eq!(go_float(1.5e300), "1.5e+300");
        assert_eq!(go_float(0.000001), "0.000001");
        assert_eq!(go_float(1e-7), "1e-7");
        assert_eq!(go_float(1.25e-10), "1.25e-10");
        // A u64 beyond 2^53 goes through float64 in Go and loses its low digits.
        assert_eq!(
            go_float(18446744073709551615u64 as f64),
            "18446744073709552000"
        );
    }

    #[test]
    fn strings_like_go() {
        let v = GoValue::String("a\"b\\c\n<x>&\u{1}\u{2028}é".to_string());
        assert_eq!(
            marshal(&v),
            r#""a\"b\\c\n\u003cx\u003e\u0026\u0001\u2028é""#
        );
    }

    #[test]
    fn maps_sorted_structs_ordered() {
        let input: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"z":true,"Y":null},"c":[1.0,"x"]}"#).unwrap();
        assert_eq!(
            marshal(&GoValue::from(&input)),
            r#"{"a":{"Y":null,"z":true},"b":1,"c":[1,"x"]}"#
        );
        let s = GoValue::Struct(vec![
            ("dst", GoValue::String("10.0.0.0/8".into())),
            ("gw", GoValue::String("10.0.0.1".into())),
        ]);
        assert_eq!(marshal(&s), r#"{"dst":"10.0.0.0/8","gw":"10.0.0.1"}"#);
    }
}
