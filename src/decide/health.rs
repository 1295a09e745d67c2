//! The kstatus conditions `Ready`, `Reconciling` and `Stalled`, computed
//! from the status alone, so that `kubectl wait`, Flux (kstatus) and Argo CD
//! read the same state the phase machine is in. Pure.
//!
//! - A rotation requested by the spec or by a person (creation, `trigger`,
//!   the `rekey.dev/rotate` annotation) is progress: `Reconciling=True`
//!   (reason: its phase) and `Ready=False` until it ends. A request waiting
//!   for a start slot or for the current rotation counts the same.
//! - A scheduled rotation is not: it changes nothing anyone asked for, and a
//!   health-gated GitOps sync must not block on it. `Ready` keeps the last
//!   result (its message names the scheduled rotation), `Reconciling=False`.
//!   The `Rotating` condition shows every rotation, scheduled or not.
//! - A failed rotation stalls: `Stalled=True` and `Ready=False`, both with the
//!   failure's reason, until a new request starts a rotation.

use crate::crd::keys::{APPROVE_ANNOTATION, CONFIRM_ANNOTATION};
use crate::crd::{Phase, SecretRotationStatus};
use crate::decide::request::Request;

/// One condition's content; the machine stamps time and generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

/// The three kstatus conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub ready: Condition,
    pub reconciling: Condition,
    pub stalled: Condition,
}

fn cond(status: &'static str, reason: &str, message: String) -> Condition {
    Condition {
        status,
        reason: reason.into(),
        message,
    }
}

/// The change requests not yet acted on (`approval.changeRequests`), as
/// `number (environment) state`; None when there are none.
fn waiting_changes(status: &SecretRotationStatus) -> Option<String> {
    let changes: Vec<String> = status
        .rotation
        .as_ref()?
        .changes
        .iter()
        .filter(|c| !c.started)
        .map(|c| format!("{} ({}) {}", c.number, c.environment, c.state))
        .collect();
    (!changes.is_empty()).then(|| changes.join(", "))
}

/// The kstatus conditions for `status`.
pub fn health(status: &SecretRotationStatus) -> Health {
    let scheduled = Request::Schedule.as_str();
    let pending = status
        .pending_request
        .as_deref()
        .filter(|r| *r != scheduled);
    let running = status.rotation.as_ref().map(|r| {
        (
            r.id.as_str(),
            status.phase.unwrap_or(Phase::Pending),
            r.reason == scheduled,
        )
    });
    let last = status.last_rotation.as_ref();

    // What the last finished rotation left: Ready and Stalled at rest.
    let (at_rest, failed) = match last {
        None => (
            cond(
                "True",
                "NotRotated",
                "No rotation has been requested; the current value is in use".into(),
            ),
            None,
        ),
        Some(l) => match (&l.result, &l.failure) {
            (Phase::Failed, f) => {
                let reason = f.as_ref().map_or("Failed", |f| f.reason.as_str());
                let message = match f {
                    Some(f) => format!("Rotation {} failed in {}: {}", l.id, f.phase, f.message),
                    None => format!("Rotation {} failed", l.id),
                };
                (
                    cond("False", reason, message.clone()),
                    Some((reason.to_string(), message)),
                )
            }
            (Phase::DryRunSucceeded, _) => (
                cond(
                    "True",
                    "DryRunSucceeded",
                    format!("Dry run {}: every preflight check passed", l.id),
                ),
                None,
            ),
            _ => (
                cond("True", "Rotated", format!("Rotation {} succeeded", l.id)),
                None,
            ),
        },
    };
    let not_stalled = || cond("False", "Progressing", "The rotation is not stalled".into());
    let idle = || cond("False", "Idle", "No requested rotation in progress".into());

    match (running, pending) {
        // A requested rotation in progress.
        (Some((id, phase, false)), _) => {
            let message = match phase {
                Phase::AwaitingApproval => match waiting_changes(status) {
                    Some(changes) => format!(
                        "Rotation {id} waits for its change requests to be approved and inside their window: {changes}"
                    ),
                    None => format!(
                        "Rotation {id} waits for approval (annotation {APPROVE_ANNOTATION})"
                    ),
                },
                Phase::AwaitingConfirmation => format!(
                    "Rotation {id} waits for confirmation that the old value was invalidated (annotation {CONFIRM_ANNOTATION})"
                ),
                _ => format!("Rotation {id} in progress: {phase}"),
            };
            Health {
                ready: cond("False", phase.as_str(), message.clone()),
                reconciling: cond("True", phase.as_str(), message),
                stalled: not_stalled(),
            }
        }
        // A request waiting for the rotation in progress or for a start slot.
        (running, Some(request)) => {
            let message = match running {
                Some((id, phase, _)) => format!(
                    "Rotation requested ({request}); it starts after scheduled rotation {id} ({phase})"
                ),
                None => format!("Rotation requested ({request}); waiting to start"),
            };
            Health {
                ready: cond("False", "RotationRequested", message.clone()),
                reconciling: cond("True", "RotationRequested", message),
                stalled: not_stalled(),
            }
        }
        // A scheduled rotation: the last result stands.
        (Some((id, phase, true)), None) => {
            let mut ready = at_rest;
            ready.message = format!(
                "{}; scheduled rotation {id} in progress: {phase}",
                ready.message
            );
            Health {
                ready,
                reconciling: cond(
                    "False",
                    "ScheduledRotation",
                    format!(
                        "Scheduled rotation {id} in progress ({phase}); scheduled rotations do not count as progressing"
                    ),
                ),
                stalled: not_stalled(),
            }
        }
        (None, None) => Health {
            ready: at_rest,
            reconciling: idle(),
            stalled: match failed {
                Some((reason, message)) => cond(
                    "True",
                    &reason,
                    format!("{message}. Request a new rotation once the cause is fixed"),
                ),
                None => cond("False", "Idle", "No rotation failed".into()),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Failure, RotationStatus, RotationSummary};

    fn summary(result: Phase, failure: Option<Failure>) -> RotationSummary {
        RotationSummary {
            id: "r0".into(),
            result,
            reason: "Created".into(),
            requested_by: None,
            approved_by: None,
            failure,
            started_at: None,
            finished_at: None,
            duration_seconds: 1.0,
            phases: vec![],
            targets: vec![],
            consumers: vec![],
            proof: vec![],
            rolled_back: false,
            changes: vec![],
            grace_exceeded: false,
        }
    }

    fn running(reason: &str, phase: Phase) -> SecretRotationStatus {
        SecretRotationStatus {
            phase: Some(phase),
            rotation: Some(RotationStatus {
                id: "r1".into(),
                reason: reason.into(),
                ..Default::default()
            }),
            last_rotation: Some(summary(Phase::Succeeded, None)),
            ..Default::default()
        }
    }

    fn statuses(h: &Health) -> (&str, &str, &str) {
        (h.ready.status, h.reconciling.status, h.stalled.status)
    }

    #[test]
    fn a_requested_rotation_is_progress_until_it_ends() {
        for reason in ["Created", "TriggerChanged", "OnDemand"] {
            let h = health(&running(reason, Phase::AwaitingRollout));
            assert_eq!(statuses(&h), ("False", "True", "False"), "{reason}");
            assert_eq!(h.reconciling.reason, "AwaitingRollout");
        }
        let mut done = running("TriggerChanged", Phase::Succeeded);
        done.rotation = None;
        done.last_rotation.as_mut().unwrap().id = "r1".into();
        let h = health(&done);
        assert_eq!(statuses(&h), ("True", "False", "False"));
        assert_eq!(h.ready.message, "Rotation r1 succeeded");
    }

    #[test]
    fn a_scheduled_rotation_keeps_the_last_result_and_is_not_progress() {
        let h = health(&running("Schedule", Phase::AwaitingSync));
        assert_eq!(statuses(&h), ("True", "False", "False"));
        assert_eq!(h.ready.reason, "Rotated");
        assert!(h.ready.message.contains("scheduled rotation r1"));
        // ...but a request that arrives meanwhile is progress at once.
        let mut asked = running("Schedule", Phase::AwaitingSync);
        asked.pending_request = Some("TriggerChanged".into());
        assert_eq!(statuses(&health(&asked)), ("False", "True", "False"));
    }

    #[test]
    fn a_request_waiting_for_a_start_slot_is_progress() {
        let status = SecretRotationStatus {
            phase: Some(Phase::Succeeded),
            pending_request: Some("OnDemand".into()),
            last_rotation: Some(summary(Phase::Succeeded, None)),
            ..Default::default()
        };
        let h = health(&status);
        assert_eq!(statuses(&h), ("False", "True", "False"));
        assert_eq!(h.ready.reason, "RotationRequested");
    }

    #[test]
    fn a_failure_stalls_until_a_new_request() {
        let failure = Failure {
            reason: "SyncTimeout".into(),
            message: "ESO did not sync".into(),
            phase: Phase::AwaitingSync,
        };
        let status = SecretRotationStatus {
            phase: Some(Phase::Failed),
            last_rotation: Some(summary(Phase::Failed, Some(failure))),
            ..Default::default()
        };
        let h = health(&status);
        assert_eq!(statuses(&h), ("False", "False", "True"));
        assert_eq!(
            (h.ready.reason.as_str(), h.stalled.reason.as_str()),
            ("SyncTimeout", "SyncTimeout")
        );
        assert!(
            h.stalled
                .message
                .contains("failed in AwaitingSync: ESO did not sync")
        );
        let mut retried = status.clone();
        retried.rotation = Some(RotationStatus {
            id: "r2".into(),
            reason: "OnDemand".into(),
            ..Default::default()
        });
        retried.phase = Some(Phase::Preflight);
        assert_eq!(statuses(&health(&retried)), ("False", "True", "False"));
    }

    #[test]
    fn never_rotated_and_nothing_requested_is_ready() {
        let h = health(&SecretRotationStatus::default());
        assert_eq!(statuses(&h), ("True", "False", "False"));
        assert_eq!(h.ready.reason, "NotRotated");
    }
}
