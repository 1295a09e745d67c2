//! Change requests (issue 14, item 2): `approval.changeRequests` opens one
//! change per environment in ServiceNow (the emulator of the harness,
//! written from ServiceNow's public API documentation) or through the
//! generic webhook contract, waits for the approvers, and closes each change
//! with the result and the timeline. The tests act as the change advisory
//! board and judge by what the stores, Secrets, workloads and changes show.

use rekey_testenv as common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::REKEY;
use common::fixtures::*;
use common::operator::Operator;
use common::servicenow::{self as snow, ServiceNowEmulator};
use jiff::{Timestamp, ToSpan};
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::Client;
use kube::api::{Api, DeleteParams};
use rekey::crd::{ChangeStatus, Phase, SecretRotation};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);
const NAME: &str = "app-secret";

/// The usual scene (Secret `source` proven through ExternalSecret
/// `app-creds` and Deployment `app`) as environment `stage`, plus the
/// stores of `dev` and `prod`: one value shared by three environments.
/// Returns the ServiceNow emulator (user `rekey`) and every value a store
/// holds, which must never reach a change or the operator's output.
async fn three_environments(
    c: &common::Cluster,
    client: &Client,
    ns: &str,
) -> (ServiceNowEmulator, Stores, String) {
    let stores = Stores {
        stage: common::canary("stage-old"),
        dev: common::canary("dev-old"),
        prod: common::canary("prod-old"),
    };
    scene(c, client, ns, &stores.stage).await;
    put_secret(client, ns, "dev-store", json!({"k": stores.dev})).await;
    put_secret(client, ns, "prod-store", json!({"k": stores.prod})).await;
    let password = common::canary("snow-password");
    put_secret(
        client,
        ns,
        "snow",
        json!({"username": "rekey", "password": password}),
    )
    .await;
    let emu = ServiceNowEmulator::start().await;
    emu.add_user("rekey", &password);
    (emu, stores, password)
}

struct Stores {
    stage: String,
    dev: String,
    prod: String,
}

impl Stores {
    /// What the three stores, the synced Secret hold now.
    async fn read(client: &Client, ns: &str) -> [Option<String>; 4] {
        [
            read_key(client, ns, "source", "client_secret").await,
            read_key(client, ns, "app-creds", "client_secret").await,
            read_key(client, ns, "dev-store", "k").await,
            read_key(client, ns, "prod-store", "k").await,
        ]
    }

    /// Nothing changed anywhere: stores, the synced Secret, the workload.
    async fn unchanged(&self, client: &Client, ns: &str, revisions_before: usize) {
        let now = Self::read(client, ns).await;
        assert_eq!(
            now,
            [
                Some(self.stage.clone()),
                Some(self.stage.clone()),
                Some(self.dev.clone()),
                Some(self.prod.clone())
            ],
            "a store or the synced Secret changed"
        );
        assert_eq!(
            revisions(client, ns, "app").await,
            revisions_before,
            "the workload was restarted"
        );
    }
}

/// The spec: targets of dev, stage and prod; changes for stage and prod.
fn spec(credential: Value, change_system: Value) -> Value {
    let mut spec = rotation_spec(credential);
    spec["targets"] = json!([
        {"name": "dev", "environment": "dev", "kubernetesSecret": {"name": "dev-store", "key": "k", "adoptExisting": true}},
        {"name": "stage", "environment": "stage", "kubernetesSecret": {"name": "source", "key": "client_secret", "adoptExisting": true}},
        {"name": "prod", "environment": "prod", "kubernetesSecret": {"name": "prod-store", "key": "k", "adoptExisting": true}},
    ]);
    let mut changes = change_system;
    changes["environments"] = json!(["stage", "prod"]);
    spec["approval"] = json!({"changeRequests": changes});
    spec
}

fn servicenow(url: &str) -> Value {
    json!({"serviceNow": {"instanceUrl": url, "credentialsSecretRef": {"name": "snow"}}})
}

/// Waits until the emulator holds a change for each of stage and prod in
/// Assess (approval requested); returns their numbers.
async fn changes_requested(emu: &ServiceNowEmulator) -> (String, String) {
    common::wait_for("a change per environment in Assess", LONG, || async {
        ["stage", "prod"]
            .iter()
            .all(|e| emu.change_for(e).is_some_and(|c| c.state() == snow::ASSESS))
    })
    .await;
    let number = |e| emu.change_for(e).unwrap().number().to_string();
    (number("stage"), number("prod"))
}

fn status_changes(sr: &SecretRotation) -> Vec<ChangeStatus> {
    let status = sr.status.as_ref().unwrap();
    match &status.rotation {
        Some(r) => r.changes.clone(),
        None => status.last_rotation.as_ref().unwrap().changes.clone(),
    }
}

fn rotating_message(sr: &SecretRotation) -> String {
    sr.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Rotating"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn failure_reason(sr: &SecretRotation) -> (String, String) {
    let f = sr
        .status
        .as_ref()
        .and_then(|s| s.last_rotation.as_ref())
        .and_then(|l| l.failure.clone())
        .expect("a failure");
    (f.reason, f.message)
}

/// No value of `values` appears in any change's text.
fn no_value_in_changes(emu: &ServiceNowEmulator, values: &[&str]) {
    for c in emu.changes() {
        let text = c.text();
        for v in values {
            assert!(!text.contains(v), "a value reached change {}", c.number());
        }
    }
}

/// The approved path: one change per listed environment (dev needs none),
/// opened once although the first create's answer is lost; the rotation
/// waits for both approvals and for the window to open, then acts, and each
/// change is closed as successful with the timeline.
#[tokio::test]
async fn approved_changes_let_the_rotation_act_and_are_closed_with_the_timeline() {
    let (c, client, ns) = common::setup("change-ok").await;
    let (emu, stores, password) = three_environments(c, &client, &ns).await;
    // The answer to the first create is lost after ServiceNow created it.
    emu.state.lock().unwrap().lose_next_create_answers = 1;
    let revisions_before = revisions(&client, &ns, "app").await;
    let op = Operator::start(REKEY, c, &ns);
    let started = std::time::Instant::now();
    create_rotation(
        &client,
        &ns,
        NAME,
        spec(json!({"generated": {}}), servicenow(&emu.url)),
    )
    .await;
    let (stage, prod) = changes_requested(&emu).await;
    eprintln!("changes requested after {:?}", started.elapsed());
    assert_eq!(
        emu.changes().len(),
        2,
        "one change per environment, none for dev, none twice after the lost answer"
    );
    let stage_change = emu.change_for("stage").unwrap();
    assert!(stage_change.get("short_description").contains("stage"));
    assert_eq!(stage_change.get("type"), "normal");

    // Stage approved, but its window opens in an hour; prod not yet approved.
    emu.approve(&stage);
    let now = Timestamp::now();
    emu.set_window(&stage, now + 1.hour(), now + 2.hours());
    common::wait_for("the status to show both changes", LONG, || async {
        let sr = get_rotation(&client, &ns, NAME).await;
        let changes = status_changes(&sr);
        changes.len() == 2
            && changes
                .iter()
                .any(|c| c.number == stage && c.state == "Scheduled")
            && changes
                .iter()
                .any(|c| c.number == prod && c.state == "Assess")
    })
    .await;
    emu.approve(&prod);
    common::wait_for("the wait for the stage window", LONG, || async {
        let sr = get_rotation(&client, &ns, NAME).await;
        rotating_message(&sr).contains("waiting for their change windows to open")
    })
    .await;
    let sr = get_rotation(&client, &ns, NAME).await;
    assert_eq!(phase_of(&sr), Some(Phase::AwaitingApproval));
    stores.unchanged(&client, &ns, revisions_before).await;
    // What a person sees: the Reconciling condition and kubectl rekey status.
    let reconciling = sr
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Reconciling"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        reconciling.contains(&format!("{stage} (stage) Scheduled")),
        "{reconciling}"
    );
    let (ok, shown) = crate::plugin(c, &ns, &["status", NAME]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains(&format!(
            "change {stage} (stage): Scheduled, approval Approved, window"
        )),
        "{shown}"
    );

    // The window opens: the rotation acts.
    emu.set_window(&stage, now - 1.minute(), now + 1.hour());
    let sr = wait_phase(&client, &ns, NAME, Phase::Succeeded, LONG).await;
    eprintln!(
        "rotation succeeded {:?} after it was created",
        started.elapsed()
    );
    let id = sr
        .status
        .as_ref()
        .unwrap()
        .last_rotation
        .as_ref()
        .unwrap()
        .id
        .clone();
    let [source, synced, dev, prod_value] = Stores::read(&client, &ns).await;
    let new = source.unwrap();
    assert_ne!(new, stores.stage);
    assert_eq!(synced.as_deref(), Some(new.as_str()));
    assert_eq!(dev.as_deref(), Some(new.as_str()));
    assert_eq!(prod_value.as_deref(), Some(new.as_str()));

    assert_eq!(emu.changes().len(), 2);
    for change in emu.changes() {
        assert_eq!(change.state(), snow::CLOSED, "{}", change.number());
        assert_eq!(change.get("close_code"), "successful");
        let notes = change.get("close_notes");
        assert!(notes.contains(&id), "{notes}");
        assert!(notes.contains("Succeeded"), "{notes}");
        assert!(notes.contains("Timeline:"), "{notes}");
        assert!(notes.contains("AwaitingApproval"), "{notes}");
        assert!(notes.contains("Invalidating"), "{notes}");
        // The state model, walked in order.
        assert_eq!(
            change.states,
            vec![
                snow::NEW,
                snow::ASSESS,
                snow::AUTHORIZE,
                snow::SCHEDULED,
                snow::IMPLEMENT,
                snow::REVIEW,
                snow::CLOSED
            ],
            "{}",
            change.number()
        );
    }
    let closed = status_changes(&sr);
    assert_eq!(closed.len(), 2);
    assert!(
        closed
            .iter()
            .all(|c| c.closed == "Successful" && c.state == "Closed")
    );
    let (ok, shown) = crate::plugin(c, &ns, &["status", NAME]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains(&format!("change {prod} (prod): Closed, approval Approved")),
        "{shown}"
    );
    assert!(shown.contains("closed Successful"), "{shown}");
    no_value_in_changes(
        &emu,
        &[&stores.stage, &stores.dev, &stores.prod, &new, &password],
    );
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&stores.stage, &stores.dev, &stores.prod, &new, &password],
    )
    .await;
}

/// A rejected stage change stops the shared value everywhere: prod was
/// approved, dev needs no change, yet nothing changes in any store, Secret
/// or workload, and the prod change is cancelled.
#[tokio::test]
async fn a_rejected_stage_change_stops_every_environment_before_any_side_effect() {
    let (c, client, ns) = common::setup("change-rejected").await;
    let (emu, stores, password) = three_environments(c, &client, &ns).await;
    let revisions_before = revisions(&client, &ns, "app").await;
    let op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        NAME,
        spec(json!({"generated": {}}), servicenow(&emu.url)),
    )
    .await;
    let (stage, prod) = changes_requested(&emu).await;
    emu.approve(&prod);
    emu.reject(&stage);
    let sr = wait_phase(&client, &ns, NAME, Phase::Failed, LONG).await;
    let (reason, message) = failure_reason(&sr);
    assert_eq!(reason, "ChangeRejected");
    assert!(message.contains(&stage), "{message}");
    stores.unchanged(&client, &ns, revisions_before).await;
    for change in emu.changes() {
        assert!(
            !change.states.contains(&snow::IMPLEMENT),
            "{} was implemented",
            change.number()
        );
        assert_eq!(change.state(), snow::CANCELED, "{}", change.number());
        assert!(change.get("close_notes").contains("ChangeRejected"));
    }
    assert!(status_changes(&sr).iter().all(|c| c.closed == "Canceled"));
    no_value_in_changes(&emu, &[&stores.stage, &stores.dev, &stores.prod, &password]);
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&stores.stage, &stores.dev, &stores.prod, &password],
    )
    .await;
}

/// An approval that arrives after the change window ended is refused:
/// nothing is changed.
#[tokio::test]
async fn an_approval_after_the_change_window_is_refused() {
    let (c, client, ns) = common::setup("change-late").await;
    let (emu, stores, _) = three_environments(c, &client, &ns).await;
    let revisions_before = revisions(&client, &ns, "app").await;
    let _op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        NAME,
        spec(json!({"generated": {}}), servicenow(&emu.url)),
    )
    .await;
    let (stage, prod) = changes_requested(&emu).await;
    let now = Timestamp::now();
    emu.set_window(&prod, now - 2.hours(), now - 1.hour());
    emu.approve(&stage);
    emu.approve(&prod);
    let sr = wait_phase(&client, &ns, NAME, Phase::Failed, LONG).await;
    let (reason, message) = failure_reason(&sr);
    assert_eq!(reason, "ChangeWindowClosed");
    assert!(message.contains(&prod), "{message}");
    stores.unchanged(&client, &ns, revisions_before).await;
    assert!(
        emu.changes()
            .iter()
            .all(|c| !c.states.contains(&snow::IMPLEMENT) && c.state() == snow::CANCELED)
    );
}

/// A change window that closes during the rotation: the rotation finishes
/// its proof, but the old value is not invalidated until the window is
/// extended; then it is, once, and the changes close as successful.
#[tokio::test]
async fn a_window_closing_mid_rotation_holds_invalidation_until_extended() {
    let (c, client, ns) = common::setup("change-window").await;
    let (emu, stores, _) = three_environments(c, &client, &ns).await;
    let new = common::canary("new");
    let (url, log) =
        crate::rotation::webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    // The rollout cannot start until the quota goes.
    block_new_pods(&client, &ns, 2).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = spec(webhook_credential(&url), servicenow(&emu.url));
    spec["proof"]["timeout"] = json!("100s");
    create_rotation(&client, &ns, NAME, spec).await;
    let (stage, prod) = changes_requested(&emu).await;
    let now = Timestamp::now();
    for number in [&stage, &prod] {
        emu.set_window(number, now - 1.minute(), now + 1.hour());
        emu.approve(number);
    }
    wait_phase(&client, &ns, NAME, Phase::AwaitingRollout, LONG).await;
    // The stage window closes mid-rotation.
    emu.set_window(&stage, now - 2.hours(), Timestamp::now() - 1.second());
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    common::wait_for("invalidation held", LONG, || async {
        let sr = get_rotation(&client, &ns, NAME).await;
        phase_of(&sr) == Some(Phase::Invalidating)
            && rotating_message(&sr).contains("invalidation held")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sr = get_rotation(&client, &ns, NAME).await;
    assert_eq!(phase_of(&sr), Some(Phase::Invalidating));
    assert!(
        rotating_message(&sr).contains(&stage),
        "{}",
        rotating_message(&sr)
    );
    assert!(
        log.lock().unwrap().invalidated.is_empty(),
        "the old value was invalidated after the window closed"
    );
    // The proof is complete: every environment runs the new value.
    assert_eq!(
        Stores::read(&client, &ns).await,
        [
            Some(new.clone()),
            Some(new.clone()),
            Some(new.clone()),
            Some(new.clone())
        ]
    );

    // The change manager extends the window.
    emu.set_window(&stage, now - 2.hours(), Timestamp::now() + 1.hour());
    wait_phase(&client, &ns, NAME, Phase::Succeeded, LONG).await;
    assert_eq!(log.lock().unwrap().invalidated.len(), 1);
    for change in emu.changes() {
        assert_eq!(change.state(), snow::CLOSED);
        assert_eq!(change.get("close_code"), "successful");
    }
    no_value_in_changes(&emu, &[&stores.stage, &new]);
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&stores.stage, &new],
    )
    .await;
}

/// A standard change (pre-approved template) needs no approver, but its
/// approval is still read back from ServiceNow.
#[tokio::test]
async fn a_standard_change_from_a_template_proceeds_on_its_read_back_approval() {
    let (c, client, ns) = common::setup("change-standard").await;
    install_crd(c);
    let password = common::canary("snow-password");
    put_secret(
        &client,
        &ns,
        "snow",
        json!({"username": "rekey", "password": password}),
    )
    .await;
    let emu = ServiceNowEmulator::start().await;
    emu.add_user("rekey", &password);
    emu.add_template("0b5a9ad1db1f1c10a3e0f3a6dc961911");
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = unproven_generated_spec("app-creds");
    spec["targets"][0]["environment"] = json!("prod");
    spec["approval"] = json!({"changeRequests": {"environments": ["prod"], "serviceNow": {
        "instanceUrl": emu.url, "credentialsSecretRef": {"name": "snow"},
        "type": "Standard", "standardTemplateId": "0b5a9ad1db1f1c10a3e0f3a6dc961911"}}});
    create_rotation(&client, &ns, NAME, spec).await;
    wait_phase(&client, &ns, NAME, Phase::Succeeded, LONG).await;
    let changes = emu.changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].get("type"), "standard");
    assert_eq!(
        changes[0].states,
        vec![
            snow::NEW,
            snow::SCHEDULED,
            snow::IMPLEMENT,
            snow::REVIEW,
            snow::CLOSED
        ]
    );
}

/// The operator dies right after ServiceNow created the change, before it
/// recorded the answer: the restarted operator finds the change by its
/// correlation id and opens no second one.
#[tokio::test]
async fn an_operator_crash_right_after_opening_a_change_opens_no_second_one() {
    let (c, client, ns) = common::setup("change-crash").await;
    install_crd(c);
    let password = common::canary("snow-password");
    put_secret(
        &client,
        &ns,
        "snow",
        json!({"username": "rekey", "password": password}),
    )
    .await;
    let emu = ServiceNowEmulator::start().await;
    emu.add_user("rekey", &password);
    let mut op = Operator::start_with_env(
        REKEY,
        c,
        &ns,
        &[("REKEY_FAILPOINT", "after:open-change-request")],
    );
    let mut spec = unproven_generated_spec("app-creds");
    spec["targets"][0]["environment"] = json!("prod");
    spec["approval"] = json!({"changeRequests": {"environments": ["prod"], "serviceNow": {
        "instanceUrl": emu.url, "credentialsSecretRef": {"name": "snow"}}}});
    create_rotation(&client, &ns, NAME, spec).await;
    let started = std::time::Instant::now();
    while !op.exited() {
        assert!(
            started.elapsed() < LONG,
            "the operator never reached the failpoint"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(emu.changes().len(), 1);
    // Recorded before it was created; its id never was.
    let recorded = status_changes(&get_rotation(&client, &ns, NAME).await);
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].environment, "prod");
    assert!(recorded[0].id.is_empty());

    op.set_env(&[]);
    op.restart();
    common::wait_for("the change in Assess", LONG, || async {
        emu.change_for("prod")
            .is_some_and(|c| c.state() == snow::ASSESS)
    })
    .await;
    emu.approve(emu.change_for("prod").unwrap().number());
    let sr = wait_phase(&client, &ns, NAME, Phase::Succeeded, LONG).await;
    assert_eq!(emu.changes().len(), 1, "a second change was opened");
    assert_eq!(emu.changes()[0].state(), snow::CLOSED);
    let closed = status_changes(&sr);
    assert_eq!(closed[0].number, emu.changes()[0].number());
}

/// A webhook source: issues `value`, counts invalidations.
async fn source_server(value: String) -> (String, Arc<Mutex<usize>>) {
    use axum::routing::post;
    let invalidations = Arc::new(Mutex::new(0));
    let counted = invalidations.clone();
    let app = axum::Router::new()
        .route(
            "/issue",
            post(move || async move { axum::Json(json!({"value": value})) }),
        )
        .route(
            "/invalidate",
            post(move || async move {
                *counted.lock().unwrap() += 1;
                "ok"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, invalidations)
}

/// A change cancelled while the rotation acts (here during the rollout)
/// ends the rotation before invalidation: the new value stays in use, the
/// old one is never invalidated.
#[tokio::test]
async fn a_change_cancelled_mid_rotation_ends_it_without_invalidation() {
    let (c, client, ns) = common::setup("change-cancelled").await;
    let (emu, _, _) = three_environments(c, &client, &ns).await;
    let new = common::canary("new");
    let (url, invalidations) = source_server(new.clone()).await;
    block_new_pods(&client, &ns, 2).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = spec(webhook_credential(&url), servicenow(&emu.url));
    spec["proof"]["timeout"] = json!("100s");
    create_rotation(&client, &ns, NAME, spec).await;
    let (stage, prod) = changes_requested(&emu).await;
    emu.approve(&stage);
    emu.approve(&prod);
    wait_phase(&client, &ns, NAME, Phase::AwaitingRollout, LONG).await;
    // The prod change is withdrawn while the rollout runs.
    emu.cancel(&prod);
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    let sr = wait_phase(&client, &ns, NAME, Phase::Failed, LONG).await;
    let (reason, message) = failure_reason(&sr);
    assert_eq!(reason, "ChangeRejected");
    assert!(
        message.contains(&prod) && message.contains("before the old value was invalidated"),
        "{message}"
    );
    let failure = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(failure.phase, Phase::Invalidating);
    assert_eq!(
        *invalidations.lock().unwrap(),
        0,
        "the old value was invalidated"
    );
    assert_eq!(
        Stores::read(&client, &ns).await,
        [
            Some(new.clone()),
            Some(new.clone()),
            Some(new.clone()),
            Some(new)
        ]
    );
    // The stage change is closed as unsuccessful; the cancelled one stays so.
    let stage_change = emu.change_for("stage").unwrap();
    assert_eq!(stage_change.state(), snow::CLOSED);
    assert_eq!(stage_change.get("close_code"), "unsuccessful");
    assert_eq!(emu.change_for("prod").unwrap().state(), snow::CANCELED);
}

/// The generic webhook contract (docs/sources.md), served by a small test
/// server: open (idempotent by correlation id), read, start, close.
#[derive(Default)]
struct HookChanges {
    /// id -> (correlation id, state, close body)
    changes: HashMap<String, (String, String, Option<Value>)>,
    opens: usize,
}

async fn change_webhook(token: String) -> (String, Arc<Mutex<HookChanges>>) {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    type S = (Arc<Mutex<HookChanges>>, String);
    let changes = Arc::new(Mutex::new(HookChanges::default()));
    let authorized = |headers: &HeaderMap, token: &str| {
        headers.get("authorization").and_then(|h| h.to_str().ok())
            == Some(&format!("Bearer {token}"))
    };
    let answer =
        |id: &str, state: &str| json!({"id": id, "number": format!("CR-{id}"), "state": state});
    let app = axum::Router::new()
        .route(
            "/changes",
            post(
                move |State((changes, token)): State<S>,
                      headers: HeaderMap,
                      axum::Json(body): axum::Json<Value>| async move {
                    if !authorized(&headers, &token) {
                        return StatusCode::UNAUTHORIZED.into_response();
                    }
                    let correlation = body["correlationId"].as_str().unwrap().to_string();
                    assert_eq!(
                        headers.get("idempotency-key").and_then(|h| h.to_str().ok()),
                        Some(correlation.as_str())
                    );
                    let mut c = changes.lock().unwrap();
                    c.opens += 1;
                    let existing = c
                        .changes
                        .iter()
                        .find(|(_, (k, _, _))| *k == correlation)
                        .map(|(id, (_, s, _))| (id.clone(), s.clone()));
                    let (id, state) = existing.unwrap_or_else(|| {
                        let id = (c.changes.len() + 1).to_string();
                        c.changes
                            .insert(id.clone(), (correlation, "requested".into(), None));
                        (id, "requested".into())
                    });
                    axum::Json(answer(&id, &state)).into_response()
                },
            ),
        )
        .route(
            "/changes/{id}",
            get(
                move |State((changes, _)): State<S>, Path(id): Path<String>| async move {
                    let c = changes.lock().unwrap();
                    axum::Json(answer(&id, &c.changes[&id].1))
                },
            ),
        )
        .route(
            "/changes/{id}/start",
            post(
                move |State((changes, _)): State<S>, Path(id): Path<String>| async move {
                    let mut c = changes.lock().unwrap();
                    let change = c.changes.get_mut(&id).unwrap();
                    assert_eq!(change.1, "approved", "started before approval");
                    change.1 = "implementing".into();
                    axum::Json(answer(&id, "implementing"))
                },
            ),
        )
        .route(
            "/changes/{id}/close",
            post(
                move |State((changes, _)): State<S>,
                      Path(id): Path<String>,
                      axum::Json(body): axum::Json<Value>| async move {
                    let mut c = changes.lock().unwrap();
                    let change = c.changes.get_mut(&id).unwrap();
                    change.1 = "closed".into();
                    change.2 = Some(body);
                    axum::Json(answer(&id, "closed"))
                },
            ),
        )
        .with_state((changes.clone(), token));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, changes)
}

#[tokio::test]
async fn the_change_webhook_contract_opens_waits_starts_and_closes() {
    let (c, client, ns) = common::setup("change-webhook").await;
    install_crd(c);
    let token = common::canary("change-token");
    put_secret(&client, &ns, "change-token", json!({"token": token})).await;
    let (url, changes) = change_webhook(token.clone()).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = unproven_generated_spec("app-creds");
    spec["targets"][0]["environment"] = json!("prod");
    spec["approval"] = json!({"changeRequests": {"environments": ["prod"], "webhook": {
        "url": url, "authSecretRef": {"name": "change-token", "key": "token"}}}});
    create_rotation(&client, &ns, NAME, spec).await;
    common::wait_for("the change requested", LONG, || async {
        let sr = get_rotation(&client, &ns, NAME).await;
        rotating_message(&sr).contains("waiting for change requests to be approved: CR-1 (prod)")
    })
    .await;
    assert!(read_key(&client, &ns, "app-creds", "k").await.is_none());
    changes.lock().unwrap().changes.get_mut("1").unwrap().1 = "approved".into();
    let sr = wait_phase(&client, &ns, NAME, Phase::Succeeded, LONG).await;
    let id = sr
        .status
        .as_ref()
        .unwrap()
        .last_rotation
        .as_ref()
        .unwrap()
        .id
        .clone();
    let value = read_key(&client, &ns, "app-creds", "k").await.unwrap();
    let c = std::mem::take(&mut *changes.lock().unwrap());
    assert_eq!(c.changes.len(), 1);
    let (correlation, state, close) = &c.changes["1"];
    assert_eq!(correlation, &format!("rekey-{id}-prod"));
    assert_eq!(state, "closed");
    let close = close.as_ref().unwrap();
    assert_eq!(close["result"], "Successful");
    assert!(close["notes"].as_str().unwrap().contains(&id));
    let phases: Vec<&str> = close["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert!(
        phases.contains(&"AwaitingApproval") && phases.contains(&"Invalidating"),
        "{phases:?}"
    );
    assert!(!close.to_string().contains(&value));
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&token, &value],
    )
    .await;
}
