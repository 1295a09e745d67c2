//! The one place that announces what happens to a rotation: a log line, an
//! Event and the metrics, for a start, each transition and the end.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::info;

use super::view::View;
use crate::crd::keys::CONFIRM_ANNOTATION;
use crate::crd::{Phase, PhaseTiming, RotationSummary};
use crate::decide::{Request, summary};
use crate::error::Result;
use crate::metrics::{PhaseOnly, ResultLabels};

/// A rotation was requested (its status is written).
pub(super) async fn started(v: &View, id: &str, request: Request) {
    v.ctx
        .metrics
        .rotations_started
        .get_or_create(&v.labels())
        .inc();
    v.ctx
        .metrics
        .set_phase(&v.namespace, &v.name, Phase::Pending);
    let by = v.rotation().requested_by.clone();
    info!(rotation = %id, reason = request.as_str(), requested_by = by.as_deref(), "rotation requested");
    let by = by.map(|who| format!(" by {who}")).unwrap_or_default();
    v.event(
        EventType::Normal,
        "RotationRequested",
        format!("Rotation {id} requested: {}{by}", request.as_str()),
    );
}

/// The rotation was approved (its status, with the approver, is written).
fn approved(v: &View) {
    let rot = v.rotation();
    let by = match rot.approved_by.as_deref() {
        Some(who) => format!("by {who}"),
        None => "(no rekey.dev/approved-by)".to_string(),
    };
    let requester = rot
        .requested_by
        .as_deref()
        .map(|who| format!(", requested by {who}"))
        .unwrap_or_default();
    info!(rotation = %rot.id, approved_by = rot.approved_by.as_deref(), "rotation approved");
    v.event(
        EventType::Normal,
        "Approved",
        format!("Rotation {} approved {by}{requester}", rot.id),
    );
}

/// Records how long the current phase took and starts the clock of the next.
pub(super) fn close_phase(v: &mut View) {
    let now = v.now;
    let phase = v.phase();
    let rot = v.rotation_mut();
    let since = rot.phase_started_at.as_ref().map(|t| t.0).unwrap_or(now);
    let seconds = summary::seconds_between(since, now);
    rot.phases.push(PhaseTiming { phase, seconds });
    rot.phase_started_at = Some(MicroTime(now));
    v.ctx
        .metrics
        .phase_duration
        .get_or_create(&PhaseOnly {
            phase: phase.as_str().into(),
        })
        .observe(seconds);
}

/// Enters `next`: status first, then the announcement.
pub(super) async fn advance(v: &mut View, next: Phase) -> Result<Action> {
    let from = v.phase();
    close_phase(v);
    v.status.phase = Some(next);
    let rot = v.rotation().clone();
    v.set_rotating(&format!("rotation {}: {next}", rot.id));
    v.write_status().await?;
    v.ctx.metrics.set_phase(&v.namespace, &v.name, next);
    let mut note = format!("Rotation {}: {from} -> {next}", rot.id);
    if from == Phase::Writing {
        let versions: Vec<String> = rot
            .targets
            .iter()
            .map(|t| format!("{}={}", t.name, t.version))
            .collect();
        note.push_str(&format!(" (versions written: {})", versions.join(", ")));
    }
    info!(rotation = %rot.id, from = from.as_str(), to = next.as_str(), "phase changed");
    if from == Phase::AwaitingApproval {
        approved(v);
    }
    v.event(EventType::Normal, next.as_str(), note);
    if next == Phase::AwaitingConfirmation {
        let msg = format!(
            "Rotation {}: the new value is proven. Invalidate the old value at the identity provider now, then run: kubectl annotate secretrotation -n {} {} {CONFIRM_ANNOTATION}={}",
            rot.id, v.namespace, v.name, rot.id
        );
        v.event(EventType::Normal, "InvalidateOldValue", msg);
    }
    Ok(Action::requeue(v.ctx.poll))
}

/// The rotation is ending: logged right before its final status write, so
/// that whoever sees the result in status finds the line in the log.
pub(super) fn finishing(summary: &RotationSummary) {
    info!(rotation = %summary.id, result = summary.result.as_str(), "rotation finished");
}

/// The rotation ended (its status is written).
pub(super) async fn finished(
    v: &View,
    summary: &RotationSummary,
    event: (EventType, &str, String),
) {
    let result = summary.result;
    let m = &v.ctx.metrics;
    m.rotations_finished
        .get_or_create(&ResultLabels {
            namespace: v.namespace.clone(),
            name: v.name.clone(),
            result: result.as_str().into(),
            reason: summary
                .failure
                .as_ref()
                .map(|f| f.reason.clone())
                .unwrap_or_default(),
        })
        .inc();
    m.rotation_duration
        .get_or_create(&PhaseOnly {
            phase: result.as_str().into(),
        })
        .observe(summary.duration_seconds);
    m.set_phase(&v.namespace, &v.name, result);
    m.grace_seconds_left.remove(&v.labels());
    let (type_, reason, note) = event;
    v.event(type_, reason, note);
}
