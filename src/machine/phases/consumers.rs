//! Consumers of the value and the drain proof, for Preflight,
//! AwaitingRollout and the final re-check before invalidation: what to
//! read (`crate::proof::consumers`, or the watch index of `crate::wake`);
//! the verdicts are in `crate::decide::consumers`.

use std::collections::BTreeMap;

use super::super::view::View;
use crate::crd::ConsumerStatus;
use crate::decide;
use crate::error::{Error, Result};
use crate::plan::{Place, Plan, StorePlan};
use crate::reason::Reason;

/// Finds every consumer of the value in the namespace of `place`; refuses
/// one the proof does not cover, and returns how each is covered.
pub async fn covered(v: &View, plan: &Plan, place: &Place) -> Result<Vec<ConsumerStatus>> {
    let proof = &place.proof;
    let census = census(v, plan, place).await?;
    let uncovered = decide::consumers::uncovered(&census, proof);
    if !uncovered.is_empty() {
        return Err(Error::permanent(
            Reason::UncoveredConsumer,
            place.say(&uncovered_message(&uncovered)),
        ));
    }
    Ok(decide::consumers::consumers(&census)
        .into_iter()
        .filter_map(|c| {
            let handling = decide::consumers::coverage(&c, proof)?.as_str().to_string();
            Some(ConsumerStatus {
                cluster: place.cluster_name().to_string(),
                kind: c.kind,
                name: c.name,
                handling,
            })
        })
        .collect())
}

/// The consumers of the value in the namespace of `place`: workloads,
/// CronJobs and ExternalSecrets read now, pods as in `pods_now`.
pub async fn census(v: &View, plan: &Plan, place: &Place) -> Result<decide::consumers::Census> {
    let proven: Vec<String> = place
        .proof
        .external_secrets
        .iter()
        .map(|e| e.name.clone())
        .collect();
    // kubernetesSecret targets live in this cluster.
    let direct: Vec<String> = match place.cluster {
        Some(_) => vec![],
        None => plan
            .targets
            .iter()
            .filter(|t| !t.crosses_namespace(&v.namespace))
            .filter_map(|t| match &t.store {
                StorePlan::KubernetesSecret(k) => Some(k.name.clone()),
                _ => None,
            })
            .collect(),
    };
    let mut census = v
        .proofs(place)
        .await?
        .consumers
        .census(&proven, &direct)
        .await?;
    census.pods = pods_now(v, place).await?;
    Ok(census)
}

/// Every running or terminating pod of the namespace of `place` with its
/// owner: here from the watch index once it has listed everything (it
/// follows the API server within milliseconds), else listed now.
pub async fn pods_now(v: &View, place: &Place) -> Result<Vec<decide::consumers::PodUse>> {
    let indexed = match place.cluster {
        Some(_) => None,
        None => v.ctx.wake.as_ref().and_then(|w| w.pods(&v.namespace)),
    };
    match indexed {
        Some(pods) => Ok(pods),
        None => v.proofs(place).await?.consumers.pods().await,
    }
}

pub fn uncovered_message(uncovered: &[decide::consumers::ConsumerRef]) -> String {
    format!(
        "consumers of the value not covered by the proof: {}. Add each to proof.workloads (rekey restarts it) or to proof.consumers (handling: Await, ReloadsItself, or Accept with a reason)",
        decide::consumers::describe(uncovered)
    )
}

/// The drain proof: per restarted or awaited consumer, how many of its pods
/// started before the new value was synced and still run or terminate
/// (none listed: drained). Pods as in `pods_now`.
pub async fn draining(
    v: &View,
    place: &Place,
) -> Result<BTreeMap<decide::consumers::ConsumerRef, usize>> {
    let Some(synced) = v.rotation().new_value_synced_at.as_ref().map(|t| t.0) else {
        return Ok(BTreeMap::new());
    };
    let pods = pods_now(v, place).await?;
    Ok(decide::consumers::draining(&pods, &place.proof, synced))
}
