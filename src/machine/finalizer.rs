//! The finalizer: a SecretRotation deleted mid-rotation (a GitOps prune does
//! exactly that) stays until its rotation has ended, so the old value is
//! never abandoned on the identity provider's timer and the write-ahead
//! record is not collected while it is the only copy of the new value.
//! Deletion when idle is immediate. Workloads are never touched on deletion.

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::view::View;
use crate::crd::SecretRotation;
use crate::crd::keys::FINALIZER;
use crate::error::{Error, Result};

fn has_finalizer(v: &View) -> bool {
    v.sr.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

pub fn deleting(v: &View) -> bool {
    v.sr.metadata.deletion_timestamp.is_some()
}

/// Adds the finalizer (once; a no-op when present).
pub async fn ensure(v: &mut View) -> Result<()> {
    if has_finalizer(v) || deleting(v) {
        return Ok(());
    }
    let mut finalizers = v.sr.metadata.finalizers.clone().unwrap_or_default();
    finalizers.push(FINALIZER.into());
    crate::failpoint::around("add finalizer", patch(v, finalizers)).await
}

/// Removes the finalizer, letting a deletion proceed.
pub async fn release(v: &mut View) -> Result<()> {
    if !has_finalizer(v) {
        return Ok(());
    }
    let finalizers: Vec<String> =
        v.sr.metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
    crate::failpoint::around("remove finalizer", patch(v, finalizers)).await
}

/// A merge patch of the finalizer list, conditional on the resourceVersion
/// read, so another writer's finalizer is never lost (a conflict retries).
async fn patch(v: &mut View, finalizers: Vec<String>) -> Result<()> {
    let api: Api<SecretRotation> = Api::namespaced(v.ctx.client.clone(), &v.namespace);
    let body = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": v.sr.metadata.resource_version,
    }});
    let updated = api
        .patch(&v.name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map_err(|e| Error::kube("update finalizers", e))?;
    v.resource_version = updated.metadata.resource_version;
    Ok(())
}
