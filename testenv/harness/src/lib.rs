//! rekey's test environment (used by `tests/it/` and `make cluster`): one
//! shared cluster per test process ([`cluster`], [`setup`]), started on first
//! use, where each test stays in namespaces of its own; and private clusters
//! ([`private_cluster`], [`setup_private`]) for tests that need other
//! [`Options`], restart or kill components, run rekey cluster-wide, run
//! several replicas, or need a second cluster. Binary paths Cargo gives only
//! to the rekey package's tests (`CARGO_BIN_EXE_*`) are passed in.

pub mod audit;
pub mod cluster;
pub mod fixtures;
pub mod ibm;
pub mod keycloak;
pub mod leaks;
pub mod operator;
pub mod proxy;
pub mod recorder;
pub mod reliability;
pub mod servicenow;

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub use cluster::{Cluster, Options, repo_root};

// A failed start is kept too: every test then fails with its message instead
// of starting the environment again.
static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// `target/testenv-runs/<test binary>-<pid>`: every cluster of this process
/// has a directory in it. The first call drops the etcd data of runs whose
/// process is gone (about 125 MiB per cluster; their logs stay).
fn run_dir() -> PathBuf {
    static PRUNED: std::sync::Once = std::sync::Once::new();
    let runs = repo_root().join("target/testenv-runs");
    PRUNED.call_once(|| prune_finished_runs(&runs));
    let bin = std::env::current_exe().unwrap();
    let name = bin.file_name().unwrap().to_string_lossy().into_owned();
    runs.join(format!("{name}-{}", std::process::id()))
}

/// Removes the `etcd` directories of run directories whose process (the pid
/// after the last `-`) no longer runs.
fn prune_finished_runs(runs: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return;
    };
    for run in entries.flatten() {
        let name = run.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_none_or(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if alive {
            continue;
        }
        // The run's own clusters, and private ones one level down.
        let _ = std::fs::remove_dir_all(run.path().join("etcd"));
        for cluster in std::fs::read_dir(run.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir_all(cluster.path().join("etcd"));
        }
    }
}

/// Starts a cluster in `dir` on a thread of its own, so that it can be called
/// from inside any test's runtime (the start uses blocking HTTP clients).
fn start_in(dir: PathBuf, opts: Options) -> Result<Cluster, String> {
    std::thread::spawn(move || Cluster::start(&dir, &opts).map_err(|e| format!("{e:#}")))
        .join()
        .unwrap_or_else(|_| Err("the cluster start thread panicked".into()))
}

/// The shared cluster of this test process (default [`Options`]), started on
/// first use. Tests on it stay in their own namespaces.
pub fn cluster() -> &'static Cluster {
    // Room for every test's pods at once (the crash matrix alone keeps about
    // 200): kwok Nodes cost nothing, and a full Node leaves pods Pending.
    let opts = Options {
        pods_per_node: 1000,
        ..Options::default()
    };
    let started = SHARED.get_or_init(|| start_in(run_dir().join("shared"), opts));
    match started {
        Ok(c) => c,
        Err(e) => panic!("test environment failed to start: {e}"),
    }
}

/// A cluster of the calling test's own, started now with `opts` and stopped
/// when dropped. Its directory is named after the test (the test thread's
/// name).
pub fn private_cluster(opts: Options) -> Cluster {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let test: String = std::thread::current()
        .name()
        .unwrap_or("test")
        .chars()
        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '-' })
        .collect();
    let dir = run_dir().join(format!("private-{n}-{test}"));
    match start_in(dir, opts) {
        Ok(c) => c,
        Err(e) => panic!("private test environment failed to start: {e}"),
    }
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

/// Creates a namespace of the shared cluster named after the test with a
/// unique suffix.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let shared = match SHARED.get() {
        Some(Ok(c)) => Some(c),
        _ => None,
    };
    create_namespace(shared, client, prefix).await
}

/// [`namespace`] in cluster `c` (a private one).
pub async fn namespace_in(c: &Cluster, client: &Client, prefix: &str) -> String {
    create_namespace(Some(c), client, prefix).await
}

/// Creates the namespace; on failure the message carries the diagnosis of
/// `c`'s kube-controller-manager.
async fn create_namespace(c: Option<&Cluster>, client: &Client, prefix: &str) -> String {
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
            let diagnosis = c
                .map(|c| c.diagnose("kube-controller-manager"))
                .unwrap_or_default();
            panic!(
                "timed out after {timeout:?} waiting for the default ServiceAccount in {name} \
                 (last read: {read:?})\n{diagnosis}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    name
}

/// The usual start of a test: the shared cluster, a client, a fresh namespace.
pub async fn setup(prefix: &str) -> (&'static Cluster, Client, String) {
    let c = cluster();
    let client = client_for(c).await;
    let ns = namespace(&client, prefix).await;
    (c, client, ns)
}

/// [`setup`] on a private cluster started with `opts`.
pub async fn setup_private(prefix: &str, opts: Options) -> (Cluster, Client, String) {
    let c = private_cluster(opts);
    let client = client_for(&c).await;
    let ns = namespace_in(&c, &client, prefix).await;
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

/// A random value that must never show up in logs, Events, status or
/// metrics; registered for the suite-wide capture of [`leaks`].
pub fn canary(tag: &str) -> String {
    use rand::RngExt;
    let s: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let value = format!("canary-{tag}-{s}");
    // Suite-wide capture: every operator the harness starts is scanned for it
    // (see `leaks`).
    leaks::register(tag, &value);
    value
}
