//! Observed state of a SecretRotation: the phase machine's record. Never
//! holds a secret value.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WorkloadKind;

/// Observed state. Never holds a secret value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretRotationStatus {
    /// Phase of the current rotation, or the result of the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The rotation in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationStatus>,
    /// Summary of the last finished rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<RotationSummary>,
    /// When the schedule requests the next rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
    /// The last rotations, newest first (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RotationSummary>,
    /// The `spec.trigger` value the last rotation served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_trigger: Option<String>,
    /// The `rekey.dev/rotate` annotation value the last rotation served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_rotate_request: Option<String>,
    /// A request that arrived during the current rotation, or that waits for
    /// a start slot; served after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_request: Option<String>,
    /// kstatus conditions, read by `kubectl wait`, Flux and Argo CD:
    /// `Ready`: nothing requested is outstanding and the last rotation did
    /// not fail (a scheduled rotation in progress keeps the last result).
    /// `Reconciling`: a rotation requested by creation, `spec.trigger` or the
    /// `rekey.dev/rotate` annotation is in progress (reason: its phase).
    /// `Stalled`: the last rotation failed (reason: why); request a new one.
    /// Also `Rotating`: any rotation, scheduled ones too (reason: its phase);
    /// `GraceWindowAtRisk`: proof is late relative to `oldValueValidFor`;
    /// `Scheduled` and `CompetingRestarter`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed for. A request by
    /// annotation does not change the generation: see docs/gitops.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phases of a rotation, in order.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Requested; waiting to start.
    Pending,
    /// Waiting for the `rekey.dev/approve` annotation.
    AwaitingApproval,
    /// Checking everything that can be checked without changing anything.
    Preflight,
    /// Obtaining the new value; the old one stays valid.
    Issuing,
    /// Writing the new value to every target.
    Writing,
    /// Waiting for ESO to sync the new value into each ExternalSecret's Secret.
    AwaitingSync,
    /// Waiting for every workload to roll out on the new value.
    AwaitingRollout,
    /// Proving the new value works at the identity provider.
    Verifying,
    /// Invalidating the old value.
    Invalidating,
    /// Waiting for a person to confirm that the old value was invalidated.
    AwaitingConfirmation,
    /// Writing the previous value back after a failure (onFailure: Rollback).
    RollingBack,
    /// Every proof observed and the old value invalidated.
    Succeeded,
    /// The rotation stopped; the old value was not invalidated.
    Failed,
    /// A dry run finished its Preflight checks.
    DryRunSucceeded,
}

impl Phase {
    /// Every phase, in the order a rotation passes them.
    pub const ALL: [Phase; 14] = [
        Phase::Pending,
        Phase::AwaitingApproval,
        Phase::Preflight,
        Phase::Issuing,
        Phase::Writing,
        Phase::AwaitingSync,
        Phase::AwaitingRollout,
        Phase::Verifying,
        Phase::Invalidating,
        Phase::AwaitingConfirmation,
        Phase::RollingBack,
        Phase::Succeeded,
        Phase::Failed,
        Phase::DryRunSucceeded,
    ];

    /// The name shown in status, conditions, Events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::AwaitingApproval => "AwaitingApproval",
            Phase::Preflight => "Preflight",
            Phase::Issuing => "Issuing",
            Phase::Writing => "Writing",
            Phase::AwaitingSync => "AwaitingSync",
            Phase::AwaitingRollout => "AwaitingRollout",
            Phase::Verifying => "Verifying",
            Phase::Invalidating => "Invalidating",
            Phase::AwaitingConfirmation => "AwaitingConfirmation",
            Phase::RollingBack => "RollingBack",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::DryRunSucceeded => "DryRunSucceeded",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Failed | Phase::DryRunSucceeded
        )
    }
}

/// The rotation in progress.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// Unique id of this rotation; used as idempotency key everywhere.
    pub id: String,
    /// Why it started: Created, TriggerChanged, Schedule, OnDemand.
    pub reason: String,
    /// `spec.trigger` when it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The `rekey.dev/rotate` annotation when it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_request: Option<String>,
    /// Who requested it: `rekey.dev/requested-by` when it started (none for
    /// a scheduled rotation). A user name, checked by the chart's admission
    /// policy to be the requesting user's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Who approved it: `rekey.dev/approved-by` when the approval was served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// When it was requested.
    pub requested_at: Option<MicroTime>,
    /// When the current phase started.
    pub phase_started_at: Option<MicroTime>,
    /// Phases already left, with their durations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTiming>,
    /// A source's marker recorded before the new value was issued (e.g.
    /// Keycloak's secret creation time), so that a retry after a crash
    /// recovers the value instead of issuing a second one. Never a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue_marker: Option<String>,
    /// When the first `issue` call started (recorded before it ran): a retry
    /// knows an earlier call whose answer was lost may still commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue_attempted_at: Option<Time>,
    /// When the new value was issued: the identity provider's grace clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When the proof must be complete: `proof.timeout` after `issuedAt`,
    /// one deadline for writing, sync, rollout and verification together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_deadline: Option<Time>,
    /// When the old value stops being valid at the identity provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_value_valid_until: Option<Time>,
    /// Versions written to each target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
    /// Workload generations seen before the refresh request (Await mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_baselines: Vec<WorkloadBaseline>,
    /// Every consumer of the value found at Preflight, and how the proof
    /// covers it: `Restarted` (in `proof.workloads`), `Await`,
    /// `ReloadsItself` or `Accept` (from `proof.consumers`; the last two
    /// are exempt from the drain proof).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerStatus>,
    /// Where the proof stands, per ExternalSecret, workload and draining
    /// consumer, as last observed (AwaitingSync and AwaitingRollout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proof: Vec<ProofItem>,
    /// Each ExternalSecret's `status.syncedResourceVersion` before rekey's
    /// refresh request: the sync counts only once ESO itself synced after
    /// the request (a value rekey wrote cannot prove itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sync_baselines: Vec<SyncBaseline>,
    /// When the new value reached the synced Secrets: ESO's last sync time
    /// of the proven ExternalSecrets (second precision), or the last target
    /// write when none is proven. With `restart: Await` only pods created at
    /// or after it count as restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_value_synced_at: Option<Time>,
    /// When every ExternalSecret held the new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_at: Option<Time>,
    /// When every workload had rolled out on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_out_at: Option<Time>,
    /// Set when the rotation is failing: the reason (CamelCase) and a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Whether the previous values were written back and ESO synced them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
    /// Fingerprint of spec.credential, targets and proof when the rotation
    /// started: a change after Issuing fails the rotation (no invalidation).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spec_fingerprint: String,
    /// Whether a GraceWindowAtRisk warning was emitted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grace_warned: bool,
    /// Whether a rollback request (`rekey.dev/rollback`) was refused (and
    /// said so in an Event).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback_refused: bool,
    /// The change requests of this rotation (`approval.changeRequests`),
    /// one per environment, as last read back from the change system.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<ChangeStatus>,
    /// Set right before the old value is invalidated, after the final
    /// re-check of the proof passed: a retry invalidates again (idempotent)
    /// instead of re-checking a proof that was already acted on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invalidation_started: bool,
}

/// One change request, as rekey last read it back. Never a value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ChangeStatus {
    /// The environment the change covers.
    pub environment: String,
    /// The change system's id (ServiceNow: sys_id); empty until created.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The change's number as people know it, e.g. `CHG0030001`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub number: String,
    /// The change's state as the change system names it, e.g. `Assess`,
    /// `Scheduled`, `Implement`, `Closed`, `Canceled`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// Requested, Approved or Rejected (as read back).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub approval: String,
    /// The change window, when the change has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_end: Option<Time>,
    /// Set when rekey asked the change system to move the change to its
    /// implementation state (the rotation acts from then on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
    /// How rekey closed it at the end of the rotation: `Successful`,
    /// `Unsuccessful`, `RolledBack` or `Canceled`; empty while open.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub closed: String,
}

/// Time spent in one phase.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTiming {
    pub phase: Phase,
    /// Seconds spent in the phase.
    pub seconds: f64,
}

/// What was written to one target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    pub name: String,
    /// Version id in the store (never the value).
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_at: Option<Time>,
}

/// Where the proof stands for one ExternalSecret, workload or consumer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProofItem {
    /// The remote cluster of `proof.clusters` it is in; empty: this cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    /// ExternalSecret, a workload kind, or a consumer's kind.
    pub kind: String,
    pub name: String,
    /// Whether this part of the proof is observed: the ExternalSecret holds
    /// the new value, the workload rolled out on it, the consumer's old pods
    /// are gone.
    pub proven: bool,
    /// What is awaited, when not proven. Never a value.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub waiting_for: String,
}

/// An ExternalSecret's sync marker before rekey's refresh request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncBaseline {
    /// The remote cluster of `proof.clusters` it is in; empty: this cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    pub name: String,
    /// ESO's `status.syncedResourceVersion` (empty: never synced).
    pub synced_resource_version: String,
}

/// A workload's pod template before the refresh request (Await mode): a
/// restart is a change of the template, not of the replica count.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadBaseline {
    /// The remote cluster of `proof.clusters` it is in; empty: this cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    pub kind: WorkloadKind,
    pub name: String,
    /// FNV-1a fingerprint of the pod template.
    pub template: String,
}

/// One consumer of the value and how the proof covers it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// The remote cluster of `proof.clusters` it is in; empty: this cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    pub kind: String,
    pub name: String,
    /// Restarted, Await, ReloadsItself or Accept.
    pub handling: String,
}

/// Why a rotation failed. The message is built from fixed text and object
/// names; it never contains a value or a provider's response body.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub reason: String,
    pub message: String,
    /// The phase in which it failed.
    pub phase: Phase,
}

/// A finished rotation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationSummary {
    pub id: String,
    /// Succeeded, Failed or DryRunSucceeded.
    pub result: Phase,
    /// Why it started.
    pub reason: String,
    /// Who requested it (none for a scheduled rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Who approved it (`spec.approval.required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
    pub duration_seconds: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTiming>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
    /// The consumers found at Preflight and how each was covered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerStatus>,
    /// Where the proof stood at the end, per cluster, ExternalSecret,
    /// workload and draining consumer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proof: Vec<ProofItem>,
    /// Whether the previous value was written back (onFailure: Rollback).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
    /// The change requests, as closed at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<ChangeStatus>,
    /// Whether the rotation ended after the old value's grace window: the old
    /// value may have died before the proof was complete.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grace_exceeded: bool,
}

/// A new rotation id: sortable by time, unique, safe as an idempotency key.
pub fn new_rotation_id(now: jiff::Timestamp) -> String {
    use rand::RngExt;
    let suffix: u32 = rand::rng().random();
    format!("{}-{:08x}", now.strftime("%Y%m%d-%H%M%S"), suffix)
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Phase;

    #[test]
    fn phase_names_are_the_serialized_names() {
        for p in Phase::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }
}
