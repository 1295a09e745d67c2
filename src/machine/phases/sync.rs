//! AwaitingSync: records each ExternalSecret's sync marker, requests a
//! refresh (idempotent per rotation id) and waits until ESO itself synced
//! since the request and the Secret holds the new value.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::super::view::View;
use crate::crd::SyncBaseline;
use crate::decide::Outcome;
use crate::error::{Error, Result};
use crate::reason::Reason;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let value = v.new_value().await?;
    let id = v.rotation().id.clone();
    let places = v.plan()?.places.clone();
    let mut waiting = vec![];
    let mut reached = None;
    for place in &places {
        let eso = v.proofs(place).await?.sync;
        let cluster = place.cluster_name();
        // Recorded before the refresh request (a side effect).
        let mut recorded = false;
        for es in &place.proof.external_secrets {
            if !v
                .rotation()
                .sync_baselines
                .iter()
                .any(|b| b.cluster == cluster && b.name == es.name)
            {
                let synced_resource_version = eso.synced_version(es).await?;
                v.rotation_mut().sync_baselines.push(SyncBaseline {
                    cluster: cluster.to_string(),
                    name: es.name.clone(),
                    synced_resource_version,
                });
                recorded = true;
            }
        }
        if recorded {
            v.write_status().await?;
        }
        let mut waiting_here = vec![];
        for es in &place.proof.external_secrets {
            let before = v
                .rotation()
                .sync_baselines
                .iter()
                .find(|b| b.cluster == cluster && b.name == es.name)
                .map(|b| b.synced_resource_version.clone());
            let why = v
                .act(
                    "refresh request",
                    eso.refresh_and_check(es, &id, &value, before.as_deref()),
                )
                .await?
                .waiting_for();
            v.set_proof(place, "ExternalSecret", &es.name, why.clone());
            waiting_here.extend(why.map(|w| place.say(&w)));
        }
        if waiting_here.is_empty() {
            // When the consumers' Secrets got the value: ESO's own sync
            // time (rekey looks only every poll); the slowest cluster counts.
            for es in &place.proof.external_secrets {
                reached = reached.max(eso.synced_at(es).await?);
            }
        }
        waiting.extend(waiting_here);
    }
    if waiting.is_empty() {
        // Or rekey's last write.
        let written = v
            .rotation()
            .targets
            .iter()
            .filter_map(|t| t.written_at.as_ref().map(|w| w.0))
            .max();
        let now = v.now;
        let rot = v.rotation_mut();
        rot.new_value_synced_at = Some(Time(reached.or(written).unwrap_or(now)));
        rot.synced_at = Some(Time(now));
        return Ok(Outcome::Done);
    }
    let waiting = waiting.join("; ");
    if v.phase_timed_out() {
        return Err(Error::permanent(
            Reason::SyncTimeout,
            format!(
                "the new value was not synced within {}: {waiting}",
                v.sr.spec.proof.timeout
            ),
        ));
    }
    Ok(Outcome::Waiting(waiting))
}
