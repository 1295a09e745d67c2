//! Every integration suite in one test binary, compiled once. The suites share
//! one cluster of the harness (`testenv/harness`, crate `rekey-testenv`),
//! started on first use, each test in namespaces of its own; tests that would
//! disturb the others there use a private cluster
//! (`rekey_testenv::private_cluster`).
//!
//! Run one suite with `cargo test --test it <suite>::`, e.g. `keycloak::`.

mod alerts;
mod approval;
mod budget;
mod change;
mod consumers;
mod crash;
mod crd;
mod environment;
mod faults;
mod gitops;
mod ha;
mod herds;
mod hostile;
mod keycloak;
mod leaks;
mod machine;
mod multicluster;
mod packaging;
mod proof;
mod rotation;
mod safety;
mod steering;
mod store_contract;
mod stores;

/// The rekey binary Cargo built for these tests (`CARGO_BIN_EXE_*` exists
/// only here, in the rekey package's integration tests, not in the harness).
const REKEY: &str = env!("CARGO_BIN_EXE_rekey");

/// Runs `kubectl-rekey -n NS ARGS` (the plugin Cargo built for these tests)
/// as the cluster's admin: whether it succeeded, and stdout then stderr.
fn plugin(c: &rekey_testenv::cluster::Cluster, ns: &str, args: &[&str]) -> (bool, String) {
    plugin_with(&c.kubeconfig, ns, args)
}

/// `kubectl-rekey -n NS ARGS` as whoever `kubeconfig` names.
fn plugin_with(kubeconfig: &std::path::Path, ns: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-rekey"))
        .args(["-n", ns])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
