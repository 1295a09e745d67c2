//! Faults from outside rekey, each on a private control plane: the API
//! server restarted while a rotation waits for the sync and for the rollout,
//! ESO down for longer than the safety-net requeue, and the write-ahead
//! record deleted by someone mid-rotation. The rotation ends as it should,
//! with one new value, one rollout and nothing issued twice.

use rekey_testenv as common;

use std::time::Duration;

use crate::REKEY;
use crate::rotation::webhook_server;
use common::cluster::Options;
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::core::v1::{ResourceQuota, Secret};
use kube::api::{Api, DeleteParams};
use rekey::crd::Phase;
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);
const NAME: &str = "app-secret";

// The harness waits for a component with blocking HTTP: multi_thread, so
// that it may block in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_and_eso_go_down_mid_rotation_and_the_rotation_completes_once() {
    let (mut c, client, ns) = common::setup_private("apiserver-restart", Options::default()).await;
    let old = common::canary("old");
    scene(&c, &client, &ns, &old).await;
    let op = Operator::start(REKEY, &c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["approval"] = json!({"required": true});
    spec["proof"]["timeout"] = json!("5m");
    create_rotation(&client, &ns, NAME, spec).await;
    let sr = wait_phase(&client, &ns, NAME, Phase::AwaitingApproval, LONG).await;
    let id = sr.status.unwrap().rotation.unwrap().id;

    // ESO down before the refresh request; the API server restarted while
    // the rotation waits for the sync; ESO back only after many requeues.
    c.stop_component("external-secrets");
    annotate_rotation(&client, &ns, NAME, "rekey.dev/approve", &id).await;
    wait_phase(&client, &ns, NAME, Phase::AwaitingSync, LONG).await;
    tokio::task::block_in_place(|| c.restart("kube-apiserver", Duration::from_secs(2))).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sr = get_rotation(&client, &ns, NAME).await;
    assert_eq!(
        phase_of(&sr),
        Some(Phase::AwaitingSync),
        "no sync without ESO"
    );
    // The rollout will wait: the namespace takes no surge pod for now.
    block_new_pods(&client, &ns, 2).await;
    tokio::task::block_in_place(|| c.start_component("external-secrets")).unwrap();
    wait_phase(&client, &ns, NAME, Phase::AwaitingRollout, LONG).await;

    // The API server restarted while the rotation waits for the rollout.
    tokio::task::block_in_place(|| c.restart("kube-apiserver", Duration::from_secs(2))).unwrap();
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    let sr = wait_phase(&client, &ns, NAME, Phase::Succeeded, LONG).await;
    let last = sr.status.unwrap().last_rotation.unwrap();
    assert_eq!(last.id, id);

    // One new value, written once, delivered, one rollout.
    let source = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("source")
        .await
        .unwrap();
    assert_eq!(
        source.metadata.resource_version.as_deref(),
        Some(last.targets[0].version.as_str()),
        "the target was not written again after the recorded write"
    );
    let new = read_key(&client, &ns, "source", "client_secret")
        .await
        .unwrap();
    assert_ne!(new, old);
    assert_eq!(
        read_key(&client, &ns, "app-creds", "client_secret")
            .await
            .as_deref(),
        Some(new.as_str())
    );
    assert_eq!(
        revisions(&client, &ns, "app").await,
        2,
        "exactly one rollout"
    );
    assert!(!op.logs().contains("panicked"), "{}", op.logs());
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}

/// Someone deletes the write-ahead record while the rotation waits for the
/// rollout: rekey notices, never issues a second value, and fails safe (the
/// old value stays valid).
#[tokio::test]
async fn a_deleted_write_ahead_record_fails_the_rotation_safely_without_a_second_issue() {
    let (c, client, ns) = common::setup("wal-deleted").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let op = Operator::start(REKEY, c, &ns);
    let new = common::canary("new");
    let (url, log) = webhook_server(client.clone(), ns.clone(), vec![new.clone()]).await;
    block_new_pods(&client, &ns, 2).await;
    let mut spec = rotation_spec(webhook_credential(&url));
    spec["proof"]["timeout"] = json!("5m");
    create_rotation(&client, &ns, NAME, spec).await;
    wait_phase(&client, &ns, NAME, Phase::AwaitingRollout, LONG).await;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete(&format!("{NAME}.rekey-wal"), &DeleteParams::default())
        .await
        .unwrap();
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    let sr = wait_phase(&client, &ns, NAME, Phase::Failed, LONG).await;
    let failure = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(failure.reason, "WriteAheadRecordMissing", "{failure:?}");
    let log = log.lock().unwrap().clone();
    let issued: std::collections::BTreeSet<_> = log.issued.iter().map(|(k, _)| k).collect();
    assert_eq!(
        issued.len(),
        1,
        "one rotation id asked for a value: {issued:?}"
    );
    assert!(log.invalidated.is_empty(), "the old value stays valid");
    assert_never_leaked(&client, &ns, &op.logs(), &op.scrape().await, &[&old, &new]).await;
}
