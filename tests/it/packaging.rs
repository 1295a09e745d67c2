//! How people install and drive rekey: the Helm chart (lint, Pod Security
//! `restricted`, least-privilege RBAC that is enough and where every rule is
//! needed), the `kubectl rekey` plugin, and the example manifests.

use rekey_testenv as common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{REKEY, plugin};
use common::cluster::{Cluster, repo_root};
use common::fixtures::*;
use common::operator::Operator;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, Patch, PatchParams};
use rekey::crd::Phase;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

fn helm_output(c: &Cluster, args: &[&str]) -> std::process::Output {
    let bin = c
        .bins
        .all
        .get("REKEY_HELM")
        .expect("REKEY_HELM missing: run `make testenv`");
    Command::new(bin).args(args).output().unwrap()
}

fn helm(c: &Cluster, args: &[&str]) -> String {
    let out = helm_output(c, args);
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The objects `helm template` renders from the chart with `extra` arguments.
fn rendered(c: &Cluster, extra: &[&str]) -> Vec<serde_yaml::Value> {
    let chart = repo_root().join("charts/rekey").display().to_string();
    let mut args = vec!["template", "x", chart.as_str()];
    args.extend_from_slice(extra);
    helm(c, &args)
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .filter(|d| d.get("kind").is_some())
        .collect()
}

fn kind(d: &serde_yaml::Value) -> &str {
    d["kind"].as_str().unwrap_or_default()
}

/// The chart installs and upgrades the CRD as a template: exactly the
/// committed `crds/secretrotation.yaml` (`make crds`) plus the chart's labels
/// and, unless `crds.keep=false`, the annotation that keeps it on `helm
/// uninstall`; `crds.enabled=false` leaves it out.
#[test]
fn chart_lints_and_ships_the_committed_crd() {
    let c = common::cluster();
    let chart = repo_root().join("charts/rekey");
    helm(c, &["lint", "--strict", &chart.display().to_string()]);
    let crd = |extra: &[&str]| {
        rendered(c, extra)
            .into_iter()
            .find(|d| kind(d) == "CustomResourceDefinition")
    };
    let committed: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("crds/secretrotation.yaml")).unwrap(),
    )
    .unwrap();
    let mut shipped = crd(&[]).expect("a plain install installs the CRD");
    let metadata = shipped["metadata"].as_mapping_mut().unwrap();
    let labels = metadata.remove("labels").expect("the chart's labels");
    let annotations = metadata.remove("annotations").expect("an annotation");
    assert_eq!(labels["app.kubernetes.io/name"].as_str(), Some("rekey"));
    assert_eq!(labels["app.kubernetes.io/instance"].as_str(), Some("x"));
    assert_eq!(
        annotations,
        serde_yaml::from_str::<serde_yaml::Value>("helm.sh/resource-policy: keep").unwrap(),
        "kept on uninstall by default"
    );
    assert!(
        shipped == committed,
        "charts/rekey/templates/crd-secretrotation.yaml is stale: run `make crds`"
    );
    let unkept = crd(&["--set", "crds.keep=false"]).unwrap();
    assert!(
        unkept["metadata"].get("annotations").is_none(),
        "crds.keep=false: {:?}",
        unkept["metadata"]
    );
    assert!(unkept["metadata"].get("labels").is_some());
    assert!(
        crd(&["--set", "crds.enabled=false"]).is_none(),
        "crds.enabled=false renders no CRD"
    );
    // More than one replica without leader election is refused.
    let out = helm_output(
        c,
        &[
            "template",
            "x",
            &chart.display().to_string(),
            "--set",
            "replicas=2",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaderElection.enabled=true"));
}

/// The chart is safe by default: no two controllers during an upgrade
/// without leader election, no cluster-wide Secret access in cluster mode,
/// and the outbound allowlist reaches the binary.
#[test]
fn chart_defaults_are_safe() {
    let c = common::cluster();
    let docs = |extra: &[&str]| rendered(c, extra);
    let default = docs(&[]);
    let deployment = default.iter().find(|d| kind(d) == "Deployment").unwrap();
    assert_eq!(
        deployment["spec"]["strategy"]["type"].as_str(),
        Some("Recreate"),
        "one replica without leader election: never two controllers during an upgrade"
    );
    for d in default.iter().filter(|d| kind(d) == "ClusterRole") {
        let rules = d["rules"].as_sequence().unwrap();
        let secrets = rules.iter().any(|r| {
            r["resources"].as_sequence().is_some_and(|res| {
                res.iter()
                    .any(|x| matches!(x.as_str(), Some("secrets" | "serviceaccounts/token")))
            })
        });
        assert!(
            !secrets,
            "cluster-wide Secret access or ServiceAccount tokens: {rules:?}"
        );
    }
    let elected = docs(&["--set", "leaderElection.enabled=true"]);
    let deployment = elected.iter().find(|d| kind(d) == "Deployment").unwrap();
    assert!(deployment["spec"]["strategy"]["type"].as_str() != Some("Recreate"));
    // The lease's timings reach the binary (defaults, then set).
    let args = |d: &serde_yaml::Value| {
        serde_yaml::to_string(&d["spec"]["template"]["spec"]["containers"][0]["args"]).unwrap()
    };
    let elected_args = args(deployment);
    for flag in [
        "--leader-lease-duration=10s",
        "--leader-renew-deadline=6s",
        "--leader-retry-period=2s",
    ] {
        assert!(elected_args.contains(flag), "{elected_args}");
    }
    assert!(
        !elected_args.contains("--leader-call-timeout"),
        "derived by default"
    );
    let tuned = docs(&[
        "--set",
        "leaderElection.enabled=true,leaderElection.leaseDuration=6s,leaderElection.renewDeadline=4s,leaderElection.retryPeriod=1s,leaderElection.callTimeout=3s",
    ]);
    let tuned_args = args(tuned.iter().find(|d| kind(d) == "Deployment").unwrap());
    for flag in [
        "--leader-lease-duration=6s",
        "--leader-renew-deadline=4s",
        "--leader-retry-period=1s",
        "--leader-call-timeout=3s",
    ] {
        assert!(tuned_args.contains(flag), "{tuned_args}");
    }
    let single_args = args(default.iter().find(|d| kind(d) == "Deployment").unwrap());
    assert!(!single_args.contains("--leader-"), "{single_args}");
    let restricted = docs(&["--set", "allowedHosts={idp.example.com,*.corp.example}"]);
    let deployment =
        serde_yaml::to_string(restricted.iter().find(|d| kind(d) == "Deployment").unwrap())
            .unwrap();
    assert!(
        deployment.contains("--allowed-hosts=idp.example.com,*.corp.example"),
        "{deployment}"
    );
}

/// Installs the chart (rendered by helm, applied to the real API server) into
/// a namespace enforcing Pod Security `restricted`, acting in `watched`. The
/// CRD is the harness's (`install_crd`): the chart's would be applied to every
/// test of the shared cluster.
async fn install_chart(c: &Cluster, client: &kube::Client, watched: &str) -> String {
    install_crd(c);
    let release_ns = common::namespace(client, "rekey-system").await;
    c.kubectl(&[
        "label",
        "namespace",
        &release_ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ])
    .unwrap();
    let chart = repo_root().join("charts/rekey").display().to_string();
    let manifest = helm(
        c,
        &[
            "template",
            "rekey",
            &chart,
            "--namespace",
            &release_ns,
            "--set",
            &format!("namespaces={{{watched}}}"),
            "--set",
            "image.tag=test",
            "--set",
            "crds.enabled=false",
        ],
    );
    c.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &manifest)
        .unwrap();
    release_ns
}

/// A kubeconfig that authenticates as the chart's ServiceAccount.
fn service_account_kubeconfig(c: &Cluster, release_ns: &str) -> PathBuf {
    let token = c
        .kubectl(&[
            "-n",
            release_ns,
            "create",
            "token",
            "rekey",
            "--duration=1h",
        ])
        .unwrap();
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(&c.ca_pem);
    let path = c.dir.join(format!("kubeconfig-sa-{release_ns}"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{}\", certificate-authority-data: {ca}}}\nusers:\n- name: sa\n  user: {{token: {}}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: sa}}\ncurrent-context: c\n",
            c.api_url,
            token.trim()
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn chart_installs_under_restricted_pod_security_and_its_rbac_is_enough() {
    let (c, client, ns) = common::setup("chart").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let release_ns = install_chart(c, &client, &ns).await;
    // The operator's pod is admitted under `restricted` and runs (on kwok).
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &release_ns);
    common::wait_for("rekey Deployment available", LONG, || async {
        deploys
            .get("rekey")
            .await
            .ok()
            .and_then(|d| d.status)
            .and_then(|s| s.available_replicas)
            == Some(1)
    })
    .await;

    // The real binary, with exactly the chart's ServiceAccount permissions.
    let kubeconfig = service_account_kubeconfig(c, &release_ns);
    let op = Operator::start_with_kubeconfig(REKEY, c, &ns, kubeconfig);
    generated_rotation_succeeds(&client, &ns, "app-secret").await;
    assert!(
        !op.logs().contains("forbidden"),
        "no permission was missing"
    );
    assert!(
        !event_notes(&client, &ns, "app-secret").await.is_empty(),
        "Events were published"
    );
}

/// `/readyz` answers 503 until rekey has listed the SecretRotations, so a
/// pod that cannot read them (here: its Role lacks them) is never Ready;
/// `/healthz` answers all along. Once the permission is granted, rekey
/// becomes ready without a restart.
#[tokio::test]
async fn ready_only_after_the_secret_rotations_are_listed() {
    let (c, client, ns) = common::setup("ready").await;
    let release_ns = install_chart(c, &client, &ns).await;
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let full = roles.get("rekey").await.unwrap();
    let set_rules = |rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>| {
        let roles = roles.clone();
        async move {
            roles
                .patch("rekey", &PatchParams::apply("test").force(), &Patch::Apply(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "rekey"}, "rules": rules
                })))
                .await
                .unwrap();
        }
    };
    let rules = full.rules.clone().unwrap();
    let without: Vec<_> = rules
        .iter()
        .filter(|r| !r.resources.iter().flatten().any(|x| x == "secretrotations"))
        .cloned()
        .collect();
    assert_eq!(without.len(), rules.len() - 1, "one rule grants the list");
    set_rules(without).await;
    let op =
        Operator::start_with_kubeconfig(REKEY, c, &ns, service_account_kubeconfig(c, &release_ns));
    common::wait_for("/healthz answers", LONG, || async {
        op.probe("/healthz").await == Some(200)
    })
    .await;
    for _ in 0..10 {
        assert_eq!(
            op.probe("/readyz").await,
            Some(503),
            "not ready without the list"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    set_rules(rules).await;
    common::wait_for("/readyz turns 200 once the list works", LONG, || async {
        op.probe("/readyz").await == Some(200)
    })
    .await;
    assert_eq!(op.probe("/healthz").await, Some(200));
}

/// Every rule of the chart's Role is needed: without it, a named step fails.
#[tokio::test]
async fn each_rbac_rule_is_needed() {
    let (c, client, ns) = common::setup("rbac").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let release_ns = install_chart(c, &client, &ns).await;
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let full = roles.get("rekey").await.unwrap();
    let rules = full.rules.clone().unwrap();
    assert_eq!(
        rules.len(),
        11,
        "update this test when the chart's rules change"
    );
    let kubeconfig = service_account_kubeconfig(c, &release_ns);
    // serviceaccounts/token is used by a target that acts as a ServiceAccount
    // of the namespace: an IBM trusted profile on the emulator.
    let emu = common::ibm::IbmEmulator::start().await;
    let ibm_id = emu.create_secret("app", "arbitrary", json!(common::canary("ibm-old")));
    c.kubectl(&["-n", &ns, "create", "serviceaccount", "rotator"])
        .unwrap();
    emu.link_profile("Profile-rekey", &ns, "rotator");

    for (i, rule) in rules.iter().enumerate() {
        let what = format!(
            "{:?} {:?} {:?}",
            rule.api_groups, rule.resources, rule.verbs
        );
        let mut without = rules.clone();
        without.remove(i);
        roles
            .patch("rekey", &PatchParams::apply("test").force(), &Patch::Apply(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "rekey"}, "rules": without
            })))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let name = format!("without-{i}");
        let op = Operator::start_with_kubeconfig(REKEY, c, &ns, kubeconfig.clone());
        let mut spec = rotation_spec(json!({"generated": {}}));
        if rule
            .resources
            .iter()
            .flatten()
            .any(|r| r == "serviceaccounts/token")
        {
            spec["targets"].as_array_mut().unwrap().push(json!({"name": "ibm", "ibmSecretsManager": {
                "serviceUrl": emu.url, "secretId": ibm_id, "iamUrl": emu.url,
                "trustedProfile": {"profileId": "Profile-rekey", "serviceAccountRef": {"name": "rotator"}}}}));
        }
        create_rotation(&client, &ns, &name, spec).await;
        // Each rule's absence shows where it is used.
        let resource = rule.resources.as_ref().unwrap()[0].clone();
        let broke = common::wait_for(
            &format!("a failure without {what}"),
            Duration::from_secs(60),
            || async {
                let sr = get_rotation(&client, &ns, &name).await;
                let failed = phase_of(&sr) == Some(Phase::Failed);
                let logs = op.logs();
                match resource.as_str() {
                    // Without watch or status writes nothing can happen, and the log says why.
                    "secretrotations" | "secretrotations/status" => {
                        logs.contains("forbidden") && sr.status.is_none()
                    }
                    "events" => {
                        phase_of(&sr) == Some(Phase::Succeeded)
                            && logs.contains("could not publish event")
                    }
                    _ => failed,
                }
            },
        )
        .await;
        let sr = get_rotation(&client, &ns, &name).await;
        if let Some(f) = sr
            .status
            .as_ref()
            .and_then(|s| s.last_rotation.as_ref())
            .and_then(|l| l.failure.as_ref())
        {
            assert!(
                f.message.contains("forbidden"),
                "{what}: the failure names the missing permission: {f:?}"
            );
        }
        eprintln!("without {what}: broke after {broke:?}");
        drop(op);
        let _ = c.kubectl(&["-n", &ns, "delete", "secretrotation", &name, "--wait=false"]);
    }
    roles
        .patch("rekey", &PatchParams::apply("test").force(), &Patch::Apply(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "rekey"}, "rules": rules
        })))
        .await
        .unwrap();
}

#[tokio::test]
async fn kubectl_rekey_plugin_shows_and_steers_rotations() {
    let (c, client, ns) = common::setup("plugin").await;
    scene(c, &client, &ns, &common::canary("old")).await;
    let _op = Operator::start(REKEY, c, &ns);
    let mut spec = rotation_spec(json!({"generated": {}}));
    spec["approval"] = json!({"required": true});
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::AwaitingApproval, LONG).await;

    let (ok, table) = plugin(c, &ns, &["status"]);
    assert!(
        ok && table.contains("app-secret") && table.contains("AwaitingApproval"),
        "{table}"
    );
    let (ok, json_out) = plugin(c, &ns, &["status", "app-secret", "-o", "json"]);
    assert!(ok, "{json_out}");
    let v: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["status"]["phase"], "AwaitingApproval");
    let (ok, out) = plugin(c, &ns, &["confirm-invalidated", "app-secret"]);
    assert!(
        !ok && out.contains("not AwaitingConfirmation"),
        "refuses what makes no sense: {out}"
    );

    let (ok, out) = plugin(c, &ns, &["approve", "app-secret"]);
    assert!(ok, "{out}");
    wait_phase(&client, &ns, "app-secret", Phase::Succeeded, LONG).await;
    let (ok, timeline) = plugin(c, &ns, &["status", "app-secret"]);
    assert!(
        ok && timeline.contains("AwaitingRollout") && timeline.contains("Succeeded"),
        "{timeline}"
    );
    // The Grafana dashboard only uses series the operator really exports.
    let metrics = _op.scrape().await;
    let dashboard =
        std::fs::read_to_string(repo_root().join("docs/dashboards/rekey.json")).unwrap();
    let mut names: Vec<&str> = dashboard
        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .filter(|w| w.starts_with("rekey_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        let short = family.strip_prefix("rekey_").unwrap();
        assert!(
            rekey::metrics::FAMILIES.contains(&short),
            "dashboard uses {name}, which rekey does not export"
        );
        // Families that only have series during a rotation or after an error are not in this scrape.
        if !["grace_seconds_left", "reconcile_errors"].contains(&short) {
            assert!(
                metrics.contains(&format!("# TYPE {family} ")),
                "{name} missing from the scrape"
            );
        }
    }
    let (ok, history) = plugin(c, &ns, &["history", "app-secret", "-o", "json"]);
    assert!(ok);
    let h: Vec<Value> = serde_json::from_str(&history).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["result"], "Succeeded");

    // `kubectl rekey` finds the plugin on PATH, like a user's kubectl would.
    let plugin_dir = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-rekey"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap()
    );
    let out = Command::new(c.bins.kubectl())
        .args(["rekey", "-n", &ns, "rotate", "app-secret"])
        .env("PATH", path)
        .env("KUBECONFIG", &c.kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sr = wait_phase(&client, &ns, "app-secret", Phase::AwaitingApproval, LONG).await;
    assert_eq!(sr.status.unwrap().rotation.unwrap().reason, "OnDemand");
}

/// What a person reads about a failed rotation is a sentence about their
/// objects: the reason is a column of `kubectl get srot` and `kubectl rekey
/// status`, the timeline shows the failed phase once (as failed), and a
/// name that does not exist is said so, not dumped as an API structure.
#[tokio::test]
async fn a_failed_rotation_and_a_missing_name_read_as_sentences() {
    let (c, client, ns) = common::setup("plugin-failed").await;
    install_crd(c);
    let _op = Operator::start(REKEY, c, &ns);
    let spec = json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [{"name": "main", "kubernetesSecret": {"name": "app-secret", "key": "k"}}],
        "proof": {"workloads": [{"kind": "Deployment", "name": "not-there"}], "timeout": "60s"}
    });
    create_rotation(&client, &ns, "app-secret", spec).await;
    wait_phase(&client, &ns, "app-secret", Phase::Failed, LONG).await;

    let get = c.kubectl(&["get", "srot", "-n", &ns]).unwrap();
    assert!(
        get.contains("REASON") && get.contains("WorkloadNotFound"),
        "{get}"
    );
    let (ok, table) = plugin(c, &ns, &["status"]);
    assert!(
        ok && table.contains("REASON") && table.contains("WorkloadNotFound"),
        "{table}"
    );
    let (ok, timeline) = plugin(c, &ns, &["status", "app-secret"]);
    assert!(ok, "{timeline}");
    let preflight: Vec<&str> = timeline
        .lines()
        .filter(|l| l.contains("Preflight") && (l.contains('✓') || l.contains('✗')))
        .collect();
    assert_eq!(preflight.len(), 1, "the failed phase once: {timeline}");
    assert!(
        preflight[0].contains('✗') && preflight[0].contains("WorkloadNotFound"),
        "{timeline}"
    );

    let (ok, out) = plugin(c, &ns, &["status", "does-not-exist"]);
    assert!(!ok, "{out}");
    assert_eq!(
        out.trim(),
        format!("error: no SecretRotation named does-not-exist in namespace {ns}")
    );
}

#[tokio::test]
async fn every_example_manifest_is_accepted() {
    let c = common::cluster();
    let client = common::client_for(c).await;
    install_crd(c);
    let mut applied = 0;
    let mut dirs = vec![repo_root().join("examples")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let ns = common::namespace(&client, "example").await;
                c.kubectl(&[
                    "-n",
                    &ns,
                    "apply",
                    "--server-side",
                    "-f",
                    &path.display().to_string(),
                ])
                .unwrap_or_else(|e| panic!("{} is rejected: {e}", path.display()));
                applied += 1;
            }
        }
    }
    assert!(applied >= 3, "examples found: {applied}");
}

/// Two replicas with leader election: one leader does all the work, and when
/// it dies the other takes over.
#[tokio::test]
async fn leader_election_lets_one_replica_work_and_fails_over() {
    // Two replicas and a killed leader: a private cluster, so that the lease
    // timing does not depend on the load other tests put on the shared one.
    let opts = common::Options {
        moto: false,
        ..common::Options::default()
    };
    let (c, client, ns) = common::setup_private("leader", opts).await;
    let c = &c;
    scene(c, &client, &ns, &common::canary("old")).await;
    let args = ["--leader-election-namespace", ns.as_str()];
    let mut first = Operator::start_with_args(REKEY, c, &ns, c.kubeconfig.clone(), &args);
    common::wait_for("a leader", Duration::from_secs(30), || async {
        first.logs().contains("became leader")
    })
    .await;
    let second = Operator::start_with_args(REKEY, c, &ns, c.kubeconfig.clone(), &args);
    generated_rotation_succeeds(&client, &ns, "app-secret").await;
    assert!(first.logs().contains("rotation finished"));
    assert!(
        !second.logs().contains("became leader") && !second.logs().contains("phase changed"),
        "the follower stayed idle"
    );
    // The leader dies; the follower takes over once the lease expires and serves the next request.
    first.kill();
    annotate_rotation(
        &client,
        &ns,
        "app-secret",
        "rekey.dev/rotate",
        "after-failover",
    )
    .await;
    common::wait_for("failover", Duration::from_secs(60), || async {
        second.logs().contains("became leader")
    })
    .await;
    common::wait_for("second rotation", LONG, || async {
        get_rotation(&client, &ns, "app-secret")
            .await
            .status
            .is_some_and(|s| s.history.len() == 2 && s.rotation.is_none())
    })
    .await;
    assert_eq!(revisions(&client, &ns, "app").await, 3);
}

/// Issue 10 item 9: a follower judges a lease by what it observes on its own
/// clock (the record unchanged for the lease duration), never by comparing
/// its wall clock with the holder's `renewTime`: a holder whose clock runs
/// two minutes behind still holds its lease while it renews.
#[tokio::test]
async fn a_renewing_leader_with_a_skewed_clock_keeps_its_lease() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let (c, client, ns) = common::setup("skew").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let skewed = || MicroTime(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(120));
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "rekey-leader"},
        "spec": {"holderIdentity": "other-replica", "leaseDurationSeconds": 15,
                 "acquireTime": skewed(), "renewTime": skewed()}
    }))
    .unwrap();
    leases.create(&Default::default(), &lease).await.unwrap();
    // The other replica renews every 2 s, stamping its (late) clock.
    let renewing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let renewer = {
        let (leases, renewing) = (leases.clone(), renewing.clone());
        tokio::spawn(async move {
            while renewing.load(std::sync::atomic::Ordering::SeqCst) {
                let patch = json!({"spec": {"renewTime": skewed()}});
                let _ = leases
                    .patch(
                        "rekey-leader",
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let args = ["--leader-election-namespace", ns.as_str()];
    let op = Operator::start_with_args(REKEY, c, &ns, c.kubeconfig.clone(), &args);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        !op.logs().contains("became leader"),
        "took a lease that its holder kept renewing"
    );
    renewing.store(false, std::sync::atomic::Ordering::SeqCst);
    renewer.await.unwrap();
    let stopped = std::time::Instant::now();
    common::wait_for(
        "takeover after the lease ran out",
        Duration::from_secs(60),
        || async { op.logs().contains("became leader") },
    )
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_secs(12),
        "took over {:?} after the last renewal, before the lease ran out",
        stopped.elapsed()
    );
}

/// Issue 10 item 1, in the chart's cluster mode (no `namespaces`): the real
/// binary, with exactly the chart's ServiceAccount rights, rotates in a
/// `secretWriteNamespaces` namespace, and in any other namespace is refused
/// at Preflight (no Secret access there), before anything is issued.
#[tokio::test]
async fn cluster_mode_writes_secrets_only_where_granted() {
    // Cluster-wide watching would see every other test's objects: a private
    // cluster.
    let opts = common::Options {
        eso: false,
        moto: false,
        ..common::Options::default()
    };
    let (c, client, _) = common::setup_private("cluster-mode", opts).await;
    let c = &c;
    install_crd(c);
    let granted = common::namespace_in(c, &client, "team-a").await;
    let other = common::namespace_in(c, &client, "team-b").await;
    let release_ns = common::namespace_in(c, &client, "rekey-system").await;
    let chart = repo_root().join("charts/rekey").display().to_string();
    let manifest = helm(
        c,
        &[
            "template",
            "rekey",
            &chart,
            "--namespace",
            &release_ns,
            "--set",
            &format!("secretWriteNamespaces={{{granted}}}"),
            "--set",
            "image.tag=test",
            "--set",
            "crds.enabled=false",
        ],
    );
    assert!(manifest.contains("kind: ClusterRole"), "cluster mode");
    c.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &manifest)
        .unwrap();
    let can_i = |verb: &str, ns: &str| {
        c.kubectl(&[
            "auth",
            "can-i",
            verb,
            "secrets",
            "-n",
            ns,
            &format!("--as=system:serviceaccount:{release_ns}:rekey"),
        ])
        // `can-i` answers "no" with a failing exit status.
        .is_ok_and(|out| out.trim() == "yes")
    };
    assert!(can_i("get", &granted));
    assert!(
        !can_i("get", &other) && !can_i("list", &other),
        "no Secret access elsewhere"
    );
    let kubeconfig = service_account_kubeconfig(c, &release_ns);
    let op = Operator::start_with_kubeconfig(REKEY, c, "", kubeconfig);
    let spec = json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [{"name": "main", "kubernetesSecret": {"name": "app-creds", "key": "k"}}],
        "proof": {"nothingToProve": true}
    });
    create_rotation(&client, &granted, "app", spec.clone()).await;
    create_rotation(&client, &other, "app", spec).await;
    wait_phase(&client, &granted, "app", Phase::Succeeded, LONG).await;
    assert!(
        read_key(&client, &granted, "app-creds", "k")
            .await
            .is_some()
    );
    let sr = wait_phase(&client, &other, "app", Phase::Failed, LONG).await;
    let f = sr.status.unwrap().last_rotation.unwrap().failure.unwrap();
    assert_eq!(f.phase, Phase::Preflight, "{f:?}");
    assert!(f.message.contains("forbidden"), "{f:?}");
    assert!(read_key(&client, &other, "app-creds", "k").await.is_none());
    assert!(op.logs().contains("rekey starting"));
}

/// Issue "CRDs that upgrade": from a chart that shipped the CRD in `crds/`
/// (created once by Helm, never upgraded, not part of the release) to the CRD
/// as a template. After the documented adoption step `helm upgrade` brings
/// the CRD's newer schema and column, and every SecretRotation keeps its
/// spec and status; `helm uninstall` keeps the CRD and every SecretRotation;
/// installing again takes the kept CRD back.
#[tokio::test]
async fn helm_upgrade_adopts_and_upgrades_the_crd_and_uninstall_keeps_it() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, PostParams};
    // The CRD is cluster-wide: an older one and an uninstall would disturb
    // every other test of the shared cluster.
    let opts = common::Options {
        nodes: 1,
        eso: false,
        moto: false,
        ..common::Options::default()
    };
    let (c, client, ns) = common::setup_private("crd-upgrade", opts).await;
    let c = &c;
    let release_ns = common::namespace_in(c, &client, "rekey-system").await;
    let chart = repo_root().join("charts/rekey").display().to_string();
    let kubeconfig = c.kubeconfig.display().to_string();
    let namespaces = format!("namespaces={{{ns}}}");
    let release = |verb: &str, chart: &str, extra: &[&str]| {
        let mut args = vec![verb, "rekey", chart, "--namespace", release_ns.as_str()];
        args.extend(["--kubeconfig", kubeconfig.as_str()]);
        args.extend_from_slice(extra);
        helm_output(c, &args)
    };
    let values = ["--set", namespaces.as_str(), "--set", "image.tag=test"];
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd_name = "secretrotations.rekey.dev";
    let crd_json = || async { serde_json::to_value(crds.get(crd_name).await.unwrap()).unwrap() };
    let version = |crd: &Value| crd["spec"]["versions"][0].clone();
    let has_reason_column = |crd: &Value| {
        version(crd)["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|col| col["name"] == "Reason")
    };
    let has_rotate_on_create = |crd: &Value| {
        !version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["rotateOnCreate"]
            .is_null()
    };

    // (a) Today's chart: the CRD in `crds/`, which Helm creates on the first
    // install without making it part of the release, and no `crds` values.
    // Its CRD lacks what the chart's CRD has now: the `Reason` column and the
    // `rotateOnCreate` field.
    let mut older: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("crds/secretrotation.yaml")).unwrap(),
    )
    .unwrap();
    let v = &mut older["spec"]["versions"][0];
    v["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .retain(|col| col["name"] != "Reason");
    v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("rotateOnCreate")
        .expect("the current CRD has rotateOnCreate");
    let today = c.dir.join("chart-today");
    let copied = Command::new("cp")
        .args(["-r", &chart, &today.display().to_string()])
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::remove_file(today.join("templates/crd-secretrotation.yaml")).unwrap();
    // Nor had it the admission policy, which would refuse these
    // SecretRotations (no rekey.dev/requested-by): tests/it/approval.rs.
    std::fs::remove_file(today.join("templates/approval-policy.yaml")).unwrap();
    let mut today_values: serde_yaml::Mapping =
        serde_yaml::from_str(&std::fs::read_to_string(today.join("values.yaml")).unwrap()).unwrap();
    today_values.remove("crds").unwrap();
    std::fs::write(
        today.join("values.yaml"),
        serde_yaml::to_string(&today_values).unwrap(),
    )
    .unwrap();
    std::fs::create_dir(today.join("crds")).unwrap();
    std::fs::write(
        today.join("crds/secretrotation.yaml"),
        serde_yaml::to_string(&older).unwrap(),
    )
    .unwrap();
    let out = release("install", &today.display().to_string(), &values);
    assert!(out.status.success(), "{out:?}");
    let before_crd = crd_json().await;
    assert!(!has_reason_column(&before_crd) && !has_rotate_on_create(&before_crd));
    assert!(
        before_crd["metadata"]["labels"].is_null(),
        "Helm did not label the CRD from crds/"
    );

    // SecretRotations (two with a status), and a Secret one of them writes.
    let ar = ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("rekey.dev", "v1alpha1", "SecretRotation"),
        "secretrotations",
    );
    let srots: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let target = |secret: &str| json!([{"name": "main", "kubernetesSecret": {"name": secret, "key": "k", "adoptExisting": true}}]);
    let specs = [
        (
            "failed",
            json!({"credential": {"generated": {}}, "targets": target("app-creds"),
                   "proof": {"workloads": [{"kind": "Deployment", "name": "app"}]},
                   "trigger": "CHG0012345", "onFailure": "Rollback"}),
        ),
        (
            "scheduled",
            json!({"credential": {"generated": {}}, "targets": target("other-creds"),
                   "proof": {"nothingToProve": true}, "oldValueValidFor": "2h",
                   "schedule": {"every": "2160h"}, "approval": {"required": true}}),
        ),
        (
            "new",
            json!({"credential": {"generated": {}}, "targets": target("third-creds"),
                   "proof": {"nothingToProve": true}, "dryRun": true}),
        ),
    ];
    for (name, spec) in &specs {
        let sr: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
            "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        srots.create(&PostParams::default(), &sr).await.unwrap();
    }
    let finished = json!({"id": "r-1", "reason": "Trigger", "result": "Failed",
        "durationSeconds": 4.5, "finishedAt": "2026-01-05T10:00:00Z",
        "failure": {"phase": "Preflight", "reason": "WorkloadNotFound",
                    "message": "Deployment app does not exist"}});
    let statuses = [
        (
            "failed",
            json!({"phase": "Failed", "observedTrigger": "CHG0012345",
                   "lastRotation": finished, "history": [finished]}),
        ),
        (
            "scheduled",
            json!({"phase": "Succeeded", "nextRotationAt": "2026-04-05T10:00:00Z",
                   "observedGeneration": 1}),
        ),
    ];
    for (name, status) in &statuses {
        srots
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .unwrap();
    }
    put_secret(&client, &ns, "app-creds", json!({"k": "current-value"})).await;
    // What a user has: name → (uid, spec, status).
    let snapshot = || async {
        let mut all = std::collections::BTreeMap::new();
        for sr in srots.list(&Default::default()).await.unwrap() {
            let name = sr.metadata.name.clone().unwrap();
            let uid = sr.metadata.uid.clone().unwrap();
            assert!(
                sr.metadata.deletion_timestamp.is_none(),
                "{name} is being deleted"
            );
            all.insert(
                name,
                (uid, sr.data["spec"].clone(), sr.data["status"].clone()),
            );
        }
        all
    };
    let before = snapshot().await;
    assert_eq!(before.len(), 3);
    for (name, status) in &statuses {
        assert_eq!(&before[*name].2, status, "{name}: status stored as written");
    }
    // Today's CRD has no rotateOnCreate: kubectl refuses it.
    let restore = format!(
        "apiVersion: rekey.dev/v1alpha1\nkind: SecretRotation\nmetadata: {{name: restored, namespace: {ns}}}\nspec:\n  credential: {{generated: {{}}}}\n  targets: [{{name: main, kubernetesSecret: {{name: restored-creds, key: k}}}}]\n  proof: {{nothingToProve: true}}\n  rotateOnCreate: false\n"
    );
    let refused = c
        .kubectl_stdin(&["apply", "-f", "-"], &restore)
        .unwrap_err();
    assert!(refused.to_string().contains("rotateOnCreate"), "{refused}");

    // (b) Without the adoption step Helm refuses the CRD it did not create,
    // and changes nothing.
    let out = release("upgrade", &chart, &["--reset-then-reuse-values"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("invalid ownership metadata"),
        "{stderr}"
    );
    assert!(!has_reason_column(&crd_json().await));
    // The adoption step, as README.md's "Upgrading the CRD" gives it.
    c.kubectl(&[
        "label",
        "crd",
        crd_name,
        "app.kubernetes.io/managed-by=Helm",
    ])
    .unwrap();
    c.kubectl(&[
        "annotate",
        "crd",
        crd_name,
        "meta.helm.sh/release-name=rekey",
        &format!("meta.helm.sh/release-namespace={release_ns}"),
    ])
    .unwrap();
    let out = release("upgrade", &chart, &["--reset-then-reuse-values"]);
    assert!(out.status.success(), "{out:?}");

    // The CRD is the same object (never deleted: deleting it deletes every
    // SecretRotation), now with the new schema and column, owned by Helm.
    let upgraded = crd_json().await;
    assert_eq!(
        upgraded["metadata"]["uid"], before_crd["metadata"]["uid"],
        "the CRD was not recreated"
    );
    assert!(has_reason_column(&upgraded) && has_rotate_on_create(&upgraded));
    assert_eq!(
        upgraded["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let manifest = helm(
        c,
        &[
            "get",
            "manifest",
            "rekey",
            "--namespace",
            &release_ns,
            "--kubeconfig",
            &kubeconfig,
        ],
    );
    assert!(
        manifest.contains("kind: CustomResourceDefinition"),
        "the release owns the CRD"
    );
    assert_eq!(snapshot().await, before, "every SecretRotation is intact");
    assert_eq!(
        read_key(&client, &ns, "app-creds", "k").await.as_deref(),
        Some("current-value")
    );
    // The new field is accepted and kept (once the API server serves the
    // new schema), and the new column shows the stored failure reason.
    common::wait_for("the new schema served", LONG, || async {
        c.kubectl_stdin(&["apply", "-f", "-"], &restore).is_ok()
    })
    .await;
    let restored = srots.get("restored").await.unwrap();
    assert_eq!(restored.data["spec"]["rotateOnCreate"], false);
    common::wait_for("the Reason column", LONG, || async {
        c.kubectl(&["get", "srot", "-n", &ns, "failed"])
            .is_ok_and(|out| out.contains("REASON") && out.contains("WorkloadNotFound"))
    })
    .await;

    // (c) `helm uninstall` removes the release (the operator's Deployment)
    // but keeps the CRD, every SecretRotation and the Secrets.
    let before = snapshot().await;
    assert_eq!(before.len(), 4);
    let out = helm(
        c,
        &[
            "uninstall",
            "rekey",
            "--namespace",
            &release_ns,
            "--kubeconfig",
            &kubeconfig,
        ],
    );
    assert!(out.contains(crd_name), "Helm says what it kept: {out}");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &release_ns);
    common::wait_for("the operator's Deployment gone", LONG, || async {
        deploys.get_opt("rekey").await.unwrap().is_none()
    })
    .await;
    let kept = crds.get(crd_name).await.unwrap();
    assert!(
        kept.metadata.deletion_timestamp.is_none(),
        "the CRD is being deleted, and with it every SecretRotation"
    );
    assert_eq!(
        serde_json::to_value(&kept).unwrap()["metadata"]["uid"],
        before_crd["metadata"]["uid"]
    );
    // Deletion would be asynchronous: look again after a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(snapshot().await, before, "every SecretRotation is kept");
    assert_eq!(
        read_key(&client, &ns, "app-creds", "k").await.as_deref(),
        Some("current-value")
    );

    // Installing again takes the kept CRD back, without the adoption step.
    let out = release("install", &chart, &values);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        crd_json().await["metadata"]["uid"],
        before_crd["metadata"]["uid"]
    );
    assert_eq!(snapshot().await, before);
}
