//! Proof across clusters (issue 14, item 1): the runbook's dev and stage
//! share one value, each environment has its own cluster, Secrets Manager
//! instance and ESO. rekey runs in dev and proves in stage through a
//! kubeconfig Secret whose identity holds only `examples/remote-access.yaml`.

use rekey_testenv as common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::REKEY;
use crate::stores::ibm_secret_store;
use common::cluster::{Cluster, Options};
use common::fixtures::*;
use common::ibm::IbmEmulator;
use common::operator::Operator;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};
use rekey::crd::{Phase, SecretRotation};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

/// What the webhook source saw: each issued value, and per invalidate call
/// whether the stage cluster ran the newest value at that moment.
#[derive(Default)]
struct Calls {
    issued: Vec<String>,
    /// (stage's synced Secret held the newest value, stage's app revisions)
    invalidated: Vec<(bool, usize)>,
}

/// A webhook source issuing a new canary per call; its invalidate handler
/// looks into the stage cluster before it answers.
async fn webhook(stage: Client, stage_ns: String) -> (String, Arc<Mutex<Calls>>) {
    use axum::routing::post;
    let calls = Arc::new(Mutex::new(Calls::default()));
    let (issue, invalidate) = (calls.clone(), calls.clone());
    let app = axum::Router::new()
        .route(
            "/issue",
            post(move || async move {
                let value = common::canary("shared-new");
                issue.lock().unwrap().issued.push(value.clone());
                axum::Json(json!({"value": value}))
            }),
        )
        .route(
            "/invalidate",
            post(move || async move {
                let newest = invalidate.lock().unwrap().issued.last().cloned();
                let synced = read_key(&stage, &stage_ns, "creds", "client_secret").await;
                let revisions = revisions(&stage, &stage_ns, "app").await;
                invalidate
                    .lock()
                    .unwrap()
                    .invalidated
                    .push((synced.is_some() && synced == newest, revisions));
                "ok"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

/// One environment: an IBM Secrets Manager instance holding `old`, read by
/// its cluster's ESO into Secret `creds`, consumed by Deployment `app`.
async fn environment(c: &Cluster, client: &Client, ns: &str, old: &str) -> (IbmEmulator, String) {
    let emu = IbmEmulator::start().await;
    let id = emu.create_secret("ai-component", "arbitrary", json!(old));
    ibm_secret_store(c, client, ns, &emu).await;
    external_secret_from(client, ns, "creds", "ibm", json!({"key": id}), "1h").await;
    common::wait_for("creds synced", LONG, || async {
        read_key(client, ns, "creds", "client_secret")
            .await
            .as_deref()
            == Some(old)
    })
    .await;
    deployment(client, ns, "app", 1, "creds").await;
    common::wait_for("app available", LONG, || async {
        deployment_available(client, ns, "app").await
    })
    .await;
    (emu, id)
}

/// A kubeconfig for `c` whose user is the ServiceAccount of
/// `examples/remote-access.yaml` in `ns`: only what the docs grant.
async fn least_privilege_kubeconfig(c: &Cluster, client: &Client, ns: &str) -> String {
    let manifest =
        std::fs::read_to_string(common::repo_root().join("examples/remote-access.yaml")).unwrap();
    c.kubectl_stdin(&["-n", ns, "apply", "-f", "-"], &manifest)
        .unwrap();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![]),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request("rekey-remote", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .unwrap();
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(&c.ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stage\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: rekey\n  user:\n    token: {token}\ncontexts:\n- name: stage\n  context: {{cluster: stage, user: rekey, namespace: {ns}}}\ncurrent-context: stage\n",
        c.api_url
    )
}

fn ibm_target(name: &str, emu: &IbmEmulator, id: &str) -> Value {
    json!({"name": name, "environment": name, "ibmSecretsManager": {
        "serviceUrl": emu.url, "secretId": id, "iamUrl": emu.url,
        "apiKeySecretRef": {"name": format!("ibm-{name}"), "key": "apikey"}}})
}

fn proof_of(sr: &SecretRotation, cluster: &str, kind: &str) -> (bool, String) {
    let rotation = sr.status.as_ref().unwrap().rotation.as_ref();
    let last = sr.status.as_ref().unwrap().last_rotation.as_ref();
    let items = rotation
        .map(|r| r.proof.clone())
        .or_else(|| last.map(|l| l.proof.clone()))
        .unwrap_or_default();
    let item = items
        .iter()
        .find(|p| p.cluster == cluster && p.kind == kind)
        .unwrap_or_else(|| panic!("no proof item {kind} in cluster {cluster:?}: {items:?}"));
    (item.proven, item.waiting_for.clone())
}

/// The happy path invalidates the shared old value once, after both
/// clusters run the new one; a rollout that never finishes in stage keeps
/// the old value valid, and says which cluster holds it.
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_value_is_invalidated_only_after_every_cluster_runs_it() {
    let (dev, dev_client, ns) = common::setup("mc-dev").await;
    let stage = tokio::task::block_in_place(|| {
        common::private_cluster(Options {
            nodes: 1,
            moto: false,
            ..Options::default()
        })
    });
    let stage_client = common::client_for(&stage).await;
    let stage_ns = common::namespace_in(&stage, &stage_client, "mc-stage").await;
    install_crd(dev);

    let old = common::canary("shared-old");
    let (dev_emu, dev_id) = environment(dev, &dev_client, &ns, &old).await;
    let (stage_emu, stage_id) = environment(&stage, &stage_client, &stage_ns, &old).await;
    for (name, emu) in [("dev", &dev_emu), ("stage", &stage_emu)] {
        let key = common::canary("ibm-api-key");
        emu.add_api_key(&key);
        put_secret(
            &dev_client,
            &ns,
            &format!("ibm-{name}"),
            json!({"apikey": key}),
        )
        .await;
    }
    let kubeconfig = least_privilege_kubeconfig(&stage, &stage_client, &stage_ns).await;
    put_secret(
        &dev_client,
        &ns,
        "stage-kubeconfig",
        json!({"value": kubeconfig}),
    )
    .await;
    let (url, calls) = webhook(stage_client.clone(), stage_ns.clone()).await;

    let op = Operator::start(REKEY, dev, &ns);
    let spec = json!({
        "credential": webhook_credential(&url),
        "oldValueValidFor": "30m",
        "targets": [ibm_target("dev", &dev_emu, &dev_id), ibm_target("stage", &stage_emu, &stage_id)],
        "proof": {
            "externalSecrets": [{"name": "creds", "key": "client_secret"}],
            "workloads": [{"kind": "Deployment", "name": "app"}],
            "clusters": [{"name": "stage", "environment": "stage",
                "kubeConfig": {"secretRef": {"name": "stage-kubeconfig"}},
                "externalSecrets": [{"name": "creds", "key": "client_secret"}],
                "workloads": [{"kind": "Deployment", "name": "app"}]}],
            "timeout": "90s"
        }
    });
    create_rotation(&dev_client, &ns, "dev-stage", spec).await;
    let sr = wait_phase(&dev_client, &ns, "dev-stage", Phase::Succeeded, LONG).await;

    let new = calls.lock().unwrap().issued.last().cloned().unwrap();
    for (client, namespace) in [(&dev_client, &ns), (&stage_client, &stage_ns)] {
        assert_eq!(
            read_key(client, namespace, "creds", "client_secret").await,
            Some(new.clone()),
            "each cluster's ESO delivers the shared new value"
        );
        assert_eq!(
            revisions(client, namespace, "app").await,
            2,
            "one rollout per cluster"
        );
    }
    assert_eq!(dev_emu.secret(&dev_id).versions.len(), 2, "one dev version");
    assert_eq!(
        stage_emu.secret(&stage_id).versions.len(),
        2,
        "one stage version"
    );
    assert_eq!(
        calls.lock().unwrap().invalidated,
        vec![(true, 2)],
        "invalidated once, while stage already ran the new value"
    );
    for cluster in ["", "stage"] {
        assert!(
            proof_of(&sr, cluster, "ExternalSecret").0,
            "{cluster:?} synced"
        );
        assert!(
            proof_of(&sr, cluster, "Deployment").0,
            "{cluster:?} rolled out"
        );
    }
    let (ok, status) = crate::plugin(dev, &ns, &["status", "dev-stage"]);
    assert!(
        ok && status.contains("cluster stage"),
        "kubectl rekey status names the cluster:\n{status}"
    );

    // Stage cannot start a new pod: its rollout never finishes.
    block_new_pods(&stage_client, &stage_ns, 1).await;
    annotate_rotation(&dev_client, &ns, "dev-stage", "rekey.dev/rotate", "stuck").await;
    let sr = wait_phase(&dev_client, &ns, "dev-stage", Phase::Failed, LONG).await;
    let failure = sr
        .status
        .clone()
        .unwrap()
        .last_rotation
        .unwrap()
        .failure
        .unwrap();
    assert_eq!(failure.reason, "RolloutTimeout", "{failure:?}");
    assert!(
        failure.message.contains("cluster stage"),
        "{}",
        failure.message
    );
    let (proven, waiting) = proof_of(&sr, "stage", "Deployment");
    assert!(!proven, "stage's rollout is not proven");
    assert!(waiting.contains("rolling out"), "{waiting}");
    assert!(proof_of(&sr, "", "Deployment").0, "dev's rollout is proven");
    assert_eq!(
        calls.lock().unwrap().invalidated.len(),
        1,
        "the value stage still runs was not invalidated"
    );
    let newest = calls.lock().unwrap().issued.clone();
    let mut values: Vec<&str> = vec![&old];
    values.extend(newest.iter().map(String::as_str));
    values.push(&kubeconfig);
    assert_never_leaked(&dev_client, &ns, &op.logs(), &op.scrape().await, &values).await;
}

/// A cluster that cannot be reached holds the rotation before anything
/// changes, with a condition naming it; a kubeconfig that would run a
/// command in the operator is refused without running it.
#[tokio::test]
async fn an_unreachable_cluster_holds_and_a_plugin_kubeconfig_is_refused() {
    let (c, client, ns) = common::setup("mc-refuse").await;
    install_crd(c);
    let port = common::cluster::free_port();
    let touched = c.dir.join(format!("exec-ran-{ns}"));
    let unreachable = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: gone\n  context: {{cluster: gone, user: u}}\ncurrent-context: gone\n"
    );
    let exec = unreachable.replace(
        "user: {token: t}",
        &format!(
            "user: {{exec: {{apiVersion: client.authentication.k8s.io/v1, command: /usr/bin/touch, args: [\"{}\"]}}}}",
            touched.display()
        ),
    );
    put_secret(&client, &ns, "gone", json!({"value": unreachable})).await;
    put_secret(&client, &ns, "exec", json!({"value": exec})).await;
    let _op = Operator::start(REKEY, c, &ns);
    for (name, secret) in [("unreachable", "gone"), ("plugin", "exec")] {
        let mut spec = unproven_generated_spec(&format!("{name}-target"));
        spec["proof"] = json!({"clusters": [{"name": "stage",
            "kubeConfig": {"secretRef": {"name": secret}},
            "workloads": [{"kind": "Deployment", "name": "app"}]}], "timeout": "10m"});
        create_rotation(&client, &ns, name, spec).await;
    }

    let sr = wait_phase(&client, &ns, "plugin", Phase::Failed, LONG).await;
    let failure = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(failure.reason, "InvalidKubeconfig");
    assert!(
        failure.message.contains("exec plugin"),
        "{}",
        failure.message
    );
    assert!(!touched.exists(), "the exec plugin never ran");

    let held = common::wait_for("the unreachable cluster is named", LONG, || async {
        let sr = get_rotation(&client, &ns, "unreachable").await;
        let status = sr.status.unwrap_or_default();
        status.phase == Some(Phase::Preflight)
            && status.conditions.iter().any(|c| {
                c.type_ == "Rotating"
                    && c.message.contains("ClusterUnreachable")
                    && c.message.contains("cluster stage")
            })
    })
    .await;
    let _ = held;
    assert_eq!(
        read_key(&client, &ns, "unreachable-target", "value").await,
        None,
        "nothing was written while the cluster cannot be reached"
    );
}
