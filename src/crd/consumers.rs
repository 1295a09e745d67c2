//! `proof.consumers`: what rekey does about consumers of the value it does
//! not restart itself.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A consumer of the value (a pod's owner that reads the synced Secret or a
/// `kubernetesSecret` target, or another ExternalSecret that pulls the same
/// remote key) that is not in `proof.workloads`, and how it is covered.
/// rekey finds every consumer at Preflight and again right before
/// invalidating; one that is neither restarted nor listed here stops the
/// rotation. This list may change during a rotation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.handling != 'Accept' || (has(self.reason) && size(self.reason) > 0)")
    .message("a consumer with handling: Accept needs a reason"))]
#[serde(rename_all = "camelCase")]
pub struct ConsumerHandling {
    /// Kind of the consumer as rekey reports it: `Deployment`,
    /// `StatefulSet`, `DaemonSet`, `CronJob`, `Job`, `Pod`,
    /// `ExternalSecret`, or the kind of another pod owner.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Z][A-Za-z0-9]*$"))]
    pub kind: String,
    /// Name of the consumer.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// `Await`: its pods go away on their own (a Job that finishes, a
    /// workload something else restarts); rekey waits until none that
    /// started before the new value was synced is left. `ReloadsItself`:
    /// it reads the value again without a restart (files from a volume);
    /// exempt from the drain proof. `Accept`: it may keep the old value;
    /// exempt, with `reason` written down.
    pub handling: ConsumerHandlingMode,
    /// Why the consumer may keep the old value (required for `Accept`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub reason: Option<String>,
}

/// How a consumer that rekey does not restart is covered.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerHandlingMode {
    /// rekey waits until its pods that started before the sync are gone.
    Await,
    /// It reloads the value on its own; exempt from the drain proof.
    ReloadsItself,
    /// It may keep the old value; exempt, with a reason.
    Accept,
}
