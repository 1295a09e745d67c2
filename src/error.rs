//! One error type. Every message is built from fixed text and object names:
//! provider response bodies and secret values never reach it, so an error may
//! go to logs, status and Events as it is.

use crate::reason::{Reason, Retry};

/// An error of a rotation step.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Error {
    /// Used as condition reason and metric label.
    pub reason: Reason,
    /// Human-readable, safe to show.
    pub message: String,
    /// Transient errors are retried with backoff; permanent ones fail the rotation.
    pub permanent: bool,
}

impl Error {
    pub fn permanent(reason: Reason, message: impl Into<String>) -> Self {
        debug_assert_ne!(reason.retry(), Retry::UntilTimeout, "{reason}");
        Self {
            reason,
            message: message.into(),
            permanent: true,
        }
    }

    pub fn transient(reason: Reason, message: impl Into<String>) -> Self {
        debug_assert_ne!(reason.retry(), Retry::Never, "{reason}");
        Self {
            reason,
            message: message.into(),
            permanent: false,
        }
    }

    /// Wraps a Kubernetes API error. The API server's message names objects,
    /// never Secret data, so it is safe to keep.
    pub fn kube(context: &str, err: kube::Error) -> Self {
        let permanent =
            matches!(&err, kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422));
        let detail = match &err {
            kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
            other => other.to_string(),
        };
        Self {
            reason: Reason::KubernetesApiError,
            message: format!("{context}: {detail}"),
            permanent,
        }
    }

    /// Wraps an HTTP client error without its body or URL query.
    pub fn http(reason: Reason, context: &str, err: &reqwest::Error) -> Self {
        let kind = if err.is_timeout() {
            "timeout"
        } else if err.is_connect() {
            "connection failed"
        } else if err.is_decode() {
            "response could not be decoded"
        } else {
            "request failed"
        };
        Self::transient(reason, format!("{context}: {kind}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
