//! The one error type of the lab library.

use std::path::PathBuf;
use std::time::Duration;

/// Anything that can go wrong while building, driving or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// An I/O operation on a file or a process failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// A condition did not become true before its deadline.
    #[error("timed out after {:.1} s waiting for {what}", .after.as_secs_f64())]
    Timeout { what: String, after: Duration },
    /// Talking to the lab's etcd failed.
    #[error("etcd {op}: {msg}")]
    Etcd { op: String, msg: String },
    /// A flanneld exited while the lab expected it to run.
    #[error("flanneld on {host} exited ({status}); end of its log ({log_path}):\n{log_tail}")]
    AgentExited {
        host: String,
        status: String,
        log_path: PathBuf,
        log_tail: String,
    },
    /// A binary the lab needs was not found.
    #[error("binary `{name}` not found (looked in: {looked}); build the workspace binaries or set FLANNEL_BIN_DIR")]
    MissingBinary { name: String, looked: String },
    /// The CNI plugin reported an error or printed something unreadable.
    #[error("CNI {command} of {pod} on {host}: {msg}")]
    Cni {
        command: String,
        pod: String,
        host: String,
        msg: String,
    },
    /// Output of a tool (ping, iperf3, ip) could not be read.
    #[error("cannot read {what} output: {msg}")]
    Parse { what: String, msg: String },
    /// A process-wide teardown (signal) is running: nothing new may be created.
    #[error("the lab is being torn down (signal received)")]
    ShuttingDown,
    /// A caller asked for something that does not exist or is not in the right state.
    #[error("{0}")]
    Invalid(String),
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;
