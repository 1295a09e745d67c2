//! Change requests (`approval.changeRequests`), in three places:
//!
//! - `gate` (AwaitingApproval, before any side effect at a store or
//!   source): opens one change per listed environment, idempotently (the
//!   entry is recorded in status before the change is created, and a retry
//!   finds the change by its correlation id), reads each back on every poll,
//!   and lets the rotation go on only when every change is approved and its
//!   window is open; a rejected or cancelled change fails the rotation with
//!   nothing changed anywhere, and so does an approval read after its window.
//!   Then each change is moved to implementation.
//! - `hold_invalidation` (Invalidating, before the old value is touched):
//!   when a change window closed during the rotation, the proof is finished
//!   but the invalidation waits until the window is extended (the new value
//!   is in use everywhere, the old one stays valid); a change cancelled or
//!   rejected meanwhile ends the rotation there, without invalidation.
//! - `close` (at the end): closes each change with the result and the phase
//!   timeline; a failure to close is reported, never fatal.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use tracing::warn;

use super::super::view::View;
use crate::change::{self, Change, ChangeSystem, CloseResult, Closing, Opening, Standing};
use crate::crd::{ChangeRequests, ChangeStatus, Phase};
use crate::decide::Outcome;
use crate::error::{Error, Result};
use crate::reason::Reason;

fn config(v: &View) -> Option<ChangeRequests> {
    if v.sr.spec.dry_run {
        return None;
    }
    v.sr.spec
        .approval
        .as_ref()
        .and_then(|a| a.change_requests.clone())
}

fn system(v: &View, config: &ChangeRequests) -> Result<Box<dyn ChangeSystem>> {
    if let (Some(allowed), Some(url)) = (&v.ctx.allowed_hosts, change::url_of(config))
        && !crate::plan::host_allowed(url, allowed)
    {
        return Err(Error::permanent(
            Reason::HostNotAllowed,
            "approval.changeRequests names a host outside this operator's --allowed-hosts",
        ));
    }
    Ok(v.ctx.providers.changes(config, &v.namespace))
}

/// Copies what the change system answered into the status entry.
fn record(entry: &mut ChangeStatus, change: &Change) {
    entry.id = change.id.clone();
    entry.number = change.number.clone();
    entry.state = change.state.clone();
    entry.approval = change.approval.clone();
    entry.window_start = change.window_start.map(Time);
    entry.window_end = change.window_end.map(Time);
}

fn label(c: &ChangeStatus) -> String {
    let number = if c.number.is_empty() {
        "(not yet created)"
    } else {
        &c.number
    };
    format!("{number} ({})", c.environment)
}

fn opening(v: &View, config: &ChangeRequests, environment: &str) -> Opening {
    let id = &v.rotation().id;
    let what = format!(
        "Rotate credential {}/{} in {environment} (rekey rotation {id})",
        v.namespace, v.name
    );
    let short = match config
        .service_now
        .as_ref()
        .and_then(|s| s.short_description.clone())
    {
        Some(text) => format!("{text} ({environment})"),
        None => what.clone(),
    };
    let targets: Vec<String> =
        v.sr.spec
            .targets
            .iter()
            .filter(|t| t.environment.as_deref() == Some(environment))
            .map(|t| t.name.clone())
            .collect();
    let description = format!(
        "{what}. rekey issues a new value, writes it to every target of the SecretRotation (those of {environment}: {}), proves that every consumer runs it, then invalidates the old value. The value is shared by all of the SecretRotation's environments: a rejection stops the rotation everywhere. This change is closed with the result and the timeline when the rotation ends.",
        if targets.is_empty() {
            "none named".to_string()
        } else {
            targets.join(", ")
        }
    );
    Opening {
        correlation_id: change::correlation_id(id, environment),
        rotation_id: id.clone(),
        namespace: v.namespace.clone(),
        name: v.name.clone(),
        environment: environment.into(),
        short_description: short,
        description,
    }
}

/// AwaitingApproval: `Some(Waiting)` while a change is not approved or its
/// window not yet open; `None` once every change is approved, inside its
/// window and started (or no change is configured).
pub async fn gate(v: &mut View) -> Result<Option<Outcome>> {
    let Some(config) = config(v) else {
        return Ok(None);
    };
    let system = system(v, &config)?;
    // Recorded before anything is created.
    let mut added = false;
    for env in &config.environments {
        if !v.rotation().changes.iter().any(|c| c.environment == env.0) {
            v.rotation_mut().changes.push(ChangeStatus {
                environment: env.0.clone(),
                ..Default::default()
            });
            added = true;
        }
    }
    if added {
        v.write_status().await?;
    }
    let mut read = Vec::new();
    for i in 0..v.rotation().changes.len() {
        let entry = v.rotation().changes[i].clone();
        let mut change = if entry.id.is_empty() {
            let correlation = change::correlation_id(&v.rotation().id, &entry.environment);
            let found = v
                .act("find change request", system.find(&correlation))
                .await?;
            let change = match found {
                Some(c) => c,
                None => {
                    let o = opening(v, &config, &entry.environment);
                    v.act("open change request", system.open(&o)).await?
                }
            };
            record(&mut v.rotation_mut().changes[i], &change);
            v.write_status().await?;
            change
        } else {
            v.act("read change request", system.read(&entry.id)).await?
        };
        if change.standing == Standing::New {
            change = v
                .act(
                    "request change approval",
                    system.request_approval(&change.id),
                )
                .await?;
        }
        record(&mut v.rotation_mut().changes[i], &change);
        read.push(change);
    }
    let changes = v.rotation().changes.clone();
    if let Some((c, _)) = changes
        .iter()
        .zip(&read)
        .find(|(_, r)| matches!(r.standing, Standing::Rejected | Standing::Closed))
    {
        return Err(Error::permanent(
            Reason::ChangeRejected,
            format!(
                "change request {} is {} (approval {}): the rotation ends before changing anything, in every environment",
                label(c),
                c.state,
                c.approval
            ),
        ));
    }
    let pending: Vec<String> = changes
        .iter()
        .zip(&read)
        .filter(|(_, r)| matches!(r.standing, Standing::New | Standing::Pending))
        .map(|(c, _)| format!("{} {} (approval {})", label(c), c.state, c.approval))
        .collect();
    if !pending.is_empty() {
        return Ok(Some(Outcome::Waiting(format!(
            "waiting for change requests to be approved: {}",
            pending.join(", ")
        ))));
    }
    // Every change is approved (or already implementing after a restart).
    for (c, r) in changes.iter().zip(&read) {
        if let Some(end) = r.window_end
            && v.now > end
            && !c.started
        {
            return Err(Error::permanent(
                Reason::ChangeWindowClosed,
                format!(
                    "change request {} was approved, but its change window ended at {end}: the approval is refused and nothing was changed; plan a new window",
                    label(c)
                ),
            ));
        }
    }
    let opening_at: Vec<String> = changes
        .iter()
        .zip(&read)
        .filter_map(|(c, r)| {
            let start = r.window_start?;
            (v.now < start).then(|| format!("{} at {start}", label(c)))
        })
        .collect();
    if !opening_at.is_empty() {
        return Ok(Some(Outcome::Waiting(format!(
            "change requests approved; waiting for their change windows to open: {}",
            opening_at.join(", ")
        ))));
    }
    for i in 0..changes.len() {
        if changes[i].started || read[i].standing == Standing::Implementing {
            v.rotation_mut().changes[i].started = true;
            continue;
        }
        let started = v
            .act("start change request", system.start(&changes[i].id))
            .await?;
        let entry = &mut v.rotation_mut().changes[i];
        record(entry, &started);
        entry.started = true;
        v.write_status().await?;
    }
    Ok(None)
}

/// Whether a change window closed during the rotation: then the
/// invalidation (the one step that cannot be undone) waits, with the proof
/// complete and the old value still valid, until the window is extended.
pub async fn hold_invalidation(v: &mut View) -> Result<Option<Outcome>> {
    if v.rotation().invalidation_started || v.rotation().changes.is_empty() {
        return Ok(None);
    }
    let Some(config) = config(v) else {
        return Ok(None);
    };
    let system = system(v, &config)?;
    let mut closed = Vec::new();
    for i in 0..v.rotation().changes.len() {
        let id = v.rotation().changes[i].id.clone();
        if id.is_empty() {
            continue;
        }
        let change = v.act("read change request", system.read(&id)).await?;
        record(&mut v.rotation_mut().changes[i], &change);
        let entry = &v.rotation().changes[i];
        if change.ended || change.standing == Standing::Rejected {
            // Withdrawn: the rotation ends here, the old value valid.
            return Err(Error::permanent(
                Reason::ChangeRejected,
                format!(
                    "change request {} is {} (approval {}) before the old value was invalidated: the old value stays valid, the new value is in use in every environment",
                    label(entry),
                    entry.state,
                    entry.approval
                ),
            ));
        }
        if let Some(end) = change.window_end
            && v.now > end
        {
            closed.push(format!("{} closed at {end}", label(entry)));
        }
    }
    if closed.is_empty() {
        return Ok(None);
    }
    Ok(Some(Outcome::Waiting(format!(
        "invalidation held: the change window of {}. The new value is proven in use everywhere and the old value stays valid; extend the change window to invalidate it, or cancel the change to end the rotation without invalidating",
        closed.join(", ")
    ))))
}

/// How the rotation's changes are closed for `result`.
fn close_result(v: &View, result: Phase) -> CloseResult {
    let rot = v.rotation();
    let acted =
        rot.issue_attempted_at.is_some() || rot.issued_at.is_some() || !rot.targets.is_empty();
    match result {
        Phase::Succeeded => CloseResult::Successful,
        _ if !acted => CloseResult::Canceled,
        _ if rot.rolled_back => CloseResult::RolledBack,
        _ => CloseResult::Unsuccessful,
    }
}

/// The close notes: the result and the timeline, built from status (never
/// a value).
fn notes(v: &View, result: Phase, how: CloseResult, now: Timestamp) -> String {
    let rot = v.rotation();
    let mut text = format!(
        "rekey rotation {} of SecretRotation {}/{}: {result} ({}).",
        rot.id,
        v.namespace,
        v.name,
        how.as_str()
    );
    if let Some(at) = &rot.requested_at {
        text.push_str(&format!(" Requested {}", at.0));
        if let Some(by) = &rot.requested_by {
            text.push_str(&format!(" by {by}"));
        }
        text.push('.');
    }
    if let Some(at) = &rot.issued_at {
        text.push_str(&format!(" New value issued {}.", at.0));
    }
    if let Some(at) = &rot.synced_at {
        text.push_str(&format!(" Synced {}.", at.0));
    }
    if let Some(at) = &rot.rolled_out_at {
        text.push_str(&format!(" Rolled out {}.", at.0));
    }
    text.push_str(&format!(" Ended {now}. Timeline:"));
    for p in &rot.phases {
        text.push_str(&format!(" {} {:.0}s;", p.phase, p.seconds));
    }
    if !rot.targets.is_empty() {
        let versions: Vec<String> = rot
            .targets
            .iter()
            .map(|t| format!("{}={}", t.name, t.version))
            .collect();
        text.push_str(&format!(" Versions written: {}.", versions.join(", ")));
    }
    if let Some(f) = &rot.failure {
        text.push_str(&format!(
            " Failure in {}: {}: {}.",
            f.phase, f.reason, f.message
        ));
    }
    if rot.rolled_back {
        text.push_str(" The previous value was written back.");
    }
    text
}

/// The end of the rotation: closes every change it opened. Never fails the
/// end: a change left open is reported in an Event and in status.
pub async fn close(v: &mut View, result: Phase) {
    if v.rotation().changes.is_empty() {
        return;
    }
    let Some(config) = config(v) else {
        return;
    };
    let system = match system(v, &config) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot close change requests");
            return;
        }
    };
    let how = close_result(v, result);
    let closing = Closing {
        result: how,
        notes: notes(v, result, how, v.now),
        timeline: v.rotation().phases.clone(),
    };
    for i in 0..v.rotation().changes.len() {
        let entry = v.rotation().changes[i].clone();
        if !entry.closed.is_empty() {
            continue;
        }
        let id = if entry.id.is_empty() {
            // Created, but its answer was lost: find it.
            let correlation = change::correlation_id(&v.rotation().id, &entry.environment);
            match v
                .act("find change request", system.find(&correlation))
                .await
            {
                Ok(Some(c)) => c.id,
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, environment = %entry.environment, "cannot find change request to close");
                    continue;
                }
            }
        } else {
            entry.id.clone()
        };
        match v
            .act("close change request", system.close(&id, &closing))
            .await
        {
            Ok(change) => {
                let entry = &mut v.rotation_mut().changes[i];
                record(entry, &change);
                entry.closed = how.as_str().into();
            }
            Err(e) => {
                warn!(error = %e, environment = %entry.environment, "cannot close change request");
                v.event(
                    EventType::Warning,
                    "ChangeNotClosed",
                    format!(
                        "Change request {} of rotation {} could not be closed ({e}); close it by hand: {}",
                        label(&entry),
                        v.rotation().id,
                        how.as_str()
                    ),
                );
            }
        }
    }
}
