//! Steering a rotation by hand with `kubectl rekey`: `why` says what blocks
//! it and what to do, `status` shows the proof per ExternalSecret and
//! workload, `rollback` gives up before invalidation and writes the previous
//! value back, and `completion` prints a shell completion script.

use rekey_testenv as common;

use std::time::Duration;

use crate::{REKEY, plugin};
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::{Api, DeleteParams};
use rekey::crd::Phase;
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);
const NAME: &str = "app-secret";

#[tokio::test]
async fn why_status_and_rollback_steer_a_stuck_rotation() {
    let (c, client, ns) = common::setup("steer").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let op = Operator::start(REKEY, c, &ns);
    // The rollout can never finish: the namespace takes no surge pod.
    block_new_pods(&client, &ns, 2).await;
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["proof"]["timeout"] = json!("5m");
    create_rotation(&client, &ns, NAME, spec).await;
    wait_phase(&client, &ns, NAME, Phase::AwaitingRollout, LONG).await;
    common::wait_for("the rollout to be reported stuck", LONG, || async {
        plugin(c, &ns, &["why", NAME])
            .1
            .contains("Deployment app: rolling out")
    })
    .await;
    let new = read_key(&client, &ns, "app-creds", "client_secret")
        .await
        .unwrap();
    assert_ne!(new, old, "the new value reached the synced Secret");

    let (ok, why) = plugin(c, &ns, &["why", NAME]);
    assert!(ok, "{why}");
    for want in [
        "is in AwaitingRollout",
        "✓ ExternalSecret app-creds",
        "… Deployment app: rolling out (0/2 updated",
        &format!("kubectl -n {ns} rollout status deployment/app"),
        "the proof must be complete by",
        &format!("kubectl rekey -n {ns} rollback {NAME}"),
    ] {
        assert!(why.contains(want), "why lacks {want:?}:\n{why}");
    }
    let (ok, status) = plugin(c, &ns, &["status", NAME]);
    assert!(ok && status.contains("Proof:"), "{status}");
    assert!(status.contains("… Deployment app: rolling out"), "{status}");

    // Give up: the previous value goes back where it was written.
    let (ok, out) = plugin(c, &ns, &["rollback", NAME]);
    assert!(ok && out.contains("Rollback of rotation"), "{out}");
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    let sr = wait_phase(&client, &ns, NAME, Phase::Failed, LONG).await;
    let last = sr.status.unwrap().last_rotation.unwrap();
    let failure = last.failure.unwrap();
    assert_eq!(failure.reason, "RollbackRequested");
    assert!(last.rolled_back, "the previous value was written back");
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
        Some(old.as_str()),
        "ESO synced the previous value"
    );

    // Nothing left to roll back; why says what happened and what to do.
    let (ok, out) = plugin(c, &ns, &["rollback", NAME]);
    assert!(!ok && out.contains("no rotation in progress"), "{out}");
    let (ok, why) = plugin(c, &ns, &["why", NAME]);
    assert!(
        ok && why.contains("RollbackRequested in AwaitingRollout"),
        "{why}"
    );
    assert!(
        why.contains(&format!("kubectl rekey -n {ns} rotate {NAME}")),
        "{why}"
    );
    let metrics = op.scrape().await;
    assert_never_leaked(&client, &ns, &op.logs(), &metrics, &[&old, &new]).await;

    let (ok, script) = plugin(c, &ns, &["completion", "bash"]);
    assert!(
        ok && script.contains("rollback") && script.contains("kubectl-rekey"),
        "{}",
        &script[..script.len().min(300)]
    );
}
