//! One rotation per thing, made atomic: before anything is issued, a
//! rotation takes one coordination.k8s.io Lease per thing it acts on (store
//! entry, ExternalSecret, workload), in its own namespace. Creating a Lease
//! either succeeds or finds the holder, so two rotations can never both pass
//! this gate; the second waits, naming the first. A Lease whose holder's
//! rotation has ended (a crash before the release) is taken over, on the
//! Lease's resourceVersion. Leases are released when the rotation ends.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

use super::view::View;
use crate::crd::SecretRotation;
use crate::crd::keys::CLAIM_LABEL;
use crate::error::{Error, Result};

fn lease_name(claim: &str) -> String {
    format!(
        "rekey-claim-{}",
        crate::fingerprint::fnv1a(claim.as_bytes())
    )
}

/// `name/rotation-id` of the rotation in progress.
fn holder(v: &View) -> String {
    format!("{}/{}", v.name, v.rotation().id)
}

/// Takes every claim of this rotation, or says whom it waits for.
pub async fn acquire(v: &View, claims: &[String]) -> Result<Option<String>> {
    let api: Api<Lease> = Api::namespaced(v.ctx.client.clone(), &v.namespace);
    let me = holder(v);
    for claim in claims {
        let name = lease_name(claim);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(CLAIM_LABEL.to_string(), v.name.clone())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.clone()),
                ..Default::default()
            }),
        };
        let existing = match api.create(&PostParams::default(), &lease).await {
            Ok(_) => continue,
            Err(kube::Error::Api(s)) if s.code == 409 => api
                .get_opt(&name)
                .await
                .map_err(|e| Error::kube("read claim", e))?,
            Err(e) => return Err(Error::kube("create claim", e)),
        };
        let Some(existing) = existing else {
            return Ok(Some(format!("{claim} (claim released meanwhile)")));
        };
        let held_by = existing
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        if held_by == me {
            continue;
        }
        if holder_active(v, &held_by).await? {
            let other = held_by.split('/').next().unwrap_or_default();
            return Ok(Some(format!(
                "waiting for SecretRotation {}/{other}, which also rotates {claim}",
                v.namespace
            )));
        }
        // The holder's rotation has ended: take the claim over, on the
        // resourceVersion read (a race loses with 409 and waits).
        let mut taken = lease.clone();
        taken.metadata.resource_version = existing.metadata.resource_version.clone();
        match api.replace(&name, &PostParams::default(), &taken).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Ok(Some(format!("{claim} (claim changed hands)")));
            }
            Err(e) => return Err(Error::kube("take over claim", e)),
        }
    }
    Ok(None)
}

/// Whether the rotation named `name/rotation-id` is still in progress.
async fn holder_active(v: &View, held_by: &str) -> Result<bool> {
    let Some((name, id)) = held_by.split_once('/') else {
        return Ok(false);
    };
    let api: Api<SecretRotation> = Api::namespaced(v.ctx.client.clone(), &v.namespace);
    let other = api
        .get_opt(name)
        .await
        .map_err(|e| Error::kube("read claiming SecretRotation", e))?;
    Ok(other
        .and_then(|o| o.status)
        .and_then(|s| s.rotation)
        .is_some_and(|r| r.id == id))
}

/// Releases every claim this SecretRotation holds (idempotent).
pub async fn release(v: &View) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(v.ctx.client.clone(), &v.namespace);
    let mine = api
        .list(&ListParams::default().labels(&format!("{CLAIM_LABEL}={}", v.name)))
        .await
        .map_err(|e| Error::kube("list claims", e))?;
    for lease in mine.items {
        let name = lease.metadata.name.unwrap_or_default();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube("release claim", e)),
        }
    }
    Ok(())
}
