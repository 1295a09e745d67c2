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
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::value::SecretValue;

use crate::crd::keys::WRITTEN_BY_ANNOTATION;

pub struct KubernetesSecretStore {
    api: Api<Secret>,
    name: String,
    key: String,
    /// Server-side apply field manager of this target (at most 128 chars).
    manager: String,
    /// Counts writes in `rekey_provider_calls_total` (provider `kubernetes`).
    metrics: Option<Metrics>,
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
        }
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

    async fn preflight(&self) -> Result<()> {
        // The Secret may not exist yet (rekey creates it); the namespace must.
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube("read target Secret", e))?;
        Ok(())
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
