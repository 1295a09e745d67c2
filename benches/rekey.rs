//! `make bench`: what rekey costs, measured on the local control plane (real
//! API server, ESO, kwok) with the release build. Prints one table and writes
//! it as JSON under `bench/results/`. A benchmark, not a test: it asserts
//! nothing, and shows each target beside its figure.
//!
//! Scenarios of this revision (issue 13 parts 3 and 4; the others follow):
//! - **latency**: 50 rotations of the usual scene (webhook source, one
//!   ExternalSecret, one Deployment of 2 replicas), one after the other, with
//!   the default `--poll` (`poll()`). A watcher records when ESO saw rekey's
//!   refresh request, when the synced Secret changed, when the Deployment
//!   got its restart stamp and completed and when each of its pods was
//!   deleted, and the webhook records the invalidate call. Latency added by
//!   rekey: sync → restart request, and rollout complete (or, when later,
//!   the last old pod gone) → invalidate; ESO's own refresh (request →
//!   synced Secret) beside them.
//! - **api**: rekey's requests to the API server per rotation, by verb and
//!   resource, from the audit log (user agent `rekey/`), per idle minute
//!   with 100 Succeeded SecretRotations, and per minute with 100 rotations
//!   waiting for a restart that does not come (`restart: Await`).
//! - **memory**: rekey's resident memory with 5,000 unrelated pods in
//!   another namespace (rekey must not cache them), before and after the
//!   rotations.

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::audit;
use common::fixtures::*;
use common::operator::Operator;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use rekey::crd::Phase;
use serde_json::{Value, json};

const REKEY: &str = env!("CARGO_BIN_EXE_rekey");
const ROTATIONS: usize = 50;
const STAMP: &str = "rotation.rekey.dev/app-secret";
/// rekey's default `--poll` (2s before the waits were event-driven);
/// `REKEY_BENCH_POLL` overrides it, to measure an older build as it ran.
fn poll() -> String {
    std::env::var("REKEY_BENCH_POLL").unwrap_or_else(|_| "30s".into())
}
/// Unrelated pods in another namespace (issue 11: no cluster-wide cache).
const UNRELATED_PODS: usize = 5000;

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

/// Nearest-rank percentile of `samples` (ms).
fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn summary(samples: &[f64]) -> Value {
    json!({
        "n": samples.len(),
        "p50_ms": percentile(samples, 50.0),
        "p99_ms": percentile(samples, 99.0),
        "max_ms": percentile(samples, 100.0),
    })
}

fn machine() -> Value {
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    })
}

fn git_revision() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let rev = run(&["rev-parse", "--short=12", "HEAD"]);
    let dirty = !run(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty { format!("{rev}-dirty") } else { rev }
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

async fn scenario(results: &mut BTreeMap<&'static str, Value>) {
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
    let rss_start = op.rss_kib();
    let unrelated_s = unrelated_pods(&client).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_unrelated = op.rss_kib();
    let before = audit::requests(&c.audit_log(), "rekey/").len();

    // Latency: rotations one after the other.
    let started = Instant::now();
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
    for i in 1..ROTATIONS {
        annotate_rotation(
            &client,
            &ns,
            "app-secret",
            "rekey.dev/rotate",
            &format!("r{i}"),
        )
        .await;
        common::wait_for("a rotation", Duration::from_secs(120), || async {
            get_rotation(&client, &ns, "app-secret")
                .await
                .status
                .is_some_and(|s| {
                    s.history.len() == (i + 1).min(10)
                        && s.rotation.is_none()
                        && s.observed_rotate_request.as_deref() == Some(format!("r{i}").as_str())
                })
        })
        .await;
    }
    let rotations_s = started.elapsed().as_secs_f64();
    let rss_after = op.rss_kib();
    results.insert(
        "memory",
        json!({
            "unrelated_pods": UNRELATED_PODS,
            "unrelated_pods_created_s": unrelated_s,
            "rss_kib_start": rss_start,
            "rss_kib_with_unrelated_pods": rss_unrelated,
            "rss_kib_after_rotations": rss_after,
        }),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = audit::requests(&c.audit_log(), "rekey/");
    let rotation_requests = &all[before..];
    let history = get_rotation(&client, &ns, "app-secret").await;
    let failed = history
        .status
        .as_ref()
        .map(|s| {
            s.history
                .iter()
                .filter(|h| h.result != Phase::Succeeded)
                .count()
        })
        .unwrap_or(0);
    let (added_restart, added_invalidate, eso_refresh) = latencies(&seen.lock().unwrap());
    results.insert(
        "latency",
        json!({
            "rotations": ROTATIONS,
            "measured": added_restart.len(),
            "failed_in_last_10": failed,
            "wall_s": rotations_s,
            "poll": poll(),
            "sync_to_restart_request": summary(&added_restart),
            "rollout_complete_to_invalidate": summary(&added_invalidate),
            "eso_refresh_request_to_synced_secret": summary(&eso_refresh),
        }),
    );
    let per_rotation: BTreeMap<String, f64> = audit::by_verb_and_resource(rotation_requests)
        .into_iter()
        .map(|(k, v)| (k, v as f64 / ROTATIONS as f64))
        .collect();
    let writes =
        rotation_requests.iter().filter(|r| r.is_write()).count() as f64 / ROTATIONS as f64;

    // Idle: 100 Succeeded SecretRotations, one minute.
    for i in 0..99 {
        let spec = json!({
            "credential": {"generated": {}},
            "oldValueValidFor": "30m",
            "targets": [{"name": "main", "kubernetesSecret": {"name": format!("idle-{i}"), "key": "k"}}],
            "proof": {"nothingToProve": true}
        });
        create_rotation(&client, &ns, &format!("idle-{i}"), spec).await;
    }
    common::wait_for("100 Succeeded", Duration::from_secs(300), || async {
        let all = kube::Api::<rekey::crd::SecretRotation>::namespaced(client.clone(), &ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items;
        all.len() == 100 && all.iter().all(|sr| phase_of(sr) == Some(Phase::Succeeded))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_from = audit::requests(&c.audit_log(), "rekey/").len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let idle: Vec<_> = audit::requests(&c.audit_log(), "rekey/")
        .into_iter()
        .skip(idle_from)
        .collect();
    let waiting = waiting_minute(c, &client, &ns).await;
    results.insert(
        "api",
        json!({
            "waiting_minute_100_rotations": audit::by_verb_and_resource(&waiting),
            "waiting_minute_total": waiting.len(),
            "per_rotation_total": rotation_requests.len() as f64 / ROTATIONS as f64,
            "per_rotation_writes": writes,
            "per_rotation": per_rotation,
            "idle_minute_100_rotations": audit::by_verb_and_resource(&idle),
            "idle_minute_writes": idle.iter().filter(|r| r.is_write()).count(),
            "idle_minute_reads_beyond_watch": idle.iter().filter(|r| !r.is_write() && r.verb != "watch").count(),
        }),
    );
    drop(op);
}

/// Creates `UNRELATED_PODS` pods that no scheduler takes, in a namespace
/// of their own; returns how long that took (s).
async fn unrelated_pods(client: &Client) -> f64 {
    let started = Instant::now();
    let ns = common::namespace(client, "unrelated").await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let created = futures::stream::iter(0..UNRELATED_PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("unrelated-{i}"), "labels": {"app": "unrelated"}},
                    "spec": {"schedulerName": "nobody", "containers": [{
                        "name": "c", "image": "example.invalid/c:1",
                        "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "unrelated", "key": "k"}}}]}]}
                }))
                .unwrap();
                pods.create(&Default::default(), &pod).await.is_ok()
            }
        })
        .buffer_unordered(16)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(created, UNRELATED_PODS);
    started.elapsed().as_secs_f64()
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

fn table(r: &BTreeMap<&'static str, Value>) -> String {
    let mut out = String::new();
    let mut row = |what: &str, figure: String, target: &str| {
        out.push_str(&format!("| {what} | {figure} | {target} |\n"));
    };
    let l = &r["latency"];
    let ms = |v: &Value| {
        format!(
            "p50 {:.0} ms, p99 {:.0} ms",
            v["p50_ms"].as_f64().unwrap_or(f64::NAN),
            v["p99_ms"].as_f64().unwrap_or(f64::NAN)
        )
    };
    row(
        "added: synced Secret → restart request",
        ms(&l["sync_to_restart_request"]),
        "p50 ≤ 100 ms, p99 ≤ 1 s",
    );
    row(
        "added: rollout complete and last old pod gone → invalidate",
        ms(&l["rollout_complete_to_invalidate"]),
        "p50 ≤ 100 ms, p99 ≤ 1 s",
    );
    row(
        "ESO: refresh request → synced Secret",
        ms(&l["eso_refresh_request_to_synced_secret"]),
        "(reference)",
    );
    row(
        "rotations measured",
        format!(
            "{} of {} ({:.0} s)",
            l["measured"],
            l["rotations"],
            l["wall_s"].as_f64().unwrap_or(0.0)
        ),
        "",
    );
    let a = &r["api"];
    row(
        "requests per rotation",
        format!(
            "{:.1} ({:.1} writes)",
            a["per_rotation_total"].as_f64().unwrap_or(0.0),
            a["per_rotation_writes"].as_f64().unwrap_or(0.0)
        ),
        "",
    );
    row(
        "idle minute, 100 Succeeded: writes / reads beyond the watch",
        format!(
            "{} / {}",
            a["idle_minute_writes"], a["idle_minute_reads_beyond_watch"]
        ),
        "0 / 0",
    );
    row(
        "a minute with 100 rotations waiting for a restart: requests",
        format!("{}", a["waiting_minute_total"]),
        "",
    );
    let m = &r["memory"];
    row(
        "rekey RSS: start / with 5,000 unrelated pods / after the rotations",
        format!(
            "{} / {} / {} MiB",
            m["rss_kib_start"].as_u64().unwrap_or(0) / 1024,
            m["rss_kib_with_unrelated_pods"].as_u64().unwrap_or(0) / 1024,
            m["rss_kib_after_rotations"].as_u64().unwrap_or(0) / 1024
        ),
        "",
    );
    format!("| measure | figure | target |\n|---|---|---|\n{out}")
}

fn main() {
    rekey::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut results = BTreeMap::new();
    let started = Instant::now();
    runtime.block_on(scenario(&mut results));
    let date = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let revision = git_revision();
    let report = json!({
        "date": date,
        "revision": revision,
        "machine": machine(),
        "build": "release",
        "duration_s": started.elapsed().as_secs_f64(),
        "results": results,
    });
    let table = table(&results);
    println!(
        "\nrekey bench, {date}, revision {revision}, {}\n\n{table}",
        report["machine"]
    );
    let dir = common::repo_root().join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}-{revision}.json", &date[..10]));
    std::fs::write(&file, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("written to {}", file.display());
}
