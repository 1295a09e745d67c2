//! Latency added by rekey and its API cost per rotation (issue 13 parts 3
//! and 4): rounds of 50 rotations of the usual scene (webhook source, one
//! ExternalSecret, one Deployment of 2 replicas), one after the other, with
//! the default `--poll` (`poll()`). A watcher records when ESO saw rekey's
//! refresh request, when the synced Secret changed, when the Deployment got
//! its restart stamp and completed and when each of its pods was deleted,
//! and the webhook records the invalidate call. Latency added by rekey:
//! sync → restart request, and rollout complete (or, when later, the last
//! old pod gone) → invalidate; ESO's own refresh (request → synced Secret)
//! beside them. Requests per rotation come from the audit log, by user
//! agent; then one idle minute with 100 Succeeded SecretRotations and one
//! with 100 waiting for a restart that does not come (`restart: Await`).

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::REKEY;
use crate::report::{by_agent, over_runs, summary};
use common::audit;
use common::fixtures::*;
use common::operator::{Operator, cpu_seconds};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use rekey::crd::Phase;
use serde_json::{Value, json};

const ROTATIONS: usize = 50;
const STAMP: &str = "rotation.rekey.dev/app-secret";
/// rekey's default `--poll` (2s before the waits were event-driven);
/// `REKEY_BENCH_POLL` overrides it, to measure an older build as it ran.
fn poll() -> String {
    std::env::var("REKEY_BENCH_POLL").unwrap_or_else(|_| "30s".into())
}

/// First time (ms since the start) each value of something was seen.
#[derive(Default)]
struct Seen {
    start: Option<Instant>,
    secret_value: BTreeMap<String, f64>,
    refresh_token: BTreeMap<String, f64>,
    stamp: BTreeMap<String, f64>,
    complete: BTreeMap<String, f64>,
    /// When each pod of the Deployment disappeared.
    pods_gone: Vec<f64>,
    issued: BTreeMap<String, String>,
    invalidated: BTreeMap<String, f64>,
}

impl Seen {
    fn now(&self) -> f64 {
        self.start.unwrap().elapsed().as_secs_f64() * 1000.0
    }
}

type Shared = Arc<Mutex<Seen>>;

fn first(map: &mut BTreeMap<String, f64>, key: String, at: f64) {
    map.entry(key).or_insert(at);
}

async fn watch_secret(client: Client, ns: String, seen: Shared) {
    let api: Api<Secret> = Api::namespaced(client, &ns);
    let cfg = watcher::Config::default().fields("metadata.name=app-creds");
    let mut events = watcher::watcher(api, cfg).boxed();
    while let Some(Ok(event)) = events.next().await {
        if let watcher::Event::Apply(s) | watcher::Event::InitApply(s) = event
            && let Some(v) = s.data.and_then(|d| d.get("client_secret").cloned())
        {
            let mut seen = seen.lock().unwrap();
            let at = seen.now();
            first(
                &mut seen.secret_value,
                String::from_utf8_lossy(&v.0).into(),
                at,
            );
        }
    }
}

async fn watch_deployment(client: Client, ns: String, seen: Shared) {
    let api: Api<Deployment> = Api::namespaced(client, &ns);
    let cfg = watcher::Config::default().fields("metadata.name=app");
    let mut events = watcher::watcher(api, cfg).boxed();
    while let Some(Ok(event)) = events.next().await {
        let (watcher::Event::Apply(d) | watcher::Event::InitApply(d)) = event else {
            continue;
        };
        let stamp = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(STAMP).cloned());
        let Some(stamp) = stamp else { continue };
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let s = d.status.clone().unwrap_or_default();
        let complete = s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
            && s.updated_replicas == Some(want)
            && s.ready_replicas == Some(want)
            && s.available_replicas == Some(want)
            && s.replicas == Some(want);
        let mut seen = seen.lock().unwrap();
        let at = seen.now();
        first(&mut seen.stamp, stamp.clone(), at);
        if complete {
            first(&mut seen.complete, stamp, at);
        }
    }
}

async fn watch_pods(client: Client, ns: String, seen: Shared) {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, &ns);
    let cfg = watcher::Config::default().labels("app=app");
    let mut events = watcher::watcher(api, cfg).boxed();
    while let Some(Ok(event)) = events.next().await {
        if let watcher::Event::Delete(_) = event {
            let mut seen = seen.lock().unwrap();
            let at = seen.now();
            seen.pods_gone.push(at);
        }
    }
}

async fn watch_external_secret(client: Client, ns: String, seen: Shared) {
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &es_resource("ExternalSecret"));
    let cfg = watcher::Config::default().fields("metadata.name=app-creds");
    let mut events = watcher::watcher(api, cfg).boxed();
    while let Some(Ok(event)) = events.next().await {
        if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = event
            && let Some(token) = o
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("force-sync").cloned())
        {
            let mut seen = seen.lock().unwrap();
            let at = seen.now();
            first(&mut seen.refresh_token, token, at);
        }
    }
}

/// A webhook source that issues a fresh canary per rotation id and records
/// when each invalidate call arrived.
async fn webhook(seen: Shared) -> String {
    use axum::extract::State;
    use axum::http::HeaderMap;
    use axum::routing::post;
    let key = |h: &HeaderMap| {
        h.get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let app = axum::Router::new()
        .route(
            "/issue",
            post(move |State(seen): State<Shared>, h: HeaderMap| async move {
                let mut seen = seen.lock().unwrap();
                let value = seen
                    .issued
                    .entry(key(&h))
                    .or_insert_with(|| common::canary("bench"))
                    .clone();
                axum::Json(json!({ "value": value }))
            }),
        )
        .route(
            "/invalidate",
            post(move |State(seen): State<Shared>, h: HeaderMap| async move {
                let mut seen = seen.lock().unwrap();
                let at = seen.now();
                first(&mut seen.invalidated, key(&h), at);
                "ok"
            }),
        )
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Per rotation: synced Secret → restart request, rollout complete →
/// invalidate, and ESO's refresh request → synced Secret (ms).
fn latencies(seen_now: &Seen) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut added_restart, mut added_invalidate, mut eso_refresh) = (vec![], vec![], vec![]);
    for (id, value) in &seen_now.issued {
        let (Some(sync), Some(restart), Some(complete), Some(invalidate), Some(refresh)) = (
            seen_now.secret_value.get(value),
            seen_now.stamp.get(id),
            seen_now.complete.get(id),
            seen_now.invalidated.get(id),
            seen_now.refresh_token.get(id),
        ) else {
            continue;
        };
        // The last pod of the old revision gone before the invalidation.
        let last_gone = seen_now
            .pods_gone
            .iter()
            .copied()
            .filter(|t| t > restart && t <= invalidate)
            .fold(*complete, f64::max);
        added_restart.push(restart - sync);
        added_invalidate.push(invalidate - last_gone);
        eso_refresh.push(sync - refresh);
    }
    (added_restart, added_invalidate, eso_refresh)
}

/// Per round of `ROTATIONS` rotations: latency summaries, rekey's requests
/// and CPU per rotation, and the other clients' requests beside them.
struct Round {
    restart: Value,
    invalidate: Value,
    eso_refresh: Value,
    wall_s: f64,
    measured: usize,
    failed: usize,
    requests: Vec<audit::Request>,
    others: BTreeMap<String, usize>,
    cpu_s: f64,
}

/// One round: `ROTATIONS` rotations one after the other, each requested by
/// annotation once the one before ended.
async fn round(
    c: &common::Cluster,
    client: &Client,
    ns: &str,
    op: &Operator,
    seen: &Shared,
    tag: &str,
) -> Round {
    let log = c.audit_log();
    {
        let mut s = seen.lock().unwrap();
        let start = s.start;
        *s = Seen {
            start,
            ..Default::default()
        };
    }
    let from_all = audit::requests(&log, "").len();
    let cpu_before = op.pid().and_then(cpu_seconds).unwrap_or(f64::NAN);
    let started = Instant::now();
    let mut failed = 0;
    for i in 0..ROTATIONS {
        let token = format!("{tag}-{i}");
        annotate_rotation(client, ns, "app-secret", "rekey.dev/rotate", &token).await;
        common::wait_for("a rotation", Duration::from_secs(120), || async {
            get_rotation(client, ns, "app-secret")
                .await
                .status
                .is_some_and(|s| {
                    s.rotation.is_none() && s.observed_rotate_request.as_deref() == Some(&token)
                })
        })
        .await;
        let sr = get_rotation(client, ns, "app-secret").await;
        let last = sr.status.as_ref().and_then(|s| s.history.last().cloned());
        if last.is_none_or(|h| h.result != Phase::Succeeded) {
            failed += 1;
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = op.pid().and_then(cpu_seconds).unwrap_or(f64::NAN) - cpu_before;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window: Vec<audit::Request> = audit::requests(&log, "")
        .into_iter()
        .skip(from_all)
        .collect();
    let (rekey, others): (Vec<_>, Vec<_>) = window
        .into_iter()
        .partition(|r| r.user_agent.starts_with("rekey/"));
    let (restart, invalidate, eso_refresh) = latencies(&seen.lock().unwrap());
    Round {
        restart: summary(&restart),
        invalidate: summary(&invalidate),
        eso_refresh: summary(&eso_refresh),
        wall_s,
        measured: restart.len(),
        failed,
        requests: rekey,
        others: by_agent(&others),
        cpu_s,
    }
}

/// Latency added, API cost and CPU per rotation (`rounds` rounds of
/// `ROTATIONS`), then an idle minute with 100 Succeeded SecretRotations and
/// a minute with 100 waiting for a restart. Returns ("latency", "api").
pub async fn run(rounds: usize) -> (Value, Value) {
    let opts = common::Options {
        moto: false,
        audit: true,
        ..Default::default()
    };
    let (c, client, ns) = common::setup_private("bench", opts).await;
    let c = &c;
    scene(c, &client, &ns, &common::canary("old")).await;
    let seen: Shared = Arc::new(Mutex::new(Seen {
        start: Some(Instant::now()),
        ..Default::default()
    }));
    tokio::spawn(watch_secret(client.clone(), ns.clone(), seen.clone()));
    tokio::spawn(watch_deployment(client.clone(), ns.clone(), seen.clone()));
    tokio::spawn(watch_pods(client.clone(), ns.clone(), seen.clone()));
    tokio::spawn(watch_external_secret(
        client.clone(),
        ns.clone(),
        seen.clone(),
    ));
    let url = webhook(seen.clone()).await;
    let poll_arg = format!("--poll={}", poll());
    let args = [poll_arg.as_str(), "--starts-per-minute=0"];
    let op = Operator::start_with_args(REKEY, c, &ns, c.kubeconfig.clone(), &args);
    audit::wait_for_rekey_watching(&c.audit_log()).await;
    // The first rotation (on creation) warms up; the rounds are measured.
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(webhook_credential(&url)),
    )
    .await;
    wait_phase(
        &client,
        &ns,
        "app-secret",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let mut done = vec![];
    for r in 0..rounds {
        done.push(round(c, &client, &ns, &op, &seen, &format!("round{r}")).await);
    }
    let pick = |f: &dyn Fn(&Round) -> f64| over_runs(&done.iter().map(f).collect::<Vec<_>>());
    let p = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let n = ROTATIONS as f64;
    let per_rotation: BTreeMap<String, f64> = audit::by_verb_and_resource(&done[0].requests)
        .into_iter()
        .map(|(k, v)| (k, v as f64 / n))
        .collect();
    let others: BTreeMap<String, f64> = done[0]
        .others
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64 / n))
        .collect();
    let figure = |f: &dyn Fn(&Round) -> Value| -> Value {
        json!({
            "p50_ms": pick(&|r| p(&f(r), "p50_ms")),
            "p99_ms": pick(&|r| p(&f(r), "p99_ms")),
            "rounds": done.iter().map(f).collect::<Vec<_>>(),
        })
    };
    let latency = json!({
        "rotations_per_round": ROTATIONS,
        "rounds": rounds,
        "measured": done.iter().map(|r| r.measured).sum::<usize>(),
        "failed": done.iter().map(|r| r.failed).sum::<usize>(),
        "poll": poll(),
        "wall_s": pick(&|r| r.wall_s),
        "sync_to_restart_request": figure(&|r| r.restart.clone()),
        "rollout_complete_to_invalidate": figure(&|r| r.invalidate.clone()),
        "eso_refresh_request_to_synced_secret": figure(&|r| r.eso_refresh.clone()),
        "cpu_s_per_rotation": pick(&|r| r.cpu_s / n),
    });
    let writes = |r: &Round| r.requests.iter().filter(|q| q.is_write()).count() as f64 / n;

    // Idle: 100 Succeeded SecretRotations, one minute.
    for i in 0..99 {
        let name = format!("idle-{i}");
        create_rotation(&client, &ns, &name, unproven_generated_spec(&name)).await;
    }
    all_succeeded(&client, &ns, 100, Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_from = audit::requests(&c.audit_log(), "rekey/").len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let idle: Vec<_> = audit::requests(&c.audit_log(), "rekey/")
        .into_iter()
        .skip(idle_from)
        .collect();
    let waiting = waiting_minute(c, &client, &ns).await;
    let api = json!({
        "waiting_minute_100_rotations": audit::by_verb_and_resource(&waiting),
        "waiting_minute_total": waiting.len(),
        "per_rotation_total": pick(&|r| r.requests.len() as f64 / n),
        "per_rotation_writes": pick(&writes),
        "per_rotation": per_rotation,
        "other_clients_per_rotation": others,
        "idle_minute_100_rotations": audit::by_verb_and_resource(&idle),
        "idle_minute_writes": idle.iter().filter(|r| r.is_write()).count(),
        "idle_minute_reads_beyond_watch": idle.iter().filter(|r| !r.is_write() && r.verb != "watch").count(),
    });
    drop(op);
    (latency, api)
}

/// The requests rekey makes in one minute while 100 rotations wait for a
/// restart nobody makes (`restart: Await`, one Deployment of 0 replicas each).
async fn waiting_minute(c: &common::Cluster, client: &Client, ns: &str) -> Vec<audit::Request> {
    for i in 0..100 {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": format!("waits-{i}")},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": format!("waits-{i}")}},
                "template": {"metadata": {"labels": {"app": format!("waits-{i}")}},
                    "spec": {"containers": [{"name": "c", "image": "example.invalid/c:1"}]}}}
        }))
        .unwrap();
        Api::<Deployment>::namespaced(client.clone(), ns)
            .create(&Default::default(), &d)
            .await
            .unwrap();
        let spec = json!({
            "credential": {"generated": {}},
            "oldValueValidFor": "30m",
            "targets": [{"name": "main", "kubernetesSecret": {"name": format!("waits-{i}"), "key": "k"}}],
            "proof": {"workloads": [{"kind": "Deployment", "name": format!("waits-{i}")}], "restart": "Await", "timeout": "20m"}
        });
        create_rotation(client, ns, &format!("waits-{i}"), spec).await;
    }
    common::wait_for(
        "100 rotations awaiting the rollout",
        Duration::from_secs(300),
        || async {
            let all = Api::<rekey::crd::SecretRotation>::namespaced(client.clone(), ns)
                .list(&Default::default())
                .await
                .unwrap()
                .items;
            all.iter()
                .filter(|sr| phase_of(sr) == Some(Phase::AwaitingRollout))
                .count()
                == 100
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let from = audit::requests(&c.audit_log(), "rekey/").len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    audit::requests(&c.audit_log(), "rekey/")
        .into_iter()
        .skip(from)
        .collect()
}
