//! Running the firewall tools, optionally inside a named network namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use super::RulesError;

/// Where commands run: the current namespace, or `ip netns exec <name>`.
#[derive(Clone, Debug)]
pub(crate) struct Runner {
    netns: Option<String>,
}

impl Runner {
    pub(crate) fn new(netns: Option<String>) -> Self {
        Runner { netns }
    }

    pub(crate) fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Run `program args…`, feed `stdin` if given, and return stdout. A non-zero exit is an
    /// error carrying stderr.
    pub(crate) fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, RulesError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The tools print localised messages otherwise; our parsers want the C locale.
            .env("LC_ALL", "C");
        let describe = || {
            let mut s = program.to_string();
            for a in args {
                s.push(' ');
                s.push_str(a);
            }
            s
        };
        let mut child = cmd.spawn().map_err(|source| RulesError::Spawn {
            command: describe(),
            source,
        })?;
        if let Some(input) = stdin {
            if let Some(mut pipe) = child.stdin.take() {
                // A tool that exits early closes its stdin; its exit status says why.
                let _ = pipe.write_all(input.as_bytes());
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|source| RulesError::Spawn {
                command: describe(),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            // `ip netns exec` reports a missing tool with exit status 255 and this text;
            // treat it like a failed spawn so "tool missing" stays recognisable.
            if self.netns.is_some()
                && stderr.contains("No such file or directory")
                && stderr.contains("exec of")
            {
                return Err(RulesError::Spawn {
                    command: describe(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, stderr),
                });
            }
            return Err(RulesError::Command {
                command: describe(),
                status: out.status.to_string(),
                stderr,
            });
        }
        String::from_utf8(out.stdout).map_err(|e| RulesError::Output {
            command: describe(),
            detail: e.to_string(),
        })
    }
}
