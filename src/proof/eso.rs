//! ExternalSecret proof: request a refresh, then compare the synced Secret's
//! data with the new value (never timestamps).

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

use jiff::Timestamp;

use crate::crd::{ExternalSecretProof, KeyMatch};
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::value::SecretValue;

/// ESO re-reads an ExternalSecret when its metadata changes; this is the
/// annotation its documentation uses to force a sync.
pub use crate::crd::keys::FORCE_SYNC_ANNOTATION;

pub fn external_secret_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "external-secrets.io",
        "v1",
        "ExternalSecret",
    ))
}

/// Where one ExternalSecret stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncState {
    /// Ready, and the target Secret's key holds the expected value.
    Synced,
    /// Ready, but the key holds another value (with a short, safe description).
    ReadyWithOtherValue(String),
    /// Not Ready, or the Secret or key is missing (with a short, safe
    /// description).
    Waiting(String),
}

impl SyncState {
    /// What is awaited, unless synced.
    pub fn waiting_for(self) -> Option<String> {
        match self {
            SyncState::Synced => None,
            SyncState::ReadyWithOtherValue(why) | SyncState::Waiting(why) => Some(why),
        }
    }
}

/// Whether the bytes of a synced key hold `value` under `mode`.
pub fn key_holds(key: &[u8], value: &SecretValue, mode: KeyMatch) -> bool {
    let value = value.expose().as_bytes();
    match mode {
        KeyMatch::Exact => key == value,
        KeyMatch::Contains => !value.is_empty() && key.windows(value.len()).any(|w| w == value),
    }
}

pub struct ExternalSecrets {
    api: Api<DynamicObject>,
    secrets: Api<Secret>,
    namespace: String,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
}

impl ExternalSecrets {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced_with(client.clone(), namespace, &external_secret_resource()),
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.into(),
        }
    }

    async fn get(&self, name: &str) -> Result<DynamicObject> {
        self.api
            .get_opt(name)
            .await
            .map_err(|e| Error::kube("read ExternalSecret", e))?
            .ok_or_else(|| {
                Error::permanent(
                    Reason::ExternalSecretNotFound,
                    format!("ExternalSecret {}/{name} not found", self.namespace),
                )
            })
    }

    /// Refuses ExternalSecrets that exist but would ignore a refresh
    /// request, and proof keys that do not hold one of `current` (the values
    /// the targets hold now; nothing to compare when empty).
    pub async fn preflight(
        &self,
        proof: &ExternalSecretProof,
        current: &[SecretValue],
    ) -> Result<()> {
        let es = self.get(&proof.name).await?;
        let policy = str_at(&es.data, &["spec", "refreshPolicy"]).unwrap_or("Periodic");
        let interval = str_at(&es.data, &["spec", "refreshInterval"]).unwrap_or("1h");
        let zero = crate::duration::parse(interval).is_some_and(|d| d.is_zero());
        if policy == "CreatedOnce" || (policy == "Periodic" && zero) {
            return Err(Error::permanent(
                Reason::RefreshNotHonoured,
                format!(
                    "ExternalSecret {}/{} has refreshPolicy {policy} with refreshInterval {interval}: ESO ignores refresh requests, so the sync could never be proven",
                    self.namespace, proof.name
                ),
            ));
        }
        if current.is_empty() {
            return Ok(());
        }
        let target = target_secret(&es, proof);
        let secret = self
            .secrets
            .get_opt(&target)
            .await
            .map_err(|e| Error::kube("read synced Secret", e))?;
        let data = secret.and_then(|s| s.data).unwrap_or_default();
        let Some(key) = data.get(&proof.key) else {
            let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
            keys.truncate(10);
            return Err(Error::permanent(
                Reason::ProofKeyMissing,
                format!(
                    "Secret {target} (synced by ExternalSecret {}) has no key {} (its keys: {}): a target.template may rename it; point proof.externalSecrets[].key at the key that carries the value",
                    proof.name,
                    proof.key,
                    keys.join(", ")
                ),
            ));
        };
        if !current
            .iter()
            .any(|c| key_holds(&key.0, c, proof.match_mode))
        {
            return Err(Error::permanent(
                Reason::ProofKeyMismatch,
                format!(
                    "key {} of Secret {target} (synced by ExternalSecret {}) does not hold the value the targets hold now (match: {:?}): it is fed by another store, or a template changes the value (use match: Contains for a key that embeds it)",
                    proof.key, proof.name, proof.match_mode
                ),
            ));
        }
        Ok(())
    }

    /// When ESO last synced the ExternalSecret (`status.refreshTime`).
    pub async fn synced_at(&self, proof: &ExternalSecretProof) -> Result<Option<Timestamp>> {
        let es = self.get(&proof.name).await?;
        Ok(str_at(&es.data, &["status", "refreshTime"]).and_then(|t| t.parse().ok()))
    }

    /// Asks ESO to sync now (idempotent per token) and reports whether the
    /// ExternalSecret is Ready with its target Secret holding `expected`.
    pub async fn refresh_and_check(
        &self,
        proof: &ExternalSecretProof,
        token: &str,
        expected: &SecretValue,
        synced_after: Option<&str>,
    ) -> Result<SyncState> {
        let es = self.request_refresh(&proof.name, token).await?;
        if let Some(before) = synced_after
            && synced_resource_version(&es) == before
        {
            return Ok(SyncState::Waiting(format!(
                "ExternalSecret {} not synced by ESO since the refresh request",
                proof.name
            )));
        }
        self.state(&es, proof, expected).await
    }

    /// ESO's `status.syncedResourceVersion` (generation and a hash of labels
    /// and annotations at its last sync; empty before the first).
    pub async fn synced_version(&self, proof: &ExternalSecretProof) -> Result<String> {
        Ok(synced_resource_version(&self.get(&proof.name).await?).to_string())
    }

    /// Whether the ExternalSecret is Ready and its Secret holds `expected`,
    /// without requesting a refresh.
    pub async fn check(
        &self,
        proof: &ExternalSecretProof,
        expected: &SecretValue,
    ) -> Result<SyncState> {
        let es = self.get(&proof.name).await?;
        self.state(&es, proof, expected).await
    }

    /// Returns the ExternalSecret as it is after the request.
    async fn request_refresh(&self, name: &str, token: &str) -> Result<DynamicObject> {
        let es = self.get(name).await?;
        if es
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FORCE_SYNC_ANNOTATION))
            .map(String::as_str)
            == Some(token)
        {
            return Ok(es);
        }
        let patch =
            serde_json::json!({"metadata": {"annotations": {FORCE_SYNC_ANNOTATION: token}}});
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Error::kube("annotate ExternalSecret", e))
    }

    /// Whether the ExternalSecret is Ready and its target Secret holds `expected`.
    async fn state(
        &self,
        es: &DynamicObject,
        proof: &ExternalSecretProof,
        expected: &SecretValue,
    ) -> Result<SyncState> {
        let ready = es
            .data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            });
        let target = target_secret(es, proof);
        let secret = self
            .secrets
            .get_opt(&target)
            .await
            .map_err(|e| Error::kube("read synced Secret", e))?;
        let Some(secret) = secret else {
            return Ok(SyncState::Waiting(format!(
                "Secret {target} not created yet"
            )));
        };
        let data = secret.data.unwrap_or_default();
        let Some(key) = data.get(&proof.key) else {
            return Ok(SyncState::Waiting(format!(
                "Secret {target} has no key {}",
                proof.key
            )));
        };
        let holds = key_holds(&key.0, expected, proof.match_mode);
        Ok(match (ready, holds) {
            (true, true) => SyncState::Synced,
            (false, _) => SyncState::Waiting(format!("ExternalSecret {} not Ready", proof.name)),
            (true, false) => SyncState::ReadyWithOtherValue(format!(
                "Secret {target} key {} does not hold the expected value",
                proof.key
            )),
        })
    }
}

/// The name of the Secret ESO writes for `es`.
fn target_secret(es: &DynamicObject, proof: &ExternalSecretProof) -> String {
    str_at(&es.data, &["spec", "target", "name"])
        .unwrap_or(&proof.name)
        .to_string()
}

fn synced_resource_version(es: &DynamicObject) -> &str {
    str_at(&es.data, &["status", "syncedResourceVersion"]).unwrap_or("")
}
