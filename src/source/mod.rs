//! Credential sources: where new values come from and where old ones die.

pub mod generated;
pub mod keycloak;
pub mod manual;
pub mod webhook;

use std::collections::BTreeMap;

use async_trait::async_trait;
use jiff::Timestamp;

use crate::deps::Deps;
use crate::error::Result;
use crate::plan::SourcePlan;
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
    /// Obtains the new value. `earlier_attempt`: when an earlier `issue` call
    /// of this rotation started (recorded in status before it ran), whose
    /// answer was lost; None on the first attempt.
    async fn issue(
        &self,
        rotation_id: &str,
        marker: &str,
        earlier_attempt: Option<Timestamp>,
    ) -> Result<SecretValue>;
    /// Whether the identity provider expires the old value on its own timer
    /// (then writing it back on failure would only postpone an outage).
    fn old_value_expires(&self) -> bool {
        false
    }
    /// How long the identity provider keeps the old value valid after an
    /// issue, where it says (read again right after issuing).
    async fn old_value_lifetime(&self) -> Result<Option<std::time::Duration>> {
        Ok(None)
    }
    /// Proves the new value works, where the provider allows it.
    async fn verify(&self, _value: &SecretValue) -> Result<()> {
        Ok(())
    }
    /// Invalidates the old value. `distributed` is the new value the stores
    /// hold (a source may check that it is still the live one).
    async fn invalidate(
        &self,
        rotation_id: &str,
        annotations: &BTreeMap<String, String>,
        distributed: &SecretValue,
    ) -> Result<Invalidation>;
}

/// Builds the source a plan names. `name` is the SecretRotation's.
pub fn build(
    plan: &SourcePlan,
    deps: &Deps,
    namespace: &str,
    name: &str,
    old_value_valid_for: &str,
) -> Box<dyn CredentialSource> {
    match plan {
        SourcePlan::Generated(g) => Box::new(generated::Generated::new(g)),
        SourcePlan::Webhook(w) => Box::new(webhook::Webhook::new(w, deps, namespace, name)),
        SourcePlan::Manual(m) => Box::new(manual::Manual::new(m, deps, namespace)),
        SourcePlan::Keycloak(k) => Box::new(keycloak::Keycloak::new(
            k,
            deps,
            namespace,
            old_value_valid_for,
        )),
    }
}
