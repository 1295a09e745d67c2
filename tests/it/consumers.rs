//! Issue 11: every consumer of the value is covered by the proof, old pods
//! drain before the old value dies, and rollouts that can never progress
//! are refused, on the real control plane with ESO and kwok.

use rekey_testenv as common;

use std::time::{Duration, Instant};

use crate::REKEY;
use crate::rotation::webhook_server;
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use rekey::crd::{Phase, SecretRotation};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

async fn create<K>(client: &Client, ns: &str, object: Value)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let o: K = serde_json::from_value(object).unwrap();
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &o)
        .await
        .unwrap();
}

/// A bare pod that reads Secret `secret` in the way `how` names.
async fn bare_pod(client: &Client, ns: &str, name: &str, how: &str, secret: &str) {
    let mut container = json!({"name": "app", "image": "example.invalid/app:1"});
    let mut volumes = json!([]);
    match how {
        "env" => {
            container["env"] = json!([{"name": "S", "valueFrom": {"secretKeyRef": {"name": secret, "key": "client_secret"}}}])
        }
        "envFrom" => container["envFrom"] = json!([{"secretRef": {"name": secret}}]),
        "volume" => volumes = json!([{"name": "s", "secret": {"secretName": secret}}]),
        "projected" => {
            volumes =
                json!([{"name": "s", "projected": {"sources": [{"secret": {"name": secret}}]}}])
        }
        other => panic!("no such reference: {other}"),
    }
    create::<Pod>(
        client,
        ns,
        json!({"metadata": {"name": name}, "spec": {"containers": [container], "volumes": volumes}}),
    )
    .await;
}

fn last_failure(sr: &SecretRotation) -> rekey::crd::Failure {
    sr.status
        .as_ref()
        .and_then(|s| s.last_rotation.as_ref())
        .and_then(|l| l.failure.clone())
        .expect("a failure")
}

fn rotating_message(sr: &SecretRotation) -> String {
    sr.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Rotating"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// The source Secret still holds `value` and ESO was never asked to refresh.
async fn nothing_changed(client: &Client, ns: &str, value: &str) {
    assert_eq!(
        read_key(client, ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(value),
        "the target was not written"
    );
    let es = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        ns,
        &es_resource("ExternalSecret"),
    )
    .get("app-creds")
    .await
    .unwrap();
    assert!(
        es.metadata
            .annotations
            .unwrap_or_default()
            .keys()
            .all(|k| k != "force-sync"),
        "no refresh was requested"
    );
}

/// Creates SecretRotation `name` and asserts that Preflight refused it with
/// `reason`, a message that contains `says`, and nothing changed.
async fn refused(
    client: &Client,
    ns: &str,
    name: &str,
    spec: Value,
    reason: &str,
    says: &str,
    old: &str,
) -> String {
    create_rotation(client, ns, name, spec).await;
    let sr = wait_phase(client, ns, name, Phase::Failed, LONG).await;
    let failure = last_failure(&sr);
    assert_eq!(
        (failure.reason.as_str(), failure.phase),
        (reason, Phase::Preflight)
    );
    assert!(failure.message.contains(says), "{}", failure.message);
    nothing_changed(client, ns, old).await;
    failure.message
}

/// Pods that read the synced Secret through env, envFrom, a volume and a
/// projected volume, and a second Deployment: none is in the proof, so the
/// rotation stops at Preflight, names each, and changes nothing.
#[tokio::test]
async fn unlisted_consumers_stop_the_rotation_before_any_change() {
    let (c, client, ns) = common::setup("uncovered").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    for how in ["env", "envFrom", "volume", "projected"] {
        bare_pod(
            &client,
            &ns,
            &format!("by-{}", how.to_lowercase()),
            how,
            "app-creds",
        )
        .await;
    }
    deployment(&client, &ns, "other", 1, "app-creds").await;
    // A pod that reads only an unrelated Secret is no consumer.
    bare_pod(&client, &ns, "unrelated", "env", "something-else").await;
    let _op = Operator::start(REKEY, c, &ns);
    let generated = rotation_spec(json!({"generated": {}}));
    let message = refused(
        &client,
        &ns,
        "app-secret",
        generated,
        "UncoveredConsumer",
        "Deployment other, Pod by-env, Pod by-envfrom, Pod by-projected, Pod by-volume.",
        &old,
    )
    .await;
    assert!(!message.contains("unrelated"), "{message}");
    assert!(!message.contains("Deployment app"), "{message}");
}

/// A suspended CronJob has no pod, but its template reads the value: it is
/// found. Declared as awaited, the rotation goes through and status lists
/// how every consumer is covered.
#[tokio::test]
async fn a_cronjob_consumer_is_found_and_can_be_awaited() {
    let (c, client, ns) = common::setup("cronjob").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    create::<CronJob>(
        &client,
        &ns,
        json!({"metadata": {"name": "nightly"}, "spec": {
            "schedule": "0 3 * * *", "suspend": true,
            "jobTemplate": {"spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "job", "image": "example.invalid/job:1",
                                "envFrom": [{"secretRef": {"name": "app-creds"}}]}]}}}}}}),
    )
    .await;
    let _op = Operator::start(REKEY, c, &ns);
    let generated = rotation_spec(json!({"generated": {}}));
    refused(
        &client,
        &ns,
        "first",
        generated,
        "UncoveredConsumer",
        "CronJob nightly",
        &old,
    )
    .await;

    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["consumers"] =
        json!([{"kind": "CronJob", "name": "nightly", "handling": "Await"}]);
    create_rotation(&client, &ns, "second", spec).await;
    let sr = wait_phase(&client, &ns, "second", Phase::Succeeded, LONG).await;
    let consumers = sr
        .status
        .unwrap()
        .last_rotation
        .unwrap()
        .consumers
        .into_iter()
        .map(|c| format!("{} {} {}", c.kind, c.name, c.handling))
        .collect::<Vec<_>>();
    assert_eq!(
        consumers,
        ["CronJob nightly Await", "Deployment app Restarted"]
    );
}

/// A Deployment that starts reading the value while the rotation awaits the
/// rollout is caught by the re-check before invalidation: the old value
/// stays valid until the spec says how it is handled.
#[tokio::test]
async fn a_consumer_added_during_the_rollout_delays_invalidation_until_handled() {
    let (c, client, ns) = common::setup("late-consumer").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    let (url, log) = webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(webhook_credential(&url));
    spec["proof"]["restart"] = json!("Await");
    spec["proof"]["timeout"] = json!("90s");
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingRollout, LONG).await;

    deployment(&client, &ns, "late", 1, "app-creds").await;
    common::wait_for("late available", LONG, || async {
        deployment_available(&client, &ns, "late").await
    })
    .await;
    // The restart rekey awaits.
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"restarted": "now"}}}}});
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    common::wait_for("the re-check to name the new consumer", LONG, || async {
        let sr = get_rotation(&client, &ns, "app-secret").await;
        phase_of(&sr) == Some(Phase::Invalidating)
            && rotating_message(&sr).contains("Deployment late")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        phase_of(&get_rotation(&client, &ns, "app-secret").await),
        Some(Phase::Invalidating)
    );
    assert!(
        log.lock().unwrap().invalidated.is_empty(),
        "not invalidated while a consumer is uncovered"
    );

    let handled_at = Instant::now();
    let patch = json!({"spec": {"proof": {"consumers": [
        {"kind": "Deployment", "name": "late", "handling": "Accept", "reason": "reads the value at start only; restarted by its team"}]}}});
    Api::<SecretRotation>::namespaced(client.clone(), &ns)
        .patch("app-secret", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.invalidated.len(), 1);
    assert!(log.invalidated[0].1 > handled_at);
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

const HOLD: &str = "test.rekey.dev/hold";

/// One old pod of the restarted Deployment stays Terminating (a finalizer
/// the test owns): the Deployment reports the rollout complete, but the old
/// value is invalidated only after that pod is gone.
#[tokio::test]
async fn a_terminating_old_pod_delays_invalidation_until_it_is_gone() {
    let (c, client, ns) = common::setup("drain").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let held = pods
        .list(&ListParams::default().labels("app=app"))
        .await
        .unwrap()
        .items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    let hold = json!({"metadata": {"finalizers": [HOLD]}});
    pods.patch(&held, &PatchParams::default(), &Patch::Merge(&hold))
        .await
        .unwrap();
    let (url, log) = webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(webhook_credential(&url));
    spec["proof"]["timeout"] = json!("90s");
    create_rotation(&client, &ns, "app-secret", spec).await;

    common::wait_for("the drain proof to name the held pod", LONG, || async {
        let sr = get_rotation(&client, &ns, "app-secret").await;
        rotating_message(&sr).contains(
            "1 pod that started before the new value was synced still running or terminating: Deployment app (1)",
        )
    })
    .await;
    assert!(
        deployment_available(&client, &ns, "app").await,
        "the Deployment says it is done"
    );
    let p = pods.get(&held).await.unwrap();
    assert!(
        p.metadata.deletion_timestamp.is_some(),
        "the held pod is Terminating"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        log.lock().unwrap().invalidated.is_empty(),
        "not invalidated while an old pod terminates"
    );

    let released_at = Instant::now();
    pods.patch(
        &held,
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.invalidated.len(), 1);
    assert!(
        log.invalidated[0].1 > released_at,
        "invalidated after the last old pod disappeared"
    );
    assert!(pods.get_opt(&held).await.unwrap().is_none());
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

/// A paused Deployment and a StatefulSet with `updateStrategy: OnDelete`
/// would never replace their pods: refused at Preflight.
#[tokio::test]
async fn rollouts_that_cannot_progress_are_refused_at_preflight() {
    let (c, client, ns) = common::setup("stuck").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    create::<StatefulSet>(
        &client,
        &ns,
        json!({"metadata": {"name": "db"}, "spec": {
            "serviceName": "db", "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "updateStrategy": {"type": "OnDelete"},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{
                "name": "db", "image": "example.invalid/db:1",
                "envFrom": [{"secretRef": {"name": "app-creds"}}]}]}}}}),
    )
    .await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["workloads"] =
        json!([{"kind": "Deployment", "name": "app"}, {"kind": "StatefulSet", "name": "db"}]);
    let on_delete = "StatefulSet db has updateStrategy OnDelete";
    refused(
        &client,
        &ns,
        "on-delete",
        spec,
        "RolloutCannotProgress",
        on_delete,
        &old,
    )
    .await;

    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    let generated = rotation_spec(json!({"generated": {}}));
    let paused = "Deployment app is paused";
    refused(
        &client,
        &ns,
        "paused",
        generated,
        "RolloutCannotProgress",
        paused,
        &old,
    )
    .await;
}

/// A proven workload that Reloader also restarts: a warning condition names
/// it (each rotation would roll it out twice).
#[tokio::test]
async fn a_second_restarter_is_named_in_a_condition() {
    let (c, client, ns) = common::setup("restarters").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let reloader = json!({"metadata": {"annotations": {"reloader.stakater.com/auto": "true"}}});
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch("app", &PatchParams::default(), &Patch::Merge(&reloader))
        .await
        .unwrap();
    let _op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(json!({"generated": {}})),
    )
    .await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let condition = sr
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CompetingRestarter")
        .expect("a CompetingRestarter condition");
    assert_eq!(condition.status, "True");
    assert!(
        condition.message.starts_with(
            "Deployment app is also restarted by Reloader (reloader.stakater.com/auto)"
        ),
        "{}",
        condition.message
    );
}
