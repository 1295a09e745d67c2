//! rekey's cost in API requests, read from the API server's audit log: a
//! fixed budget per rotation, so that a regression fails CI, and no write
//! while idle. (`make bench` measures the same at scale.)

use rekey_testenv as common;

use std::time::Duration;

use crate::REKEY;
use common::audit;
use common::fixtures::*;
use common::operator::Operator;
use rekey::crd::Phase;
use serde_json::json;

/// Requests one rotation of the usual scene (generated value, one
/// ExternalSecret, one Deployment of 2 replicas, the default `--poll=30s`)
/// may make, all verbs. Measured 2026-11-26 with polling waits (poll
/// 500ms): 72 to 84. With watches and consumer discovery (issue 11): 106
/// to 107, of which 14 are the namespace's watches (a LIST and a WATCH of
/// ExternalSecrets, Deployments, StatefulSets, DaemonSets, ReplicaSets,
/// Jobs and Pods; shared by every rotation in the namespace while one is
/// in progress) and 11 the discovery LISTs at Preflight and at the final
/// re-check. A waiting rotation itself no longer reads anything until an
/// event wakes it (`make bench` measures that at scale). Raise it only
/// with a reason.
const ROTATION_BUDGET: usize = 120;

#[tokio::test]
async fn one_rotation_stays_within_its_request_budget_and_idle_writes_nothing() {
    let opts = common::Options {
        moto: false,
        audit: true,
        ..Default::default()
    };
    let (c, client, ns) = common::setup_private("budget", opts).await;
    let c = &c;
    scene(c, &client, &ns, &common::canary("old")).await;
    // The production default: the safety-net poll of 30 s never fires in a
    // rotation this short; watches wake every wait.
    let op = Operator::start_with_args(REKEY, c, &ns, c.kubeconfig.clone(), &["--poll=30s"]);
    audit::wait_for_rekey_watching(&c.audit_log()).await;
    let before = audit::requests(&c.audit_log(), "rekey/").len();
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(json!({"generated": {}})),
    )
    .await;
    let sr = wait_phase(
        &client,
        &ns,
        "app-secret",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    // Let the last writes of the rotation land, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = audit::requests(&c.audit_log(), "rekey/");
    let rotation = &all[before..];
    let counts = audit::by_verb_and_resource(rotation);
    let writes = rotation.iter().filter(|r| r.is_write()).count();
    eprintln!(
        "one rotation ({:.1} s): {} requests, {writes} writes: {counts:#?}",
        sr.status.unwrap().last_rotation.unwrap().duration_seconds,
        rotation.len()
    );
    assert!(
        rotation.len() <= ROTATION_BUDGET,
        "{} requests for one rotation, budget {ROTATION_BUDGET}: {counts:#?}",
        rotation.len()
    );
    // Idle: nothing written, nothing read beyond the watches.
    let idle_from = all.len();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let idle: Vec<_> = audit::requests(&c.audit_log(), "rekey/")
        .into_iter()
        .skip(idle_from)
        .filter(|r| r.verb != "watch")
        .collect();
    assert!(
        idle.is_empty(),
        "idle for 30 s, rekey made {} requests: {:#?}",
        idle.len(),
        audit::by_verb_and_resource(&idle)
    );
    assert!(op.logs().contains("rotation finished"));
}

/// Calls to IBM Secrets Manager: at most 6 per rotation (one read at
/// Preflight, one at Issuing, three to write, one in the final re-check),
/// one IAM token for them all, and never more than 5 requests in any second
/// on one instance (`--ibm-requests-per-second`), even with rotations at once.
#[tokio::test]
async fn ibm_calls_per_rotation_and_per_second_stay_within_budget() {
    const AT_ONCE: usize = 8;
    let opts = common::Options {
        eso: false,
        moto: false,
        ..Default::default()
    };
    let (c, client, ns) = common::setup_private("ibm-budget", opts).await;
    install_crd(&c);
    let emu = common::ibm::IbmEmulator::start().await;
    emu.add_api_key("budget-key");
    put_secret(&client, &ns, "ibm-api-key", json!({"apikey": "budget-key"})).await;
    let _op = Operator::start(REKEY, &c, &ns);
    for i in 0..AT_ONCE {
        let id = emu.create_secret(&format!("s{i}"), "arbitrary", json!(common::canary("old")));
        let spec = json!({
            "credential": {"generated": {}},
            "oldValueValidFor": "30m",
            "targets": [{"name": "ibm", "ibmSecretsManager": {"serviceUrl": emu.url, "secretId": id, "iamUrl": emu.url,
                "apiKeySecretRef": {"name": "ibm-api-key", "key": "apikey"}}}],
            "proof": {"nothingToProve": true}
        });
        create_rotation(&client, &ns, &format!("r{i}"), spec).await;
    }
    for i in 0..AT_ONCE {
        wait_phase(
            &client,
            &ns,
            &format!("r{i}"),
            Phase::Succeeded,
            Duration::from_secs(120),
        )
        .await;
    }
    let (calls, times) = {
        let st = emu.state.lock().unwrap();
        (st.calls.clone(), st.call_times.clone())
    };
    let tokens = calls
        .iter()
        .filter(|c| c.contains("/identity/token"))
        .count();
    let mut service: Vec<_> = calls
        .iter()
        .zip(&times)
        .filter(|(c, _)| !c.contains("/identity/token"))
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(
        tokens, 1,
        "one IAM token shared by every rotation: {calls:#?}"
    );
    assert!(
        service.len() <= 6 * AT_ONCE,
        "{} calls for {AT_ONCE} rotations: {calls:#?}",
        service.len()
    );
    service.sort();
    for w in service.windows(6) {
        assert!(
            w[5] - w[0] >= Duration::from_secs(1),
            "six requests to one instance within a second"
        );
    }
}
