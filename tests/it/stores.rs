//! Secrets Manager targets: IBM Cloud Secrets Manager (against the emulator in
//! testenv/harness/src/ibm.rs) and AWS Secrets Manager (against moto), each proven
//! end to end through the real ESO, and a rotation with both at once.

use rekey_testenv as common;

use std::time::Duration;

use crate::REKEY;
use aws_sdk_secretsmanager::Client as Aws;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use common::cluster::Cluster;
use common::fixtures::*;
use common::ibm::IbmEmulator;
use common::operator::Operator;
use common::recorder::{Recorder, jwt_claims, token_review};
use kube::Client;
use rekey::crd::{
    AwsSecretsManagerTarget, IbmSecretsManagerTarget, LocalSecretRef, Phase, ServiceAccountRef,
};
use rekey::store::Store;
use rekey::store::aws::AwsSecretsManagerStore;
use rekey::store::ibm::IbmSecretsManagerStore;
use rekey::value::SecretValue;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);
pub(crate) const AWS_KEY: &str = "AKIAREKEYTEST0000001";
pub(crate) const AWS_SECRET: &str = "rekey-test-secret-access-key";

fn ibm_target(emu: &IbmEmulator, secret_id: &str) -> IbmSecretsManagerTarget {
    serde_json::from_value(json!({
        "serviceUrl": emu.url, "secretId": secret_id, "iamUrl": emu.url,
        "apiKeySecretRef": {"name": "ibm-api-key", "key": "apikey"}
    }))
    .unwrap()
}

fn ibm_store(target: &IbmSecretsManagerTarget, api_key: &str) -> IbmSecretsManagerStore {
    rekey::install_crypto_provider();
    IbmSecretsManagerStore::new(
        reqwest::Client::new(),
        rekey::metrics::Metrics::new(),
        target,
        SecretValue::new(api_key),
    )
}

#[tokio::test]
async fn ibm_store_writes_one_version_per_rotation_and_maps_errors() {
    let emu = IbmEmulator::start().await;
    emu.add_api_key("good-key");
    let old = common::canary("old");
    let id = emu.create_secret("ai-component", "arbitrary", json!(old));
    let store = ibm_store(&ibm_target(&emu, &id), "good-key");
    store.preflight().await.unwrap();
    assert_eq!(store.read_current().await.unwrap().unwrap().expose(), old);

    // The Writing phase twice (a crash after the first write): one new version.
    let new = SecretValue::new(common::canary("new"));
    let v1 = store.write(&new, "rot-1").await.unwrap();
    let v2 = store.write(&new, "rot-1").await.unwrap();
    assert_eq!(v1, v2);
    let s = emu.secret(&id);
    assert_eq!(s.versions.len(), 2, "exactly one new version");
    assert_eq!(s.versions[1].id, v1);
    assert_eq!(s.versions[1].custom_metadata["rekey_rotation_id"], "rot-1");
    assert_eq!(
        store.read_current().await.unwrap().unwrap().expose(),
        new.expose()
    );
    // Even a new store (a restarted operator) finds the version by its metadata.
    let again = ibm_store(&ibm_target(&emu, &id), "good-key");
    assert_eq!(again.write(&new, "rot-1").await.unwrap(), v1);
    assert_eq!(emu.secret(&id).versions.len(), 2);
    let tokens = emu
        .state
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| c.contains("identity/token"))
        .count();
    assert_eq!(
        tokens, 2,
        "one IAM token per store instance, cached across calls"
    );

    // 429/5xx answers are transient errors; the retry (the controller's
    // requeue) creates exactly one version, also when the service had created
    // it before its answer was lost.
    emu.state.lock().unwrap().fail_next_writes = vec![503];
    let third = SecretValue::new(common::canary("third"));
    let err = store.write(&third, "rot-2").await.unwrap_err();
    assert!(!err.permanent, "{err}");
    emu.state.lock().unwrap().fail_after_create = vec![504];
    let err = store.write(&third, "rot-2").await.unwrap_err();
    assert!(!err.permanent, "{err}");
    let v3 = store.write(&third, "rot-2").await.unwrap();
    assert_eq!(
        emu.secret(&id).versions.len(),
        3,
        "exactly one version for rot-2"
    );
    assert_eq!(emu.secret(&id).versions[2].id, v3);

    // A locked previous version answers 412: a clear, permanent error.
    emu.lock_version(&id, 1, "audit-hold");
    let err = store
        .write(&SecretValue::new(common::canary("fourth")), "rot-3")
        .await
        .unwrap_err();
    assert_eq!(
        (err.reason.as_str(), err.permanent),
        ("IbmSecretLocked", true)
    );
    // Wrong credentials and a wrong id.
    let err = ibm_store(&ibm_target(&emu, &id), "bad-key")
        .read_current()
        .await
        .unwrap_err();
    assert_eq!(
        (err.reason.as_str(), err.permanent),
        ("IbmCredentialsRejected", true)
    );
    let err = ibm_store(
        &ibm_target(&emu, "0b6a1a57-0000-4000-a000-000000000000"),
        "good-key",
    )
    .read_current()
    .await
    .unwrap_err();
    assert_eq!(
        (err.reason.as_str(), err.permanent),
        ("IbmSecretNotFound", true)
    );
    assert!(
        !err.message.contains("Secret not found"),
        "no response body in messages"
    );
}

#[tokio::test]
async fn ibm_store_handles_kv_and_lookup_by_name() {
    let emu = IbmEmulator::start().await;
    emu.add_api_key("k");
    let id = emu.create_secret(
        "app-config",
        "kv",
        json!({"client_secret": "old-value-0000000000", "client_id": "ai-component"}),
    );
    let target: IbmSecretsManagerTarget = serde_json::from_value(json!({
        "serviceUrl": emu.url, "iamUrl": emu.url, "secretName": "app-config", "secretType": "kv",
        "key": "client_secret", "apiKeySecretRef": {"name": "x", "key": "y"}
    }))
    .unwrap();
    let store = ibm_store(&target, "k");
    store.preflight().await.unwrap();
    let new = SecretValue::new(common::canary("kv"));
    store.write(&new, "rot-kv").await.unwrap();
    let data = emu
        .secret(&id)
        .versions
        .last()
        .unwrap()
        .payload
        .clone()
        .unwrap();
    assert_eq!(data["client_secret"], new.expose());
    assert_eq!(data["client_id"], "ai-component", "other keys are kept");
}

pub(crate) fn aws_client(c: &Cluster) -> Aws {
    rekey::install_crypto_provider();
    let config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(AWS_KEY, AWS_SECRET, None, None, "test"))
        .endpoint_url(c.moto_url.clone().unwrap())
        .build();
    Aws::from_conf(config)
}

fn aws_target(c: &Cluster, secret_id: &str) -> AwsSecretsManagerTarget {
    AwsSecretsManagerTarget {
        region: "us-east-1".into(),
        secret_id: secret_id.into(),
        key: None,
        credentials_secret_ref: Some(LocalSecretRef {
            name: "aws-creds".into(),
        }),
        service_account_ref: None,
        role_arn: None,
        endpoint: c.moto_url.clone(),
        sts_endpoint: None,
    }
}

fn aws_store(target: &AwsSecretsManagerTarget) -> AwsSecretsManagerStore {
    AwsSecretsManagerStore::new(
        rekey::metrics::Metrics::new(),
        target,
        SecretValue::new(AWS_KEY),
        SecretValue::new(AWS_SECRET),
        None,
    )
}

pub(crate) async fn aws_stages(aws: &Aws, id: &str) -> Vec<(String, Vec<String>)> {
    let d = aws.describe_secret().secret_id(id).send().await.unwrap();
    let mut v: Vec<(String, Vec<String>)> = d
        .version_ids_to_stages
        .unwrap_or_default()
        .into_iter()
        .collect();
    v.sort();
    v
}

fn holding(stages: &[(String, Vec<String>)], label: &str) -> Option<String> {
    stages
        .iter()
        .find(|(_, s)| s.iter().any(|l| l == label))
        .map(|(v, _)| v.clone())
}

#[tokio::test]
async fn aws_store_follows_the_staging_label_model_on_moto() {
    let c = common::cluster();
    let aws = aws_client(c);
    let name = format!("store-test-{}", rand::random::<u32>());
    let old = common::canary("old");
    aws.create_secret()
        .name(&name)
        .secret_string(&old)
        .send()
        .await
        .unwrap();
    let old_version = holding(&aws_stages(&aws, &name).await, "AWSCURRENT").unwrap();
    let store = aws_store(&aws_target(c, &name));
    store.preflight().await.unwrap();
    assert_eq!(store.read_current().await.unwrap().unwrap().expose(), old);

    let new = SecretValue::new(common::canary("new"));
    let v1 = store.write(&new, "20261125-120000-abcdef01").await.unwrap();
    let v2 = store.write(&new, "20261125-120000-abcdef01").await.unwrap();
    assert_eq!(v1, v2);
    assert_eq!(
        v1,
        rekey::store::aws::version_id("20261125-120000-abcdef01")
    );
    let stages = aws_stages(&aws, &name).await;
    assert_eq!(stages.len(), 2, "exactly one new version: {stages:?}");
    assert_eq!(holding(&stages, "AWSCURRENT"), Some(v1.clone()));
    assert_eq!(holding(&stages, "AWSPREVIOUS"), Some(old_version.clone()));
    assert_eq!(
        holding(&stages, "AWSPENDING"),
        None,
        "AWSPENDING is cleared once current"
    );
    let got = aws
        .get_secret_value()
        .secret_id(&name)
        .version_stage("AWSCURRENT")
        .send()
        .await
        .unwrap();
    assert_eq!(got.secret_string.as_deref(), Some(new.expose()));

    // Rollback moves AWSCURRENT back; a second restore changes nothing.
    assert_eq!(
        store
            .restore(&SecretValue::new(old.clone()), "20261125-120000-abcdef01")
            .await
            .unwrap(),
        old_version
    );
    assert_eq!(
        store
            .restore(&SecretValue::new(old.clone()), "20261125-120000-abcdef01")
            .await
            .unwrap(),
        old_version
    );
    let got = aws
        .get_secret_value()
        .secret_id(&name)
        .version_stage("AWSCURRENT")
        .send()
        .await
        .unwrap();
    assert_eq!(got.secret_string.as_deref(), Some(old.as_str()));
    assert_eq!(aws_stages(&aws, &name).await.len(), 2);

    // JSON key mode keeps the other keys.
    let json_name = format!("{name}-json");
    aws.create_secret()
        .name(&json_name)
        .secret_string(r#"{"client_id":"ai","client_secret":"old-old-old-old-old"}"#)
        .send()
        .await
        .unwrap();
    let mut t = aws_target(c, &json_name);
    t.key = Some("client_secret".into());
    let store = aws_store(&t);
    store.write(&new, "20261125-120001-abcdef02").await.unwrap();
    let got: Value = serde_json::from_str(
        &aws.get_secret_value()
            .secret_id(&json_name)
            .version_stage("AWSCURRENT")
            .send()
            .await
            .unwrap()
            .secret_string
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        got,
        json!({"client_id": "ai", "client_secret": new.expose()})
    );

    let err = aws_store(&aws_target(c, "does-not-exist"))
        .preflight()
        .await
        .unwrap_err();
    assert_eq!(err.reason.as_str(), "AwsSecretNotFound");
}

/// SecretStore `aws` (ESO's AWS provider, which the harness points at moto).
pub(crate) async fn aws_secret_store(client: &Client, ns: &str) {
    put_secret(
        client,
        ns,
        "aws-creds",
        json!({"AWS_ACCESS_KEY_ID": AWS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}),
    )
    .await;
    create_eso_object(client, ns, json!({
        "kind": "SecretStore", "metadata": {"name": "aws"},
        "spec": {"provider": {"aws": {"service": "SecretsManager", "region": "us-east-1", "auth": {"secretRef": {
            "accessKeyIDSecretRef": {"name": "aws-creds", "key": "AWS_ACCESS_KEY_ID"},
            "secretAccessKeySecretRef": {"name": "aws-creds", "key": "AWS_SECRET_ACCESS_KEY"}}}}}}
    }))
    .await;
}

/// SecretStore `ibm` (ESO's IBM provider). ESO v0.16.2 ignores an IAM URL for
/// API-key auth, so ESO authenticates with containerAuth (a trusted-profile
/// compute-resource token read from a file), whose `iamEndpoint` it honours.
pub(crate) async fn ibm_secret_store(c: &Cluster, client: &Client, ns: &str, emu: &IbmEmulator) {
    let token = common::canary("cr-token");
    emu.add_cr_token(&token);
    let path = c.dir.join(format!("ibm-cr-token-{ns}"));
    std::fs::write(&path, &token).unwrap();
    create_eso_object(client, ns, json!({
        "kind": "SecretStore", "metadata": {"name": "ibm"},
        "spec": {"provider": {"ibm": {"serviceUrl": emu.url, "auth": {"containerAuth": {
            "profile": "rekey-eso", "tokenLocation": path.display().to_string(), "iamEndpoint": emu.url}}}}}
    }))
    .await;
}

async fn wait_synced(client: &Client, ns: &str, es: &str, value: &str) {
    common::wait_for(
        &format!("{es} holds the value"),
        Duration::from_secs(60),
        || async { read_key(client, ns, es, "client_secret").await.as_deref() == Some(value) },
    )
    .await;
}

/// dev-stage in IBM Secrets Manager, prod in AWS Secrets Manager; each read by
/// ESO into its own Secret, consumed by its own Deployment.
struct MultiScene {
    emu: IbmEmulator,
    ibm_id: String,
    aws_name: String,
    aws: Aws,
}

async fn multi_scene(
    c: &Cluster,
    client: &Client,
    ns: &str,
    dev_old: &str,
    prod_old: &str,
) -> MultiScene {
    install_crd(c);
    let emu = IbmEmulator::start().await;
    let api_key = common::canary("ibm-api-key");
    emu.add_api_key(&api_key);
    put_secret(client, ns, "ibm-api-key", json!({"apikey": api_key})).await;
    let ibm_id = emu.create_secret("ai-component-dev-stage", "arbitrary", json!(dev_old));
    let aws = aws_client(c);
    let aws_name = format!("{ns}/ai-component");
    aws.create_secret()
        .name(&aws_name)
        .secret_string(prod_old)
        .send()
        .await
        .unwrap();
    ibm_secret_store(c, client, ns, &emu).await;
    aws_secret_store(client, ns).await;
    external_secret_from(client, ns, "dev-creds", "ibm", json!({"key": ibm_id}), "1h").await;
    external_secret_from(
        client,
        ns,
        "prod-creds",
        "aws",
        json!({"key": aws_name}),
        "1h",
    )
    .await;
    wait_synced(client, ns, "dev-creds", dev_old).await;
    wait_synced(client, ns, "prod-creds", prod_old).await;
    deployment(client, ns, "dev-app", 1, "dev-creds").await;
    deployment(client, ns, "prod-app", 2, "prod-creds").await;
    common::wait_for("apps available", LONG, || async {
        deployment_available(client, ns, "dev-app").await
            && deployment_available(client, ns, "prod-app").await
    })
    .await;
    MultiScene {
        emu,
        ibm_id,
        aws_name,
        aws,
    }
}

fn multi_spec(c: &Cluster, s: &MultiScene, credential: Value) -> Value {
    json!({
        "credential": credential,
        "oldValueValidFor": "30m",
        "targets": [
            {"name": "prod", "awsSecretsManager": {"region": "us-east-1", "secretId": s.aws_name,
                "credentialsSecretRef": {"name": "aws-creds"}, "endpoint": c.moto_url}},
            {"name": "dev-stage", "ibmSecretsManager": {"serviceUrl": s.emu.url, "secretId": s.ibm_id, "iamUrl": s.emu.url,
                "apiKeySecretRef": {"name": "ibm-api-key", "key": "apikey"}}}
        ],
        "proof": {
            "externalSecrets": [{"name": "dev-creds", "key": "client_secret"}, {"name": "prod-creds", "key": "client_secret"}],
            "workloads": [{"kind": "Deployment", "name": "dev-app"}, {"kind": "Deployment", "name": "prod-app"}],
            "timeout": "60s"
        },
        "onFailure": "Rollback"
    })
}

#[tokio::test]
async fn ibm_and_aws_targets_rotate_together_through_eso() {
    let (c, client, ns) = common::setup("multi").await;
    let (dev_old, prod_old) = (common::canary("dev-old"), common::canary("prod-old"));
    let s = multi_scene(c, &client, &ns, &dev_old, &prod_old).await;
    let op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        "ai-component",
        multi_spec(c, &s, json!({"generated": {}})),
    )
    .await;
    let sr = wait_phase(&client, &ns, "ai-component", Phase::Succeeded, LONG).await;

    let new = read_key(&client, &ns, "dev-creds", "client_secret")
        .await
        .unwrap();
    assert_ne!(new, dev_old);
    assert_eq!(
        read_key(&client, &ns, "prod-creds", "client_secret")
            .await
            .unwrap(),
        new,
        "both ESO syncs deliver the new value"
    );
    // Status shows each target's version id, as the stores know them.
    let last = sr.status.unwrap().last_rotation.unwrap();
    let version = |t: &str| {
        last.targets
            .iter()
            .find(|x| x.name == t)
            .unwrap()
            .version
            .clone()
    };
    assert_eq!(
        version("dev-stage"),
        s.emu.secret(&s.ibm_id).versions.last().unwrap().id
    );
    assert_eq!(
        Some(version("prod")),
        holding(&aws_stages(&s.aws, &s.aws_name).await, "AWSCURRENT")
    );
    assert_eq!(s.emu.secret(&s.ibm_id).versions.len(), 2, "one IBM version");
    assert_eq!(
        aws_stages(&s.aws, &s.aws_name).await.len(),
        2,
        "one AWS version"
    );
    assert_eq!(revisions(&client, &ns, "dev-app").await, 2);
    assert_eq!(revisions(&client, &ns, "prod-app").await, 2);
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&dev_old, &prod_old, &new],
    )
    .await;
}

/// A store that answers 500, 429 and 503 for a while: the operator retries
/// with a growing, jittered delay, says so in the Rotating condition, and
/// once the store answers again writes exactly one new version per store.
#[tokio::test]
async fn a_store_failing_for_a_while_is_retried_with_backoff_and_written_once() {
    let (c, client, ns) = common::setup("flaky").await;
    let (dev_old, prod_old) = (common::canary("dev-old"), common::canary("prod-old"));
    let s = multi_scene(c, &client, &ns, &dev_old, &prod_old).await;
    let op = Operator::start(REKEY, c, &ns);
    s.emu.state.lock().unwrap().fail_next_writes = vec![500, 429, 503, 500];
    create_rotation(
        &client,
        &ns,
        "ai-component",
        multi_spec(c, &s, json!({"generated": {}})),
    )
    .await;
    // The condition says what is happening while it happens.
    let said = std::sync::Mutex::new(String::new());
    common::wait_for(
        "the Rotating condition to report the retries",
        LONG,
        || async {
            let sr = get_rotation(&client, &ns, "ai-component").await;
            let message = sr
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Rotating"))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            let seen = message.contains("retrying after error (attempt 3");
            if seen {
                *said.lock().unwrap() = message;
            }
            seen
        },
    )
    .await;
    let said = said.into_inner().unwrap();
    assert!(said.contains("IbmSecretsManagerError"), "{said}");
    wait_phase(&client, &ns, "ai-component", Phase::Succeeded, LONG).await;
    assert!(s.emu.state.lock().unwrap().fail_next_writes.is_empty());
    // Four refusals, then one write: the attempts spread out (1-2 s, then
    // 2-4 s, 4-8 s, 8-16 s; only a generous lower bound is asserted).
    let writes: Vec<std::time::Instant> = {
        let st = s.emu.state.lock().unwrap();
        st.calls
            .iter()
            .zip(&st.call_times)
            .filter(|(call, _)| call.starts_with("POST") && call.ends_with("/versions"))
            .map(|(_, at)| *at)
            .collect()
    };
    assert_eq!(writes.len(), 5, "four refused writes and one accepted");
    let spread = writes[4].duration_since(writes[0]);
    assert!(
        spread >= Duration::from_secs(7),
        "retries backed off: {spread:?}"
    );
    assert_eq!(s.emu.secret(&s.ibm_id).versions.len(), 2, "one IBM version");
    assert_eq!(
        aws_stages(&s.aws, &s.aws_name).await.len(),
        2,
        "one AWS version"
    );
    assert_eq!(revisions(&client, &ns, "dev-app").await, 2, "one rollout");
    let new = read_key(&client, &ns, "dev-creds", "client_secret")
        .await
        .unwrap();
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&dev_old, &prod_old, &new],
    )
    .await;
}

/// A store that does not answer at all for a while (a partition: moto
/// behind a paused proxy, connections accepted and held): each call gives up
/// after a bounded time, the condition says the store timed out, and once
/// it answers again the rotation writes exactly one version per store.
#[tokio::test]
async fn a_store_that_does_not_answer_for_a_while_times_out_and_is_written_once() {
    let (c, client, ns) = common::setup("silent").await;
    let (dev_old, prod_old) = (common::canary("dev-old"), common::canary("prod-old"));
    let s = multi_scene(c, &client, &ns, &dev_old, &prod_old).await;
    let moto: std::net::SocketAddr = c
        .moto_url
        .as_deref()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = common::proxy::PausableProxy::start(moto).await;
    let mut spec = multi_spec(c, &s, json!({"generated": {}}));
    spec["targets"][0]["awsSecretsManager"]["endpoint"] = json!(format!("http://{}", proxy.addr));
    proxy.pause();
    let op = Operator::start(REKEY, c, &ns);
    let started = std::time::Instant::now();
    create_rotation(&client, &ns, "ai-component", spec).await;
    let said = std::sync::Mutex::new(String::new());
    common::wait_for(
        "the condition names the store's timeout",
        Duration::from_secs(150),
        || async {
            let sr = get_rotation(&client, &ns, "ai-component").await;
            let message = sr
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Rotating"))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            let seen = message.contains("retrying after error") && message.contains("timed out");
            if seen {
                *said.lock().unwrap() = message;
            }
            seen
        },
    )
    .await;
    println!(
        "store silent: the first timeout was reported after {:?}: {}",
        started.elapsed(),
        said.lock().unwrap()
    );
    assert!(said.lock().unwrap().contains("AwsSecretsManagerError"));
    proxy.resume(true);
    wait_phase(&client, &ns, "ai-component", Phase::Succeeded, LONG).await;
    assert_eq!(
        aws_stages(&s.aws, &s.aws_name).await.len(),
        2,
        "one AWS version"
    );
    assert_eq!(s.emu.secret(&s.ibm_id).versions.len(), 2, "one IBM version");
    assert_eq!(revisions(&client, &ns, "prod-app").await, 2, "one rollout");
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&dev_old, &prod_old],
    )
    .await;
}

#[tokio::test]
async fn a_target_that_cannot_be_written_fails_the_rotation_and_rolls_back_the_other() {
    let (c, client, ns) = common::setup("multifail").await;
    let (dev_old, prod_old) = (common::canary("dev-old"), common::canary("prod-old"));
    let s = multi_scene(c, &client, &ns, &dev_old, &prod_old).await;
    // dev-stage has two versions, the previous one locked: writing answers 412.
    s.emu
        .state
        .lock()
        .unwrap()
        .secrets
        .get_mut(&s.ibm_id)
        .unwrap()
        .versions
        .insert(
            0,
            common::ibm::Version {
                id: "0d1e2f3a-0000-4000-a000-000000000001".into(),
                created_at: "2026-01-01T00:00:00Z".into(),
                payload: Some(json!("older-value-0000000")),
                custom_metadata: json!({}),
                locks: vec!["audit-hold".into()],
            },
        );
    let (url, log) = webhook(&client, &ns).await;
    let op = Operator::start(REKEY, c, &ns);
    let spec = multi_spec(c, &s, webhook_credential(&url));
    create_rotation(&client, &ns, "ai-component", spec).await;
    let sr = wait_phase(&client, &ns, "ai-component", Phase::Failed, LONG).await;

    let last = sr.status.unwrap().last_rotation.unwrap();
    let failure = last.failure.clone().unwrap();
    assert_eq!(
        (failure.reason.as_str(), failure.phase),
        ("IbmSecretLocked", Phase::Writing)
    );
    assert!(failure.message.contains("dev-stage"), "{}", failure.message);
    assert!(last.rolled_back);
    assert_eq!(
        *log.lock().unwrap(),
        0,
        "the old value was never invalidated"
    );
    // prod was written first, then rolled back: AWSCURRENT holds the old value again.
    let got = s
        .aws
        .get_secret_value()
        .secret_id(&s.aws_name)
        .version_stage("AWSCURRENT")
        .send()
        .await
        .unwrap();
    assert_eq!(got.secret_string.as_deref(), Some(prod_old.as_str()));
    let stages = aws_stages(&s.aws, &s.aws_name).await;
    assert_eq!(
        stages.len(),
        2,
        "rollback moved AWSCURRENT back instead of writing a third version: {stages:?}"
    );
    assert_eq!(
        read_key(&client, &ns, "prod-creds", "client_secret")
            .await
            .as_deref(),
        Some(prod_old.as_str())
    );
    assert_eq!(
        s.emu.secret(&s.ibm_id).versions.len(),
        2,
        "no IBM version was created"
    );
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&dev_old, &prod_old],
    )
    .await;
}

/// A webhook source that counts invalidate calls.
async fn webhook(_client: &Client, _ns: &str) -> (String, std::sync::Arc<std::sync::Mutex<usize>>) {
    use axum::routing::post;
    let invalidated = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let value = common::canary("webhook-new");
    let counter = invalidated.clone();
    let app = axum::Router::new()
        .route(
            "/issue",
            post(move || async move { axum::Json(json!({"value": value})) }),
        )
        .route(
            "/invalidate",
            post(move || async move {
                *counter.lock().unwrap() += 1;
                "ok"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, invalidated)
}

// Workload identity (issue 15, item 2): a ServiceAccount of the
// SecretRotation's namespace instead of static keys.

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/rekey-ai-component";

/// A clock the AWS SDK reads (identity cache, signing); the test moves it.
#[derive(Clone, Debug)]
struct Clock(std::sync::Arc<std::sync::Mutex<std::time::SystemTime>>);

impl Clock {
    fn now() -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(
            std::time::SystemTime::now(),
        )))
    }
    fn set(&self, t: std::time::SystemTime) {
        *self.0.lock().unwrap() = t;
    }
}

impl aws_smithy_async::time::TimeSource for Clock {
    fn now(&self) -> std::time::SystemTime {
        *self.0.lock().unwrap()
    }
}

async fn service_account(client: &Client, ns: &str, name: &str) {
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    kube::Api::namespaced(client.clone(), ns)
        .create(&kube::api::PostParams::default(), &sa)
        .await
        .unwrap();
}

/// Checks one AssumeRoleWithWebIdentity rekey sent: the role of the spec,
/// and a genuine token of ServiceAccount `ns/sa` for STS (its claims, and a
/// TokenReview by the API server). Returns the token.
async fn assert_web_identity_call(
    client: &Client,
    call: &common::recorder::Exchange,
    ns: &str,
    sa: &str,
) -> String {
    assert_eq!(call.form("RoleArn").as_deref(), Some(ROLE_ARN));
    let token = call.form("WebIdentityToken").expect("a web identity token");
    let claims = jwt_claims(&token);
    let subject = format!("system:serviceaccount:{ns}:{sa}");
    assert_eq!(claims["sub"], json!(subject), "{claims}");
    assert!(
        claims["aud"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("sts.amazonaws.com"))),
        "{claims}"
    );
    assert_eq!(
        token_review(client, &token, "sts.amazonaws.com")
            .await
            .as_deref(),
        Some(subject.as_str()),
        "the API server vouches for the token"
    );
    assert_eq!(call.status, 200, "{}", call.response);
    token
}

fn web_identity_target(proxy: &Recorder, secret_id: &str, sa: &str) -> rekey::plan::TargetPlan {
    rekey::plan::TargetPlan {
        name: "prod".into(),
        store: rekey::plan::StorePlan::AwsSecretsManager(AwsSecretsManagerTarget {
            region: "us-east-1".into(),
            secret_id: secret_id.into(),
            key: None,
            credentials_secret_ref: None,
            service_account_ref: Some(ServiceAccountRef { name: sa.into() }),
            role_arn: Some(ROLE_ARN.into()),
            endpoint: Some(proxy.url.clone()),
            sts_endpoint: Some(proxy.url.clone()),
        }),
    }
}

/// STS's answer: when the assumed credentials expire.
fn expiration(call: &common::recorder::Exchange) -> std::time::SystemTime {
    let text = call.response_xml("Expiration").expect("an Expiration");
    let ts: jiff::Timestamp = text.parse().expect("an RFC 3339 time");
    std::time::SystemTime::from(ts)
}

#[tokio::test]
async fn aws_web_identity_credentials_are_shared_across_reconciles_and_refreshed_before_expiry() {
    let (c, client, ns) = common::setup("aws-wi").await;
    service_account(&client, &ns, "rotator").await;
    let proxy = Recorder::start(c.moto_url.as_deref().unwrap()).await;
    let aws = aws_client(c);
    let name = format!("{ns}/ai-component");
    let old = common::canary("old");
    aws.create_secret()
        .name(&name)
        .secret_string(&old)
        .send()
        .await
        .unwrap();
    let clock = Clock::now();
    let deps = rekey::deps::Deps::new(client.clone(), rekey::metrics::Metrics::new())
        .with_aws_time_source(aws_smithy_async::time::SharedTimeSource::new(clock.clone()));
    let target = web_identity_target(&proxy, &name, "rotator");

    // The first call assumes the role with a token of the named ServiceAccount.
    let store = rekey::store::build(&target, &deps, &ns, "ai-component")
        .await
        .unwrap();
    assert_eq!(store.read_current().await.unwrap().unwrap().expose(), old);
    let sts = proxy.action("AssumeRoleWithWebIdentity");
    assert_eq!(sts.len(), 1);
    let first_token = assert_web_identity_call(&client, &sts[0], &ns, "rotator").await;
    let first_key = sts[0].response_xml("AccessKeyId").unwrap();
    let expires = expiration(&sts[0]);
    assert!(
        expires
            .duration_since(std::time::SystemTime::now())
            .unwrap()
            > Duration::from_secs(900),
        "a session of at least 15 minutes"
    );
    let signed: Vec<_> = proxy
        .all()
        .iter()
        .filter(|e| e.aws_action().as_deref() == Some("GetSecretValue"))
        .map(|e| e.access_key_id())
        .collect();
    assert_eq!(
        signed,
        vec![Some(first_key.clone())],
        "signed with the assumed keys"
    );

    // A new store (the next reconcile), until the refresh margin before
    // expiry: the same session.
    let margin = rekey::deps::AWS_REFRESH_BEFORE_EXPIRY;
    clock.set(expires - margin - Duration::from_secs(1));
    let store = rekey::store::build(&target, &deps, &ns, "ai-component")
        .await
        .unwrap();
    store.preflight().await.unwrap();
    assert_eq!(
        proxy.action("AssumeRoleWithWebIdentity").len(),
        1,
        "credentials are cached across reconciles"
    );

    // Inside the margin (the SDK refreshes at a jittered point in its last
    // half at the latest): a new token, a new session, before the old one
    // lapses.
    clock.set(expires - margin / 2 + Duration::from_secs(1));
    let store = rekey::store::build(&target, &deps, &ns, "ai-component")
        .await
        .unwrap();
    assert_eq!(store.read_current().await.unwrap().unwrap().expose(), old);
    let sts = proxy.action("AssumeRoleWithWebIdentity");
    assert_eq!(sts.len(), 2, "refreshed once");
    // moto stamps the new session's expiry by its own (real) clock: back to
    // it, the new session has its full hour ahead.
    clock.set(std::time::SystemTime::now());
    let new = SecretValue::new(common::canary("new"));
    let version = store.write(&new, "20261125-120000-abcdef01").await.unwrap();
    assert_eq!(proxy.action("AssumeRoleWithWebIdentity").len(), 2);
    let second_token = assert_web_identity_call(&client, &sts[1], &ns, "rotator").await;
    assert_ne!(first_token, second_token, "a new TokenRequest");
    let second_key = sts[1].response_xml("AccessKeyId").unwrap();
    assert_ne!(first_key, second_key);
    let put = proxy.action("PutSecretValue");
    assert_eq!(put.len(), 1);
    assert_eq!(put[0].access_key_id(), Some(second_key));
    let got = aws
        .get_secret_value()
        .secret_id(&name)
        .version_stage("AWSCURRENT")
        .send()
        .await
        .unwrap();
    assert_eq!(got.secret_string.as_deref(), Some(new.expose()));
    assert_eq!(got.version_id.as_deref(), Some(version.as_str()));

    // A ServiceAccount that does not exist: a clear, permanent failure that
    // names it; nothing falls back to another identity.
    let missing = web_identity_target(&proxy, &name, "nobody");
    let err = rekey::store::build(&missing, &deps, &ns, "ai-component")
        .await
        .unwrap()
        .read_current()
        .await
        .unwrap_err();
    assert_eq!(
        (err.reason.as_str(), err.permanent),
        ("KubernetesApiError", true),
        "{err}"
    );
    assert!(err.message.contains(&format!("{ns}/nobody")), "{err}");
    assert_eq!(proxy.action("AssumeRoleWithWebIdentity").len(), 2);
}

fn trusted_profile_target(emu: &IbmEmulator, secret_id: &str, sa: &str) -> rekey::plan::TargetPlan {
    rekey::plan::TargetPlan {
        name: "dev-stage".into(),
        store: rekey::plan::StorePlan::IbmSecretsManager(
            serde_json::from_value(json!({
                "serviceUrl": emu.url, "secretId": secret_id, "iamUrl": emu.url,
                "trustedProfile": {"profileId": "Profile-rekey", "serviceAccountRef": {"name": sa}}
            }))
            .unwrap(),
        ),
    }
}

/// Checks the cr-token grants of trusted profile `Profile-rekey`: each a
/// genuine token of ServiceAccount `ns/sa` for audience `iam`, granted.
/// Returns the tokens.
async fn assert_trusted_profile_grants(
    client: &Client,
    emu: &IbmEmulator,
    ns: &str,
    sa: &str,
) -> Vec<String> {
    let subject = format!("system:serviceaccount:{ns}:{sa}");
    let mut tokens = vec![];
    for r in emu
        .cr_token_requests()
        .into_iter()
        .filter(|r| r.profile_id.as_deref() == Some("Profile-rekey"))
    {
        assert!(r.granted, "IAM granted the profile");
        let claims = jwt_claims(&r.cr_token);
        assert_eq!(claims["sub"], json!(subject), "{claims}");
        assert_eq!(
            token_review(client, &r.cr_token, "iam").await.as_deref(),
            Some(subject.as_str()),
            "the API server vouches for the cr_token"
        );
        tokens.push(r.cr_token);
    }
    tokens
}

#[tokio::test]
async fn ibm_trusted_profile_exchanges_a_service_account_token_and_shares_the_iam_token() {
    let (_c, client, ns) = common::setup("ibm-tp").await;
    service_account(&client, &ns, "rotator").await;
    service_account(&client, &ns, "stranger").await;
    let emu = IbmEmulator::start().await;
    emu.link_profile("Profile-rekey", &ns, "rotator");
    let old = common::canary("old");
    let id = emu.create_secret("ai-component", "arbitrary", json!(old));
    let deps = rekey::deps::Deps::new(client.clone(), rekey::metrics::Metrics::new());
    let target = trusted_profile_target(&emu, &id, "rotator");

    // Two stores (two reconciles): one cr-token grant, one IAM token.
    let store = rekey::store::build(&target, &deps, &ns, "ai-component")
        .await
        .unwrap();
    assert_eq!(store.preflight().await.unwrap().unwrap().expose(), old);
    let new = SecretValue::new(common::canary("new"));
    let store = rekey::store::build(&target, &deps, &ns, "ai-component")
        .await
        .unwrap();
    store.write(&new, "rot-1").await.unwrap();
    assert_eq!(emu.secret(&id).versions.len(), 2);
    let tokens = assert_trusted_profile_grants(&client, &emu, &ns, "rotator").await;
    assert_eq!(tokens.len(), 1, "the IAM token is cached across reconciles");

    // A ServiceAccount the profile does not trust: IAM refuses, permanently,
    // and the message says which identity without showing a token.
    let err = rekey::store::build(
        &trusted_profile_target(&emu, &id, "stranger"),
        &deps,
        &ns,
        "ai-component",
    )
    .await
    .unwrap()
    .read_current()
    .await
    .unwrap_err();
    assert_eq!(
        (err.reason.as_str(), err.permanent),
        ("IbmCredentialsRejected", true),
        "{err}"
    );
    assert!(err.message.contains(&format!("{ns}/stranger")), "{err}");
    let refused = emu.cr_token_requests().last().unwrap().clone();
    assert!(!refused.granted);
    assert!(!err.message.contains(&refused.cr_token));
}

#[tokio::test]
async fn ibm_and_aws_targets_rotate_with_workload_identity_through_eso() {
    let (c, client, ns) = common::setup("multi-wi").await;
    let (dev_old, prod_old) = (common::canary("dev-old"), common::canary("prod-old"));
    let s = multi_scene(c, &client, &ns, &dev_old, &prod_old).await;
    service_account(&client, &ns, "rotator").await;
    s.emu.link_profile("Profile-rekey", &ns, "rotator");
    let proxy = Recorder::start(c.moto_url.as_deref().unwrap()).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = multi_spec(c, &s, json!({"generated": {}}));
    spec["targets"] = json!([
        {"name": "prod", "awsSecretsManager": {"region": "us-east-1", "secretId": s.aws_name,
            "serviceAccountRef": {"name": "rotator"}, "roleArn": ROLE_ARN,
            "endpoint": proxy.url, "stsEndpoint": proxy.url}},
        {"name": "dev-stage", "ibmSecretsManager": {"serviceUrl": s.emu.url, "secretId": s.ibm_id, "iamUrl": s.emu.url,
            "trustedProfile": {"profileId": "Profile-rekey", "serviceAccountRef": {"name": "rotator"}}}}
    ]);
    create_rotation(&client, &ns, "ai-component", spec).await;
    wait_phase(&client, &ns, "ai-component", Phase::Succeeded, LONG).await;
    let new = read_key(&client, &ns, "dev-creds", "client_secret")
        .await
        .unwrap();
    assert_ne!(new, dev_old);
    assert_eq!(
        read_key(&client, &ns, "prod-creds", "client_secret")
            .await
            .unwrap(),
        new,
        "both ESO syncs deliver the new value"
    );

    // AWS: one AssumeRoleWithWebIdentity for the whole rotation, with a
    // genuine token of the named ServiceAccount and the spec's role; every
    // Secrets Manager call signed with the assumed keys, none with others.
    let sts = proxy.action("AssumeRoleWithWebIdentity");
    assert_eq!(sts.len(), 1, "one session for the whole rotation");
    let aws_token = assert_web_identity_call(&client, &sts[0], &ns, "rotator").await;
    let assumed_key = sts[0].response_xml("AccessKeyId").unwrap();
    let sm: Vec<_> = proxy
        .all()
        .into_iter()
        .filter(|e| e.header("x-amz-target").is_some())
        .collect();
    assert!(
        sm.iter()
            .any(|e| e.aws_action().as_deref() == Some("PutSecretValue"))
    );
    for e in &sm {
        assert_eq!(
            e.access_key_id(),
            Some(assumed_key.clone()),
            "{:?}",
            e.aws_action()
        );
    }
    // IBM: one cr-token grant of the trusted profile for the rotation.
    let ibm_tokens = assert_trusted_profile_grants(&client, &s.emu, &ns, "rotator").await;
    assert_eq!(ibm_tokens.len(), 1);
    assert_eq!(s.emu.secret(&s.ibm_id).versions.len(), 2, "one IBM version");

    let secret_key = sts[0].response_xml("SecretAccessKey").unwrap();
    let session = sts[0].response_xml("SessionToken").unwrap();
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[
            &dev_old,
            &prod_old,
            &new,
            &aws_token,
            &ibm_tokens[0],
            &secret_key,
            &session,
        ],
    )
    .await;
}
