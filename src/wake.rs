//! Wakes a waiting SecretRotation when what it waits for changes, instead of
//! polling: watches run only in namespaces where a rotation is in progress,
//! and stop when the last one there ends.
//!
//! Per such namespace: metadata-only watches of ExternalSecrets,
//! Deployments, StatefulSets, DaemonSets, ReplicaSets and Jobs, and a watch
//! of Pods reduced at once to a `PodIndex` entry (owner, names of the
//! Secrets it reads, creation time, terminating). Nothing else of a pod is
//! kept, and no Secret is watched: ESO updates the ExternalSecret's status
//! after it wrote the Secret, so that event is the sync's.
//!
//! An event wakes exactly the rotations whose `Interest` names the object
//! (for a pod: its owner). Reconciles still requeue after `--poll` as a
//! safety net.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::channel::mpsc::{UnboundedSender, unbounded};
use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::crd::{ConsumerHandlingMode, Phase, SecretRotation, WorkloadKind};
use crate::decide::consumers::{ConsumerRef, PodUse};
use crate::proof::consumers::{Owners, controller_of, finished, pod_use};
use crate::proof::eso::external_secret_resource;

/// What one waiting rotation waits on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Interest {
    /// ExternalSecrets named in its proof.
    pub external_secrets: BTreeSet<String>,
    /// Workloads and awaited consumers whose pods it waits on.
    pub owners: BTreeSet<ConsumerRef>,
}

impl Interest {
    /// What a rotation in `phase` waits on: the ExternalSecrets while it
    /// awaits the sync (or a rollback's), the workloads' and awaited
    /// consumers' pods while it awaits the rollout and the drain, both at
    /// the final re-check; nothing in the other phases (its own
    /// SecretRotation's changes wake it anyway).
    pub fn of(spec: &crate::crd::SecretRotationSpec, phase: Phase) -> Self {
        let proof = &spec.proof;
        let kind = |k: WorkloadKind| format!("{k:?}");
        let external_secrets = || {
            proof
                .external_secrets
                .iter()
                .map(|e| e.name.clone())
                .collect()
        };
        let owners = || {
            proof
                .workloads
                .iter()
                .map(|w| ConsumerRef::new(kind(w.kind), &w.name))
                .chain(
                    proof
                        .consumers
                        .iter()
                        .filter(|c| c.handling == ConsumerHandlingMode::Await)
                        .map(|c| ConsumerRef::new(&c.kind, &c.name)),
                )
                .collect()
        };
        match phase {
            Phase::AwaitingSync | Phase::RollingBack => Self {
                external_secrets: external_secrets(),
                ..Self::default()
            },
            Phase::AwaitingRollout => Self {
                owners: owners(),
                ..Self::default()
            },
            Phase::Invalidating => Self {
                external_secrets: external_secrets(),
                owners: owners(),
            },
            _ => Self::default(),
        }
    }

    /// Whether a rotation in `phase` needs the namespace's watches (and its
    /// pod index): from Preflight until it ends, but not while it waits
    /// for a person to approve.
    pub fn needs_watches(phase: Phase) -> bool {
        !matches!(phase, Phase::Pending | Phase::AwaitingApproval)
    }
}

/// One namespace's pods (reduced) and ReplicaSet/Job owners. A pod's
/// `owner` is kept as its direct owner (or the Pod itself) and resolved to
/// the top owner when read, since a ReplicaSet's event may come later.
#[derive(Default)]
struct PodIndex {
    pods: HashMap<String, PodUse>,
    owners: Owners,
    /// Which of the three lists (pods, ReplicaSets, Jobs) completed.
    listed: [bool; 3],
}

impl PodIndex {
    fn uses(&self) -> Option<Vec<PodUse>> {
        self.listed.iter().all(|l| *l).then(|| {
            self.pods
                .values()
                .map(|p| PodUse {
                    owner: self.owners.resolve(&p.owner),
                    ..p.clone()
                })
                .collect()
        })
    }
}

#[derive(Default)]
struct Watched {
    waiting: HashMap<String, Interest>,
    index: PodIndex,
    tasks: Vec<JoinHandle<()>>,
}

type Route = (Option<String>, UnboundedSender<ObjectRef<SecretRotation>>);

/// Shared by the controllers of one operator.
pub struct Wake {
    client: Client,
    namespaces: Arc<Mutex<HashMap<String, Watched>>>,
    routes: Mutex<Vec<Route>>,
}

impl Wake {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            namespaces: Arc::default(),
            routes: Mutex::default(),
        }
    }

    /// The wake-ups for the controller of `namespace` (None: every namespace).
    pub fn route(
        &self,
        namespace: Option<String>,
    ) -> impl Stream<Item = ObjectRef<SecretRotation>> + use<> {
        let (tx, rx) = unbounded();
        self.routes.lock().unwrap().push((namespace, tx));
        rx
    }

    /// Records what rotation `name` waits on; starts the namespace's watches
    /// if none runs there yet.
    pub fn wait_on(&self, namespace: &str, name: &str, interest: Interest) {
        let mut namespaces = self.namespaces.lock().unwrap();
        let watched = namespaces.entry(namespace.to_string()).or_default();
        if watched.tasks.is_empty() {
            watched.tasks = self.start(namespace);
        }
        watched.waiting.insert(name.to_string(), interest);
    }

    /// Rotation `name` waits on nothing any more; the namespace's watches
    /// stop with its last rotation.
    pub fn forget(&self, namespace: &str, name: &str) {
        let mut namespaces = self.namespaces.lock().unwrap();
        let Some(watched) = namespaces.get_mut(namespace) else {
            return;
        };
        watched.waiting.remove(name);
        if watched.waiting.is_empty()
            && let Some(w) = namespaces.remove(namespace)
        {
            w.tasks.iter().for_each(JoinHandle::abort);
        }
    }

    /// Every pod of the namespace, from the index, once its watches have
    /// listed everything (None before that, or when no rotation waits there).
    pub fn pods(&self, namespace: &str) -> Option<Vec<PodUse>> {
        self.namespaces.lock().unwrap().get(namespace)?.index.uses()
    }

    /// Keeps only the rotations `keep` says still exist.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut namespaces = self.namespaces.lock().unwrap();
        namespaces.retain(|ns, watched| {
            watched.waiting.retain(|name, _| keep(ns, name));
            let in_use = !watched.waiting.is_empty();
            if !in_use {
                watched.tasks.iter().for_each(JoinHandle::abort);
            }
            in_use
        });
    }

    fn start(&self, ns: &str) -> Vec<JoinHandle<()>> {
        let c = &self.client;
        let es: Api<PartialObjectMeta<DynamicObject>> =
            Api::namespaced_with(c.clone(), ns, &external_secret_resource());
        let shared = Shared {
            namespace: ns.to_string(),
            namespaces: self.namespaces.clone(),
            routes: self.routes.lock().unwrap().clone(),
        };
        vec![
            spawn_meta(es, named(&shared, "ExternalSecret")),
            spawn_meta(api::<Deployment>(c, ns), named(&shared, "Deployment")),
            spawn_meta(api::<StatefulSet>(c, ns), named(&shared, "StatefulSet")),
            spawn_meta(api::<DaemonSet>(c, ns), named(&shared, "DaemonSet")),
            spawn_meta(api::<ReplicaSet>(c, ns), owners(&shared, "ReplicaSet", 1)),
            spawn_meta(api::<Job>(c, ns), owners(&shared, "Job", 2)),
            spawn_pods(Api::namespaced(c.clone(), ns), shared),
        ]
    }
}

/// A metadata-only Api of kind `K` in namespace `ns`.
fn api<K>(c: &Client, ns: &str) -> Api<PartialObjectMeta<K>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(c.clone(), ns)
}

/// What a watch task of one namespace needs.
#[derive(Clone)]
struct Shared {
    namespace: String,
    namespaces: Arc<Mutex<HashMap<String, Watched>>>,
    routes: Vec<Route>,
}

impl Shared {
    /// Wakes the rotations of this namespace that `wants`.
    fn wake(&self, wants: impl Fn(&Interest) -> bool) {
        let names: Vec<String> = {
            let namespaces = self.namespaces.lock().unwrap();
            let Some(w) = namespaces.get(&self.namespace) else {
                return;
            };
            w.waiting
                .iter()
                .filter(|(_, i)| wants(i))
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in names {
            let r = ObjectRef::new(&name).within(&self.namespace);
            for (ns, tx) in &self.routes {
                if ns.as_ref().is_none_or(|n| *n == self.namespace) {
                    let _ = tx.unbounded_send(r.clone());
                }
            }
        }
    }

    fn with_index(&self, f: impl FnOnce(&mut PodIndex)) {
        if let Some(w) = self.namespaces.lock().unwrap().get_mut(&self.namespace) {
            f(&mut w.index);
        }
    }

    fn on_named<K: Resource>(&self, kind: &'static str, e: Event<PartialObjectMeta<K>>) {
        if let Event::Apply(o) | Event::Delete(o) = e {
            let name = o.metadata.name.unwrap_or_default();
            match kind {
                "ExternalSecret" => self.wake(|i| i.external_secrets.contains(&name)),
                _ => {
                    let owner = ConsumerRef::new(kind, &name);
                    self.wake(|i| i.owners.contains(&owner))
                }
            }
        }
    }
}

/// Wakes the rotations that name the object.
fn named<K: Resource>(
    s: &Shared,
    kind: &'static str,
) -> impl FnMut(Event<PartialObjectMeta<K>>) + use<K> {
    let s = s.clone();
    move |e| s.on_named(kind, e)
}

/// Keeps ReplicaSet → Deployment, Job → CronJob in the index.
fn owners<K: Resource>(
    s: &Shared,
    kind: &'static str,
    slot: usize,
) -> impl FnMut(Event<PartialObjectMeta<K>>) + use<K> {
    let s = s.clone();
    move |e| {
        let listed = matches!(e, Event::InitDone);
        s.with_index(|index| match e {
            Event::Init => index.listed[slot] = false,
            Event::InitApply(o) | Event::Apply(o) => {
                let me = ConsumerRef::new(kind, o.metadata.name.clone().unwrap_or_default());
                if let Some(owner) = controller_of(&o.metadata) {
                    index.owners.of.insert(me, owner);
                }
            }
            Event::Delete(o) => {
                let me = ConsumerRef::new(kind, o.metadata.name.clone().unwrap_or_default());
                index.owners.of.remove(&me);
            }
            Event::InitDone => index.listed[slot] = true,
        });
        if listed {
            s.wake(|_| true);
        }
    }
}

fn spawn_meta<K, F>(api: Api<PartialObjectMeta<K>>, mut on: F) -> JoinHandle<()>
where
    PartialObjectMeta<K>: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: FnMut(Event<PartialObjectMeta<K>>) + Send + 'static,
{
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(e) = events.next().await {
            match e {
                Ok(e) => on(e),
                Err(err) => debug!(error = %err, "watch failed; retrying"),
            }
        }
    })
}

fn spawn_pods(api: Api<Pod>, s: Shared) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(e) = events.next().await {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    debug!(error = %err, "pod watch failed; retrying");
                    continue;
                }
            };
            let mut touched: Option<ConsumerRef> = None;
            s.with_index(|index| match &e {
                Event::Init => {
                    index.pods.clear();
                    index.listed[0] = false;
                }
                Event::InitApply(p) | Event::Apply(p) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let pod = pod_use(p, &Owners::default());
                    touched = Some(index.owners.resolve(&pod.owner));
                    if finished(p) {
                        // Its containers ended: it holds no value any more.
                        index.pods.remove(&name);
                    } else {
                        index.pods.insert(name, pod);
                    }
                }
                Event::Delete(p) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    if let Some(gone) = index.pods.remove(&name) {
                        touched = Some(index.owners.resolve(&gone.owner));
                    }
                }
                Event::InitDone => index.listed[0] = true,
            });
            match (&e, touched) {
                (Event::InitDone, _) => s.wake(|_| true),
                (Event::Apply(_) | Event::Delete(_), Some(owner)) => {
                    // An owner the index cannot resolve yet wakes every
                    // rotation that waits on pods here.
                    let unresolved = owner.kind == "ReplicaSet" || owner.kind == "Job";
                    s.wake(|i| i.owners.contains(&owner) || (unresolved && !i.owners.is_empty()))
                }
                _ => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> crate::crd::SecretRotationSpec {
        serde_json::from_value(serde_json::json!({
            "credential": {"generated": {}},
            "oldValueValidFor": "30m",
            "targets": [{"name": "main", "kubernetesSecret": {"name": "source", "key": "k"}}],
            "proof": {
                "externalSecrets": [{"name": "app-creds", "key": "k"}],
                "workloads": [{"kind": "Deployment", "name": "app"}],
                "consumers": [
                    {"kind": "CronJob", "name": "nightly", "handling": "Await"},
                    {"kind": "Pod", "name": "debug", "handling": "Accept", "reason": "r"}
                ]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_rotation_is_woken_only_by_what_its_phase_waits_on() {
        let spec = spec();
        let sync = Interest::of(&spec, Phase::AwaitingSync);
        assert_eq!(sync.external_secrets, ["app-creds".to_string()].into());
        assert!(sync.owners.is_empty());
        let rollout = Interest::of(&spec, Phase::AwaitingRollout);
        assert!(rollout.external_secrets.is_empty());
        assert_eq!(
            rollout.owners,
            [
                ConsumerRef::new("CronJob", "nightly"),
                ConsumerRef::new("Deployment", "app")
            ]
            .into(),
            "accepted consumers wake nobody"
        );
        let recheck = Interest::of(&spec, Phase::Invalidating);
        assert_eq!(
            (recheck.external_secrets.len(), recheck.owners.len()),
            (1, 2)
        );
        assert_eq!(Interest::of(&spec, Phase::Issuing), Interest::default());
        assert!(!Interest::needs_watches(Phase::AwaitingApproval));
        assert!(Interest::needs_watches(Phase::Preflight));
    }

    #[test]
    fn the_index_answers_only_once_pods_and_owners_are_listed() {
        let mut index = PodIndex::default();
        index.pods.insert(
            "app-7d9f-x".into(),
            PodUse {
                owner: ConsumerRef::new("ReplicaSet", "app-7d9f"),
                secrets: BTreeSet::new(),
                created: None,
                terminating: true,
            },
        );
        index.pods.insert(
            "debug".into(),
            PodUse {
                owner: ConsumerRef::new("Pod", "debug"),
                secrets: BTreeSet::new(),
                created: None,
                terminating: false,
            },
        );
        index.owners.of.insert(
            ConsumerRef::new("ReplicaSet", "app-7d9f"),
            ConsumerRef::new("Deployment", "app"),
        );
        index.listed = [true, true, false];
        assert_eq!(index.uses(), None, "Jobs not listed yet");
        index.listed[2] = true;
        let mut owners: Vec<String> = index
            .uses()
            .unwrap()
            .into_iter()
            .map(|p| p.owner.to_string())
            .collect();
        owners.sort();
        assert_eq!(owners, ["Deployment app", "Pod debug"]);
    }
}
