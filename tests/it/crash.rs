//! Issue 12 item 1: a crash at every side effect, whole process. The operator
//! binary of these tests is built with the `failpoints` feature
//! (src/failpoint.rs): started with `REKEY_FAILPOINT=<before|after>:<effect>`
//! it aborts right before or right after that side effect, as SIGKILL would
//! (no destructor, no flush). Each point runs in a namespace of its own: the
//! operator crashes there, is started again without the failpoint, and the
//! rotation must end as it would have without the crash:
//!
//! - exactly one new credential at the source (webhook: one idempotency key
//!   issued; Keycloak: one regenerate call through a proxy in front of it,
//!   and until Invalidating the rotated slot holds the original secret,
//!   after it the slot is empty and the current secret is the one the
//!   stores hold);
//! - exactly one new version per store (a watch on the Secret, the IBM
//!   emulator's versions, moto's versions), plus the restore of a rollback;
//! - exactly one rollout per workload (ReplicaSets), plus the one back;
//! - the old value invalidated once (one idempotency key) and only after the
//!   proof (the webhook checks the synced Secret and the rollout when called;
//!   the manual confirmation is given only then), never on a failure;
//! - the source, the store and the synced Secret hold the same value: the
//!   new one, or after a rollback the old one.
//!
//! Covering sets by default (every source with the kubernetesSecret store,
//! every store with the generated source, and a failing rotation, a drain
//! that never completes, under onFailure Rollback and Hold);
//! `REKEY_CRASH_MATRIX=full` (`make crash-matrix-full`) runs every source ×
//! store × ending. Points run in parallel (`REKEY_CRASH_PARALLEL`, default
//! 10). Crashes at each status write are the reconciler-level layer's
//! (tests/it/machine.rs stops the machine after every write). The matrix is
//! printed and its figures written to target/reliability/crash.json.

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::REKEY;
use crate::keycloak::{Proxied, admin_secret, keycloak_proxy};
use crate::stores::{aws_client, aws_secret_store, aws_stages, ibm_secret_store};
use common::cluster::Cluster;
use common::fixtures::*;
use common::ibm::IbmEmulator;
use common::keycloak::{KeycloakServer, keycloak};
use common::operator::Operator;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use rekey::crd::Phase;
use rekey::crd::keys::CONFIRM_ANNOTATION;
use serde_json::{Value, json};

const NAME: &str = "crash";
const HOLD: &str = "test.rekey.dev/hold";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Generated,
    Webhook,
    Manual,
    Keycloak,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum StoreKind {
    KubernetesSecret,
    Ibm,
    Moto,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    Succeeds,
    RollsBack,
    Holds,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    source: Source,
    store: StoreKind,
    ending: Ending,
}

impl Case {
    fn name(&self) -> String {
        let source = format!("{:?}", self.source).to_lowercase();
        let store = match self.store {
            StoreKind::KubernetesSecret => "kubernetesSecret",
            StoreKind::Ibm => "ibm",
            StoreKind::Moto => "moto",
        };
        let ending = match self.ending {
            Ending::Succeeds => "succeeds",
            Ending::RollsBack => "fails, Rollback",
            Ending::Holds => "fails, Hold",
        };
        format!("{source} → {store} ({ending})")
    }

    /// The side effects this rotation makes, in order (src/failpoint.rs).
    fn effects(&self) -> Vec<&'static str> {
        let mut e = vec![
            "add-finalizer",
            "sweep-write-ahead-record",
            "claim",
            "issue",
            "write-ahead-record",
            "write",
            "refresh-request",
            "restart",
        ];
        match self.ending {
            Ending::Succeeds => e.extend(["verify", "invalidate"]),
            Ending::RollsBack => {
                e.extend(["restore", "rollback-refresh-request", "rollback-restart"])
            }
            Ending::Holds => {}
        }
        e.extend([
            "delete-write-ahead-record",
            "release-claims",
            "remove-finalizer",
        ]);
        e
    }

    /// The effects the covering run crashes at: every one for the base case
    /// (generated → kubernetesSecret) and in the full run; elsewhere those
    /// where the source, the store or the failure path differ from the
    /// base case (a crash at adding the finalizer is the same crash
    /// whatever the source).
    fn covered_effects(&self, full: bool) -> Vec<&'static str> {
        let base = self.source == Source::Generated
            && self.store == StoreKind::KubernetesSecret
            && self.ending == Ending::Succeeds;
        let differing: &[&str] = match (self.ending, self.source, self.store) {
            (Ending::Succeeds, _, StoreKind::KubernetesSecret) => &[
                "issue",
                "write-ahead-record",
                "write",
                "verify",
                "invalidate",
            ],
            (Ending::Succeeds, ..) => &["issue", "write-ahead-record", "write", "refresh-request"],
            (Ending::RollsBack, ..) => &[
                "write",
                "restart",
                "restore",
                "rollback-refresh-request",
                "rollback-restart",
                "delete-write-ahead-record",
            ],
            (Ending::Holds, ..) => &[
                "write",
                "restart",
                "delete-write-ahead-record",
                "release-claims",
            ],
        };
        self.effects()
            .into_iter()
            .filter(|e| full || base || differing.contains(e))
            .collect()
    }

    /// What a completed rotation leaves: new versions per store (a restore
    /// is one more, except in AWS where the label moves back) and rollouts.
    fn expected_versions(&self) -> usize {
        match (self.ending, self.store) {
            (Ending::RollsBack, StoreKind::Moto) => 1,
            (Ending::RollsBack, _) => 2,
            _ => 1,
        }
    }

    fn expected_rollouts(&self) -> usize {
        if self.ending == Ending::RollsBack {
            2
        } else {
            1
        }
    }
}

/// The cases the run covers: covering sets, or with `full` the product.
fn cases(full: bool) -> Vec<Case> {
    use Ending::*;
    use Source::*;
    use StoreKind::*;
    let mut cases = vec![];
    if full {
        for source in [Generated, Webhook, Manual, Keycloak] {
            for store in [KubernetesSecret, Ibm, Moto] {
                cases.push(Case {
                    source,
                    store,
                    ending: Succeeds,
                });
            }
        }
        for store in [KubernetesSecret, Ibm, Moto] {
            for ending in [RollsBack, Holds] {
                cases.push(Case {
                    source: Webhook,
                    store,
                    ending,
                });
            }
        }
    } else {
        for source in [Generated, Webhook, Manual] {
            cases.push(Case {
                source,
                store: KubernetesSecret,
                ending: Succeeds,
            });
        }
        for store in [Ibm, Moto] {
            cases.push(Case {
                source: Generated,
                store,
                ending: Succeeds,
            });
        }
        for ending in [RollsBack, Holds] {
            cases.push(Case {
                source: Webhook,
                store: KubernetesSecret,
                ending,
            });
        }
        // Last: Keycloak starts meanwhile.
        cases.push(Case {
            source: Keycloak,
            store: KubernetesSecret,
            ending: Succeeds,
        });
    }
    // Keycloak's cases last in any mode: the server starts meanwhile.
    cases.sort_by_key(|c| c.source == Keycloak);
    cases
}

// ---- the source and the store of one point ----

/// Webhook calls: the value issued per idempotency key, and per invalidate
/// call its key and whether the proof held at that moment.
#[derive(Default)]
struct Hook {
    issued: BTreeMap<String, String>,
    issue_calls: usize,
    invalidated: Vec<(String, bool)>,
}

async fn hook_server(client: Client, ns: String) -> (String, Arc<Mutex<Hook>>) {
    use axum::extract::State;
    use axum::http::HeaderMap;
    use axum::routing::post;
    let hook = Arc::new(Mutex::new(Hook::default()));
    type S = (Arc<Mutex<Hook>>, Client, String);
    let key = |h: &HeaderMap| {
        h.get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let app = axum::Router::new()
        .route(
            "/issue",
            post(
                move |State((hook, _, _)): State<S>, h: HeaderMap| async move {
                    let mut hook = hook.lock().unwrap();
                    hook.issue_calls += 1;
                    // One credential per idempotency key (the documented contract).
                    let value = hook
                        .issued
                        .entry(key(&h))
                        .or_insert_with(|| common::canary("new"))
                        .clone();
                    axum::Json(json!({"value": value}))
                },
            ),
        )
        .route(
            "/invalidate",
            post(
                move |State((hook, client, ns)): State<S>, h: HeaderMap| async move {
                    let key = key(&h);
                    let value = hook.lock().unwrap().issued.get(&key).cloned();
                    let synced = read_key(&client, &ns, "app-creds", "client_secret").await;
                    let proven = value.is_some()
                        && synced == value
                        && deployment_available(&client, &ns, "app").await
                        && revisions(&client, &ns, "app").await == 2;
                    hook.lock().unwrap().invalidated.push((key, proven));
                    "ok"
                },
            ),
        )
        .with_state((hook.clone(), client, ns));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, hook)
}

/// Keycloak calls through the proxy: regenerates and rotated-secret deletions.
#[derive(Default)]
struct KcCalls {
    regenerated: usize,
    deleted: usize,
}

enum SourceWorld {
    Generated,
    Webhook(Arc<Mutex<Hook>>),
    Manual(String),
    Keycloak {
        kc: &'static KeycloakServer,
        realm: String,
        id: String,
        calls: Arc<Mutex<KcCalls>>,
    },
}

enum StoreWorld {
    Kubernetes,
    Ibm(IbmEmulator, String),
    Moto(aws_sdk_secretsmanager::Client, String),
}

struct World {
    client: Client,
    ns: String,
    old: String,
    source: SourceWorld,
    store: StoreWorld,
    /// Every value the store's Secret took, in order (kubernetesSecret).
    secret_values: Arc<Mutex<Vec<String>>>,
    /// The old pod held Terminating (the failing cases).
    held: Option<String>,
    /// Keycloak's admin token and when it was fetched.
    kc_token: Mutex<Option<(Instant, String)>>,
}

impl World {
    async fn store_value(&self) -> Option<String> {
        match &self.store {
            StoreWorld::Kubernetes => {
                read_key(&self.client, &self.ns, "source", "client_secret").await
            }
            StoreWorld::Ibm(emu, id) => emu
                .secret(id)
                .versions
                .last()
                .and_then(|v| v.payload.as_ref())
                .and_then(|p| p.as_str().map(str::to_string)),
            StoreWorld::Moto(aws, name) => aws
                .get_secret_value()
                .secret_id(name)
                .version_stage("AWSCURRENT")
                .send()
                .await
                .ok()
                .and_then(|o| o.secret_string),
        }
    }

    /// New versions the store holds since the scene was set.
    async fn store_versions(&self) -> usize {
        match &self.store {
            StoreWorld::Kubernetes => self.secret_values.lock().unwrap().len().saturating_sub(1),
            StoreWorld::Ibm(emu, id) => emu.secret(id).versions.len() - 1,
            StoreWorld::Moto(aws, name) => aws_stages(aws, name).await.len() - 1,
        }
    }

    /// Keycloak's rotated slot (None: empty) and current secret, read
    /// directly (not through the counting proxy).
    async fn keycloak_slots(&self) -> Option<(Option<String>, String)> {
        let SourceWorld::Keycloak { kc, realm, id, .. } = &self.source else {
            return None;
        };
        let cached = w_token(&self.kc_token);
        let token = match cached {
            Some(t) => t,
            None => {
                let token: Value = reqwest::Client::new()
                    .post(format!(
                        "{}/realms/master/protocol/openid-connect/token",
                        kc.url
                    ))
                    .form(&[
                        ("grant_type", "password"),
                        ("client_id", "admin-cli"),
                        ("username", kc.admin_user.as_str()),
                        ("password", kc.admin_password.as_str()),
                    ])
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let token = token["access_token"].as_str().unwrap().to_string();
                *self.kc_token.lock().unwrap() = Some((Instant::now(), token.clone()));
                token
            }
        };
        let get = |path: &'static str| {
            let token = token.clone();
            async move {
                let url = format!("{}/admin/realms/{realm}/clients/{id}/{path}", kc.url);
                let resp = reqwest::Client::new()
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap();
                if !resp.status().is_success() {
                    return None;
                }
                let body: Value = resp.json().await.unwrap_or_default();
                body["value"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            }
        };
        let rotated = get("client-secret/rotated").await;
        let current = get("client-secret").await.unwrap_or_default();
        Some((rotated, current))
    }
}

/// An admin token fetched less than 30 s ago (they live 60 s): each
/// password grant costs Keycloak a password hash.
fn w_token(cache: &Mutex<Option<(Instant, String)>>) -> Option<String> {
    cache
        .lock()
        .unwrap()
        .as_ref()
        .filter(|(at, _)| at.elapsed() < Duration::from_secs(30))
        .map(|(_, t)| t.clone())
}

/// Records every value of Secret `source` key client_secret (a watch sees
/// every change, not only what a poll happens to catch).
fn watch_secret(client: &Client, ns: &str) -> Arc<Mutex<Vec<String>>> {
    let values = Arc::new(Mutex::new(vec![]));
    let seen = values.clone();
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let config = watcher::Config::default().fields("metadata.name=source");
    tokio::spawn(async move {
        let mut stream = watcher(api, config).applied_objects().boxed();
        while let Some(Ok(s)) = stream.next().await {
            let value = s
                .data
                .and_then(|d| d.get("client_secret").cloned())
                .map(|b| String::from_utf8_lossy(&b.0).into_owned());
            if let Some(v) = value {
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&v) {
                    seen.push(v);
                }
            }
        }
    });
    values
}

/// The namespace, its scene and the SecretRotation's spec for one point.
async fn prepare(c: &'static Cluster, case: Case, point: &str) -> (World, Value) {
    let client = common::client_for(c).await;
    let prefix = format!("crash-{}", point.replace(':', "-"));
    let ns = common::namespace(&client, &prefix[..prefix.len().min(40)]).await;
    install_crd(c);
    // The source first: Keycloak's client has its secret already.
    let (source, credential, old) = match case.source {
        Source::Generated => (
            SourceWorld::Generated,
            json!({"generated": {}}),
            common::canary("old"),
        ),
        Source::Webhook => {
            let (url, hook) = hook_server(client.clone(), ns.clone()).await;
            (
                SourceWorld::Webhook(hook),
                webhook_credential(&url),
                common::canary("old"),
            )
        }
        Source::Manual => {
            let new = common::canary("manual-new");
            put_secret(&client, &ns, "manual-new", json!({"value": new})).await;
            let cred = json!({"manual": {"secretRef": {"name": "manual-new", "key": "value"}}});
            (SourceWorld::Manual(new), cred, common::canary("old"))
        }
        Source::Keycloak => {
            let kc = tokio::task::spawn_blocking(move || keycloak(c))
                .await
                .unwrap();
            let realm = format!("r{}", rand::random::<u32>());
            let (id, old) = kc
                .realm_with_client(&realm, "ai-component", Some(3600))
                .await;
            admin_secret(&client, &ns, kc).await;
            let calls = Arc::new(Mutex::new(KcCalls::default()));
            let counted = calls.clone();
            let proxy = keycloak_proxy(kc.url.clone(), move |method, path| {
                let mut calls = counted.lock().unwrap();
                if method == "POST" && path.ends_with("/client-secret") {
                    calls.regenerated += 1;
                }
                if method == "DELETE" && path.ends_with("/client-secret/rotated") {
                    calls.deleted += 1;
                }
                Proxied::Forward
            })
            .await;
            let cred = json!({"keycloak": {"url": proxy, "realm": realm, "clientId": "ai-component",
                "adminSecretRef": {"name": "keycloak-admin"}}});
            (
                SourceWorld::Keycloak {
                    kc,
                    realm,
                    id,
                    calls,
                },
                cred,
                old,
            )
        }
    };
    let (store, target) = match case.store {
        StoreKind::KubernetesSecret => {
            put_secret(&client, &ns, "source", json!({"client_secret": old})).await;
            kubernetes_secret_store(c, &client, &ns).await;
            external_secret(&client, &ns, "app-creds", "source").await;
            let target = json!({"kubernetesSecret": {"name": "source", "key": "client_secret", "adoptExisting": true}});
            (StoreWorld::Kubernetes, target)
        }
        StoreKind::Ibm => {
            let emu = IbmEmulator::start().await;
            let api_key = common::canary("ibm-api-key");
            emu.add_api_key(&api_key);
            put_secret(&client, &ns, "ibm-api-key", json!({"apikey": api_key})).await;
            let id = emu.create_secret("app", "arbitrary", json!(old));
            ibm_secret_store(c, &client, &ns, &emu).await;
            external_secret_from(&client, &ns, "app-creds", "ibm", json!({"key": id}), "1h").await;
            let target = json!({"ibmSecretsManager": {"serviceUrl": emu.url, "secretId": id, "iamUrl": emu.url,
                "apiKeySecretRef": {"name": "ibm-api-key", "key": "apikey"}}});
            (StoreWorld::Ibm(emu, id), target)
        }
        StoreKind::Moto => {
            let aws = aws_client(c);
            let name = format!("{ns}/app");
            aws.create_secret()
                .name(&name)
                .secret_string(&old)
                .send()
                .await
                .unwrap();
            aws_secret_store(&client, &ns).await;
            external_secret_from(&client, &ns, "app-creds", "aws", json!({"key": name}), "1h")
                .await;
            let target = json!({"awsSecretsManager": {"region": "us-east-1", "secretId": name,
                "credentialsSecretRef": {"name": "aws-creds"}, "endpoint": c.moto_url}});
            (StoreWorld::Moto(aws, name), target)
        }
    };
    let secret_values = watch_secret(&client, &ns);
    common::wait_for("initial ESO sync", Duration::from_secs(90), || async {
        read_key(&client, &ns, "app-creds", "client_secret")
            .await
            .as_deref()
            == Some(old.as_str())
    })
    .await;
    deployment(&client, &ns, "app", 2, "app-creds").await;
    common::wait_for("app available", Duration::from_secs(90), || async {
        deployment_available(&client, &ns, "app").await
    })
    .await;
    let mut held = None;
    let failing = case.ending != Ending::Succeeds;
    if failing {
        // One old pod stays Terminating: the drain proof never completes,
        // the rotation fails after its rollout (DrainTimeout).
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let name = pods
            .list(&ListParams::default().labels("app=app"))
            .await
            .unwrap()
            .items[0]
            .name_any();
        let hold = json!({"metadata": {"finalizers": [HOLD]}});
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&hold))
            .await
            .unwrap();
        held = Some(name);
    }
    let mut spec = json!({
        "credential": credential,
        "oldValueValidFor": "30m",
        "targets": [{"name": "main"}],
        "proof": {
            "externalSecrets": [{"name": "app-creds", "key": "client_secret"}],
            "workloads": [{"kind": "Deployment", "name": "app"}],
            "timeout": if failing { "20s" } else { "120s" }
        },
        "onFailure": if case.ending == Ending::RollsBack { "Rollback" } else { "Hold" }
    });
    let t = target.as_object().unwrap();
    for (k, v) in t {
        spec["targets"][0][k] = v.clone();
    }
    let world = World {
        client,
        ns,
        old,
        source,
        store,
        secret_values,
        held,
        kc_token: Mutex::new(None),
    };
    (world, spec)
}

// ---- one point ----

struct Row {
    case: String,
    point: String,
    outcome: Result<String, String>,
    seconds: f64,
}

fn before_invalidating(phase: Option<Phase>) -> bool {
    matches!(
        phase,
        None | Some(
            Phase::Pending
                | Phase::AwaitingApproval
                | Phase::Preflight
                | Phase::Issuing
                | Phase::Writing
                | Phase::AwaitingSync
                | Phase::AwaitingRollout
                | Phase::Verifying
        )
    )
}

/// When the operator has crashed: notes where (the phase last written) and
/// starts it again as after a crash, without the failpoint.
fn crash_check(op: &mut Operator, crashed_in: &mut Option<String>, phase: Option<Phase>) -> bool {
    if crashed_in.is_none() && op.exited() {
        *crashed_in = Some(phase.map_or("-".into(), |p| p.to_string()));
        op.set_env(&[]);
        op.restart();
        return true;
    }
    false
}

fn in_progress(sr: &rekey::crd::SecretRotation) -> bool {
    sr.status.as_ref().is_some_and(|s| s.rotation.is_some())
}

/// Until Invalidating the rotated slot holds the original (or, before the
/// regenerate, nothing): the slot is read first, the phase after, so a
/// phase before Invalidating was also the phase when the slot was read.
async fn check_rotated_slot(w: &World) -> Result<(), String> {
    let Some((rotated, _)) = w.keycloak_slots().await else {
        return Ok(());
    };
    let sr = get_rotation(&w.client, &w.ns, NAME).await;
    let phase = phase_of(&sr);
    // Past Issuing rekey has Keycloak's answer to its regenerate call, so
    // the old secret is in the slot by then; during Issuing it may be on
    // its way.
    let issued = !matches!(
        phase,
        None | Some(Phase::Pending | Phase::AwaitingApproval | Phase::Preflight | Phase::Issuing)
    );
    if in_progress(&sr) && before_invalidating(phase) {
        let ok = match &rotated {
            Some(r) => *r == w.old,
            None => !issued,
        };
        if !ok {
            return Err(format!(
                "in {phase:?} the rotated slot holds {}",
                if rotated.is_some() {
                    "another secret than the original"
                } else {
                    "nothing after the regenerate"
                }
            ));
        }
    }
    Ok(())
}

/// A copy of the operator binary Cargo built for these tests, checked to
/// have the failpoints: a plain `cargo build` in the same target directory
/// (e.g. `make build` while the tests run) replaces `CARGO_BIN_EXE_rekey`
/// with a build without them.
fn failpoint_binary(c: &Cluster) -> std::path::PathBuf {
    let bytes = std::fs::read(REKEY).unwrap();
    let marker = b"REKEY_FAILPOINT";
    assert!(
        bytes.windows(marker.len()).any(|w| w == marker),
        "{REKEY} was built without the failpoints feature (a `cargo build` replaced the test build): run the tests again"
    );
    let copy = c
        .dir
        .join(format!("rekey-failpoints-{}", std::process::id()));
    std::fs::write(&copy, &bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

async fn run_point(
    c: &'static Cluster,
    bin: std::path::PathBuf,
    case: Case,
    point: String,
) -> Result<String, String> {
    let (w, spec) = prepare(c, case, &point).await;
    let client = &w.client;
    let ns = &w.ns;
    let mut op = Operator::start_with_env(&bin, c, ns, &[("REKEY_FAILPOINT", &point)]);
    create_rotation(client, ns, NAME, spec).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut crashed_in: Option<String> = None;
    let mut confirmed = false;
    let mut last_phase = None;
    let sr = loop {
        let sr = get_rotation(client, ns, NAME).await;
        let phase = phase_of(&sr);
        if crash_check(&mut op, &mut crashed_in, phase) {
            check_rotated_slot(&w).await?;
            continue;
        }
        if phase != last_phase {
            check_rotated_slot(&w).await?;
            last_phase = phase;
        }
        if phase == Some(Phase::AwaitingConfirmation)
            && !confirmed
            && let SourceWorld::Manual(new) = &w.source
        {
            // A person confirms only once the proof holds.
            let synced = read_key(client, ns, "app-creds", "client_secret").await;
            if synced.as_deref() != Some(new) || !deployment_available(client, ns, "app").await {
                return Err("AwaitingConfirmation before the proof held".into());
            }
            let id = sr
                .status
                .as_ref()
                .unwrap()
                .rotation
                .as_ref()
                .unwrap()
                .id
                .clone();
            annotate_rotation(client, ns, NAME, CONFIRM_ANNOTATION, &id).await;
            confirmed = true;
        }
        if phase.is_some_and(Phase::is_terminal) && !in_progress(&sr) {
            break sr;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the rotation did not end: {}",
                serde_json::to_string(&sr.status).unwrap()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A crash right after the final status write (deleting the record,
    // releasing the claims) comes moments later: look for it a while.
    let settle = Instant::now();
    while crashed_in.is_none() && settle.elapsed() < Duration::from_secs(5) {
        crash_check(&mut op, &mut crashed_in, phase_of(&sr));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = phase_of(&sr).unwrap();
    let want = if case.ending == Ending::Succeeds {
        Phase::Succeeded
    } else {
        Phase::Failed
    };
    if result != want {
        return Err(format!(
            "ended {result}, wanted {want}: {}",
            serde_json::to_string(&sr.status.as_ref().unwrap().last_rotation).unwrap()
        ));
    }
    let last = sr.status.as_ref().unwrap().last_rotation.clone().unwrap();
    if case.ending != Ending::Succeeds {
        let reason = last
            .failure
            .as_ref()
            .map(|f| f.reason.clone())
            .unwrap_or_default();
        if reason != "DrainTimeout" {
            return Err(format!("failed with {reason}, wanted DrainTimeout"));
        }
        if last.rolled_back != (case.ending == Ending::RollsBack) {
            return Err(format!("rolled_back is {}", last.rolled_back));
        }
    }
    let mut facts = vec![];
    let mut broken = vec![];
    // What the store, the synced Secret and the source hold.
    let stored = w.store_value().await.unwrap_or_default();
    let synced = read_key(client, ns, "app-creds", "client_secret")
        .await
        .unwrap_or_default();
    if stored != synced {
        broken.push("the synced Secret differs from the store".to_string());
    }
    match case.ending {
        Ending::RollsBack if stored != w.old => {
            broken.push("the store does not hold the old value again".into())
        }
        Ending::Succeeds | Ending::Holds if stored == w.old => {
            broken.push("the store still holds the old value".into())
        }
        _ => {}
    }
    let versions = w.store_versions().await;
    facts.push(format!("{versions} store version(s)"));
    if versions != case.expected_versions() {
        broken.push(format!(
            "{versions} store versions, wanted {}",
            case.expected_versions()
        ));
    }
    let rollouts = revisions(client, ns, "app").await - 1;
    facts.push(format!("{rollouts} rollout(s)"));
    if rollouts != case.expected_rollouts() {
        broken.push(format!(
            "{rollouts} rollouts, wanted {}",
            case.expected_rollouts()
        ));
    }
    let invalidates = case.ending == Ending::Succeeds;
    match &w.source {
        SourceWorld::Generated => {}
        SourceWorld::Manual(new) => {
            if case.ending != Ending::RollsBack && stored != *new {
                broken.push("the store does not hold the person's value".into());
            }
            if confirmed != invalidates {
                broken.push("confirmation asked for against the proof".into());
            }
        }
        SourceWorld::Webhook(hook) => {
            let hook = hook.lock().unwrap();
            facts.push(format!(
                "{} issued ({} call(s))",
                hook.issued.len(),
                hook.issue_calls
            ));
            if hook.issued.len() != 1 {
                broken.push(format!("{} credentials issued", hook.issued.len()));
            }
            let new = hook.issued.values().next().cloned().unwrap_or_default();
            if case.ending != Ending::RollsBack && stored != new {
                broken.push("the store does not hold the issued value".into());
            }
            let keys: std::collections::BTreeSet<&String> =
                hook.invalidated.iter().map(|(k, _)| k).collect();
            facts.push(format!(
                "{} invalidated ({} call(s))",
                keys.len(),
                hook.invalidated.len()
            ));
            if keys.len() != usize::from(invalidates) {
                broken.push(format!("{} invalidations", keys.len()));
            }
            if hook.invalidated.iter().any(|(_, proven)| !proven) {
                broken.push("invalidated before the proof".into());
            }
        }
        SourceWorld::Keycloak { calls, .. } => {
            let (regenerated, deleted) = {
                let c = calls.lock().unwrap();
                (c.regenerated, c.deleted)
            };
            facts.push(format!(
                "{regenerated} regenerated, {deleted} rotated deleted"
            ));
            if regenerated != 1 {
                broken.push(format!("Keycloak regenerated {regenerated} times"));
            }
            let (rotated, current) = w.keycloak_slots().await.unwrap();
            if rotated.is_some() {
                broken.push("the rotated slot still holds a secret after Invalidating".into());
            }
            if current != stored {
                broken.push("Keycloak's current secret is not the one the store holds".into());
            }
        }
    }
    // No copy of the value lingers: a record left by a crash before its
    // deletion is swept by the restarted operator.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let record = rekey::wal::secret_name(NAME);
    let swept = Instant::now();
    while secrets.get_opt(&record).await.unwrap().is_some() {
        if swept.elapsed() > Duration::from_secs(60) {
            broken.push("the write-ahead record (a copy of the value) was left behind".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(held) = &w.held {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let release = json!({"metadata": {"finalizers": null}});
        let _ = pods
            .patch(held, &PatchParams::default(), &Patch::Merge(&release))
            .await;
    }
    // The deletion, where the point is still ahead (removing the
    // finalizer): it comes off once the rotation has ended.
    let api: Api<rekey::crd::SecretRotation> = Api::namespaced(client.clone(), ns);
    if crashed_in.is_none() {
        api.delete(NAME, &DeleteParams::default()).await.unwrap();
    }
    while crashed_in.is_none() || point.ends_with(":remove-finalizer") {
        let phase = api.get_opt(NAME).await.unwrap();
        if crash_check(&mut op, &mut crashed_in, None) {
            continue;
        }
        if phase.is_none() {
            break;
        }
        if Instant::now() > deadline {
            return Err("the SecretRotation was not deleted".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut values = vec![w.old.as_str(), stored.as_str()];
    if let SourceWorld::Keycloak { kc, .. } = &w.source {
        values.push(&kc.admin_password);
    }
    assert_never_leaked(client, ns, &op.logs(), &op.scrape().await, &values).await;
    let Some(crashed_in) = crashed_in else {
        return Err("point not reached: the operator never crashed".into());
    };
    if !op
        .logs()
        .contains(&format!("rekey failpoint {point}: aborting"))
    {
        return Err("the operator ended, but not at its failpoint".into());
    }
    if !broken.is_empty() {
        return Err(broken.join("; "));
    }
    Ok(format!(
        "crashed in {crashed_in}; {result}; {}",
        facts.join(", ")
    ))
}

// ---- the matrix ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_at_every_side_effect_completes_the_rotation_exactly_once() {
    let started = Instant::now();
    let c = common::cluster();
    let full = std::env::var("REKEY_CRASH_MATRIX").as_deref() == Ok("full");
    let parallel: usize = std::env::var("REKEY_CRASH_PARALLEL")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(10);
    let cases = cases(full);
    let bin = failpoint_binary(c);
    // REKEY_CRASH_ONLY=<text>[;<text>]: only the points whose "case point"
    // contains one of them (to re-run one).
    let only: Vec<String> = std::env::var("REKEY_CRASH_ONLY")
        .unwrap_or_default()
        .split(';')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let keycloak_wanted = only.is_empty() || only.iter().any(|o| o.contains("keycloak"));
    if keycloak_wanted && cases.iter().any(|c| c.source == Source::Keycloak) {
        // Starts while the other cases run.
        tokio::task::spawn_blocking(move || {
            keycloak(c);
        });
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut runs = vec![];
    for case in &cases {
        for effect in case.covered_effects(full) {
            for when in ["before", "after"] {
                let point = format!("{when}:{effect}");
                if !only.is_empty()
                    && !only
                        .iter()
                        .any(|o| format!("{} {point}", case.name()).contains(o.as_str()))
                {
                    continue;
                }
                let (case, permits, bin) = (*case, permits.clone(), bin.clone());
                runs.push(tokio::spawn(async move {
                    let _permit = permits.acquire_owned().await.unwrap();
                    let begin = Instant::now();
                    let run = tokio::spawn(run_point(c, bin, case, point.clone()));
                    let outcome = match run.await {
                        Ok(o) => o,
                        Err(e) => Err(format!("panicked: {}", panic_text(e))),
                    };
                    Row {
                        case: case.name(),
                        point,
                        outcome,
                        seconds: begin.elapsed().as_secs_f64(),
                    }
                }));
            }
        }
    }
    let mut rows = vec![];
    for r in runs {
        rows.push(r.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();

    eprintln!(
        "\ncrash matrix ({} mode, {parallel} at once):",
        if full { "full" } else { "covering" }
    );
    eprintln!("{:<40} {:<36} {:>5}  outcome", "case", "point", "s");
    for r in &rows {
        let outcome = match &r.outcome {
            Ok(t) => format!("ok: {t}"),
            Err(e) => format!("FAILED: {e}"),
        };
        eprintln!(
            "{:<40} {:<36} {:>5.1}  {outcome}",
            r.case, r.point, r.seconds
        );
    }
    let passed = rows.iter().filter(|r| r.outcome.is_ok()).count();
    eprintln!("{passed}/{} points passed in {wall:.0}s", rows.len());

    let per_case: Vec<Value> = cases
        .iter()
        .map(|case| {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.case == case.name()).collect();
            json!({
                "case": case.name(),
                "source": format!("{:?}", case.source),
                "store": format!("{:?}", case.store),
                "ending": format!("{:?}", case.ending),
                "failpoints": mine.len(),
                "effects": case.covered_effects(full),
                "passed": mine.iter().filter(|r| r.outcome.is_ok()).count(),
            })
        })
        .collect();
    let figures = json!({
        "mode": if full { "full" } else { "covering" },
        "parallel": parallel,
        "points": rows.len(),
        "passed": passed,
        "wall_seconds": wall,
        "cases": per_case,
        "slowest_point_seconds": rows.iter().map(|r| r.seconds).fold(0.0, f64::max),
        "failed": rows
            .iter()
            .filter_map(|r| r.outcome.as_ref().err().map(|e| format!("{} {}: {e}", r.case, r.point)))
            .collect::<Vec<_>>(),
    });
    let dir = common::repo_root().join("target/reliability");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("crash.json"),
        serde_json::to_string_pretty(&figures).unwrap(),
    )
    .unwrap();

    let failed: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.outcome
                .as_ref()
                .err()
                .map(|e| format!("{} {}: {e}", r.case, r.point))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "crash points that broke an invariant:\n{}",
        failed.join("\n")
    );
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
        Err(e) => e.to_string(),
    }
}
