//! Proof: ESO synced the new value, and the workloads rolled out on it. Two
//! small traits, so the machine can be driven by in-memory proofs in tests.

pub mod consumers;
pub mod eso;
pub mod remote;
pub mod rollout;

use async_trait::async_trait;
use jiff::Timestamp;

use crate::crd::{ExternalSecretProof, WorkloadRef};
use crate::decide::consumers::{Census, PodUse};
use crate::error::Result;
use crate::value::SecretValue;
use eso::SyncState;
use rollout::Observed;

/// Reads and nudges the ExternalSecrets of one namespace.
#[async_trait]
pub trait SyncProof: Send + Sync {
    /// Refuses an ExternalSecret that is missing or would ignore a refresh
    /// request, and a proof key that does not hold one of `current` (the
    /// values the targets hold now; not compared when empty).
    async fn preflight(&self, proof: &ExternalSecretProof, current: &[SecretValue]) -> Result<()>;
    /// Asks ESO to sync now (idempotent per token) and reports whether the
    /// ExternalSecret is Ready with its target Secret holding `expected` and,
    /// given `synced_after` (a `synced_version` read before the request),
    /// whether ESO itself synced since.
    async fn refresh_and_check(
        &self,
        proof: &ExternalSecretProof,
        token: &str,
        expected: &SecretValue,
        synced_after: Option<&str>,
    ) -> Result<SyncState>;
    /// A marker that changes with every sync ESO makes.
    async fn synced_version(&self, proof: &ExternalSecretProof) -> Result<String>;
    /// When ESO last synced the ExternalSecret (second precision).
    async fn synced_at(&self, proof: &ExternalSecretProof) -> Result<Option<Timestamp>>;
    /// Reads again, without a refresh request: is the ExternalSecret Ready
    /// with its target Secret holding `expected`?
    async fn check(&self, proof: &ExternalSecretProof, expected: &SecretValue)
    -> Result<SyncState>;
}

/// Reads and restarts the workloads of one namespace.
#[async_trait]
pub trait RolloutProof: Send + Sync {
    /// What the workload's status and pod template say now.
    async fn observe(&self, w: &WorkloadRef, annotation: &str) -> Result<Observed>;
    /// Stamps the pod template with `rotation_id`: exactly one rollout.
    async fn restart(&self, w: &WorkloadRef, annotation: &str, rotation_id: &str) -> Result<()>;
    /// When the oldest of the workload's pods (not being deleted) was created.
    async fn oldest_pod(&self, w: &WorkloadRef) -> Result<Option<Timestamp>>;
}

/// Finds the consumers of the value in one namespace.
#[async_trait]
pub trait ConsumerProof: Send + Sync {
    /// What, besides pods, may consume the value carried by the Secrets
    /// `direct` and by the targets of the ExternalSecrets `proven`, read now
    /// (`Census::pods` is left empty).
    async fn census(&self, proven: &[String], direct: &[String]) -> Result<Census>;
    /// Every pod of the namespace that has not finished, with its owner,
    /// read now.
    async fn pods(&self) -> Result<Vec<PodUse>>;
}

#[async_trait]
impl ConsumerProof for consumers::Consumers {
    async fn census(&self, proven: &[String], direct: &[String]) -> Result<Census> {
        consumers::Consumers::census(self, proven, direct).await
    }
    async fn pods(&self) -> Result<Vec<PodUse>> {
        consumers::Consumers::pods(self).await
    }
}

#[async_trait]
impl SyncProof for eso::ExternalSecrets {
    async fn preflight(&self, proof: &ExternalSecretProof, current: &[SecretValue]) -> Result<()> {
        eso::ExternalSecrets::preflight(self, proof, current).await
    }
    async fn refresh_and_check(
        &self,
        proof: &ExternalSecretProof,
        token: &str,
        expected: &SecretValue,
        synced_after: Option<&str>,
    ) -> Result<SyncState> {
        eso::ExternalSecrets::refresh_and_check(self, proof, token, expected, synced_after).await
    }
    async fn synced_version(&self, proof: &ExternalSecretProof) -> Result<String> {
        eso::ExternalSecrets::synced_version(self, proof).await
    }
    async fn synced_at(&self, proof: &ExternalSecretProof) -> Result<Option<Timestamp>> {
        eso::ExternalSecrets::synced_at(self, proof).await
    }
    async fn check(
        &self,
        proof: &ExternalSecretProof,
        expected: &SecretValue,
    ) -> Result<SyncState> {
        eso::ExternalSecrets::check(self, proof, expected).await
    }
}

#[async_trait]
impl RolloutProof for rollout::Workloads {
    async fn observe(&self, w: &WorkloadRef, annotation: &str) -> Result<Observed> {
        rollout::Workloads::observe(self, w, annotation).await
    }
    async fn restart(&self, w: &WorkloadRef, annotation: &str, rotation_id: &str) -> Result<()> {
        rollout::Workloads::restart(self, w, annotation, rotation_id).await
    }
    async fn oldest_pod(&self, w: &WorkloadRef) -> Result<Option<Timestamp>> {
        rollout::Workloads::oldest_pod(self, w).await
    }
}
