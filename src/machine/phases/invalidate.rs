//! Invalidating and AwaitingConfirmation: re-checks the whole proof right
//! before acting, then invalidates the old value at the source, or waits for
//! a person to confirm they did (manual source).

use super::super::view::View;
use crate::crd::Phase;
use crate::crd::keys::restart_annotation;
use crate::decide::{self, Outcome};
use crate::error::{Error, Result};
use crate::plan::{Place, Plan};
use crate::proof::eso::SyncState;
use crate::reason::Reason;
use crate::source::Invalidation;
use crate::value::SecretValue;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let id = v.rotation().id.clone();
    if v.phase() == Phase::Invalidating && !v.rotation().invalidation_started {
        // Nothing was read again since the proof: read everything now. A
        // difference never moves forward; it waits, then fails safe.
        if let Some(lost) = proof_lost(v).await? {
            if v.phase_timed_out() {
                return Err(Error::permanent(
                    Reason::ProofLost,
                    format!(
                        "the proof no longer held right before invalidation: {lost}; the old value was not invalidated"
                    ),
                ));
            }
            return Ok(Outcome::Waiting(format!(
                "re-checking the proof before invalidating: {lost}"
            )));
        }
        // Recorded before the side effect.
        v.rotation_mut().invalidation_started = true;
        v.write_status().await?;
    }
    let source = v.source()?;
    let distributed = v.new_value().await?;
    let outcome = v
        .act(
            "invalidate",
            source.invalidate(&id, v.annotations(), &distributed),
        )
        .await
        .map_err(|e| Error {
            reason: Reason::InvalidationFailed,
            ..e
        })?;
    Ok(match outcome {
        Invalidation::Done => Outcome::Done,
        Invalidation::NeedsConfirmation => Outcome::NeedsConfirmation,
    })
}

/// The final re-check: every store still holds this rotation's value, every
/// ExternalSecret still delivers it, every workload still runs the proven
/// rollout. Returns what no longer holds.
async fn proof_lost(v: &View) -> Result<Option<String>> {
    let plan = v.plan()?.clone();
    let new = v.new_value().await?;
    let lost = [stores_lost(v, &plan, &new).await?].concat();
    let mut lost = lost;
    // Every cluster again, remote ones too.
    for place in &plan.places {
        lost.extend(syncs_lost(v, place, &new).await?);
        lost.extend(rollouts_lost(v, place).await?);
        lost.extend(consumers_lost(v, &plan, place).await?);
    }
    Ok((!lost.is_empty()).then(|| lost.join("; ")))
}

/// Targets that no longer hold the new value.
async fn stores_lost(v: &View, plan: &Plan, new: &SecretValue) -> Result<Vec<String>> {
    let mut lost = vec![];
    for target in &plan.targets {
        let holds = v
            .store(target)
            .await?
            .read_current()
            .await?
            .is_some_and(|c| c.same_as(new));
        if !holds {
            lost.push(format!(
                "target {} no longer holds the new value",
                target.name
            ));
        }
    }
    Ok(lost)
}

/// ExternalSecrets of `place` that no longer deliver the new value.
async fn syncs_lost(v: &View, place: &Place, new: &SecretValue) -> Result<Vec<String>> {
    let eso = v.proofs(place).await?.sync;
    let mut lost = vec![];
    for es in &place.proof.external_secrets {
        if let SyncState::Waiting(why) = eso.check(es, new).await? {
            lost.push(place.say(&why));
        }
    }
    Ok(lost)
}

/// Workloads of `place` no longer rolled out on the proven template.
async fn rollouts_lost(v: &View, place: &Place) -> Result<Vec<String>> {
    let rot = v.rotation();
    let workloads = v.proofs(place).await?.rollouts;
    let annotation = restart_annotation(&v.name);
    let mut lost = vec![];
    for w in &place.proof.workloads {
        let o = workloads.observe(w, &annotation).await?;
        let on_proven_template = decide::on_rotation_template(
            v.sr.spec.proof.restart,
            rot,
            place.cluster_name(),
            w,
            o.stamped.as_deref(),
            &o.template,
        );
        if !on_proven_template || !decide::rollout_complete(&o.facts) {
            lost.push(place.say(&format!(
                "{:?} {} is no longer rolled out on the new value",
                w.kind, w.name
            )));
        }
    }
    Ok(lost)
}

/// Consumers again: one that appeared since Preflight (a new Deployment, a
/// CronJob that fired) must be covered, and no old pod of a restarted or
/// awaited consumer may be left.
async fn consumers_lost(v: &View, plan: &Plan, place: &Place) -> Result<Vec<String>> {
    let proof = &place.proof;
    let census = super::consumers::census(v, plan, place).await?;
    let uncovered = decide::consumers::uncovered(&census, proof);
    let mut lost = vec![];
    if !uncovered.is_empty() {
        lost.push(place.say(&super::consumers::uncovered_message(&uncovered)));
    }
    if let Some(synced) = v.rotation().new_value_synced_at.as_ref().map(|t| t.0) {
        let left = decide::consumers::draining(&census.pods, proof, synced);
        lost.extend(decide::consumers::describe_draining(&left).map(|t| place.say(&t)));
    }
    Ok(lost)
}
