//! The CRD: the committed YAML matches the code, and the API server itself
//! rejects bad SecretRotations with the message a person needs.

use rekey_testenv as common;

use common::fixtures::install_crd;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use rekey::crd::SecretRotation;
use serde_json::{Value, json};

#[test]
fn committed_crd_matches_the_code() {
    use kube::CustomResourceExt;
    let generated = serde_yaml::to_string(&SecretRotation::crd()).unwrap();
    let committed =
        std::fs::read_to_string(common::cluster::repo_root().join("crds/secretrotation.yaml"))
            .unwrap();
    assert!(
        generated == committed,
        "crds/secretrotation.yaml is stale: run `make crds` and commit it"
    );
}

fn valid() -> Value {
    json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [{"name": "dev-stage", "kubernetesSecret": {"name": "s", "key": "k"}}],
        "proof": {"externalSecrets": [{"name": "es", "key": "k"}], "timeout": "5m"}
    })
}

/// Sends the raw JSON, so that only the API server judges it.
async fn create(api: &Api<DynamicObject>, name: &str, spec: Value) -> Result<(), String> {
    let sr: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    api.create(&PostParams::default(), &sr)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn api_server_rejects_invalid_specs_with_readable_messages() {
    let c = common::cluster();
    install_crd(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "crd").await;
    let typed: Api<SecretRotation> = Api::namespaced(client.clone(), &ns);
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &ns, &ApiResource::erase::<SecretRotation>(&()));

    create(&api, "valid", valid())
        .await
        .expect("the valid spec is accepted");
    let sr = typed.get("valid").await.unwrap();
    assert_eq!(
        sr.spec.on_failure,
        rekey::crd::FailurePolicy::Hold,
        "defaults applied"
    );
    assert_eq!(sr.spec.credential.generated.as_ref().unwrap().length, 48);

    let mut cases: Vec<(&str, Value, &str)> = vec![];
    let mut case = |name: &'static str, edit: &dyn Fn(&mut Value), want: &'static str| {
        let mut v = valid();
        edit(&mut v);
        cases.push((name, v, want));
    };
    case(
        "two-sources",
        &|v| {
            v["credential"]["webhook"] =
                json!({"issueUrl": "https://a", "invalidateUrl": "https://b"})
        },
        "exactly one of generated, webhook, manual",
    );
    case(
        "no-source",
        &|v| v["credential"] = json!({}),
        "exactly one of generated, webhook, manual",
    );
    case(
        "no-store",
        &|v| v["targets"][0] = json!({"name": "x"}),
        "exactly one store kind",
    );
    case(
        "duplicate-targets",
        &|v| {
            v["targets"] = json!([
        {"name": "prod", "kubernetesSecret": {"name": "a", "key": "k"}},
        {"name": "prod", "kubernetesSecret": {"name": "b", "key": "k"}}])
        },
        "target names must be unique",
    );
    case("no-targets", &|v| v["targets"] = json!([]), "spec.targets");
    case(
        "bad-duration",
        &|v| v["oldValueValidFor"] = json!("30 minutes"),
        "oldValueValidFor",
    );
    case(
        "grace-too-short",
        &|v| v["oldValueValidFor"] = json!("10s"),
        "oldValueValidFor must be a duration between 1m and 720h",
    );
    case(
        "grace-too-long",
        &|v| v["oldValueValidFor"] = json!("9000h"),
        "oldValueValidFor must be a duration between 1m and 720h",
    );
    case(
        "timeout-too-long",
        &|v| v["proof"]["timeout"] = json!("48h"),
        "proof.timeout must be a duration between 10s and 24h",
    );
    case(
        "no-proof",
        &|v| v["proof"] = json!({}),
        "proof must name at least one ExternalSecret, workload or cluster",
    );
    let stage = |es: Value| json!({"name": "stage", "kubeConfig": {"secretRef": {"name": "kc"}}, "externalSecrets": es});
    case(
        "cluster-without-proof",
        &|v| v["proof"]["clusters"] = json!([stage(json!([]))]),
        "each of proof.clusters must name at least one ExternalSecret or workload",
    );
    case(
        "clusters-twice",
        &|v| {
            let c = stage(json!([{"name": "es", "key": "k"}]));
            v["proof"]["clusters"] = json!([c.clone(), c]);
        },
        "proof.clusters names must be unique",
    );
    case(
        "nothing-but-clusters",
        &|v| {
            v["proof"] = json!({"nothingToProve": true,
                "clusters": [stage(json!([{"name": "es", "key": "k"}]))]});
        },
        "cannot be combined with externalSecrets, workloads or clusters",
    );
    case(
        "proof-and-nothing",
        &|v| v["proof"]["nothingToProve"] = json!(true),
        "cannot be combined",
    );
    case(
        "two-schedules",
        &|v| v["schedule"] = json!({"every": "24h", "cron": "0 3 * * *"}),
        "exactly one of every, cron",
    );
    case(
        "bad-cron",
        &|v| v["schedule"] = json!({"cron": "0 3 * *"}),
        "five fields",
    );
    case(
        "schedule-too-often",
        &|v| v["schedule"] = json!({"every": "10s"}),
        "schedule.every must be a duration between 1m and 8760h",
    );
    case(
        "bad-url",
        &|v| {
            v["credential"] =
                json!({"webhook": {"issueUrl": "ftp://x", "invalidateUrl": "https://b"}})
        },
        "issueUrl must be an http(s) URL",
    );
    case(
        "short-generated",
        &|v| v["credential"] = json!({"generated": {"length": 8}}),
        "length",
    );
    case(
        "bad-target-name",
        &|v| v["targets"][0]["name"] = json!("Prod_1"),
        "targets[0].name",
    );
    case(
        "bad-workload-kind",
        &|v| v["proof"]["workloads"] = json!([{"kind": "Pod", "name": "x"}]),
        "Unsupported value",
    );
    case(
        "bad-restart",
        &|v| v["proof"]["restart"] = json!("Sometimes"),
        "Unsupported value",
    );
    case(
        "ibm-id-and-name",
        &|v| {
            v["targets"][0] = json!({"name": "dev", "ibmSecretsManager": {
        "serviceUrl": "https://sm", "secretId": "a", "secretName": "b", "apiKeySecretRef": {"name": "k", "key": "k"}}})
        },
        "exactly one of secretId, secretName",
    );
    case(
        "two-store-kinds",
        &|v| {
            v["targets"][0]["awsSecretsManager"] = json!({
        "region": "eu-central-1", "secretId": "x", "credentialsSecretRef": {"name": "aws"}})
        },
        "exactly one store kind",
    );
    // Issue 15 item 2: exactly one identity per cloud store.
    case(
        "aws-keys-and-role",
        &|v| {
            v["targets"][0] = json!({"name": "prod", "awsSecretsManager": {
        "region": "eu-central-1", "secretId": "x", "credentialsSecretRef": {"name": "aws"},
        "serviceAccountRef": {"name": "rotator"}, "roleArn": "arn:aws:iam::123456789012:role/r"}})
        },
        "exactly one identity",
    );
    case(
        "aws-service-account-without-role",
        &|v| {
            v["targets"][0] = json!({"name": "prod", "awsSecretsManager": {
        "region": "eu-central-1", "secretId": "x", "serviceAccountRef": {"name": "rotator"}}})
        },
        "serviceAccountRef together with roleArn",
    );
    case(
        "aws-no-identity",
        &|v| v["targets"][0] = json!({"name": "prod", "awsSecretsManager": {"region": "eu-central-1", "secretId": "x"}}),
        "exactly one identity",
    );
    case(
        "ibm-key-and-profile",
        &|v| {
            v["targets"][0] = json!({"name": "dev", "ibmSecretsManager": {
        "serviceUrl": "https://sm", "secretId": "a", "apiKeySecretRef": {"name": "k", "key": "k"},
        "trustedProfile": {"profileId": "Profile-1", "serviceAccountRef": {"name": "rotator"}}}})
        },
        "exactly one of apiKeySecretRef (an API key) or trustedProfile",
    );
    case(
        "ibm-no-identity",
        &|v| v["targets"][0] = json!({"name": "dev", "ibmSecretsManager": {"serviceUrl": "https://sm", "secretId": "a"}}),
        "exactly one of apiKeySecretRef (an API key) or trustedProfile",
    );
    // Issue 10 item 13: names that can never resolve are refused at
    // admission, not found in Preflight (or in Writing, after issuing).
    case(
        "bad-workload-name",
        &|v| v["proof"]["workloads"] = json!([{"kind": "Deployment", "name": "My_App"}]),
        "spec.proof.workloads[0].name",
    );
    case(
        "bad-external-secret-name",
        &|v| v["proof"]["externalSecrets"] = json!([{"name": "app creds", "key": "k"}]),
        "spec.proof.externalSecrets[0].name",
    );
    case(
        "bad-proof-key",
        &|v| v["proof"]["externalSecrets"] = json!([{"name": "app-creds", "key": "a/b"}]),
        "spec.proof.externalSecrets[0].key",
    );
    case(
        "bad-target-secret-name",
        &|v| v["targets"][0]["kubernetesSecret"]["name"] = json!("Source"),
        "spec.targets[0].kubernetesSecret.name",
    );
    case(
        "bad-target-namespace",
        &|v| v["targets"][0]["kubernetesSecret"]["namespace"] = json!("team.a"),
        "spec.targets[0].kubernetesSecret.namespace",
    );
    case(
        "bad-target-key",
        &|v| v["targets"][0]["kubernetesSecret"]["key"] = json!("client secret"),
        "spec.targets[0].kubernetesSecret.key",
    );
    let servicenow = json!({"instanceUrl": "https://example.service-now.com", "credentialsSecretRef": {"name": "snow"}});
    case(
        "change-for-an-unknown-environment",
        &|v| {
            v["targets"][0]["environment"] = json!("stage");
            v["approval"] = json!({"changeRequests": {"environments": ["prod"], "serviceNow": servicenow.clone()}});
        },
        "must be the environment of a target or of a proof.clusters entry",
    );
    case(
        "change-system-missing",
        &|v| {
            v["targets"][0]["environment"] = json!("prod");
            v["approval"] = json!({"changeRequests": {"environments": ["prod"]}});
        },
        "exactly one of serviceNow, webhook",
    );
    case(
        "standard-change-without-template",
        &|v| {
            v["targets"][0]["environment"] = json!("prod");
            let mut sn = servicenow.clone();
            sn["type"] = json!("Standard");
            v["approval"] = json!({"changeRequests": {"environments": ["prod"], "serviceNow": sn}});
        },
        "Standard needs standardTemplateId",
    );
    assert!(cases.len() >= 10);
    for (name, spec, want) in cases {
        let err = create(&api, name, spec)
            .await
            .expect_err(&format!("{name} must be rejected"));
        assert!(
            err.contains(want),
            "{name}: message {err:?} does not say {want:?}"
        );
    }
}
