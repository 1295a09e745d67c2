//! `kubernetesSecret` target: a key in a Kubernetes Secret (e.g. one that
//! ESO's kubernetes provider reads).

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::Store;
use crate::crd::KubernetesSecretTarget;
use crate::crd::keys::{
    ALLOW_ROTATION_FROM_ANNOTATION, ESO_DATA_HASH_ANNOTATION, WRITTEN_BY_ANNOTATION,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::value::SecretValue;

pub struct KubernetesSecretStore {
    api: Api<Secret>,
    name: String,
    key: String,
    /// Server-side apply field manager of this target (at most 128 chars).
    manager: String,
    /// Counts writes in `rekey_provider_calls_total` (provider `kubernetes`).
    metrics: Option<Metrics>,
    /// Where the Secret lives, and where the SecretRotation lives.
    namespace: String,
    home_namespace: String,
    adopt_existing: bool,
}

impl KubernetesSecretStore {
    pub fn new(
        client: Client,
        t: &KubernetesSecretTarget,
        default_namespace: &str,
        manager: &str,
    ) -> Self {
        let ns = t.namespace.as_deref().unwrap_or(default_namespace);
        Self {
            api: Api::namespaced(client, ns),
            name: t.name.clone(),
            key: t.key.clone(),
            manager: manager.chars().take(128).collect(),
            metrics: None,
            namespace: ns.to_string(),
            home_namespace: default_namespace.to_string(),
            adopt_existing: t.adopt_existing,
        }
    }

    /// Why rekey may not write this Secret, if it may not.
    fn refusal(&self, existing: Option<&Secret>) -> Option<Error> {
        takeover_refusal(
            existing,
            &self.namespace,
            &self.name,
            &self.home_namespace,
            self.adopt_existing,
        )
    }

    /// Counts this store's writes in the provider-call metrics.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn version(s: &Secret) -> String {
        s.metadata.resource_version.clone().unwrap_or_default()
    }
}

#[async_trait]
impl Store for KubernetesSecretStore {
    async fn read_current(&self) -> Result<Option<SecretValue>> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube("read target Secret", e))?;
        Ok(secret
            .and_then(|s| s.data)
            .and_then(|d| d.get(&self.key).and_then(|b| SecretValue::from_bytes(&b.0))))
    }

    async fn write(&self, value: &SecretValue, rotation_id: &str) -> Result<String> {
        let started = std::time::Instant::now();
        let result = self.apply(value, rotation_id).await;
        if let Some(m) = &self.metrics {
            m.provider_call(
                "kubernetes",
                "write",
                crate::deps::outcome(result.is_ok()),
                started.elapsed(),
            );
        }
        result
    }

    async fn preflight(&self) -> Result<Option<SecretValue>> {
        // The Secret may not exist yet (rekey creates it); the namespace must.
        let existing = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube("read target Secret", e))?;
        if let Some(e) = self.refusal(existing.as_ref()) {
            return Err(e);
        }
        // A dry-run apply answers what the write will meet, before anything
        // is issued: RBAC, an admission policy, a quota.
        let probe = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(&self.manager).dry_run(),
                &Patch::Apply(&probe),
            )
            .await
            .map_err(|e| Error::kube("dry-run write of target Secret", e))?;
        Ok(existing
            .and_then(|s| s.data)
            .and_then(|d| d.get(&self.key).and_then(|b| SecretValue::from_bytes(&b.0))))
    }
}

impl KubernetesSecretStore {
    /// Server-side applies the value, unless this rotation wrote it already.
    async fn apply(&self, value: &SecretValue, rotation_id: &str) -> Result<String> {
        if let Some(existing) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube("read target Secret", e))?
        {
            let tagged = existing
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(WRITTEN_BY_ANNOTATION));
            let current = existing
                .data
                .as_ref()
                .and_then(|d| d.get(&self.key))
                .map(|b| b.0.as_slice());
            if tagged.map(String::as_str) == Some(rotation_id)
                && current == Some(value.expose().as_bytes())
            {
                return Ok(Self::version(&existing));
            }
            // Checked again at the write: the Secret may have changed hands
            // since Preflight.
            if let Some(e) = self.refusal(Some(&existing)) {
                return Err(e);
            }
        } else if let Some(e) = self.refusal(None) {
            return Err(e);
        }
        let patch = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                annotations: Some(BTreeMap::from([(
                    WRITTEN_BY_ANNOTATION.to_string(),
                    rotation_id.to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                self.key.clone(),
                ByteString(value.expose().as_bytes().to_vec()),
            )])),
            ..Default::default()
        };
        // A typed Secret serializes its apiVersion and kind, as apply needs.
        let written = self
            .api
            .patch(
                &self.name,
                &PatchParams::apply(&self.manager).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|e| Error::kube("write target Secret", e))?;
        Ok(Self::version(&written))
    }
}

/// The tenancy and ownership rules of a `kubernetesSecret` target (pure):
/// - another namespace only with a grant on the Secret itself;
/// - never a Secret another controller owns or ESO writes;
/// - an existing Secret rekey did not create only with `adoptExisting`.
pub fn takeover_refusal(
    existing: Option<&Secret>,
    namespace: &str,
    name: &str,
    home_namespace: &str,
    adopt_existing: bool,
) -> Option<Error> {
    let annotations = existing.and_then(|s| s.metadata.annotations.as_ref());
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    if namespace != home_namespace {
        let granted = annotation(ALLOW_ROTATION_FROM_ANNOTATION)
            .is_some_and(|v| v.split(',').any(|n| n.trim() == home_namespace));
        if !granted {
            return Some(Error::permanent(
                Reason::TargetNamespaceNotGranted,
                format!(
                    "Secret {namespace}/{name} is in another namespace and does not carry {ALLOW_ROTATION_FROM_ANNOTATION}: {home_namespace}"
                ),
            ));
        }
    }
    let existing = existing?;
    let owned = existing
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| !o.is_empty());
    if owned || annotation(ESO_DATA_HASH_ANNOTATION).is_some() {
        return Some(Error::permanent(
            Reason::TargetSecretManaged,
            format!(
                "Secret {namespace}/{name} is managed by another controller (owner reference or ESO): rekey would fight it"
            ),
        ));
    }
    if annotation(WRITTEN_BY_ANNOTATION).is_none() && !adopt_existing {
        return Some(Error::permanent(
            Reason::TargetSecretNotAdopted,
            format!(
                "Secret {namespace}/{name} exists and was not created by rekey: set adoptExisting: true on the target to let rekey overwrite it"
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(annotations: &[(&str, &str)], owned: bool) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "s",
                "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
                "ownerReferences": if owned {
                    serde_json::json!([{"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret", "name": "x", "uid": "u"}])
                } else {
                    serde_json::json!([])
                },
            }
        }))
        .unwrap()
    }

    fn reason(e: Option<Error>) -> Option<Reason> {
        e.map(|e| e.reason)
    }

    #[test]
    fn a_new_secret_in_the_own_namespace_is_fine() {
        assert!(takeover_refusal(None, "a", "s", "a", false).is_none());
    }

    #[test]
    fn existing_secrets_need_adoption_and_managed_ones_are_refused() {
        let plain = secret(&[], false);
        assert_eq!(
            reason(takeover_refusal(Some(&plain), "a", "s", "a", false)),
            Some(Reason::TargetSecretNotAdopted)
        );
        assert!(takeover_refusal(Some(&plain), "a", "s", "a", true).is_none());
        let ours = secret(&[(WRITTEN_BY_ANNOTATION, "r1")], false);
        assert!(takeover_refusal(Some(&ours), "a", "s", "a", false).is_none());
        for managed in [
            secret(&[], true),
            secret(&[(ESO_DATA_HASH_ANNOTATION, "h")], false),
        ] {
            assert_eq!(
                reason(takeover_refusal(Some(&managed), "a", "s", "a", true)),
                Some(Reason::TargetSecretManaged)
            );
        }
    }

    #[test]
    fn another_namespace_needs_a_grant_made_there() {
        assert_eq!(
            reason(takeover_refusal(None, "b", "s", "a", true)),
            Some(Reason::TargetNamespaceNotGranted)
        );
        let other = secret(&[(ALLOW_ROTATION_FROM_ANNOTATION, "c, d")], false);
        assert_eq!(
            reason(takeover_refusal(Some(&other), "b", "s", "a", true)),
            Some(Reason::TargetNamespaceNotGranted)
        );
        let granted = secret(&[(ALLOW_ROTATION_FROM_ANNOTATION, "c, a")], false);
        assert!(takeover_refusal(Some(&granted), "b", "s", "a", true).is_none());
        assert_eq!(
            reason(takeover_refusal(Some(&granted), "b", "s", "a", false)),
            Some(Reason::TargetSecretNotAdopted)
        );
    }
}
