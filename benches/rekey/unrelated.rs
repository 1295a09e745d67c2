//! Unrelated objects (issue 13 part 1): rekey's and ESO's resident memory
//! and API requests with a handful of SecretRotations, before and after
//! 10,000 unrelated 100 KB Secrets and 5,000 unrelated pods (kwok, `nodeName`
//! set, so no scheduler work) appear in other namespaces. rekey keeps no
//! cluster-wide cache of either, so neither its memory nor its requests
//! should move; ESO is the reference, measured in the same run.

use rekey_testenv as common;

use std::time::{Duration, Instant};

use crate::REKEY;
use crate::report::by_agent;
use common::audit;
use common::fixtures::*;
use common::operator::{Operator, proc_status_kib};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use serde_json::{Value, json};

pub const SECRETS: usize = 10_000;
const SECRET_BYTES: usize = 100 * 1024;
pub const PODS: usize = 5_000;
/// The unrelated objects are spread over this many namespaces.
const NAMESPACES: usize = 10;

/// VmRSS and VmHWM of a process (KiB).
fn memory(pid: Option<u32>) -> Value {
    let pid = pid.unwrap_or(0);
    json!({
        "rss_kib": proc_status_kib(pid, "VmRSS"),
        "hwm_kib": proc_status_kib(pid, "VmHWM"),
    })
}

async fn create_all<T, F>(api_for: impl Fn(usize) -> Api<T>, n: usize, object: F) -> usize
where
    T: Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    F: Fn(usize) -> T,
{
    futures::stream::iter(0..n)
        .map(|i| {
            let (api, o) = (api_for(i), object(i));
            async move { api.create(&Default::default(), &o).await.is_ok() }
        })
        .buffer_unordered(16)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await
}

pub async fn run() -> Value {
    let opts = common::Options {
        moto: false,
        audit: true,
        pods_per_node: PODS,
        ..Default::default()
    };
    let (c, client, ns) = common::setup_private("unrelated", opts).await;
    let c = &c;
    scene(c, &client, &ns, &common::canary("old")).await;
    let op = Operator::start_with_args(REKEY, c, &ns, c.kubeconfig.clone(), &["--poll=30s"]);
    audit::wait_for_rekey_watching(&c.audit_log()).await;
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(json!({"generated": {}})),
    )
    .await;
    for i in 0..4 {
        let name = format!("other-{i}");
        create_rotation(&client, &ns, &name, unproven_generated_spec(&name)).await;
    }
    all_succeeded(&client, &ns, 5, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let eso = c.pid_of("external-secrets");
    let before = json!({"rekey": memory(op.pid()), "eso": memory(eso)});
    let log = c.audit_log();
    let from = audit::requests(&log, "").len();

    let started = Instant::now();
    let mut spaces = vec![];
    for _ in 0..NAMESPACES {
        spaces.push(common::namespace(&client, "unrelated").await);
    }
    let filler = "x".repeat(SECRET_BYTES);
    let secrets = create_all(
        |i| Api::<Secret>::namespaced(client.clone(), &spaces[i % NAMESPACES]),
        SECRETS,
        |i| {
            serde_json::from_value(json!({
                "metadata": {"name": format!("unrelated-{i}")},
                "stringData": {"blob": filler}
            }))
            .unwrap()
        },
    )
    .await;
    let secrets_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let pods = create_all(
        |i| Api::<Pod>::namespaced(client.clone(), &spaces[i % NAMESPACES]),
        PODS,
        |i| {
            serde_json::from_value(json!({
                "metadata": {"name": format!("unrelated-{i}"), "labels": {"app": "unrelated"}},
                "spec": {"nodeName": format!("kwok-node-{}", i % 2), "containers": [{
                    "name": "c", "image": "example.invalid/c:1",
                    "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": format!("unrelated-{i}"), "key": "blob"}}}]}]}
            }))
            .unwrap()
        },
    )
    .await;
    let pods_s = started.elapsed().as_secs_f64();
    // kwok marks the pods Running; let every watcher catch up.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after = json!({"rekey": memory(op.pid()), "eso": memory(eso)});
    let during: Vec<audit::Request> = audit::requests(&log, "").into_iter().skip(from).collect();
    let rekey_requests: Vec<audit::Request> = during
        .iter()
        .filter(|r| r.user_agent.starts_with("rekey/"))
        .cloned()
        .collect();
    let growth = |who: &str| {
        let f = |v: &Value| v[who]["rss_kib"].as_f64().unwrap_or(f64::NAN);
        f(&after) - f(&before)
    };
    drop(op);
    json!({
        "secrets": secrets,
        "secret_bytes": SECRET_BYTES,
        "secrets_created_s": secrets_s,
        "pods": pods,
        "pods_created_s": pods_s,
        "namespaces": NAMESPACES,
        "before": before,
        "after": after,
        "rekey_rss_growth_kib": growth("rekey"),
        "eso_rss_growth_kib": growth("eso"),
        "requests_while_they_appeared": by_agent(&during),
        "rekey_requests_while_they_appeared": audit::by_verb_and_resource(&rekey_requests),
    })
}
