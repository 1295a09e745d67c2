//! Herds and surprises (issue 10 item 11): a restore that recreates every
//! SecretRotation does not rotate everything at once, objects can opt out of
//! rotating on creation, and a trigger changed back rotates again.

use rekey_testenv as common;

use std::time::Duration;

use crate::REKEY;
use common::fixtures::*;
use common::operator::Operator;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use rekey::crd::{Phase, SecretRotation};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(240);

/// A SecretRotation with nothing to prove and a Secret of its own.
fn cheap_spec(i: usize) -> Value {
    json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [{"name": "main", "kubernetesSecret": {"name": format!("cred-{i}"), "key": "k"}}],
        "proof": {"nothingToProve": true}
    })
}

async fn all_rotations(client: &Client, ns: &str) -> Vec<SecretRotation> {
    Api::<SecretRotation>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn a_restore_of_fifty_starts_them_over_time_or_not_at_all() {
    let (c, client, ns) = common::setup("herd").await;
    install_crd(c);
    let args = ["--start-burst", "5", "--starts-per-minute", "60"];
    let _op = Operator::start_with_args(REKEY, c, &ns, c.kubeconfig.clone(), &args);
    for i in 0..50 {
        create_rotation(&client, &ns, &format!("cred-{i}"), cheap_spec(i)).await;
    }
    common::wait_for("50 rotations", LONG, || async {
        let all = all_rotations(&client, &ns).await;
        all.len() == 50 && all.iter().all(|sr| phase_of(sr) == Some(Phase::Succeeded))
    })
    .await;
    let mut starts: Vec<i64> = all_rotations(&client, &ns)
        .await
        .iter()
        .map(|sr| {
            let last = sr.status.as_ref().unwrap().last_rotation.as_ref().unwrap();
            last.started_at.as_ref().unwrap().0.as_second()
        })
        .collect();
    starts.sort();
    let first = starts[0];
    let early = starts.iter().filter(|s| **s <= first + 2).count();
    assert!(
        early <= 5 + 3 + 1,
        "{early} started in the first 3 s: {starts:?}"
    );
    assert!(
        starts[49] - first >= 35,
        "50 starts spread over {} s only: {starts:?}",
        starts[49] - first
    );

    // A restore: every object recreated without status. With
    // rotateOnCreate: false nothing rotates until asked.
    let api = Api::<SecretRotation>::namespaced(client.clone(), &ns);
    for i in 0..50 {
        api.delete(&format!("cred-{i}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    common::wait_for("deletion", LONG, || async {
        all_rotations(&client, &ns).await.is_empty()
    })
    .await;
    for i in 0..50 {
        let mut spec = cheap_spec(i);
        spec["rotateOnCreate"] = json!(false);
        spec["trigger"] = json!("CHG-1");
        create_rotation(&client, &ns, &format!("cred-{i}"), spec).await;
    }
    common::wait_for("every restored object looked at", LONG, || async {
        all_rotations(&client, &ns).await.iter().all(|sr| {
            sr.status
                .as_ref()
                .is_some_and(|s| s.observed_trigger.as_deref() == Some("CHG-1"))
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rotated = all_rotations(&client, &ns)
        .await
        .iter()
        .filter(|sr| {
            sr.status
                .as_ref()
                .is_some_and(|s| s.rotation.is_some() || s.last_rotation.is_some())
        })
        .count();
    assert_eq!(rotated, 0, "a restore rotated nothing");
    // A new trigger still rotates a restored object.
    api.patch(
        "cred-7",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"trigger": "CHG-2"}})),
    )
    .await
    .unwrap();
    let sr = wait_phase(&client, &ns, "cred-7", Phase::Succeeded, LONG).await;
    assert_eq!(
        sr.status.unwrap().last_rotation.unwrap().reason,
        "TriggerChanged"
    );
}

/// A trigger changed back to an earlier value (a Git revert) rotates again:
/// any change of `spec.trigger` is a request.
#[tokio::test]
async fn a_trigger_changed_back_rotates_again() {
    let (c, client, ns) = common::setup("trigger-back").await;
    install_crd(c);
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = cheap_spec(0);
    spec["trigger"] = json!("CHG-1");
    create_rotation(&client, &ns, "cred", spec).await;
    let api = Api::<SecretRotation>::namespaced(client.clone(), &ns);
    for (trigger, rotations) in [("CHG-1", 1), ("CHG-2", 2), ("CHG-1", 3)] {
        api.patch(
            "cred",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"trigger": trigger}})),
        )
        .await
        .unwrap();
        common::wait_for(&format!("rotation {rotations}"), LONG, || async {
            get_rotation(&client, &ns, "cred")
                .await
                .status
                .is_some_and(|s| s.history.len() == rotations && s.rotation.is_none())
        })
        .await;
    }
    let history = get_rotation(&client, &ns, "cred")
        .await
        .status
        .unwrap()
        .history;
    let reasons: Vec<&str> = history.iter().map(|h| h.reason.as_str()).collect();
    assert_eq!(reasons, ["TriggerChanged", "TriggerChanged", "Created"]);
}
