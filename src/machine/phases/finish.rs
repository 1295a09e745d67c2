//! The end of a rotation: summary and history, conditions (Ready and
//! Stalled follow from the summary, `decide::health`), then the
//! announcement, then the write-ahead record is deleted.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::warn;

use super::super::view::{View, condition};
use super::super::{announce, claims};
use crate::crd::Phase;
use crate::decide::{self, summary};
use crate::error::Result;
use crate::plan::SourcePlan;

/// How many finished rotations `status.history` keeps.
const HISTORY_LIMIT: usize = 10;

pub async fn run(v: &mut View, result: Phase) -> Result<Action> {
    announce::close_phase(v);
    super::change::close(v, result).await;
    let rot = v.rotation().clone();
    let grace_window = v.plan().map(|p| p.grace_window);
    let summary = match grace_window {
        Ok(window) => summary::summarize(&rot, result, window, v.now),
        // No window to compare with: nothing can be said to exceed it.
        Err(_) => summary::summarize(&rot, result, std::time::Duration::MAX, v.now),
    };
    v.status.history.insert(0, summary.clone());
    v.status.history.truncate(HISTORY_LIMIT);
    v.status.last_rotation = Some(summary.clone());
    v.status.observed_trigger = rot.trigger.clone();
    v.status.observed_rotate_request = rot.rotate_request.clone();
    v.status.next_rotation_at = decide::next_rotation_at(
        v.sr.spec.schedule.as_ref(),
        v.now,
        v.sr.metadata.uid.as_deref().unwrap_or_default(),
    )
    .map(Time);
    v.status.rotation = None;
    v.status.phase = Some(result);
    let event = match (result, &rot.failure) {
        (Phase::Failed, Some(f)) => {
            let old_value_expires = v.source().is_ok_and(|s| s.old_value_expires());
            let kept = match (
                rot.issued_at.is_some(),
                summary.rolled_back,
                old_value_expires,
            ) {
                (false, _, _) => "nothing was issued; the old value stays valid".to_string(),
                (true, true, _) => {
                    "the previous value was written back to every target; the old value stays valid"
                        .to_string()
                }
                // Keycloak keeps the old secret only for its grace window.
                (true, false, true) => format!(
                    "targets left as they are (onFailure: Hold); the identity provider keeps the old value valid only until {}: finish the rollout on the new value before then",
                    rot.old_value_valid_until
                        .as_ref()
                        .map(|t| t.0.to_string())
                        .unwrap_or_else(|| "the end of its grace window".into())
                ),
                (true, false, false) => {
                    "targets left as they are (onFailure: Hold); the old value stays valid"
                        .to_string()
                }
            };
            (
                EventType::Warning,
                "RotationFailed",
                format!(
                    "Rotation {} failed in {}: {} ({}): {kept}",
                    rot.id, f.phase, f.reason, f.message
                ),
            )
        }
        (Phase::DryRunSucceeded, _) => (
            EventType::Normal,
            "DryRunSucceeded",
            format!(
                "Dry run {}: every preflight check passed; nothing was changed",
                rot.id
            ),
        ),
        _ => {
            let versions: Vec<String> = rot
                .targets
                .iter()
                .map(|t| format!("{}={}", t.name, t.version))
                .collect();
            let old_value = v
                .plan()
                .map(|p| old_value_note(&p.source, v.sr.spec.proof.nothing_to_prove))
                .unwrap_or_default();
            (
                EventType::Normal,
                "RotationSucceeded",
                format!(
                    "Rotation {} succeeded in {:.0}s (versions: {}); {old_value}",
                    rot.id,
                    summary.duration_seconds,
                    versions.join(", ")
                ),
            )
        }
    };
    v.set_condition(
        condition::ROTATING,
        "False",
        result.as_str(),
        &format!("Rotation {} ended: {result}", rot.id),
    );
    if !summary.grace_exceeded {
        v.set_condition(
            condition::GRACE_WINDOW_AT_RISK,
            "False",
            "WithinGraceWindow",
            "The last rotation ended within the grace window",
        );
    }
    announce::finishing(&summary);
    v.write_status().await?;
    announce::finished(v, &summary, event).await;
    // No copy of the value lingers. A failed delete is retried by the
    // next rotation, which replaces the record.
    let wal = v.wal();
    if let Err(e) = crate::failpoint::around("delete write-ahead record", wal.delete()).await {
        warn!(error = %e, "could not delete the write-ahead record");
    }
    // A claim left by a failed release is taken over by the next rotation.
    if let Err(e) = crate::failpoint::around("release claims", claims::release(v)).await {
        warn!(error = %e, "could not release the rotation's claims");
    }
    Ok(Action::requeue(v.ctx.poll))
}

/// What became of the old value, true for the source in use.
fn old_value_note(source: &SourcePlan, nothing_to_prove: bool) -> String {
    let invalidated = match source {
        SourcePlan::Generated(_) => {
            "the targets hold the new value; a generated value has no issuer, so nothing was invalidated"
        }
        SourcePlan::Webhook(_) => "the webhook invalidated the old value",
        SourcePlan::Keycloak(_) => "Keycloak's previous client secret was invalidated",
        SourcePlan::Manual(_) => "a person confirmed that the old value was invalidated",
    };
    if nothing_to_prove {
        format!("{invalidated} (proof.nothingToProve: no consumer was proven to run the new value)")
    } else {
        invalidated.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_success_note_never_claims_an_invalidation_a_generated_source_cannot_make() {
        let generated =
            SourcePlan::Generated(serde_json::from_value(serde_json::json!({})).unwrap());
        let note = old_value_note(&generated, false);
        assert!(note.contains("nothing was invalidated"), "{note}");
        assert!(!note.contains("retired"));
        let unproven = old_value_note(&generated, true);
        assert!(unproven.contains("no consumer was proven"), "{unproven}");
    }
}
