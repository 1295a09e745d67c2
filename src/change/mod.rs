//! Change requests (`spec.approval.changeRequests`): one change per
//! environment group is opened before a rotation changes anything, read
//! back on every poll, moved to implementation when the rotation acts, and
//! closed with the result and the phase timeline when it ends.
//!
//! Two change systems: ServiceNow's Change Management REST API
//! (`servicenow`) and the generic webhook contract of docs/sources.md
//! (`webhook`). Both are read back, never assumed: a change counts as
//! approved only when the change system says so.

pub mod servicenow;
pub mod webhook;

use async_trait::async_trait;
use jiff::Timestamp;

use crate::crd::ChangeRequests;
use crate::deps::Deps;
use crate::error::{Error, Result};
use crate::reason::Reason;

/// Where a change stands, as read back and normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Created, approval not yet requested (ServiceNow: New).
    New,
    /// Waiting for its approvers.
    Pending,
    /// Approved and scheduled: the rotation may act inside its window.
    Approved,
    /// In implementation (the rotation acts).
    Implementing,
    /// Rejected or cancelled by its approvers.
    Rejected,
    /// Closed (or cancelled after implementation began).
    Closed,
}

/// A change as the change system answered. Never holds a secret value.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The change system's id (ServiceNow: sys_id).
    pub id: String,
    /// The number people know, e.g. `CHG0030001`.
    pub number: String,
    /// The change system's name of its state, e.g. `Assess`.
    pub state: String,
    /// The change system's approval, e.g. `Requested`.
    pub approval: String,
    pub standing: Standing,
    /// Closed or cancelled: nothing more can be recorded on it.
    pub ended: bool,
    pub window_start: Option<Timestamp>,
    pub window_end: Option<Timestamp>,
}

/// What a new change says.
#[derive(Clone, Debug)]
pub struct Opening {
    /// Finds the change again after a lost answer or a restart.
    pub correlation_id: String,
    pub rotation_id: String,
    pub namespace: String,
    pub name: String,
    pub environment: String,
    pub short_description: String,
    pub description: String,
}

/// How a change is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseResult {
    /// The rotation succeeded.
    Successful,
    /// The rotation failed; the targets were left as they were.
    Unsuccessful,
    /// The rotation failed and the previous value was written back.
    RolledBack,
    /// The rotation ended before it changed anything.
    Canceled,
}

impl CloseResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseResult::Successful => "Successful",
            CloseResult::Unsuccessful => "Unsuccessful",
            CloseResult::RolledBack => "RolledBack",
            CloseResult::Canceled => "Canceled",
        }
    }
}

/// How a change is closed: the result, and the rotation's timeline as text
/// (`notes`) and as phases with their seconds.
#[derive(Clone, Debug)]
pub struct Closing {
    pub result: CloseResult,
    pub notes: String,
    pub timeline: Vec<crate::crd::PhaseTiming>,
}

/// A change system.
#[async_trait]
pub trait ChangeSystem: Send + Sync {
    /// The change opened earlier with this correlation id, if any.
    async fn find(&self, correlation_id: &str) -> Result<Option<Change>>;
    /// Creates a change (idempotent through `find` first).
    async fn open(&self, opening: &Opening) -> Result<Change>;
    /// Asks for the approval of a `New` change.
    async fn request_approval(&self, id: &str) -> Result<Change>;
    /// Reads a change back.
    async fn read(&self, id: &str) -> Result<Change>;
    /// Moves an approved change to implementation.
    async fn start(&self, id: &str) -> Result<Change>;
    /// Closes a change with the result and notes (the timeline); a change
    /// already closed or cancelled is left as it is.
    async fn close(&self, id: &str, closing: &Closing) -> Result<Change>;
}

/// The change system a spec names.
pub fn build(config: &ChangeRequests, deps: &Deps, namespace: &str) -> Box<dyn ChangeSystem> {
    match (&config.service_now, &config.webhook) {
        (Some(sn), _) => Box::new(servicenow::ServiceNow::new(sn, deps, namespace)),
        (None, Some(hook)) => Box::new(webhook::ChangeHook::new(hook, deps, namespace)),
        (None, None) => Box::new(Unconfigured),
    }
}

/// The URL a change system is reached at (for `--allowed-hosts`).
pub fn url_of(config: &ChangeRequests) -> Option<&str> {
    config
        .service_now
        .as_ref()
        .map(|s| s.instance_url.as_str())
        .or(config.webhook.as_ref().map(|w| w.url.as_str()))
}

/// The correlation id of a rotation's change for one environment: the
/// rotation id is unique, so a retry finds the change it opened.
pub fn correlation_id(rotation_id: &str, environment: &str) -> String {
    format!("rekey-{rotation_id}-{environment}")
}

/// Maps a change system's HTTP answer to an error (the body is never read
/// into it: it is the change system's text, not ours).
pub(crate) fn status_error(system: &str, call: &str, status: reqwest::StatusCode) -> Error {
    let message = format!("{system} {call} answered HTTP {}", status.as_u16());
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Error::transient(Reason::ChangeSystemError, message)
    } else {
        Error::permanent(Reason::ChangeSystemRejected, message)
    }
}

/// A change system that refuses every call (a spec that names none).
pub struct Unconfigured;

#[async_trait]
impl ChangeSystem for Unconfigured {
    async fn find(&self, _: &str) -> Result<Option<Change>> {
        Err(unconfigured())
    }
    async fn open(&self, _: &Opening) -> Result<Change> {
        Err(unconfigured())
    }
    async fn request_approval(&self, _: &str) -> Result<Change> {
        Err(unconfigured())
    }
    async fn read(&self, _: &str) -> Result<Change> {
        Err(unconfigured())
    }
    async fn start(&self, _: &str) -> Result<Change> {
        Err(unconfigured())
    }
    async fn close(&self, _: &str, _: &Closing) -> Result<Change> {
        Err(unconfigured())
    }
}

fn unconfigured() -> Error {
    Error::permanent(
        Reason::InvalidSpec,
        "approval.changeRequests sets neither serviceNow nor webhook",
    )
}
