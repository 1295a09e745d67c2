//! The suite-wide leak capture can fail: every operator the harness starts is
//! scanned, when dropped, for every canary the test process made (its log,
//! metrics page, the Events it recorded, the SecretRotation statuses it
//! wrote). Here a canary goes where rekey legitimately echoes text, the
//! `rekey.dev/requested-by` annotation (a person's name, logged, in an Event
//! and in status), and the capture must report it in all three, by tag only.

use std::time::Duration;

use rekey_testenv as common;

use crate::REKEY;
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use rekey::crd::{Phase, SecretRotation};
use serde_json::json;

#[tokio::test]
async fn the_capture_reports_a_canary_in_the_log_an_event_and_status_by_tag_only() {
    let (c, client, ns) = common::setup("leaks").await;
    install_crd(c);
    let mut op = Operator::start(REKEY, c, &ns);
    op.leaking_on_purpose();
    let who = common::canary("requested-by");

    let sr: SecretRotation = serde_json::from_value(json!({
        "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
        "metadata": {"name": "leaky", "annotations": {"rekey.dev/requested-by": who}},
        "spec": unproven_generated_spec("app-creds")
    }))
    .unwrap();
    Api::<SecretRotation>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &sr)
        .await
        .unwrap();
    wait_phase(
        &client,
        &ns,
        "leaky",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    // The Event is recorded asynchronously.
    common::wait_for(
        "rekey's Event naming the requester",
        Duration::from_secs(30),
        || async {
            serde_json::to_string(&events(&client, &ns).await)
                .unwrap()
                .contains(&who)
        },
    )
    .await;

    let hits = op.leaks();
    let shown: Vec<String> = hits.iter().map(|h| h.to_string()).collect();
    println!("capture hits: {shown:#?}");
    assert!(hits.iter().all(|h| h.tag == "requested-by"), "{shown:?}");
    for place in ["log rekey-", "Event ", "status of SecretRotation"] {
        assert!(
            hits.iter().any(|h| h.place.starts_with(place)),
            "the capture missed the canary in {place}: {shown:?}"
        );
    }
    assert!(
        shown.iter().all(|s| !s.contains(&who)),
        "a hit report must name the tag, never the value"
    );

    // Dropping the operator fails the test with the same report.
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(op)));
    let message = dropped
        .expect_err("dropping an operator whose output holds a canary must fail")
        .downcast::<String>()
        .map(|m| *m)
        .unwrap_or_default();
    assert!(message.contains("\"requested-by\""), "{message}");
    assert!(
        !message.contains(&who),
        "the failure must not show the value"
    );

    // The canary stays in this namespace's Events and status: remove them.
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}
