//! What a rotation must prove before the old value dies: ExternalSecrets,
//! workloads and consumers here, and the same in remote clusters.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConsumerHandling;

/// What must be observed before the old value is invalidated.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Proof {
    /// ExternalSecrets (external-secrets.io/v1, same namespace) that must
    /// deliver the new value. rekey requests a refresh of each and waits until
    /// it is Ready and its target Secret's key holds the new value.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub external_secrets: Vec<ExternalSecretProof>,
    /// Workloads (same namespace) that must run on the new value: their
    /// rollout must complete after the sync.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub workloads: Vec<WorkloadRef>,
    /// Consumers of the value that rekey does not restart: how each is
    /// covered (awaited, reloads by itself, or accepted with a reason).
    /// rekey refuses to invalidate while a consumer it found is neither in
    /// `workloads` nor here. May be changed during a rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub consumers: Vec<ConsumerHandling>,
    /// Who restarts the workloads. `Trigger` (default): rekey stamps each pod
    /// template with the rotation id (one rollout per rotation). `Await`:
    /// something else restarts them (e.g. Reloader); rekey waits for it.
    #[serde(default)]
    pub restart: RestartMode,
    /// How long the whole proof may take, from the moment the new value is
    /// issued until it is proven (writing, sync, rollout and verification
    /// together), as a duration between 10s and 24h. Default 20m. It must
    /// leave a tenth of `oldValueValidFor` free.
    #[serde(default = "default_proof_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('24h')")
        .message("proof.timeout must be a duration between 10s and 24h, e.g. 20m"))]
    pub timeout: String,
    /// Set to true to start even when the recent rotations were slow: by
    /// default Preflight refuses when twice the slowest sync plus rollout of
    /// the last five successful rotations does not fit in `oldValueValidFor`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_history: bool,
    /// Set to true to rotate without any proof (nothing consumes the value
    /// through ESO or a workload). The old value is then invalidated right
    /// after the targets were written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nothing_to_prove: bool,
    /// Other clusters that consume the value, each proven like this one:
    /// rekey requests the refresh of their ExternalSecrets, restarts their
    /// workloads and waits for the proof in every cluster before it
    /// invalidates the old value. A cluster rekey cannot reach holds the
    /// rotation (condition `ClusterUnreachable`); it never counts as proven.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d.name == c.name))")
        .message("proof.clusters names must be unique"))]
    pub clusters: Vec<RemoteCluster>,
}

/// A remote cluster whose ExternalSecrets and workloads must run the new
/// value too, reached through a kubeconfig kept in a Secret of this
/// SecretRotation's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.externalSecrets) && size(self.externalSecrets) > 0) || (has(self.workloads) && size(self.workloads) > 0)")
    .message("each of proof.clusters must name at least one ExternalSecret or workload"))]
#[serde(rename_all = "camelCase")]
pub struct RemoteCluster {
    /// Name of the cluster, unique in this SecretRotation, e.g. `stage`.
    /// Shown in status, Events and `kubectl rekey status`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The environment this cluster serves, e.g. `stage` (see
    /// `targets[].environment`). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub environment: Option<String>,
    /// The Secret (in this SecretRotation's namespace) whose key holds a
    /// kubeconfig for the cluster, as Flux's `spec.kubeConfig.secretRef`.
    /// The kubeconfig must carry its credentials inline (a token or a
    /// client certificate): exec and auth-provider plugins and file paths
    /// are refused, so a SecretRotation cannot make the operator run a
    /// command or read its own files.
    pub kube_config: KubeConfigRef,
    /// The namespace in the remote cluster holding the ExternalSecrets and
    /// workloads. Default: the kubeconfig context's namespace, else this
    /// SecretRotation's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,
    /// ExternalSecrets in the remote namespace that must deliver the new
    /// value (as `proof.externalSecrets`).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub external_secrets: Vec<ExternalSecretProof>,
    /// Workloads in the remote namespace that must run on the new value (as
    /// `proof.workloads`; `proof.restart` applies).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub workloads: Vec<WorkloadRef>,
}

/// Where a remote cluster's kubeconfig is kept.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubeConfigRef {
    /// The Secret and key; the key defaults to `value` (Flux's convention).
    pub secret_ref: KubeConfigSecretRef,
}

/// A Secret key holding a kubeconfig.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubeConfigSecretRef {
    /// Name of the Secret, in this SecretRotation's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key inside the Secret (default `value`).
    #[serde(default = "default_kubeconfig_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_kubeconfig_key() -> String {
    "value".into()
}

fn default_proof_timeout() -> String {
    "20m".into()
}

/// An ExternalSecret whose synced Secret must hold the new value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalSecretProof {
    /// Name of the ExternalSecret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key in the ExternalSecret's target Secret that must hold the new value.
    /// When `target.template` renames or reshapes the data, name the key the
    /// template renders (Preflight refuses a key the Secret does not have).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
    /// How the key must hold the value. `Exact` (default): the key's bytes
    /// are the value. `Contains`: the key embeds the value, e.g. a DSN a
    /// template renders around it.
    #[serde(default, rename = "match", skip_serializing_if = "KeyMatch::is_exact")]
    pub match_mode: KeyMatch,
}

/// How a synced key must hold the value.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KeyMatch {
    /// The key's bytes are the value.
    #[default]
    Exact,
    /// The key's bytes contain the value.
    Contains,
}

impl KeyMatch {
    pub fn is_exact(&self) -> bool {
        *self == KeyMatch::Exact
    }
}

/// A workload that must roll out on the new value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Kind of the workload.
    pub kind: WorkloadKind,
    /// Name of the workload.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// Kinds of workloads rekey can restart and watch.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// Who restarts the workloads.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestartMode {
    /// rekey stamps the pod template with the rotation id.
    #[default]
    Trigger,
    /// rekey waits for another restarter.
    Await,
}
