//! High availability (issue 12 item 3): two replicas with leader election on
//! a 3 s lease rotate a credential again and again while the leader is
//! taken away at varied moments mid-rotation, in three ways: SIGKILL,
//! SIGSTOP for longer than the lease (then SIGCONT), and cut off from the
//! API server by a paused TCP proxy while it still reaches the identity
//! provider (a webhook) and AWS Secrets Manager (moto). Every rotation ends
//! Succeeded with one issue, one new value per store, one rollout and one
//! invalidation after the proof. Then one more rotation whose leader is
//! killed, with the default timings (10 s lease). The handover times are
//! measured, printed and written to `target/reliability/ha.json`; only a
//! generous bound is asserted.

use rekey_testenv as common;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::REKEY;
use crate::rotation::webhook_server;
use aws_sdk_secretsmanager::Client as Aws;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use common::fixtures::*;
use common::operator::Operator;
use common::proxy::PausableProxy;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use rekey::crd::{Phase, SecretRotation};
use serde_json::json;

const NAME: &str = "app-secret";
const AWS_KEY: &str = "AKIAREKEYTEST0000001";
const AWS_SECRET: &str = "rekey-test-secret-access-key";
/// The lease in this test (the default is 10 s).
const LEASE: Duration = Duration::from_secs(3);
/// Forced handovers, cycling through the modes.
const HANDOVERS: usize = 21;
/// The generous bound asserted on each handover (measured: see the table).
const HANDOVER_BOUND: Duration = Duration::from_secs(60);
/// The phase whose start (as the status shows it) forces a rotation's first
/// handover, cycled: each one's side effect (issue and write-ahead record,
/// store writes, refresh request, restart, invalidation) may be under way.
const AT_PHASES: [Phase; 6] = [
    Phase::Issuing,
    Phase::Writing,
    Phase::AwaitingSync,
    Phase::AwaitingRollout,
    Phase::Invalidating,
    Phase::Preflight,
];
/// How long after the previous handover the next one of the same rotation
/// is forced (cycled).
const THEN_MS: [u64; 5] = [0, 400, 900, 200, 1500];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// SIGKILL of the holder.
    Kill,
    /// SIGSTOP of the holder for longer than the lease, then SIGCONT.
    Stop,
    /// The holder cut off from the API server (it still reaches the IdP
    /// and the stores).
    Cut,
}

struct Replica {
    name: &'static str,
    op: Operator,
    proxy: PausableProxy,
}

impl Replica {
    /// What this incarnation logged.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.op.log).unwrap_or_default()
    }

    /// The process state letter from /proc (R, S, T stopped, Z exited).
    fn state(&self) -> char {
        let Some(pid) = self.op.pid() else {
            return 'X';
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s[s.rfind(')')? + 2..].chars().next())
            .unwrap_or('X')
    }

    fn exited(&self) -> bool {
        matches!(self.state(), 'Z' | 'X')
    }

    fn leads(&self) -> bool {
        !self.exited() && self.log().contains("became leader")
    }

    fn signal(&self, sig: &str) {
        let pid = self.op.pid().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// A fresh incarnation (the old one killed if it still runs), the
    /// proxy forwarding again.
    async fn restart(&mut self) {
        self.proxy.resume(true);
        self.op.restart();
        let started = Instant::now();
        while !self.log().contains("rekey starting") {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} did not start",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Handover {
    mode: Mode,
    rotation: usize,
    phase: String,
    seconds: f64,
    lease: u64,
}

fn aws_client(c: &common::Cluster) -> Aws {
    rekey::install_crypto_provider();
    let config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(AWS_KEY, AWS_SECRET, None, None, "test"))
        .endpoint_url(c.moto_url.clone().unwrap())
        .build();
    Aws::from_conf(config)
}

/// Every version moto holds of the secret, labelled or not.
async fn aws_versions(aws: &Aws, id: &str) -> usize {
    aws.list_secret_version_ids()
        .secret_id(id)
        .include_deprecated(true)
        .send()
        .await
        .unwrap()
        .versions
        .unwrap_or_default()
        .len()
}

/// The SecretRotation once a rotation other than `last_id` has ended and
/// none runs.
async fn ended_after(client: &kube::Client, ns: &str, last_id: &str) -> Option<SecretRotation> {
    let sr = get_rotation(client, ns, NAME).await;
    let s = sr.status.as_ref()?;
    let ended = s.rotation.is_none() && s.last_rotation.as_ref().is_some_and(|l| l.id != last_id);
    ended.then_some(sr)
}

/// Restarts every replica that ended on its own (a lease lost under load
/// is a handover too, just not a forced one); returns how many.
async fn revive(replicas: &mut [Replica]) -> usize {
    let mut n = 0;
    for r in replicas.iter_mut() {
        if r.exited() {
            r.restart().await;
            n += 1;
        }
    }
    n
}

/// Takes the lease from its holder in `mode`; returns the holder's index and
/// how long until the other replica became leader.
async fn force(replicas: &mut [Replica], mode: Mode, unforced: &mut usize) -> Duration {
    // The holder now.
    let started = Instant::now();
    let h = loop {
        *unforced += revive(replicas).await;
        if let Some(h) = replicas.iter().position(Replica::leads) {
            break h;
        }
        assert!(started.elapsed() < HANDOVER_BOUND, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let o = 1 - h;
    let t0 = Instant::now();
    match mode {
        Mode::Kill => replicas[h].op.kill(),
        Mode::Stop => replicas[h].signal("-STOP"),
        Mode::Cut => replicas[h].proxy.pause(),
    }
    while !replicas[o].leads() {
        assert!(
            t0.elapsed() < HANDOVER_BOUND,
            "no handover within {HANDOVER_BOUND:?} ({mode:?})"
        );
        if replicas[o].exited() {
            replicas[o].restart().await;
            *unforced += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    // The old holder: stopped for longer than the lease, then resumed, or
    // cut off, it steps down on its own (exits); then a fresh incarnation
    // stands by.
    match mode {
        Mode::Kill => {}
        Mode::Stop => {
            let longer = LEASE + Duration::from_secs(1);
            tokio::time::sleep(longer.saturating_sub(t0.elapsed())).await;
            replicas[h].signal("-CONT");
        }
        Mode::Cut => {}
    }
    if mode != Mode::Kill {
        let since = Instant::now();
        while !replicas[h].exited() {
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "{} kept running after losing its lease ({mode:?})",
                replicas[h].name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    replicas[h].restart().await;
    took
}

// Process signals and blocking waits on a busy machine: a multi-threaded
// runtime, so the harness and the watchers keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_forced_handovers_mid_rotation_issue_write_roll_out_and_invalidate_once() {
    let (c, client, ns) = common::setup("ha").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    let aws = aws_client(c);
    let aws_name = format!("{ns}/app");
    aws.create_secret()
        .name(&aws_name)
        .secret_string(&old)
        .send()
        .await
        .unwrap();
    put_secret(
        &client,
        &ns,
        "aws-creds",
        json!({"AWS_ACCESS_KEY_ID": AWS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}),
    )
    .await;
    let values: Vec<String> = (0..200)
        .map(|i| common::canary(&format!("new{i}")))
        .collect();
    let (url, webhook) = webhook_server(client.clone(), ns.clone(), values.clone()).await;

    // Every value Secret `source` (the kubernetesSecret store) held, in order.
    let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watch = {
        let (written, api) = (
            written.clone(),
            Api::<Secret>::namespaced(client.clone(), &ns),
        );
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields("metadata.name=source");
            let mut events = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
            while let Some(e) = events.next().await {
                let s = match e {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
                    _ => continue,
                };
                let v = s
                    .data
                    .and_then(|d| d.get("client_secret").cloned())
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .unwrap_or_default();
                let mut w = written.lock().unwrap();
                if w.last() != Some(&v) {
                    w.push(v);
                }
            }
        })
    };

    let default_args = ["--leader-election-namespace", ns.as_str()];
    let args = [
        default_args[0],
        default_args[1],
        "--leader-lease-duration=3s",
        "--leader-renew-deadline=2s",
        "--leader-retry-period=500ms",
    ];
    let mut replicas = vec![];
    for name in ["a", "b"] {
        let (proxy, kubeconfig) = PausableProxy::for_api_server(c).await;
        let op = Operator::start_with_args(REKEY, c, &ns, kubeconfig, &args);
        replicas.push(Replica { name, op, proxy });
    }
    common::wait_for("a leader", Duration::from_secs(60), || async {
        replicas.iter().any(Replica::leads)
    })
    .await;

    let mut spec = rotation_spec(webhook_credential(&url));
    spec["targets"].as_array_mut().unwrap().push(json!(
        {"name": "aws", "awsSecretsManager": {"region": "us-east-1", "secretId": aws_name,
            "credentialsSecretRef": {"name": "aws-creds"}, "endpoint": c.moto_url}}));
    spec["proof"]["timeout"] = json!("5m");

    let modes = [Mode::Kill, Mode::Stop, Mode::Cut];
    let mut handovers: Vec<Handover> = vec![];
    let mut unforced = 0;
    let mut rotations = 0;
    let mut current = old.clone();
    let mut last_id = String::new();
    let mut aws_before = aws_versions(&aws, &aws_name).await;
    // The phase of the rotation in progress as the status shows it, the
    // moment it changes (a watch, not polling).
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(None::<(String, Phase)>);
    let phases = {
        let api = Api::<rekey::crd::SecretRotation>::namespaced(client.clone(), &ns);
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={NAME}"));
            let mut events = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
            while let Some(e) = events.next().await {
                if let Ok(watcher::Event::Apply(sr) | watcher::Event::InitApply(sr)) = e {
                    let now = sr
                        .status
                        .as_ref()
                        .and_then(|s| Some((s.rotation.as_ref()?.id.clone(), s.phase?)));
                    phase_tx.send_replace(now);
                }
            }
        })
    };
    let started = Instant::now();
    let mut retired: Vec<Replica> = vec![];
    // The forced handovers on the 3 s lease, then one rotation whose leader
    // is killed with the default timings (10 s lease).
    while handovers.len() < HANDOVERS + 1 {
        let default_round = handovers.len() == HANDOVERS;
        if default_round {
            for mut r in replicas.drain(..) {
                r.op.kill();
                retired.push(r);
            }
            for name in ["c", "d"] {
                let (proxy, kubeconfig) = PausableProxy::for_api_server(c).await;
                let op = Operator::start_with_args(REKEY, c, &ns, kubeconfig, &default_args);
                replicas.push(Replica { name, op, proxy });
            }
            common::wait_for("a leader", Duration::from_secs(60), || async {
                replicas.iter().any(Replica::leads)
            })
            .await;
        }
        rotations += 1;
        if rotations == 1 {
            create_rotation(&client, &ns, NAME, spec.clone()).await;
        } else {
            annotate_rotation(
                &client,
                &ns,
                NAME,
                "rekey.dev/rotate",
                &format!("r{rotations}"),
            )
            .await;
        }
        // The first handover the moment the rotation enters a phase (if it
        // does within 30 s), the next ones at varied moments after the
        // previous while the rotation runs.
        let at = match default_round {
            true => Phase::AwaitingRollout,
            false => AT_PHASES[(rotations - 1) % AT_PHASES.len()],
        };
        let mut rx = phase_rx.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|p| p.as_ref().is_some_and(|(id, p)| *p == at && *id != last_id)),
        )
        .await;
        for k in 0..3 {
            if k > 0 {
                let ms = THEN_MS[handovers.len() % THEN_MS.len()];
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if handovers.len() >= HANDOVERS && (!default_round || k > 0) {
                break;
            }
            if k > 0 && ended_after(&client, &ns, &last_id).await.is_some() {
                break;
            }
            let mode = match default_round {
                true => Mode::Kill,
                false => modes[handovers.len() % modes.len()],
            };
            let phase = match &*phase_rx.borrow() {
                Some((_, p)) => format!("{p:?}"),
                None => "between rotations".into(),
            };
            let took = force(&mut replicas, mode, &mut unforced).await;
            handovers.push(Handover {
                mode,
                rotation: rotations,
                phase,
                seconds: took.as_secs_f64(),
                lease: if default_round { 10 } else { 3 },
            });
        }
        let waited = Instant::now();
        let sr = loop {
            if let Some(sr) = ended_after(&client, &ns, &last_id).await {
                break sr;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(180),
                "rotation {rotations} did not end"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };

        // This rotation, as a user checks it.
        let status = sr.status.unwrap();
        assert_eq!(
            status.phase,
            Some(Phase::Succeeded),
            "{}",
            serde_json::to_string_pretty(&status).unwrap()
        );
        let last = status.last_rotation.unwrap();
        assert_eq!(
            status.history.len(),
            rotations.min(10),
            "one rotation per request (the history keeps 10)"
        );
        let log = webhook.lock().unwrap().clone();
        let issued: Vec<&String> = log
            .issued
            .iter()
            .filter(|(k, _)| *k == last.id)
            .map(|(_, v)| v)
            .collect();
        let new = issued.first().copied().cloned().expect("issued");
        assert!(issued.iter().all(|v| **v == new), "one value issued");
        let keys: std::collections::BTreeSet<&String> = log.issued.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys.len(),
            rotations,
            "one issue per rotation, nothing issued twice"
        );
        let invalidated: Vec<_> = log.invalidated.iter().filter(|i| i.0 == last.id).collect();
        assert!(!invalidated.is_empty(), "the old value was invalidated");
        let keys: std::collections::BTreeSet<&String> =
            log.invalidated.iter().map(|i| &i.0).collect();
        assert_eq!(keys.len(), rotations, "one invalidation per rotation");
        for (_, _, synced, rolled) in &invalidated {
            assert_eq!(
                synced.as_deref(),
                Some(new.as_str()),
                "invalidated before the sync"
            );
            assert!(*rolled, "invalidated before the rollout was complete");
        }
        assert_eq!(
            read_key(&client, &ns, "app-creds", "client_secret")
                .await
                .as_deref(),
            Some(new.as_str())
        );
        assert_eq!(
            rollout_revision(&client, &ns, "app").await,
            1 + rotations,
            "one rollout per rotation"
        );
        let aws_now = aws_versions(&aws, &aws_name).await;
        assert_eq!(aws_now, aws_before + 1, "one new AWS version per rotation");
        aws_before = aws_now;
        let current_aws = aws
            .get_secret_value()
            .secret_id(&aws_name)
            .send()
            .await
            .unwrap()
            .secret_string
            .unwrap();
        assert_eq!(current_aws, new);
        common::wait_for(
            "the watch saw the write",
            Duration::from_secs(10),
            || async { written.lock().unwrap().last() == Some(&new) },
        )
        .await;
        let w = written.lock().unwrap().clone();
        assert_eq!(
            &w[w.len() - 2..],
            &[current.clone(), new.clone()],
            "the Secret went from the old value to the new one, once"
        );
        assert_eq!(
            w.len(),
            rotations + 1,
            "one write per rotation, nothing written back"
        );
        current = new;
        last_id = last.id.clone();
    }
    let wall = started.elapsed();
    watch.abort();
    phases.abort();

    // The figures.
    let on_default = handovers.pop().unwrap();
    let mut secs: Vec<f64> = handovers.iter().map(|h| h.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let max = *secs.last().unwrap();
    println!("handover  lease  rotation  mode  phase when forced       seconds to a new leader");
    for (i, h) in handovers.iter().chain([&on_default]).enumerate() {
        println!(
            "{:>8}  {:>4}s  {:>8}  {:<4}  {:<22}  {:.2}",
            i + 1,
            h.lease,
            h.rotation,
            format!("{:?}", h.mode).to_lowercase(),
            h.phase,
            h.seconds
        );
    }
    let by_mode = |m: Mode| handovers.iter().filter(|h| h.mode == m).count();
    let mid = handovers
        .iter()
        .filter(|h| h.phase != "between rotations")
        .count();
    let mut by_phase = std::collections::BTreeMap::<&str, usize>::new();
    for h in &handovers {
        *by_phase.entry(h.phase.as_str()).or_default() += 1;
    }
    let invalidate_calls = webhook.lock().unwrap().invalidated.len();
    let issue_calls = webhook.lock().unwrap().issued.len();
    println!(
        "{} handovers ({} mid-rotation; kill {}, stop {}, cut {}) over {rotations} rotations in {:.0}s: median {median:.2}s, max {max:.2}s; {unforced} replica exits not forced; {issue_calls} issue and {invalidate_calls} invalidate calls for {rotations} rotations; with the default 10 s lease a killed leader was replaced in {:.2}s",
        handovers.len(),
        mid,
        by_mode(Mode::Kill),
        by_mode(Mode::Stop),
        by_mode(Mode::Cut),
        wall.as_secs_f64(),
        on_default.seconds
    );
    let figures = json!({
        "lease_seconds": LEASE.as_secs_f64(),
        "renew_deadline_seconds": 2.0,
        "retry_period_seconds": 0.5,
        "handovers_forced": {"kill": by_mode(Mode::Kill), "stop": by_mode(Mode::Stop), "cut_off_from_api_server": by_mode(Mode::Cut)},
        "handovers_mid_rotation": mid,
        "handovers_by_phase_when_forced": by_phase,
        "handovers_survived": handovers.len(),
        "replica_exits_not_forced": unforced,
        "rotations": rotations,
        "rotations_succeeded": rotations,
        "issue_calls": issue_calls,
        "invalidate_calls": invalidate_calls,
        "handover_seconds": {"median": round2(median), "max": round2(max), "all": handovers.iter().map(|h| round2(h.seconds)).collect::<Vec<_>>()},
        "default_lease_kill": {"lease_seconds": 10, "phase_when_forced": on_default.phase, "handover_seconds": round2(on_default.seconds)},
        "wall_seconds": round2(wall.as_secs_f64()),
    });
    let dir = common::repo_root().join("target/reliability");
    std::fs::create_dir_all(&dir).unwrap();
    write_json(&dir.join("ha.json"), &figures);
    assert!(max < HANDOVER_BOUND.as_secs_f64(), "{max}s");
    assert!(on_default.seconds < HANDOVER_BOUND.as_secs_f64());

    let logs: String = replicas
        .iter()
        .chain(&retired)
        .map(|r| r.op.logs())
        .collect();
    let mut canaries: Vec<&str> = values
        .iter()
        .take(issue_calls + 1)
        .map(String::as_str)
        .collect();
    canaries.push(&old);
    assert_never_leaked(
        &client,
        &ns,
        &logs,
        &replicas[0].op.scrape().await,
        &canaries,
    )
    .await;
}

/// The Deployment's revision (`deployment.kubernetes.io/revision`): 1, plus
/// one per rollout (ReplicaSets are counted no further than the revision
/// history limit, 10).
async fn rollout_revision(client: &kube::Client, ns: &str, name: &str) -> usize {
    let d = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    d.metadata
        .annotations
        .unwrap_or_default()
        .get("deployment.kubernetes.io/revision")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}
