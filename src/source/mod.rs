//! Credential sources: where new values come from and where old ones die.

pub mod generated;
pub mod keycloak;
pub mod manual;
pub mod webhook;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::controller::Context;
use crate::crd::SecretRotation;
use crate::error::{Error, Result};
use crate::value::SecretValue;

/// What happened when the old value was to be invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// The old value is invalid now (or there is nothing to invalidate).
    Done,
    /// A person must invalidate it and confirm (manual source).
    NeedsConfirmation,
}

/// A source of credential values, usually an identity provider.
///
/// # Guarantees
/// - `issue` is idempotent per `rotation_id`: a second call for the same
///   rotation returns the same value (or the caller's write-ahead record does),
///   never a second new credential.
/// - `invalidate` is called at most once per rotation by the controller and is
///   itself idempotent per `rotation_id`.
///
/// # Assumptions
/// - Issuing a new value keeps the old one valid for `oldValueValidFor`.
///
/// # Caveats
/// - Errors never carry the provider's response body.
#[async_trait]
pub trait CredentialSource: Send + Sync {
    /// Checks everything that can be checked without changing anything.
    async fn preflight(&self, current: Option<&SecretValue>) -> Result<()>;
    /// Called once per rotation before the first `issue`. What it returns is
    /// recorded in status before `issue` runs and handed to every `issue`
    /// call of the rotation, so a source whose issue call carries no
    /// idempotency key can tell a retry from a first attempt.
    async fn prepare_issue(&self) -> Result<String> {
        Ok(String::new())
    }
    /// Obtains the new value.
    async fn issue(&self, rotation_id: &str, marker: &str) -> Result<SecretValue>;
    /// Whether the identity provider expires the old value on its own timer
    /// (then writing it back on failure would only postpone an outage).
    fn old_value_expires(&self) -> bool {
        false
    }
    /// Proves the new value works, where the provider allows it.
    async fn verify(&self, _value: &SecretValue) -> Result<()> {
        Ok(())
    }
    /// Invalidates the old value.
    async fn invalidate(
        &self,
        rotation_id: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Invalidation>;
}

/// Builds the source of a SecretRotation.
pub fn for_rotation(sr: &SecretRotation, ctx: &Context) -> Result<Box<dyn CredentialSource>> {
    let ns = sr.metadata.namespace.clone().unwrap_or_default();
    let name = sr.metadata.name.clone().unwrap_or_default();
    let c = &sr.spec.credential;
    if let Some(g) = &c.generated {
        return Ok(Box::new(generated::Generated::new(g)));
    }
    if let Some(w) = &c.webhook {
        return Ok(Box::new(webhook::Webhook::new(w, ctx, &ns, &name)));
    }
    if let Some(m) = &c.manual {
        return Ok(Box::new(manual::Manual::new(m, ctx, &ns)));
    }
    if let Some(k) = &c.keycloak {
        return Ok(Box::new(keycloak::Keycloak::new(
            k,
            ctx,
            &ns,
            &sr.spec.old_value_valid_for,
        )));
    }
    Err(Error::permanent("InvalidSpec", "credential sets no source"))
}

/// Reads one key of a Secret in `namespace` as a value.
pub async fn read_secret_key(
    ctx: &Context,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<SecretValue> {
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(ctx.client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| Error::kube("read referenced Secret", e))?
        .ok_or_else(|| {
            Error::permanent(
                "SecretNotFound",
                format!("Secret {namespace}/{name} not found"),
            )
        })?;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| SecretValue::from_bytes(&b.0))
        .filter(|v| !v.expose().is_empty())
        .ok_or_else(|| {
            Error::permanent(
                "SecretKeyMissing",
                format!("Secret {namespace}/{name} has no non-empty key {key}"),
            )
        })
}
