//! AwaitingApproval: first the change requests (`approval.changeRequests`,
//! see `change::gate`), then, when `approval.required`, waits for
//! `rekey.dev/approve: <rotation id>`, and records who approved
//! (`rekey.dev/approved-by`, which the chart's admission policy lets name
//! only the approving user, never the requester).

use super::super::view::View;
use crate::crd::keys::{APPROVE_ANNOTATION, APPROVED_BY_ANNOTATION};
use crate::decide::Outcome;
use crate::error::Result;

pub async fn step(v: &mut View) -> Result<Outcome> {
    if let Some(waiting) = super::change::gate(v).await? {
        return Ok(waiting);
    }
    if !v.sr.spec.approval.as_ref().is_some_and(|a| a.required) {
        // Approved by the change requests alone.
        let changes: Vec<String> = v
            .rotation()
            .changes
            .iter()
            .map(|c| format!("{} ({})", c.number, c.environment))
            .collect();
        v.rotation_mut().approved_by = Some(format!("change requests {}", changes.join(", ")));
        return Ok(Outcome::Done);
    }
    Ok(annotation(v))
}

fn annotation(v: &mut View) -> Outcome {
    let id = v.rotation().id.clone();
    if v.annotations().get(APPROVE_ANNOTATION) == Some(&id) {
        let by = v
            .annotations()
            .get(APPROVED_BY_ANNOTATION)
            .filter(|who| !who.is_empty())
            .cloned();
        v.rotation_mut().approved_by = by;
        Outcome::Done
    } else {
        Outcome::Waiting(format!(
            "waiting for approval by someone allowed to approve other than the requester: kubectl rekey approve {} (sets {APPROVE_ANNOTATION}={id} and {APPROVED_BY_ANNOTATION})",
            v.name
        ))
    }
}
