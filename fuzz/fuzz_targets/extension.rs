//! The extension backend's handling of operator and peer input: its config, the
//! expansion of `$VAR`/`${VAR}` in command strings (checked against Go's
//! `os.Expand`, which upstream uses, and for values landing verbatim in one
//! argument) and the BackendData passed from one node's PreStartupCommand output
//! to the other nodes' SubnetAddCommand stdin.
//!
//! Input: a command template, then NUL-separated values for SUBNET, PUBLIC_IP,
//! NETWORK, IPV6SUBNET, `1` and `*`; the whole input is also tried as the
//! backend config and as a peer's BackendData.
#![no_main]

use std::net::Ipv4Addr;

use flannel_backend::extension::fuzzing::{backend_data, peer_input};
use flannel_backend::extension::{command_words, expand, go_json_string, ExtensionConfig};
use flannel_core::{Lease, LeaseAttrs};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const NAMES: [&str; 6] = ["SUBNET", "PUBLIC_IP", "NETWORK", "IPV6SUBNET", "1", "*"];

/// The name that starts `s` (the text after a `$`) and how many bytes it takes,
/// following getShellName in Go's src/os/env.go.
fn go_shell_name(s: &str) -> (&str, usize) {
    let b = s.as_bytes();
    let special = |c: u8| b"*#$@!?-0123456789".contains(&c);
    if b[0] == b'{' {
        if b.len() > 2 && special(b[1]) && b[2] == b'}' {
            return (&s[1..2], 3);
        }
        return match b.iter().skip(1).position(|&c| c == b'}') {
            Some(0) => ("", 2),
            Some(p) => (&s[1..p + 1], p + 2),
            None => ("", 1),
        };
    }
    if special(b[0]) {
        return (&s[..1], 1);
    }
    let n = b
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count();
    (&s[..n], n)
}

/// Go's `os.Expand`, the reference for `expand`.
fn go_expand(s: &str, mapping: &dyn Fn(&str) -> String) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while j < b.len() {
        if b[j] == b'$' && j + 1 < b.len() {
            out.extend_from_slice(&b[i..j]);
            let (name, w) = go_shell_name(&s[j + 1..]);
            if name.is_empty() && w == 0 {
                out.push(b'$');
            } else if !name.is_empty() {
                out.extend_from_slice(mapping(name).as_bytes());
            }
            j += w;
            i = j + 1;
        }
        j += 1;
    }
    out.extend_from_slice(&b[i..]);
    String::from_utf8(out).expect("cut at ASCII bytes only")
}

/// Go's `strings.Fields` separators (unicode.IsSpace).
fn go_is_space(c: char) -> bool {
    const SPACES: &str =
        "\t\n\u{b}\u{c}\r \u{85}\u{a0}\u{1680}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}";
    SPACES.contains(c) || ('\u{2000}'..='\u{200a}').contains(&c)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let extra: Vec<(&str, String)> = NAMES.iter().copied().zip(parts.map(String::from)).collect();
    let lookup = |n: &str| {
        extra
            .iter()
            .rev()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.clone())
    };

    let expanded = expand(template, &lookup);
    assert_eq!(
        expanded,
        go_expand(template, &|n| lookup(n).unwrap_or_default()),
        "{template:?}"
    );
    if !template.contains('$') {
        assert_eq!(expanded, template);
    }

    // Upstream: strings.Fields, then os.Expand of each field over the process
    // environment plus the extra variables.
    let with_env = |n: &str| {
        lookup(n)
            .or_else(|| std::env::var(n).ok())
            .unwrap_or_default()
    };
    let go_words: Vec<String> = template
        .split(go_is_space)
        .filter(|w| !w.is_empty())
        .map(|w| go_expand(w, &with_env))
        .collect();
    assert_eq!(command_words(template, &extra), go_words, "{template:?}");

    // A value lands verbatim, never re-expanded, and stays one argument whatever
    // it contains (no shell parses it).
    let lit: String = template.chars().filter(|&c| c != '$').take(64).collect();
    for (name, value) in &extra {
        let t = format!("{lit}${{{name}}}{lit}");
        assert_eq!(expand(&t, &lookup), format!("{lit}{value}{lit}"));
        if !value.is_empty() {
            let words = command_words(&format!("prog ${{{name}}}"), &extra);
            assert_eq!(words, ["prog", value.as_str()]);
        }
    }

    // Config: whatever parses survives re-encoding.
    if let Ok(raw) = serde_json::from_str::<&RawValue>(&text) {
        if let Ok(cfg) = ExtensionConfig::parse(raw) {
            let again = serde_json::json!({
                "Type": "extension",
                "PreStartupCommand": cfg.pre_startup,
                "PostStartupCommand": cfg.post_startup,
                "SubnetAddCommand": cfg.subnet_add,
                "SubnetRemoveCommand": cfg.subnet_remove,
            })
            .to_string();
            let raw = RawValue::from_string(again).unwrap();
            assert_eq!(ExtensionConfig::parse(&raw).unwrap(), cfg);
        }
    }

    // One node's PreStartupCommand output reaches the others' SubnetAddCommand
    // stdin unchanged, through a BackendData Go would have written.
    let quoted = go_json_string(template);
    assert!(!quoted.contains(['<', '>', '&', '\u{2028}', '\u{2029}']));
    let mut lease = Lease {
        key: "10.244.7.0-24".parse().unwrap(),
        attrs: LeaseAttrs::new(Ipv4Addr::new(192, 168, 1, 7)),
        expiration: None,
    };
    lease.attrs.backend_type = "extension".into();
    lease.attrs.backend_data = Some(backend_data(template).expect("a JSON string"));
    let (env, stdin) = peer_input(&lease).expect("BackendData is a JSON string");
    assert_eq!(stdin, format!("{template}\n"));
    assert_eq!(
        env,
        [
            ("SUBNET", "10.244.7.0/24".to_string()),
            ("PUBLIC_IP", "192.168.1.7".to_string())
        ]
    );

    // Any other BackendData a peer may have written: a string or an error.
    if let Ok(raw) = RawValue::from_string(text.to_string()) {
        let is_string = serde_json::from_str::<String>(raw.get()).ok();
        lease.attrs.backend_data = Some(raw);
        match peer_input(&lease) {
            Ok((_, stdin)) => assert_eq!(Some(stdin), is_string.map(|s| s + "\n")),
            Err(_) => assert!(is_string.is_none()),
        }
    }
});
