//! RollingBack (onFailure: Rollback): restores every target that holds the
//! new value and waits until no ExternalSecret delivers the new value.

use super::super::view::View;
use crate::decide::Outcome;
use crate::error::{Error, Result};
use crate::proof::eso::SyncState;
use crate::reason::Reason;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let plan = v.plan()?.clone();
    let rot = v.rotation().clone();
    let token = format!("{}-rollback", rot.id);
    let record = v.wal().read(&rot.id).await?.ok_or_else(|| {
        Error::permanent(
            Reason::WriteAheadRecordMissing,
            "the previous values are gone; nothing to roll back to",
        )
    })?;
    for written in &rot.targets {
        let (Some(target), Some(previous)) = (
            plan.targets.iter().find(|t| t.name == written.name),
            record.previous.get(&written.name),
        ) else {
            continue;
        };
        let store = v.store(target).await?;
        // Only a target that holds the new value has something to undo
        // (a write may have failed, or this is a retry after restoring).
        if store
            .read_current()
            .await?
            .is_some_and(|c| c.same_as(&record.new))
        {
            store.restore(previous, &rot.id).await?;
        }
    }
    // Proven when no ExternalSecret delivers the new value any more (one
    // that never received it has nothing to undo).
    let eso = v.ctx.providers.sync(&v.namespace);
    let mut waiting = vec![];
    for es in &v.sr.spec.proof.external_secrets {
        if eso.refresh_and_check(es, &token, &record.new, None).await? == SyncState::Synced {
            waiting.push(format!(
                "ExternalSecret {} still delivers the new value",
                es.name
            ));
        }
    }
    if waiting.is_empty() {
        v.rotation_mut().rolled_back = true;
        return Ok(Outcome::Done);
    }
    if v.phase_timed_out() {
        return Err(Error::permanent(
            Reason::RollbackTimeout,
            format!("rollback not synced: {}", waiting.join("; ")),
        ));
    }
    Ok(Outcome::Waiting(waiting.join("; ")))
}
