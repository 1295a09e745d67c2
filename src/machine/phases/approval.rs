//! AwaitingApproval: waits for `rekey.dev/approve: <rotation id>`.

use super::super::view::View;
use crate::crd::keys::APPROVE_ANNOTATION;
use crate::decide::Outcome;

pub fn step(v: &View) -> Outcome {
    let id = &v.rotation().id;
    if v.annotations().get(APPROVE_ANNOTATION) == Some(id) {
        Outcome::Done
    } else {
        Outcome::Waiting(format!(
            "waiting for approval: kubectl annotate secretrotation {} {APPROVE_ANNOTATION}={id}",
            v.name
        ))
    }
}
