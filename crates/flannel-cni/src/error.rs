//! CNI error results: what a plugin prints on stdout when it fails.

use std::fmt;

use serde::Serialize;

/// Error codes from the CNI specification ("Error" section). The numbers are part of
/// the protocol: runtimes act on them (11 means "retry later", for instance).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (stdin is not JSON, or not the expected shape).
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_NETCONF: u32 = 7;
    /// Try again later: a transient condition the runtime should retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available to serve ADD requests.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Anything else.
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: code, one-line message and optional details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error result as the CNI spec prints it on stdout (indented like Go's
    /// `types.Error.Print`, plus the spec's `cniVersion`).
    pub fn to_json(&self, cni_version: &str) -> Vec<u8> {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        // Serialising a struct of strings and an integer into a Vec cannot fail.
        if wire.serialize(&mut ser).is_err() {
            out.clear();
        }
        out.push(b'\n');
        out
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, "; {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
