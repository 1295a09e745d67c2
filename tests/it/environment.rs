//! The test environment itself: real rollouts on kwok nodes, real ESO syncs,
//! and no process left behind.

use rekey_testenv as common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
            }
        }
    }))
    .unwrap()
}

fn fully_rolled_out(d: &Deployment, want: i32) -> bool {
    let generation = d.metadata.generation.unwrap_or(0);
    let Some(s) = &d.status else { return false };
    s.observed_generation.unwrap_or(0) >= generation
        && s.replicas == Some(want)
        && s.updated_replicas == Some(want)
        && s.ready_replicas == Some(want)
        && s.available_replicas == Some(want)
}

#[tokio::test]
async fn deployment_rolls_out_on_kwok_nodes() {
    let (_, client, ns) = common::setup("rollout").await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deps.create(&PostParams::default(), &deployment("web", 3))
        .await
        .unwrap();

    let took = common::wait_for("3/3 available", Duration::from_secs(90), || async {
        fully_rolled_out(&deps.get("web").await.unwrap(), 3)
    })
    .await;
    eprintln!("initial rollout complete in {took:?}");

    // Change the pod template: a new ReplicaSet must roll out completely.
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"rekey.dev/test-restart": "1"}}}}});
    deps.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let took = common::wait_for(
        "rollout of new template",
        Duration::from_secs(120),
        || async { fully_rolled_out(&deps.get("web").await.unwrap(), 3) },
    )
    .await;
    eprintln!("template rollout complete in {took:?}");

    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let list = rss
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 2, "one ReplicaSet per template revision");
    let mut sizes: Vec<(i32, i32)> = list
        .items
        .iter()
        .map(|rs| {
            (
                rs.spec.as_ref().unwrap().replicas.unwrap(),
                rs.status.as_ref().unwrap().replicas,
            )
        })
        .collect();
    sizes.sort();
    assert_eq!(
        sizes,
        vec![(0, 0), (3, 3)],
        "old ReplicaSet scaled to 0, new one holds all 3"
    );
}

fn ar(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("external-secrets.io", "v1", kind))
}

#[tokio::test]
async fn eso_syncs_and_refreshes_on_request() {
    use common::fixtures::{external_secret, kubernetes_secret_store, put_secret, read_key};
    let (c, client, ns) = common::setup("eso").await;
    let first = common::canary("first");
    put_secret(&client, &ns, "source", json!({"client_secret": first})).await;
    kubernetes_secret_store(c, &client, &ns).await;
    external_secret(&client, &ns, "app-creds", "source").await;
    let synced = || read_key(&client, &ns, "app-creds", "client_secret");

    let took = common::wait_for("first sync", Duration::from_secs(60), || async {
        synced().await.as_deref() == Some(first.as_str())
    })
    .await;
    eprintln!("first sync in {took:?}");

    let second = common::canary("second");
    put_secret(&client, &ns, "source", json!({"client_secret": second})).await;
    // Without a refresh request nothing changes for an hour; ask for one.
    let ess = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &ar("ExternalSecret"));
    let ask = json!({"metadata": {"annotations": {"force-sync": "1"}}});
    ess.patch("app-creds", &PatchParams::default(), &Patch::Merge(&ask))
        .await
        .unwrap();
    let took = common::wait_for(
        "refresh after force-sync",
        Duration::from_secs(30),
        || async { synced().await.as_deref() == Some(second.as_str()) },
    )
    .await;
    eprintln!("refresh on request in {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "refresh took {took:?}, refreshInterval is 1h"
    );
}

fn alive(pid: u32) -> bool {
    // A zombie (state Z) is dead for our purposes: its parent has not reaped it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Run by `no_process_outlives_a_panicking_test_binary` in a child process:
/// starts a control plane, records its pids, then dies the requested way.
#[test]
#[ignore = "helper, run by no_process_outlives_* in a child process"]
fn helper_start_cluster_then_die() {
    let Ok(pidfile) = std::env::var("REKEY_PIDFILE") else {
        return;
    };
    let c = common::private_cluster(common::Options {
        nodes: 1,
        eso: true,
        eso_env: vec![],
        moto: true,
        ..Default::default()
    });
    let mut pids = c.pids();
    pids.push(c.process_group() as u32);
    std::fs::write(
        &pidfile,
        pids.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    if std::env::var("REKEY_DIE").as_deref() == Ok("sigkill") {
        std::thread::sleep(Duration::from_secs(600)); // the parent kills us
    }
    std::mem::forget(c); // no Drop: only the watchdog can clean up
    panic!("deliberate panic with the control plane running");
}

fn run_helper_and_check(die: &str) {
    let pidfile = std::env::temp_dir().join(format!("rekey-pids-{die}-{}", std::process::id()));
    let _ = std::fs::remove_file(&pidfile);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "environment::helper_start_cluster_then_die",
            "--nocapture",
        ])
        .env("REKEY_PIDFILE", &pidfile)
        .env("REKEY_DIE", die)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    if die == "sigkill" {
        let start = std::time::Instant::now();
        while !pidfile.exists() && start.elapsed() < Duration::from_secs(180) {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(300));
        child.kill().unwrap(); // SIGKILL: no Drop, no panic handler, nothing runs
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "helper must die");
    let pids: Vec<u32> = std::fs::read_to_string(&pidfile)
        .expect("helper wrote no pid file: the cluster did not start")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        pids.len() >= 8,
        "etcd, apiserver, kcm, scheduler, kwok, moto, eso and the watchdog: {pids:?}"
    );
    let start = std::time::Instant::now();
    while pids.iter().any(|p| alive(*p)) && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "processes outlived the test binary ({die}): {left:?}"
    );
}

#[test]
fn no_process_outlives_a_panicking_test_binary() {
    run_helper_and_check("panic");
}

#[test]
fn no_process_outlives_a_killed_test_binary() {
    run_helper_and_check("sigkill");
}
