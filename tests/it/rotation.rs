//! End-to-end rotations on the real control plane with real ESO and kwok:
//! the operator binary runs against it and is judged by what a user sees.

use rekey_testenv as common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::REKEY;
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::crd::Phase;
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn generated_value_rotates_through_eso_and_rollout() {
    let (c, client, ns) = common::setup("generated").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    assert_eq!(revisions(&client, &ns, "app").await, 1);
    let op = Operator::start(REKEY, c, &ns);
    let before = op.scrape().await;
    assert!(
        !before.contains("rekey_rotations_started_total{"),
        "no rotation counted yet"
    );

    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(json!({"generated": {"length": 40}})),
    )
    .await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;

    // The value ESO delivers is new, has the requested shape, and is what the store holds.
    let synced = read_key(&client, &ns, "app-creds", "client_secret")
        .await
        .unwrap();
    assert_ne!(synced, old);
    assert_eq!(synced.len(), 40);
    assert!(synced.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(synced.as_str())
    );
    // The Deployment rolled exactly once, and completely.
    assert_eq!(
        revisions(&client, &ns, "app").await,
        2,
        "exactly one rollout"
    );
    assert!(deployment_available(&client, &ns, "app").await);

    // Status tells the story: result, phases with durations, versions, history.
    let status = sr.status.clone().unwrap();
    let last = status.last_rotation.clone().unwrap();
    assert_eq!(last.result, Phase::Succeeded);
    assert_eq!(last.reason, "Created");
    let phases: Vec<Phase> = last.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        vec![
            Phase::Pending,
            Phase::Preflight,
            Phase::Issuing,
            Phase::Writing,
            Phase::AwaitingSync,
            Phase::AwaitingRollout,
            Phase::Verifying,
            Phase::Invalidating
        ]
    );
    assert_eq!(last.targets.len(), 1);
    assert!(!last.targets[0].version.is_empty());
    assert_eq!(status.history.len(), 1);
    assert!(status.rotation.is_none());
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Rotated")
    );
    // Events name the rotation and the versions, phase by phase.
    let notes = event_notes(&client, &ns, "app-secret").await;
    let reasons: Vec<&str> = notes.iter().map(|(r, _)| r.as_str()).collect();
    for want in [
        "RotationRequested",
        "Issuing",
        "Writing",
        "AwaitingSync",
        "AwaitingRollout",
        "RotationSucceeded",
    ] {
        assert!(reasons.contains(&want), "missing Event {want}: {reasons:?}");
    }
    assert!(
        notes.iter().all(|(_, n)| n.contains(&last.id)),
        "every Event names the rotation id"
    );
    // A generated value has no issuer: the success says nothing was invalidated.
    let success = notes
        .iter()
        .find(|(r, _)| r == "RotationSucceeded")
        .map(|(_, n)| n.clone())
        .unwrap();
    assert!(
        success.contains("nothing was invalidated") && !success.contains("retired"),
        "{success}"
    );
    assert!(
        notes
            .iter()
            .any(|(_, n)| n.contains(&format!("main={}", last.targets[0].version)))
    );
    // The write-ahead record is gone: no copy of the value lingers.
    assert!(
        read_key(&client, &ns, &rekey::wal::secret_name("app-secret"), "new")
            .await
            .is_none()
    );

    // The series moved during the rotation.
    let metrics = op.scrape().await;
    let labels = format!("namespace=\"{ns}\",name=\"app-secret\"");
    let has = |line: &str| metrics.lines().any(|l| l == line);
    assert!(
        has(&format!("rekey_rotations_started_total{{{labels}}} 1")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rekey_rotations_finished_total{")
                && l.contains("result=\"Succeeded\"")
                && l.ends_with(" 1"))
    );
    assert!(
        has(&format!(
            "rekey_rotation_phase{{{labels},phase=\"Succeeded\"}} 1"
        )),
        "{metrics}"
    );
    // One phase series per SecretRotation, however many phases it passed.
    let phase_series = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("rekey_rotation_phase{") && l.contains(&labels))
            .count()
    };
    assert_eq!(phase_series(&metrics), 1, "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rekey_phase_duration_seconds_count{phase=\"AwaitingSync\"}"))
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rekey_provider_calls_total{")
                && l.contains("provider=\"kubernetes\""))
    );
    assert_never_leaked(&client, &ns, &op.logs(), &metrics, &[&old, &synced]).await;

    // A deleted SecretRotation leaves no series behind.
    let rotations: Api<rekey::crd::SecretRotation> = Api::namespaced(client.clone(), &ns);
    rotations
        .delete("app-secret", &Default::default())
        .await
        .unwrap();
    common::wait_for("the SecretRotation gone", LONG, || async {
        rotations.get_opt("app-secret").await.unwrap().is_none()
    })
    .await;
    let metrics = op.scrape().await;
    let left: Vec<&str> = metrics.lines().filter(|l| l.contains(&labels)).collect();
    assert!(left.is_empty(), "series of a deleted rotation: {left:?}");
}

/// Records webhook calls; at the moment of the invalidate call it also
/// records what the cluster looked like.
#[derive(Default, Clone)]
pub(crate) struct WebhookLog {
    pub(crate) issued: Vec<(String, String)>,
    pub(crate) invalidated: Vec<(String, Instant, Option<String>, bool)>,
}

fn idempotency_key(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("idempotency-key")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

pub(crate) async fn webhook_server(
    client: Client,
    ns: String,
    values: Vec<String>,
) -> (String, Arc<Mutex<WebhookLog>>) {
    use axum::extract::State;
    use axum::http::HeaderMap;
    use axum::routing::post;
    let log = Arc::new(Mutex::new(WebhookLog::default()));
    type S = (Arc<Mutex<WebhookLog>>, Client, String, Arc<Vec<String>>);
    let state: S = (log.clone(), client, ns, Arc::new(values));
    let app = axum::Router::new()
        .route(
            "/issue",
            post(
                |State((log, _, _, values)): State<S>, headers: HeaderMap| async move {
                    let key = idempotency_key(&headers);
                    let mut log = log.lock().unwrap();
                    // Same idempotency key, same value (the documented contract).
                    let value = match log.issued.iter().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.clone(),
                        None => values[log.issued.len() % values.len()].clone(),
                    };
                    log.issued.push((key, value.clone()));
                    axum::Json(json!({"value": value}))
                },
            ),
        )
        .route(
            "/invalidate",
            post(
                |State((log, client, ns, _)): State<S>, headers: HeaderMap| async move {
                    let key = idempotency_key(&headers);
                    let synced = read_key(&client, &ns, "app-creds", "client_secret").await;
                    let rolled = deployment_available(&client, &ns, "app").await;
                    log.lock()
                        .unwrap()
                        .invalidated
                        .push((key, Instant::now(), synced, rolled));
                    "ok"
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

#[tokio::test]
async fn webhook_invalidates_once_and_only_after_sync_and_rollout() {
    let (c, client, ns) = common::setup("webhook").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    let (url, log) = webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    let op = Operator::start(REKEY, c, &ns);
    let spec = rotation_spec(webhook_credential(&url));
    create_rotation(&client, &ns, "app-secret", spec).await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let id = sr
        .status
        .as_ref()
        .unwrap()
        .last_rotation
        .as_ref()
        .unwrap()
        .id
        .clone();

    let log = log.lock().unwrap().clone();
    assert!(
        log.issued.iter().all(|(k, _)| *k == id),
        "issue used the rotation id as idempotency key"
    );
    assert_eq!(log.invalidated.len(), 1, "invalidate called exactly once");
    let (key, _, synced_then, rolled_then) = &log.invalidated[0];
    assert_eq!(key, &id);
    assert_eq!(
        synced_then.as_deref(),
        Some(new.as_str()),
        "ESO had synced the new value before invalidation"
    );
    assert!(rolled_then, "the rollout was complete before invalidation");
    assert_eq!(revisions(&client, &ns, "app").await, 2);
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

#[tokio::test]
async fn external_secret_that_never_syncs_fails_without_invalidation_and_rolls_back() {
    let (c, client, ns) = common::setup("nosync").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    // A second ExternalSecret that reads another Secret holding the same
    // value (so Preflight accepts it): it is Ready, but it will never
    // deliver the value rekey writes.
    put_secret(&client, &ns, "elsewhere", json!({"client_secret": old})).await;
    external_secret(&client, &ns, "wrong-source", "elsewhere").await;
    common::wait_for("wrong-source synced", LONG, || async {
        read_key(&client, &ns, "wrong-source", "client_secret")
            .await
            .as_deref()
            == Some(old.as_str())
    })
    .await;
    let (url, log) = webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(webhook_credential(&url));
    spec["proof"]["externalSecrets"] = json!([{"name": "app-creds", "key": "client_secret"}, {"name": "wrong-source", "key": "client_secret"}]);
    spec["proof"]["timeout"] = json!("15s");
    spec["onFailure"] = json!("Rollback");
    create_rotation(&client, &ns, "app-secret", spec).await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;

    let last = sr.status.as_ref().unwrap().last_rotation.clone().unwrap();
    let failure = last.failure.clone().unwrap();
    assert_eq!(failure.reason, "SyncTimeout");
    assert_eq!(failure.phase, Phase::AwaitingSync);
    assert!(
        failure.message.contains("wrong-source"),
        "{}",
        failure.message
    );
    assert!(last.rolled_back);
    assert!(
        log.lock().unwrap().invalidated.is_empty(),
        "the old value was never invalidated"
    );
    // Rollback: the store and the synced Secret hold the old value again.
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str())
    );
    assert_eq!(
        read_key(&client, &ns, "app-creds", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str())
    );
    let ready = sr
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SyncTimeout")
    );
    // Events are recorded after the status write: waited for, not assumed.
    common::wait_for(
        "the RotationFailed Event",
        Duration::from_secs(30),
        || async {
            event_notes(&client, &ns, "app-secret")
                .await
                .iter()
                .any(|(r, _)| r == "RotationFailed")
        },
    )
    .await;
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

#[tokio::test]
async fn rollout_that_never_completes_fails_and_holds() {
    let (c, client, ns) = common::setup("norollout").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    // The namespace may hold only the 2 running pods: the surge pod of any
    // rollout is refused, so the new revision never becomes ready.
    block_new_pods(&client, &ns, 2).await;
    let (url, log) = webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(webhook_credential(&url));
    spec["proof"]["timeout"] = json!("20s");
    create_rotation(&client, &ns, "app-secret", spec).await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;

    let last = sr.status.as_ref().unwrap().last_rotation.clone().unwrap();
    assert_eq!(last.failure.as_ref().unwrap().reason, "RolloutTimeout");
    assert!(!last.rolled_back, "onFailure defaults to Hold");
    assert!(
        log.lock().unwrap().invalidated.is_empty(),
        "the old value was never invalidated"
    );
    // Hold: the new value stays where it was written.
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(new.as_str())
    );
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

#[tokio::test]
async fn trigger_change_on_demand_annotation_and_schedule_each_start_a_rotation() {
    let (c, client, ns) = common::setup("triggers").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["trigger"] = json!("CHG0001");
    create_rotation(&client, &ns, "app-secret", spec).await;
    let history = |n: usize| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            common::wait_for(&format!("{n} rotations"), LONG, || async {
                let sr = get_rotation(&client, &ns, "app-secret").await;
                let s = sr.status.unwrap_or_default();
                s.history.len() >= n && s.rotation.is_none()
            })
            .await;
            get_rotation(&client, &ns, "app-secret")
                .await
                .status
                .unwrap()
        }
    };
    let s = history(1).await;
    assert_eq!(s.history[0].reason, "Created");
    // Nothing else happens on its own.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get_rotation(&client, &ns, "app-secret")
            .await
            .status
            .unwrap()
            .history
            .len(),
        1
    );

    // GitOps: a new trigger value.
    let api: Api<rekey::crd::SecretRotation> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "app-secret",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"trigger": "CHG0002"}})),
    )
    .await
    .unwrap();
    let s = history(2).await;
    assert_eq!(s.history[0].reason, "TriggerChanged");
    assert_eq!(s.observed_trigger.as_deref(), Some("CHG0002"));

    // On demand (what `kubectl rekey rotate` does).
    annotate_rotation(
        &client,
        &ns,
        "app-secret",
        "rekey.dev/rotate",
        "2026-11-25T12:00:00Z",
    )
    .await;
    let s = history(3).await;
    assert_eq!(s.history[0].reason, "OnDemand");

    // Schedule: every 1m after the last rotation finished.
    api.patch(
        "app-secret",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"schedule": {"every": "1m"}}})),
    )
    .await
    .unwrap();
    let s = history(4).await;
    assert_eq!(s.history[0].reason, "Schedule");
    assert!(s.next_rotation_at.is_some());
    assert_eq!(
        revisions(&client, &ns, "app").await,
        5,
        "one rollout per rotation"
    );
}

#[tokio::test]
async fn approval_gate_holds_until_approved_and_requests_queue() {
    let (c, client, ns) = common::setup("approval").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["approval"] = json!({"required": true});
    create_rotation(&client, &ns, "app-secret", spec).await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::AwaitingApproval, LONG).await;
    let id = sr
        .status
        .as_ref()
        .unwrap()
        .rotation
        .as_ref()
        .unwrap()
        .id
        .clone();
    // A request arriving meanwhile is kept, visibly.
    annotate_rotation(&client, &ns, "app-secret", "rekey.dev/rotate", "again").await;
    common::wait_for("pending request shown", Duration::from_secs(20), || async {
        get_rotation(&client, &ns, "app-secret")
            .await
            .status
            .unwrap()
            .pending_request
            .as_deref()
            == Some("OnDemand")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sr = get_rotation(&client, &ns, "app-secret").await;
    assert_eq!(
        phase_of(&sr),
        Some(Phase::AwaitingApproval),
        "nothing happens without approval"
    );
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str())
    );

    annotate_rotation(&client, &ns, "app-secret", "rekey.dev/approve", &id).await;
    common::wait_for("first rotation done", LONG, || async {
        let s = get_rotation(&client, &ns, "app-secret")
            .await
            .status
            .unwrap();
        s.history
            .first()
            .is_some_and(|h| h.id == id && h.result == Phase::Succeeded)
    })
    .await;
    // The queued request starts the next rotation, which waits for approval again.
    let sr = wait_phase(&client, &ns, "app-secret", Phase::AwaitingApproval, LONG).await;
    let rot = sr.status.as_ref().unwrap().rotation.clone().unwrap();
    assert_ne!(rot.id, id);
    assert_eq!(rot.reason, "OnDemand");
}

#[tokio::test]
async fn a_crashing_operator_never_rolls_out_twice() {
    let (c, client, ns) = common::setup("crash").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    let (url, log) = webhook_server(
        client.clone(),
        ns.clone(),
        vec![new.clone(), common::canary("second-issue")],
    )
    .await;
    let mut op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(webhook_credential(&url)),
    )
    .await;
    // Kill the operator (SIGKILL) as soon as each phase is entered, and start it again.
    let mut seen = vec![];
    let start = Instant::now();
    loop {
        let sr = get_rotation(&client, &ns, "app-secret").await;
        let phase = phase_of(&sr);
        if phase == Some(Phase::Succeeded) {
            break;
        }
        if let Some(p) = phase
            && !seen.contains(&p)
        {
            seen.push(p);
            op.restart();
        }
        assert!(
            start.elapsed() < LONG,
            "no success after {LONG:?}: {:?}",
            sr.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Most phases take tens of milliseconds and may pass between two polls;
    // the rollout wait (where a second restart would happen) is always seen.
    assert!(
        seen.contains(&Phase::AwaitingRollout),
        "never crashed while awaiting the rollout: {seen:?}"
    );
    assert!(seen.len() >= 3, "crashed in too few phases: {seen:?}");
    assert_eq!(
        revisions(&client, &ns, "app").await,
        2,
        "exactly one rollout despite {} crashes",
        seen.len()
    );
    let log = log.lock().unwrap().clone();
    let keys: std::collections::BTreeSet<&String> = log.issued.iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 1, "one rotation id for every issue call");
    assert!(
        log.issued.iter().all(|(_, v)| *v == new),
        "never a second new value"
    );
    // A crash between the invalidate call and the status write repeats the
    // call with the same idempotency key (the documented contract); every
    // call came after the proof.
    assert!(!log.invalidated.is_empty());
    for (key, _, synced_then, rolled_then) in &log.invalidated {
        assert!(keys.contains(key), "invalidate carries the rotation id");
        assert_eq!(synced_then.as_deref(), Some(new.as_str()));
        assert!(rolled_then);
    }
    assert_eq!(
        read_key(&client, &ns, "app-creds", "client_secret")
            .await
            .as_deref(),
        Some(new.as_str())
    );
}

#[tokio::test]
async fn idle_reconciles_write_nothing() {
    let (c, client, ns) = common::setup("idle").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let _op = Operator::start(REKEY, c, &ns);
    generated_rotation_succeeds(&client, &ns, "app-secret").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A label change makes the controller reconcile; it has nothing to do.
    let api: Api<rekey::crd::SecretRotation> = Api::namespaced(client.clone(), &ns);
    let touched = api
        .patch(
            "app-secret",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = api.get("app-secret").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, touched.metadata.resource_version,
        "an idle reconcile wrote something"
    );
    let d = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("app")
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(2), "no further restart");
}

#[tokio::test]
async fn manual_source_waits_for_the_person_to_confirm_invalidation() {
    let (c, client, ns) = common::setup("manual").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    put_secret(&client, &ns, "new-client-secret", json!({"value": new})).await;
    let op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(
            json!({"manual": {"secretRef": {"name": "new-client-secret", "key": "value"}}}),
        ),
    )
    .await;
    let sr = wait_phase(
        &client,
        &ns,
        "app-secret",
        Phase::AwaitingConfirmation,
        LONG,
    )
    .await;
    let id = sr
        .status
        .as_ref()
        .unwrap()
        .rotation
        .as_ref()
        .unwrap()
        .id
        .clone();
    // Proof came first: the new value is synced and rolled out.
    assert_eq!(
        read_key(&client, &ns, "app-creds", "client_secret")
            .await
            .as_deref(),
        Some(new.as_str())
    );
    assert_eq!(revisions(&client, &ns, "app").await, 2);
    let notes = event_notes(&client, &ns, "app-secret").await;
    let tell = notes
        .iter()
        .find(|(r, _)| r == "InvalidateOldValue")
        .expect("an Event tells the person what to do");
    assert!(
        tell.1
            .contains(&format!("rekey.dev/confirm-invalidated={id}")),
        "{}",
        tell.1
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        phase_of(&get_rotation(&client, &ns, "app-secret").await),
        Some(Phase::AwaitingConfirmation)
    );

    annotate_rotation(
        &client,
        &ns,
        "app-secret",
        "rekey.dev/confirm-invalidated",
        &id,
    )
    .await;
    wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;

    // Asking again without a new value in the Secret is refused in Preflight.
    annotate_rotation(&client, &ns, "app-secret", "rekey.dev/rotate", "again").await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    let failure = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(
        (failure.reason.as_str(), failure.phase),
        ("ManualValueUnchanged", Phase::Preflight)
    );
    assert_eq!(
        revisions(&client, &ns, "app").await,
        2,
        "a refused rotation changes nothing"
    );
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

#[tokio::test]
async fn statefulsets_and_daemonsets_roll_once_per_rotation() {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    let (c, client, ns) = common::setup("kinds").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let template = |app: &str| {
        json!({"metadata": {"labels": {"app": app}}, "spec": {"containers": [{"name": "c", "image": "example.invalid/c:1",
            "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "app-creds", "key": "client_secret"}}}]}]}})
    };
    let sts: StatefulSet = serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": template("db")}}))
    .unwrap();
    let ds: DaemonSet = serde_json::from_value(json!({"metadata": {"name": "agent"}, "spec": {
        "selector": {"matchLabels": {"app": "agent"}}, "template": template("agent")}}))
    .unwrap();
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
    Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &ds)
        .await
        .unwrap();
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["workloads"] = json!([
        {"kind": "Deployment", "name": "app"}, {"kind": "StatefulSet", "name": "db"}, {"kind": "DaemonSet", "name": "agent"}]);
    create_rotation(&client, &ns, "app-secret", spec).await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let id = sr.status.unwrap().last_rotation.unwrap().id;
    let stamp = rekey::proof::rollout::restart_annotation("app-secret");

    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get("db")
        .await
        .unwrap();
    let anns = sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(anns.get(&stamp), Some(&id));
    assert_eq!(sts.metadata.generation, Some(2), "one restart");
    let s = sts.status.unwrap();
    assert_eq!((s.updated_replicas, s.ready_replicas), (Some(2), Some(2)));
    assert_eq!(s.current_revision, s.update_revision);

    let ds = Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .get("agent")
        .await
        .unwrap();
    assert_eq!(ds.metadata.generation, Some(2), "one restart");
    let s = ds.status.unwrap();
    assert!(s.desired_number_scheduled > 0);
    assert_eq!(s.updated_number_scheduled, Some(s.desired_number_scheduled));
    assert_eq!(s.number_available, Some(s.desired_number_scheduled));
    assert_eq!(revisions(&client, &ns, "app").await, 2);
}

#[tokio::test]
async fn await_mode_waits_for_another_restarter() {
    let (c, client, ns) = common::setup("await").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["restart"] = json!("Await");
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingRollout, LONG).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sr = get_rotation(&client, &ns, "app-secret").await;
    assert_eq!(
        phase_of(&sr),
        Some(Phase::AwaitingRollout),
        "rekey waits instead of restarting"
    );
    assert_eq!(
        revisions(&client, &ns, "app").await,
        1,
        "rekey did not restart it"
    );
    // Another restarter (what Reloader does) restarts the Deployment.
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"reloader/last-reloaded": "now"}}}}});
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    assert_eq!(revisions(&client, &ns, "app").await, 2);
}

#[tokio::test]
async fn late_proof_warns_about_the_grace_window() {
    let (c, client, ns) = common::setup("grace").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    block_new_pods(&client, &ns, 2).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["oldValueValidFor"] = json!("1m");
    spec["proof"]["timeout"] = json!("54s");
    create_rotation(&client, &ns, "app-secret", spec).await;
    common::wait_for("GraceWindowAtRisk warning", LONG, || async {
        events(&client, &ns).await.iter().any(|e| {
            e.reason.as_deref() == Some("GraceWindowAtRisk")
                && e.type_.as_deref() == Some("Warning")
        })
    })
    .await;
    let sr = get_rotation(&client, &ns, "app-secret").await;
    let cond = sr
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "GraceWindowAtRisk")
        .unwrap();
    assert_eq!(cond.status, "True");
    assert!(op.scrape().await.contains("rekey_grace_seconds_left{"));
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    assert_eq!(
        sr.status
            .unwrap()
            .last_rotation
            .unwrap()
            .failure
            .unwrap()
            .reason,
        "RolloutTimeout"
    );
}

#[tokio::test]
async fn preflight_refuses_what_cannot_be_proven_and_dry_run_changes_nothing() {
    let (c, client, ns) = common::setup("preflight").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    // An ExternalSecret that syncs once and then ignores refresh requests.
    put_secret(
        &client,
        &ns,
        "frozen-src",
        json!({"client_secret": common::canary("frozen")}),
    )
    .await;
    external_secret_from(
        &client,
        &ns,
        "frozen",
        "cluster-secrets",
        json!({"key": "frozen-src", "property": "client_secret"}),
        "0",
    )
    .await;
    let _op = Operator::start(REKEY, c, &ns);

    let mut frozen = rotation_spec(json!({"generated": {}}));
    frozen["proof"]["externalSecrets"] = json!([{"name": "frozen", "key": "client_secret"}]);
    let mut missing = rotation_spec(json!({"generated": {}}));
    missing["proof"]["workloads"] = json!([{"kind": "Deployment", "name": "does-not-exist"}]);
    let mut dry = rotation_spec(json!({"generated": {}}));
    dry["dryRun"] = json!(true);
    create_rotation(&client, &ns, "frozen", frozen).await;
    create_rotation(&client, &ns, "missing", missing).await;
    create_rotation(&client, &ns, "dry", dry).await;

    for (name, reason) in [
        ("frozen", "RefreshNotHonoured"),
        ("missing", "WorkloadNotFound"),
    ] {
        let sr = wait_phase(&client, &ns, name, Phase::Failed, LONG).await;
        let f = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
        assert_eq!(
            (f.reason.as_str(), f.phase),
            (reason, Phase::Preflight),
            "{name}: {}",
            f.message
        );
    }
    let sr = wait_phase(&client, &ns, "dry", Phase::DryRunSucceeded, LONG).await;
    assert_eq!(
        sr.status
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .reason,
        "DryRunSucceeded"
    );
    // Nothing was written or restarted by any of them.
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str())
    );
    assert_eq!(revisions(&client, &ns, "app").await, 1);
}

#[tokio::test]
async fn a_spec_change_during_a_rotation_fails_it_without_invalidation() {
    let (c, client, ns) = common::setup("specchange").await;
    let old = common::canary("old");
    let new = common::canary("new");
    scene(c, &client, &ns, &old).await;
    let (url, log) = webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(webhook_credential(&url));
    spec["proof"]["restart"] = json!("Await");
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingRollout, LONG).await;
    // Someone points the rotation at another workload while it waits.
    let api: Api<rekey::crd::SecretRotation> = Api::namespaced(client.clone(), &ns);
    let patch =
        json!({"spec": {"proof": {"workloads": [{"kind": "Deployment", "name": "other"}]}}});
    api.patch("app-secret", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    let f = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(
        (f.reason.as_str(), f.phase),
        ("SpecChangedDuringRotation", Phase::AwaitingRollout)
    );
    assert!(
        log.lock().unwrap().invalidated.is_empty(),
        "the old value was never invalidated"
    );
}
