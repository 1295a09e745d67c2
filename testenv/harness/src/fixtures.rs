//! Objects the rotation tests build on: the rekey CRD, an ESO SecretStore that
//! reads Secrets from the test namespace through the real API server, an
//! ExternalSecret, a Deployment consuming it, and SecretRotations.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};
use rekey::crd::{Phase, SecretRotation};
use serde_json::{Value, json};

use super::cluster::{Cluster, repo_root};

/// Applies crds/secretrotation.yaml (once per cluster) and waits for it.
pub fn install_crd(c: &Cluster) {
    c.crd.call_once(|| {
        let path = repo_root().join("crds/secretrotation.yaml");
        c.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &path.display().to_string(),
        ])
        .unwrap();
        c.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/secretrotations.rekey.dev",
        ])
        .unwrap();
    });
}

pub fn es_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("external-secrets.io", "v1", kind))
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub async fn put_secret(client: &Client, ns: &str, name: &str, data: Value) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data});
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
}

pub async fn read_key(client: &Client, ns: &str, name: &str, key: &str) -> Option<String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get_opt(name).await.unwrap()?;
    s.data?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

/// A SecretStore named `cluster-secrets` whose kubernetes provider reads
/// Secrets of `ns` through the real API server with a client certificate.
pub async fn kubernetes_secret_store(c: &Cluster, client: &Client, ns: &str) {
    put_secret(
        client,
        ns,
        "eso-auth",
        json!({"tls.crt": c.admin_cert_pem, "tls.key": c.admin_key_pem}),
    )
    .await;
    create_eso_object(
        client,
        ns,
        json!({
            "kind": "SecretStore",
            "metadata": {"name": "cluster-secrets"},
            "spec": {"provider": {"kubernetes": {
                "remoteNamespace": ns,
                "server": {"url": c.api_url, "caBundle": b64(&c.ca_pem)},
                "auth": {"cert": {
                    "clientCert": {"name": "eso-auth", "key": "tls.crt"},
                    "clientKey": {"name": "eso-auth", "key": "tls.key"}
                }}
            }}}
        }),
    )
    .await;
}

/// Creates an external-secrets.io/v1 object (`kind` taken from `object`).
pub async fn create_eso_object(client: &Client, ns: &str, mut object: Value) {
    object["apiVersion"] = json!("external-secrets.io/v1");
    let kind = object["kind"].as_str().unwrap().to_string();
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &es_resource(&kind))
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// An ExternalSecret `name` reading `remote_ref` from SecretStore `store`
/// into key `client_secret` of its target Secret `name`.
pub async fn external_secret_from(
    client: &Client,
    ns: &str,
    name: &str,
    store: &str,
    remote_ref: Value,
    refresh_interval: &str,
) {
    create_eso_object(
        client,
        ns,
        json!({
            "kind": "ExternalSecret",
            "metadata": {"name": name},
            "spec": {
                "refreshInterval": refresh_interval,
                "secretStoreRef": {"kind": "SecretStore", "name": store},
                "target": {"name": name},
                "data": [{"secretKey": "client_secret", "remoteRef": remote_ref}]
            }
        }),
    )
    .await;
}

/// An ExternalSecret `name` whose target Secret `name` gets key
/// `client_secret` from Secret `source` key `client_secret`, through the
/// kubernetes SecretStore, refreshed hourly.
pub async fn external_secret(client: &Client, ns: &str, name: &str, source: &str) {
    external_secret_from(
        client,
        ns,
        name,
        "cluster-secrets",
        json!({"key": source, "property": "client_secret"}),
        "1h",
    )
    .await;
}

/// A Deployment whose containers read `secret` through an env var.
pub async fn deployment(client: &Client, ns: &str, name: &str, replicas: i32, secret: &str) {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "app", "image": "example.invalid/app:1",
                    "env": [{"name": "CLIENT_SECRET", "valueFrom": {"secretKeyRef": {"name": secret, "key": "client_secret"}}}]
                }]}
            }
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
}

pub async fn deployment_available(client: &Client, ns: &str, name: &str) -> bool {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let s = d.status.unwrap_or_default();
    s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && s.updated_replicas == Some(want)
        && s.ready_replicas == Some(want)
        && s.available_replicas == Some(want)
        && s.replicas == Some(want)
}

/// Number of ReplicaSets (template revisions) of a Deployment: 1 + rollouts.
pub async fn revisions(client: &Client, ns: &str, app: &str) -> usize {
    Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .len()
}

/// The usual scene: Secret `source` (key client_secret = `initial`) is the
/// store rekey writes; ExternalSecret `app-creds` syncs it; Deployment `app`
/// consumes it and is fully available.
pub async fn scene(c: &Cluster, client: &Client, ns: &str, initial: &str) {
    install_crd(c);
    put_secret(client, ns, "source", json!({"client_secret": initial})).await;
    kubernetes_secret_store(c, client, ns).await;
    external_secret(client, ns, "app-creds", "source").await;
    super::wait_for("initial ESO sync", Duration::from_secs(60), || async {
        read_key(client, ns, "app-creds", "client_secret")
            .await
            .as_deref()
            == Some(initial)
    })
    .await;
    deployment(client, ns, "app", 2, "app-creds").await;
    super::wait_for("app available", Duration::from_secs(90), || async {
        deployment_available(client, ns, "app").await
    })
    .await;
}

/// A SecretRotation spec for the usual scene, with `credential` as given.
pub fn rotation_spec(credential: Value) -> Value {
    json!({
        "credential": credential,
        "oldValueValidFor": "30m",
        "targets": [{"name": "main", "kubernetesSecret": {"name": "source", "key": "client_secret", "adoptExisting": true}}],
        "proof": {
            "externalSecrets": [{"name": "app-creds", "key": "client_secret"}],
            "workloads": [{"kind": "Deployment", "name": "app"}],
            "timeout": "60s"
        }
    })
}

pub async fn create_rotation(client: &Client, ns: &str, name: &str, spec: Value) -> SecretRotation {
    let sr: SecretRotation = serde_json::from_value(json!({
        "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    Api::<SecretRotation>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sr)
        .await
        .unwrap()
}

pub async fn get_rotation(client: &Client, ns: &str, name: &str) -> SecretRotation {
    Api::<SecretRotation>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

pub fn phase_of(sr: &SecretRotation) -> Option<Phase> {
    sr.status.as_ref().and_then(|s| s.phase)
}

/// Waits until the SecretRotation's phase is `want`, and returns it. Panics
/// early (with the status) when a rotation finished after this call with
/// another result. A terminal `want` that already holds returns at once.
pub async fn wait_phase(
    client: &Client,
    ns: &str,
    name: &str,
    want: Phase,
    timeout: Duration,
) -> SecretRotation {
    let start = std::time::Instant::now();
    let last_id = |sr: &SecretRotation| {
        sr.status
            .as_ref()
            .and_then(|s| s.last_rotation.as_ref())
            .map(|l| l.id.clone())
    };
    let before = last_id(&get_rotation(client, ns, name).await);
    loop {
        let sr = get_rotation(client, ns, name).await;
        let phase = phase_of(&sr);
        // A terminal phase counts once no rotation is in progress (it may
        // have finished before this call looked).
        let idle = sr.status.as_ref().is_none_or(|s| s.rotation.is_none());
        if phase == Some(want) && (!want.is_terminal() || idle) {
            return sr;
        }
        let finished_other = want.is_terminal()
            && last_id(&sr) != before
            && sr.status.as_ref().is_some_and(|s| s.rotation.is_none())
            && phase.is_some_and(|p| p.is_terminal() && p != want);
        if finished_other {
            panic!(
                "{name} ended {phase:?}, wanted {want:?}: {}",
                serde_json::to_string_pretty(&sr.status).unwrap()
            );
        }
        if start.elapsed() > timeout {
            panic!(
                "{name} not {want:?} after {timeout:?}: {}",
                serde_json::to_string_pretty(&sr.status).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn events(client: &Client, ns: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// Event reasons and notes of one object, oldest first.
pub async fn event_notes(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let mut evs: Vec<Event> = events(client, ns)
        .await
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .collect();
    evs.sort_by_key(|e| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.first_timestamp.as_ref().map(|t| t.0))
    });
    evs.into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Fails if any of `values` appears in the operator's log, in any Event of the
/// namespace, or in any SecretRotation's status or metadata.
pub async fn assert_never_leaked(
    client: &Client,
    ns: &str,
    logs: &str,
    metrics: &str,
    values: &[&str],
) {
    let events = serde_json::to_string(&events(client, ns).await).unwrap();
    let rotations = Api::<SecretRotation>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let rotations: Vec<Value> = rotations
        .items
        .iter()
        .map(|r| json!({"status": r.status, "annotations": r.annotations(), "labels": r.labels()}))
        .collect();
    let rotations = serde_json::to_string(&rotations).unwrap();
    assert!(
        !logs.is_empty(),
        "operator log is empty: the leak check would prove nothing"
    );
    for v in values {
        assert!(v.len() >= 16, "canary too short to be meaningful");
        assert!(
            !logs.contains(v),
            "a secret value leaked into the operator log"
        );
        assert!(!events.contains(v), "a secret value leaked into an Event");
        assert!(
            !rotations.contains(v),
            "a secret value leaked into SecretRotation status/metadata"
        );
        assert!(!metrics.contains(v), "a secret value leaked into metrics");
    }
}

pub async fn annotate_rotation(client: &Client, ns: &str, name: &str, key: &str, value: &str) {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    Api::<SecretRotation>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// A ResourceQuota that lets the namespace hold only `pods` pods: the surge
/// pod of any rollout is refused, so a new revision never becomes ready.
pub async fn block_new_pods(client: &Client, ns: &str, pods: u32) {
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "pods"}, "spec": {"hard": {"pods": pods.to_string()}}}),
    )
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
}

/// The `credential` of a webhook source served at `url` (/issue, /invalidate).
pub fn webhook_credential(url: &str) -> Value {
    json!({"webhook": {"issueUrl": format!("{url}/issue"), "invalidateUrl": format!("{url}/invalidate")}})
}

/// Creates a SecretRotation with a generated value for the usual scene and
/// waits until it succeeded.
pub async fn generated_rotation_succeeds(client: &Client, ns: &str, name: &str) -> SecretRotation {
    create_rotation(client, ns, name, rotation_spec(json!({"generated": {}}))).await;
    wait_phase(client, ns, name, Phase::Succeeded, Duration::from_secs(120)).await
}

/// A SecretRotation spec with a generated value for Secret `secret` (key
/// `k`) and nothing to prove: the cheapest complete rotation.
pub fn unproven_generated_spec(secret: &str) -> Value {
    json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [{"name": "main", "kubernetesSecret": {"name": secret, "key": "k"}}],
        "proof": {"nothingToProve": true}
    })
}

/// Waits until `ns` holds exactly `n` SecretRotations, all Succeeded.
pub async fn all_succeeded(client: &Client, ns: &str, n: usize, timeout: Duration) -> Duration {
    super::wait_for(
        &format!("{n} SecretRotations Succeeded"),
        timeout,
        || async {
            let all = Api::<SecretRotation>::namespaced(client.clone(), ns)
                .list(&Default::default())
                .await
                .unwrap()
                .items;
            all.len() == n && all.iter().all(|sr| phase_of(sr) == Some(Phase::Succeeded))
        },
    )
    .await
}
