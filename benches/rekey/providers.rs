//! Provider budgets (issue 13 part 6): calls per rotation per store, with
//! `ROTATIONS` rotations requested at once against one IBM Secrets Manager
//! instance (the emulator, which timestamps every request) and one AWS
//! Secrets Manager (moto, counted by rekey's own `rekey_provider_calls_total`,
//! one per SDK operation). The IBM figure includes the peak request rate on
//! the instance in any one-second window, which rekey's client-side limit
//! (`--ibm-requests-per-second`) must keep at or under IBM's 5/s.

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::REKEY;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use common::fixtures::*;
use common::ibm::IbmEmulator;
use common::operator::Operator;
use serde_json::{Value, json};

const ROTATIONS: usize = 20;
const LONG: Duration = Duration::from_secs(600);
const AWS_KEY: &str = "AKIAREKEYBENCH000001";
const AWS_SECRET: &str = "rekey-bench-secret-access-key";

/// Most requests in any window of one second.
fn peak_per_second(times: &[Instant]) -> usize {
    let mut t = times.to_vec();
    t.sort();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..t.len() {
        while t[hi].duration_since(t[lo]) >= Duration::from_secs(1) {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

fn spec(target: Value) -> Value {
    json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [target],
        "proof": {"nothingToProve": true}
    })
}

pub async fn run() -> Value {
    let opts = common::Options {
        eso: false,
        ..Default::default()
    };
    let (c, client, ns) = common::setup_private("providers", opts).await;
    let c = &c;
    install_crd(c);
    let op = Operator::start_with_args(
        REKEY,
        c,
        &ns,
        c.kubeconfig.clone(),
        &["--starts-per-minute=0"],
    );

    // IBM: ROTATIONS secrets on one instance, rotated at once.
    let emu = IbmEmulator::start().await;
    emu.add_api_key("bench-api-key");
    put_secret(
        &client,
        &ns,
        "ibm-api-key",
        json!({"apikey": "bench-api-key"}),
    )
    .await;
    for i in 0..ROTATIONS {
        let id = emu.create_secret(
            &format!("bench-{i}"),
            "arbitrary",
            json!(common::canary("old")),
        );
        let target = json!({"name": "ibm", "ibmSecretsManager": {"serviceUrl": emu.url, "secretId": id, "iamUrl": emu.url,
            "apiKeySecretRef": {"name": "ibm-api-key", "key": "apikey"}}});
        create_rotation(&client, &ns, &format!("ibm-{i}"), spec(target)).await;
    }
    let ibm_s = all_succeeded(&client, &ns, ROTATIONS, LONG)
        .await
        .as_secs_f64();
    let (calls, times) = {
        let st = emu.state.lock().unwrap();
        (st.calls.clone(), st.call_times.clone())
    };
    let mut ibm_calls: BTreeMap<String, f64> = BTreeMap::new();
    let mut service_times = vec![];
    for (call, at) in calls.iter().zip(&times) {
        // "METHOD /api/v2/secrets/<id>/versions" → "METHOD secrets/versions".
        let kind: String = call
            .split('/')
            .filter(|p| !p.is_empty() && p.len() < 20 && *p != "api" && *p != "v2")
            .collect::<Vec<_>>()
            .join("/");
        *ibm_calls.entry(kind).or_default() += 1.0 / ROTATIONS as f64;
        if !call.contains("/identity/token") {
            service_times.push(*at);
        }
    }
    let ibm = json!({
        "rotations_at_once": ROTATIONS,
        "all_succeeded_s": ibm_s,
        "calls_per_rotation": service_times.len() as f64 / ROTATIONS as f64,
        "iam_tokens": calls.len() - service_times.len(),
        "by_call_per_rotation": ibm_calls,
        "peak_requests_in_one_second": peak_per_second(&service_times),
    });

    // AWS: ROTATIONS secrets in moto, rotated at once.
    let aws = aws_sdk_secretsmanager::Client::from_conf(
        aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(AWS_KEY, AWS_SECRET, None, None, "bench"))
            .endpoint_url(c.moto_url.clone().unwrap())
            .build(),
    );
    put_secret(
        &client,
        &ns,
        "aws-creds",
        json!({"AWS_ACCESS_KEY_ID": AWS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}),
    )
    .await;
    let before = op.scrape().await;
    for i in 0..ROTATIONS {
        let name = format!("bench-aws-{i}-{}", rand::random::<u32>());
        aws.create_secret()
            .name(&name)
            .secret_string(common::canary("old"))
            .send()
            .await
            .unwrap();
        let target = json!({"name": "aws", "awsSecretsManager": {"region": "us-east-1", "secretId": name,
            "credentialsSecretRef": {"name": "aws-creds"}, "endpoint": c.moto_url}});
        create_rotation(&client, &ns, &format!("aws-{i}"), spec(target)).await;
    }
    let aws_s = all_succeeded(&client, &ns, 2 * ROTATIONS, LONG)
        .await
        .as_secs_f64();
    let after = op.scrape().await;
    let aws_calls = |metrics: &str| -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for l in metrics.lines().filter(|l| {
            l.starts_with("rekey_provider_calls_total{")
                && l.contains("provider=\"aws-secrets-manager\"")
        }) {
            let call = l
                .split("call=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            let n: f64 = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *m.entry(call.to_string()).or_default() += n;
        }
        m
    };
    let (b, a) = (aws_calls(&before), aws_calls(&after));
    let by_call: BTreeMap<String, f64> = a
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - b.get(k).copied().unwrap_or(0.0)) / ROTATIONS as f64,
            )
        })
        .collect();
    let aws_json = json!({
        "rotations_at_once": ROTATIONS,
        "all_succeeded_s": aws_s,
        "calls_per_rotation": by_call.values().sum::<f64>(),
        "by_call_per_rotation": by_call,
    });
    drop(op);
    json!({"ibm": ibm, "aws": aws_json})
}
