//! Consumers and the drain proof: who reads the value, is each of them
//! covered by the proof, and does any pod still run (or terminate) that
//! started before the new value was synced.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::PodSpec;

use crate::crd::{ConsumerHandlingMode, Proof};

/// A consumer as rekey reports it: a pod's top owner (Deployment through its
/// ReplicaSet, CronJob through its Job), a workload or CronJob whose pod
/// template reads the value, a bare pod, or another ExternalSecret.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsumerRef {
    pub kind: String,
    pub name: String,
}

impl ConsumerRef {
    pub fn new(kind: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ConsumerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// All rekey keeps of one pod: who owns it, which Secrets it reads (names
/// only), when it was created and whether it is being deleted.
#[derive(Clone, Debug, PartialEq)]
pub struct PodUse {
    pub owner: ConsumerRef,
    pub secrets: BTreeSet<String>,
    pub created: Option<Timestamp>,
    pub terminating: bool,
}

/// What one namespace holds that may consume the value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Census {
    /// The Secrets that carry the value here: the targets of the proven
    /// ExternalSecrets and the `kubernetesSecret` targets of this namespace.
    pub carriers: BTreeSet<String>,
    /// Every pod of the namespace.
    pub pods: Vec<PodUse>,
    /// Workloads and CronJobs with the Secrets their pod template reads
    /// (so that one scaled to zero is found too).
    pub templates: Vec<(ConsumerRef, BTreeSet<String>)>,
    /// ExternalSecrets not in the proof that pull a remote key a proven one
    /// pulls.
    pub other_external_secrets: Vec<ConsumerRef>,
}

/// How a consumer is covered by the proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// In `proof.workloads`: rekey restarts it (or awaits its restart).
    Restarted,
    /// `proof.consumers` says how.
    Handled(ConsumerHandlingMode),
}

impl Coverage {
    /// Whether its old pods must be gone before the old value dies.
    pub fn drains(self) -> bool {
        matches!(
            self,
            Coverage::Restarted | Coverage::Handled(ConsumerHandlingMode::Await)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Coverage::Restarted => "Restarted",
            Coverage::Handled(ConsumerHandlingMode::Await) => "Await",
            Coverage::Handled(ConsumerHandlingMode::ReloadsItself) => "ReloadsItself",
            Coverage::Handled(ConsumerHandlingMode::Accept) => "Accept",
        }
    }
}

/// The names of the Secrets a pod spec reads: env `secretKeyRef`,
/// `envFrom.secretRef`, `secret` volumes and `projected` volume sources, in
/// every container, init container and ephemeral container.
pub fn secrets_read_by(spec: &PodSpec) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let containers = spec.containers.iter().map(|c| (&c.env, &c.env_from));
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| (&c.env, &c.env_from));
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| (&c.env, &c.env_from));
    for (env, env_from) in containers.chain(init).chain(ephemeral) {
        for e in env.iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
            {
                names.insert(r.name.clone());
            }
        }
        for e in env_from.iter().flatten() {
            if let Some(r) = &e.secret_ref {
                names.insert(r.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            names.insert(name);
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = &source.secret {
                names.insert(s.name.clone());
            }
        }
    }
    names
}

/// How `proof` covers consumer `c`, if it does.
pub fn coverage(c: &ConsumerRef, proof: &Proof) -> Option<Coverage> {
    if proof
        .workloads
        .iter()
        .any(|w| format!("{:?}", w.kind) == c.kind && w.name == c.name)
    {
        return Some(Coverage::Restarted);
    }
    proof
        .consumers
        .iter()
        .find(|h| h.kind == c.kind && h.name == c.name)
        .map(|h| Coverage::Handled(h.handling))
}

/// Every consumer of the value in a census: owners of pods that read a
/// carrier, workloads whose template reads one, other ExternalSecrets.
pub fn consumers(census: &Census) -> BTreeSet<ConsumerRef> {
    let reads = |secrets: &BTreeSet<String>| !secrets.is_disjoint(&census.carriers);
    let pods = census
        .pods
        .iter()
        .filter(|p| reads(&p.secrets))
        .map(|p| p.owner.clone());
    let templates = census
        .templates
        .iter()
        .filter(|(_, s)| reads(s))
        .map(|(c, _)| c.clone());
    pods.chain(templates)
        .chain(census.other_external_secrets.iter().cloned())
        .collect()
}

/// The consumers the proof does not cover, in a stable order.
pub fn uncovered(census: &Census, proof: &Proof) -> Vec<ConsumerRef> {
    consumers(census)
        .into_iter()
        .filter(|c| coverage(c, proof).is_none())
        .collect()
}

/// Per consumer that must drain (restarted or awaited), how many of its
/// pods started before the new value reached the synced Secrets and still
/// run or terminate. Both times have second precision: a pod created in
/// the sync's second counts as started after it (as in `started_after_sync`).
pub fn draining(pods: &[PodUse], proof: &Proof, synced: Timestamp) -> BTreeMap<ConsumerRef, usize> {
    let mut left = BTreeMap::new();
    for p in pods {
        let old = p.created.is_none_or(|c| c.as_second() < synced.as_second());
        if old && coverage(&p.owner, proof).is_some_and(Coverage::drains) {
            *left.entry(p.owner.clone()).or_insert(0) += 1;
        }
    }
    left
}

/// "3 pods that started before the new value was synced are still running
/// or terminating: Deployment app (2), CronJob nightly (1)".
pub fn describe_draining(left: &BTreeMap<ConsumerRef, usize>) -> Option<String> {
    let total: usize = left.values().sum();
    (total > 0).then(|| {
        let each: Vec<String> = left.iter().map(|(c, n)| format!("{c} ({n})")).collect();
        format!(
            "{total} pod{} that started before the new value was synced still running or terminating: {}",
            if total == 1 { "" } else { "s" },
            each.join(", ")
        )
    })
}

/// "Deployment other, Pod debug".
pub fn describe(consumers: &[ConsumerRef]) -> String {
    consumers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConsumerHandling, WorkloadKind, WorkloadRef};

    /// A pod of `owner` ("Kind name") created at `time` on 2026-01-01.
    fn pod(owner: &str, secrets: &[&str], time: &str, terminating: bool) -> PodUse {
        let (kind, name) = owner.split_once(' ').unwrap();
        PodUse {
            owner: ConsumerRef::new(kind, name),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            created: Some(format!("2026-01-01T{time}Z").parse().unwrap()),
            terminating,
        }
    }

    fn proof() -> Proof {
        Proof {
            workloads: vec![WorkloadRef {
                kind: WorkloadKind::Deployment,
                name: "app".into(),
            }],
            consumers: vec![
                ConsumerHandling {
                    kind: "CronJob".into(),
                    name: "nightly".into(),
                    handling: ConsumerHandlingMode::Await,
                    reason: None,
                },
                ConsumerHandling {
                    kind: "Pod".into(),
                    name: "debug".into(),
                    handling: ConsumerHandlingMode::Accept,
                    reason: Some("deleted by hand".into()),
                },
            ],
            ..Proof::default()
        }
    }

    #[test]
    fn every_way_a_pod_reads_a_secret_is_found() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "a",
                "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "by-env", "key": "k"}}},
                        {"name": "Y", "value": "plain"}],
                "envFrom": [{"secretRef": {"name": "by-env-from"}}, {"configMapRef": {"name": "cm"}}]}],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "by-init"}}]}],
            "volumes": [{"name": "v", "secret": {"secretName": "by-volume"}},
                        {"name": "p", "projected": {"sources": [{"secret": {"name": "by-projected"}}, {"configMap": {"name": "cm"}}]}}]
        }))
        .unwrap();
        let found: Vec<String> = secrets_read_by(&spec).into_iter().collect();
        assert_eq!(
            found,
            [
                "by-env",
                "by-env-from",
                "by-init",
                "by-projected",
                "by-volume"
            ]
        );
    }

    #[test]
    fn a_consumer_nobody_named_is_uncovered() {
        let census = Census {
            carriers: ["app-creds".to_string()].into(),
            pods: vec![
                pod("Deployment app", &["app-creds"], "00:00:00", false),
                pod("Deployment other", &["app-creds"], "00:00:00", false),
                pod("Deployment unrelated", &["db"], "00:00:00", false),
                pod("Pod debug", &["app-creds"], "00:00:00", false),
            ],
            templates: vec![
                (
                    ConsumerRef::new("CronJob", "nightly"),
                    ["app-creds".to_string()].into(),
                ),
                (
                    ConsumerRef::new("StatefulSet", "idle"),
                    ["app-creds".to_string()].into(),
                ),
            ],
            other_external_secrets: vec![ConsumerRef::new("ExternalSecret", "copy")],
        };
        assert_eq!(
            describe(&uncovered(&census, &proof())),
            "Deployment other, ExternalSecret copy, StatefulSet idle"
        );
    }

    #[test]
    fn only_old_pods_of_restarted_or_awaited_consumers_must_drain() {
        let synced: Timestamp = "2026-01-01T00:01:00.600Z".parse().unwrap();
        let pods = vec![
            pod("Deployment app", &["app-creds"], "00:00:00", true),
            pod("Deployment app", &["app-creds"], "00:01:00", false),
            pod("CronJob nightly", &["app-creds"], "00:00:30", false),
            pod("Pod debug", &["app-creds"], "00:00:00", false),
            pod("Deployment other", &["app-creds"], "00:00:00", false),
        ];
        let left = draining(&pods, &proof(), synced);
        assert_eq!(
            describe_draining(&left).unwrap(),
            "2 pods that started before the new value was synced still running or terminating: CronJob nightly (1), Deployment app (1)"
        );
        assert_eq!(
            describe_draining(&draining(&pods[1..2], &proof(), synced)),
            None
        );
    }
}
