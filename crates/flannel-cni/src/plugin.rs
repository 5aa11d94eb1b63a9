//! One plugin invocation: environment and stdin in, stdout and exit code out.

use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flannel_core::gojson::FoldedObject;

use crate::delegate;
use crate::error::{code, CniError};
use crate::exec::{self, CniEnv};
use crate::flannel_env;
use crate::netconf::{self, NetConf, DEFAULT_SUBNET_FILE_WAIT};
use crate::version::{self, CURRENT_VERSION};

/// Environment variable (seconds) for how long ADD waits for subnet.env when the
/// netconf has no `subnetFileWait`. Meant for tests and debugging: runtimes do not
/// let operators set a plugin's environment.
pub const SUBNET_FILE_WAIT_ENV: &str = "FLANNEL_CNI_SUBNET_FILE_WAIT";

/// Stdin larger than this is refused rather than buffered.
const MAX_STDIN: u64 = 16 << 20;

/// What the process should emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: Vec<u8>) -> Self {
        Outcome {
            stdout,
            stderr: Vec::new(),
            exit_code: 0,
        }
    }

    fn error(e: &CniError, cni_version: &str) -> Self {
        Outcome {
            stdout: e.to_json(cni_version),
            stderr: Vec::new(),
            exit_code: 1,
        }
    }

    fn note(mut self, text: &str) -> Self {
        self.stderr.extend_from_slice(text.as_bytes());
        if !text.ends_with('\n') {
            self.stderr.push(b'\n');
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Cmd {
    fn parse(s: &str) -> Option<Cmd> {
        Some(match s {
            "ADD" => Cmd::Add,
            "DEL" => Cmd::Del,
            "CHECK" => Cmd::Check,
            "STATUS" => Cmd::Status,
            "GC" => Cmd::Gc,
            "VERSION" => Cmd::Version,
            _ => return None,
        })
    }

    /// Variables the command cannot do without (as libcni's skel requires them).
    fn required_env(self) -> &'static [&'static str] {
        match self {
            Cmd::Add | Cmd::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
            Cmd::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Cmd::Status | Cmd::Gc => &["CNI_PATH"],
            Cmd::Version => &[],
        }
    }

    /// The lowest config version that allows the command.
    fn min_version(self) -> Option<&'static str> {
        match self {
            Cmd::Check => Some("0.4.0"),
            Cmd::Status | Cmd::Gc => Some("1.1.0"),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Cmd::Add => "ADD",
            Cmd::Del => "DEL",
            Cmd::Check => "CHECK",
            Cmd::Status => "STATUS",
            Cmd::Gc => "GC",
            Cmd::Version => "VERSION",
        }
    }
}

/// Shown on stderr when the binary is run by hand without CNI_COMMAND.
pub fn about() -> String {
    format!(
        "CNI Plugin flannel version {} (flannel-rs, {}/{})\nCNI protocol versions supported: {}\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        version::SUPPORTED_VERSIONS.join(", ")
    )
}

/// Interface name rules of libcni: 1..=15 bytes, not `.`/`..`, no `/`, `:` or
/// whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = |msg: &str| CniError::new(code::INVALID_ENV, msg);
    if name.is_empty() {
        return Err(bad("interface name is empty"));
    }
    if name.len() > 15 {
        return Err(bad("interface name is too long")
            .with_details("interface name should be less than 16 characters"));
    }
    if name == "." || name == ".." {
        return Err(bad("interface name is . or .."));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(bad(
            "interface name contains / or : or whitespace characters",
        ));
    }
    Ok(())
}

fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::new(3, "missing containerID"));
    }
    if !netconf::is_valid_cni_name(id) {
        return Err(
            CniError::new(code::INVALID_ENV, "invalid characters in containerID").with_details(id),
        );
    }
    Ok(())
}

/// Runs one invocation. `getenv` supplies the CNI_* variables (and
/// [`SUBNET_FILE_WAIT_ENV`]); `stdin` is read only for commands that take a config.
pub fn run(getenv: &dyn Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    let var = |k: &str| getenv(k).unwrap_or_default();
    let command = var("CNI_COMMAND");
    if command.is_empty() {
        return Outcome {
            stdout: Vec::new(),
            stderr: about().into_bytes(),
            exit_code: 0,
        };
    }
    let Some(cmd) = Cmd::parse(&command) else {
        return Outcome::error(
            &CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND: {command}")),
            CURRENT_VERSION,
        );
    };
    let missing: Vec<&str> = cmd
        .required_env()
        .iter()
        .copied()
        .filter(|k| var(k).is_empty())
        .collect();
    if !missing.is_empty() {
        return Outcome::error(
            &CniError::new(
                code::INVALID_ENV,
                format!("required env variables [{}] missing", missing.join(",")),
            ),
            CURRENT_VERSION,
        );
    }
    if cmd == Cmd::Version {
        return Outcome::ok(version::version_json().into_bytes());
    }

    let mut raw = Vec::new();
    if let Err(e) = stdin.take(MAX_STDIN + 1).read_to_end(&mut raw) {
        return Outcome::error(
            &CniError::new(code::IO_FAILURE, format!("error reading from stdin: {e}")),
            CURRENT_VERSION,
        );
    }
    if raw.len() as u64 > MAX_STDIN {
        return Outcome::error(
            &CniError::new(
                code::DECODING_FAILURE,
                format!("network config on stdin is larger than {MAX_STDIN} bytes"),
            ),
            CURRENT_VERSION,
        );
    }
    let Ok(text) = std::str::from_utf8(&raw) else {
        return Outcome::error(
            &CniError::new(
                code::DECODING_FAILURE,
                "error unmarshalling network config: not valid UTF-8",
            ),
            CURRENT_VERSION,
        );
    };

    // Errors answer in the config's version when it is one we speak.
    let declared = version::config_version(text);
    let reply_version = match &declared {
        Ok(v) if version::check_supported(v).is_ok() => v.clone(),
        _ => CURRENT_VERSION.to_string(),
    };
    let env = CniEnv {
        container_id: var("CNI_CONTAINERID"),
        netns: var("CNI_NETNS"),
        ifname: var("CNI_IFNAME"),
        args: var("CNI_ARGS"),
        path: var("CNI_PATH"),
    };
    match dispatch(cmd, text, declared, &env, getenv, &reply_version) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::error(&e, &reply_version),
    }
}

fn dispatch(
    cmd: Cmd,
    text: &str,
    declared: Result<String, CniError>,
    env: &CniEnv,
    getenv: &dyn Fn(&str) -> Option<String>,
    reply_version: &str,
) -> Result<Outcome, CniError> {
    netconf::validate_common(text)?;
    if matches!(cmd, Cmd::Add | Cmd::Check | Cmd::Del) {
        validate_container_id(&env.container_id)?;
        validate_ifname(&env.ifname)?;
    }
    let declared = declared?;
    if let Some(min) = cmd.min_version() {
        let allowed = version::at_least(&declared, min)
            .map_err(|e| CniError::new(code::DECODING_FAILURE, e))?;
        if !allowed {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("config version does not allow {}", cmd.name()),
            ));
        }
    }
    version::check_supported(&declared)?;

    match cmd {
        Cmd::Add => cmd_add(text, env, getenv, reply_version),
        Cmd::Del => cmd_del(text, env, reply_version),
        Cmd::Status => cmd_status(text),
        // Upstream's CHECK does nothing; bridge's own CHECK would need the
        // prevResult the runtime keeps, which a meta-plugin does not forward.
        Cmd::Check => Ok(Outcome::ok(Vec::new())),
        // Nothing of ours outlives a DEL except configs DEL could not parse.
        Cmd::Gc => Ok(Outcome::ok(Vec::new())),
        Cmd::Version => Ok(Outcome::ok(version::version_json().into_bytes())),
    }
}

fn subnet_file_wait(conf: &NetConf, getenv: &dyn Fn(&str) -> Option<String>) -> Duration {
    if let Some(w) = conf.subnet_file_wait {
        return w;
    }
    getenv(SUBNET_FILE_WAIT_ENV)
        .and_then(|s| s.trim().parse::<f64>().ok())
        .and_then(netconf::wait_from_secs)
        .unwrap_or(DEFAULT_SUBNET_FILE_WAIT)
}

fn saved_path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// Writes the delegate config where DEL will find it: dir 0700, file 0600, synced,
/// and put in place by rename so a crash never leaves a truncated file behind.
fn save_delegate(data_dir: &Path, container_id: &str, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)?;
    let path = saved_path(data_dir, container_id);
    // Container IDs never start with '.', so the temp name cannot clash with one.
    let tmp = data_dir.join(format!(".{container_id}.tmp"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // Make the rename itself durable.
    std::fs::File::open(data_dir)?.sync_all()
}

fn cmd_add(
    text: &str,
    env: &CniEnv,
    getenv: &dyn Fn(&str) -> Option<String>,
    reply_version: &str,
) -> Result<Outcome, CniError> {
    let conf = NetConf::parse(text)?;
    // A config mistake is reported at once, not after waiting for flanneld.
    if let Some(d) = &conf.delegate {
        delegate::check_delegate(d)?;
    }
    let wait = subnet_file_wait(&conf, getenv);
    let fenv = flannel_env::load_waiting(&conf.subnet_file, wait).map_err(|e| e.to_cni())?;
    let dconf = delegate::build(&conf, &fenv)?;
    // Find the plugin before saving: an ADD that cannot run leaves nothing for DEL.
    let plugin = exec::find_in_path(&dconf.plugin_type, &env.path)?;
    let saved = saved_path(&conf.data_dir, &env.container_id);
    save_delegate(&conf.data_dir, &env.container_id, &dconf.bytes).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!(
                "failed to save the delegate config to {}: {e}",
                saved.display()
            ),
        )
    })?;
    let out = exec::run_plugin(&plugin, "ADD", env, &dconf.bytes)?;
    Ok(relay(&dconf.plugin_type, out, true, reply_version))
}

/// Passes a delegate's answer on: its result (or error) on stdout and its exit code.
fn relay(
    plugin_type: &str,
    out: exec::PluginOutput,
    needs_result: bool,
    reply_version: &str,
) -> Outcome {
    let mut outcome = if out.exit_code == Some(0) {
        if needs_result
            && !matches!(
                serde_json::from_slice::<serde_json::Value>(&out.stdout),
                Ok(serde_json::Value::Object(_))
            )
        {
            Outcome::error(
                &CniError::new(
                    code::INTERNAL,
                    format!(
                        "delegate plugin {plugin_type} returned an unparsable result: {:?}",
                        String::from_utf8_lossy(&out.stdout)
                    ),
                ),
                reply_version,
            )
        } else if needs_result {
            Outcome::ok(out.stdout)
        } else {
            Outcome::ok(Vec::new())
        }
    } else if exec::is_cni_error(&out.stdout) {
        Outcome {
            stdout: out.stdout,
            stderr: Vec::new(),
            exit_code: out.exit_code.filter(|c| *c != 0).unwrap_or(1),
        }
    } else {
        Outcome::error(&exec::failure_without_result(&out), reply_version)
    };
    outcome.stderr = out.stderr;
    outcome
}

fn cmd_del(text: &str, env: &CniEnv, reply_version: &str) -> Result<Outcome, CniError> {
    let conf = NetConf::parse(text)?;
    let path = saved_path(&conf.data_dir, &env.container_id);
    let saved = match std::fs::read(&path) {
        Ok(b) => b,
        // Already deleted (or never added): DEL must succeed.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::ok(Vec::new())),
        Err(e) => {
            return Err(CniError::new(
                code::IO_FAILURE,
                format!(
                    "failed to read the saved delegate config {}: {e}",
                    path.display()
                ),
            ))
        }
    };
    let plugin_type = std::str::from_utf8(&saved)
        .ok()
        .and_then(|t| FoldedObject::parse(t, &["type"]).ok())
        .and_then(|o| o.get::<String>("type").ok().flatten())
        .filter(|t| !t.is_empty());
    let Some(plugin_type) = plugin_type else {
        // As upstream: the interface stays on the bridge until the node reboots,
        // but the pod can be deleted.
        return Ok(Outcome::ok(Vec::new()).note(&format!(
            "flannel: cannot parse the saved delegate config {}; leaving it in place",
            path.display()
        )));
    };
    let plugin = exec::find_in_path(&plugin_type, &env.path)?;
    let out = exec::run_plugin(&plugin, "DEL", env, &saved)?;
    let outcome = relay(&plugin_type, out, false, reply_version);
    if outcome.exit_code == 0 {
        // Per the CNI spec a failed removal here must not fail the DEL.
        let _ = std::fs::remove_file(&path);
    }
    Ok(outcome)
}

fn cmd_status(text: &str) -> Result<Outcome, CniError> {
    let conf = NetConf::parse(text)?;
    match flannel_env::load(&conf.subnet_file) {
        Ok(_) => Ok(Outcome::ok(Vec::new())),
        Err(e) => Err(CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            format!("plugin not available: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconf::MAX_SUBNET_FILE_WAIT;
    use std::collections::HashMap;

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> Outcome {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        run(&|k| map.get(k).cloned(), &mut stdin.as_bytes())
    }

    fn error_of(o: &Outcome) -> serde_json::Value {
        assert_ne!(o.exit_code, 0, "expected failure, got {o:?}");
        serde_json::from_slice(&o.stdout).expect("CNI error JSON on stdout")
    }

    #[test]
    fn no_command_prints_about() {
        let o = run_with(&[], "");
        assert_eq!(o.exit_code, 0);
        assert!(o.stdout.is_empty());
        assert!(String::from_utf8_lossy(&o.stderr).contains("CNI protocol versions supported"));
    }

    #[test]
    fn version_command_ignores_stdin() {
        let o = run_with(&[("CNI_COMMAND", "VERSION")], "garbage");
        assert_eq!(o.exit_code, 0);
        assert_eq!(o.stdout, version::version_json().into_bytes());
    }

    #[test]
    fn env_errors() {
        let e = error_of(&run_with(&[("CNI_COMMAND", "ADD")], "{}"));
        assert_eq!(e["code"], 4);
        assert_eq!(
            e["msg"],
            "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing"
        );
        let e = error_of(&run_with(&[("CNI_COMMAND", "add")], "{}"));
        assert_eq!(e["code"], 4);
        let base = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        let conf = r#"{"cniVersion":"1.0.0","name":"n","dataDir":"/nonexistent/flannel-rs-test"}"#;
        let mut vars = base.to_vec();
        vars.push(("CNI_CONTAINERID", "../../etc/passwd"));
        let e = error_of(&run_with(&vars, conf));
        assert_eq!(e["code"], 4);
        assert_eq!(e["msg"], "invalid characters in containerID");
        assert_eq!(e["cniVersion"], "1.0.0");
        let mut vars = base.to_vec();
        vars[1] = ("CNI_IFNAME", "a/b");
        vars.push(("CNI_CONTAINERID", "abc"));
        assert_eq!(error_of(&run_with(&vars, conf))["code"], 4);
    }

    #[test]
    fn version_gates() {
        let dir = tempfile::tempdir().unwrap();
        let vars = |cmd: &'static str| {
            vec![
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/proc/self/ns/net"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/nonexistent"),
            ]
        };
        let conf = |v: &str| {
            format!(
                r#"{{"cniVersion":"{v}","name":"n","dataDir":"{}"}}"#,
                dir.path().display()
            )
        };
        let e = error_of(&run_with(&vars("ADD"), &conf("9.9.9")));
        assert_eq!(e["code"], 1);
        assert_eq!(e["msg"], "incompatible CNI versions");
        assert_eq!(e["cniVersion"], CURRENT_VERSION);
        let e = error_of(&run_with(&vars("CHECK"), &conf("0.3.1")));
        assert_eq!(e["code"], 1);
        assert_eq!(e["msg"], "config version does not allow CHECK");
        assert_eq!(run_with(&vars("CHECK"), &conf("0.4.0")).exit_code, 0);
        assert_eq!(run_with(&vars("CHECK"), &conf("1.0.0")).exit_code, 0);
        let e = error_of(&run_with(&vars("STATUS"), &conf("1.0.0")));
        assert_eq!(e["msg"], "config version does not allow STATUS");
        let e = error_of(&run_with(&vars("CHECK"), &conf("x.y")));
        assert_eq!(e["code"], 6);
        // DEL of an unknown container succeeds in every version we speak.
        for v in version::SUPPORTED_VERSIONS {
            assert_eq!(run_with(&vars("DEL"), &conf(v)).exit_code, 0, "{v}");
        }
        assert_eq!(run_with(&vars("GC"), &conf("1.1.0")).exit_code, 0);
    }

    #[test]
    fn status_reports_subnet_env() {
        let dir = tempfile::tempdir().unwrap();
        let env_path = dir.path().join("subnet.env");
        let vars = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/nonexistent")];
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","subnetFile":"{}"}}"#,
            env_path.display()
        );
        let e = error_of(&run_with(&vars, &conf));
        assert_eq!(e["code"], 50);
        let msg = e["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("plugin not available: flanneld has not written"),
            "{msg}"
        );

        std::fs::write(
            &env_path,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\n",
        )
        .unwrap();
        let e = error_of(&run_with(&vars, &conf));
        assert_eq!(e["code"], 50);
        let msg = e["msg"].as_str().unwrap();
        assert!(msg.contains("is missing FLANNEL_SUBNET"), "{msg}");

        std::fs::write(
            &env_path,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let o = run_with(&vars, &conf);
        assert_eq!(o.exit_code, 0, "{o:?}");
        assert!(o.stdout.is_empty());
    }

    #[test]
    fn add_without_subnet_env_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let env_path = dir.path().join("subnet.env");
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
            (SUBNET_FILE_WAIT_ENV, "0"),
        ];
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","subnetFile":"{}","dataDir":"{}"}}"#,
            env_path.display(),
            dir.path().join("data").display()
        );
        let e = error_of(&run_with(&vars, &conf));
        assert_eq!(e["code"], 11);
        assert_eq!(
            e["msg"],
            format!(
                "flanneld has not written {} yet (is the flannel agent running and has it acquired a lease?)",
                env_path.display()
            )
        );
        assert!(
            !dir.path().join("data").exists(),
            "nothing saved on failure"
        );

        // The delegate check comes before the wait.
        let bad = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","subnetFile":"{}","delegate":{{"name":"x"}},"subnetFileWait":600}}"#,
            env_path.display()
        );
        let e = error_of(&run_with(&vars, &bad));
        assert_eq!(e["code"], 7);

        // A plugin missing from CNI_PATH fails the ADD and saves nothing.
        std::fs::write(
            &env_path,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let e = error_of(&run_with(&vars, &conf));
        assert_eq!(e["code"], 999);
        assert!(e["msg"]
            .as_str()
            .unwrap()
            .contains("failed to find plugin \"bridge\""));
        assert!(!dir.path().join("data").join("c1").exists());
    }

    #[test]
    fn subnet_file_wait_precedence() {
        let conf = NetConf::parse(r#"{"name":"n"}"#).unwrap();
        assert_eq!(subnet_file_wait(&conf, &|_| None), DEFAULT_SUBNET_FILE_WAIT);
        assert_eq!(
            subnet_file_wait(&conf, &|_| Some("0.5".into())),
            Duration::from_millis(500)
        );
        assert_eq!(
            subnet_file_wait(&conf, &|_| Some("junk".into())),
            DEFAULT_SUBNET_FILE_WAIT
        );
        assert_eq!(
            subnet_file_wait(&conf, &|_| Some("1e20".into())),
            MAX_SUBNET_FILE_WAIT,
            "capped, not a panic"
        );
        let conf = NetConf::parse(r#"{"name":"n","subnetFileWait":3}"#).unwrap();
        assert_eq!(
            subnet_file_wait(&conf, &|_| Some("0.5".into())),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn save_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a").join("b");
        save_delegate(&data, "c1", b"{}").unwrap();
        save_delegate(&data, "c1", b"{\"x\":1}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("c1")), 0o600);
        assert_eq!(std::fs::read(data.join("c1")).unwrap(), b"{\"x\":1}");
        assert_eq!(
            std::fs::read_dir(&data).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
