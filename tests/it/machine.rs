//! The rotation machine at the reconciler level: the real API server from the
//! harness holds the SecretRotation, its status and the write-ahead record;
//! the source, the stores, ESO and the workloads are in-memory fakes that
//! record every call and keep their state across a simulated crash.
//!
//! The machine is stopped (a panic in the reconcile task: no cleanup, no
//! further write, like SIGKILL) right after every side effect and every
//! status write of a clean run, in turn. A new context (no caches, no
//! own-writes map) then resumes from what was persisted. Every stop point
//! must end with exactly one issue, one version per store, one rollout, the
//! old value invalidated only after the proof, and every place holding the
//! same new value.

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use kube::Api;
use kube::Client;
use rekey::crd::{ExternalSecretProof, Phase, SecretRotation, WorkloadRef};
use rekey::decide::RolloutFacts;
use rekey::decide::consumers::{Census, PodUse};
use rekey::error::Result;
use rekey::machine::{self, Context, Providers};
use rekey::plan::{SourcePlan, TargetPlan};
use rekey::proof::eso::SyncState;
use rekey::proof::rollout::Observed;
use rekey::proof::{ConsumerProof, RolloutProof, SyncProof};
use rekey::source::{CredentialSource, Invalidation};
use rekey::store::Store;
use rekey::value::SecretValue;
use serde_json::json;

const TARGETS: [&str; 2] = ["dev-stage", "prod"];

/// Everything outside the machine, kept across crashes.
#[derive(Default)]
struct World {
    /// The value every store held before the rotation.
    old: String,
    /// New values the source created, by rotation id.
    issued: Vec<(String, String)>,
    /// Versions per store: (rotation id, value).
    stores: BTreeMap<String, Vec<(String, String)>>,
    /// What the ExternalSecret delivers, and the refresh tokens it received.
    delivered: String,
    refreshes: Vec<String>,
    /// Restart stamp, rollouts and observations left until a rollout completes.
    stamp: Option<String>,
    rollouts: u32,
    rollout_observations_left: u32,
    /// Each invalidate call: (rotation id, whether the proof held at that moment).
    invalidations: Vec<(String, bool)>,
    /// Every side effect and status write, in order.
    effects: Vec<String>,
    /// Stop the machine after this many more effects.
    budget: Option<usize>,
    /// Another writer replaces the prod value while the source verifies
    /// (between the proof and the invalidation).
    intrude_on_verify: bool,
}

impl World {
    fn new() -> World {
        let old = common::canary("old");
        World {
            stores: TARGETS
                .iter()
                .map(|t| (t.to_string(), vec![("initial".into(), old.clone())]))
                .collect(),
            delivered: old.clone(),
            old,
            ..Default::default()
        }
    }

    fn current(&self, target: &str) -> String {
        self.stores[target].last().unwrap().1.clone()
    }

    fn new_value(&self) -> Option<&str> {
        self.issued.first().map(|(_, v)| v.as_str())
    }
}

type Shared = Arc<Mutex<World>>;

/// Records an effect; panics (the crash) when the budget runs out. The lock
/// is released before the panic, so the world stays usable.
fn effect(world: &Shared, what: String) {
    let crash = {
        let mut w = world.lock().unwrap();
        w.effects.push(what.clone());
        match w.budget.as_mut() {
            Some(0) => unreachable!(),
            Some(1) => {
                w.budget = None;
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    };
    if crash {
        panic!("simulated crash after {what}");
    }
}

struct FakeSource(Shared);

#[async_trait]
impl CredentialSource for FakeSource {
    async fn preflight(&self, _current: Option<&SecretValue>) -> Result<()> {
        Ok(())
    }
    async fn issue(
        &self,
        rotation_id: &str,
        _marker: &str,
        _earlier_attempt: Option<jiff::Timestamp>,
    ) -> Result<SecretValue> {
        let existing = {
            let w = self.0.lock().unwrap();
            w.issued
                .iter()
                .find(|(id, _)| id == rotation_id)
                .map(|(_, v)| v.clone())
        };
        if let Some(v) = existing {
            return Ok(SecretValue::new(v));
        }
        let v = common::canary("new");
        self.0
            .lock()
            .unwrap()
            .issued
            .push((rotation_id.into(), v.clone()));
        effect(&self.0, "source.issue".into());
        Ok(SecretValue::new(v))
    }
    async fn verify(&self, _value: &SecretValue) -> Result<()> {
        let mut w = self.0.lock().unwrap();
        if w.intrude_on_verify {
            w.stores
                .get_mut(TARGETS[1])
                .unwrap()
                .push(("someone-else".into(), common::canary("intruder")));
        }
        Ok(())
    }
    async fn invalidate(
        &self,
        rotation_id: &str,
        _annotations: &BTreeMap<String, String>,
        _distributed: &SecretValue,
    ) -> Result<Invalidation> {
        {
            let mut w = self.0.lock().unwrap();
            let new = w.new_value().unwrap_or_default().to_string();
            let proven = TARGETS.iter().all(|t| w.current(t) == new)
                && w.delivered == new
                && w.stamp.as_deref() == Some(rotation_id)
                && w.rollout_observations_left == 0;
            w.invalidations.push((rotation_id.into(), proven));
        }
        effect(&self.0, "source.invalidate".into());
        Ok(Invalidation::Done)
    }
}

struct FakeStore {
    world: Shared,
    target: String,
}

#[async_trait]
impl Store for FakeStore {
    async fn read_current(&self) -> Result<Option<SecretValue>> {
        Ok(Some(SecretValue::new(
            self.world.lock().unwrap().current(&self.target),
        )))
    }
    async fn write(&self, value: &SecretValue, rotation_id: &str) -> Result<String> {
        let version = {
            let mut w = self.world.lock().unwrap();
            let versions = w.stores.get_mut(&self.target).unwrap();
            if let Some(i) = versions
                .iter()
                .position(|(id, v)| id == rotation_id && v == value.expose())
            {
                return Ok(format!("v{i}"));
            }
            versions.push((rotation_id.into(), value.expose().to_string()));
            format!("v{}", versions.len() - 1)
        };
        effect(&self.world, format!("store.write {}", self.target));
        Ok(version)
    }
    async fn preflight(&self) -> Result<Option<SecretValue>> {
        self.read_current().await
    }
}

struct FakeSync(Shared);

#[async_trait]
impl SyncProof for FakeSync {
    async fn preflight(
        &self,
        _proof: &ExternalSecretProof,
        _current: &[SecretValue],
    ) -> Result<()> {
        Ok(())
    }
    async fn refresh_and_check(
        &self,
        _proof: &ExternalSecretProof,
        token: &str,
        expected: &SecretValue,
        synced_after: Option<&str>,
    ) -> Result<SyncState> {
        assert_eq!(synced_after.is_some(), !token.ends_with("-rollback"));
        let requested = {
            let mut w = self.0.lock().unwrap();
            if w.refreshes.iter().any(|t| t == token) {
                false
            } else {
                // ESO reads the first store (dev-stage) when asked to refresh.
                w.refreshes.push(token.into());
                w.delivered = w.current(TARGETS[0]);
                true
            }
        };
        if requested {
            effect(&self.0, "eso.refresh".into());
        }
        let now = format!("synced-{}", self.0.lock().unwrap().refreshes.len());
        if synced_after == Some(now.as_str()) {
            return Ok(SyncState::Waiting("not synced since the request".into()));
        }
        Ok(self.state(expected))
    }
    async fn synced_version(&self, _proof: &ExternalSecretProof) -> Result<String> {
        Ok(format!("synced-{}", self.0.lock().unwrap().refreshes.len()))
    }
    async fn synced_at(&self, _proof: &ExternalSecretProof) -> Result<Option<jiff::Timestamp>> {
        Ok(None)
    }
    async fn check(
        &self,
        _proof: &ExternalSecretProof,
        expected: &SecretValue,
    ) -> Result<SyncState> {
        Ok(self.state(expected))
    }
}

impl FakeSync {
    fn state(&self, expected: &SecretValue) -> SyncState {
        let delivered = &self.0.lock().unwrap().delivered;
        if delivered == expected.expose() {
            SyncState::Synced
        } else if delivered.is_empty() {
            SyncState::Waiting("not synced".into())
        } else {
            SyncState::ReadyWithOtherValue("another value".into())
        }
    }
}

struct FakeRollouts(Shared);

#[async_trait]
impl RolloutProof for FakeRollouts {
    async fn observe(&self, _w: &WorkloadRef, _annotation: &str) -> Result<Observed> {
        let mut w = self.0.lock().unwrap();
        let complete = w.rollout_observations_left == 0;
        w.rollout_observations_left = w.rollout_observations_left.saturating_sub(1);
        let n = if complete { 1 } else { 0 };
        Ok(Observed {
            facts: RolloutFacts {
                generation: 1,
                observed_generation: 1,
                desired: 1,
                current: 1,
                updated: n,
                ready: n,
                available: n,
                revisions_converged: complete,
            },
            stamped: w.stamp.clone(),
            template: format!("template-{}", w.rollouts),
            stuck: None,
            other_restarters: vec![],
        })
    }
    async fn restart(&self, _w: &WorkloadRef, _annotation: &str, rotation_id: &str) -> Result<()> {
        {
            let mut w = self.0.lock().unwrap();
            w.stamp = Some(rotation_id.into());
            w.rollouts += 1;
            w.rollout_observations_left = 2;
        }
        effect(&self.0, "workload.restart".into());
        Ok(())
    }
    async fn oldest_pod(&self, _w: &WorkloadRef) -> Result<Option<jiff::Timestamp>> {
        Ok(None)
    }
}

struct FakeProviders(Shared);

#[async_trait]
impl Providers for FakeProviders {
    fn source(&self, _: &SourcePlan, _: &str, _: &str, _: &str) -> Box<dyn CredentialSource> {
        Box::new(FakeSource(self.0.clone()))
    }
    async fn store(&self, target: &TargetPlan, _: &str, _: &str) -> Result<Box<dyn Store>> {
        Ok(Box::new(FakeStore {
            world: self.0.clone(),
            target: target.name.clone(),
        }))
    }
    fn sync(&self, _: &str) -> Arc<dyn SyncProof> {
        Arc::new(FakeSync(self.0.clone()))
    }
    fn rollouts(&self, _: &str) -> Arc<dyn RolloutProof> {
        Arc::new(FakeRollouts(self.0.clone()))
    }
    fn consumers(&self, _: &str) -> Arc<dyn ConsumerProof> {
        Arc::new(NoOtherConsumers)
    }
    async fn remote(
        &self,
        _: &str,
        cluster: &rekey::crd::RemoteCluster,
    ) -> Result<rekey::machine::providers::Proofs> {
        // These specs name no remote cluster.
        unreachable!("no remote cluster in these specs: {}", cluster.name)
    }
    fn changes(
        &self,
        _: &rekey::crd::ChangeRequests,
        _: &str,
    ) -> Box<dyn rekey::change::ChangeSystem> {
        // These specs open no change requests.
        Box::new(rekey::change::Unconfigured)
    }
}

/// The fake workload is the only consumer, and its pods all run the new value.
struct NoOtherConsumers;

#[async_trait]
impl ConsumerProof for NoOtherConsumers {
    async fn census(&self, _proven: &[String], _direct: &[String]) -> Result<Census> {
        Ok(Census::default())
    }
    async fn pods(&self) -> Result<Vec<PodUse>> {
        Ok(vec![])
    }
}

/// A fresh process: no caches, no own-writes map. The clock moves one
/// second per reading, from a fixed start.
fn context(client: &Client, world: &Shared, clock: &Arc<Mutex<Timestamp>>) -> Arc<Context> {
    let clock = clock.clone();
    let mut ctx = Context::with(
        client.clone(),
        rekey::metrics::Metrics::new(),
        Duration::from_millis(10),
        Arc::new(FakeProviders(world.clone())),
        Arc::new(move || {
            let mut t = clock.lock().unwrap();
            *t = t.checked_add(jiff::SignedDuration::from_secs(1)).unwrap();
            *t
        }),
    );
    let w = world.clone();
    ctx.on_status_written = Some(Arc::new(move |phase: Phase| {
        effect(&w, format!("status {phase}"))
    }));
    Arc::new(ctx)
}

struct Run {
    result: Option<Phase>,
    failure: Option<rekey::crd::Failure>,
    crashed_after: Option<String>,
    wal_left: bool,
}

/// Drives one SecretRotation to its end, crashing once after `stop_after`
/// effects (None: a clean run).
async fn run(
    client: &Client,
    ns: &str,
    name: &str,
    world: &Shared,
    stop_after: Option<usize>,
) -> Run {
    run_with_timeout(client, ns, name, world, stop_after, "10m").await
}

async fn run_with_timeout(
    client: &Client,
    ns: &str,
    name: &str,
    world: &Shared,
    stop_after: Option<usize>,
    timeout: &str,
) -> Run {
    let spec = json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": TARGETS.iter().map(|t| json!({"name": t, "kubernetesSecret": {"name": t, "key": "k"}})).collect::<Vec<_>>(),
        "proof": {
            "externalSecrets": [{"name": "app-creds", "key": "k"}],
            "workloads": [{"kind": "Deployment", "name": "app"}],
            "timeout": timeout
        }
    });
    common::fixtures::create_rotation(client, ns, name, spec).await;
    world.lock().unwrap().budget = stop_after;
    let clock = Arc::new(Mutex::new(Timestamp::now()));
    let api: Api<SecretRotation> = Api::namespaced(client.clone(), ns);
    let mut ctx = context(client, world, &clock);
    let mut crashed_after = None;
    for _ in 0..100 {
        let sr = api.get(name).await.unwrap();
        let status = sr.status.clone().unwrap_or_default();
        if status.rotation.is_none() && status.last_rotation.is_some() {
            // The operator looks at every object again (at start, and on its
            // idle requeue): one more reconcile of the finished rotation.
            tokio::spawn(machine::reconcile(Arc::new(sr), ctx.clone()))
                .await
                .unwrap()
                .unwrap();
            let wal_left =
                Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
                    .get_opt(&rekey::wal::secret_name(name))
                    .await
                    .unwrap()
                    .is_some();
            return Run {
                failure: status
                    .last_rotation
                    .as_ref()
                    .and_then(|l| l.failure.clone()),
                result: status.last_rotation.map(|l| l.result),
                crashed_after,
                wal_left,
            };
        }
        let task = tokio::spawn(machine::reconcile(Arc::new(sr), ctx.clone()));
        match task.await {
            Ok(_) => {}
            Err(e) if e.is_panic() => {
                crashed_after = world.lock().unwrap().effects.last().cloned();
                ctx = context(client, world, &clock);
            }
            Err(e) => panic!("{e}"),
        }
    }
    Run {
        result: None,
        failure: None,
        crashed_after,
        wal_left: true,
    }
}

/// What a user cares about, whatever the stop point.
fn check(w: &World) -> std::result::Result<(), String> {
    let ids: Vec<&String> = w.issued.iter().map(|(id, _)| id).collect();
    if w.issued.len() != 1 {
        return Err(format!("{} values issued ({ids:?})", w.issued.len()));
    }
    let new = w.new_value().unwrap();
    for (t, versions) in &w.stores {
        if versions.len() != 2 {
            return Err(format!("{t}: {} new versions", versions.len() - 1));
        }
        if w.current(t) != new {
            return Err(format!("{t} does not hold the new value"));
        }
    }
    if w.delivered != new {
        return Err("ESO does not deliver the new value".into());
    }
    if w.rollouts != 1 {
        return Err(format!("{} rollouts", w.rollouts));
    }
    if w.invalidations.is_empty() {
        return Err("the old value was never invalidated".into());
    }
    if let Some((id, _)) = w.invalidations.iter().find(|(_, proven)| !proven) {
        return Err(format!("invalidated before the proof (rotation {id})"));
    }
    if w.invalidations.iter().any(|(id, _)| *id != w.issued[0].0) {
        return Err("invalidate called for another rotation id".into());
    }
    if w.old == new {
        return Err("the new value is the old one".into());
    }
    Ok(())
}

#[tokio::test]
async fn a_crash_after_any_effect_or_status_write_still_ends_in_one_proven_rotation() {
    // The simulated crashes are expected: keep their panic messages quiet.
    // The hook is process-wide and the other tests run in this process too:
    // it is installed once and passes every other panic on.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.to_string().contains("simulated crash after") {
                default_hook(info);
            }
        }));
    });
    let (c, client, ns) = common::setup("machine-crash").await;
    common::fixtures::install_crd(c);

    // The clean run names every stop point.
    let clean = Arc::new(Mutex::new(World::new()));
    let r = run(&client, &ns, "clean", &clean, None).await;
    assert_eq!(r.result, Some(Phase::Succeeded));
    check(&clean.lock().unwrap()).unwrap();
    assert!(!r.wal_left, "the write-ahead record is deleted at the end");
    let points = clean.lock().unwrap().effects.clone();
    assert!(
        points.iter().any(|p| p == "source.invalidate")
            && points.iter().any(|p| p.starts_with("store.write"))
            && points.iter().any(|p| p == "status Invalidating"),
        "{points:?}"
    );

    let mut table = vec![];
    let mut failures = vec![];
    for (i, point) in points.iter().enumerate() {
        let world = Arc::new(Mutex::new(World::new()));
        let r = run(&client, &ns, &format!("stop-{i}"), &world, Some(i + 1)).await;
        let w = world.lock().unwrap();
        let verdict = match (r.result, check(&w)) {
            (Some(Phase::Succeeded), Ok(())) => {
                "Succeeded, one issue/version/rollout, invalidated after proof".to_string()
            }
            (result, Err(e)) => format!("BROKEN ({result:?}): {e}"),
            (result, Ok(())) => format!("BROKEN: ended {result:?}"),
        };
        let verdict = if r.wal_left {
            format!("{verdict}; write-ahead record left behind")
        } else {
            verdict
        };
        if verdict.contains("BROKEN") {
            failures.push(format!("{point}: {verdict}"));
        }
        assert_eq!(
            r.crashed_after.as_deref(),
            Some(point.as_str()),
            "stop point {i}"
        );
        table.push((i + 1, point.clone(), verdict, w.invalidations.len()));
    }
    println!("\nstop after effect → outcome (invalidate calls)");
    for (n, point, verdict, inv) in &table {
        println!("{n:>3}  {point:<28} {verdict} ({inv})");
    }
    assert!(failures.is_empty(), "{failures:#?}");
    let left: Vec<_> = table
        .iter()
        .filter(|t| t.2.contains("left behind"))
        .map(|t| t.1.clone())
        .collect();
    assert!(
        left.is_empty(),
        "write-ahead record left behind after a crash at {left:?}"
    );
}

/// The final re-check (issue: nothing was read again between the proof and
/// the invalidate call): another writer replaces one store's value after the
/// proof. The old value must stay valid, and the rotation must not report
/// success with a version that is no longer current.
#[tokio::test]
async fn a_store_changed_after_the_proof_is_never_invalidated() {
    let (c, client, ns) = common::setup("machine-recheck").await;
    common::fixtures::install_crd(c);
    let world = Arc::new(Mutex::new(World::new()));
    world.lock().unwrap().intrude_on_verify = true;
    let r = run_with_timeout(&client, &ns, "recheck", &world, None, "10s").await;
    let w = world.lock().unwrap();
    assert!(
        w.invalidations.is_empty(),
        "invalidated although prod no longer held the new value"
    );
    assert_eq!(r.result, Some(Phase::Failed));
    let failure = r.failure.unwrap();
    assert_eq!(failure.reason, "ProofLost");
    assert_eq!(failure.phase, Phase::Invalidating);
    assert!(
        failure.message.contains("target prod"),
        "{}",
        failure.message
    );
}
