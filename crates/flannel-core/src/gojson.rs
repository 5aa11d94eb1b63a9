//! Reading JSON objects the way Go's `encoding/json` reads them into a struct.
//!
//! Every JSON document flannel exchanges is produced and consumed by Go, whose decoder
//! matches object keys to struct fields case-insensitively (an exact match wins over a
//! folded one), ignores unknown keys, lets the last duplicate win and treats `null` as
//! "leave the default". serde matches keys exactly, so objects are first folded here
//! onto their canonical field names and each field is then decoded from its raw text.
//! Keeping the raw text also keeps opaque values such as `BackendData` byte-exact.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The fields of one JSON object, keyed by their canonical (struct) names.
#[derive(Debug, Default)]
pub struct FoldedObject {
    fields: HashMap<&'static str, Box<RawValue>>,
}

/// A JSON object read as an ordered list of `(key, raw value)` pairs.
struct RawPairs(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for RawPairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = RawPairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    pairs.push((k, v));
                }
                Ok(RawPairs(pairs))
            }
        }
        d.deserialize_map(PairsVisitor)
    }
}

impl FoldedObject {
    /// Folds the JSON object `text` onto `fields`. Fails only when `text` is not a
    /// JSON object.
    pub fn parse(text: &str, fields: &[&'static str]) -> Result<Self, serde_json::Error> {
        let RawPairs(pairs) = serde_json::from_str(text)?;
        let mut out = HashMap::new();
        for (key, value) in pairs {
            let canonical = fields
                .iter()
                .find(|f| **f == key)
                .or_else(|| fields.iter().find(|f| f.eq_ignore_ascii_case(&key)));
            let Some(canonical) = canonical else { continue };
            if value.get() == "null" {
                // Go's decoder leaves a (non-pointer, non-map, non-slice) field as it
                // was: an earlier duplicate's value stays, a later one may still set it.
                continue;
            }
            out.insert(*canonical, value);
        }
        Ok(FoldedObject { fields: out })
    }

    /// Folds a raw JSON value that must be an object.
    pub fn from_raw(raw: &RawValue, fields: &[&'static str]) -> Result<Self, serde_json::Error> {
        Self::parse(raw.get(), fields)
    }

    /// The raw text of a field, if present and not `null`.
    pub fn raw(&self, field: &str) -> Option<&RawValue> {
        self.fields.get(field).map(|b| &**b)
    }

    /// Decodes a field; `Ok(None)` when absent.
    pub fn get<T: de::DeserializeOwned>(&self, field: &str) -> Result<Option<T>, FieldError> {
        match self.fields.get(field) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|e| FieldError {
                    field: field.to_string(),
                    value: raw.get().to_string(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Takes ownership of a field's raw text.
    pub fn take_raw(&mut self, field: &str) -> Option<Box<RawValue>> {
        self.fields.remove(field)
    }
}

/// A field whose JSON value has the wrong type or shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: cannot use {value} ({reason})")]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[&str] = &["VNI", "Port", "VtepMAC"];

    #[test]
    fn keys_fold_case_insensitively_exact_first() {
        let o = FoldedObject::parse(r#"{"vni":7,"VNI":3,"port":9}"#, FIELDS).unwrap();
        assert_eq!(o.get::<u32>("VNI").unwrap(), Some(3));
        assert_eq!(o.get::<u32>("Port").unwrap(), Some(9));
        // Last duplicate wins, whatever its case.
        let o = FoldedObject::parse(r#"{"VNI":3,"vni":7}"#, FIELDS).unwrap();
        assert_eq!(o.get::<u32>("VNI").unwrap(), Some(7));
    }

    #[test]
    fn unknown_keys_ignored_and_null_keeps_default() {
        let o = FoldedObject::parse(r#"{"Foo":1,"VNI":null}"#, FIELDS).unwrap();
        assert_eq!(o.get::<u32>("VNI").unwrap(), None);
        assert!(o.raw("Foo").is_none());
    }

    #[test]
    fn a_later_null_keeps_the_earlier_duplicate_as_go_does() {
        let o = FoldedObject::parse(r#"{"VNI":3,"vni":null}"#, FIELDS).unwrap();
        assert_eq!(o.get::<u32>("VNI").unwrap(), Some(3));
        let o = FoldedObject::parse(r#"{"VNI":null,"VNI":4}"#, FIELDS).unwrap();
        assert_eq!(o.get::<u32>("VNI").unwrap(), Some(4));
    }

    #[test]
    fn raw_text_is_kept() {
        let o = FoldedObject::parse(r#"{"VtepMAC":  {"a" : 1}}"#, FIELDS).unwrap();
        assert_eq!(o.raw("VtepMAC").unwrap().get(), r#"{"a" : 1}"#);
    }

    #[test]
    fn wrong_types_are_field_errors() {
        let o = FoldedObject::parse(r#"{"VNI":"x"}"#, FIELDS).unwrap();
        let e = o.get::<u32>("VNI").unwrap_err();
        assert_eq!(e.field, "VNI");
        assert!(FoldedObject::parse("[1]", FIELDS).is_err());
        assert!(FoldedObject::parse("{", FIELDS).is_err());
    }
}
