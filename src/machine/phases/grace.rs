//! Grace-aware: warns once (Event + condition) when proof is late relative
//! to the identity provider's grace window.

use kube::runtime::events::EventType;
use tracing::warn;

use super::super::view::{View, condition};
use crate::crd::Phase;
use crate::decide::{self, Grace};
use crate::error::Result;

pub async fn watch(v: &mut View) -> Result<()> {
    let Some(issued) = v.rotation().issued_at.as_ref().map(|t| t.0) else {
        return Ok(());
    };
    let Ok(window) = v.plan().map(|p| p.grace_window) else {
        return Ok(());
    };
    v.ctx
        .metrics
        .grace_seconds_left
        .get_or_create(&v.labels())
        .set(decide::grace_left(issued, window, v.now));
    v.ctx
        .metrics
        .grace_window
        .get_or_create(&v.labels())
        .set(window.as_secs_f64());
    let state = decide::grace(issued, window, v.now);
    if state == Grace::Ok || matches!(v.phase(), Phase::Invalidating | Phase::AwaitingConfirmation)
    {
        return Ok(());
    }
    let (reason, msg) = match state {
        Grace::Exceeded => (
            "GraceWindowExceeded",
            "the old value's grace window has ended before proof: it may already be invalid at the identity provider",
        ),
        _ => (
            "GraceWindowAtRisk",
            "less than 20% of the old value's grace window is left and the proof is not complete",
        ),
    };
    let id = v.rotation().id.clone();
    let message = format!(
        "Rotation {id} in {}: {msg} (oldValueValidFor {})",
        v.phase(),
        v.sr.spec.old_value_valid_for
    );
    v.set_condition(condition::GRACE_WINDOW_AT_RISK, "True", reason, &message);
    let warned = v.rotation().grace_warned;
    if !warned
        || state == Grace::Exceeded
            && v.written_condition_reason(condition::GRACE_WINDOW_AT_RISK) != Some(reason)
    {
        v.rotation_mut().grace_warned = true;
        // The condition is recorded before the Event announces it.
        v.write_status().await?;
        warn!(rotation = %id, reason, "grace window at risk");
        v.event(EventType::Warning, reason, message);
    }
    Ok(())
}
