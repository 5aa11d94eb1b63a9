//! Finding and running the delegate plugin.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{code, CniError};

/// The CNI variables a delegate receives; the rest of the environment is inherited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

/// `plugin` in the first directory of the colon-separated `cni_path` that holds a
/// regular file by that name. Names with a path separator are refused: `type`
/// comes from a config file and must not reach outside CNI_PATH.
pub fn find_in_path(plugin: &str, cni_path: &str) -> Result<PathBuf, CniError> {
    if plugin.is_empty() {
        return Err(CniError::new(
            code::INVALID_NETCONF,
            "no plugin name provided",
        ));
    }
    if plugin.contains('/') || plugin == "." || plugin == ".." {
        return Err(CniError::new(
            code::INVALID_NETCONF,
            format!("invalid plugin name {plugin:?}: it must not contain a path"),
        ));
    }
    let dirs: Vec<&str> = cni_path.split(':').filter(|d| !d.is_empty()).collect();
    for dir in &dirs {
        let candidate = Path::new(dir).join(plugin);
        if std::fs::metadata(&candidate).is_ok_and(|m| m.is_file()) {
            return Ok(candidate);
        }
    }
    Err(CniError::new(
        code::INTERNAL,
        format!("failed to find plugin {plugin:?} in path {dirs:?}"),
    ))
}

/// What a finished plugin produced.
#[derive(Debug)]
pub struct PluginOutput {
    /// Exit code; `None` when a signal ended it.
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `plugin` with CNI_COMMAND=`command`, the given CNI variables and `stdin`.
pub fn run_plugin(
    plugin: &Path,
    command: &str,
    env: &CniEnv,
    stdin: &[u8],
) -> Result<PluginOutput, CniError> {
    let mut cmd = Command::new(plugin);
    cmd.env("CNI_COMMAND", command);
    for (key, value) in [
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_NETNS", &env.netns),
        ("CNI_IFNAME", &env.ifname),
        ("CNI_ARGS", &env.args),
        ("CNI_PATH", &env.path),
    ] {
        if value.is_empty() {
            cmd.env_remove(key);
        } else {
            cmd.env(key, value);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |e: std::io::Error| {
        CniError::new(
            code::INTERNAL,
            format!("failed to run plugin {}: {e}", plugin.display()),
        )
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let child_stdin = child.stdin.take();
    // Feed stdin from another thread so a plugin that writes before it has read
    // everything cannot deadlock against us.
    let output = std::thread::scope(|s| {
        if let Some(mut pipe) = child_stdin {
            s.spawn(move || {
                // A plugin may exit without reading stdin; EPIPE is its business.
                let _ = pipe.write_all(stdin);
            });
        }
        child.wait_with_output()
    })
    .map_err(spawn_err)?;
    Ok(PluginOutput {
        exit_code: output.status.code(),
        stdout: output.stdout,
        stderr: output.stderr,
    })
}

/// The error for a failed plugin whose stdout is not a CNI error, worded as libcni
/// words it.
pub fn failure_without_result(out: &PluginOutput) -> CniError {
    let status = match out.exit_code {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".to_string(),
    };
    let msg = if out.stdout.is_empty() {
        if out.stderr.is_empty() {
            format!("netplugin failed with no error message: {status}")
        } else {
            format!(
                "netplugin failed ({status}): {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        }
    } else {
        format!(
            "netplugin failed ({status}) but its diagnostic message is not a CNI error: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    };
    CniError::new(code::INTERNAL, msg)
}

/// True when `stdout` holds a CNI error object (`code` and `msg`), so it can be
/// relayed to the runtime as it is.
pub fn is_cni_error(stdout: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(stdout) {
        Ok(serde_json::Value::Object(o)) => {
            o.get("code").is_some_and(|c| c.is_u64()) && o.get("msg").is_some_and(|m| m.is_string())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn finds_first_match_and_refuses_paths() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir(a.path().join("bridge")).unwrap(); // a directory is skipped
        let want = script(b.path(), "bridge", "exit 0");
        let path = format!("{}::{}", a.path().display(), b.path().display());
        assert_eq!(find_in_path("bridge", &path).unwrap(), want);
        let e = find_in_path("ptp", &path).unwrap_err();
        assert_eq!(e.code, code::INTERNAL);
        assert!(e.msg.contains("failed to find plugin \"ptp\""), "{e}");
        for bad in ["", "../bridge", "/bin/sh", "a/b", ".."] {
            assert!(find_in_path(bad, &path).is_err(), "{bad}");
        }
    }

    #[test]
    fn runs_with_env_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(
            dir.path(),
            "echoer",
            "printf '%s|%s|%s|%s|' \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \"$CNI_IFNAME\" \"${CNI_NETNS-unset}\"; cat; echo oops >&2; exit 3",
        );
        let env = CniEnv {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            path: "/x".into(),
            ..Default::default()
        };
        // Larger than a pipe buffer, to exercise the stdin writer thread.
        let big = vec![b'x'; 1 << 20];
        let out = run_plugin(&p, "ADD", &env, &big).unwrap();
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(&out.stdout[..18], b"ADD|c1|eth0|unset|");
        assert_eq!(out.stdout.len(), 18 + big.len());
        assert_eq!(out.stderr, b"oops\n");
        let e = failure_without_result(&out);
        assert!(e.msg.contains("exit status 3"), "{e}");
    }

    #[test]
    fn recognises_cni_errors() {
        assert!(is_cni_error(br#"{"code":7,"msg":"bad"}"#));
        assert!(is_cni_error(
            br#"{"cniVersion":"1.0.0","code":7,"msg":"bad","details":"x"}"#
        ));
        assert!(!is_cni_error(b""));
        assert!(!is_cni_error(b"panic: oops"));
        assert!(!is_cni_error(br#"{"msg":"no code"}"#));
    }
}
