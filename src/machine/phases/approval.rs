//! AwaitingApproval: waits for `rekey.dev/approve: <rotation id>`, and
//! records who approved (`rekey.dev/approved-by`, which the chart's admission
//! policy lets name only the approving user, never the requester).

use super::super::view::View;
use crate::crd::keys::{APPROVE_ANNOTATION, APPROVED_BY_ANNOTATION};
use crate::decide::Outcome;

pub fn step(v: &mut View) -> Outcome {
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
