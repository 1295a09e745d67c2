//! No rotation in progress: should one start? Also keeps a request that
//! arrives during a rotation, to serve it after.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::runtime::controller::Action;

use super::super::announce;
use super::super::view::{View, condition};
use crate::crd::keys::{REQUESTED_BY_ANNOTATION, ROTATE_ANNOTATION};
use crate::crd::{Phase, RotationStatus, new_rotation_id};
use crate::decide::{self, Request, Served};
use crate::error::Result;
use kube::runtime::events::EventType;
use tracing::warn;

pub async fn run(v: &mut View) -> Result<Action> {
    // A crash between a rotation's final status write and the deletion of
    // its write-ahead record would leave values behind until the next
    // rotation: the first idle look of each process deletes any leftover.
    if v.ctx.first_idle_look(&v.namespace, &v.name) {
        let wal = v.wal();
        crate::failpoint::around("sweep write-ahead record", wal.delete()).await?;
    }
    let request = decide::rotation_request(
        &v.sr.spec,
        &Served::from_status(&v.status),
        v.annotations(),
        v.now,
    );
    if let Some(request) = request {
        // Many requests at once (a restore, a reinstall) start over time.
        if let Err(wait) = v.ctx.take_start_slot(v.now) {
            let message = format!(
                "rotation requested ({}); waiting for a start slot: this operator starts at most {} rotations at once and {} a minute (--start-burst, --starts-per-minute)",
                request.as_str(),
                v.ctx.start_rate.map_or(0, |r| r.burst),
                v.ctx.start_rate.map_or(0, |r| r.per_minute)
            );
            v.set_condition(condition::ROTATING, "False", "StartRateLimited", &message);
            v.status.pending_request = Some(request.as_str().into());
            v.write_status().await?;
            return Ok(Action::requeue(wait.max(Duration::from_millis(100))));
        }
        return start(v, request).await;
    }
    let never_rotated = v.status.last_rotation.is_none();
    if never_rotated && !v.sr.spec.rotate_on_create && v.status.observed_generation.is_none() {
        // rotateOnCreate: false: creation is not a request; what the object
        // holds now is the baseline later changes are compared with.
        v.status.observed_trigger = v.sr.spec.trigger.clone();
        v.status.observed_rotate_request = v.annotations().get(ROTATE_ANNOTATION).cloned();
    }
    // Schedules count from the last rotation, or (never rotated, not
    // rotated on create) from creation.
    let since = v
        .status
        .last_rotation
        .as_ref()
        .and_then(|l| l.finished_at.as_ref())
        .map(|t| t.0)
        .or_else(|| {
            (never_rotated && !v.sr.spec.rotate_on_create)
                .then(|| v.sr.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .flatten()
        });
    let uid = v.sr.metadata.uid.clone().unwrap_or_default();
    v.status.next_rotation_at = since
        .and_then(|t| decide::next_rotation_at(v.sr.spec.schedule.as_ref(), t, &uid))
        .map(Time);
    v.status.pending_request = None;
    report_schedule(v).await;
    if !v.has_condition(condition::ROTATING) {
        v.set_condition(
            condition::ROTATING,
            "False",
            "Idle",
            "No rotation in progress",
        );
    }
    v.write_status().await?;
    let wake = v
        .status
        .next_rotation_at
        .as_ref()
        .map(|t| Duration::from_secs_f64(t.0.duration_since(v.now).as_secs_f64().max(1.0)))
        .unwrap_or(Duration::from_secs(600));
    Ok(Action::requeue(wake.min(Duration::from_secs(600))))
}

async fn start(v: &mut View, request: Request) -> Result<Action> {
    let id = new_rotation_id(v.now);
    v.status.rotation = Some(RotationStatus {
        id: id.clone(),
        reason: request.as_str().into(),
        trigger: v.sr.spec.trigger.clone(),
        rotate_request: v.annotations().get(ROTATE_ANNOTATION).cloned(),
        requested_by: requester(v, request),
        requested_at: Some(MicroTime(v.now)),
        phase_started_at: Some(MicroTime(v.now)),
        spec_fingerprint: v.spec_fingerprint(),
        ..Default::default()
    });
    v.status.phase = Some(Phase::Pending);
    v.status.pending_request = None;
    v.set_condition(
        condition::GRACE_WINDOW_AT_RISK,
        "False",
        "NoRotationIssued",
        "No new value issued yet",
    );
    v.set_rotating(&format!("rotation {id} requested ({})", request.as_str()));
    v.write_status().await?;
    announce::started(v, &id, request).await;
    Ok(Action::requeue(v.ctx.poll))
}

/// Who made `request`: `rekey.dev/requested-by`, which the chart's admission
/// policy requires with every request (rotate annotation, `spec.trigger`,
/// creation) to be the requesting user's own name. A schedule has no
/// requester: the annotation then names an earlier request's.
fn requester(v: &View, request: Request) -> Option<String> {
    match request {
        Request::Schedule => None,
        Request::Created | Request::TriggerChanged | Request::OnDemand => v
            .annotations()
            .get(REQUESTED_BY_ANNOTATION)
            .filter(|who| !who.is_empty())
            .cloned(),
    }
}

/// A schedule that can no longer be served says so (condition and a Warning
/// Event when it turns bad), instead of silently never rotating again.
async fn report_schedule(v: &mut View) {
    let Some(schedule) = v.sr.spec.schedule.clone() else {
        return;
    };
    match decide::request::schedule_problem(&schedule) {
        Some(problem) => {
            let message = format!("{problem}: no rotation will be scheduled until it is fixed");
            let was = v
                .written_condition_reason(condition::SCHEDULED)
                .map(str::to_string);
            v.set_condition(condition::SCHEDULED, "False", "InvalidSpec", &message);
            if was.as_deref() != Some("InvalidSpec") {
                warn!(problem, "schedule cannot be served");
                v.event(EventType::Warning, "ScheduleInvalid", message);
            }
        }
        None => {
            let message = match &v.status.next_rotation_at {
                Some(t) => format!("next rotation at {}", t.0),
                None => "the first rotation has not finished yet".to_string(),
            };
            v.set_condition(condition::SCHEDULED, "True", "Scheduled", &message);
        }
    }
}

/// A request that arrives during a rotation is kept (and shown) and served
/// after it: the finished rotation records only what it served.
pub fn note_pending_request(v: &mut View) {
    let rot = v.rotation();
    let served = Served {
        trigger: rot.trigger.as_deref(),
        rotate_request: rot.rotate_request.as_deref(),
        ever_rotated: true,
        known: true,
        next_rotation_at: None,
    };
    let pending = decide::rotation_request(&v.sr.spec, &served, v.annotations(), v.now);
    v.status.pending_request = pending.map(|r| r.as_str().to_string());
}
