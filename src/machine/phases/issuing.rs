//! Issuing: captures each target's current value (for rollback), obtains the
//! new value from the source once, and keeps both in the write-ahead record.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::super::view::View;
use crate::decide::Outcome;
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::wal::Record;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let plan = v.plan()?.clone();
    let id = v.rotation().id.clone();
    let wal = v.wal();
    if wal.read(&id).await?.is_none() {
        // Capture every target's previous value before anything is written,
        // for onFailure: Rollback.
        let mut previous = BTreeMap::new();
        for target in &plan.targets {
            let current = v.store(target).await?.read_current().await?;
            // A value from another namespace never lands in a Secret of
            // this one (Preflight refuses Rollback for such a target).
            if let Some(value) = current.filter(|_| !target.crosses_namespace(&v.namespace)) {
                previous.insert(target.name.clone(), value);
            }
        }
        let source = v.source()?;
        if v.rotation().issue_marker.is_none() {
            // Recorded before the side effect: a retry knows what it saw.
            let marker = source.prepare_issue().await?;
            let now = v.now;
            let rot = v.rotation_mut();
            rot.issue_marker = Some(marker);
            // The identity provider's grace clock starts with the issue call.
            rot.issued_at.get_or_insert(Time(now));
            v.write_status().await?;
        }
        let marker = v.rotation().issue_marker.clone().unwrap_or_default();
        let earlier_attempt = v.rotation().issue_attempted_at.as_ref().map(|t| t.0);
        if earlier_attempt.is_none() {
            // Recorded before the call: a retry knows this call may commit late.
            let now = v.now;
            v.rotation_mut().issue_attempted_at = Some(Time(now));
            v.write_status().await?;
        }
        let new = v
            .act("issue", source.issue(&id, &marker, earlier_attempt))
            .await?;
        if previous.values().any(|p| p.same_as(&new)) {
            return Err(Error::permanent(
                Reason::NewValueNotNew,
                "the source returned the value a target already holds",
            ));
        }
        let record = Record {
            rotation_id: id.clone(),
            new,
            previous,
        };
        v.act("write-ahead record", wal.write(&v.sr, &record))
            .await?;
    }
    // The old value dies at the smaller of oldValueValidFor and what the
    // source reports now (e.g. Keycloak's rotated-secret lifetime).
    let window = match v.source()?.old_value_lifetime().await? {
        Some(reported) => reported.min(plan.grace_window),
        None => plan.grace_window,
    };
    let now = v.now;
    let rot = v.rotation_mut();
    let issued = rot.issued_at.get_or_insert(Time(now)).0;
    let after = |d: std::time::Duration| {
        jiff::SignedDuration::try_from(d)
            .ok()
            .and_then(|d| issued.checked_add(d).ok())
            .map(Time)
    };
    rot.old_value_valid_until = after(window);
    rot.proof_deadline = after(plan.proof_timeout);
    Ok(Outcome::Done)
}
