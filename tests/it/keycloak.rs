//! Keycloak as a real identity provider: the old client secret stays valid
//! until every proof is in, and dies right after — proven with real token
//! requests against a real Keycloak, real ESO and real rollouts.

use rekey_testenv as common;

use std::time::{Duration, Instant};

use crate::REKEY;
use common::fixtures::*;
use common::keycloak::keycloak;
use common::operator::Operator;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use rekey::crd::{KeycloakSource, LocalSecretRef, Phase};
use rekey::source::CredentialSource;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(180);

fn keycloak_spec(url: &str, realm: &str) -> Value {
    let mut spec = rotation_spec(json!({"keycloak": {
        "url": url, "realm": realm, "clientId": "ai-component", "adminSecretRef": {"name": "keycloak-admin"}
    }}));
    spec["proof"]["timeout"] = json!("90s");
    spec
}

pub(crate) async fn admin_secret(
    client: &kube::Client,
    ns: &str,
    kc: &common::keycloak::KeycloakServer,
) {
    put_secret(
        client,
        ns,
        "keycloak-admin",
        json!({"username": kc.admin_user, "password": kc.admin_password}),
    )
    .await;
}

#[tokio::test]
async fn old_secret_works_until_proof_and_dies_after() {
    let test_start = Instant::now();
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "keycloak").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (_, old) = kc
        .realm_with_client(&realm, "ai-component", Some(3600))
        .await;
    assert!(
        kc.token_ok(&realm, "ai-component", &old).await,
        "before the rotation the old secret gets a token"
    );
    scene(c, &client, &ns, &old).await;
    admin_secret(&client, &ns, kc).await;
    let op = Operator::start(REKEY, c, &ns);
    // Await: another restarter (here: the test) restarts the app, which holds
    // the rotation in AwaitingRollout: the zero-downtime window to observe.
    let mut spec = keycloak_spec(&kc.url, &realm);
    spec["proof"]["restart"] = json!("Await");
    create_rotation(&client, &ns, "ai-component", spec).await;
    wait_phase(&client, &ns, "ai-component", Phase::AwaitingRollout, LONG).await;

    let new = read_key(&client, &ns, "app-creds", "client_secret")
        .await
        .unwrap();
    assert_ne!(new, old);
    assert!(
        kc.token_ok(&realm, "ai-component", &new).await,
        "after Issuing the new secret gets a token"
    );
    assert!(
        kc.token_ok(&realm, "ai-component", &old).await,
        "before Invalidating the old secret still gets a token"
    );

    let patch =
        json!({"spec": {"template": {"metadata": {"annotations": {"restarted-by": "test"}}}}});
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let sr = wait_phase(&client, &ns, "ai-component", Phase::Succeeded, LONG).await;
    assert!(
        kc.token_ok(&realm, "ai-component", &new).await,
        "after Succeeded the new secret gets a token"
    );
    assert!(
        !kc.token_ok(&realm, "ai-component", &old).await,
        "after Succeeded the old secret is refused"
    );
    let phases: Vec<Phase> = sr
        .status
        .unwrap()
        .last_rotation
        .unwrap()
        .phases
        .iter()
        .map(|p| p.phase)
        .collect();
    assert!(phases.contains(&Phase::Verifying));
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&old, &new, &kc.admin_password],
    )
    .await;
    eprintln!(
        "Keycloak start-up {:.1}s; end-to-end test {:.1}s",
        kc.startup.as_secs_f64(),
        test_start.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_rollout_that_never_completes_leaves_the_old_secret_valid() {
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "kcfail").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (_, old) = kc
        .realm_with_client(&realm, "ai-component", Some(3600))
        .await;
    scene(c, &client, &ns, &old).await;
    admin_secret(&client, &ns, kc).await;
    block_new_pods(&client, &ns, 2).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = keycloak_spec(&kc.url, &realm);
    spec["proof"]["timeout"] = json!("20s");
    spec["onFailure"] = json!("Rollback");
    create_rotation(&client, &ns, "ai-component", spec).await;
    let sr = wait_phase(&client, &ns, "ai-component", Phase::Failed, LONG).await;
    let last = sr.status.unwrap().last_rotation.unwrap();
    let failure = last.failure.unwrap();
    assert_eq!(failure.reason, "RolloutTimeout");
    // Keycloak expires the old secret on its own: writing it back would only
    // postpone the outage, so the new (valid) secret stays in the store.
    assert!(!last.rolled_back);
    assert!(
        failure.message.contains("Rollback not applied"),
        "{}",
        failure.message
    );
    let stored = read_key(&client, &ns, "source", "client_secret")
        .await
        .unwrap();
    assert_ne!(stored, old);
    assert!(
        kc.token_ok(&realm, "ai-component", &stored).await,
        "the stored secret works"
    );
    assert!(
        kc.token_ok(&realm, "ai-component", &old).await,
        "the old secret still gets a token after the failure"
    );
}

#[tokio::test]
async fn preflight_refuses_a_client_without_a_rotation_policy() {
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "kcnopolicy").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (_, old) = kc.realm_with_client(&realm, "ai-component", None).await;
    scene(c, &client, &ns, &old).await;
    admin_secret(&client, &ns, kc).await;
    let _op = Operator::start(REKEY, c, &ns);
    create_rotation(&client, &ns, "ai-component", keycloak_spec(&kc.url, &realm)).await;
    let sr = wait_phase(&client, &ns, "ai-component", Phase::Failed, LONG).await;
    let failure = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(
        (failure.reason.as_str(), failure.phase),
        ("KeycloakRotationPolicyMissing", Phase::Preflight)
    );
    assert!(
        kc.token_ok(&realm, "ai-component", &old).await,
        "nothing was regenerated"
    );
}

/// A crash right after Keycloak regenerated the secret, before rekey stored
/// it: the retry reads the new secret back instead of regenerating again.
#[tokio::test]
async fn a_retried_issue_reads_the_secret_back_instead_of_regenerating() {
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "kcretry").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (id, old) = kc
        .realm_with_client(&realm, "ai-component", Some(3600))
        .await;
    admin_secret(&client, &ns, kc).await;
    let ctx = rekey::deps::Deps::new(client.clone(), rekey::metrics::Metrics::new());
    let spec = KeycloakSource {
        url: kc.url.clone(),
        realm: realm.clone(),
        client_id: "ai-component".into(),
        admin_secret_ref: LocalSecretRef {
            name: "keycloak-admin".into(),
        },
        admin_realm: None,
        allow_immediate_invalidation: false,
    };
    let source = rekey::source::keycloak::Keycloak::new(&spec, &ctx, &ns, "30m");
    source.preflight(None).await.unwrap();
    let marker = source.prepare_issue().await.unwrap();
    let first = source.issue("rot-1", &marker, None).await.unwrap();
    let again = source
        .issue("rot-1", &marker, Some(jiff::Timestamp::now()))
        .await
        .unwrap();
    assert!(first.same_as(&again), "the retry returns the same secret");
    let rotated = kc
        .admin(
            reqwest::Method::GET,
            &format!("/{realm}/clients/{id}/client-secret/rotated"),
            None,
        )
        .await;
    assert_eq!(
        rotated["value"].as_str(),
        Some(old.as_str()),
        "the rotated slot still holds the original secret"
    );
    assert!(kc.token_ok(&realm, "ai-component", &old).await);
    source.verify(&first).await.unwrap();
    // Invalidation is idempotent.
    source
        .invalidate("rot-1", &Default::default(), &first)
        .await
        .unwrap();
    source
        .invalidate("rot-1", &Default::default(), &first)
        .await
        .unwrap();
    assert!(!kc.token_ok(&realm, "ai-component", &old).await);
    assert!(kc.token_ok(&realm, "ai-component", first.expose()).await);
}

/// A Keycloak source for `realm`'s client `ai-component`, at `url`.
async fn keycloak_source(
    client: &kube::Client,
    ns: &str,
    url: &str,
    realm: &str,
) -> rekey::source::keycloak::Keycloak {
    let deps = rekey::deps::Deps::new(client.clone(), rekey::metrics::Metrics::new());
    let spec = KeycloakSource {
        url: url.into(),
        realm: realm.into(),
        client_id: "ai-component".into(),
        admin_secret_ref: LocalSecretRef {
            name: "keycloak-admin".into(),
        },
        admin_realm: None,
        allow_immediate_invalidation: false,
    };
    rekey::source::keycloak::Keycloak::new(&spec, &deps, ns, "30m")
}

async fn regenerate_by_hand(
    kc: &common::keycloak::KeycloakServer,
    realm: &str,
    id: &str,
) -> String {
    let s = kc
        .admin(
            reqwest::Method::POST,
            &format!("/{realm}/clients/{id}/client-secret"),
            None,
        )
        .await;
    s["value"].as_str().unwrap().to_string()
}

/// Issue 10 item 10: while the rotated slot holds a secret (someone else's
/// rotation that has not ended), regenerating would kill it at once: rekey
/// refuses, at Preflight and at the issue call.
#[tokio::test]
async fn a_rotated_slot_in_use_is_never_overwritten() {
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "kcslot").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (id, old) = kc
        .realm_with_client(&realm, "ai-component", Some(3600))
        .await;
    admin_secret(&client, &ns, kc).await;
    let source = keycloak_source(&client, &ns, &kc.url, &realm).await;
    // Someone rotates by hand: `old` now lives in the rotated slot.
    let theirs = regenerate_by_hand(kc, &realm, &id).await;
    let refused = source.preflight(None).await.unwrap_err();
    assert_eq!(
        refused.reason,
        rekey::reason::Reason::KeycloakRotatedSlotInUse
    );
    let marker = source.prepare_issue().await.unwrap();
    let refused = source.issue("rot-1", &marker, None).await.unwrap_err();
    assert_eq!(
        refused.reason,
        rekey::reason::Reason::KeycloakRotatedSlotInUse
    );
    assert!(
        kc.token_ok(&realm, "ai-component", &old).await,
        "their old secret still works"
    );
    assert!(kc.token_ok(&realm, "ai-component", &theirs).await);
}

/// Issue 10 item 10: invalidation deletes the rotated slot only while
/// Keycloak's current secret is the one rekey distributed.
#[tokio::test]
async fn invalidation_spares_the_slot_when_the_secret_changed_since() {
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "kcchanged").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (id, _old) = kc
        .realm_with_client(&realm, "ai-component", Some(3600))
        .await;
    admin_secret(&client, &ns, kc).await;
    let source = keycloak_source(&client, &ns, &kc.url, &realm).await;
    let marker = source.prepare_issue().await.unwrap();
    let distributed = source.issue("rot-1", &marker, None).await.unwrap();
    // Someone regenerates after rekey distributed its value: the rotated
    // slot now holds the value every store holds.
    regenerate_by_hand(kc, &realm, &id).await;
    let refused = source
        .invalidate("rot-1", &Default::default(), &distributed)
        .await
        .unwrap_err();
    assert_eq!(refused.reason, rekey::reason::Reason::KeycloakSecretChanged);
    assert!(
        kc.token_ok(&realm, "ai-component", distributed.expose())
            .await,
        "the value the stores hold still works"
    );
}

/// What a proxy in front of Keycloak does with one call.
pub(crate) enum Proxied {
    Forward,
    /// Answer with this status at once, and forward the call only after
    /// this long (a call that commits late), or never.
    Answer(u16, Option<Duration>),
}

/// A proxy to Keycloak that asks `decide` (method, path) what to do with
/// each call.
pub(crate) async fn keycloak_proxy(
    upstream: String,
    decide: impl Fn(&str, &str) -> Proxied + Clone + Send + Sync + 'static,
) -> String {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let (upstream, decide) = (upstream.clone(), decide.clone());
        async move {
            let send = {
                let url = format!("{upstream}{}", uri.path_and_query().unwrap());
                let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
                let mut req = reqwest::Client::new().request(method, url).body(body);
                for (k, v) in headers.iter().filter(|(k, _)| *k != "host") {
                    req = req.header(k.as_str(), v.as_bytes());
                }
                req
            };
            if let Proxied::Answer(status, later) = decide(method.as_str(), uri.path()) {
                if let Some(delay) = later {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        send.send().await.unwrap();
                    });
                }
                return (
                    StatusCode::from_u16(status).unwrap(),
                    HeaderMap::new(),
                    Bytes::new(),
                );
            }
            let resp = send.send().await.unwrap();
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
            let mut out = HeaderMap::new();
            if let Some(ct) = resp.headers().get("content-type") {
                out.insert("content-type", ct.to_str().unwrap().parse().unwrap());
            }
            (status, out, resp.bytes().await.unwrap())
        }
    };
    let app = axum::Router::new().fallback(forward);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A proxy to Keycloak that loses the answer of the first regenerate call
/// and forwards that call only `delay` later: a call that commits late.
async fn late_committing_proxy(upstream: String, delay: Duration) -> String {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let delayed = Arc::new(AtomicBool::new(false));
    keycloak_proxy(upstream, move |method, path| {
        let regenerate = method == "POST" && path.ends_with("/client-secret");
        if regenerate && !delayed.swap(true, Ordering::SeqCst) {
            Proxied::Answer(504, Some(delay))
        } else {
            Proxied::Forward
        }
    })
    .await
}

/// A proxy to Keycloak that answers 503 to the calls `failing` names while
/// it does ("verify": the client's token requests; "invalidate": deleting
/// the rotated secret); everything else goes through.
async fn failing_proxy(
    upstream: String,
    realm: String,
) -> (String, std::sync::Arc<std::sync::Mutex<&'static str>>) {
    let failing = std::sync::Arc::new(std::sync::Mutex::new(""));
    let mode = failing.clone();
    let url = keycloak_proxy(upstream, move |method, path| {
        let fails = match *mode.lock().unwrap() {
            "verify" => {
                method == "POST" && path == format!("/realms/{realm}/protocol/openid-connect/token")
            }
            "invalidate" => method == "DELETE" && path.ends_with("/client-secret/rotated"),
            _ => false,
        };
        if fails {
            Proxied::Answer(503, None)
        } else {
            Proxied::Forward
        }
    })
    .await;
    (url, failing)
}

/// Issue 10 item 10: a regenerate call whose answer was lost may commit
/// late; regenerating again before it did would push the first new secret
/// into the rotated slot and kill the old one at once. rekey waits, then
/// reads the late secret back.
#[tokio::test]
async fn a_regenerate_that_commits_late_is_never_followed_by_a_second() {
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "kclate").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (_, old) = kc
        .realm_with_client(&realm, "ai-component", Some(3600))
        .await;
    admin_secret(&client, &ns, kc).await;
    let proxy = late_committing_proxy(kc.url.clone(), Duration::from_secs(3)).await;
    let source = keycloak_source(&client, &ns, &proxy, &realm).await;
    let marker = source.prepare_issue().await.unwrap();
    let attempted = jiff::Timestamp::now();
    assert!(
        source.issue("rot-1", &marker, None).await.is_err(),
        "answer lost"
    );
    let retry = source.issue("rot-1", &marker, Some(attempted)).await;
    assert_eq!(
        retry.map(|_| ()).unwrap_err().reason,
        rekey::reason::Reason::KeycloakIssuePending
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let new = source
        .issue("rot-1", &marker, Some(attempted))
        .await
        .unwrap();
    assert_ne!(new.expose(), old);
    assert!(
        kc.token_ok(&realm, "ai-component", &old).await,
        "the old secret survived"
    );
    assert!(kc.token_ok(&realm, "ai-component", new.expose()).await);
}

/// Issue 12 item 2: Keycloak unavailable during Verifying, then during
/// Invalidating. Each is retried where it failed (no phase before it runs
/// again: one regenerate, one rollout), the Rotating condition says so, and
/// once Keycloak answers the rotation ends with the old secret refused.
#[tokio::test]
async fn keycloak_down_while_verifying_and_invalidating_is_retried_in_place() {
    let c = common::cluster();
    let kc = keycloak(c);
    let client = common::client_for(c).await;
    let ns = common::namespace(&client, "kcdown").await;
    let realm = format!("r{}", rand::random::<u32>());
    let (_, old) = kc
        .realm_with_client(&realm, "ai-component", Some(3600))
        .await;
    scene(c, &client, &ns, &old).await;
    admin_secret(&client, &ns, kc).await;
    let (proxy, failing) = failing_proxy(kc.url.clone(), realm.clone()).await;
    let op = Operator::start(REKEY, c, &ns);
    let mut spec = keycloak_spec(&proxy, &realm);
    spec["proof"]["restart"] = json!("Await");
    spec["proof"]["timeout"] = json!("5m");
    create_rotation(&client, &ns, "ai-component", spec).await;
    wait_phase(&client, &ns, "ai-component", Phase::AwaitingRollout, LONG).await;
    let new = read_key(&client, &ns, "app-creds", "client_secret")
        .await
        .unwrap();

    let retrying_in = |phase: Phase| {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            common::wait_for(&format!("retries in {phase}"), LONG, || async {
                let sr = get_rotation(&client, &ns, "ai-component").await;
                let status = sr.status.unwrap_or_default();
                status.phase == Some(phase)
                    && status.conditions.iter().any(|c| {
                        c.type_ == "Rotating"
                            && c.message.contains("retrying after error (attempt 2")
                    })
            })
            .await;
        }
    };
    *failing.lock().unwrap() = "verify";
    let patch =
        json!({"spec": {"template": {"metadata": {"annotations": {"restarted-by": "test"}}}}});
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    retrying_in(Phase::Verifying).await;
    assert!(
        kc.token_ok(&realm, "ai-component", &old).await,
        "the old secret still works while verification cannot run"
    );
    *failing.lock().unwrap() = "invalidate";
    retrying_in(Phase::Invalidating).await;
    assert!(kc.token_ok(&realm, "ai-component", &old).await);
    *failing.lock().unwrap() = "";
    let sr = wait_phase(&client, &ns, "ai-component", Phase::Succeeded, LONG).await;

    assert!(
        !kc.token_ok(&realm, "ai-component", &old).await,
        "old secret refused"
    );
    assert!(
        kc.token_ok(&realm, "ai-component", &new).await,
        "new secret works"
    );
    let phases: Vec<Phase> = sr
        .status
        .unwrap()
        .last_rotation
        .unwrap()
        .phases
        .iter()
        .map(|p| p.phase)
        .collect();
    for once in [
        Phase::Issuing,
        Phase::Writing,
        Phase::AwaitingSync,
        Phase::AwaitingRollout,
    ] {
        assert_eq!(
            phases.iter().filter(|p| **p == once).count(),
            1,
            "{once:?} ran once: {phases:?}"
        );
    }
    assert_eq!(revisions(&client, &ns, "app").await, 2, "one rollout");
    assert_never_leaked(
        &client,
        &ns,
        &op.logs(),
        &op.scrape().await,
        &[&old, &new, &kc.admin_password],
    )
    .await;
}
