//! Hostile and broken input (issue 12 item 4), one table: specs the API
//! server must refuse with a readable message, and accepted specs that can
//! never work (missing references, wrong credentials, refusing stores, Secrets
//! owned by others, outbound hosts outside `--allowed-hosts`, values and
//! annotations near the API server's limits). Each accepted one must end
//! with a clear reason and a Warning Event, and nothing may change in any
//! Secret, workload, IBM or AWS store, webhook or identity provider: checked
//! on snapshots taken before and after.

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::REKEY;
use aws_sdk_secretsmanager::Client as Aws;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use common::fixtures::*;
use common::ibm::IbmEmulator;
use common::operator::Operator;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use rekey::crd::SecretRotation;
use serde_json::{Value, json};

const KIB: usize = 1024;

fn valid_spec() -> Value {
    json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [{"name": "main", "kubernetesSecret": {"name": "s", "key": "k"}}],
        "proof": {"externalSecrets": [{"name": "es", "key": "k"}], "timeout": "5m"}
    })
}

/// Sends the raw object, so that only the API server judges it.
async fn create_raw(api: &Api<DynamicObject>, object: Value) -> Result<(), String> {
    let sr: DynamicObject = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &sr)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

type Edit = Box<dyn Fn(&mut Value)>;

/// Specs the API server refuses: (case, edit of a valid object, what the
/// message must say). Extends tests/it/crd.rs with extreme values.
fn admission_cases() -> Vec<(&'static str, Edit, Vec<&'static str>)> {
    let spec = |f: fn(&mut Value)| -> Edit { Box::new(move |o: &mut Value| f(&mut o["spec"])) };
    vec![
        (
            "empty-target-name",
            spec(|v| v["targets"][0]["name"] = json!("")),
            vec!["spec.targets[0].name"],
        ),
        (
            "target-name-64-chars",
            spec(|v| v["targets"][0]["name"] = json!("a".repeat(64))),
            vec!["spec.targets[0].name", "Too long"],
        ),
        (
            "generated-length-zero",
            spec(|v| v["credential"] = json!({"generated": {"length": 0}})),
            vec!["spec.credential.generated.length", "16"],
        ),
        (
            "generated-length-negative",
            spec(|v| v["credential"] = json!({"generated": {"length": -1}})),
            vec!["spec.credential.generated.length"],
        ),
        (
            "generated-length-huge",
            spec(|v| v["credential"] = json!({"generated": {"length": 2147483647}})),
            vec!["spec.credential.generated.length", "256"],
        ),
        (
            "generated-alphabet-unknown",
            spec(|v| v["credential"] = json!({"generated": {"alphabet": "Emoji"}})),
            vec!["spec.credential.generated.alphabet", "Unsupported value"],
        ),
        (
            "grace-negative",
            spec(|v| v["oldValueValidFor"] = json!("-5m")),
            vec!["oldValueValidFor must be a duration between 1m and 720h"],
        ),
        (
            "grace-zero",
            spec(|v| v["oldValueValidFor"] = json!("0s")),
            vec!["oldValueValidFor must be a duration between 1m and 720h"],
        ),
        (
            "grace-overflowing",
            spec(|v| v["oldValueValidFor"] = json!("9999999999999h")),
            vec!["oldValueValidFor"],
        ),
        (
            "grace-33-chars",
            spec(|v| v["oldValueValidFor"] = json!(format!("{}m", "0".repeat(30) + "30"))),
            vec!["spec.oldValueValidFor", "Too long"],
        ),
        (
            "grace-empty",
            spec(|v| v["oldValueValidFor"] = json!("")),
            vec!["oldValueValidFor"],
        ),
        (
            "timeout-zero",
            spec(|v| v["proof"]["timeout"] = json!("0s")),
            vec!["proof.timeout must be a duration between 10s and 24h"],
        ),
        (
            "timeout-negative",
            spec(|v| v["proof"]["timeout"] = json!("-1h")),
            vec!["proof.timeout must be a duration between 10s and 24h"],
        ),
        (
            "every-zero",
            spec(|v| v["schedule"] = json!({"every": "0s"})),
            vec!["schedule.every must be a duration between 1m and 8760h"],
        ),
        (
            "jitter-25h",
            spec(|v| v["schedule"] = json!({"every": "24h", "jitter": "25h"})),
            vec!["schedule.jitter must be a duration between 0s and 24h"],
        ),
        (
            "cron-macro",
            spec(|v| v["schedule"] = json!({"cron": "@daily"})),
            vec!["schedule.cron"],
        ),
        (
            "cron-129-chars",
            spec(|v| v["schedule"] = json!({"cron": format!("0 3 * * {}", "1,".repeat(60) + "1")})),
            vec!["spec.schedule.cron", "Too long"],
        ),
        (
            "17-targets",
            spec(|v| {
                v["targets"] = json!((0..17).map(|i| json!({"name": format!("t{i}"), "kubernetesSecret": {"name": format!("s{i}"), "key": "k"}})).collect::<Vec<_>>())
            }),
            vec!["spec.targets", "Too many"],
        ),
        (
            "33-workloads",
            spec(|v| {
                v["proof"]["workloads"] = json!(
                    (0..33)
                        .map(|i| json!({"kind": "Deployment", "name": format!("w{i}")}))
                        .collect::<Vec<_>>()
                )
            }),
            vec!["spec.proof.workloads", "Too many"],
        ),
        (
            "duplicate-target-names-among-three",
            spec(|v| {
                v["targets"] = json!([
            {"name": "a", "kubernetesSecret": {"name": "s1", "key": "k"}},
            {"name": "b", "kubernetesSecret": {"name": "s2", "key": "k"}},
            {"name": "a", "awsSecretsManager": {"region": "us-east-1", "secretId": "x", "credentialsSecretRef": {"name": "aws"}}}])
            }),
            vec!["target names must be unique"],
        ),
        (
            "all-four-sources",
            spec(|v| {
                v["credential"] = json!({"generated": {}, "manual": {"secretRef": {"name": "m", "key": "k"}},
            "webhook": {"issueUrl": "https://a", "invalidateUrl": "https://b"},
            "keycloak": {"url": "https://k", "realm": "r", "clientId": "c", "adminSecretRef": {"name": "a"}}})
            }),
            vec!["credential must set exactly one of generated, webhook, manual, keycloak"],
        ),
        (
            "webhook-url-empty",
            spec(|v| {
                v["credential"] = json!({"webhook": {"issueUrl": "", "invalidateUrl": "https://b"}})
            }),
            vec!["spec.credential.webhook.issueUrl"],
        ),
        (
            "webhook-url-javascript",
            spec(
                |v| v["credential"] = json!({"webhook": {"issueUrl": "https://a", "invalidateUrl": "javascript:alert(1)"}}),
            ),
            vec!["invalidateUrl must be an http(s) URL"],
        ),
        (
            "webhook-url-2049-chars",
            spec(
                |v| v["credential"] = json!({"webhook": {"issueUrl": format!("https://a/{}", "x".repeat(2040)), "invalidateUrl": "https://b"}}),
            ),
            vec!["spec.credential.webhook.issueUrl", "Too long"],
        ),
        (
            "keycloak-url-file",
            spec(
                |v| v["credential"] = json!({"keycloak": {"url": "file:///etc/passwd", "realm": "r", "clientId": "c", "adminSecretRef": {"name": "a"}}}),
            ),
            vec!["keycloak.url must be an http(s) URL"],
        ),
        (
            "keycloak-empty-realm",
            spec(
                |v| v["credential"] = json!({"keycloak": {"url": "https://k", "realm": "", "clientId": "c", "adminSecretRef": {"name": "a"}}}),
            ),
            vec!["spec.credential.keycloak.realm"],
        ),
        (
            "manual-key-path-traversal",
            spec(|v| {
                v["credential"] =
                    json!({"manual": {"secretRef": {"name": "m", "key": "../etc/passwd"}}})
            }),
            vec!["spec.credential.manual.secretRef.key"],
        ),
        (
            "manual-secret-name-254-chars",
            spec(|v| {
                v["credential"] =
                    json!({"manual": {"secretRef": {"name": "a".repeat(254), "key": "k"}}})
            }),
            vec!["spec.credential.manual.secretRef.name", "Too long"],
        ),
        (
            "ibm-service-url-ftp",
            Box::new(move |o: &mut Value| {
                o["spec"]["targets"][0] = json!({"name": "dev", "ibmSecretsManager": {
            "serviceUrl": "ftp://sm", "secretId": "a", "apiKeySecretRef": {"name": "k", "key": "k"}}})
            }),
            vec!["serviceUrl must be an http(s) URL"],
        ),
        (
            "aws-role-not-an-arn",
            Box::new(move |o: &mut Value| {
                o["spec"]["targets"][0] = json!({"name": "prod", "awsSecretsManager": {
            "region": "us-east-1", "secretId": "x", "serviceAccountRef": {"name": "r"}, "roleArn": "iam::123456789012:role/no-arn-prefix"}})
            }),
            vec!["roleArn must be an IAM role ARN"],
        ),
        (
            // An ARN, but of a bucket, not of an IAM role.
            "aws-role-arn-of-a-bucket",
            Box::new(move |o: &mut Value| {
                o["spec"]["targets"][0] = json!({"name": "prod", "awsSecretsManager": {
            "region": "us-east-1", "secretId": "x", "serviceAccountRef": {"name": "r"}, "roleArn": "arn:aws:s3:::some-bucket-name"}})
            }),
            vec!["roleArn must be an IAM role ARN"],
        ),
        (
            "target-namespace-64-chars",
            spec(|v| v["targets"][0]["kubernetesSecret"]["namespace"] = json!("n".repeat(64))),
            vec!["spec.targets[0].kubernetesSecret.namespace", "Too long"],
        ),
        (
            "accept-without-reason",
            spec(|v| {
                v["proof"]["consumers"] =
                    json!([{"kind": "CronJob", "name": "nightly", "handling": "Accept"}])
            }),
            vec!["a consumer with handling: Accept needs a reason"],
        ),
        (
            "on-failure-unknown",
            spec(|v| v["onFailure"] = json!("Explode")),
            vec!["spec.onFailure", "Unsupported value"],
        ),
        (
            "annotations-over-256k",
            Box::new(|o: &mut Value| {
                o["metadata"]["annotations"] = json!({"example.com/blob": "x".repeat(257 * KIB)})
            }),
            vec!["metadata.annotations", "Too long", "262144"],
        ),
        (
            "name-uppercase",
            Box::new(|o: &mut Value| o["metadata"]["name"] = json!("Bad_Name")),
            vec!["metadata.name", "RFC 1123"],
        ),
    ]
}

/// What an accepted case must end in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Failed with this reason, a Warning Event, nothing changed.
    Failed(&'static str),
    /// Succeeded (only its own target may change).
    Succeeded,
}

struct Case {
    name: String,
    ns: String,
    spec: Value,
    annotations: Value,
    want: Want,
    /// Why an outcome other than the ideal one is accepted (a defect noted).
    note: &'static str,
}

/// Everything a failed case might have changed, outside its own rotation.
#[derive(Debug, PartialEq)]
struct Snapshot {
    /// (namespace/name) → (resourceVersion, data) of every Secret.
    secrets: BTreeMap<String, (String, String)>,
    /// Deployment → (generation, pod template), and ReplicaSet count.
    deployments: BTreeMap<String, (i64, String)>,
    replica_sets: usize,
    ibm: Vec<String>,
    aws: BTreeMap<String, String>,
    outbound: Vec<String>,
}

async fn snapshot(
    client: &Client,
    namespaces: &[&str],
    ibm: &[&IbmEmulator],
    aws: &Aws,
    aws_ids: &[String],
    outbound: &Arc<Mutex<Vec<String>>>,
    skip: &[String],
) -> Snapshot {
    let mut secrets = BTreeMap::new();
    let mut deployments = BTreeMap::new();
    let mut replica_sets = 0;
    for ns in namespaces {
        for s in Api::<Secret>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            let name = s.metadata.name.clone().unwrap();
            // A write-ahead record belongs to its rotation; a case expected
            // to succeed may change its own target.
            if name.ends_with(".rekey-wal") || skip.contains(&name) {
                continue;
            }
            secrets.insert(
                format!("{ns}/{name}"),
                (
                    s.metadata.resource_version.clone().unwrap(),
                    serde_json::to_string(&s.data).unwrap(),
                ),
            );
        }
        for d in Api::<Deployment>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            deployments.insert(
                format!("{ns}/{}", d.metadata.name.clone().unwrap()),
                (
                    d.metadata.generation.unwrap_or(0),
                    serde_json::to_string(&d.spec.unwrap().template).unwrap(),
                ),
            );
        }
        replica_sets += Api::<ReplicaSet>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len();
    }
    let mut ibm_versions = vec![];
    for emu in ibm {
        let st = emu.state.lock().unwrap();
        let mut ids: Vec<String> = st
            .secrets
            .values()
            .map(|s| {
                format!(
                    "{} {:?}",
                    s.id,
                    s.versions
                        .iter()
                        .map(|v| (v.id.clone(), v.payload.clone(), v.locks.clone()))
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        ids.sort();
        ibm_versions.extend(ids);
    }
    let mut aws_versions = BTreeMap::new();
    for id in aws_ids {
        let d = aws.describe_secret().secret_id(id).send().await.unwrap();
        let mut v: Vec<_> = d
            .version_ids_to_stages
            .unwrap_or_default()
            .into_iter()
            .collect();
        v.sort();
        aws_versions.insert(id.clone(), format!("{v:?}"));
    }
    Snapshot {
        secrets,
        deployments,
        replica_sets,
        ibm: ibm_versions,
        aws: aws_versions,
        outbound: outbound.lock().unwrap().clone(),
    }
}

/// A hostile webhook and a fake Keycloak on one server: `/{mode}/issue`
/// answers per mode, every call is recorded (invalidations and admin calls
/// must never come).
async fn hostile_server(same: String) -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    type S = (Arc<Mutex<Vec<String>>>, Arc<String>);
    let calls = Arc::new(Mutex::new(vec![]));
    let issue = |State((_calls, same)): State<S>, Path(mode): Path<String>| async move {
        let r: Response = match mode.as_str() {
            "reject" => (StatusCode::FORBIDDEN, "no").into_response(),
            "error" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
            "empty" => axum::Json(json!({"value": ""})).into_response(),
            "notjson" => "<html>hello</html>".into_response(),
            "novalue" => axum::Json(json!({"token": "x"})).into_response(),
            "same" => axum::Json(json!({"value": *same})).into_response(),
            "over1mib" => axum::Json(json!({"value": "o".repeat(1024 * KIB + 1)})).into_response(),
            "near1mib" => {
                axum::Json(json!({"value": "n".repeat(1024 * KIB - 8 * KIB)})).into_response()
            }
            _ => axum::Json(json!({"value": common::canary("hostile-issued")})).into_response(),
        };
        r
    };
    let app = axum::Router::new()
        .route("/{mode}/issue", post(issue))
        .fallback(
            |State((calls, _)): State<S>, uri: axum::http::Uri| async move {
                // Invalidations and Keycloak admin calls: recorded, refused
                // (a token request changes nothing; the near-1 MiB value is
                // a legitimate rotation, its invalidation is accepted).
                let path = uri.path().to_string();
                if path == "/near1mib/invalidate" {
                    return (StatusCode::OK, axum::Json(json!({})));
                }
                if !path.ends_with("/token") {
                    calls.lock().unwrap().push(path);
                }
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": "invalid_grant"})),
                )
            },
        )
        .with_state((calls.clone(), Arc::new(same)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

fn spec(credential: Value, target: Value) -> Value {
    json!({
        "credential": credential,
        "oldValueValidFor": "30m",
        "targets": [target],
        "proof": {"nothingToProve": true, "timeout": "10s"}
    })
}

fn k8s_target(name: &str) -> Value {
    json!({"name": "main", "kubernetesSecret": {"name": name, "key": "k", "adoptExisting": true}})
}

fn aws_client(moto: &str) -> Aws {
    rekey::install_crypto_provider();
    let config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIAREKEYTEST0000001",
            "rekey-test-secret-access-key",
            None,
            None,
            "test",
        ))
        .endpoint_url(moto)
        .build();
    Aws::from_conf(config)
}

#[tokio::test]
async fn hostile_and_broken_input_is_refused_cleanly_and_changes_nothing() {
    let started = Instant::now();
    let (c, client, ns) = common::setup("hostile").await;
    let hosts_ns = common::namespace(&client, "hostile-hosts").await;
    let other_ns = common::namespace(&client, "hostile-other").await;
    let mut table: Vec<(String, String, bool)> = vec![];

    // 1. Admission.
    install_crd(c);
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::erase::<SecretRotation>(&()),
    );
    for (name, edit, wants) in admission_cases() {
        let mut object = json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
            "metadata": {"name": format!("adm-{name}")}, "spec": valid_spec()
        });
        edit(&mut object);
        let outcome = create_raw(&api, object).await;
        let ok = match &outcome {
            Ok(()) => false,
            Err(e) => wants.iter().all(|w| e.contains(w)) && e.len() < 4 * KIB,
        };
        let shown = match outcome {
            Ok(()) => "ACCEPTED (should be refused)".to_string(),
            Err(e) => format!("refused: {}", e.chars().take(300).collect::<String>()),
        };
        table.push((format!("admission/{name}"), shown, ok));
    }

    // 2. Runtime: the usual scene, stores, a hostile webhook and IdP.
    let initial = common::canary("scene-initial");
    scene(c, &client, &ns, &initial).await;
    let same = common::canary("same-value");
    let (url, outbound) = hostile_server(same.clone()).await;
    let emu = IbmEmulator::start().await;
    let refusing = IbmEmulator::start().await;
    let api_key = common::canary("ibm-api-key");
    emu.add_api_key(&api_key);
    refusing.add_api_key(&api_key);
    let ibm_old = common::canary("ibm-old");
    let ibm_id = emu.create_secret("hostile-missing-nothing", "arbitrary", json!(ibm_old));
    let ibm_wrong_key_id = emu.create_secret("hostile-wrong-key", "arbitrary", json!(ibm_old));
    let ibm_cert_id = emu.create_secret("hostile-cert", "imported_cert", json!(ibm_old));
    let ibm_refusing_id = refusing.create_secret("hostile-refuses", "arbitrary", json!(ibm_old));
    refusing.state.lock().unwrap().fail_next_writes.push(400);
    let _ = ibm_id;
    let moto = c.moto_url.clone().expect("the harness starts moto");
    let aws = aws_client(&moto);
    let aws_existing = format!("{ns}/hostile-existing");
    aws.create_secret()
        .name(&aws_existing)
        .secret_string(common::canary("aws-old"))
        .send()
        .await
        .unwrap();
    let wrong_key = common::canary("wrong-ibm-key");
    put_secret(&client, &ns, "ibm-api-key", json!({"apikey": api_key})).await;
    put_secret(&client, &ns, "ibm-wrong-key", json!({"apikey": wrong_key})).await;
    put_secret(&client, &ns, "aws-creds", json!({"AWS_ACCESS_KEY_ID": "AKIAREKEYTEST0000001", "AWS_SECRET_ACCESS_KEY": "rekey-test-secret-access-key"})).await;
    let kc_password = common::canary("kc-wrong-password");
    put_secret(
        &client,
        &ns,
        "kc-admin",
        json!({"username": "admin", "password": kc_password}),
    )
    .await;
    put_secret(&client, &ns, "manual-no-key", json!({"other": "x"})).await;
    put_secret(&client, &ns, "manual-empty", json!({"v": ""})).await;
    put_secret(&client, &ns, "manual-same", json!({"v": same})).await;
    let deployment_uid = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("app")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();

    let mut cases: Vec<Case> = vec![];
    let mut canaries = vec![
        initial.clone(),
        same.clone(),
        api_key.clone(),
        wrong_key.clone(),
        kc_password.clone(),
        ibm_old.clone(),
    ];
    let add = |cases: &mut Vec<Case>, name: &str, ns: &str, spec: Value, want: Want| {
        cases.push(Case {
            name: name.into(),
            ns: ns.into(),
            spec,
            annotations: json!({}),
            want,
            note: "",
        });
    };
    // Each case has a target Secret of its own, holding a canary.
    let mut target = |name: &str| {
        let t = format!("t-{name}");
        canaries.push(common::canary(name));
        (t, canaries.last().unwrap().clone())
    };
    let mut targets_to_create: Vec<(String, String, String)> = vec![];
    macro_rules! tgt {
        ($name:expr) => {{
            let (t, v) = target($name);
            targets_to_create.push((ns.clone(), t.clone(), v));
            t
        }};
    }
    let wh = |mode: &str| json!({"webhook": {"issueUrl": format!("{url}/{mode}/issue"), "invalidateUrl": format!("{url}/{mode}/invalidate")}});
    let manual =
        |name: &str, key: &str| json!({"manual": {"secretRef": {"name": name, "key": key}}});

    add(
        &mut cases,
        "manual-secret-missing",
        &ns,
        spec(
            manual("no-such-secret", "v"),
            k8s_target(&tgt!("manual-secret-missing")),
        ),
        Want::Failed("SecretNotFound"),
    );
    add(
        &mut cases,
        "manual-key-missing",
        &ns,
        spec(
            manual("manual-no-key", "v"),
            k8s_target(&tgt!("manual-key-missing")),
        ),
        Want::Failed("SecretKeyMissing"),
    );
    add(
        &mut cases,
        "manual-value-empty",
        &ns,
        spec(
            manual("manual-empty", "v"),
            k8s_target(&tgt!("manual-value-empty")),
        ),
        Want::Failed("SecretKeyMissing"),
    );
    {
        let t = "t-manual-value-unchanged".to_string();
        targets_to_create.push((ns.clone(), t.clone(), same.clone()));
        add(
            &mut cases,
            "manual-value-unchanged",
            &ns,
            spec(manual("manual-same", "v"), k8s_target(&t)),
            Want::Failed("ManualValueUnchanged"),
        );
    }
    let with_proof = |t: String, proof: Value| {
        let mut s = spec(json!({"generated": {}}), k8s_target(&t));
        s["proof"] = proof;
        s
    };
    add(
        &mut cases,
        "external-secret-missing",
        &ns,
        with_proof(
            tgt!("external-secret-missing"),
            json!({"externalSecrets": [{"name": "no-such-es", "key": "client_secret"}], "timeout": "10s"}),
        ),
        Want::Failed("ExternalSecretNotFound"),
    );
    add(
        &mut cases,
        "workload-missing",
        &ns,
        with_proof(
            tgt!("workload-missing"),
            json!({"workloads": [{"kind": "StatefulSet", "name": "no-such-app"}], "timeout": "10s"}),
        ),
        Want::Failed("WorkloadNotFound"),
    );
    add(
        &mut cases,
        "proof-key-mismatch",
        &ns,
        with_proof(
            tgt!("proof-key-mismatch"),
            json!({"externalSecrets": [{"name": "app-creds", "key": "client_secret"}], "workloads": [{"kind": "Deployment", "name": "app"}], "timeout": "10s"}),
        ),
        Want::Failed("ProofKeyMismatch"),
    );
    add(
        &mut cases,
        "proof-key-missing",
        &ns,
        with_proof(
            tgt!("proof-key-missing"),
            json!({"externalSecrets": [{"name": "app-creds", "key": "no-such-key"}], "workloads": [{"kind": "Deployment", "name": "app"}], "timeout": "10s"}),
        ),
        Want::Failed("ProofKeyMissing"),
    );
    add(
        &mut cases,
        "uncovered-consumer",
        &ns,
        with_proof(
            "source".into(),
            json!({"externalSecrets": [{"name": "app-creds", "key": "client_secret"}], "timeout": "10s"}),
        ),
        Want::Failed("UncoveredConsumer"),
    );
    add(
        &mut cases,
        "grace-window-too-short",
        &ns,
        {
            let mut s = with_proof(
                tgt!("grace-window-too-short"),
                json!({"externalSecrets": [{"name": "no-such-es", "key": "k"}], "timeout": "2h"}),
            );
            s["oldValueValidFor"] = json!("1m");
            s
        },
        Want::Failed("GraceWindowTooShort"),
    );
    add(
        &mut cases,
        "cron-out-of-range",
        &ns,
        {
            let mut s = spec(
                json!({"generated": {}}),
                k8s_target(&tgt!("cron-out-of-range")),
            );
            s["schedule"] = json!({"cron": "99 99 * * *"});
            s
        },
        Want::Failed("InvalidSpec"),
    );
    {
        let t = tgt!("target-not-adopted");
        add(
            &mut cases,
            "target-not-adopted",
            &ns,
            spec(
                json!({"generated": {}}),
                json!({"name": "main", "kubernetesSecret": {"name": t, "key": "k"}}),
            ),
            Want::Failed("TargetSecretNotAdopted"),
        );
    }
    add(
        &mut cases,
        "target-owned-by-deployment",
        &ns,
        spec(json!({"generated": {}}), k8s_target("t-owned")),
        Want::Failed("TargetSecretManaged"),
    );
    add(
        &mut cases,
        "cross-namespace-no-grant",
        &ns,
        spec(
            json!({"generated": {}}),
            json!({"name": "main", "kubernetesSecret": {"name": "t-no-grant", "namespace": other_ns, "key": "k", "adoptExisting": true}}),
        ),
        Want::Failed("TargetNamespaceNotGranted"),
    );
    add(
        &mut cases,
        "cross-namespace-rollback",
        &ns,
        {
            let mut s = spec(
                json!({"generated": {}}),
                json!({"name": "main", "kubernetesSecret": {"name": "t-granted", "namespace": other_ns, "key": "k", "adoptExisting": true}}),
            );
            s["onFailure"] = json!("Rollback");
            s
        },
        Want::Failed("InvalidSpec"),
    );
    add(
        &mut cases,
        "webhook-rejects",
        &ns,
        spec(wh("reject"), k8s_target(&tgt!("webhook-rejects"))),
        Want::Failed("WebhookRejected"),
    );
    add(
        &mut cases,
        "webhook-5xx",
        &ns,
        spec(wh("error"), k8s_target(&tgt!("webhook-5xx"))),
        Want::Failed("WebhookError"),
    );
    add(
        &mut cases,
        "webhook-unreachable",
        &ns,
        spec(
            json!({"webhook": {"issueUrl": "http://127.0.0.1:9/issue", "invalidateUrl": "http://127.0.0.1:9/invalidate"}}),
            k8s_target(&tgt!("webhook-unreachable")),
        ),
        Want::Failed("WebhookUnreachable"),
    );
    add(
        &mut cases,
        "webhook-empty-value",
        &ns,
        spec(wh("empty"), k8s_target(&tgt!("webhook-empty-value"))),
        Want::Failed("WebhookBadResponse"),
    );
    add(
        &mut cases,
        "webhook-not-json",
        &ns,
        spec(wh("notjson"), k8s_target(&tgt!("webhook-not-json"))),
        Want::Failed("WebhookBadResponse"),
    );
    add(
        &mut cases,
        "webhook-no-value-field",
        &ns,
        spec(wh("novalue"), k8s_target(&tgt!("webhook-no-value-field"))),
        Want::Failed("WebhookBadResponse"),
    );
    {
        let t = "t-webhook-same-value".to_string();
        targets_to_create.push((ns.clone(), t.clone(), same.clone()));
        add(
            &mut cases,
            "webhook-same-value",
            &ns,
            spec(wh("same"), k8s_target(&t)),
            Want::Failed("NewValueNotNew"),
        );
    }
    add(
        &mut cases,
        "webhook-auth-secret-missing",
        &ns,
        {
            let mut c = wh("ok");
            c["webhook"]["authSecretRef"] = json!({"name": "no-such-token", "key": "token"});
            spec(c, k8s_target(&tgt!("webhook-auth-secret-missing")))
        },
        Want::Failed("SecretNotFound"),
    );
    add(
        &mut cases,
        "webhook-value-over-1mib",
        &ns,
        spec(wh("over1mib"), k8s_target(&tgt!("webhook-value-over-1mib"))),
        Want::Failed("KubernetesApiError"),
    );
    cases.last_mut().unwrap().note = "refused by the API server at the write-ahead record, before any store write; the issued value is left to the webhook";
    add(
        &mut cases,
        "webhook-value-near-1mib",
        &ns,
        spec(wh("near1mib"), k8s_target(&tgt!("webhook-value-near-1mib"))),
        Want::Succeeded,
    );
    cases.last_mut().unwrap().note =
        "a value 8 KiB under a Secret's 1 MiB fits: rotated, invalidated once";
    let kc = |secret: &str| json!({"keycloak": {"url": url, "realm": "r", "clientId": "c", "adminSecretRef": {"name": secret}}});
    add(
        &mut cases,
        "keycloak-admin-secret-missing",
        &ns,
        spec(
            kc("no-such-admin"),
            k8s_target(&tgt!("keycloak-admin-secret-missing")),
        ),
        Want::Failed("SecretNotFound"),
    );
    add(
        &mut cases,
        "keycloak-wrong-credentials",
        &ns,
        spec(
            kc("kc-admin"),
            k8s_target(&tgt!("keycloak-wrong-credentials")),
        ),
        Want::Failed("KeycloakCredentialsRejected"),
    );
    let ibm = |emu: &IbmEmulator, id: &str, key_secret: &str| json!({"name": "main", "ibmSecretsManager": {"serviceUrl": emu.url, "iamUrl": emu.url, "secretId": id, "apiKeySecretRef": {"name": key_secret, "key": "apikey"}}});
    add(
        &mut cases,
        "ibm-wrong-api-key",
        &ns,
        spec(
            json!({"generated": {}}),
            ibm(&emu, &ibm_wrong_key_id, "ibm-wrong-key"),
        ),
        Want::Failed("IbmCredentialsRejected"),
    );
    add(
        &mut cases,
        "ibm-secret-id-missing",
        &ns,
        spec(
            json!({"generated": {}}),
            ibm(&emu, "00000000-0000-0000-0000-000000000000", "ibm-api-key"),
        ),
        Want::Failed("IbmSecretNotFound"),
    );
    add(
        &mut cases,
        "ibm-api-key-secret-missing",
        &ns,
        spec(
            json!({"generated": {}}),
            ibm(&emu, &ibm_id, "no-such-ibm-key"),
        ),
        Want::Failed("SecretNotFound"),
    );
    add(
        &mut cases,
        "ibm-unsupported-type",
        &ns,
        spec(
            json!({"generated": {}}),
            ibm(&emu, &ibm_cert_id, "ibm-api-key"),
        ),
        Want::Failed("IbmUnsupportedSecretType"),
    );
    add(
        &mut cases,
        "ibm-refuses-value",
        &ns,
        spec(
            json!({"generated": {}}),
            ibm(&refusing, &ibm_refusing_id, "ibm-api-key"),
        ),
        Want::Failed("IbmSecretsManagerRejected"),
    );
    let aws_t = |id: &str, creds: &str| json!({"name": "main", "awsSecretsManager": {"region": "us-east-1", "secretId": id, "credentialsSecretRef": {"name": creds}, "endpoint": moto}});
    add(
        &mut cases,
        "aws-secret-id-missing",
        &ns,
        spec(
            json!({"generated": {}}),
            aws_t(&format!("{ns}/no-such-secret"), "aws-creds"),
        ),
        Want::Failed("AwsSecretNotFound"),
    );
    add(
        &mut cases,
        "aws-credentials-secret-missing",
        &ns,
        spec(
            json!({"generated": {}}),
            aws_t(&aws_existing, "no-such-aws-creds"),
        ),
        Want::Failed("SecretNotFound"),
    );
    add(
        &mut cases,
        "annotations-250k-and-missing-ref",
        &ns,
        spec(
            manual("no-such-secret", "v"),
            k8s_target(&tgt!("annotations-250k-and-missing-ref")),
        ),
        Want::Failed("SecretNotFound"),
    );
    cases.last_mut().unwrap().annotations = json!({"example.com/blob": "a".repeat(250 * KIB)});
    add(
        &mut cases,
        "annotations-250k-valid",
        &ns,
        spec(
            json!({"generated": {}}),
            k8s_target(&tgt!("annotations-250k-valid")),
        ),
        Want::Succeeded,
    );
    cases.last_mut().unwrap().annotations = json!({"example.com/blob": "b".repeat(250 * KIB)});

    // Outbound hosts: an operator restricted to *.example.com.
    let api_port = reqwest::Url::parse(&c.api_url)
        .unwrap()
        .port()
        .unwrap_or(443);
    let refused_hosts: Vec<(&str, Value)> = vec![
        (
            "host-kubernetes-default",
            json!({"webhook": {"issueUrl": "https://kubernetes.default.svc/issue", "invalidateUrl": "https://sso.example.com/i"}}),
        ),
        (
            "host-metadata-169-254",
            json!({"webhook": {"issueUrl": "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "invalidateUrl": "https://sso.example.com/i"}}),
        ),
        (
            "host-apiserver-loopback",
            json!({"webhook": {"issueUrl": format!("https://127.0.0.1:{api_port}/api/v1/secrets"), "invalidateUrl": "https://sso.example.com/i"}}),
        ),
        (
            "host-userinfo-trick",
            json!({"webhook": {"issueUrl": "https://sso.example.com@169.254.169.254/issue", "invalidateUrl": "https://sso.example.com/i"}}),
        ),
        (
            "host-suffix-trick",
            json!({"webhook": {"issueUrl": "https://sso.example.com.169.254.169.254.nip.io/issue", "invalidateUrl": "https://sso.example.com/i"}}),
        ),
        (
            "host-invalidate-only",
            json!({"webhook": {"issueUrl": "https://sso.example.com/issue", "invalidateUrl": "http://[fd00:ec2::254]/latest"}}),
        ),
        (
            "host-keycloak-ipv6-loopback",
            json!({"keycloak": {"url": "http://[::1]:8080", "realm": "r", "clientId": "c", "adminSecretRef": {"name": "kc-admin"}}}),
        ),
    ];
    for (name, cred) in refused_hosts {
        let t = format!("t-{name}");
        let v = common::canary(name);
        canaries.push(v.clone());
        targets_to_create.push((hosts_ns.clone(), t.clone(), v));
        add(
            &mut cases,
            name,
            &hosts_ns,
            spec(cred, k8s_target(&t)),
            Want::Failed("HostNotAllowed"),
        );
    }
    {
        let name = "host-ibm-metadata";
        add(
            &mut cases,
            name,
            &hosts_ns,
            spec(
                json!({"generated": {}}),
                json!({"name": "main", "ibmSecretsManager": {"serviceUrl": "https://sso.example.com", "iamUrl": "http://metadata.google.internal/token", "secretId": "x", "apiKeySecretRef": {"name": "ibm-api-key", "key": "apikey"}}}),
            ),
            Want::Failed("HostNotAllowed"),
        );
        add(
            &mut cases,
            "host-aws-ecs-metadata",
            &hosts_ns,
            spec(
                json!({"generated": {}}),
                json!({"name": "main", "awsSecretsManager": {"region": "us-east-1", "secretId": "x", "credentialsSecretRef": {"name": "aws-creds"}, "endpoint": "http://169.254.170.2"}}),
            ),
            Want::Failed("HostNotAllowed"),
        );
    }

    // Objects the cases refer to.
    for (tns, t, v) in &targets_to_create {
        put_secret(&client, tns, t, json!({"k": v})).await;
    }
    let owned: Secret = serde_json::from_value(json!({
        "metadata": {"name": "t-owned", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "app", "uid": deployment_uid}]},
        "stringData": {"k": common::canary("owned")}
    })).unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &owned)
        .await
        .unwrap();
    put_secret(
        &client,
        &other_ns,
        "t-no-grant",
        json!({"k": common::canary("no-grant")}),
    )
    .await;
    let granted: Secret = serde_json::from_value(json!({
        "metadata": {"name": "t-granted", "annotations": {"rekey.dev/allow-rotation-from": ns}},
        "stringData": {"k": common::canary("granted")}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &other_ns)
        .create(&PostParams::default(), &granted)
        .await
        .unwrap();

    let namespaces = [ns.as_str(), hosts_ns.as_str(), other_ns.as_str()];
    let emus = [&emu, &refusing];
    let aws_ids = vec![aws_existing.clone()];
    let skip: Vec<String> = cases
        .iter()
        .filter(|c| c.want == Want::Succeeded)
        .map(|c| {
            c.spec["targets"][0]["kubernetesSecret"]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let before = snapshot(
        &client,
        &namespaces,
        &emus,
        &aws,
        &aws_ids,
        &outbound,
        &skip,
    )
    .await;

    let op = Operator::start(REKEY, c, &ns);
    let hosts_op = Operator::start_with_args(
        REKEY,
        c,
        &hosts_ns,
        c.kubeconfig.clone(),
        &["--allowed-hosts=*.example.com"],
    );
    let runtime_started = Instant::now();
    for case in &cases {
        let sr: SecretRotation = serde_json::from_value(json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
            "metadata": {"name": case.name, "annotations": case.annotations}, "spec": case.spec
        }))
        .unwrap();
        Api::<SecretRotation>::namespaced(client.clone(), &case.ns)
            .create(&PostParams::default(), &sr)
            .await
            .unwrap_or_else(|e| panic!("{}: the API server refused the case: {e}", case.name));
    }
    // Every case reaches a terminal phase.
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut finished: BTreeMap<String, SecretRotation> = BTreeMap::new();
    while finished.len() < cases.len() && Instant::now() < deadline {
        for case in &cases {
            if finished.contains_key(&case.name) {
                continue;
            }
            let sr = get_rotation(&client, &case.ns, &case.name).await;
            let done = sr
                .status
                .as_ref()
                .is_some_and(|s| s.rotation.is_none() && s.last_rotation.is_some());
            if done {
                finished.insert(case.name.clone(), sr);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let runtime_took = runtime_started.elapsed();
    // Let anything a wrong operator would do after failing happen first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = snapshot(
        &client,
        &namespaces,
        &emus,
        &aws,
        &aws_ids,
        &outbound,
        &skip,
    )
    .await;

    for case in &cases {
        let sr = match finished.get(&case.name) {
            Some(sr) => sr.clone(),
            None => get_rotation(&client, &case.ns, &case.name).await,
        };
        let status = serde_json::to_value(&sr.status).unwrap_or_default();
        let phase = status["phase"].as_str().unwrap_or("-").to_string();
        let reason = status["lastRotation"]["failure"]["reason"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let message = status["lastRotation"]["failure"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let ready = status["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default();
        let warnings: Vec<(String, String)> = events(&client, &case.ns)
            .await
            .into_iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some(case.name.as_str())
                    && e.type_.as_deref() == Some("Warning")
            })
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect();
        let (ok, shown) = match case.want {
            Want::Failed(want) => {
                let warned = warnings.iter().any(|(r, n)| r == want || n.contains(want));
                let ok = phase == "Failed"
                    && reason == want
                    && !message.is_empty()
                    && ready["reason"] == want
                    && warned;
                (
                    ok,
                    format!(
                        "{phase} {reason}: {message} [Ready={} Warning events={}]",
                        ready["reason"],
                        warnings.len()
                    ),
                )
            }
            Want::Succeeded => (phase == "Succeeded", format!("{phase} {reason} {message}")),
        };
        let note = if case.note.is_empty() {
            String::new()
        } else {
            format!(" (NOTE: {})", case.note)
        };
        table.push((
            format!("runtime/{}", case.name),
            format!("{shown}{note}"),
            ok,
        ));
    }

    println!("\n{:<48} {:<4} outcome", "case", "ok");
    for (name, outcome, ok) in &table {
        println!(
            "{name:<48} {:<4} {outcome}",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    println!(
        "\n{} cases ({} admission, {} runtime); runtime cases finished in {runtime_took:?}; total {:?}",
        table.len(),
        table.len() - cases.len(),
        cases.len(),
        started.elapsed()
    );
    if before != after {
        for (k, v) in &before.secrets {
            if after.secrets.get(k) != Some(v) {
                println!("CHANGED Secret {k}");
            }
        }
        for k in after.secrets.keys() {
            if !before.secrets.contains_key(k) {
                println!("NEW Secret {k}");
            }
        }
        println!(
            "deployments equal: {}, replica sets {} -> {}",
            before.deployments == after.deployments,
            before.replica_sets,
            after.replica_sets
        );
        println!(
            "ibm equal: {}, aws equal: {}",
            before.ibm == after.ibm,
            before.aws == after.aws
        );
        println!("outbound calls after: {:?}", after.outbound);
    }
    let passed = table.iter().filter(|(_, _, ok)| *ok).count();
    common::reliability::record(
        "hostile",
        serde_json::json!({
            "bad_inputs_tried": table.len(),
            "refused_by_admission": table.len() - cases.len(),
            "refused_at_runtime": cases.len(),
            "ended_as_expected": passed,
            "changed_something": before != after,
        }),
    );
    let logs = format!("{}\n{}", op.logs(), hosts_op.logs());
    let metrics = op.scrape().await;
    let canary_refs: Vec<&str> = canaries.iter().map(String::as_str).collect();
    assert_never_leaked(&client, &ns, &logs, &metrics, &canary_refs).await;
    assert_never_leaked(&client, &hosts_ns, &logs, &metrics, &canary_refs).await;
    assert!(!logs.contains("panicked"), "the operator panicked");
    assert!(table.len() >= 30, "only {} cases", table.len());
    let failed: Vec<&String> = table
        .iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(n, _, _)| n)
        .collect();
    assert!(
        failed.is_empty(),
        "cases not ending as they should: {failed:?}"
    );
    assert!(
        before == after,
        "a failing case changed something (see CHANGED above)"
    );
}
