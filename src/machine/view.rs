//! The per-reconcile view of one SecretRotation: the object, its parsed
//! plan, the status as read and as being rewritten, and the clock reading.
//! Status and conditions are changed here and written in one apply.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::providers::Proofs;
use super::{Context, MANAGER};
use crate::crd::{Phase, ProofItem, RotationStatus, SecretRotation, SecretRotationStatus};
use crate::decide;
use crate::error::{Error, Result};
use crate::metrics::RotationLabels;
use crate::plan::{Place, Plan, TargetPlan};
use crate::reason::Reason;
use crate::source::CredentialSource;
use crate::store::Store;
use crate::value::SecretValue;
use crate::wal::Wal;

/// Condition types rekey sets.
pub mod condition {
    /// kstatus: nothing requested is outstanding and the last rotation
    /// did not fail (see `decide::health`).
    pub const READY: &str = "Ready";
    /// kstatus: a requested rotation is in progress; the reason is its phase.
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the last rotation failed; a new request is needed.
    pub const STALLED: &str = "Stalled";
    /// Any rotation (scheduled ones too) is in progress; the reason is its phase.
    pub const ROTATING: &str = "Rotating";
    /// Proof is late relative to `oldValueValidFor`.
    pub const GRACE_WINDOW_AT_RISK: &str = "GraceWindowAtRisk";
    /// With `spec.schedule`: the next rotation is scheduled (False: the
    /// schedule cannot be served and no rotation will come from it).
    pub const SCHEDULED: &str = "Scheduled";
    /// A proven workload is also restarted by something else (e.g.
    /// Reloader): two rollouts per rotation, one of them wasted.
    pub const COMPETING_RESTARTER: &str = "CompetingRestarter";
}

pub struct View {
    pub sr: Arc<SecretRotation>,
    pub ctx: Arc<Context>,
    pub namespace: String,
    pub name: String,
    /// The spec, parsed once; phases that act on it ask for it with `plan()`.
    plan: Result<Plan>,
    /// The status as last written.
    pub written: SecretRotationStatus,
    /// The object's resourceVersion as last seen: every write is
    /// conditional on it, so a second controller (an upgrade, a lost lease)
    /// cannot overwrite a newer status.
    pub resource_version: Option<String>,
    /// The status being computed.
    pub status: SecretRotationStatus,
    pub now: Timestamp,
    /// The new value, read from the write-ahead record once per reconcile
    /// (the record does not change after Issuing).
    new_value: tokio::sync::OnceCell<SecretValue>,
}

impl View {
    pub fn new(sr: Arc<SecretRotation>, ctx: Arc<Context>) -> Self {
        let status = sr.status.clone().unwrap_or_default();
        Self {
            namespace: sr.namespace().unwrap_or_default(),
            name: sr.name_any(),
            plan: Plan::from_spec(&sr.spec),
            resource_version: sr.metadata.resource_version.clone(),
            written: status.clone(),
            status,
            now: (ctx.clock)(),
            new_value: tokio::sync::OnceCell::new(),
            sr,
            ctx,
        }
    }

    pub fn plan(&self) -> Result<&Plan> {
        self.plan.as_ref().map_err(Clone::clone)
    }

    pub fn annotations(&self) -> &BTreeMap<String, String> {
        self.sr.annotations()
    }

    pub fn rotation(&self) -> &RotationStatus {
        self.status.rotation.as_ref().expect("rotation in progress")
    }

    pub fn rotation_mut(&mut self) -> &mut RotationStatus {
        self.status.rotation.as_mut().expect("rotation in progress")
    }

    pub fn phase(&self) -> Phase {
        self.status.phase.unwrap_or(Phase::Pending)
    }

    /// Fingerprint of what a rotation acts on: a change after Issuing fails
    /// it. `proof.consumers` is left out: saying how a consumer found during
    /// the rotation is handled changes nothing already issued or proven.
    pub fn spec_fingerprint(&self) -> String {
        let spec = &self.sr.spec;
        let proof = crate::crd::Proof {
            consumers: vec![],
            ..spec.proof.clone()
        };
        crate::fingerprint::of_json(&(&spec.credential, &spec.targets, &proof))
    }

    pub fn labels(&self) -> RotationLabels {
        RotationLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    // ---- what the rotation acts on ----

    /// What proves the value at `place`: this cluster's readers, or a
    /// remote cluster's (whose API server must be an allowed host).
    pub async fn proofs(&self, place: &Place) -> Result<Proofs> {
        let providers = &self.ctx.providers;
        let Some(cluster) = &place.cluster else {
            return Ok(Proofs {
                sync: providers.sync(&self.namespace),
                rollouts: providers.rollouts(&self.namespace),
                consumers: providers.consumers(&self.namespace),
                server: None,
            });
        };
        let proofs = providers.remote(&self.namespace, cluster).await?;
        if let (Some(allowed), Some(server)) = (&self.ctx.allowed_hosts, &proofs.server)
            && !crate::plan::host_allowed(server, allowed)
        {
            return Err(Error::permanent(
                Reason::HostNotAllowed,
                place.say(
                    "the kubeconfig's server is a host outside this operator's --allowed-hosts",
                ),
            ));
        }
        Ok(proofs)
    }

    pub fn source(&self) -> Result<Box<dyn CredentialSource>> {
        let plan = self.plan()?;
        Ok(self.ctx.providers.source(
            &plan.source,
            &self.namespace,
            &self.name,
            &self.sr.spec.old_value_valid_for,
        ))
    }

    pub async fn store(&self, target: &TargetPlan) -> Result<Box<dyn Store>> {
        self.ctx
            .providers
            .store(target, &self.namespace, &self.name)
            .await
    }

    /// Runs a side effect through the leader fence (and, in a build with
    /// the `failpoints` feature, between its crash points `before:<what>`
    /// and `after:<what>`, see `crate::failpoint`).
    pub async fn act<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        crate::failpoint::around(what, self.ctx.fence.run(what, call)).await
    }

    pub fn wal(&self) -> Wal {
        Wal::new(self.ctx.client.clone(), &self.sr)
    }

    /// The new value, from the write-ahead record.
    pub async fn new_value(&self) -> Result<SecretValue> {
        let id = &self.rotation().id;
        let read = async {
            self.wal().read(id).await?.map(|r| r.new).ok_or_else(|| {
                Error::permanent(
                    Reason::WriteAheadRecordMissing,
                    format!("the write-ahead record of rotation {id} is gone"),
                )
            })
        };
        self.new_value.get_or_try_init(|| read).await.cloned()
    }

    /// Whether the current wait has run out of time. From Writing to
    /// Invalidating that is one deadline, `proof.timeout` after the new value
    /// was issued; other phases get `proof.timeout` each. A spec whose
    /// timeout does not parse has no budget left.
    pub fn phase_timed_out(&self) -> bool {
        let Ok(plan) = self.plan() else {
            return true;
        };
        let rot = self.rotation();
        if decide::under_proof_deadline(self.phase())
            && let Some(deadline) = &rot.proof_deadline
        {
            return self.now > deadline.0;
        }
        let since = rot
            .phase_started_at
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(self.now);
        decide::timed_out(since, plan.proof_timeout, self.now)
    }

    // ---- status ----

    pub fn written_condition_reason(&self, type_: &str) -> Option<&str> {
        self.written
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason.as_str())
    }

    pub fn has_condition(&self, type_: &str) -> bool {
        self.status.conditions.iter().any(|c| c.type_ == type_)
    }

    /// Sets the Rotating condition; once a value is issued its message also
    /// says until when the old value is valid and when the proof must be done.
    pub fn set_rotating(&mut self, message: &str) {
        let phase = self.phase().as_str();
        let rot = self.rotation();
        let mut message = message.to_string();
        if let Some(until) = &rot.old_value_valid_until {
            message.push_str(&format!("; old value valid until {}", until.0));
        }
        if let Some(deadline) = &rot.proof_deadline {
            message.push_str(&format!("; proof deadline {}", deadline.0));
        }
        self.set_condition(condition::ROTATING, "True", phase, &message);
    }

    /// Records where the proof stands for one ExternalSecret, workload or
    /// consumer: proven, or what is awaited.
    pub fn set_proof(
        &mut self,
        place: &Place,
        kind: &str,
        name: &str,
        waiting_for: Option<String>,
    ) {
        let item = ProofItem {
            cluster: place.cluster_name().into(),
            kind: kind.into(),
            name: name.into(),
            proven: waiting_for.is_none(),
            waiting_for: waiting_for.unwrap_or_default(),
        };
        let proof = &mut self.rotation_mut().proof;
        match proof
            .iter_mut()
            .find(|p| p.cluster == item.cluster && p.kind == item.kind && p.name == item.name)
        {
            Some(p) => *p = item,
            None => proof.push(item),
        }
    }

    pub fn set_condition(&mut self, type_: &str, status: &str, reason: &str, message: &str) {
        let generation = self.sr.metadata.generation;
        let now = self.now;
        let conditions = &mut self.status.conditions;
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = Time(now);
                }
                c.status = status.into();
                c.reason = reason.into();
                c.message = message.into();
                c.observed_generation = generation;
            }
            None => conditions.push(Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: generation,
                last_transition_time: Time(now),
            }),
        }
    }

    /// Sets the kstatus conditions from the status, and stamps every
    /// condition and the status with the generation this reconcile read:
    /// `kubectl wait` and kstatus ignore a condition older than the spec.
    fn set_health(&mut self) {
        let health = decide::health(&self.status);
        for (type_, c) in [
            (condition::READY, health.ready),
            (condition::RECONCILING, health.reconciling),
            (condition::STALLED, health.stalled),
        ] {
            self.set_condition(type_, c.status, &c.reason, &c.message);
        }
        let generation = self.sr.metadata.generation;
        for c in &mut self.status.conditions {
            c.observed_generation = generation;
        }
        self.status.observed_generation = generation;
    }

    /// Server-side applies the whole status, only when it changed, and only
    /// onto the object version this reconcile is based on.
    pub async fn write_status(&mut self) -> Result<()> {
        self.set_health();
        if self.status == self.written {
            return Ok(());
        }
        let api: Api<SecretRotation> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1",
            "kind": "SecretRotation",
            "metadata": {"resourceVersion": self.resource_version},
            "status": self.status,
        });
        let updated = api
            .patch_status(
                &self.name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|e| Error::kube("write status", e))?;
        self.resource_version = updated.resource_version();
        if let Some(rv) = updated.resource_version().and_then(|v| v.parse().ok()) {
            self.ctx
                .written
                .lock()
                .unwrap()
                .insert((self.namespace.clone(), self.name.clone()), rv);
        }
        self.written = self.status.clone();
        self.meter_status();
        if let Some(hook) = &self.ctx.on_status_written {
            hook(self.phase());
        }
        Ok(())
    }

    /// Sets the gauges that follow status from what it says now: the phase,
    /// when the phase in progress began, when the schedule asks for the next
    /// rotation; the grace gauges go with the rotation in progress. After
    /// each status write and at the start of each reconcile (a restarted
    /// operator, a new leader), so alerts see them without a transition.
    pub fn meter_status(&self) {
        let m = &self.ctx.metrics;
        if let Some(phase) = self.status.phase {
            m.set_phase(&self.namespace, &self.name, phase);
        }
        let rotation = self.status.rotation.as_ref();
        m.set_times(
            &self.namespace,
            &self.name,
            rotation.and_then(|r| r.phase_started_at.as_ref().map(|t| t.0)),
            self.status.next_rotation_at.as_ref().map(|t| t.0),
        );
        if rotation.is_none() {
            m.grace_seconds_left.remove(&self.labels());
            m.grace_window.remove(&self.labels());
        }
    }

    /// Publishes an Event about this SecretRotation (in the background).
    pub fn event(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Rotate".into(),
            secondary: None,
        };
        self.ctx.events.publish(event, self.sr.object_ref(&()));
    }
}
