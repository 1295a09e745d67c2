//! The `rekey::store::Store` contract (src/store/mod.rs), checked once by one
//! generic function against each real store: a Kubernetes Secret on the
//! test API server, IBM Cloud Secrets Manager on the emulator in
//! testenv/harness/src/ibm.rs and AWS Secrets Manager on moto.
//!
//! Every guarantee is checked to the end and reported in a table
//! (store | guarantee | result); the test then fails naming every guarantee
//! that broke, not only the first.

use rekey_testenv as common;

use aws_sdk_secretsmanager::Client as Aws;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use common::fixtures::put_secret;
use common::ibm::IbmEmulator;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use rekey::crd::{AwsSecretsManagerTarget, IbmSecretsManagerTarget, KubernetesSecretTarget};
use rekey::store::Store;
use rekey::store::aws::AwsSecretsManagerStore;
use rekey::store::ibm::IbmSecretsManagerStore;
use rekey::store::kubernetes::KubernetesSecretStore;
use rekey::value::SecretValue;
use serde_json::json;

const AWS_KEY: &str = "AKIAREKEYTEST0000001";
const AWS_SECRET: &str = "rekey-test-secret-access-key";

const PREFLIGHT: &str = "preflight succeeds on a configured store";
const READ_SEEDED: &str = "read_current returns the value already stored";
const WRITE_READ: &str = "after write, read_current returns the written value";
const WRITE_VERSION: &str = "write returns the version the backend now serves";
const IDEMPOTENT: &str = "write twice with one rotation id: same version, one new version";
const LOST_RESPONSE: &str =
    "write again by a fresh store after a lost response: same version, no second one";
const RESTORE: &str = "restore makes the previous value current again";
const RESTORE_IDEMPOTENT: &str =
    "restore repeated (same and fresh store): same version, no new version";

/// What the contract needs to know of a backend beyond the `Store` trait.
trait Backend {
    /// A new store object for the entry, as a restarted operator builds it.
    fn store(&self) -> Box<dyn Store>;
    /// How many versions the backend keeps of the entry; None where it keeps
    /// no versions (a Kubernetes Secret).
    async fn versions(&self) -> Option<usize>;
    /// The id of the version readers get now, in the form `write` returns.
    async fn current_version(&self) -> String;
    /// Leaves the backend as a `write(value, rotation_id)` by `store` would
    /// whose response was lost after the backend did the work.
    async fn lose_write_response(&self, store: &dyn Store, value: &SecretValue, rotation_id: &str);
}

/// Results per guarantee, in the order they were first checked.
struct Report {
    store: &'static str,
    rows: Vec<(&'static str, Vec<String>)>,
}

impl Report {
    fn new(store: &'static str) -> Self {
        Self {
            store,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, guarantee: &'static str) -> &mut Vec<String> {
        let i = match self.rows.iter().position(|(g, _)| *g == guarantee) {
            Some(i) => i,
            None => {
                self.rows.push((guarantee, Vec::new()));
                self.rows.len() - 1
            }
        };
        &mut self.rows[i].1
    }

    fn ensure(&mut self, guarantee: &'static str, ok: bool, detail: impl FnOnce() -> String) {
        let row = self.row(guarantee);
        if !ok {
            row.push(detail());
        }
    }

    fn check(&mut self, guarantee: &'static str, result: Result<(), String>) {
        let row = self.row(guarantee);
        if let Err(e) = result {
            row.push(e);
        }
    }

    /// The result of a store call, or None after recording its error.
    fn call<T>(
        &mut self,
        guarantee: &'static str,
        what: &str,
        r: rekey::error::Result<T>,
    ) -> Option<T> {
        let row = self.row(guarantee);
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                row.push(format!("{what} failed: {e}"));
                None
            }
        }
    }

    /// Prints the table, then fails naming every broken guarantee.
    fn finish(self) {
        let width = self.rows.iter().map(|(g, _)| g.len()).max().unwrap_or(0);
        let mut table = format!("\nstore contract: {}\n", self.store);
        for (g, failures) in &self.rows {
            let result = if failures.is_empty() { "ok" } else { "BROKEN" };
            table.push_str(&format!("| {} | {g:width$} | {result} |\n", self.store));
        }
        println!("{table}");
        let broken: Vec<String> = self
            .rows
            .iter()
            .filter(|(_, f)| !f.is_empty())
            .map(|(g, f)| format!("guarantee \"{g}\" broke:\n    - {}", f.join("\n    - ")))
            .collect();
        assert!(
            broken.is_empty(),
            "the {} store breaks the Store contract:\n  {}",
            self.store,
            broken.join("\n  ")
        );
    }
}

/// A rotation id as the controller makes them (AWS derives a 32 to 64
/// character ClientRequestToken from it).
fn rotation_id() -> String {
    let now = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S");
    format!("{now}-{:08x}", rand::random::<u32>())
}

/// Names a read value by the test value it equals, so that no value is printed.
fn describe(got: &Option<SecretValue>, known: &[(&str, &SecretValue)]) -> String {
    match got {
        None => "no value".into(),
        Some(g) => known
            .iter()
            .find(|(_, v)| v.expose() == g.expose())
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| "an unknown value".into()),
    }
}

async fn holds(
    store: &dyn Store,
    want: &str,
    known: &[(&str, &SecretValue)],
) -> Result<(), String> {
    let want_value = known.iter().find(|(n, _)| *n == want).unwrap().1;
    match store.read_current().await {
        Err(e) => Err(format!("read_current failed: {e}")),
        Ok(got) if got.as_ref().map(SecretValue::expose) == Some(want_value.expose()) => Ok(()),
        Ok(got) => Err(format!(
            "read_current returned {} instead of {want}",
            describe(&got, known)
        )),
    }
}

fn plus(n: Option<usize>, k: usize) -> Option<usize> {
    n.map(|n| n + k)
}

/// The guarantees of `Store`, checked on `store`, whose entry holds `seeded`.
async fn store_contract(
    name: &'static str,
    store: &dyn Store,
    backend: &impl Backend,
    seeded: &SecretValue,
) -> Report {
    let mut r = Report::new(name);
    let v1 = SecretValue::new(common::canary("v1"));
    let v2 = SecretValue::new(common::canary("v2"));
    let known = [("the seeded value", seeded), ("v1", &v1), ("v2", &v2)];
    let (rot1, rot2) = (rotation_id(), rotation_id());

    // Preflight and a first read.
    let pf = store.preflight().await;
    r.call(PREFLIGHT, "preflight()", pf);
    r.check(READ_SEEDED, holds(store, "the seeded value", &known).await);
    let base = backend.versions().await;

    // write, then read.
    let w = store.write(&v1, &rot1).await;
    let id1 = r.call(WRITE_READ, "write(v1, rot-1)", w);
    r.check(WRITE_READ, holds(store, "v1", &known).await);
    let current = backend.current_version().await;
    r.ensure(
        WRITE_VERSION,
        id1.as_ref() == Some(&current),
        || match &id1 {
            Some(id1) => {
                format!("write(v1, rot-1) returned version {id1}; the backend serves {current}")
            }
            None => "write(v1, rot-1) returned no version (it failed)".into(),
        },
    );

    // The same write again, same store.
    let before = backend.current_version().await;
    let w = store.write(&v1, &rot1).await;
    if let Some(again) = r.call(IDEMPOTENT, "second write(v1, rot-1)", w) {
        r.ensure(IDEMPOTENT, id1.as_ref() == Some(&again), || {
            format!("first write returned {id1:?}, the second {again}")
        });
    }
    let n = backend.versions().await;
    r.ensure(IDEMPOTENT, n == plus(base, 1), || {
        format!(
            "{n:?} versions after two writes of rot-1; expected {:?}",
            plus(base, 1)
        )
    });
    let after = backend.current_version().await;
    r.ensure(IDEMPOTENT, before == after, || {
        format!("the second write changed the backend's version from {before} to {after}")
    });
    r.check(IDEMPOTENT, holds(store, "v1", &known).await);

    // A write whose response was lost, repeated by a restarted operator.
    backend.lose_write_response(store, &v2, &rot2).await;
    let mut lost_ids = Vec::new();
    for attempt in ["first", "second"] {
        let fresh = backend.store();
        let w = fresh.write(&v2, &rot2).await;
        let what = format!("write(v2, rot-2) by a {attempt} fresh store");
        if let Some(id) = r.call(LOST_RESPONSE, &what, w) {
            let current = backend.current_version().await;
            r.ensure(LOST_RESPONSE, id == current, || {
                format!("{what} returned version {id}; the backend serves {current}")
            });
            lost_ids.push(id);
        }
        let n = backend.versions().await;
        r.ensure(LOST_RESPONSE, n == plus(base, 2), || {
            format!(
                "{n:?} versions after rot-1 and {what}; expected {:?}",
                plus(base, 2)
            )
        });
        r.check(LOST_RESPONSE, holds(&*fresh, "v2", &known).await);
    }
    r.ensure(
        LOST_RESPONSE,
        lost_ids.windows(2).all(|w| w[0] == w[1]),
        || format!("repeated writes of rot-2 returned different versions: {lost_ids:?}"),
    );

    // Rollback of rot-2 to v1, three times: same store twice, then a fresh one.
    let n_before_restore = backend.versions().await;
    let rs = store.restore(&v1, &rot2).await;
    let restored = r.call(RESTORE, "restore(v1, rot-2)", rs);
    r.check(RESTORE, holds(store, "v1", &known).await);
    let current = backend.current_version().await;
    if let Some(id) = &restored {
        r.ensure(RESTORE, *id == current, || {
            format!("restore returned version {id}; the backend serves {current}")
        });
    }
    let n_restored = backend.versions().await;
    r.ensure(
        RESTORE,
        n_restored >= n_before_restore && n_restored <= plus(n_before_restore, 1),
        || format!("{n_before_restore:?} versions before restore, {n_restored:?} after"),
    );
    for (who, s) in [
        ("the same store", None),
        ("a fresh store", Some(backend.store())),
    ] {
        let s: &dyn Store = s.as_deref().unwrap_or(store);
        let what = format!("restore(v1, rot-2) repeated by {who}");
        let rs = s.restore(&v1, &rot2).await;
        if let Some(id) = r.call(RESTORE_IDEMPOTENT, &what, rs) {
            r.ensure(RESTORE_IDEMPOTENT, restored.as_ref() == Some(&id), || {
                format!("{what} returned {id}; the first restore {restored:?}")
            });
        }
        let n = backend.versions().await;
        r.ensure(RESTORE_IDEMPOTENT, n == n_restored, || {
            format!("{what}: {n:?} versions, {n_restored:?} after the first restore")
        });
        let now = backend.current_version().await;
        r.ensure(RESTORE_IDEMPOTENT, now == current, || {
            format!("{what} changed the backend's version from {current} to {now}")
        });
        r.check(RESTORE_IDEMPOTENT, holds(s, "v1", &known).await);
    }
    r
}

// --- Kubernetes Secret --------------------------------------------------------

struct KubeBackend {
    client: Client,
    ns: String,
    target: KubernetesSecretTarget,
}

impl KubeBackend {
    async fn secret(&self) -> Secret {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .get(&self.target.name)
            .await
            .unwrap()
    }
}

impl Backend for KubeBackend {
    fn store(&self) -> Box<dyn Store> {
        Box::new(KubernetesSecretStore::new(
            self.client.clone(),
            &self.target,
            &self.ns,
            &format!("rekey/{}/contract/kube", self.ns),
        ))
    }

    async fn versions(&self) -> Option<usize> {
        None
    }

    async fn current_version(&self) -> String {
        self.secret()
            .await
            .metadata
            .resource_version
            .unwrap_or_default()
    }

    async fn lose_write_response(&self, store: &dyn Store, value: &SecretValue, rotation_id: &str) {
        // The apply reached the API server; its answer is dropped here.
        let _ = store.write(value, rotation_id).await;
    }
}

#[tokio::test]
async fn kubernetes_secret_store_keeps_the_store_contract() {
    let (_c, client, ns) = common::setup("contract-kube").await;
    let seeded = SecretValue::new(common::canary("kube-seeded"));
    put_secret(
        &client,
        &ns,
        "app-creds",
        json!({"password": seeded.expose()}),
    )
    .await;
    let backend = KubeBackend {
        client,
        ns,
        target: KubernetesSecretTarget {
            namespace: None,
            name: "app-creds".into(),
            key: "password".into(),
            // The seeded Secret was not created by rekey.
            adopt_existing: true,
        },
    };
    let store = backend.store();
    store_contract("kubernetesSecret", &*store, &backend, &seeded)
        .await
        .finish();
}

// --- IBM Cloud Secrets Manager (emulator) --------------------------------------

struct IbmBackend {
    emu: IbmEmulator,
    secret_id: String,
    api_key: String,
}

impl Backend for IbmBackend {
    fn store(&self) -> Box<dyn Store> {
        let target: IbmSecretsManagerTarget = serde_json::from_value(json!({
            "serviceUrl": self.emu.url, "secretId": self.secret_id, "iamUrl": self.emu.url,
            "apiKeySecretRef": {"name": "ibm-api-key", "key": "apikey"}
        }))
        .unwrap();
        Box::new(IbmSecretsManagerStore::new(
            reqwest::Client::new(),
            rekey::metrics::Metrics::new(),
            &target,
            SecretValue::new(self.api_key.clone()),
        ))
    }

    async fn versions(&self) -> Option<usize> {
        Some(self.emu.secret(&self.secret_id).versions.len())
    }

    async fn current_version(&self) -> String {
        let s = self.emu.secret(&self.secret_id);
        s.versions.last().unwrap().id.clone()
    }

    async fn lose_write_response(&self, store: &dyn Store, value: &SecretValue, rotation_id: &str) {
        // The emulator creates the version, then answers 504.
        self.emu.state.lock().unwrap().fail_after_create = vec![504];
        let before = self.emu.secret(&self.secret_id).versions.len();
        let r = store.write(value, rotation_id).await;
        assert!(
            r.is_err(),
            "setup: a write whose response is lost must fail"
        );
        assert_eq!(
            self.emu.secret(&self.secret_id).versions.len(),
            before + 1,
            "setup: the emulator created the version before dropping its answer"
        );
    }
}

#[tokio::test]
async fn ibm_secrets_manager_store_keeps_the_store_contract() {
    rekey::install_crypto_provider();
    let emu = IbmEmulator::start().await;
    let api_key = common::canary("ibm-api-key");
    emu.add_api_key(&api_key);
    let seeded = SecretValue::new(common::canary("ibm-seeded"));
    let secret_id = emu.create_secret("contract", "arbitrary", json!(seeded.expose()));
    let backend = IbmBackend {
        emu,
        secret_id,
        api_key,
    };
    let store = backend.store();
    store_contract("ibmSecretsManager", &*store, &backend, &seeded)
        .await
        .finish();
}

// --- AWS Secrets Manager (moto) -------------------------------------------------

struct AwsBackend {
    aws: Aws,
    target: AwsSecretsManagerTarget,
}

impl Backend for AwsBackend {
    fn store(&self) -> Box<dyn Store> {
        Box::new(AwsSecretsManagerStore::new(
            rekey::metrics::Metrics::new(),
            &self.target,
            SecretValue::new(AWS_KEY),
            SecretValue::new(AWS_SECRET),
            None,
        ))
    }

    async fn versions(&self) -> Option<usize> {
        let listed = self
            .aws
            .list_secret_version_ids()
            .secret_id(&self.target.secret_id)
            .include_deprecated(true)
            .send()
            .await
            .unwrap();
        Some(listed.versions.unwrap_or_default().len())
    }

    async fn current_version(&self) -> String {
        let d = self
            .aws
            .describe_secret()
            .secret_id(&self.target.secret_id)
            .send()
            .await
            .unwrap();
        d.version_ids_to_stages
            .unwrap_or_default()
            .into_iter()
            .find(|(_, s)| s.iter().any(|l| l == "AWSCURRENT"))
            .map(|(v, _)| v)
            .unwrap_or_default()
    }

    async fn lose_write_response(&self, _: &dyn Store, value: &SecretValue, rotation_id: &str) {
        // The store's PutSecretValue reached AWS (the version exists, staged
        // AWSPENDING); its answer was lost and the operator stopped.
        self.aws
            .put_secret_value()
            .secret_id(&self.target.secret_id)
            .client_request_token(rekey::store::aws::version_id(rotation_id))
            .secret_string(value.expose())
            .version_stages("AWSPENDING")
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn aws_secrets_manager_store_keeps_the_store_contract() {
    let c = common::cluster();
    rekey::install_crypto_provider();
    let moto = c.moto_url.clone().expect("the harness starts moto");
    let aws = Aws::from_conf(
        aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(AWS_KEY, AWS_SECRET, None, None, "test"))
            .endpoint_url(&moto)
            .build(),
    );
    let name = format!("contract-{}", rand::random::<u32>());
    let seeded = SecretValue::new(common::canary("aws-seeded"));
    aws.create_secret()
        .name(&name)
        .secret_string(seeded.expose())
        .send()
        .await
        .unwrap();
    let target: AwsSecretsManagerTarget = serde_json::from_value(json!({
        "region": "us-east-1", "secretId": name, "endpoint": moto,
        "credentialsSecretRef": {"name": "aws-creds"}
    }))
    .unwrap();
    let backend = AwsBackend { aws, target };
    let store = backend.store();
    store_contract("awsSecretsManager", &*store, &backend, &seeded)
        .await
        .finish();
}
