//! Request failures and the Kubernetes `Status` objects they become.

use serde_json::{json, Value};

/// Why a request failed; maps onto the Kubernetes `Status` the server returns.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FakeError {
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{message}")]
    Invalid {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{message}")]
    Forbidden {
        kind: &'static str,
        name: Option<String>,
        message: String,
    },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Io(String),
}

impl FakeError {
    pub fn code(&self) -> u16 {
        match self {
            FakeError::NotFound { .. } => 404,
            FakeError::AlreadyExists { .. } | FakeError::Conflict(_) => 409,
            FakeError::BadRequest(_) => 400,
            FakeError::Invalid { .. } => 422,
            FakeError::Gone(_) => 410,
            FakeError::Forbidden { .. } => 403,
            FakeError::UnsupportedMediaType(_) => 415,
            FakeError::Timeout(_) => 504,
            FakeError::Io(_) => 500,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            FakeError::NotFound { .. } => "NotFound",
            FakeError::AlreadyExists { .. } => "AlreadyExists",
            FakeError::Conflict(_) => "Conflict",
            FakeError::BadRequest(_) => "BadRequest",
            FakeError::Invalid { .. } => "Invalid",
            FakeError::Gone(_) => "Expired",
            FakeError::Forbidden { .. } => "Forbidden",
            FakeError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            FakeError::Timeout(_) => "Timeout",
            FakeError::Io(_) => "InternalError",
        }
    }

    /// The `Status` object the real server sends for this error.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
        });
        let details = match self {
            FakeError::NotFound { kind, name }
            | FakeError::AlreadyExists { kind, name }
            | FakeError::Invalid { kind, name, .. } => Some(json!({"name": name, "kind": kind})),
            FakeError::Forbidden { kind, name, .. } => Some(match name {
                Some(n) => json!({"name": n, "kind": kind}),
                None => json!({"kind": kind}),
            }),
            _ => None,
        };
        if let Some(d) = details {
            s["details"] = d;
        }
        s["code"] = json!(self.code());
        s
    }
}
