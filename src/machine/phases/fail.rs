//! A permanent error: record the failure, then roll back or end Failed, as
//! `decide::after_failure` says.

use kube::runtime::controller::Action;
use tracing::warn;

use super::super::announce;
use super::super::view::View;
use crate::crd::{Failure, FailurePolicy, Phase};
use crate::decide::{self, AfterFailure, FailureFacts};
use crate::error::{Error, Result};
use crate::reason::Reason;

pub async fn run(v: &mut View, err: Error) -> Result<Action> {
    let phase = v.phase();
    warn!(rotation = %v.rotation().id, reason = err.reason.as_str(), error = %err.message, "rotation failing");
    let after = decide::after_failure(FailureFacts {
        phase,
        reason: err.reason,
        // A person's rollback request follows onFailure: Rollback's rules.
        policy: match err.reason {
            Reason::RollbackRequested => FailurePolicy::Rollback,
            _ => v.sr.spec.on_failure,
        },
        targets_written: !v.rotation().targets.is_empty(),
        issued: v.rotation().issued_at.is_some(),
        old_value_expires: v.source().is_ok_and(|s| s.old_value_expires()),
    });
    let note = match after {
        AfterFailure::Hold {
            rollback_refused: true,
        } => {
            "; onFailure Rollback not applied: the identity provider expires the old value at the end of its grace window, the new value stays in the stores"
        }
        _ => "",
    };
    if phase == Phase::RollingBack {
        let f = v.rotation_mut().failure.get_or_insert(Failure {
            reason: err.reason.as_str().into(),
            message: String::new(),
            phase,
        });
        f.message = format!("{}; rollback failed: {}", f.message, err.message);
    } else {
        v.rotation_mut().failure = Some(Failure {
            reason: err.reason.as_str().into(),
            message: format!("{}{note}", err.message),
            phase,
        });
    }
    match after {
        AfterFailure::RollBack => announce::advance(v, Phase::RollingBack).await,
        AfterFailure::Hold { .. } => super::finish::run(v, Phase::Failed).await,
    }
}
