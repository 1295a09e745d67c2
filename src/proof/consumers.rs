//! Consumer discovery: reads one namespace's pods, workload templates and
//! ExternalSecrets, and reduces each to what `decide::consumers` needs
//! (owner and Secret names; never Secret data, never a whole pod kept).

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
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
            Some(o) => self.of.get(&o).cloned().unwrap_or(o),
        }
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
        let mut of = HashMap::new();
        let sets = self.api::<ReplicaSet>().list_metadata(&lp).await;
        let sets = sets.map_err(list_error("list replicasets"))?.items;
        let jobs = self.api::<Job>().list_metadata(&lp).await;
        let jobs = jobs.map_err(list_error("list jobs"))?.items;
        let metas = sets
            .into_iter()
            .map(|m| ("ReplicaSet", m.metadata))
            .chain(jobs.into_iter().map(|m| ("Job", m.metadata)));
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
        let owners = self.owners().await?;
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default())
            .await
            .map_err(list_error("list pods"))?;
        Ok(pods
            .items
            .iter()
            .filter(|p| !finished(p))
            .map(|p| pod_use(p, &owners))
            .collect())
    }

    /// What in the namespace, besides pods, may consume the value carried
    /// by the Secrets `direct` and by the targets of ExternalSecrets
    /// `proven`, read now (`Census::pods` is left empty).
    pub async fn census(&self, proven: &[String], direct: &[String]) -> Result<Census> {
        let lp = ListParams::default();
        let mut templates = vec![];
        let named = |kind: &str, meta: &ObjectMeta| {
            ConsumerRef::new(kind, meta.name.clone().unwrap_or_default())
        };
        for d in self
            .api::<Deployment>()
            .list(&lp)
            .await
            .map_err(list_error("list deployments"))?
            .items
        {
            let spec = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
            templates.push((
                named("Deployment", &d.metadata),
                spec.map(secrets_read_by).unwrap_or_default(),
            ));
        }
        for d in self
            .api::<StatefulSet>()
            .list(&lp)
            .await
            .map_err(list_error("list statefulsets"))?
            .items
        {
            let spec = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
            templates.push((
                named("StatefulSet", &d.metadata),
                spec.map(secrets_read_by).unwrap_or_default(),
            ));
        }
        for d in self
            .api::<DaemonSet>()
            .list(&lp)
            .await
            .map_err(list_error("list daemonsets"))?
            .items
        {
            let spec = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
            templates.push((
                named("DaemonSet", &d.metadata),
                spec.map(secrets_read_by).unwrap_or_default(),
            ));
        }
        for d in self
            .api::<CronJob>()
            .list(&lp)
            .await
            .map_err(list_error("list cronjobs"))?
            .items
        {
            let spec = d
                .spec
                .job_template
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref());
            templates.push((
                named("CronJob", &d.metadata),
                spec.map(secrets_read_by).unwrap_or_default(),
            ));
        }
        // Other ExternalSecrets matter only beside proven ones (the keys
        // they pull); without any, ESO need not even be installed.
        let all_es = match proven {
            [] => vec![],
            _ => {
                let es_api: Api<DynamicObject> = Api::namespaced_with(
                    self.client.clone(),
                    &self.namespace,
                    &external_secret_resource(),
                );
                es_api
                    .list(&lp)
                    .await
                    .map_err(list_error("list externalsecrets"))?
                    .items
            }
        };
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
            .map(|es| named("ExternalSecret", &es.metadata))
            .collect();
        Ok(Census {
            carriers,
            pods: vec![],
            templates,
            other_external_secrets,
        })
    }
}
