//! The seam where the machine gets its sources, stores and proofs. The real
//! set talks to identity providers, Secrets Managers, ESO and workloads; a
//! test can hand the machine in-memory ones that record every call.

use std::sync::Arc;

use async_trait::async_trait;

use crate::change::ChangeSystem;
use crate::crd::ChangeRequests;
use crate::crd::RemoteCluster;
use crate::deps::Deps;
use crate::error::Result;
use crate::plan::{SourcePlan, TargetPlan};
use crate::proof::consumers::Consumers;
use crate::proof::eso::ExternalSecrets;
use crate::proof::remote::{InCluster, in_cluster};
use crate::proof::rollout::Workloads;
use crate::proof::{ConsumerProof, RolloutProof, SyncProof};
use crate::source::{self, CredentialSource};
use crate::store::{self, Store};

/// Builds what one rotation acts on.
#[async_trait]
pub trait Providers: Send + Sync {
    /// The source a plan names. `name` is the SecretRotation's.
    fn source(
        &self,
        plan: &SourcePlan,
        namespace: &str,
        name: &str,
        old_value_valid_for: &str,
    ) -> Box<dyn CredentialSource>;
    /// The store of a target (may read its credentials from Secrets).
    async fn store(
        &self,
        target: &TargetPlan,
        namespace: &str,
        rotation: &str,
    ) -> Result<Box<dyn Store>>;
    /// The ExternalSecrets of a namespace.
    fn sync(&self, namespace: &str) -> Arc<dyn SyncProof>;
    /// The workloads of a namespace.
    fn rollouts(&self, namespace: &str) -> Arc<dyn RolloutProof>;
    /// The consumers of a namespace.
    fn consumers(&self, namespace: &str) -> Arc<dyn ConsumerProof>;
    /// The proofs of a remote cluster of `proof.clusters`, reached with the
    /// kubeconfig its Secret (in `namespace`) holds.
    async fn remote(&self, namespace: &str, cluster: &RemoteCluster) -> Result<Proofs>;
    /// The change system of `approval.changeRequests`.
    fn changes(&self, config: &ChangeRequests, namespace: &str) -> Box<dyn ChangeSystem>;
}

/// What proves the value in one cluster.
#[derive(Clone)]
pub struct Proofs {
    pub sync: Arc<dyn SyncProof>,
    pub rollouts: Arc<dyn RolloutProof>,
    pub consumers: Arc<dyn ConsumerProof>,
    /// A remote cluster's API server (checked against `--allowed-hosts`).
    pub server: Option<String>,
}

/// The providers of a running operator.
pub struct RealProviders {
    pub deps: Deps,
}

#[async_trait]
impl Providers for RealProviders {
    fn source(
        &self,
        plan: &SourcePlan,
        namespace: &str,
        name: &str,
        old_value_valid_for: &str,
    ) -> Box<dyn CredentialSource> {
        source::build(plan, &self.deps, namespace, name, old_value_valid_for)
    }

    async fn store(
        &self,
        target: &TargetPlan,
        namespace: &str,
        rotation: &str,
    ) -> Result<Box<dyn Store>> {
        store::build(target, &self.deps, namespace, rotation).await
    }

    fn sync(&self, namespace: &str) -> Arc<dyn SyncProof> {
        Arc::new(ExternalSecrets::new(self.deps.client.clone(), namespace))
    }

    fn rollouts(&self, namespace: &str) -> Arc<dyn RolloutProof> {
        Arc::new(Workloads::new(self.deps.client.clone(), namespace))
    }

    fn consumers(&self, namespace: &str) -> Arc<dyn ConsumerProof> {
        Arc::new(Consumers::new(self.deps.client.clone(), namespace))
    }

    async fn remote(&self, namespace: &str, cluster: &RemoteCluster) -> Result<Proofs> {
        let r = &cluster.kube_config.secret_ref;
        let kubeconfig = self
            .deps
            .secret_key(namespace, &r.name, &r.key)
            .await
            .map_err(|e| in_cluster(&cluster.name, e))?;
        let remote = self
            .deps
            .remotes
            .connect(namespace, cluster, &kubeconfig)
            .await?;
        let (client, ns) = (remote.client, remote.namespace.as_str());
        Ok(Proofs {
            sync: Arc::new(InCluster {
                inner: ExternalSecrets::new(client.clone(), ns),
                cluster: cluster.name.clone(),
            }),
            rollouts: Arc::new(InCluster {
                inner: Workloads::new(client.clone(), ns),
                cluster: cluster.name.clone(),
            }),
            consumers: Arc::new(InCluster {
                inner: Consumers::new(client, ns),
                cluster: cluster.name.clone(),
            }),
            server: Some(remote.server),
        })
    }

    fn changes(&self, config: &ChangeRequests, namespace: &str) -> Box<dyn ChangeSystem> {
        crate::change::build(config, &self.deps, namespace)
    }
}
