//! The proofs of a remote cluster: the same readers, with every error
//! naming the cluster, and a failed connection (or a rejected credential)
//! turned into `ClusterUnreachable`, which holds the rotation until
//! `proof.timeout` and never counts as proven.

use async_trait::async_trait;
use jiff::Timestamp;

use super::eso::SyncState;
use super::rollout::Observed;
use super::{ConsumerProof, RolloutProof, SyncProof};
use crate::crd::{ExternalSecretProof, WorkloadRef};
use crate::decide::consumers::{Census, PodUse};
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::value::SecretValue;

/// `inner`, reading in the remote cluster `cluster`.
pub struct InCluster<T> {
    pub inner: T,
    pub cluster: String,
}

/// An error of a call into `cluster`, named by it.
pub fn in_cluster(cluster: &str, e: Error) -> Error {
    let unreachable = e.reason == Reason::KubernetesApiError && !e.permanent;
    Error {
        reason: if unreachable {
            Reason::ClusterUnreachable
        } else {
            e.reason
        },
        message: format!("cluster {cluster}: {}", e.message),
        permanent: e.permanent,
    }
}

impl<T> InCluster<T> {
    fn named<V>(&self, r: Result<V>) -> Result<V> {
        r.map_err(|e| in_cluster(&self.cluster, e))
    }
}

#[async_trait]
impl<T: SyncProof> SyncProof for InCluster<T> {
    async fn preflight(&self, proof: &ExternalSecretProof, current: &[SecretValue]) -> Result<()> {
        self.named(self.inner.preflight(proof, current).await)
    }
    async fn refresh_and_check(
        &self,
        proof: &ExternalSecretProof,
        token: &str,
        expected: &SecretValue,
        synced_after: Option<&str>,
    ) -> Result<SyncState> {
        let r = self
            .inner
            .refresh_and_check(proof, token, expected, synced_after)
            .await;
        self.named(r)
    }
    async fn synced_version(&self, proof: &ExternalSecretProof) -> Result<String> {
        self.named(self.inner.synced_version(proof).await)
    }
    async fn synced_at(&self, proof: &ExternalSecretProof) -> Result<Option<Timestamp>> {
        self.named(self.inner.synced_at(proof).await)
    }
    async fn check(
        &self,
        proof: &ExternalSecretProof,
        expected: &SecretValue,
    ) -> Result<SyncState> {
        self.named(self.inner.check(proof, expected).await)
    }
}

#[async_trait]
impl<T: RolloutProof> RolloutProof for InCluster<T> {
    async fn observe(&self, w: &WorkloadRef, annotation: &str) -> Result<Observed> {
        self.named(self.inner.observe(w, annotation).await)
    }
    async fn restart(&self, w: &WorkloadRef, annotation: &str, rotation_id: &str) -> Result<()> {
        self.named(self.inner.restart(w, annotation, rotation_id).await)
    }
    async fn oldest_pod(&self, w: &WorkloadRef) -> Result<Option<Timestamp>> {
        self.named(self.inner.oldest_pod(w).await)
    }
}

#[async_trait]
impl<T: ConsumerProof> ConsumerProof for InCluster<T> {
    async fn census(&self, proven: &[String], direct: &[String]) -> Result<Census> {
        self.named(self.inner.census(proven, direct).await)
    }
    async fn pods(&self) -> Result<Vec<PodUse>> {
        self.named(self.inner.pods().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_connection_holds_and_names_the_cluster() {
        let e = in_cluster(
            "stage",
            Error::transient(
                Reason::KubernetesApiError,
                "read ExternalSecret: connection refused",
            ),
        );
        assert_eq!(e.reason, Reason::ClusterUnreachable);
        assert!(!e.permanent);
        assert!(e.message.starts_with("cluster stage: "), "{}", e.message);
    }

    #[test]
    fn a_missing_object_stays_what_it_is() {
        let e = in_cluster(
            "stage",
            Error::permanent(
                Reason::ExternalSecretNotFound,
                "ExternalSecret app not found",
            ),
        );
        assert_eq!(e.reason, Reason::ExternalSecretNotFound);
        assert!(e.permanent);
        assert_eq!(e.message, "cluster stage: ExternalSecret app not found");
    }
}
