//! Writing: writes the new value to every target (each write recorded in
//! status before it is made), then records the Await-mode baselines.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::super::view::View;
use crate::crd::keys::restart_annotation;
use crate::crd::{TargetStatus, WorkloadBaseline};
use crate::decide::Outcome;
use crate::error::{Error, Result};

pub async fn step(v: &mut View) -> Result<Outcome> {
    let plan = v.plan()?.clone();
    let value = v.new_value().await?;
    let id = v.rotation().id.clone();
    for target in &plan.targets {
        let store = v.store(target).await?;
        if !v.rotation().targets.iter().any(|t| t.name == target.name) {
            // Recorded before the write: a write whose answer is lost is
            // still rolled back.
            v.rotation_mut().targets.push(TargetStatus {
                name: target.name.clone(),
                version: "pending".into(),
                written_at: None,
            });
            v.write_status().await?;
        }
        let version = v
            .act("write", store.write(&value, &id))
            .await
            .map_err(|e| Error {
                message: format!("target {}: {}", target.name, e.message),
                ..e
            })?;
        let now = v.now;
        let rot = v.rotation_mut();
        rot.targets.retain(|t| t.name != target.name);
        rot.targets.push(TargetStatus {
            name: target.name.clone(),
            version,
            written_at: Some(Time(now)),
        });
    }
    if plan.route.nothing_to_prove {
        return Ok(Outcome::Done);
    }
    // Baselines for Await mode, recorded before the refresh request.
    let annotation = restart_annotation(&v.name);
    let mut baselines = vec![];
    for place in &plan.places {
        let workloads = v.proofs(place).await?.rollouts;
        for w in &place.proof.workloads {
            let o = workloads.observe(w, &annotation).await?;
            baselines.push(WorkloadBaseline {
                cluster: place.cluster_name().to_string(),
                kind: w.kind,
                name: w.name.clone(),
                template: o.template.clone(),
            });
        }
    }
    v.rotation_mut().workload_baselines = baselines;
    Ok(Outcome::Done)
}
