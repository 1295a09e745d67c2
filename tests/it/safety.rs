//! The paths to an early invalidation, a lost value or a cross-tenant read,
//! each shown on the real environment (API server, ESO, kwok) with the
//! operator binary: deletion mid-rotation, Secrets rekey does not own,
//! Secrets in other namespaces.

use rekey_testenv as common;

use std::time::Duration;

use crate::REKEY;
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::core::v1::{ResourceQuota, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams};
use rekey::crd::{Phase, SecretRotation};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

async fn exists<K>(client: &Client, ns: &str, name: &str) -> bool
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .is_some()
}

/// A GitOps prune deletes the SecretRotation while its rotation waits for a
/// rollout. The rotation must reach its end (here: the proof completes once
/// pods can start) before the object and its write-ahead record go; the
/// new value is never dropped.
#[tokio::test]
async fn deletion_mid_rotation_finishes_the_rotation_first() {
    let (c, client, ns) = common::setup("finalizer").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    block_new_pods(&client, &ns, 2).await;
    let op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(json!({"generated": {}})),
    )
    .await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingRollout, LONG).await;
    let wal = rekey::wal::secret_name("app-secret");
    assert!(exists::<Secret>(&client, &ns, &wal).await);

    Api::<SecretRotation>::namespaced(client.clone(), &ns)
        .delete("app-secret", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sr = get_rotation(&client, &ns, "app-secret").await;
    assert!(
        sr.metadata.deletion_timestamp.is_some(),
        "the deletion was accepted"
    );
    assert_eq!(
        phase_of(&sr),
        Some(Phase::AwaitingRollout),
        "the rotation goes on"
    );
    assert!(
        exists::<Secret>(&client, &ns, &wal).await,
        "the write-ahead record (the only copy besides the stores) is kept"
    );

    // Pods can start again: the proof completes, then the object goes.
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    common::wait_for("the SecretRotation to go", LONG, || async {
        !exists::<SecretRotation>(&client, &ns, "app-secret").await
    })
    .await;
    let synced = read_key(&client, &ns, "app-creds", "client_secret")
        .await
        .unwrap();
    assert_ne!(synced, old, "the rotation finished on the new value");
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(synced.as_str())
    );
    assert!(deployment_available(&client, &ns, "app").await);
    let notes = event_notes(&client, &ns, "app-secret").await;
    assert!(
        notes
            .iter()
            .any(|(reason, _)| reason == "RotationSucceeded"),
        "{notes:?}"
    );
    common::wait_for("the write-ahead record to go", LONG, || async {
        !exists::<Secret>(&client, &ns, &wal).await
    })
    .await;
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&old, &synced],
    )
    .await;
}

/// Deleting an idle SecretRotation is immediate.
#[tokio::test]
async fn deletion_when_idle_is_immediate() {
    let (c, client, ns) = common::setup("finalizer-idle").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let _op = Operator::start(REKEY, c, &ns);
    generated_rotation_succeeds(&client, &ns, "app-secret").await;
    let sr = get_rotation(&client, &ns, "app-secret").await;
    assert!(
        sr.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == rekey::crd::keys::FINALIZER),
        "{:?}",
        sr.metadata.finalizers
    );
    Api::<SecretRotation>::namespaced(client.clone(), &ns)
        .delete("app-secret", &DeleteParams::default())
        .await
        .unwrap();
    common::wait_for(
        "the SecretRotation to go",
        Duration::from_secs(20),
        || async { !exists::<SecretRotation>(&client, &ns, "app-secret").await },
    )
    .await;
}

/// The failure reason of the last rotation, once it failed.
async fn failed_with(client: &Client, ns: &str, name: &str) -> (String, Phase) {
    let sr = wait_phase(client, ns, name, Phase::Failed, LONG).await;
    let f = sr
        .status
        .and_then(|s| s.last_rotation)
        .and_then(|l| l.failure)
        .expect("a failure");
    (f.reason, f.phase)
}

/// Tried as a new user would: a target naming an existing Secret (made by
/// hand or by Helm) was overwritten and its previous value was gone. Now it
/// is refused before anything is issued, unless the spec opts in.
#[tokio::test]
async fn an_existing_secret_rekey_did_not_create_is_not_overwritten() {
    let (c, client, ns) = common::setup("not-adopted").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["targets"][0]["kubernetesSecret"]
        .as_object_mut()
        .unwrap()
        .remove("adoptExisting");
    create_rotation(&client, &ns, "app-secret", spec).await;
    assert_eq!(
        failed_with(&client, &ns, "app-secret").await,
        ("TargetSecretNotAdopted".into(), Phase::Preflight)
    );
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str()),
        "the Secret is untouched"
    );
}

/// A target that is the ExternalSecret's own output Secret: rekey's write
/// would satisfy the sync proof by itself, then ESO writes the old value
/// back. Refused at Preflight, even with adoptExisting.
#[tokio::test]
async fn the_external_secrets_own_output_is_refused() {
    let (c, client, ns) = common::setup("eso-output").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["targets"][0]["kubernetesSecret"] =
        json!({"name": "app-creds", "key": "client_secret", "adoptExisting": true});
    create_rotation(&client, &ns, "app-secret", spec).await;
    assert_eq!(
        failed_with(&client, &ns, "app-secret").await,
        ("TargetSecretManaged".into(), Phase::Preflight)
    );
    assert_eq!(
        read_key(&client, &ns, "app-creds", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str())
    );
}

/// A SecretRotation in namespace A may write a Secret in namespace B only
/// with a grant made in B, and B's values never land in A's write-ahead
/// record (whoever reads Secrets in A must not read B's through rekey).
#[tokio::test]
async fn a_secret_in_another_namespace_needs_a_grant_made_there() {
    let (c, client, ns) = common::setup("tenant-a").await;
    let other = common::namespace(&client, "tenant-b").await;
    let old = common::canary("old");
    let theirs = common::canary("theirs");
    scene(c, &client, &ns, &old).await;
    put_secret(&client, &other, "shared", json!({"client_secret": theirs})).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["targets"].as_array_mut().unwrap().push(json!({
        "name": "other", "kubernetesSecret": {"namespace": other, "name": "shared", "key": "client_secret", "adoptExisting": true}
    }));
    create_rotation(&client, &ns, "no-grant", spec.clone()).await;
    assert_eq!(
        failed_with(&client, &ns, "no-grant").await,
        ("TargetNamespaceNotGranted".into(), Phase::Preflight)
    );
    assert_eq!(
        read_key(&client, &other, "shared", "client_secret")
            .await
            .as_deref(),
        Some(theirs.as_str())
    );

    // The grant, made in B. The rotation waits in AwaitingRollout (no new
    // pods) so the write-ahead record can be read while it exists.
    let patch = json!({"metadata": {"annotations": {"rekey.dev/allow-rotation-from": format!("elsewhere,{ns}")}}});
    Api::<Secret>::namespaced(client.clone(), &other)
        .patch(
            "shared",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    block_new_pods(&client, &ns, 2).await;
    create_rotation(&client, &ns, "granted", spec).await;
    wait_phase(&client, &ns, "granted", Phase::AwaitingRollout, LONG).await;
    let wal = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(&rekey::wal::secret_name("granted"))
        .await
        .unwrap();
    let record = serde_json::to_string(&wal.data).unwrap();
    let b64 = |v: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(v)
    };
    assert!(
        !record.contains(&b64(&theirs)),
        "B's value must not be copied into A"
    );
    assert!(
        record.contains(&b64(&old)),
        "A's own previous value is kept for rollback"
    );
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    wait_phase(&client, &ns, "granted", Phase::Succeeded, LONG).await;
    let new = read_key(&client, &ns, "app-creds", "client_secret")
        .await
        .unwrap();
    assert_eq!(
        read_key(&client, &other, "shared", "client_secret")
            .await
            .as_deref(),
        Some(new.as_str())
    );
}

/// An operator started with --allowed-hosts never sends a credential to
/// another host: the webhook is refused at Preflight and never called.
#[tokio::test]
async fn outbound_hosts_can_be_restricted() {
    let (c, client, ns) = common::setup("allowed-hosts").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let (url, calls) = counting_webhook().await;
    let _op = Operator::start_with_args(
        REKEY,
        c,
        &ns,
        c.kubeconfig.clone(),
        &["--allowed-hosts=idp.example.com,*.corp.example"],
    );
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(webhook_credential(&url)),
    )
    .await;
    assert_eq!(
        failed_with(&client, &ns, "app-secret").await,
        ("HostNotAllowed".into(), Phase::Preflight)
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Two SecretRotations of one Secret key, requested at once (tried as a new
/// user would: both acted, and one reported success with a version the
/// other had already replaced). They must take turns: the second waits in
/// Preflight, naming the first, and starts issuing only after the first
/// ended; each one's value was the current one when it finished.
#[tokio::test]
async fn two_rotations_of_one_secret_take_turns() {
    let (c, client, ns) = common::setup("overlap").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let _op = Operator::start(REKEY, c, &ns);
    let spec = rotation_spec(json!({"generated": {}}));
    let (a, b) = tokio::join!(
        create_rotation(&client, &ns, "first", spec.clone()),
        create_rotation(&client, &ns, "second", spec.clone()),
    );
    drop((a, b));
    let saw = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    common::wait_for("both rotations to end", LONG, || async {
        for name in ["first", "second"] {
            let sr = get_rotation(&client, &ns, name).await;
            let waiting = sr.status.iter().flat_map(|s| s.conditions.iter()).any(|c| {
                c.type_ == "Rotating" && c.message.starts_with("waiting for SecretRotation")
            });
            if waiting {
                saw.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let done = |sr: &SecretRotation| {
            sr.status
                .as_ref()
                .is_some_and(|s| s.rotation.is_none() && s.last_rotation.is_some())
        };
        done(&get_rotation(&client, &ns, "first").await)
            && done(&get_rotation(&client, &ns, "second").await)
    })
    .await;
    assert!(
        saw.load(std::sync::atomic::Ordering::SeqCst),
        "one of them waited, naming the other"
    );
    let summary = |sr: SecretRotation| sr.status.unwrap().last_rotation.unwrap();
    let first = summary(get_rotation(&client, &ns, "first").await);
    let second = summary(get_rotation(&client, &ns, "second").await);
    assert_eq!(first.result, Phase::Succeeded);
    assert_eq!(second.result, Phase::Succeeded);
    // The later one started issuing only after the earlier one had ended.
    let (early, late) = if first.finished_at < second.finished_at {
        (first, second)
    } else {
        (second, first)
    };
    // Event times are the operator's clock to the microsecond (status times
    // are whole seconds): the later rotation's Issuing transition comes after
    // the earlier one's RotationSucceeded.
    let all = events(&client, &ns).await;
    let at = |rotation: &str, reason: &str| {
        all.iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter(|e| e.message.as_deref().is_some_and(|m| m.contains(rotation)))
            .filter_map(|e| e.event_time.as_ref().map(|t| t.0))
            .min()
            .unwrap_or_else(|| panic!("no {reason} Event of {rotation}"))
    };
    let issuing_started = at(&late.id, "Issuing");
    let early_finished = at(&early.id, "RotationSucceeded");
    assert!(
        issuing_started > early_finished,
        "interleaved: {} entered Issuing at {issuing_started}, before {} finished at {early_finished}",
        late.id,
        early.id,
    );
    // What ESO delivers and the store holds is one value, the last one's.
    let synced = read_key(&client, &ns, "app-creds", "client_secret")
        .await
        .unwrap();
    assert_ne!(synced, old);
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(synced.as_str())
    );
}

/// A write-ahead record the API server would refuse (here: a quota of one
/// Secret in the namespace, already used) is found at Preflight, before
/// the source issues a value that would then be stranded.
#[tokio::test]
async fn a_refused_write_ahead_record_is_found_before_issuing() {
    let (c, client, ns) = common::setup("wal-refused").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .len();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "secrets"},
        "spec": {"hard": {"secrets": secrets.to_string()}}
    }))
    .unwrap();
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &quota)
        .await
        .unwrap();
    let (url, issued) = counting_webhook().await;
    let _op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(webhook_credential(&url)),
    )
    .await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    let f = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(f.phase, Phase::Preflight, "{f:?}");
    assert!(f.message.contains("write-ahead record"), "{f:?}");
    assert_eq!(
        issued.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was issued"
    );
}

/// Issue 10 item 13: a target write that the API server would refuse (here
/// a ValidatingAdmissionPolicy that freezes the Secret) is found by a
/// dry-run write at Preflight, before the source issues a value.
#[tokio::test]
async fn a_target_write_that_admission_refuses_is_found_before_issuing() {
    let (c, client, ns) = common::setup("target-refused").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let policy = format!("freeze-source-{ns}");
    let dynamic = |kind: &str, plural: &str| {
        Api::<kube::api::DynamicObject>::all_with(
            client.clone(),
            &kube::api::ApiResource {
                group: "admissionregistration.k8s.io".into(),
                version: "v1".into(),
                api_version: "admissionregistration.k8s.io/v1".into(),
                kind: kind.into(),
                plural: plural.into(),
            },
        )
    };
    let vap: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["secrets"]}]},
            "validations": [{"expression": "object.metadata.name != 'source'", "message": "source is frozen"}]
        }
    }))
    .unwrap();
    dynamic("ValidatingAdmissionPolicy", "validatingadmissionpolicies")
        .create(&Default::default(), &vap)
        .await
        .unwrap();
    let binding: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy},
        "spec": {"policyName": policy, "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}
    }))
    .unwrap();
    dynamic(
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
    )
    .create(&Default::default(), &binding)
    .await
    .unwrap();
    // Admission policies take effect once the API server has loaded them.
    common::wait_for("the policy to deny", LONG, || async {
        let probe: Secret =
            serde_json::from_value(json!({"metadata": {"name": "source"}})).unwrap();
        Api::<Secret>::namespaced(client.clone(), &ns)
            .patch(
                "source",
                &kube::api::PatchParams::apply("probe").dry_run(),
                &kube::api::Patch::Apply(&probe),
            )
            .await
            .is_err()
    })
    .await;
    let (url, issued) = counting_webhook().await;
    let _op = Operator::start(REKEY, c, &ns);
    create_rotation(
        &client,
        &ns,
        "app-secret",
        rotation_spec(webhook_credential(&url)),
    )
    .await;
    let sr = wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;
    for (kind, plural) in [
        (
            "ValidatingAdmissionPolicyBinding",
            "validatingadmissionpolicybindings",
        ),
        ("ValidatingAdmissionPolicy", "validatingadmissionpolicies"),
    ] {
        dynamic(kind, plural)
            .delete(&policy, &Default::default())
            .await
            .unwrap();
    }
    let f = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(f.phase, Phase::Preflight, "{f:?}");
    assert_eq!(
        issued.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was issued"
    );
    assert_eq!(
        read_key(&client, &ns, "source", "client_secret")
            .await
            .as_deref(),
        Some(old.as_str())
    );
}

/// A webhook that answers every call with a fixed value and counts calls.
async fn counting_webhook() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let value = common::canary("webhook");
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let value = value.clone();
        async move { axum::Json(json!({ "value": value })) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

/// Tried as a new user would: a cron like `a b c d e` passed admission, and
/// on an existing SecretRotation an unservable schedule silently removed
/// `nextRotationAt` while Ready stayed True. Now admission refuses what it
/// can see, and what it cannot see (minute 61) is said in a condition and
/// a Warning Event.
#[tokio::test]
async fn a_schedule_that_cannot_be_served_says_so() {
    let (c, client, ns) = common::setup("schedule").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["schedule"] = json!({"cron": "a b c d e"});
    let api = Api::<SecretRotation>::namespaced(client.clone(), &ns);
    let refused: SecretRotation = serde_json::from_value(json!({
        "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
        "metadata": {"name": "bad-cron"}, "spec": spec
    }))
    .unwrap();
    let err = api
        .create(&Default::default(), &refused)
        .await
        .expect_err("admission refuses a cron of letters");
    assert!(err.to_string().contains("schedule.cron"), "{err}");

    spec["schedule"] = json!({"cron": "0 3 1 * *"});
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let scheduled = |sr: &SecretRotation| {
        sr.status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .find(|c| c.type_ == "Scheduled")
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    common::wait_for("Scheduled=True", LONG, || async {
        scheduled(&get_rotation(&client, &ns, "app-secret").await)
            == Some(("True".into(), "Scheduled".into()))
    })
    .await;
    api.patch(
        "app-secret",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"schedule": {"cron": "61 3 1 * *"}}})),
    )
    .await
    .unwrap();
    common::wait_for("Scheduled=False", LONG, || async {
        scheduled(&get_rotation(&client, &ns, "app-secret").await)
            == Some(("False".into(), "InvalidSpec".into()))
    })
    .await;
    common::wait_for("a ScheduleInvalid Warning", LONG, || async {
        events(&client, &ns).await.iter().any(|e| {
            e.reason.as_deref() == Some("ScheduleInvalid") && e.type_.as_deref() == Some("Warning")
        })
    })
    .await;
}

/// Issue 10 item 8 across namespaces: two SecretRotations in different
/// namespaces, both granted on one Secret of a third, take turns: the claim
/// on a Secret lives in the Secret's namespace, so the second waits, naming
/// the first, until it ends.
#[tokio::test]
async fn rotations_of_one_secret_from_two_namespaces_take_turns() {
    let (c, client, a) = common::setup("claim-a").await;
    install_crd(c);
    let b = common::namespace(&client, "claim-b").await;
    let target = common::namespace(&client, "claim-target").await;
    let shared: Secret = serde_json::from_value(json!({
        "metadata": {"name": "shared", "annotations": {
            "rekey.dev/allow-rotation-from": format!("{a},{b}")}},
        "stringData": {"k": common::canary("old")}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &target)
        .create(&Default::default(), &shared)
        .await
        .unwrap();
    let also = format!("--namespaces={b},{target}");
    let _op = Operator::start_with_args(REKEY, c, &a, c.kubeconfig.clone(), &[also.as_str()]);
    let spec = |credential: serde_json::Value| {
        json!({
            "credential": credential,
            "oldValueValidFor": "30m",
            "targets": [{"name": "main", "kubernetesSecret": {
                "namespace": target, "name": "shared", "key": "k", "adoptExisting": true}}],
            "proof": {"nothingToProve": true}
        })
    };
    // The first holds its claim until a person confirms the invalidation.
    put_secret(
        &client,
        &a,
        "handed-over",
        json!({"value": common::canary("manual")}),
    )
    .await;
    create_rotation(
        &client,
        &a,
        "first",
        spec(json!({"manual": {"secretRef": {"name": "handed-over", "key": "value"}}})),
    )
    .await;
    let first = wait_phase(&client, &a, "first", Phase::AwaitingConfirmation, LONG).await;
    create_rotation(&client, &b, "second", spec(json!({"generated": {}}))).await;
    common::wait_for("the second to wait for the first", LONG, || async {
        get_rotation(&client, &b, "second")
            .await
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .any(|c| {
                c.type_ == "Rotating"
                    && c.message
                        .contains(&format!("waiting for SecretRotation {a}/first"))
            })
    })
    .await;
    assert_eq!(
        phase_of(&get_rotation(&client, &b, "second").await),
        Some(Phase::Preflight),
        "nothing issued or written while the first is not done"
    );
    let id = first.status.unwrap().rotation.unwrap().id;
    annotate_rotation(&client, &a, "first", "rekey.dev/confirm-invalidated", &id).await;
    wait_phase(&client, &a, "first", Phase::Succeeded, LONG).await;
    wait_phase(&client, &b, "second", Phase::Succeeded, LONG).await;
}
