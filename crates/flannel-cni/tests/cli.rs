//! The `flannel` binary as a runtime sees it, without privileges. The delegate here
//! is a small recording script so the exact bytes and environment the delegate
//! receives, the save-before-invoke order and the relaying of its answer can be
//! observed; `tests/real_plugins.rs` runs the real bridge and host-local as root.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

/// A recording delegate named `bridge`. It writes what it got to `<rec>/<cmd>.stdin`
/// and `<rec>/<cmd>.env`, notes whether the saved config already existed, and
/// answers with a fixed result. If `<rec>/fail-<cmd>` exists it fails with a CNI
/// error and exit code 7 instead.
const RECORDER: &str = r#"#!/bin/sh
rec="$FLANNEL_TEST_RECORD"
cat > "$rec/$CNI_COMMAND.stdin"
env | grep '^CNI_' | sort > "$rec/$CNI_COMMAND.env"
if [ -f "$FLANNEL_TEST_DATA/$CNI_CONTAINERID" ]; then echo yes > "$rec/$CNI_COMMAND.saved-before"; fi
if [ -f "$rec/fail-$CNI_COMMAND" ]; then
  printf '{"cniVersion":"1.0.0","code":7,"msg":"recorder refuses","details":"as asked"}'
  echo "recorder failing on purpose" >&2
  exit 7
fi
if [ "$CNI_COMMAND" = ADD ]; then
  printf '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.5.2/24","gateway":"10.244.5.1","interface":0}]}'
fi
exit 0
"#;

struct Sandbox {
    dir: tempfile::TempDir,
}

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.stdout)
            )
        })
    }

    fn error(&self) -> Value {
        assert_ne!(self.code, 0, "expected a failure; stderr: {}", self.stderr);
        let v = self.json();
        assert!(
            v["code"].is_u64() && v["msg"].is_string(),
            "not a CNI error: {v}"
        );
        v
    }
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["bin", "rec"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let p = dir.path().join("bin").join("bridge");
        std::fs::write(&p, RECORDER).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Sandbox { dir }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write_subnet_env(&self, text: &str) {
        std::fs::write(self.p("subnet.env"), text).unwrap();
    }

    fn conf(&self, extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","subnetFile":"{}","dataDir":"{}"{extra}}}"#,
            self.p("subnet.env").display(),
            self.p("data").display()
        )
    }

    fn env(&self, cmd: &str, cid: &str) -> HashMap<String, String> {
        HashMap::from([
            ("CNI_COMMAND".into(), cmd.into()),
            ("CNI_CONTAINERID".into(), cid.into()),
            ("CNI_NETNS".into(), "/var/run/netns/fake".into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_ARGS".into(), "K8S_POD_NAME=p1".into()),
            (
                "CNI_PATH".into(),
                format!(
                    "{}/nothing-here:{}",
                    self.p("").display(),
                    self.p("bin").display()
                ),
            ),
            (
                "FLANNEL_TEST_RECORD".into(),
                self.p("rec").display().to_string(),
            ),
            (
                "FLANNEL_TEST_DATA".into(),
                self.p("data").display().to_string(),
            ),
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ])
    }

    fn run(&self, env: &HashMap<String, String>, stdin: &[u8]) -> Run {
        run_bin(env, stdin)
    }

    fn recorded(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.p("rec").join(name)).ok()
    }

    fn saved(&self, cid: &str) -> Option<Vec<u8>> {
        std::fs::read(self.p("data").join(cid)).ok()
    }
}

fn run_bin(env: &HashMap<String, String>, stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flannel"))
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flannel");
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().expect("flannel was killed by a signal"),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn version_command() {
    let r = run_bin(
        &HashMap::from([("CNI_COMMAND".into(), "VERSION".into())]),
        b"",
    );
    assert_eq!(r.code, 0);
    let v = r.json();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn no_command_prints_about_and_succeeds() {
    let r = run_bin(&HashMap::new(), b"");
    assert_eq!(r.code, 0);
    assert!(r.stdout.is_empty());
    assert!(r.stderr.contains("CNI Plugin flannel"), "{}", r.stderr);
}

#[test]
fn add_saves_then_delegates_and_relays() {
    let sb = Sandbox::new();
    sb.write_subnet_env(SUBNET_ENV);
    let conf = sb.conf(r#","delegate":{"hairpinMode":true,"isDefaultGateway":true}"#);
    let r = sb.run(&sb.env("ADD", "ctr1"), conf.as_bytes());
    assert_eq!(
        r.code,
        0,
        "stdout {:?} stderr {}",
        String::from_utf8_lossy(&r.stdout),
        r.stderr
    );
    // The delegate's result is passed on unchanged.
    assert_eq!(
        r.stdout,
        br#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.5.2/24","gateway":"10.244.5.1","interface":0}]}"#
    );
    let expected = br#"{"cniVersion":"1.0.0","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.5.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#;
    assert_eq!(
        sb.recorded("ADD.stdin").unwrap(),
        expected,
        "delegate stdin"
    );
    assert_eq!(sb.saved("ctr1").unwrap(), expected, "saved config");
    assert!(
        sb.recorded("ADD.saved-before").is_some(),
        "saved before the delegate ran"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sb.p("data")), 0o700);
    assert_eq!(mode(&sb.p("data/ctr1")), 0o600);
    let env = String::from_utf8(sb.recorded("ADD.env").unwrap()).unwrap();
    for line in [
        "CNI_COMMAND=ADD",
        "CNI_CONTAINERID=ctr1",
        "CNI_IFNAME=eth0",
        "CNI_NETNS=/var/run/netns/fake",
        "CNI_ARGS=K8S_POD_NAME=p1",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing in\n{env}");
    }

    // DEL hands the saved bytes to the delegate and removes the file.
    let r = sb.run(&sb.env("DEL", "ctr1"), conf.as_bytes());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert_eq!(sb.recorded("DEL.stdin").unwrap(), expected);
    assert!(sb.saved("ctr1").is_none());

    // A second DEL finds nothing and succeeds without calling the delegate.
    std::fs::remove_file(sb.p("rec/DEL.stdin")).unwrap();
    let r = sb.run(&sb.env("DEL", "ctr1"), conf.as_bytes());
    assert_eq!(r.code, 0);
    assert!(sb.recorded("DEL.stdin").is_none());
}

#[test]
fn delegate_failures_are_relayed_and_del_keeps_the_file() {
    let sb = Sandbox::new();
    sb.write_subnet_env(SUBNET_ENV);
    let conf = sb.conf("");

    std::fs::write(sb.p("rec/fail-ADD"), "").unwrap();
    let r = sb.run(&sb.env("ADD", "ctr2"), conf.as_bytes());
    assert_eq!(r.code, 7, "the delegate's exit code");
    assert_eq!(
        r.stdout,
        br#"{"cniVersion":"1.0.0","code":7,"msg":"recorder refuses","details":"as asked"}"#
    );
    assert!(
        r.stderr.contains("recorder failing on purpose"),
        "delegate stderr passed on"
    );
    std::fs::remove_file(sb.p("rec/fail-ADD")).unwrap();
    assert_eq!(sb.run(&sb.env("ADD", "ctr2"), conf.as_bytes()).code, 0);

    std::fs::write(sb.p("rec/fail-DEL"), "").unwrap();
    let r = sb.run(&sb.env("DEL", "ctr2"), conf.as_bytes());
    assert_eq!(r.code, 7);
    assert_eq!(r.error()["msg"], "recorder refuses");
    assert!(sb.saved("ctr2").is_some(), "kept for the runtime's retry");
    std::fs::remove_file(sb.p("rec/fail-DEL")).unwrap();
    let r = sb.run(&sb.env("DEL", "ctr2"), conf.as_bytes());
    assert_eq!(r.code, 0);
    assert!(sb.saved("ctr2").is_none());
}

#[test]
fn del_with_unparsable_saved_config_succeeds_and_leaks() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.p("data")).unwrap();
    std::fs::write(sb.p("data/ctr3"), "{not json").unwrap();
    let r = sb.run(&sb.env("DEL", "ctr3"), sb.conf("").as_bytes());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(sb.recorded("DEL.stdin").is_none(), "no delegate to call");
    assert!(sb.saved("ctr3").is_some(), "left in place, as upstream");
}

#[test]
fn del_needs_no_subnet_env_and_no_netns() {
    let sb = Sandbox::new();
    sb.write_subnet_env(SUBNET_ENV);
    let conf = sb.conf("");
    assert_eq!(sb.run(&sb.env("ADD", "ctr4"), conf.as_bytes()).code, 0);
    std::fs::remove_file(sb.p("subnet.env")).unwrap();
    let mut env = sb.env("DEL", "ctr4");
    env.remove("CNI_NETNS");
    let r = sb.run(&env, conf.as_bytes());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(sb.saved("ctr4").is_none());
    let denv = String::from_utf8(sb.recorded("DEL.env").unwrap()).unwrap();
    assert!(!denv.contains("CNI_NETNS="), "{denv}");
}

#[test]
fn missing_subnet_env_fails_with_try_again_later() {
    let sb = Sandbox::new();
    let r = sb.run(
        &sb.env("ADD", "ctr5"),
        sb.conf(r#","subnetFileWait":0.3"#).as_bytes(),
    );
    let e = r.error();
    assert_eq!(e["code"], 11);
    assert_eq!(
        e["msg"],
        format!(
            "flanneld has not written {} yet (is the flannel agent running and has it acquired a lease?)",
            sb.p("subnet.env").display()
        )
    );
    assert!(sb.recorded("ADD.stdin").is_none());
    assert!(sb.saved("ctr5").is_none());
}

#[test]
fn add_waits_for_subnet_env() {
    let sb = Sandbox::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flannel"))
        .env_clear()
        .envs(sb.env("ADD", "ctr6"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sb.conf(r#","subnetFileWait":120"#).as_bytes())
        .unwrap();
    // Written (atomically, as flanneld does) while the plugin is already waiting.
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(sb.p("subnet.env.tmp"), SUBNET_ENV).unwrap();
    std::fs::rename(sb.p("subnet.env.tmp"), sb.p("subnet.env")).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(sb.saved("ctr6").is_some());
}

#[test]
fn bad_subnet_env_says_which_key() {
    let sb = Sandbox::new();
    sb.write_subnet_env("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=nonsense\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
    let e = sb.run(&sb.env("ADD", "c"), sb.conf("").as_bytes()).error();
    assert_eq!(e["code"], 999);
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains("FLANNEL_SUBNET has an invalid value \"nonsense\""),
        "{msg}"
    );

    sb.write_subnet_env("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\n");
    let e = sb.run(&sb.env("ADD", "c"), sb.conf("").as_bytes()).error();
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.ends_with("is missing FLANNEL_MTU, FLANNEL_IPMASQ"),
        "{msg}"
    );
}

#[test]
fn bad_stdin_is_a_cni_error() {
    let sb = Sandbox::new();
    sb.write_subnet_env(SUBNET_ENV);
    let cases: Vec<(String, u64, &str)> = vec![
        ("{not json".into(), 6, "error unmarshalling network config"),
        ("".into(), 6, "error unmarshalling network config"),
        ("[1,2]".into(), 6, "error unmarshalling network config"),
        (
            r#"{"cniVersion":"1.0.0"}"#.into(),
            7,
            "missing network name",
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"bad/name"}"#.into(),
            7,
            "invalid characters found in network name",
        ),
        (
            r#"{"cniVersion":"7.0.0","name":"cbr0"}"#.into(),
            1,
            "incompatible CNI versions",
        ),
        (
            r#"{"cniVersion":1,"name":"cbr0"}"#.into(),
            6,
            "decoding version",
        ),
        (
            sb.conf(r#","delegate":{"name":"x"}"#),
            7,
            "must not have 'name' field",
        ),
        (
            sb.conf(r#","delegate":{"ipam":{"type":"host-local"}}"#),
            7,
            "must not have 'ipam' field",
        ),
        (
            sb.conf(r#","delegate":{"type":["bridge"]}"#),
            7,
            "(string) 'type' field",
        ),
        (
            sb.conf(r#","delegate":{"type":"../../bin/sh"}"#),
            7,
            "invalid plugin name",
        ),
        (
            sb.conf(r#","delegate":"bridge""#),
            7,
            "failed to load netconf",
        ),
        (
            sb.conf(r#","ipam":{"routes":[{"dst":"x"}]}"#),
            7,
            "ipam.routes",
        ),
    ];
    for (stdin, code, msg) in cases {
        let r = sb.run(&sb.env("ADD", "ctr7"), stdin.as_bytes());
        let e = r.error();
        assert_eq!(e["code"], code, "{stdin}: {e}");
        assert!(e["msg"].as_str().unwrap().contains(msg), "{stdin}: {e}");
        assert!(e["cniVersion"].is_string());
        assert_eq!(r.code, 1);
        assert!(sb.saved("ctr7").is_none(), "{stdin}: nothing saved");
        assert!(
            sb.recorded("ADD.stdin").is_none(),
            "{stdin}: delegate not run"
        );
    }
}

#[test]
fn status_command() {
    let sb = Sandbox::new();
    let conf = sb.conf("").replace("\"1.0.0\"", "\"1.1.0\"");
    let env = HashMap::from([
        ("CNI_COMMAND".to_string(), "STATUS".to_string()),
        ("CNI_PATH".to_string(), sb.p("bin").display().to_string()),
    ]);
    let e = run_bin(&env, conf.as_bytes()).error();
    assert_eq!(e["code"], 50);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("flanneld has not written"),
        "{e}"
    );
    sb.write_subnet_env(SUBNET_ENV);
    let r = run_bin(&env, conf.as_bytes());
    assert_eq!(r.code, 0, "{:?}", String::from_utf8_lossy(&r.stdout));
    assert!(r.stdout.is_empty());
}

#[test]
fn check_is_a_noop_success() {
    let sb = Sandbox::new();
    let r = sb.run(&sb.env("CHECK", "ctr8"), sb.conf("").as_bytes());
    assert_eq!(r.code, 0);
    assert!(sb.recorded("CHECK.stdin").is_none());
}
