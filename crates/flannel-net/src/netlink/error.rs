//! Errors of netlink operations, typed down to the errno so that callers can still
//! tell "gone already" from "refused" after adding their context.

use std::io;

use crate::netns::NetnsError;

/// What went wrong below a netlink operation.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// The kernel answered with this errno.
    #[error("{}", io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// The connection task stopped (its socket failed).
    #[error("netlink connection closed")]
    Closed,
    /// The kernel answered something we did not ask for.
    #[error("unexpected netlink reply: {0}")]
    Unexpected(String),
    /// Opening the socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The connection's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A failed netlink operation; `op` names what was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {cause}")]
pub struct NetlinkError {
    pub op: String,
    #[source]
    pub cause: Cause,
}

impl NetlinkError {
    pub(crate) fn new(op: impl Into<String>, cause: Cause) -> Self {
        NetlinkError {
            op: op.into(),
            cause,
        }
    }
    /// The errno behind the failure, if the kernel (or the socket) gave one.
    pub fn errno(&self) -> Option<i32> {
        match &self.cause {
            Cause::Errno(e) => Some(*e),
            Cause::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}
