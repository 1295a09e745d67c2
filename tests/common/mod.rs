//! Shared by every integration test binary: one real cluster per binary,
//! a fresh namespace per test, and small wait helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod fixtures;
pub mod ibm;
pub mod keycloak;
pub mod operator;

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub use cluster::{Cluster, Options};

// A failed start is kept too: every test then fails with its message instead
// of starting the environment again.
static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The cluster of this test binary, started on first use with `opts`
/// (later callers share it). Startup runs on its own thread so it can be
/// called from inside any test's runtime.
pub fn cluster_with(opts: Options) -> &'static Cluster {
    let started = CLUSTER.get_or_init(|| {
        std::thread::spawn(move || {
            let bin = std::env::current_exe().unwrap();
            let name = bin.file_name().unwrap().to_string_lossy().into_owned();
            let dir = cluster::repo_root()
                .join("target/testenv-runs")
                .join(format!("{name}-{}", std::process::id()));
            Cluster::start(&dir, &opts).map_err(|e| format!("{e:#}"))
        })
        .join()
        .unwrap_or_else(|_| Err("the cluster start thread panicked".into()))
    });
    match started {
        Ok(c) => c,
        Err(e) => panic!("test environment failed to start: {e}"),
    }
}

pub fn cluster() -> &'static Cluster {
    cluster_with(Options::default())
}

/// A client for the current test's runtime.
pub async fn client_for(c: &Cluster) -> Client {
    rekey::install_crypto_provider();
    let kc = Kubeconfig::read_from(&c.kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Creates a namespace named after the test with a unique suffix.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let name = format!("{}-{suffix}", prefix.replace('_', "-"));
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"rekey.dev/test": "true"}}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    // Pods are refused until the ServiceAccount controller made `default`.
    // Each read has its own timeout, so a stuck API server cannot stretch the
    // deadline; on failure the message carries kube-controller-manager's
    // status and log tail.
    let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), &name);
    let timeout = Duration::from_secs(30);
    let start = Instant::now();
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), sa.get_opt("default")).await;
        if let Ok(Ok(Some(_))) = read {
            break;
        }
        if start.elapsed() > timeout {
            let diagnosis = match CLUSTER.get() {
                Some(Ok(c)) => c.diagnose("kube-controller-manager"),
                _ => String::new(),
            };
            panic!(
                "timed out after {timeout:?} waiting for the default ServiceAccount in {name} \
                 (last read: {read:?})\n{diagnosis}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    name
}

/// The usual start of a test: the binary's cluster, a client, a fresh namespace.
pub async fn setup(prefix: &str) -> (&'static Cluster, Client, String) {
    let c = cluster();
    let client = client_for(c).await;
    let ns = namespace(&client, prefix).await;
    (c, client, ns)
}

/// Polls `check` every 200 ms until it returns true; panics after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A random value that must never show up in logs, Events or status.
pub fn canary(tag: &str) -> String {
    use rand::RngExt;
    let s: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("canary-{tag}-{s}")
}
