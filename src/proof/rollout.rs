//! Rollout proof for Deployments, StatefulSets and DaemonSets: restart once
//! per rotation (Trigger) or wait for another restarter (Await), then wait
//! until the rollout is complete.

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::Selector;

use crate::crd::{WorkloadKind, WorkloadRef};
use crate::decide::RolloutFacts;
use crate::error::{Error, Result};
use crate::reason::Reason;

pub use crate::crd::keys::restart_annotation;

/// What rekey observed of one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub facts: RolloutFacts,
    /// The value of the restart annotation on the pod template.
    pub stamped: Option<String>,
    /// Fingerprint of the pod template (changes with every restart).
    pub template: String,
    /// Why a rollout of it can never progress (a paused Deployment, an
    /// `OnDelete` update strategy), if so.
    pub stuck: Option<String>,
    /// Other restarters configured on it (e.g. Reloader annotations).
    pub other_restarters: Vec<String>,
}

/// Annotations by which Stakater Reloader restarts a workload on its own.
const RELOADER_ANNOTATIONS: &[&str] = &[
    "reloader.stakater.com/auto",
    "reloader.stakater.com/search",
    "secret.reloader.stakater.com/reload",
    "secret.reloader.stakater.com/auto",
];

/// The restarters besides rekey named in a workload's annotations.
pub fn other_restarters(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Vec<String> {
    let annotations = meta.annotations.clone().unwrap_or_default();
    RELOADER_ANNOTATIONS
        .iter()
        .filter(|a| annotations.get(**a).is_some_and(|v| v != "false"))
        .map(|a| format!("Reloader ({a})"))
        .collect()
}

pub struct Workloads {
    client: Client,
    namespace: String,
}

fn not_found(kind: WorkloadKind, ns: &str, name: &str) -> Error {
    Error::permanent(
        Reason::WorkloadNotFound,
        format!("{kind:?} {ns}/{name} not found"),
    )
}

impl Workloads {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.into(),
        }
    }

    async fn get<K>(&self, w: &WorkloadRef) -> Result<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        Api::<K>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&w.name)
            .await
            .map_err(|e| Error::kube("read workload", e))?
            .ok_or_else(|| not_found(w.kind, &self.namespace, &w.name))
    }

    pub async fn observe(&self, w: &WorkloadRef, annotation: &str) -> Result<Observed> {
        let stamp = |t: &k8s_openapi::api::core::v1::PodTemplateSpec| {
            t.metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(annotation).cloned())
        };
        Ok(match w.kind {
            WorkloadKind::Deployment => {
                let d: Deployment = self.get(w).await?;
                let other_restarters = other_restarters(&d.metadata);
                let (spec, s) = (d.spec.unwrap_or_default(), d.status.unwrap_or_default());
                Observed {
                    stuck: spec.paused.unwrap_or(false).then(|| {
                        format!("Deployment {} is paused (spec.paused): its pods would never be replaced", w.name)
                    }),
                    other_restarters,
                    stamped: stamp(&spec.template),
                    template: crate::fingerprint::of_json(&spec.template),
                    facts: RolloutFacts {
                        generation: d.metadata.generation.unwrap_or(0),
                        observed_generation: s.observed_generation.unwrap_or(0),
                        desired: spec.replicas.unwrap_or(1),
                        current: s.replicas.unwrap_or(0),
                        updated: s.updated_replicas.unwrap_or(0),
                        ready: s.ready_replicas.unwrap_or(0),
                        available: s.available_replicas.unwrap_or(0),
                        revisions_converged: true,
                    },
                }
            }
            WorkloadKind::StatefulSet => {
                let d: StatefulSet = self.get(w).await?;
                let other_restarters = other_restarters(&d.metadata);
                let (spec, s) = (d.spec.unwrap_or_default(), d.status.unwrap_or_default());
                let on_delete = spec
                    .update_strategy
                    .as_ref()
                    .and_then(|u| u.type_.as_deref())
                    == Some("OnDelete");
                Observed {
                    stuck: on_delete.then(|| {
                        format!("StatefulSet {} has updateStrategy OnDelete: a restart would replace none of its pods", w.name)
                    }),
                    other_restarters,
                    stamped: stamp(&spec.template),
                    template: crate::fingerprint::of_json(&spec.template),
                    facts: RolloutFacts {
                        generation: d.metadata.generation.unwrap_or(0),
                        observed_generation: s.observed_generation.unwrap_or(0),
                        desired: spec.replicas.unwrap_or(1),
                        current: s.replicas,
                        updated: s.updated_replicas.unwrap_or(0),
                        ready: s.ready_replicas.unwrap_or(0),
                        available: s.available_replicas.unwrap_or(0),
                        revisions_converged: s.current_revision.is_some()
                            && s.current_revision == s.update_revision,
                    },
                }
            }
            WorkloadKind::DaemonSet => {
                let d: DaemonSet = self.get(w).await?;
                let other_restarters = other_restarters(&d.metadata);
                let (spec, s) = (d.spec.unwrap_or_default(), d.status.unwrap_or_default());
                let on_delete = spec
                    .update_strategy
                    .as_ref()
                    .and_then(|u| u.type_.as_deref())
                    == Some("OnDelete");
                Observed {
                    stuck: on_delete.then(|| {
                        format!("DaemonSet {} has updateStrategy OnDelete: a restart would replace none of its pods", w.name)
                    }),
                    other_restarters,
                    stamped: stamp(&spec.template),
                    template: crate::fingerprint::of_json(&spec.template),
                    facts: RolloutFacts {
                        generation: d.metadata.generation.unwrap_or(0),
                        observed_generation: s.observed_generation.unwrap_or(0),
                        desired: s.desired_number_scheduled,
                        current: s.current_number_scheduled,
                        updated: s.updated_number_scheduled.unwrap_or(0),
                        ready: s.number_ready,
                        available: s.number_available.unwrap_or(0),
                        revisions_converged: true,
                    },
                }
            }
        })
    }

    /// When the oldest running pod of the workload was created (pods being
    /// deleted are left out; None when it has none).
    pub async fn oldest_pod(&self, w: &WorkloadRef) -> Result<Option<Timestamp>> {
        let selector: Option<LabelSelector> = match w.kind {
            WorkloadKind::Deployment => self.get::<Deployment>(w).await?.spec.map(|s| s.selector),
            WorkloadKind::StatefulSet => self.get::<StatefulSet>(w).await?.spec.map(|s| s.selector),
            WorkloadKind::DaemonSet => self.get::<DaemonSet>(w).await?.spec.map(|s| s.selector),
        };
        let selector = Selector::try_from(selector.unwrap_or_default()).map_err(|_| {
            Error::permanent(
                Reason::WorkloadNotFound,
                format!("{:?} {} has a selector rekey cannot read", w.kind, w.name),
            )
        })?;
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list_metadata(&ListParams::default().labels_from(&selector))
            .await
            .map_err(|e| Error::kube("list pods", e))?;
        Ok(pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .min())
    }

    /// Stamps the pod template with the rotation id, which starts exactly one
    /// rollout. Callers check `Observed::stamped` first, so a retry after a
    /// crash sees the stamp and does not patch again.
    pub async fn restart(
        &self,
        w: &WorkloadRef,
        annotation: &str,
        rotation_id: &str,
    ) -> Result<()> {
        let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {annotation: rotation_id}}}}});
        let pp = PatchParams::default();
        let p = Patch::Merge(&patch);
        let ns = &self.namespace;
        let r = match w.kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(self.client.clone(), ns)
                .patch(&w.name, &pp, &p)
                .await
                .map(|_| ()),
            WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(self.client.clone(), ns)
                .patch(&w.name, &pp, &p)
                .await
                .map(|_| ()),
            WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(self.client.clone(), ns)
                .patch(&w.name, &pp, &p)
                .await
                .map(|_| ()),
        };
        r.map_err(|e| Error::kube("restart workload", e))
    }
}

#[cfg(test)]
mod tests {
    use super::restart_annotation;

    #[test]
    fn restart_annotation_names_stay_valid_and_distinct() {
        assert_eq!(
            restart_annotation("app-secret"),
            "rotation.rekey.dev/app-secret"
        );
        let long_a = "a".repeat(200);
        let long_b = format!("{}b", "a".repeat(199));
        let (a, b) = (restart_annotation(&long_a), restart_annotation(&long_b));
        for n in [&a, &b] {
            let name = n.split_once('/').unwrap().1;
            assert!(name.len() <= 63, "{n}");
        }
        assert_ne!(a, b, "two long names must not share an annotation");
    }
}
