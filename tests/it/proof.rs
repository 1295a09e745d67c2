//! What counts as proof, on the real control plane with real ESO and kwok:
//! restarts that happened before the sync, rollbacks that must prove the
//! old value is back, templated keys, and one deadline for the whole proof.

use rekey_testenv as common;

use std::time::Duration;

use crate::REKEY;
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use rekey::crd::Phase;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

/// Points ExternalSecret `es` at key `client_secret` of Secret `source`
/// (a Secret that does not exist makes it fail, keeping what it synced).
async fn point_external_secret(client: &Client, ns: &str, es: &str, source: &str) {
    let patch = json!({"spec": {"data": [{"secretKey": "client_secret", "remoteRef": {"key": source, "property": "client_secret"}}]}});
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &es_resource("ExternalSecret"))
        .patch(es, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Points ExternalSecret `es` at a Secret that does not exist and waits
/// until ESO reports it not Ready: from then on it syncs nothing.
async fn break_external_secret(client: &Client, ns: &str, es: &str) {
    point_external_secret(client, ns, es, "nowhere").await;
    let api =
        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &es_resource("ExternalSecret"));
    common::wait_for("ESO to see the broken ExternalSecret", LONG, || async {
        let o = api.get(es).await.unwrap();
        let generation = o.metadata.generation;
        let ready_false = o
            .data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "False")
            });
        ready_false
            && o.data
                .pointer("/status/observedGeneration")
                .is_none_or(|g| g.as_i64() == generation)
    })
    .await;
}

async fn patch_template(client: &Client, ns: &str, name: &str, annotation: &str) {
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {annotation: "now"}}}}});
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn phase_now(client: &Client, ns: &str, name: &str) -> Option<Phase> {
    phase_of(&get_rotation(client, ns, name).await)
}

fn failure(sr: &rekey::crd::SecretRotation) -> rekey::crd::Failure {
    sr.status
        .as_ref()
        .and_then(|s| s.last_rotation.as_ref())
        .and_then(|l| l.failure.clone())
        .expect("a failure")
}

/// Issue 10 item 5: with `restart: Await`, a deploy that happened while ESO
/// had not synced yet started its pods on the old value: it is no proof.
#[tokio::test]
async fn await_mode_ignores_a_restart_made_before_the_sync() {
    await_scenario().await;
}

async fn await_scenario() {
    let (c, client, ns) = common::setup("await-early").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    // ESO cannot sync until the test points it back at `source`.
    break_external_secret(&client, &ns, "app-creds").await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["restart"] = json!("Await");
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingSync, LONG).await;
    // An unrelated deploy while the synced Secret still holds the old value.
    patch_template(&client, &ns, "app", "deploy/unrelated").await;
    common::wait_for("unrelated deploy rolled out", LONG, || async {
        revisions(&client, &ns, "app").await == 2 && deployment_available(&client, &ns, "app").await
    })
    .await;
    // Kubernetes timestamps have whole seconds, and a pod created in the
    // same second as ESO's sync counts as started after it: the sync comes
    // clearly later here.
    tokio::time::sleep(Duration::from_secs(2)).await;
    point_external_secret(&client, &ns, "app-creds", "source").await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingRollout, LONG).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sr = get_rotation(&client, &ns, "app-secret").await;
    if phase_of(&sr) != Some(Phase::AwaitingRollout) {
        let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
            .list(&Default::default())
            .await
            .unwrap();
        let pods: Vec<_> = pods
            .items
            .iter()
            .map(|p| {
                (
                    p.metadata.name.clone(),
                    p.metadata.creation_timestamp.clone(),
                    p.metadata.deletion_timestamp.clone(),
                )
            })
            .collect();
        let es = Api::<DynamicObject>::namespaced_with(
            client.clone(),
            &ns,
            &es_resource("ExternalSecret"),
        )
        .get("app-creds")
        .await
        .unwrap();
        panic!(
            "pods that started before the sync are no proof: {}\npods {pods:?}\nES status {}\nlogs {}",
            serde_json::to_string_pretty(&sr.status).unwrap(),
            es.data["status"],
            op.logs()
        );
    }
    // The restarter (what Reloader does) reacts to the synced Secret.
    patch_template(&client, &ns, "app", "reloader/last-reloaded").await;
    wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    assert_eq!(revisions(&client, &ns, "app").await, 3);
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old]).await;
}

/// A Deployment whose pods cannot be scheduled until the test lets them.
async fn unschedulable_deployment(client: &Client, ns: &str, name: &str) {
    deployment(client, ns, name, 1, "app-creds").await;
    let patch =
        json!({"spec": {"template": {"spec": {"nodeSelector": {"rekey.dev/test": "nowhere"}}}}});
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn let_schedule(client: &Client, ns: &str, name: &str) {
    let patch = json!({"spec": {"template": {"spec": {"nodeSelector": null}}}});
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

fn template_annotations(d: &Deployment) -> std::collections::BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default()
}

/// Issue 10 item 12: a workload that already runs the new value is
/// restarted onto the old one when the rotation rolls back.
#[tokio::test]
async fn rollback_restarts_workloads_back_onto_the_old_value() {
    let (c, client, ns) = common::setup("rollback-restart").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    unschedulable_deployment(&client, &ns, "stuck").await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["workloads"] =
        json!([{"kind": "Deployment", "name": "app"}, {"kind": "Deployment", "name": "stuck"}]);
    spec["proof"]["timeout"] = json!("20s");
    spec["onFailure"] = json!("Rollback");
    create_rotation(&client, &ns, "app-secret", spec).await;
    // `app` rolls out on the new value; `stuck` never does: RolloutTimeout.
    common::wait_for("the rollback", LONG, || async {
        matches!(
            phase_now(&client, &ns, "app-secret").await,
            Some(Phase::RollingBack | Phase::Failed)
        )
    })
    .await;
    let_schedule(&client, &ns, "stuck").await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    let f = failure(&sr);
    assert_eq!(f.reason, "RolloutTimeout", "{}", f.message);
    assert_rolled_back_to(&client, &ns, &sr, &old).await;
    // app: the original template, the rotation's restart, the rollback's.
    assert_eq!(revisions(&client, &ns, "app").await, 3, "restarted back");
    assert!(deployment_available(&client, &ns, "app").await);
    let app = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("app")
        .await
        .unwrap();
    let stamp = template_annotations(&app)
        .into_iter()
        .find(|(k, _)| k == "rotation.rekey.dev/app-secret")
        .map(|(_, v)| v)
        .unwrap();
    assert!(stamp.ends_with("-rollback"), "{stamp}");
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old]).await;
}

/// Issue 10 item 12: an ExternalSecret that is merely not Ready does not
/// count as rolled back; its Secret must hold the old value again.
#[tokio::test]
async fn rollback_waits_until_the_synced_secret_holds_the_old_value() {
    let (c, client, ns) = common::setup("rollback-sync").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    // A second ExternalSecret that holds the old value but reads another
    // Secret: it will never deliver the new value (SyncTimeout).
    put_secret(&client, &ns, "elsewhere", json!({"client_secret": old})).await;
    external_secret(&client, &ns, "other", "elsewhere").await;
    common::wait_for("other synced", LONG, || async {
        read_key(&client, &ns, "other", "client_secret")
            .await
            .as_deref()
            == Some(old.as_str())
    })
    .await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["externalSecrets"] = json!([
        {"name": "app-creds", "key": "client_secret"},
        {"name": "other", "key": "client_secret"}
    ]);
    spec["proof"]["timeout"] = json!("20s");
    spec["onFailure"] = json!("Rollback");
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingSync, LONG).await;
    // app-creds receives the new value, then ESO can no longer sync it.
    common::wait_for("app-creds holds the new value", LONG, || async {
        let written = read_key(&client, &ns, "source", "client_secret").await;
        written.as_deref() != Some(old.as_str())
            && read_key(&client, &ns, "app-creds", "client_secret").await == written
    })
    .await;
    break_external_secret(&client, &ns, "app-creds").await;
    wait_phase(&client, &ns, "app-secret", Phase::RollingBack, LONG).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        phase_now(&client, &ns, "app-secret").await,
        Some(Phase::RollingBack),
        "a Secret that still holds the new value is not rolled back"
    );
    point_external_secret(&client, &ns, "app-creds", "source").await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    assert_eq!(failure(&sr).reason, "SyncTimeout");
    assert_rolled_back_to(&client, &ns, &sr, &old).await;
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old]).await;
}

/// The rotation ended rolled back, and the synced Secret holds `old` again.
async fn assert_rolled_back_to(
    client: &Client,
    ns: &str,
    sr: &rekey::crd::SecretRotation,
    old: &str,
) {
    let rolled_back = sr
        .status
        .as_ref()
        .and_then(|s| s.last_rotation.as_ref())
        .is_some_and(|l| l.rolled_back);
    assert!(rolled_back, "the rotation says it rolled back");
    assert_eq!(
        read_key(client, ns, "app-creds", "client_secret")
            .await
            .as_deref(),
        Some(old)
    );
}

/// An ExternalSecret whose template renders the value into a DSN under key
/// `DSN` (the key `client_secret` does not exist in its Secret).
async fn templated_external_secret(client: &Client, ns: &str, name: &str) {
    create_eso_object(
        client,
        ns,
        json!({
            "kind": "ExternalSecret",
            "metadata": {"name": name},
            "spec": {
                "refreshInterval": "1h",
                "secretStoreRef": {"kind": "SecretStore", "name": "cluster-secrets"},
                "target": {"name": name, "template": {
                    "data": {"DSN": "postgres://app:{{ .client_secret }}@db:5432/app"}
                }},
                "data": [{"secretKey": "client_secret", "remoteRef": {"key": "source", "property": "client_secret"}}]
            }
        }),
    )
    .await;
}

/// Issue 10 item 14: a proof key that a template renamed is refused before
/// anything is issued; a templated key that embeds the value is proven with
/// `match: Contains`.
#[tokio::test]
async fn templated_keys_are_checked_at_preflight_and_proven_by_containment() {
    let (c, client, ns) = common::setup("template").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    templated_external_secret(&client, &ns, "dsn").await;
    common::wait_for("dsn synced", LONG, || async {
        read_key(&client, &ns, "dsn", "DSN")
            .await
            .is_some_and(|d| d.contains(&old))
    })
    .await;
    let op = Operator::start(REKEY, c, &ns);
    // app-creds pulls the same key as dsn: it is proven too (issue 11).
    let with_proof = |proof: Value| {
        let mut spec = rotation_spec(json!({"generated": {}}));
        spec["proof"]["externalSecrets"] =
            json!([{"name": "app-creds", "key": "client_secret"}, proof]);
        spec
    };
    create_rotation(
        &client,
        &ns,
        "renamed",
        with_proof(json!({"name": "dsn", "key": "client_secret"})),
    )
    .await;
    let sr = wait_phase(&client, &ns, "renamed", Phase::Failed, LONG).await;
    let f = failure(&sr);
    assert_eq!(
        (f.reason.as_str(), f.phase),
        ("ProofKeyMissing", Phase::Preflight),
        "{}",
        f.message
    );
    create_rotation(
        &client,
        &ns,
        "exact",
        with_proof(json!({"name": "dsn", "key": "DSN"})),
    )
    .await;
    let sr = wait_phase(&client, &ns, "exact", Phase::Failed, LONG).await;
    let f = failure(&sr);
    assert_eq!(
        (f.reason.as_str(), f.phase),
        ("ProofKeyMismatch", Phase::Preflight),
        "{}",
        f.message
    );
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str()),
        "nothing was issued or written"
    );
    create_rotation(
        &client,
        &ns,
        "contains",
        with_proof(json!({"name": "dsn", "key": "DSN", "match": "Contains"})),
    )
    .await;
    wait_phase(&client, &ns, "contains", Phase::Succeeded, LONG).await;
    let new = read_key(&client, &ns, "source", "client_secret")
        .await
        .unwrap();
    assert_ne!(new, old);
    assert!(
        read_key(&client, &ns, "dsn", "DSN")
            .await
            .unwrap()
            .contains(&new)
    );
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

/// Issue 10 item 2: `proof.timeout` is one deadline from the moment the new
/// value is issued, not a fresh budget for each wait.
#[tokio::test]
async fn one_deadline_covers_sync_and_rollout_together() {
    let (c, client, ns) = common::setup("deadline").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    break_external_secret(&client, &ns, "app-creds").await;
    block_new_pods(&client, &ns, 2).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["timeout"] = json!("25s");
    create_rotation(&client, &ns, "app-secret", spec).await;
    // Each wait takes about 15 s: under the timeout alone, over it together.
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingSync, LONG).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    point_external_secret(&client, &ns, "app-creds", "source").await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingRollout, LONG).await;
    let sr = get_rotation(&client, &ns, "app-secret").await;
    let rotating = sr
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Rotating")
        .unwrap()
        .message
        .clone();
    tokio::time::sleep(Duration::from_secs(15)).await;
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    let f = failure(&sr);
    assert_eq!(
        (f.reason.as_str(), f.phase),
        ("RolloutTimeout", Phase::AwaitingRollout),
        "{}",
        f.message
    );
    // While it ran, the Rotating condition said how much time was left.
    assert!(rotating.contains("proof deadline"), "{rotating}");
    assert!(rotating.contains("old value valid until"), "{rotating}");

    // A timeout that leaves no margin inside the grace window is refused.
    let mut tight = rotation_spec(json!({"generated": {}}));
    tight["oldValueValidFor"] = json!("30m");
    tight["proof"]["timeout"] = json!("29m");
    create_rotation(&client, &ns, "tight", tight).await;
    let sr = wait_phase(&client, &ns, "tight", Phase::Failed, LONG).await;
    let f = failure(&sr);
    assert_eq!(
        (f.reason.as_str(), f.phase),
        ("GraceWindowTooShort", Phase::Preflight),
        "{}",
        f.message
    );
}

/// Issue 10 item 2: when the last rotations needed so long that twice that
/// does not fit in the grace window, the next one is refused at Preflight
/// (nothing issued), unless `proof.ignoreHistory` says to rely on the
/// timeout alone.
#[tokio::test]
async fn a_window_that_recent_rotations_would_not_fit_is_refused() {
    let (c, client, ns) = common::setup("history").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    break_external_secret(&client, &ns, "app-creds").await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["oldValueValidFor"] = json!("1m");
    spec["proof"]["timeout"] = json!("54s");
    create_rotation(&client, &ns, "app-secret", spec).await;
    // The first rotation's sync takes about 30 s: it still fits its deadline.
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingSync, LONG).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    point_external_secret(&client, &ns, "app-creds", "source").await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let first = sr.status.unwrap().last_rotation.unwrap().id;
    let written = read_key(&client, &ns, "source", "client_secret").await;
    // Twice 30 s does not fit in a minute: the next request is refused.
    annotate_rotation(&client, &ns, "app-secret", "rekey.dev/rotate", "again").await;
    common::wait_for("the second rotation to end", LONG, || async {
        get_rotation(&client, &ns, "app-secret")
            .await
            .status
            .is_some_and(|s| s.rotation.is_none() && s.last_rotation.is_some_and(|l| l.id != first))
    })
    .await;
    let f = failure(&get_rotation(&client, &ns, "app-secret").await);
    assert_eq!(
        (f.reason.as_str(), f.phase),
        ("GraceWindowTooShort", Phase::Preflight),
        "{}",
        f.message
    );
    assert!(f.message.contains("slowest"), "{}", f.message);
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret").await,
        written,
        "nothing written"
    );
    // Relying on the timeout alone is an explicit choice.
    let patch = json!({"spec": {"proof": {"ignoreHistory": true}}});
    Api::<rekey::crd::SecretRotation>::namespaced(client.clone(), &ns)
        .patch("app-secret", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    annotate_rotation(&client, &ns, "app-secret", "rekey.dev/rotate", "once-more").await;
    common::wait_for("the third rotation to succeed", LONG, || async {
        get_rotation(&client, &ns, "app-secret")
            .await
            .status
            .is_some_and(|s| {
                s.rotation.is_none() && s.history.len() == 3 && s.phase == Some(Phase::Succeeded)
            })
    })
    .await;
}
