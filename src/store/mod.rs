//! Stores: where the new value is written (one per target).

pub mod kubernetes;

use async_trait::async_trait;

use crate::crd::Target;
use crate::error::{Error, Result};
use crate::value::SecretValue;

/// A place that holds the current value of a credential, e.g. a Secrets
/// Manager instance or a Kubernetes Secret that ESO reads.
///
/// # Guarantees
/// - `write` is idempotent per `rotation_id`: calling it again after a crash
///   (with the same value and id) creates no second version and returns the
///   version written the first time.
/// - After `write` returns, `read_current` returns the written value.
///
/// # Assumptions
/// - Nothing else writes the same store entry during a rotation.
///
/// # Caveats
/// - Errors never carry the store's response body (it may echo the value).
#[async_trait]
pub trait Store: Send + Sync {
    /// The value the store holds now, if any.
    async fn read_current(&self) -> Result<Option<SecretValue>>;
    /// Makes `value` the current value, tagged with `rotation_id`; returns the
    /// store's version id.
    async fn write(&self, value: &SecretValue, rotation_id: &str) -> Result<String>;
    /// Checks that the store answers and the credentials work, without writing.
    async fn preflight(&self) -> Result<()>;
}

/// Builds the store of a target.
pub fn for_target(
    target: &Target,
    ctx: &crate::controller::Context,
    namespace: &str,
) -> Result<Box<dyn Store>> {
    if let Some(k) = &target.kubernetes_secret {
        return Ok(Box::new(kubernetes::KubernetesSecretStore::new(
            ctx.client.clone(),
            k,
            namespace,
        )));
    }
    Err(Error::permanent(
        "InvalidSpec",
        format!("target {} sets no store", target.name),
    ))
}
