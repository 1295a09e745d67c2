//! RollingBack (onFailure: Rollback): restores every target that holds the
//! new value, waits until every ExternalSecret delivers a previous value
//! again, then restarts each workload this rotation restarted onto the new
//! value (restart: Trigger) and waits for those rollouts.

use super::super::view::View;
use crate::crd::RestartMode;
use crate::crd::keys::restart_annotation;
use crate::decide::{self, Outcome};
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
            v.act("restore", store.restore(previous, &rot.id)).await?;
        }
    }
    // Proven when every ExternalSecret is Ready with a previous value in its
    // Secret (with none recorded: any value but the new one). Not Ready is
    // no proof: its Secret may still hold the new value.
    let previous: Vec<_> = record.previous.values().collect();
    let mut waiting = vec![];
    for place in &plan.places {
        let proofs = v.proofs(place).await?;
        let eso = &proofs.sync;
        let mut waiting_here: Vec<String> = vec![];
        for es in &place.proof.external_secrets {
            let state = v
                .act(
                    "rollback refresh request",
                    eso.refresh_and_check(es, &token, &record.new, None),
                )
                .await?;
            match state {
                SyncState::Synced => waiting_here.push(format!(
                    "ExternalSecret {} still delivers the new value",
                    es.name
                )),
                SyncState::Waiting(why) => waiting_here.push(why),
                // Another value: rolled back when it is a previous one (with
                // none recorded, any value but the new one counts).
                SyncState::ReadyWithOtherValue(_) => {
                    let mut restored = previous.is_empty();
                    for p in &previous {
                        if restored {
                            break;
                        }
                        restored = eso.check(es, p).await? == SyncState::Synced;
                    }
                    if !restored {
                        waiting_here.push(format!(
                            "ExternalSecret {} does not deliver a previous value yet",
                            es.name
                        ));
                    }
                }
            }
        }
        // Workloads this rotation restarted onto the new value restart again,
        // once the Secrets hold the previous value (one stamp: one rollout).
        // With restart: Await the restarter reacts to the Secret change itself.
        if waiting_here.is_empty() && v.sr.spec.proof.restart == RestartMode::Trigger {
            let workloads = &proofs.rollouts;
            let annotation = restart_annotation(&v.name);
            for w in &place.proof.workloads {
                let o = workloads.observe(w, &annotation).await?;
                match o.stamped.as_deref() {
                    Some(s) if s == rot.id => {
                        v.act(
                            "rollback restart",
                            workloads.restart(w, &annotation, &token),
                        )
                        .await?;
                        waiting_here.push(format!(
                            "{:?} {} restarting onto the previous value",
                            w.kind, w.name
                        ));
                    }
                    Some(s) if s == token && !decide::rollout_complete(&o.facts) => {
                        waiting_here.push(format!(
                            "{:?} {} rolling back ({}/{} updated, {} ready, {} available)",
                            w.kind,
                            w.name,
                            o.facts.updated,
                            o.facts.desired,
                            o.facts.ready,
                            o.facts.available
                        ));
                    }
                    _ => {}
                }
            }
        }
        waiting.extend(waiting_here.iter().map(|w| place.say(w)));
    }
    if waiting.is_empty() {
        v.rotation_mut().rolled_back = true;
        return Ok(Outcome::Done);
    }
    if v.phase_timed_out() {
        return Err(Error::permanent(
            Reason::RollbackTimeout,
            format!("rollback not proven: {}", waiting.join("; ")),
        ));
    }
    Ok(Outcome::Waiting(waiting.join("; ")))
}
