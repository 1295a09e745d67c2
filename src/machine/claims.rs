//! One rotation per thing, made atomic: before anything is issued, a
//! rotation takes one coordination.k8s.io Lease per thing it acts on (store
//! entry, ExternalSecret, workload): in the Secret's own namespace for a
//! Secret (so rotations from two granted namespaces see each other), in its
//! own namespace otherwise. Creating a Lease either succeeds or finds the
//! holder, so two rotations can never both pass this gate; the second waits,
//! naming the first. A Lease whose holder's rotation has ended (a crash
//! before the release) is taken over, on the Lease's resourceVersion.
//! Leases are released when the rotation ends.

use std::collections::BTreeSet;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

use super::view::View;
use crate::crd::SecretRotation;
use crate::crd::keys::CLAIM_LABEL;
use crate::error::{Error, Result};
use crate::plan::{Claim, claims};

fn lease_name(claim: &str) -> String {
    format!(
        "rekey-claim-{}",
        crate::fingerprint::fnv1a(claim.as_bytes())
    )
}

/// The claim label's value for this SecretRotation: a fingerprint of its
/// namespace and name (a label value holds at most 63 characters).
fn owner_label(v: &View) -> String {
    crate::fingerprint::fnv1a(format!("{}/{}", v.namespace, v.name).as_bytes())
}

/// `namespace/name/rotation-id` of the rotation in progress.
fn holder(v: &View) -> String {
    format!("{}/{}/{}", v.namespace, v.name, v.rotation().id)
}

/// Takes every claim of this rotation, or says whom it waits for.
pub async fn acquire(v: &View, claims: &[Claim]) -> Result<Option<String>> {
    let me = holder(v);
    for claim in claims {
        let api: Api<Lease> = Api::namespaced(v.ctx.client.clone(), &claim.namespace);
        let name = lease_name(&claim.what);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(CLAIM_LABEL.to_string(), owner_label(v))].into()),
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
        let what = &claim.what;
        let Some(existing) = existing else {
            return Ok(Some(format!("{what} (claim released meanwhile)")));
        };
        let held_by = existing
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        if held_by == me {
            continue;
        }
        if let Some((ns, other)) = holder_active(v, &claim.namespace, &held_by).await? {
            return Ok(Some(format!(
                "waiting for SecretRotation {ns}/{other}, which also rotates {what}"
            )));
        }
        // The holder's rotation has ended: take the claim over, on the
        // resourceVersion read (a race loses with 409 and waits).
        let mut taken = lease.clone();
        taken.metadata.resource_version = existing.metadata.resource_version.clone();
        match api.replace(&name, &PostParams::default(), &taken).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Ok(Some(format!("{what} (claim changed hands)")));
            }
            Err(e) => return Err(Error::kube("take over claim", e)),
        }
    }
    Ok(None)
}

/// The holder `namespace/name/rotation-id` (or `name/rotation-id`, written
/// by earlier versions in the Lease's namespace), if its rotation is still
/// in progress.
async fn holder_active(
    v: &View,
    lease_namespace: &str,
    held_by: &str,
) -> Result<Option<(String, String)>> {
    let parts: Vec<&str> = held_by.split('/').collect();
    let (ns, name, id) = match parts.as_slice() {
        [ns, name, id] => (*ns, *name, *id),
        [name, id] => (lease_namespace, *name, *id),
        _ => return Ok(None),
    };
    let api: Api<SecretRotation> = Api::namespaced(v.ctx.client.clone(), ns);
    let other = api
        .get_opt(name)
        .await
        .map_err(|e| Error::kube("read claiming SecretRotation", e))?;
    let active = other
        .and_then(|o| o.status)
        .and_then(|s| s.rotation)
        .is_some_and(|r| r.id == id);
    Ok(active.then(|| (ns.to_string(), name.to_string())))
}

/// Releases every claim this SecretRotation holds (idempotent): in its own
/// namespace and in the namespace of each Secret its spec names.
pub async fn release(v: &View) -> Result<()> {
    let namespaces: BTreeSet<String> = claims(&v.sr.spec, &v.namespace)
        .into_iter()
        .map(|c| c.namespace)
        .chain([v.namespace.clone()])
        .collect();
    let mine = format!("{CLAIM_LABEL}={}", owner_label(v));
    for ns in namespaces {
        let api: Api<Lease> = Api::namespaced(v.ctx.client.clone(), &ns);
        let held = api
            .list(&ListParams::default().labels(&mine))
            .await
            .map_err(|e| Error::kube("list claims", e))?;
        for lease in held.items {
            let name = lease.metadata.name.unwrap_or_default();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::kube("release claim", e)),
            }
        }
    }
    Ok(())
}
