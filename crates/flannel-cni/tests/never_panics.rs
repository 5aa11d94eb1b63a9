//! Whatever arrives on stdin, the plugin answers with a result or a CNI error and
//! never panics. Runs the library in-process (many cases) and the binary (a few).

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use serde_json::{Map, Value};

const COMMANDS: &[&str] = &["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "BOGUS"];

const KEYS: &[&str] = &[
    "cniVersion",
    "CNIVERSION",
    "name",
    "Name",
    "type",
    "delegate",
    "ipam",
    "routes",
    "ranges",
    "dst",
    "gw",
    "GW",
    "runtimeConfig",
    "capabilities",
    "dns",
    "nameservers",
    "prevResult",
    "mtu",
    "ipMasq",
    "isGateway",
    "subnet",
    "hairpinMode",
    "table",
    "priority",
    "subnetFileWait",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just("bridge".to_string()),
            Just("host-local".to_string()),
            Just("10.244.0.0/16".to_string()),
            Just("10.244.1.1".to_string()),
            Just("1.0.0".to_string()),
            Just("0.3.1".to_string()),
            Just("2001:db8::/64".to_string()),
            ".{0,12}",
        ]
        .prop_map(Value::String),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(KEYS).prop_map(str::to_string),
                        "[a-zA-Z]{1,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A netconf-shaped object: mostly sensible top-level keys with random values.
fn netconf() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            6 => Just(Value::String("cbr0".into())),
            1 => Just(Value::String("".into())),
            1 => leaf()
        ],
        prop_oneof![
            6 => prop::sample::select(flannel_cni::version::SUPPORTED_VERSIONS)
                .prop_map(|v| Value::String(v.into())),
            1 => leaf()
        ],
        prop::option::of(json()),
        prop::option::of(json()),
        prop::option::of(json()),
        prop_oneof![Just(Value::Object(Map::new())), json()],
    )
        .prop_map(|(name, version, delegate, ipam, runtime, extra)| {
            let mut m = match extra {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            m.insert("name".into(), name);
            m.insert("cniVersion".into(), version);
            if let Some(d) = delegate {
                m.insert("delegate".into(), d);
            }
            if let Some(i) = ipam {
                m.insert("ipam".into(), i);
            }
            if let Some(r) = runtime {
                m.insert("runtimeConfig".into(), r);
            }
            Value::Object(m)
        })
}

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // A delegate that reads its config and answers with a minimal result.
        let p = bin.join("bridge");
        std::fs::write(
            &p,
            "#!/bin/sh\ncat >/dev/null\necho '{\"cniVersion\":\"1.0.0\"}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Sandbox { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Points every file the plugin may touch into the sandbox.
    fn confine(&self, v: Value) -> Value {
        let Value::Object(mut m) = v else { return v };
        m.retain(|k, _| !["subnetfile", "datadir"].contains(&k.to_ascii_lowercase().as_str()));
        m.insert(
            "subnetFile".into(),
            Value::String(self.path().join("subnet.env").display().to_string()),
        );
        m.insert(
            "dataDir".into(),
            Value::String(self.path().join("data").display().to_string()),
        );
        Value::Object(m)
    }

    fn env(&self, cmd: &str) -> HashMap<String, String> {
        HashMap::from([
            ("CNI_COMMAND".to_string(), cmd.to_string()),
            ("CNI_CONTAINERID".to_string(), "fuzz1".to_string()),
            ("CNI_NETNS".to_string(), "/proc/self/ns/net".to_string()),
            ("CNI_IFNAME".to_string(), "eth0".to_string()),
            (
                "CNI_PATH".to_string(),
                self.path().join("bin").display().to_string(),
            ),
            (
                flannel_cni::plugin::SUBNET_FILE_WAIT_ENV.to_string(),
                "0".to_string(),
            ),
        ])
    }
}

/// Exit 0, or a CNI error object on stdout.
fn check_outcome(exit_code: i32, stdout: &[u8]) -> Result<(), TestCaseError> {
    if exit_code == 0 {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(stdout)
        .map_err(|e| TestCaseError::fail(format!("stdout is not JSON ({e}): {stdout:?}")))?;
    prop_assert!(v["code"].is_u64(), "no code in {v}");
    prop_assert!(v["msg"].is_string(), "no msg in {v}");
    prop_assert!(v["cniVersion"].is_string(), "no cniVersion in {v}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_in_process(cmd in prop::sample::select(COMMANDS), stdin in prop::collection::vec(any::<u8>(), 0..256)) {
        let sb = Sandbox::new();
        let env = sb.env(cmd);
        let o = flannel_cni::run(&|k| env.get(k).cloned(), &mut stdin.as_slice());
        check_outcome(o.exit_code, &o.stdout)?;
    }

    #[test]
    fn random_json_in_process(cmd in prop::sample::select(COMMANDS), conf in netconf()) {
        let sb = Sandbox::new();
        let env = sb.env(cmd);
        let stdin = sb.confine(conf).to_string();
        let o = flannel_cni::run(&|k| env.get(k).cloned(), &mut stdin.as_bytes());
        check_outcome(o.exit_code, &o.stdout)?;
        if cmd == "ADD" && o.exit_code == 0 {
            // Whatever was accepted produced a saved delegate config that is JSON with
            // flannel's own keys set.
            let saved: Value = serde_json::from_slice(
                &std::fs::read(sb.path().join("data").join("fuzz1")).unwrap(),
            ).unwrap();
            prop_assert_eq!(&saved["type"], "bridge");
            prop_assert!(saved["ipam"]["ranges"][0][0]["subnet"] == "10.244.5.0/24");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_stdin_to_the_binary(cmd in prop::sample::select(COMMANDS), stdin in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        netconf().prop_map(|v| v.to_string().into_bytes()),
    ]) {
        let sb = Sandbox::new();
        let stdin = match serde_json::from_slice::<Value>(&stdin) {
            Ok(v) => sb.confine(v).to_string().into_bytes(),
            Err(_) => stdin,
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_flannel"))
            .env_clear()
            .envs(sb.env(cmd))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The plugin does not read stdin for VERSION; a closed pipe is fine then.
        let _ = child.stdin.take().unwrap().write_all(&stdin);
        let out = child.wait_with_output().unwrap();
        let code = out.status.code().expect("exited, not killed");
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!stderr.contains("panicked"), "{}", stderr);
        check_outcome(code, &out.stdout)?;
    }
}

/// Every number a netconf may carry for the wait, on every command: a clear error or
/// a capped wait, never a panic (a DEL that panics leaves a pod that cannot be
/// deleted).
#[test]
fn extreme_subnet_file_waits_never_panic() {
    for wait in [
        "1e20",
        "1.7976931348623157e308",
        "-1",
        "-1e20",
        "0",
        "0.25",
        "599.999",
    ] {
        for cmd in COMMANDS {
            let sb = Sandbox::new();
            let env = sb.env(cmd);
            let conf: Value = serde_json::from_str(&format!(
                r#"{{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","subnetFileWait":{wait}}}"#
            ))
            .unwrap();
            let stdin = sb.confine(conf).to_string();
            let o = flannel_cni::run(&|k| env.get(k).cloned(), &mut stdin.as_bytes());
            check_outcome(o.exit_code, &o.stdout).unwrap_or_else(|e| panic!("{cmd} {wait}: {e}"));
            if wait.starts_with('-') && ["ADD", "DEL"].contains(cmd) {
                assert_ne!(
                    o.exit_code, 0,
                    "{cmd} with subnetFileWait {wait} must be refused"
                );
            }
        }
    }
}
