//! AwaitingRollout: restarts each workload once per rotation (Trigger) or
//! waits for another restarter (Await), then waits for complete rollouts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::super::view::View;
use crate::crd::RestartMode;
use crate::crd::keys::restart_annotation;
use crate::decide::{self, Outcome};
use crate::error::{Error, Result};
use crate::reason::Reason;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let rot = v.rotation().clone();
    let annotation = restart_annotation(&v.name);
    let mode = v.sr.spec.proof.restart;
    let places = v.plan()?.places.clone();
    let mut waiting = vec![];
    for place in &places {
        let workloads = v.proofs(place).await?.rollouts;
        for w in &place.proof.workloads {
            let o = workloads.observe(w, &annotation).await?;
            let restarted = decide::on_rotation_template(
                mode,
                &rot,
                place.cluster_name(),
                w,
                o.stamped.as_deref(),
                &o.template,
            );
            let kind = format!("{:?}", w.kind);
            let why = if !restarted && mode == RestartMode::Trigger {
                // One stamp per rotation: exactly one rollout.
                v.act("restart", workloads.restart(w, &annotation, &rot.id))
                    .await?;
                Some("restarting".to_string())
            } else if !restarted {
                Some("not restarted yet (restart: Await)".to_string())
            } else if !decide::rollout_complete(&o.facts) {
                Some(format!(
                    "rolling out ({}/{} updated, {} ready, {} available)",
                    o.facts.updated, o.facts.desired, o.facts.ready, o.facts.available
                ))
            } else if mode == RestartMode::Await
                && !decide::started_after_sync(
                    workloads.oldest_pod(w).await?,
                    rot.new_value_synced_at.as_ref().map(|t| t.0),
                )
            {
                // Restarted, but by a change made before the new value was
                // synced (an unrelated deploy): its pods read the old value.
                Some("restarted before the new value was synced; waiting for a restart after it (restart: Await)".to_string())
            } else {
                None
            };
            if let Some(why) = &why {
                waiting.push(place.say(&format!("{kind} {} {why}", w.name)));
            }
            v.set_proof(place, &kind, &w.name, why);
        }
    }
    let mut reason = Reason::RolloutTimeout;
    if waiting.is_empty() {
        // Rolled out, but old pods may still run or terminate.
        for place in &places {
            let left = super::consumers::draining(v, place).await?;
            for c in v.rotation().consumers.clone() {
                if c.cluster == place.cluster_name()
                    && matches!(c.handling.as_str(), "Restarted" | "Await")
                {
                    let old = left
                        .iter()
                        .find(|(r, _)| r.kind == c.kind && r.name == c.name)
                        .map(|(_, n)| {
                            format!("{n} pod(s) that started before the new value was synced still running or terminating")
                        });
                    v.set_proof(place, &c.kind, &c.name, old);
                }
            }
            if let Some(text) = decide::consumers::describe_draining(&left) {
                waiting.push(place.say(&text));
                reason = Reason::DrainTimeout;
            }
        }
    }
    if waiting.is_empty() {
        v.rotation_mut().rolled_out_at = Some(Time(v.now));
        return Ok(Outcome::Done);
    }
    let waiting = waiting.join("; ");
    if v.phase_timed_out() {
        return Err(Error::permanent(
            reason,
            format!(
                "the rollout did not complete within {}: {waiting}",
                v.sr.spec.proof.timeout
            ),
        ));
    }
    Ok(Outcome::Waiting(waiting))
}
