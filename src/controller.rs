//! The SecretRotation controller: drives each rotation through its phases.
//!
//! Crash safety: every phase is recorded in status before its side effect,
//! and every side effect is idempotent per rotation id, so a restart at any
//! point re-runs the current phase without a second store version, a second
//! issue at the identity provider or a second rollout.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::crd::*;
use crate::decide::{self, Grace, Request, Served};
use crate::duration;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, PhaseOnly, ResultLabels, RotationLabels};
use crate::proof::eso::{ExternalSecrets, SyncState};
use crate::proof::rollout::{Workloads, restart_annotation};
use crate::source::{self, Invalidation};
use crate::store;
use crate::value::SecretValue;
use crate::wal::{Record, Wal};

/// Field manager of every write rekey makes.
pub const MANAGER: &str = "rekey";
const HISTORY_LIMIT: usize = 10;

pub const ALL_PHASES: [Phase; 14] = [
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

/// Shared by every reconcile.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub http: reqwest::Client,
    pub metrics: Metrics,
    /// How often waits (sync, rollout, approval) poll.
    pub poll: Duration,
    /// resourceVersion of the last status rekey wrote per object, to skip
    /// reconciles on a cache that has not caught up with that write yet.
    written: Arc<Mutex<HashMap<(String, String), u64>>>,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, poll: Duration) -> Self {
        let reporter = Reporter {
            controller: "rekey".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            metrics,
            poll,
            written: Arc::default(),
        }
    }
}

/// Runs the controller until a shutdown signal. `namespaces`: watch only these
/// (namespaced mode) or, when empty, the whole cluster.
pub async fn run(ctx: Context, namespaces: Vec<String>) {
    let ctx = Arc::new(ctx);
    let error_policy = |sr: Arc<SecretRotation>, err: &Error, ctx: Arc<Context>| {
        warn!(namespace = sr.namespace().unwrap_or_default(), name = sr.name_any(), error = %err, "reconcile failed");
        ctx.metrics
            .reconcile_errors
            .get_or_create(&RotationLabels {
                namespace: sr.namespace().unwrap_or_default(),
                name: sr.name_any(),
            })
            .inc();
        Action::requeue(Duration::from_secs(5))
    };
    let apis: Vec<Api<SecretRotation>> = if namespaces.is_empty() {
        vec![Api::all(ctx.client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(ctx.client.clone(), ns))
            .collect()
    };
    let runs = apis.into_iter().map(|api| {
        Controller::new(api, watcher::Config::default())
            .shutdown_on_signal()
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {})
    });
    futures::future::join_all(runs).await;
}

/// Entry point of one reconcile.
pub async fn reconcile(sr: Arc<SecretRotation>, ctx: Arc<Context>) -> Result<Action> {
    let key = (sr.namespace().unwrap_or_default(), sr.name_any());
    let rv: Option<u64> = sr.resource_version().and_then(|v| v.parse().ok());
    if let (Some(rv), Some(written)) = (rv, ctx.written.lock().unwrap().get(&key).copied())
        && rv < written
    {
        // Our own status write is not in the cache yet: wait for it.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    Reconciler::new(sr, ctx).run().await
}

/// What a phase step decided.
enum Step {
    /// Move to the next phase.
    Advance(Phase),
    /// Stay; poll again. The text says what is awaited (safe to show).
    Wait(String),
    /// End the rotation with this result.
    Finish(Phase),
}

struct Reconciler {
    sr: Arc<SecretRotation>,
    ctx: Arc<Context>,
    namespace: String,
    name: String,
    written: SecretRotationStatus,
    status: SecretRotationStatus,
    now: Timestamp,
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

impl Reconciler {
    fn new(sr: Arc<SecretRotation>, ctx: Arc<Context>) -> Self {
        let status = sr.status.clone().unwrap_or_default();
        Self {
            namespace: sr.namespace().unwrap_or_default(),
            name: sr.name_any(),
            written: status.clone(),
            status,
            sr,
            ctx,
            now: Timestamp::now(),
        }
    }

    fn annotations(&self) -> &BTreeMap<String, String> {
        self.sr.annotations()
    }

    fn rotation(&self) -> &RotationStatus {
        self.status.rotation.as_ref().expect("rotation in progress")
    }

    fn rotation_mut(&mut self) -> &mut RotationStatus {
        self.status.rotation.as_mut().expect("rotation in progress")
    }

    fn phase(&self) -> Phase {
        self.status.phase.unwrap_or(Phase::Pending)
    }

    fn proof_timeout(&self) -> Duration {
        duration::parse(&self.sr.spec.proof.timeout).unwrap_or(Duration::from_secs(1200))
    }

    fn grace_window(&self) -> Duration {
        duration::parse(&self.sr.spec.old_value_valid_for).unwrap_or(Duration::from_secs(1800))
    }

    fn labels(&self) -> RotationLabels {
        RotationLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    async fn run(mut self) -> Result<Action> {
        if self.status.rotation.is_none() {
            return self.idle().await;
        }
        self.watch_grace().await;
        self.note_pending_request();
        let changed = spec_fingerprint(&self.sr.spec) != self.rotation().spec_fingerprint;
        if changed
            && !matches!(
                self.phase(),
                Phase::Pending | Phase::AwaitingApproval | Phase::Preflight | Phase::RollingBack
            )
        {
            // What was issued, written and proven belongs to the old spec.
            return self
                .fail(Error::permanent(
                    "SpecChangedDuringRotation",
                    "spec.credential, targets or proof changed during the rotation; the old value was not invalidated. Request a new rotation",
                ))
                .await;
        }
        if changed {
            let fingerprint = spec_fingerprint(&self.sr.spec);
            self.rotation_mut().spec_fingerprint = fingerprint;
        }
        let phase = self.phase();
        let step = match phase {
            Phase::Pending => Ok(Step::Advance(
                if self.sr.spec.approval.as_ref().is_some_and(|a| a.required) {
                    Phase::AwaitingApproval
                } else {
                    Phase::Preflight
                },
            )),
            Phase::AwaitingApproval => Ok(self.awaiting_approval()),
            Phase::Preflight => self.preflight().await,
            Phase::Issuing => self.issuing().await,
            Phase::Writing => self.writing().await,
            Phase::AwaitingSync => self.awaiting_sync().await,
            Phase::AwaitingRollout => self.awaiting_rollout().await,
            Phase::Verifying => self.verifying().await,
            Phase::Invalidating | Phase::AwaitingConfirmation => self.invalidating().await,
            Phase::RollingBack => self.rolling_back().await,
            Phase::Succeeded | Phase::Failed | Phase::DryRunSucceeded => Ok(Step::Finish(phase)),
        };
        match step {
            Ok(Step::Advance(next)) => self.advance(next).await,
            Ok(Step::Wait(what)) => {
                self.set_rotating(&what);
                self.write_status().await?;
                Ok(Action::requeue(self.ctx.poll))
            }
            Ok(Step::Finish(result)) => self.finish(result).await,
            Err(e) if e.permanent => self.fail(e).await,
            Err(e) => {
                // Transient: retry, but not beyond the phase's time budget.
                if waits_for_a_person(phase) || !self.phase_timed_out() {
                    self.set_rotating(&format!("retrying after error: {e}"));
                    self.write_status().await?;
                    return Ok(Action::requeue(self.ctx.poll.max(Duration::from_secs(2))));
                }
                self.fail(Error::permanent(
                    e.reason,
                    format!(
                        "{} (gave up after {})",
                        e.message, self.sr.spec.proof.timeout
                    ),
                ))
                .await
            }
        }
    }

    // ---- idle: should a rotation start? ----

    async fn idle(&mut self) -> Result<Action> {
        let request = decide::rotation_request(
            &self.sr.spec,
            &Served::from_status(&self.status),
            self.annotations(),
            self.now,
        );
        if let Some(request) = request {
            return self.start(request).await;
        }
        let last_finished = self
            .status
            .last_rotation
            .as_ref()
            .and_then(|l| l.finished_at.as_ref())
            .map(|t| t.0);
        self.status.next_rotation_at = last_finished
            .and_then(|t| decide::next_rotation_at(self.sr.spec.schedule.as_ref(), t))
            .map(time);
        self.status.pending_request = None;
        self.status.observed_generation = self.sr.metadata.generation;
        if !self.status.conditions.iter().any(|c| c.type_ == "Rotating") {
            self.set_condition("Rotating", "False", "Idle", "No rotation in progress");
        }
        self.write_status().await?;
        let wake = self
            .status
            .next_rotation_at
            .as_ref()
            .map(|t| Duration::from_secs_f64(t.0.duration_since(self.now).as_secs_f64().max(1.0)))
            .unwrap_or(Duration::from_secs(600));
        Ok(Action::requeue(wake.min(Duration::from_secs(600))))
    }

    async fn start(&mut self, request: Request) -> Result<Action> {
        let id = new_rotation_id(self.now);
        self.status.rotation = Some(RotationStatus {
            id: id.clone(),
            reason: request.as_str().into(),
            trigger: self.sr.spec.trigger.clone(),
            rotate_request: self.annotations().get(decide::ROTATE_ANNOTATION).cloned(),
            requested_at: Some(MicroTime(self.now)),
            phase_started_at: Some(MicroTime(self.now)),
            spec_fingerprint: spec_fingerprint(&self.sr.spec),
            ..Default::default()
        });
        self.status.phase = Some(Phase::Pending);
        self.status.pending_request = None;
        self.status.observed_generation = self.sr.metadata.generation;
        if !self.status.conditions.iter().any(|c| c.type_ == "Ready") {
            self.set_condition(
                "Ready",
                "Unknown",
                "NotYetRotated",
                "The first rotation has not finished yet",
            );
        }
        self.set_condition(
            "GraceWindowAtRisk",
            "False",
            "NoRotationIssued",
            "No new value issued yet",
        );
        self.set_rotating(&format!("rotation {id} requested ({})", request.as_str()));
        self.write_status().await?;
        self.ctx
            .metrics
            .rotations_started
            .get_or_create(&self.labels())
            .inc();
        self.ctx
            .metrics
            .set_phase(&self.namespace, &self.name, "Pending");
        info!(namespace = %self.namespace, name = %self.name, rotation = %id, reason = request.as_str(), "rotation requested");
        self.event(
            EventType::Normal,
            "RotationRequested",
            format!("Rotation {id} requested: {}", request.as_str()),
        )
        .await;
        Ok(Action::requeue(self.ctx.poll))
    }

    /// A request that arrives during a rotation is kept (and shown) and served
    /// after it: the finished rotation records only what it served.
    fn note_pending_request(&mut self) {
        let rot = self.rotation();
        let served = Served {
            trigger: rot.trigger.as_deref(),
            rotate_request: rot.rotate_request.as_deref(),
            ever_rotated: true,
            next_rotation_at: None,
        };
        let pending =
            decide::rotation_request(&self.sr.spec, &served, self.annotations(), self.now);
        self.status.pending_request = pending.map(|r| r.as_str().to_string());
    }

    // ---- phases ----

    fn awaiting_approval(&self) -> Step {
        let id = &self.rotation().id;
        if self.annotations().get(decide::APPROVE_ANNOTATION) == Some(id) {
            Step::Advance(Phase::Preflight)
        } else {
            Step::Wait(format!(
                "waiting for approval: kubectl annotate secretrotation {} {}={id}",
                self.name,
                decide::APPROVE_ANNOTATION
            ))
        }
    }

    async fn preflight(&mut self) -> Result<Step> {
        let spec = &self.sr.spec;
        for (what, d) in [
            ("oldValueValidFor", &spec.old_value_valid_for),
            ("proof.timeout", &spec.proof.timeout),
        ] {
            if duration::parse(d).is_none() {
                return Err(Error::permanent(
                    "InvalidSpec",
                    format!("{what} is not a duration"),
                ));
            }
        }
        if let Some(cron) = spec.schedule.as_ref().and_then(|s| s.cron.as_deref())
            && !decide::cron_is_valid(cron)
        {
            return Err(Error::permanent(
                "InvalidSpec",
                "schedule.cron is not a valid cron expression",
            ));
        }
        if !spec.proof.nothing_to_prove && self.proof_timeout() >= self.grace_window() {
            return Err(Error::permanent(
                "GraceWindowTooShort",
                format!(
                    "proof.timeout ({}) must be shorter than oldValueValidFor ({}): a slow proof would outlive the old value",
                    spec.proof.timeout, spec.old_value_valid_for
                ),
            ));
        }
        let mut current = None;
        for target in &spec.targets {
            let store = store::for_target(target, &self.ctx, &self.namespace, &self.name).await?;
            store.preflight().await?;
            if current.is_none() {
                current = store.read_current().await?;
            }
        }
        source::for_rotation(&self.sr, &self.ctx)?
            .preflight(current.as_ref())
            .await?;
        let eso = ExternalSecrets::new(self.ctx.client.clone(), &self.namespace);
        for es in &spec.proof.external_secrets {
            eso.preflight(es).await?;
        }
        let workloads = Workloads::new(self.ctx.client.clone(), &self.namespace);
        let annotation = restart_annotation(&self.name);
        for w in &spec.proof.workloads {
            workloads.observe(w, &annotation).await?;
        }
        if spec.dry_run {
            return Ok(Step::Finish(Phase::DryRunSucceeded));
        }
        Ok(Step::Advance(Phase::Issuing))
    }

    async fn issuing(&mut self) -> Result<Step> {
        let id = self.rotation().id.clone();
        let wal = Wal::new(self.ctx.client.clone(), &self.sr);
        if wal.read(&id).await?.is_none() {
            // Capture every target's previous value before anything is written,
            // for onFailure: Rollback.
            let mut previous = BTreeMap::new();
            for target in &self.sr.spec.targets {
                if let Some(v) = store::for_target(target, &self.ctx, &self.namespace, &self.name)
                    .await?
                    .read_current()
                    .await?
                {
                    previous.insert(target.name.clone(), v);
                }
            }
            let source = source::for_rotation(&self.sr, &self.ctx)?;
            if self.rotation().issue_marker.is_none() {
                // Recorded before the side effect: a retry knows what it saw.
                let marker = source.prepare_issue().await?;
                let now = self.now;
                let rot = self.rotation_mut();
                rot.issue_marker = Some(marker);
                // The identity provider's grace clock starts with the issue call.
                rot.issued_at.get_or_insert(time(now));
                self.write_status().await?;
            }
            let marker = self.rotation().issue_marker.clone().unwrap_or_default();
            let new = source.issue(&id, &marker).await?;
            if previous.values().any(|p| p.same_as(&new)) {
                return Err(Error::permanent(
                    "NewValueNotNew",
                    "the source returned the value a target already holds",
                ));
            }
            wal.write(
                &self.sr,
                &Record {
                    rotation_id: id.clone(),
                    new,
                    previous,
                },
            )
            .await?;
        }
        let issued = self.now;
        let window = self.grace_window();
        let rot = self.rotation_mut();
        rot.issued_at.get_or_insert(time(issued));
        let issued = rot.issued_at.as_ref().unwrap().0;
        rot.old_value_valid_until = issued
            .checked_add(jiff::SignedDuration::try_from(window).unwrap_or_default())
            .ok()
            .map(time);
        Ok(Step::Advance(Phase::Writing))
    }

    async fn new_value(&self) -> Result<SecretValue> {
        let id = &self.rotation().id;
        Wal::new(self.ctx.client.clone(), &self.sr)
            .read(id)
            .await?
            .map(|r| r.new)
            .ok_or_else(|| {
                Error::permanent(
                    "WriteAheadRecordMissing",
                    format!("the write-ahead record of rotation {id} is gone"),
                )
            })
    }

    async fn writing(&mut self) -> Result<Step> {
        let value = self.new_value().await?;
        let id = self.rotation().id.clone();
        for target in self.sr.spec.targets.clone() {
            let store = store::for_target(&target, &self.ctx, &self.namespace, &self.name).await?;
            if !self
                .rotation()
                .targets
                .iter()
                .any(|t| t.name == target.name)
            {
                // Recorded before the write: a write whose answer is lost is
                // still rolled back.
                self.rotation_mut().targets.push(TargetStatus {
                    name: target.name.clone(),
                    version: "pending".into(),
                    written_at: None,
                });
                self.write_status().await?;
            }
            let started = std::time::Instant::now();
            let result = store.write(&value, &id).await;
            self.ctx.metrics.provider_call(
                store::provider_of(&target),
                "write",
                if result.is_ok() { "success" } else { "error" },
                started.elapsed(),
            );
            let version = result.map_err(|e| Error {
                message: format!("target {}: {}", target.name, e.message),
                ..e
            })?;
            let now = self.now;
            let rot = self.rotation_mut();
            rot.targets.retain(|t| t.name != target.name);
            rot.targets.push(TargetStatus {
                name: target.name.clone(),
                version,
                written_at: Some(time(now)),
            });
        }
        if self.sr.spec.proof.nothing_to_prove {
            return Ok(Step::Advance(Phase::Verifying));
        }
        // Baselines for Await mode, recorded before the refresh request.
        let workloads = Workloads::new(self.ctx.client.clone(), &self.namespace);
        let annotation = restart_annotation(&self.name);
        let mut baselines = vec![];
        for w in &self.sr.spec.proof.workloads {
            let o = workloads.observe(w, &annotation).await?;
            baselines.push(WorkloadBaseline {
                kind: w.kind,
                name: w.name.clone(),
                template: o.template.clone(),
            });
        }
        self.rotation_mut().workload_baselines = baselines;
        Ok(Step::Advance(Phase::AwaitingSync))
    }

    fn phase_timed_out(&self) -> bool {
        let since = self
            .rotation()
            .phase_started_at
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(self.now);
        decide::timed_out(since, self.proof_timeout(), self.now)
    }

    async fn awaiting_sync(&mut self) -> Result<Step> {
        let value = self.new_value().await?;
        let id = self.rotation().id.clone();
        match self.sync_state(&value, &id).await? {
            None => {
                self.rotation_mut().synced_at = Some(time(self.now));
                Ok(Step::Advance(Phase::AwaitingRollout))
            }
            Some(waiting) if self.phase_timed_out() => Err(Error::permanent(
                "SyncTimeout",
                format!(
                    "the new value was not synced within {}: {waiting}",
                    self.sr.spec.proof.timeout
                ),
            )),
            Some(waiting) => Ok(Step::Wait(waiting)),
        }
    }

    /// Requests a refresh of every ExternalSecret (idempotent per token) and
    /// returns what is still awaited, or None when all hold `expected`.
    async fn sync_state(&self, expected: &SecretValue, token: &str) -> Result<Option<String>> {
        let eso = ExternalSecrets::new(self.ctx.client.clone(), &self.namespace);
        let mut waiting = vec![];
        for es in &self.sr.spec.proof.external_secrets {
            if let SyncState::Waiting(why) = eso.refresh_and_check(es, token, expected).await? {
                waiting.push(why);
            }
        }
        Ok((!waiting.is_empty()).then(|| waiting.join("; ")))
    }

    async fn awaiting_rollout(&mut self) -> Result<Step> {
        let rot = self.rotation().clone();
        let workloads = Workloads::new(self.ctx.client.clone(), &self.namespace);
        let annotation = restart_annotation(&self.name);
        let mut waiting = vec![];
        for w in &self.sr.spec.proof.workloads {
            let o = workloads.observe(w, &annotation).await?;
            let restarted = match self.sr.spec.proof.restart {
                RestartMode::Trigger => {
                    if o.stamped.as_deref() != Some(rot.id.as_str()) {
                        workloads.restart(w, &annotation, &rot.id).await?;
                        waiting.push(format!("{:?} {} restarting", w.kind, w.name));
                        continue;
                    }
                    true
                }
                RestartMode::Await => rot
                    .workload_baselines
                    .iter()
                    .find(|b| b.kind == w.kind && b.name == w.name)
                    .is_some_and(|b| o.template != b.template),
            };
            if !restarted {
                waiting.push(format!(
                    "{:?} {} not restarted yet (restart: Await)",
                    w.kind, w.name
                ));
            } else if !decide::rollout_complete(&o.facts) {
                waiting.push(format!(
                    "{:?} {} rolling out ({}/{} updated, {} ready, {} available)",
                    w.kind,
                    w.name,
                    o.facts.updated,
                    o.facts.desired,
                    o.facts.ready,
                    o.facts.available
                ));
            }
        }
        if waiting.is_empty() {
            self.rotation_mut().rolled_out_at = Some(time(self.now));
            return Ok(Step::Advance(Phase::Verifying));
        }
        let waiting = waiting.join("; ");
        if self.phase_timed_out() {
            return Err(Error::permanent(
                "RolloutTimeout",
                format!(
                    "the rollout did not complete within {}: {waiting}",
                    self.sr.spec.proof.timeout
                ),
            ));
        }
        Ok(Step::Wait(waiting))
    }

    async fn verifying(&mut self) -> Result<Step> {
        let value = self.new_value().await?;
        source::for_rotation(&self.sr, &self.ctx)?
            .verify(&value)
            .await?;
        Ok(Step::Advance(Phase::Invalidating))
    }

    async fn invalidating(&mut self) -> Result<Step> {
        let id = self.rotation().id.clone();
        let outcome = source::for_rotation(&self.sr, &self.ctx)?
            .invalidate(&id, self.annotations())
            .await
            .map_err(|e| Error {
                reason: "InvalidationFailed",
                ..e
            })?;
        Ok(match (outcome, self.phase()) {
            (Invalidation::Done, _) => Step::Finish(Phase::Succeeded),
            (Invalidation::NeedsConfirmation, Phase::Invalidating) => {
                Step::Advance(Phase::AwaitingConfirmation)
            }
            (Invalidation::NeedsConfirmation, _) => Step::Wait(format!(
                "invalidate the old value at the identity provider, then: kubectl annotate secretrotation {} {}={id}",
                self.name,
                decide::CONFIRM_ANNOTATION
            )),
        })
    }

    async fn rolling_back(&mut self) -> Result<Step> {
        let rot = self.rotation().clone();
        let token = format!("{}-rollback", rot.id);
        let record = Wal::new(self.ctx.client.clone(), &self.sr)
            .read(&rot.id)
            .await?
            .ok_or_else(|| {
                Error::permanent(
                    "WriteAheadRecordMissing",
                    "the previous values are gone; nothing to roll back to",
                )
            })?;
        for written in &rot.targets {
            let (Some(target), Some(previous)) = (
                self.sr.spec.targets.iter().find(|t| t.name == written.name),
                record.previous.get(&written.name),
            ) else {
                continue;
            };
            let store = store::for_target(target, &self.ctx, &self.namespace, &self.name).await?;
            // Only a target that holds the new value has something to undo
            // (a write may have failed, or this is a retry after restoring).
            if store
                .read_current()
                .await?
                .is_some_and(|c| c.same_as(&record.new))
            {
                store.restore(previous, &rot.id).await?;
            }
        }
        // Proven when no ExternalSecret delivers the new value any more (one
        // that never received it has nothing to undo).
        let eso = ExternalSecrets::new(self.ctx.client.clone(), &self.namespace);
        let mut waiting = vec![];
        for es in &self.sr.spec.proof.external_secrets {
            if eso.refresh_and_check(es, &token, &record.new).await? == SyncState::Synced {
                waiting.push(format!(
                    "ExternalSecret {} still delivers the new value",
                    es.name
                ));
            }
        }
        if waiting.is_empty() {
            self.rotation_mut().rolled_back = true;
            return Ok(Step::Finish(Phase::Failed));
        }
        if self.phase_timed_out() {
            return Err(Error::permanent(
                "RollbackTimeout",
                format!("rollback not synced: {}", waiting.join("; ")),
            ));
        }
        Ok(Step::Wait(waiting.join("; ")))
    }

    // ---- transitions ----

    fn close_phase(&mut self) {
        let now = self.now;
        let phase = self.phase();
        let rot = self.rotation_mut();
        let since = rot.phase_started_at.as_ref().map(|t| t.0).unwrap_or(now);
        let seconds = (now.duration_since(since).as_secs_f64() * 1000.0).round() / 1000.0;
        rot.phases.push(PhaseTiming { phase, seconds });
        rot.phase_started_at = Some(MicroTime(now));
        self.ctx
            .metrics
            .phase_duration
            .get_or_create(&PhaseOnly {
                phase: format!("{phase:?}"),
            })
            .observe(seconds);
    }

    async fn advance(&mut self, next: Phase) -> Result<Action> {
        let from = self.phase();
        self.close_phase();
        self.status.phase = Some(next);
        let rot = self.rotation().clone();
        self.set_rotating(&format!("rotation {}: {next:?}", rot.id));
        self.write_status().await?;
        self.ctx
            .metrics
            .set_phase(&self.namespace, &self.name, &format!("{next:?}"));
        let mut note = format!("Rotation {}: {from:?} -> {next:?}", rot.id);
        if from == Phase::Writing {
            let versions: Vec<String> = rot
                .targets
                .iter()
                .map(|t| format!("{}={}", t.name, t.version))
                .collect();
            note.push_str(&format!(" (versions written: {})", versions.join(", ")));
        }
        info!(namespace = %self.namespace, name = %self.name, rotation = %rot.id, from = ?from, to = ?next, "phase changed");
        self.event(EventType::Normal, &format!("{next:?}"), note)
            .await;
        if next == Phase::AwaitingConfirmation {
            let msg = format!(
                "Rotation {}: the new value is proven. Invalidate the old value at the identity provider now, then run: kubectl annotate secretrotation -n {} {} {}={}",
                rot.id,
                self.namespace,
                self.name,
                decide::CONFIRM_ANNOTATION,
                rot.id
            );
            self.event(EventType::Normal, "InvalidateOldValue", msg)
                .await;
        }
        Ok(Action::requeue(self.ctx.poll))
    }

    async fn fail(&mut self, err: Error) -> Result<Action> {
        let phase = self.phase();
        warn!(namespace = %self.namespace, name = %self.name, rotation = %self.rotation().id, reason = err.reason, error = %err.message, "rotation failing");
        let issued = self.rotation().issued_at.is_some();
        let old_value_expires =
            source::for_rotation(&self.sr, &self.ctx).is_ok_and(|s| s.old_value_expires());
        let mut rollback = self.sr.spec.on_failure == FailurePolicy::Rollback
            && !self.rotation().targets.is_empty()
            && err.reason != "SpecChangedDuringRotation"
            && !matches!(
                phase,
                Phase::RollingBack | Phase::Invalidating | Phase::AwaitingConfirmation
            );
        let mut note = String::new();
        if rollback && issued && old_value_expires {
            // Writing the old value back would hand out a value the identity
            // provider expires on its own timer: keep the new (valid) one.
            rollback = false;
            note = "; onFailure Rollback not applied: the identity provider expires the old value at the end of its grace window, the new value stays in the stores".into();
        }
        if phase == Phase::RollingBack {
            let f = self.rotation_mut().failure.get_or_insert(Failure {
                reason: err.reason.into(),
                message: String::new(),
                phase,
            });
            f.message = format!("{}; rollback failed: {}", f.message, err.message);
        } else {
            self.rotation_mut().failure = Some(Failure {
                reason: err.reason.into(),
                message: format!("{}{note}", err.message),
                phase,
            });
        }
        if rollback {
            return self.advance(Phase::RollingBack).await;
        }
        self.finish(Phase::Failed).await
    }

    async fn finish(&mut self, result: Phase) -> Result<Action> {
        self.close_phase();
        let rot = self.rotation().clone();
        let started = rot.requested_at.as_ref().map(|t| t.0).unwrap_or(self.now);
        let summary = RotationSummary {
            id: rot.id.clone(),
            result,
            reason: rot.reason.clone(),
            failure: rot.failure.clone(),
            started_at: rot.requested_at.as_ref().map(|t| time(t.0)),
            finished_at: Some(time(self.now)),
            duration_seconds: (self.now.duration_since(started).as_secs_f64() * 1000.0).round()
                / 1000.0,
            phases: rot.phases.clone(),
            targets: rot.targets.clone(),
            rolled_back: result == Phase::Failed && rot.rolled_back,
            grace_exceeded: rot.issued_at.as_ref().is_some_and(|t| {
                decide::grace(t.0, self.grace_window(), self.now) == Grace::Exceeded
            }),
        };
        self.status.history.insert(0, summary.clone());
        self.status.history.truncate(HISTORY_LIMIT);
        self.status.last_rotation = Some(summary.clone());
        self.status.observed_trigger = rot.trigger.clone();
        self.status.observed_rotate_request = rot.rotate_request.clone();
        self.status.next_rotation_at =
            decide::next_rotation_at(self.sr.spec.schedule.as_ref(), self.now).map(time);
        self.status.rotation = None;
        self.status.phase = Some(result);
        let (event_type, reason, message) = match (result, &rot.failure) {
            (Phase::Failed, Some(f)) => {
                let kept = if summary.rolled_back {
                    "the previous value was written back to every target; the old value stays valid"
                } else {
                    "targets left as they are (onFailure: Hold); the old value stays valid"
                };
                self.set_condition(
                    "Ready",
                    "False",
                    &f.reason,
                    &format!("Rotation {} failed in {:?}: {}", rot.id, f.phase, f.message),
                );
                (
                    EventType::Warning,
                    "RotationFailed",
                    format!(
                        "Rotation {} failed in {:?}: {} ({}): {kept}",
                        rot.id, f.phase, f.reason, f.message
                    ),
                )
            }
            (Phase::DryRunSucceeded, _) => {
                self.set_condition(
                    "Ready",
                    "True",
                    "DryRunSucceeded",
                    &format!("Dry run {}: every preflight check passed", rot.id),
                );
                (
                    EventType::Normal,
                    "DryRunSucceeded",
                    format!(
                        "Dry run {}: every preflight check passed; nothing was changed",
                        rot.id
                    ),
                )
            }
            _ => {
                let versions: Vec<String> = rot
                    .targets
                    .iter()
                    .map(|t| format!("{}={}", t.name, t.version))
                    .collect();
                self.set_condition(
                    "Ready",
                    "True",
                    "Rotated",
                    &format!("Rotation {} succeeded", rot.id),
                );
                (
                    EventType::Normal,
                    "RotationSucceeded",
                    format!(
                        "Rotation {} succeeded in {:.0}s (versions: {}); the old value is retired",
                        rot.id,
                        summary.duration_seconds,
                        versions.join(", ")
                    ),
                )
            }
        };
        self.set_condition(
            "Rotating",
            "False",
            &format!("{result:?}"),
            &format!("Rotation {} ended: {result:?}", rot.id),
        );
        if !summary.grace_exceeded {
            self.set_condition(
                "GraceWindowAtRisk",
                "False",
                "WithinGraceWindow",
                "The last rotation ended within the grace window",
            );
        }
        self.write_status().await?;

        let m = &self.ctx.metrics;
        m.rotations_finished
            .get_or_create(&ResultLabels {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                result: format!("{result:?}"),
                reason: rot
                    .failure
                    .as_ref()
                    .map(|f| f.reason.clone())
                    .unwrap_or_default(),
            })
            .inc();
        m.rotation_duration
            .get_or_create(&PhaseOnly {
                phase: format!("{result:?}"),
            })
            .observe(summary.duration_seconds);
        m.set_phase(&self.namespace, &self.name, &format!("{result:?}"));
        m.grace_seconds_left.remove(&self.labels());
        info!(namespace = %self.namespace, name = %self.name, rotation = %rot.id, result = ?result, "rotation finished");
        self.event(event_type, reason, message).await;
        // No copy of the value lingers. A failed delete is retried by the
        // next rotation, which replaces the record.
        if let Err(e) = Wal::new(self.ctx.client.clone(), &self.sr).delete().await {
            warn!(namespace = %self.namespace, name = %self.name, error = %e, "could not delete the write-ahead record");
        }
        Ok(Action::requeue(self.ctx.poll))
    }

    /// Grace-aware: warns once (Event + condition) when proof is late.
    async fn watch_grace(&mut self) {
        let Some(issued) = self.rotation().issued_at.as_ref().map(|t| t.0) else {
            return;
        };
        let window = self.grace_window();
        self.ctx
            .metrics
            .grace_seconds_left
            .get_or_create(&self.labels())
            .set(decide::grace_left(issued, window, self.now));
        let state = decide::grace(issued, window, self.now);
        if state == Grace::Ok
            || matches!(
                self.phase(),
                Phase::Invalidating | Phase::AwaitingConfirmation
            )
        {
            return;
        }
        let (reason, msg) = match state {
            Grace::Exceeded => (
                "GraceWindowExceeded",
                "the old value's grace window has ended before proof: it may already be invalid at the identity provider",
            ),
            _ => (
                "GraceWindowAtRisk",
                "less than 20% of the old value's grace window is left and the proof is not complete",
            ),
        };
        let id = self.rotation().id.clone();
        let message = format!(
            "Rotation {id} in {:?}: {msg} (oldValueValidFor {})",
            self.phase(),
            self.sr.spec.old_value_valid_for
        );
        self.set_condition("GraceWindowAtRisk", "True", reason, &message);
        let warned = self.rotation().grace_warned;
        if !warned
            || state == Grace::Exceeded
                && self.written_condition_reason("GraceWindowAtRisk") != Some(reason)
        {
            self.rotation_mut().grace_warned = true;
            warn!(namespace = %self.namespace, name = %self.name, rotation = %id, reason, "grace window at risk");
            self.event(EventType::Warning, reason, message).await;
        }
    }

    // ---- status helpers ----

    fn written_condition_reason(&self, type_: &str) -> Option<&str> {
        self.written
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason.as_str())
    }

    fn set_rotating(&mut self, message: &str) {
        let phase = format!("{:?}", self.phase());
        self.set_condition("Rotating", "True", &phase, message);
    }

    fn set_condition(&mut self, type_: &str, status: &str, reason: &str, message: &str) {
        let generation = self.sr.metadata.generation;
        let now = self.now;
        let conditions = &mut self.status.conditions;
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = time(now);
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
                last_transition_time: time(now),
            }),
        }
    }

    /// Server-side applies the whole status, and only when it changed.
    async fn write_status(&mut self) -> Result<()> {
        if self.status == self.written {
            return Ok(());
        }
        let api: Api<SecretRotation> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1",
            "kind": "SecretRotation",
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
        if let Some(rv) = updated.resource_version().and_then(|v| v.parse().ok()) {
            self.ctx
                .written
                .lock()
                .unwrap()
                .insert((self.namespace.clone(), self.name.clone()), rv);
        }
        self.written = self.status.clone();
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Rotate".into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &self.sr.object_ref(&()))
            .await
        {
            warn!(error = %e, "could not publish event");
        }
    }
}

fn waits_for_a_person(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::AwaitingApproval | Phase::AwaitingConfirmation | Phase::Invalidating
    )
}

/// Fingerprint of what a rotation acts on.
fn spec_fingerprint(spec: &SecretRotationSpec) -> String {
    crate::fingerprint::of_json(&(&spec.credential, &spec.targets, &spec.proof))
}

/// A rotation id: sortable by time, unique, safe as an idempotency key.
pub fn new_rotation_id(now: Timestamp) -> String {
    use rand::RngExt;
    let suffix: u32 = rand::rng().random();
    format!("{}-{:08x}", now.strftime("%Y%m%d-%H%M%S"), suffix)
}
