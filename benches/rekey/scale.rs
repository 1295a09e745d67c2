//! Scale (issue 13 part 2): N SecretRotations requested at once on one
//! replica, each with a generated source, a kubernetesSecret target, an
//! ExternalSecret and a one-replica Deployment on kwok, spread over
//! `NAMESPACES` namespaces. The same updates are first made without rekey
//! (the baseline: write each source, request ESO's refresh, restart each
//! Deployment as soon as its synced Secret changed, wait for every
//! rollout), then by rekey; the ratio of the two times is what rekey adds.

use rekey_testenv as common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::REKEY;
use crate::report::by_agent;
use common::audit;
use common::fixtures::*;
use common::operator::{Operator, proc_status_kib};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher;
use rekey::crd::{Phase, SecretRotation};
use serde_json::{Value, json};

pub const NAMESPACES: usize = 10;
const BASELINE_STAMP: &str = "bench.rekey.dev/restartedAt";

/// (namespace, index) of one rotation's objects.
type Slot = (String, usize);

fn slots(spaces: &[String], n: usize) -> Vec<Slot> {
    (0..n)
        .map(|i| (spaces[i % spaces.len()].clone(), i))
        .collect()
}

fn complete(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let s = d.status.clone().unwrap_or_default();
    s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && s.updated_replicas == Some(want)
        && s.available_replicas == Some(want)
        && s.replicas == Some(want)
}

fn stamp_of(d: &Deployment, key: &str) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .cloned()
}

/// The objects of `n` rotations: per namespace a SecretStore; per rotation
/// a source Secret `src-i`, an ExternalSecret `app-i` and a Deployment
/// `app-i` of one replica reading the synced Secret `app-i`.
async fn objects(c: &common::Cluster, client: &Client, spaces: &[String], n: usize) {
    for ns in spaces {
        kubernetes_secret_store(c, client, ns).await;
    }
    futures::stream::iter(slots(spaces, n))
        .for_each_concurrent(16, |(ns, i)| async move {
            put_secret(
                client,
                &ns,
                &format!("src-{i}"),
                json!({"client_secret": common::canary("old")}),
            )
            .await;
            external_secret(client, &ns, &format!("app-{i}"), &format!("src-{i}")).await;
            deployment(client, &ns, &format!("app-{i}"), 1, &format!("app-{i}")).await;
        })
        .await;
    common::wait_for(
        "every Deployment available",
        Duration::from_secs(900),
        || async {
            let mut ready = 0;
            for ns in spaces {
                let ds = Api::<Deployment>::namespaced(client.clone(), ns)
                    .list(&Default::default())
                    .await
                    .unwrap();
                ready += ds.items.iter().filter(|d| complete(d)).count();
            }
            ready == n
        },
    )
    .await;
}

/// Watches Secrets and Deployments in `spaces`, feeding (kind, namespace,
/// object) to the returned channel.
fn watch(
    client: &Client,
    spaces: &[String],
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for ns in spaces {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let (t1, t2) = (tx.clone(), tx.clone());
        tokio::spawn(async move {
            let mut s = watcher::watcher(secrets, Default::default()).boxed();
            while let Some(Ok(e)) = s.next().await {
                if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = e {
                    let _ = t1.send(("Secret".into(), serde_json::to_value(o).unwrap()));
                }
            }
        });
        tokio::spawn(async move {
            let mut s = watcher::watcher(deploys, Default::default()).boxed();
            while let Some(Ok(e)) = s.next().await {
                if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = e {
                    let _ = t2.send(("Deployment".into(), serde_json::to_value(o).unwrap()));
                }
            }
        });
    }
    rx
}

/// The same updates without rekey, as fast as a script that reacts to
/// watch events can make them. Returns the seconds until every rollout
/// completed, or None when capped.
async fn baseline(client: &Client, spaces: &[String], n: usize, cap: Duration) -> Option<f64> {
    let mut events = watch(client, spaces);
    let token = format!("b{}", rand::random::<u32>());
    let values: HashMap<Slot, String> = slots(spaces, n)
        .into_iter()
        .map(|s| (s, common::canary("base")))
        .collect();
    let started = Instant::now();
    futures::stream::iter(values.iter())
        .for_each_concurrent(16, |((ns, i), v)| {
            let token = token.clone();
            async move {
                put_secret(client, ns, &format!("src-{i}"), json!({"client_secret": v})).await;
                let es: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), ns, &es_resource("ExternalSecret"));
                es.patch(
                    &format!("app-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"force-sync": token}}})),
                )
                .await
                .unwrap();
            }
        })
        .await;
    let restarted: Arc<Mutex<HashSet<Slot>>> = Arc::default();
    let mut done: HashSet<Slot> = HashSet::new();
    let deadline = tokio::time::Instant::now() + cap;
    while done.len() < n {
        let Ok(Some((kind, o))) = tokio::time::timeout_at(deadline, events.recv()).await else {
            return None;
        };
        let ns = o["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        let Some(i) = name
            .strip_prefix("app-")
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        let slot = (ns.clone(), i);
        match kind.as_str() {
            "Secret" => {
                let synced = o["data"]["client_secret"].as_str().map(|b| {
                    use base64::Engine;
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .unwrap_or_default(),
                    )
                    .unwrap_or_default()
                });
                if synced.as_ref() == values.get(&slot) && restarted.lock().unwrap().insert(slot) {
                    let (client, token) = (client.clone(), token.clone());
                    tokio::spawn(async move {
                        Api::<Deployment>::namespaced(client, &ns)
                            .patch(
                                &format!("app-{i}"),
                                &PatchParams::default(),
                                &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {BASELINE_STAMP: token}}}}})),
                            )
                            .await
                            .unwrap();
                    });
                }
            }
            _ => {
                let d: Deployment = serde_json::from_value(o).unwrap();
                if stamp_of(&d, BASELINE_STAMP).as_deref() == Some(&token) && complete(&d) {
                    done.insert(slot);
                }
            }
        }
    }
    Some(started.elapsed().as_secs_f64())
}

/// Every SecretRotation's phase, kept current by a watch.
fn phases(client: &Client) -> Arc<Mutex<BTreeMap<String, Option<Phase>>>> {
    let all: Arc<Mutex<BTreeMap<String, Option<Phase>>>> = Arc::default();
    let api: Api<SecretRotation> = Api::all(client.clone());
    let out = all.clone();
    tokio::spawn(async move {
        let mut s = watcher::watcher(api, Default::default()).boxed();
        while let Some(Ok(e)) = s.next().await {
            if let watcher::Event::Apply(sr) | watcher::Event::InitApply(sr) = e {
                let key = format!(
                    "{}/{}",
                    sr.metadata.namespace.clone().unwrap_or_default(),
                    sr.metadata.name.clone().unwrap_or_default()
                );
                out.lock().unwrap().insert(key, phase_of(&sr));
            }
        }
    });
    all
}

/// One size: the objects, the baseline, then rekey.
async fn size(n: usize, cap: Duration) -> Value {
    let opts = common::Options {
        moto: false,
        audit: true,
        nodes: 4,
        pods_per_node: 1000,
        ..Default::default()
    };
    let (c, client, first) = common::setup_private("scale", opts).await;
    let c = &c;
    install_crd(c);
    let mut spaces = vec![first];
    for _ in 1..NAMESPACES {
        spaces.push(common::namespace_in(c, &client, "scale").await);
    }
    let setup = Instant::now();
    objects(c, &client, &spaces, n).await;
    let setup_s = setup.elapsed().as_secs_f64();
    let baseline_s = baseline(&client, &spaces, n, cap).await;
    // Let the baseline's rollouts settle before rekey starts.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let op = Operator::start_with_args(
        REKEY,
        c,
        "",
        c.kubeconfig.clone(),
        &["--poll=30s", "--starts-per-minute=0"],
    );
    audit::wait_for_rekey_watching(&c.audit_log()).await;
    let phases = phases(&client);
    let log = c.audit_log();
    let from = audit::requests(&log, "").len();
    let started = Instant::now();
    futures::stream::iter(slots(&spaces, n))
        .for_each_concurrent(16, |(ns, i)| {
            let client = client.clone();
            async move {
                let spec = json!({
                    "credential": {"generated": {}},
                    "oldValueValidFor": "30m",
                    "targets": [{"name": "main", "kubernetesSecret": {"name": format!("src-{i}"), "key": "client_secret", "adoptExisting": true}}],
                    "proof": {
                        "externalSecrets": [{"name": format!("app-{i}"), "key": "client_secret"}],
                        "workloads": [{"kind": "Deployment", "name": format!("app-{i}")}],
                        "timeout": "20m"
                    }
                });
                create_rotation(&client, &ns, &format!("r-{i}"), spec).await;
            }
        })
        .await;
    let created_s = started.elapsed().as_secs_f64();
    let mut peak_rss = 0;
    let count = |p: Phase| {
        phases
            .lock()
            .unwrap()
            .values()
            .filter(|v| **v == Some(p))
            .count()
    };
    let deadline = started + cap;
    while count(Phase::Succeeded) + count(Phase::Failed) < n && Instant::now() < deadline {
        peak_rss = peak_rss.max(op.rss_kib().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let total_s = started.elapsed().as_secs_f64();
    let (succeeded, failed) = (count(Phase::Succeeded), count(Phase::Failed));
    let window: Vec<audit::Request> = audit::requests(&log, "").into_iter().skip(from).collect();
    let rekey_requests = window
        .iter()
        .filter(|r| r.user_agent.starts_with("rekey/"))
        .count();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pid = op.pid().unwrap_or(0);
    let steady = proc_status_kib(pid, "VmRSS");
    let hwm = proc_status_kib(pid, "VmHWM");
    drop(op);
    json!({
        "rotations": n,
        "namespaces": NAMESPACES,
        "setup_s": setup_s,
        "cap_s": cap.as_secs(),
        "partial": succeeded + failed < n,
        "succeeded": succeeded,
        "failed": failed,
        "created_s": created_s,
        "total_s": total_s,
        "baseline_s": baseline_s,
        "ratio": baseline_s.map(|b| total_s / b),
        "rss_peak_sampled_kib": peak_rss,
        "hwm_kib": hwm,
        "rss_steady_kib": steady,
        "api_requests_per_s_all_clients": window.len() as f64 / total_s,
        "requests_by_client": by_agent(&window),
        "rekey_requests_per_rotation": rekey_requests as f64 / n as f64,
    })
}

/// Every size in `sizes`, each in a cluster of its own; `cap` per size.
pub async fn run(sizes: &[usize], cap: impl Fn(usize) -> Duration) -> Value {
    let mut out = vec![];
    for &n in sizes {
        out.push(size(n, cap(n)).await);
    }
    Value::Array(out)
}
