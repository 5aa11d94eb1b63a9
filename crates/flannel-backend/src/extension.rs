//! The `extension` backend: runs operator-supplied commands (docs/compatibility.md,
//! "alloc and extension"; HEAD
//! semantics). A command string is split on whitespace, `$VAR`/`${VAR}` in each word
//! are expanded from the extra variables and the process environment, and the
//! program is executed directly (no shell).
//!
//! * `PreStartupCommand`: its output (stdout+stderr, trimmed) becomes BackendData as
//!   a JSON string.
//! * `PostStartupCommand`: env `NETWORK`, `SUBNET`, `IPV6SUBNET`, `PUBLIC_IP`,
//!   `PUBLIC_IPV6`.
//! * `SubnetAddCommand` / `SubnetRemoveCommand`: env `SUBNET`, `PUBLIC_IP` of the
//!   peer; stdin = the peer's BackendData string and a newline. Failures are logged.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use async_trait::async_trait;
use flannel_core::gojson::FoldedObject;
use flannel_core::{Lease, LeaseAttrs, LeaseEvent, LeaseKey, NetworkConfig};
use serde_json::value::RawValue;

use crate::peers::{type_matches, Warnings};
use crate::{Backend, BackendError, ExternalInterface};

const TYPE: &str = "extension";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtensionConfig {
    pub pre_startup: String,
    pub post_startup: String,
    pub subnet_add: String,
    pub subnet_remove: String,
}

impl ExtensionConfig {
    pub fn parse(raw: &RawValue) -> Result<Self, BackendError> {
        let err = |e: &dyn std::fmt::Display| BackendError::Config(format!("extension: {e}"));
        let o = FoldedObject::from_raw(
            raw,
            &[
                "PreStartupCommand",
                "PostStartupCommand",
                "SubnetAddCommand",
                "SubnetRemoveCommand",
            ],
        )
        .map_err(|e| err(&e))?;
        let get = |k: &str| -> Result<String, BackendError> {
            Ok(o.get::<String>(k).map_err(|e| err(&e))?.unwrap_or_default())
        };
        Ok(ExtensionConfig {
            pre_startup: get("PreStartupCommand")?,
            post_startup: get("PostStartupCommand")?,
            subnet_add: get("SubnetAddCommand")?,
            subnet_remove: get("SubnetRemoveCommand")?,
        })
    }
}

/// Go's `os.Expand` (upstream expands each word with it): `${name}`, `$` and one
/// special character (`*#$@!?-` or a digit), or `$name` (letters, digits, `_`);
/// unknown names expand to "". A `$` before anything else stays.
pub fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let special = |c: char| "*#$@!?-0123456789".contains(c);
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, used) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                // Bad syntax: Go drops the `${` and keeps what follows.
                None => ("", 1),
            }
        } else {
            match after.chars().next() {
                // A digit too is a name of its own: `$12` is `$1` and "2".
                Some(c) if special(c) => (&after[..1], 1),
                _ => {
                    let len = after
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(after.len());
                    if len == 0 {
                        out.push('$');
                        rest = after;
                        continue;
                    }
                    (&after[..len], len)
                }
            }
        };
        if !name.is_empty() {
            out.push_str(&lookup(name).unwrap_or_default());
        }
        rest = &after[used..];
    }
    out.push_str(rest);
    out
}

/// Splits on whitespace, then expands each word (so a value with spaces stays one
/// argument).
pub fn command_words(cmd: &str, extra: &[(&str, String)]) -> Vec<String> {
    let lookup = |name: &str| {
        extra
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
    };
    cmd.split_whitespace().map(|w| expand(w, &lookup)).collect()
}

/// Runs `cmd` with the extra environment and stdin, returning its combined
/// stdout+stderr (trimmed) or an error carrying it.
pub async fn run_command(
    cmd: &str,
    extra: &[(&str, String)],
    stdin: String,
) -> Result<String, String> {
    let words = command_words(cmd, extra);
    let env: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    tokio::task::spawn_blocking(move || run_blocking(&words, &env, &stdin))
        .await
        .map_err(|e| format!("command task failed: {e}"))?
}

fn run_blocking(words: &[String], env: &[(String, String)], stdin: &str) -> Result<String, String> {
    let Some((program, args)) = words.split_first() else {
        return Err("empty command".into());
    };
    // One pipe for both streams keeps their interleaving, like Go's CombinedOutput.
    let (reader, writer) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let writer2 = writer.try_clone().map_err(|e| format!("pipe: {e}"))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if let Some(mut input) = child.stdin.take() {
        // A command that does not read its stdin closes the pipe: not an error.
        let _ = input.write_all(stdin.as_bytes());
    }
    let mut output = Vec::new();
    let mut reader = std::fs::File::from(reader);
    let read = reader.read_to_end(&mut output);
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    let text = String::from_utf8_lossy(&output).trim().to_string();
    read.map_err(|e| format!("reading output of {program}: {e}"))?;
    if status.success() {
        Ok(text)
    } else {
        Err(format!("{status}; output: {text}"))
    }
}

/// A JSON string exactly as Go's `json.Marshal` writes it (it escapes `<`, `>`,
/// `&`, U+2028 and U+2029, which serde_json leaves as they are).
pub fn go_json_string(s: &str) -> String {
    let plain = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut out = String::with_capacity(plain.len());
    for c in plain.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// The BackendData this node publishes for its PreStartupCommand's output: a JSON
/// string, as upstream's `json.Marshal` writes it.
fn backend_data(output: &str) -> Result<Box<RawValue>, serde_json::Error> {
    RawValue::from_string(go_json_string(output))
}

/// The extra environment (SUBNET, PUBLIC_IP) and the stdin of a peer command.
type PeerInput = ([(&'static str, String); 2], String);

/// The extra environment and the stdin of a SubnetAdd/SubnetRemoveCommand for a
/// peer's lease: its subnet and public IP, and its BackendData string (decoded)
/// and a newline. Err when the BackendData is not a JSON string.
fn peer_input(lease: &Lease) -> Result<PeerInput, serde_json::Error> {
    let data = match &lease.attrs.backend_data {
        None => String::new(),
        Some(raw) => serde_json::from_str::<String>(raw.get())?,
    };
    let env = [
        ("SUBNET", lease.subnet().to_string()),
        ("PUBLIC_IP", lease.attrs.public_ip.to_string()),
    ];
    Ok((env, format!("{data}\n")))
}

/// The pure parts (config, expansion, the data passed to commands), for the fuzz
/// targets in `fuzz/` only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    pub fn backend_data(output: &str) -> Result<Box<RawValue>, serde_json::Error> {
        super::backend_data(output)
    }

    pub fn peer_input(lease: &Lease) -> Result<PeerInput, serde_json::Error> {
        super::peer_input(lease)
    }
}

pub struct ExtensionBackend {
    cfg: ExtensionConfig,
    ext: ExternalInterface,
    /// Peers the add command ran for, with the attributes it saw.
    known: BTreeMap<LeaseKey, Lease>,
    warnings: Warnings,
}

impl ExtensionBackend {
    pub fn new(raw: &RawValue, ext: ExternalInterface) -> Result<Self, BackendError> {
        Ok(ExtensionBackend {
            cfg: ExtensionConfig::parse(raw)?,
            ext,
            known: BTreeMap::new(),
            warnings: Warnings::default(),
        })
    }

    async fn peer_command(&self, which: &str, cmd: &str, lease: &Lease) {
        if cmd.trim().is_empty() {
            return;
        }
        let (env, stdin) = match peer_input(lease) {
            Ok(input) => input,
            Err(e) => {
                tracing::error!(
                    "extension: lease {}: BackendData is not a JSON string ({e}); {which} command not run",
                    lease.key
                );
                return;
            }
        };
        match run_command(cmd, &env, stdin).await {
            Ok(out) => tracing::info!("extension: ran {which} command for {}: {out}", lease.key),
            Err(e) => tracing::error!("extension: {which} command for {} failed: {e}", lease.key),
        }
    }

    async fn add(&mut self, lease: &Lease) {
        if !type_matches(lease, TYPE, &mut self.warnings) {
            return;
        }
        tracing::info!(
            "extension: subnet added: {} via {}",
            lease.subnet(),
            lease.attrs.public_ip
        );
        self.peer_command("subnet add", &self.cfg.subnet_add, lease)
            .await;
        self.known.insert(lease.key, lease.clone());
    }

    async fn remove(&mut self, lease: &Lease) {
        self.warnings.clear(&lease.key);
        if self.known.remove(&lease.key).is_none() && lease.attrs.backend_type != TYPE {
            return;
        }
        tracing::info!("extension: subnet removed: {}", lease.subnet());
        self.peer_command("subnet remove", &self.cfg.subnet_remove, lease)
            .await;
    }
}

#[async_trait]
impl Backend for ExtensionBackend {
    async fn register(&mut self, config: &NetworkConfig) -> Result<LeaseAttrs, BackendError> {
        let addr = self.ext.addr.ok_or_else(|| {
            BackendError::Config(format!(
                "extension: interface {} has no IPv4 address",
                self.ext.name
            ))
        })?;
        let mut attrs = LeaseAttrs::new(addr);
        attrs.backend_type = TYPE.to_string();
        if config.enable_ipv6 {
            attrs.public_ipv6 = self.ext.addr6;
        }
        if self.cfg.pre_startup.trim().is_empty() {
            tracing::info!("extension: no pre-startup command configured");
        } else {
            let out = run_command(&self.cfg.pre_startup, &[], "\n".into())
                .await
                .map_err(|e| {
                    BackendError::Other(format!(
                        "extension: pre-startup command {:?} failed: {e}",
                        self.cfg.pre_startup
                    ))
                })?;
            tracing::info!("extension: ran pre-startup command: {out}");
            attrs.backend_data = Some(
                backend_data(&out).map_err(|e| BackendError::Other(format!("extension: {e}")))?,
            );
        }
        Ok(attrs)
    }

    async fn start(&mut self, config: &NetworkConfig, own: &Lease) -> Result<(), BackendError> {
        if self.cfg.post_startup.trim().is_empty() {
            return Ok(());
        }
        let opt = |v: Option<String>| v.unwrap_or_default();
        let env = [
            ("NETWORK", opt(config.network.map(|n| n.to_string()))),
            ("SUBNET", own.subnet().to_string()),
            ("IPV6SUBNET", opt(own.ipv6_subnet().map(|n| n.to_string()))),
            ("PUBLIC_IP", own.attrs.public_ip.to_string()),
            (
                "PUBLIC_IPV6",
                opt(own.attrs.public_ipv6.map(|a| a.to_string())),
            ),
        ];
        let out = run_command(&self.cfg.post_startup, &env, "\n".into())
            .await
            .map_err(|e| {
                BackendError::Other(format!(
                    "extension: post-startup command {:?} failed: {e}",
                    self.cfg.post_startup
                ))
            })?;
        tracing::info!("extension: ran post-startup command: {out}");
        Ok(())
    }

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }

    /// Commands cannot be queried for state: runs remove for peers that went away
    /// and add for new or changed ones (all of them on the first call, as upstream
    /// does at startup).
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        let wanted: BTreeMap<LeaseKey, &Lease> = peers.iter().map(|l| (l.key, l)).collect();
        let gone: Vec<Lease> = self
            .known
            .values()
            .filter(|l| !wanted.contains_key(&l.key))
            .cloned()
            .collect();
        for l in &gone {
            self.remove(l).await;
        }
        for l in peers {
            if self.known.get(&l.key).map(|k| &k.attrs) != Some(&l.attrs) {
                self.add(l).await;
            }
        }
        self.warnings.retain(|k| wanted.contains_key(k));
        Ok(())
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<(), BackendError> {
        for e in events {
            match e {
                LeaseEvent::Added(l) | LeaseEvent::Changed { current: l, .. } => self.add(l).await,
                LeaseEvent::Removed(l) => self.remove(l).await,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_go() {
        let vars = |n: &str| match n {
            "A" => Some("x".to_string()),
            "LONG_NAME1" => Some("y z".to_string()),
            _ => None,
        };
        assert_eq!(expand("$A-${A}", &vars), "x-x");
        assert_eq!(expand("a${LONG_NAME1}b", &vars), "ay zb");
        assert_eq!(expand("$MISSING.", &vars), ".");
        assert_eq!(expand("cost$", &vars), "cost$");
        assert_eq!(expand("$ ", &vars), "$ ");
        assert_eq!(expand("${}x", &vars), "x");
        assert_eq!(expand("no vars", &vars), "no vars");
    }

    /// Found by the `extension` fuzz target (differential against Go's os.Expand):
    /// an unterminated `${` dropped the rest of the word, where Go drops only the
    /// `${`; and `$12` read the name `12`, where Go reads `1` (a special one-digit
    /// name) followed by "2".
    #[test]
    fn expansion_follows_go_on_bad_syntax_and_digits() {
        let vars = |n: &str| match n {
            "1" => Some("one".to_string()),
            "A" => Some("x".to_string()),
            _ => None,
        };
        assert_eq!(expand("${A", &vars), "A");
        assert_eq!(expand("a${A b", &vars), "aA b");
        assert_eq!(expand("$12", &vars), "one2");
        assert_eq!(expand("${1}2", &vars), "one2");
        assert_eq!(expand("$1A", &vars), "oneA");
    }

    #[test]
    fn words_are_split_before_expansion() {
        let w = command_words("echo $V  ${W}x", &[("V", "a b".into()), ("W", "c".into())]);
        assert_eq!(w, vec!["echo", "a b", "cx"]);
    }

    #[test]
    fn go_string_escaping() {
        assert_eq!(go_json_string("ca:fe"), "\"ca:fe\"");
        assert_eq!(go_json_string("<a&b>"), "\"\\u003ca\\u0026b\\u003e\"");
        assert_eq!(go_json_string("q\"\n"), "\"q\\\"\\n\"");
    }

    #[tokio::test]
    async fn commands_get_env_and_stdin_without_a_shell() {
        let out = run_command(
            "sh -c $SCRIPT",
            &[
                ("SCRIPT", "read l; echo \"$SUBNET $l\"; echo err >&2".into()),
                ("SUBNET", "10.5.1.0/24".into()),
            ],
            "data\n".into(),
        )
        .await
        .unwrap();
        assert_eq!(out, "10.5.1.0/24 data\nerr");
        // `;` is not special: no shell parses the command string.
        let out = run_command("echo a;b", &[], String::new()).await.unwrap();
        assert_eq!(out, "a;b");
        let e = run_command("false", &[], String::new()).await.unwrap_err();
        assert!(e.contains("exit status: 1"), "{e}");
        let e = run_command("/nonexistent/x", &[], String::new())
            .await
            .unwrap_err();
        assert!(e.contains("cannot run"), "{e}");
    }
}
