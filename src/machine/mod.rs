//! The rotation machine: drives each SecretRotation through its phases.
//!
//! Crash safety: every phase is recorded in status before its side effect,
//! and every side effect is idempotent per rotation id, so a restart at any
//! point re-runs the current phase without a second store version, a second
//! issue at the identity provider or a second rollout.
//!
//! - `step`: one reconcile: load, step, transition, record, requeue.
//! - `view`: the per-reconcile view of one SecretRotation, its status and conditions.
//! - `announce`: the one place that logs, publishes Events and meters a transition.
//! - `phases`: one module per phase; each reports a `decide::Outcome`.
//! - `providers`: the seam where sources, stores and proofs are built.
//!
//! Where each phase goes next is decided in `crate::decide::transition`.

mod announce;
mod claims;
mod events;
mod finalizer;
pub mod phases;
pub mod providers;
mod step;
mod view;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{Instrument, info, warn};

use crate::crd::SecretRotation;
use crate::decide::{StartBucket, StartRate};
use crate::deps::Deps;
use crate::error::{Error, Result};
use crate::leader::Fence;
use crate::metrics::Metrics;
use crate::server::Readiness;
use crate::wake::Wake;
pub use providers::{Providers, RealProviders};

/// Field manager of every write rekey makes.
pub const MANAGER: &str = "rekey";

/// The machine's clock; injected so tests can move time.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Called after every status write with the phase written; a test uses it
/// to stop the machine right there (see tests/it/machine.rs).
pub type StatusWritten = Arc<dyn Fn(crate::crd::Phase) + Send + Sync>;

/// Shared by every reconcile.
/// Consecutive transient errors, and when the next attempt may run.
type Backoff = (u32, std::time::Instant);

#[derive(Clone)]
pub struct Context {
    pub client: Client,
    /// Events about SecretRotations, published in the background.
    pub events: events::Events,
    pub metrics: Metrics,
    /// Builds sources, stores and proofs.
    pub providers: Arc<dyn Providers>,
    /// How long a waiting rotation sleeps when no watch event wakes it
    /// (a safety net; `wake` wakes it when what it waits on changes).
    pub poll: Duration,
    /// Watches that wake waiting rotations (None: waits only poll).
    pub wake: Option<Arc<Wake>>,
    pub clock: Clock,
    pub on_status_written: Option<StatusWritten>,
    /// Hosts the spec's URLs may name (exact or `*.suffix`); None: any.
    pub allowed_hosts: Option<Vec<String>>,
    /// Side effects run through it (with leader election: only while the
    /// lease outlives the call).
    pub fence: Fence,
    /// How fast this operator starts rotations; None: unbounded.
    pub start_rate: Option<StartRate>,
    start_bucket: Arc<Mutex<Option<StartBucket>>>,
    /// resourceVersion of the last status rekey wrote per object, to skip
    /// reconciles on a cache that has not caught up with that write yet.
    written: Arc<Mutex<HashMap<(String, String), u64>>>,
    /// SecretRotations whose leftover write-ahead record this process has
    /// already removed (see `phases::idle`).
    swept: Arc<Mutex<HashSet<(String, String)>>>,
    /// Consecutive transient errors per SecretRotation and when the next
    /// attempt may run (`decide::retry_delay`); cleared by a step that
    /// succeeds.
    failures: Arc<Mutex<HashMap<(String, String), Backoff>>>,
}

impl Context {
    /// The production context: real providers, the system clock.
    pub fn new(deps: Deps, poll: Duration) -> Self {
        Self::with(
            deps.client.clone(),
            deps.metrics.clone(),
            poll,
            Arc::new(RealProviders { deps }),
            Arc::new(Timestamp::now),
        )
    }

    /// A context with the given providers and clock.
    pub fn with(
        client: Client,
        metrics: Metrics,
        poll: Duration,
        providers: Arc<dyn Providers>,
        clock: Clock,
    ) -> Self {
        let reporter = Reporter {
            controller: "rekey".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            events: events::Events::start(Recorder::new(client.clone(), reporter)),
            client,
            metrics,
            providers,
            poll,
            wake: None,
            clock,
            on_status_written: None,
            allowed_hosts: None,
            fence: Fence::none(),
            start_rate: None,
            start_bucket: Arc::new(Mutex::new(None)),
            written: Arc::default(),
            swept: Arc::default(),
            failures: Arc::default(),
        }
    }

    /// True the first time it is asked for an object in this process.
    /// Takes one of this operator's start slots, or says how long until one
    /// is free.
    pub(crate) fn take_start_slot(&self, now: Timestamp) -> std::result::Result<(), Duration> {
        let Some(rate) = self.start_rate else {
            return Ok(());
        };
        self.start_bucket
            .lock()
            .unwrap()
            .get_or_insert_with(|| StartBucket::new(rate))
            .take(rate, now)
    }

    /// Counts one more consecutive transient error and holds the next
    /// attempt back: returns the attempt number and the delay.
    pub(crate) fn back_off(&self, namespace: &str, name: &str) -> (u32, Duration) {
        let mut failures = self.failures.lock().unwrap();
        let entry = failures
            .entry((namespace.to_string(), name.to_string()))
            .or_insert((0, std::time::Instant::now()));
        entry.0 += 1;
        let delay = crate::decide::retry_delay(
            entry.0,
            self.poll
                .clamp(Duration::from_secs(1), Duration::from_secs(2)),
            Duration::from_secs(30),
            rand::random(),
        );
        entry.1 = std::time::Instant::now() + delay;
        (entry.0, delay)
    }

    /// How long the next attempt is still held back after an error: any
    /// trigger (the status write that reported the error, a watch event)
    /// waits for it.
    fn held_back(&self, namespace: &str, name: &str) -> Option<Duration> {
        let failures = self.failures.lock().unwrap();
        let (_, not_before) = failures.get(&(namespace.to_string(), name.to_string()))?;
        not_before.checked_duration_since(std::time::Instant::now())
    }

    /// A step went through: the next error starts the backoff over.
    pub(crate) fn succeeded(&self, namespace: &str, name: &str) {
        self.failures
            .lock()
            .unwrap()
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub(crate) fn first_idle_look(&self, namespace: &str, name: &str) -> bool {
        self.swept
            .lock()
            .unwrap()
            .insert((namespace.to_string(), name.to_string()))
    }
}

/// Runs the controller until a shutdown signal. `namespaces`: watch only these
/// (namespaced mode) or, when empty, the whole cluster. At most `concurrency`
/// reconciles run at once (per watched namespace). A reconcile is started
/// by a change of its SecretRotation, by a watch event of something its
/// rotation waits on (see `crate::wake`), or by its requeue; `debounce`
/// merges the triggers of one object that arrive within it.
pub async fn run(
    mut ctx: Context,
    namespaces: Vec<String>,
    concurrency: u16,
    debounce: Duration,
    ready: Readiness,
) {
    let wake = Arc::new(Wake::new(ctx.client.clone()));
    ctx.wake = Some(wake.clone());
    let ctx = Arc::new(ctx);
    let error_policy = |sr: Arc<SecretRotation>, err: &Error, ctx: Arc<Context>| {
        warn!(namespace = sr.namespace().unwrap_or_default(), name = sr.name_any(), error = %err, "reconcile failed");
        ctx.metrics
            .reconcile_error(&sr.namespace().unwrap_or_default(), &sr.name_any());
        Action::requeue(Duration::from_secs(5))
    };
    let apis: Vec<(Api<SecretRotation>, Option<String>)> = if namespaces.is_empty() {
        vec![(Api::all(ctx.client.clone()), None)]
    } else {
        namespaces
            .iter()
            .map(|ns| (Api::namespaced(ctx.client.clone(), ns), Some(ns.clone())))
            .collect()
    };
    let controllers: Vec<Controller<SecretRotation>> = apis
        .into_iter()
        .map(|(api, ns)| {
            let config = controller::Config::default()
                .concurrency(concurrency)
                .debounce(debounce);
            // The cache keeps each SecretRotation without its managedFields
            // (rekey never reads them; with a status write per phase they
            // are a large part of every object).
            let (reader, writer) = reflector::store();
            let rotations = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|sr: &mut SecretRotation| sr.managed_fields_mut().clear())
                .reflect(writer)
                .applied_objects();
            Controller::for_stream(rotations, reader)
                .with_config(config)
                .reconcile_on(wake.route(ns))
        })
        .collect();
    // A SecretRotation removed without its last reconcile (its finalizer
    // taken off by hand) would keep its namespace's watches running.
    let stores: Vec<_> = controllers.iter().map(|c| c.store()).collect();
    let listed = stores.clone();
    tokio::spawn(async move {
        for store in listed {
            // Re-polled: kube-runtime's readiness keeps one waiter's waker,
            // and the Controller's own wait takes it, so a single await
            // here would never wake.
            loop {
                let wait =
                    tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready());
                match wait.await {
                    Ok(Ok(())) => break,
                    Ok(Err(_)) => return,
                    Err(_) => {}
                }
            }
        }
        info!("SecretRotations listed: ready");
        ready.set(true);
    });
    let metrics = ctx.metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            let exists = |ns: &str, name: &str| {
                let key = ObjectRef::new(name).within(ns);
                stores.iter().any(|s| s.get(&key).is_some())
            };
            wake.retain(exists);
            metrics.retain(exists);
        }
    });
    let runs = controllers.into_iter().map(|c| {
        c.shutdown_on_signal()
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
        // Our own status write is not in the cache yet. Its watch event
        // triggers the next reconcile (within milliseconds); the requeue is
        // only the safety net.
        return Ok(Action::requeue(ctx.poll));
    }
    if let Some(wait) = ctx.held_back(&key.0, &key.1) {
        // Backing off after a transient error.
        return Ok(Action::requeue(wait));
    }
    let rotation = sr
        .status
        .as_ref()
        .and_then(|s| s.rotation.as_ref())
        .map(|r| r.id.clone())
        .unwrap_or_default();
    let span =
        tracing::info_span!("reconcile", namespace = %key.0, name = %key.1, rotation = %rotation);
    step::reconcile(view::View::new(sr, ctx))
        .instrument(span)
        .await
}
