//! What GitOps tools and `kubectl wait` read from a SecretRotation: the
//! kstatus conditions judged by the kstatus Go package (what Flux's health
//! checks run) and by the chart's Argo CD health script run the way Argo CD
//! runs it (gopher-lua), on objects taken from a real rotation in each state.

use rekey_testenv as common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{REKEY, plugin};
use common::cluster::{Cluster, repo_root};
use common::fixtures::*;
use common::operator::Operator;
use kube::api::{Api, Patch, PatchParams};
use rekey::crd::{Phase, SecretRotation};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);
const NAME: &str = "app-secret";

/// `kubectl wait --for=condition=<condition>`: whether it returned met.
fn kubectl_wait(c: &Cluster, ns: &str, condition: &str, timeout: &str) -> bool {
    c.kubectl(&[
        "-n",
        ns,
        "wait",
        &format!("--for=condition={condition}"),
        &format!("secretrotation/{NAME}"),
        &format!("--timeout={timeout}"),
    ])
    .is_ok()
}

/// The SecretRotation as the API server serves it to a GitOps tool.
fn object(c: &Cluster, ns: &str) -> Value {
    serde_json::from_str(
        &c.kubectl(&["-n", ns, "get", "secretrotation", NAME, "-o", "json"])
            .unwrap(),
    )
    .unwrap()
}

/// (kstatus status, Argo CD health status, Argo CD message) per object, from
/// the health tool of the test environment (testenv/health).
fn judge(c: &Cluster, ns: &str, objects: &[(&str, &Value)]) -> Vec<(String, String, String)> {
    let bin = c
        .bins
        .all
        .get("REKEY_HEALTH_BIN")
        .expect("REKEY_HEALTH_BIN missing: run `make testenv`");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gitops-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<PathBuf> = objects
        .iter()
        .map(|(label, o)| {
            let file = dir.join(format!("{label}.json"));
            std::fs::write(&file, serde_json::to_vec_pretty(o).unwrap()).unwrap();
            file
        })
        .collect();
    let lua = repo_root().join("charts/rekey/files/argocd-health.lua");
    let out = Command::new(bin)
        .arg("--lua")
        .arg(&lua)
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "health tool: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap().to_string();
            (s("/kstatus/status"), s("/argo/status"), s("/argo/message"))
        })
        .collect()
}

async fn merge_spec(client: &kube::Client, ns: &str, spec: Value) {
    Api::<SecretRotation>::namespaced(client.clone(), ns)
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn kubectl_wait_flux_and_argo_cd_read_the_rotation_state() {
    let (c, client, ns) = common::setup("gitops").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["approval"] = json!({"required": true});
    spec["trigger"] = json!("CHG-1");
    create_rotation(&client, &ns, NAME, spec).await;

    // Created and waiting for approval: not Ready, so kubectl wait waits.
    wait_phase(&client, &ns, NAME, Phase::AwaitingApproval, LONG).await;
    let awaiting_approval = object(c, &ns);
    assert!(!kubectl_wait(c, &ns, "Ready", "2s"));
    let (ok, out) = plugin(c, &ns, &["approve", NAME]);
    assert!(ok, "{out}");
    assert!(kubectl_wait(c, &ns, "Ready", "120s"));
    let sr = get_rotation(&client, &ns, NAME).await;
    assert_eq!(
        phase_of(&sr),
        Some(Phase::Succeeded),
        "Ready only at the end"
    );
    let succeeded = object(c, &ns);

    // A trigger commit: kubectl wait never returns on the previous Ready,
    // whether or not rekey has seen the commit yet (the generation tells).
    merge_spec(&client, &ns, json!({"trigger": "CHG-2"})).await;
    assert!(
        !kubectl_wait(c, &ns, "Ready", "3s"),
        "kubectl wait returned on the Ready of the previous rotation"
    );
    wait_phase(&client, &ns, NAME, Phase::AwaitingApproval, LONG).await;
    let (ok, out) = plugin(c, &ns, &["approve", NAME]);
    assert!(ok, "{out}");
    let (ok, out) = plugin(c, &ns, &["wait", NAME, "--timeout", "2m"]);
    assert!(ok && out.contains("succeeded"), "{out}");
    let status = get_rotation(&client, &ns, NAME).await.status.unwrap();
    assert_eq!(status.observed_trigger.as_deref(), Some("CHG-2"));
    assert_eq!(status.history.len(), 2);

    // A rotation that cannot roll out: progressing, then failed. `kubectl
    // rekey rotate --wait` follows the annotation request to its end.
    merge_spec(
        &client,
        &ns,
        json!({"approval": {"required": false}, "proof": {"timeout": "15s"}}),
    )
    .await;
    block_new_pods(&client, &ns, 2).await;
    let rotate = {
        let (c, ns) = (c.kubeconfig.clone(), ns.clone());
        std::thread::spawn(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_kubectl-rekey"))
                .args(["-n", &ns, "rotate", NAME, "--wait", "--timeout", "2m"])
                .env("KUBECONFIG", c)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    wait_phase(&client, &ns, NAME, Phase::AwaitingRollout, LONG).await;
    let progressing = object(c, &ns);
    let (ok, err) = rotate.join().unwrap();
    assert!(!ok, "a failed rotation exits non-zero: {err}");
    let sr = get_rotation(&client, &ns, NAME).await;
    assert_eq!(phase_of(&sr), Some(Phase::Failed));
    assert!(err.contains("failed in AwaitingRollout"), "{err}");
    let failed = object(c, &ns);
    // Waiting again on a failed rotation fails at once, not at the timeout.
    let (ok, out) = plugin(c, &ns, &["wait", NAME, "--timeout", "10m"]);
    assert!(!ok && out.contains("failed in AwaitingRollout"), "{out}");
    assert!(kubectl_wait(c, &ns, "Stalled", "5s"));

    // A spec change rekey has not looked at yet (the succeeded object with
    // a newer generation).
    let mut unseen = succeeded.clone();
    unseen["metadata"]["generation"] =
        json!(unseen["metadata"]["generation"].as_i64().unwrap() + 1);

    let verdicts = judge(
        c,
        &ns,
        &[
            ("awaiting-approval", &awaiting_approval),
            ("succeeded", &succeeded),
            ("progressing", &progressing),
            ("failed", &failed),
            ("unseen-spec-change", &unseen),
        ],
    );
    let got: Vec<(&str, &str)> = verdicts
        .iter()
        .map(|(k, a, _)| (k.as_str(), a.as_str()))
        .collect();
    eprintln!("kstatus / Argo CD: {verdicts:#?}");
    assert_eq!(
        got,
        [
            ("InProgress", "Suspended"),
            ("Current", "Healthy"),
            ("InProgress", "Progressing"),
            ("Failed", "Degraded"),
            ("InProgress", "Progressing"),
        ]
    );
    assert!(verdicts[0].2.contains("waits for approval"), "{verdicts:?}");
    assert!(
        verdicts[3].2.contains("failed in AwaitingRollout"),
        "{verdicts:?}"
    );
}
