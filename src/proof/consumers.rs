//! Consumer discovery: reads one namespace's pods, workload templates and
//! ExternalSecrets, and reduces each to what `decide::consumers` needs
//! (owner and Secret names; never Secret data, never a whole pod kept).

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams};
use serde_json::Value;

use super::eso::external_secret_resource;
use crate::decide::consumers::{Census, ConsumerRef, PodUse, secrets_read_by};
use crate::error::{Error, Result};

/// The controlling owner of an object, as (kind, name).
pub fn controller_of(meta: &ObjectMeta) -> Option<ConsumerRef> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| ConsumerRef::new(&o.kind, &o.name))
}

/// Maps a ReplicaSet to its Deployment and a Job to its CronJob.
#[derive(Default, Debug, Clone)]
pub struct Owners {
    pub of: HashMap<ConsumerRef, ConsumerRef>,
}

impl Owners {
    /// The consumer a pod is reported as: its top owner, or the pod itself.
    pub fn top(&self, pod_name: &str, direct: Option<ConsumerRef>) -> ConsumerRef {
        match direct {
            None => ConsumerRef::new("Pod", pod_name),
            Some(o) => self.resolve(&o),
        }
    }

    /// The owner of a ReplicaSet or Job when known, else `direct` itself.
    pub fn resolve(&self, direct: &ConsumerRef) -> ConsumerRef {
        self.of
            .get(direct)
            .cloned()
            .unwrap_or_else(|| direct.clone())
    }
}

/// Whether a pod's containers all ended (phase Succeeded or Failed): it
/// holds no value any more.
pub fn finished(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// What rekey keeps of a pod (its owner resolved through `owners`).
pub fn pod_use(pod: &Pod, owners: &Owners) -> PodUse {
    let name = pod.metadata.name.clone().unwrap_or_default();
    PodUse {
        owner: owners.top(&name, controller_of(&pod.metadata)),
        secrets: pod.spec.as_ref().map(secrets_read_by).unwrap_or_default(),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        terminating: pod.metadata.deletion_timestamp.is_some(),
    }
}

/// The (secret store, remote key) pairs an ExternalSecret pulls.
pub fn remote_keys(es: &Value) -> BTreeSet<(String, String)> {
    let store = |v: &Value| {
        let kind = v
            .pointer("/kind")
            .and_then(Value::as_str)
            .unwrap_or("SecretStore");
        let name = v.pointer("/name").and_then(Value::as_str).unwrap_or("");
        format!("{kind}/{name}")
    };
    let default_store = es
        .pointer("/spec/secretStoreRef")
        .map(store)
        .unwrap_or_default();
    let mut keys = BTreeSet::new();
    let mut add = |entry: &Value, remote: Option<&Value>| {
        if let Some(key) = remote.and_then(|r| r.get("key")).and_then(Value::as_str) {
            let store = entry
                .pointer("/sourceRef/storeRef")
                .map(store)
                .unwrap_or_else(|| default_store.clone());
            keys.insert((store, key.to_string()));
        }
    };
    for d in es
        .pointer("/spec/data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add(d, d.get("remoteRef"));
    }
    for d in es
        .pointer("/spec/dataFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add(d, d.get("extract"));
    }
    keys
}

/// The name of the Secret an ExternalSecret writes.
pub fn synced_secret_name(es: &DynamicObject) -> String {
    es.data
        .pointer("/spec/target/name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| es.metadata.name.clone().unwrap_or_default())
}

/// Reads one namespace for consumer discovery.
pub struct Consumers {
    client: Client,
    namespace: String,
}

fn list_error(what: &'static str) -> impl Fn(kube::Error) -> Error {
    move |e| Error::kube(what, e)
}

impl Consumers {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.into(),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// ReplicaSet → Deployment and Job → CronJob, read now (metadata only).
    pub async fn owners(&self) -> Result<Owners> {
        let lp = ListParams::default();
        let (sets, jobs) = futures::try_join!(
            async {
                self.api::<ReplicaSet>()
                    .list_metadata(&lp)
                    .await
                    .map_err(list_error("list replicasets"))
            },
            async {
                self.api::<Job>()
                    .list_metadata(&lp)
                    .await
                    .map_err(list_error("list jobs"))
            },
        )?;
        let metas = sets
            .items
            .into_iter()
            .map(|m| ("ReplicaSet", m.metadata))
            .chain(jobs.items.into_iter().map(|m| ("Job", m.metadata)));
        let mut of = HashMap::new();
        for (kind, meta) in metas {
            if let Some(owner) = controller_of(&meta) {
                of.insert(ConsumerRef::new(kind, meta.name.unwrap_or_default()), owner);
            }
        }
        Ok(Owners { of })
    }

    /// Every pod of the namespace that has not finished, with its owner,
    /// read now.
    pub async fn pods(&self) -> Result<Vec<PodUse>> {
        let lp = ListParams::default();
        let (owners, pods) = futures::try_join!(self.owners(), async {
            self.api::<Pod>()
                .list(&lp)
                .await
                .map_err(list_error("list pods"))
        })?;
        Ok(pods
            .items
            .iter()
            .filter(|p| !finished(p))
            .map(|p| pod_use(p, &owners))
            .collect())
    }

    /// The pod templates of one kind of workload, with the Secrets each reads.
    async fn templates<K>(
        &self,
        kind: &'static str,
        template: impl Fn(&K) -> Option<&PodSpec>,
    ) -> Result<Vec<(ConsumerRef, BTreeSet<String>)>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        let list = self.api::<K>().list(&ListParams::default()).await;
        let list = list.map_err(|e| Error::kube(&format!("list {}s", kind.to_lowercase()), e))?;
        Ok(list
            .items
            .iter()
            .map(|o| {
                let name = o.meta().name.clone().unwrap_or_default();
                let reads = template(o).map(secrets_read_by).unwrap_or_default();
                (ConsumerRef::new(kind, name), reads)
            })
            .collect())
    }

    /// The ExternalSecrets of the namespace (none asked for when `proven`
    /// is empty: other ExternalSecrets matter only beside proven ones, for
    /// the keys they pull, and ESO need not even be installed).
    async fn external_secrets(&self, proven: &[String]) -> Result<Vec<DynamicObject>> {
        if proven.is_empty() {
            return Ok(vec![]);
        }
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &external_secret_resource(),
        );
        let list = api.list(&ListParams::default()).await;
        Ok(list.map_err(list_error("list externalsecrets"))?.items)
    }

    /// What in the namespace, besides pods, may consume the value carried
    /// by the Secrets `direct` and by the targets of ExternalSecrets
    /// `proven`, read now (`Census::pods` is left empty). The lists run at
    /// once.
    pub async fn census(&self, proven: &[String], direct: &[String]) -> Result<Census> {
        let (deployments, stateful_sets, daemon_sets, cron_jobs, all_es) = futures::try_join!(
            self.templates::<Deployment>("Deployment", |d| d.spec.as_ref()?.template.spec.as_ref()),
            self.templates::<StatefulSet>("StatefulSet", |d| d
                .spec
                .as_ref()?
                .template
                .spec
                .as_ref()),
            self.templates::<DaemonSet>("DaemonSet", |d| d.spec.as_ref()?.template.spec.as_ref()),
            self.templates::<CronJob>("CronJob", |c| c
                .spec
                .job_template
                .spec
                .as_ref()?
                .template
                .spec
                .as_ref()),
            self.external_secrets(proven),
        )?;
        let is_proven = |es: &DynamicObject| {
            es.metadata
                .name
                .as_ref()
                .is_some_and(|n| proven.contains(n))
        };
        let mut carriers: BTreeSet<String> = direct.iter().cloned().collect();
        let mut pulled = BTreeSet::new();
        for es in all_es.iter().filter(|es| is_proven(es)) {
            carriers.insert(synced_secret_name(es));
            pulled.extend(remote_keys(&es.data));
        }
        let other_external_secrets = all_es
            .iter()
            .filter(|es| !is_proven(es))
            .filter(|es| !remote_keys(&es.data).is_disjoint(&pulled))
            .map(|es| {
                ConsumerRef::new(
                    "ExternalSecret",
                    es.metadata.name.clone().unwrap_or_default(),
                )
            })
            .collect();
        Ok(Census {
            carriers,
            pods: vec![],
            templates: [deployments, stateful_sets, daemon_sets, cron_jobs].concat(),
            other_external_secrets,
        })
    }
}
