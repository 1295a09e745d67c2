//! `make bench`: what rekey costs, measured on the local control plane (real
//! API server, ESO, kwok) with the release build. Prints one table and writes
//! it as JSON under `bench/results/`. A benchmark, not a test: it asserts
//! nothing, and shows each target beside its figure.
//!
//! Scenarios (issue 13), each in a cluster of its own:
//! - `footprint`: binary size, start-up to ready, idle memory;
//! - `latency` and `api` (latency.rs): latency added and requests per rotation;
//! - `unrelated` (unrelated.rs): 10,000 unrelated Secrets and 5,000 pods;
//! - `scale` (scale.rs): N rotations at once beside the same updates without rekey;
//! - `providers` (providers.rs): calls per rotation per store.
//!
//! `make bench` runs the scale scenario for 200 and 1,000 rotations once;
//! `make bench-full` (`REKEY_BENCH_FULL=1`) runs the curve 50…1,000, three
//! times each. `REKEY_BENCH_ONLY=a,b` runs only the named scenarios;
//! `REKEY_BENCH_SIZES=20,50` sets the scale scenario's sizes.

mod latency;
mod providers;
mod report;
mod scale;
mod unrelated;

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::operator::{Operator, proc_status_kib};
use report::{git_revision, machine, mib, over_runs, spread};
use serde_json::{Value, json};

const REKEY: &str = env!("CARGO_BIN_EXE_rekey");
/// Runs of the latency scenario and of start-up.
const RUNS: usize = 3;

/// Binary size, start-up to ready (`/readyz` 200) and idle memory.
async fn footprint() -> Value {
    let opts = common::Options {
        eso: false,
        moto: false,
        ..Default::default()
    };
    let (c, _client, ns) = common::setup_private("footprint", opts).await;
    rekey_testenv::fixtures::install_crd(&c);
    let (mut ready, mut rss) = (vec![], vec![]);
    for _ in 0..RUNS {
        let started = Instant::now();
        let op = Operator::start(REKEY, &c, &ns);
        common::wait_for("rekey ready", Duration::from_secs(60), || async {
            op.probe("/readyz").await == Some(200)
        })
        .await;
        ready.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        rss.push(
            op.pid()
                .and_then(|p| proc_status_kib(p, "VmRSS"))
                .unwrap_or(0) as f64,
        );
    }
    json!({
        "binary_bytes": std::fs::metadata(REKEY).map(|m| m.len()).unwrap_or(0),
        "startup_to_ready_ms": over_runs(&ready),
        "idle_rss_kib": over_runs(&rss),
    })
}

fn wanted(name: &str) -> bool {
    std::env::var("REKEY_BENCH_ONLY").map_or(true, |only| only.split(',').any(|o| o == name))
}

fn table(r: &BTreeMap<&'static str, Value>) -> String {
    let mut out = String::new();
    let mut row = |what: &str, figure: String, target: &str| {
        out.push_str(&format!("| {what} | {figure} | {target} |\n"));
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    if let Some(l) = r.get("latency") {
        let ms = |v: &Value| {
            format!(
                "p50 {}, p99 {}",
                spread(&v["p50_ms"], "ms", 0),
                spread(&v["p99_ms"], "ms", 0)
            )
        };
        row(
            "added: synced Secret → restart request",
            ms(&l["sync_to_restart_request"]),
            "p50 ≤ 100 ms, p99 ≤ 1 s",
        );
        row(
            "added: rollout complete and last old pod gone → invalidate",
            ms(&l["rollout_complete_to_invalidate"]),
            "p50 ≤ 100 ms, p99 ≤ 1 s",
        );
        row(
            "ESO: refresh request → synced Secret",
            ms(&l["eso_refresh_request_to_synced_secret"]),
            "(reference)",
        );
        row(
            "rotations measured (failed)",
            format!(
                "{} ({}), {} rounds of {}",
                l["measured"], l["failed"], l["rounds"], l["rotations_per_round"]
            ),
            "",
        );
        row(
            "CPU per rotation",
            spread(&l["cpu_s_per_rotation"], "s", 3),
            "",
        );
    }
    if let Some(a) = r.get("api") {
        row(
            "API requests per rotation (writes)",
            format!(
                "{} ({})",
                spread(&a["per_rotation_total"], "", 1),
                spread(&a["per_rotation_writes"], "", 1)
            ),
            "",
        );
        let others: Vec<String> = a["other_clients_per_rotation"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| format!("{k} {:.1}", f(v))).collect())
            .unwrap_or_default();
        row(
            "other clients' requests per rotation",
            others.join(", "),
            "(reference)",
        );
        row(
            "idle minute, 100 Succeeded: writes / reads beyond the watch",
            format!(
                "{} / {}",
                a["idle_minute_writes"], a["idle_minute_reads_beyond_watch"]
            ),
            "0 / 0",
        );
        row(
            "a minute with 100 rotations waiting for a restart: requests",
            a["waiting_minute_total"].to_string(),
            "",
        );
    }
    if let Some(u) = r.get("unrelated") {
        let m = |who: &str, when: &str, k: &str| mib(&u[when][who][k]);
        row(
            &format!(
                "{} unrelated 100 KB Secrets + {} pods: rekey RSS before → after (HWM)",
                u["secrets"], u["pods"]
            ),
            format!(
                "{} → {} MiB ({} MiB)",
                m("rekey", "before", "rss_kib"),
                m("rekey", "after", "rss_kib"),
                m("rekey", "after", "hwm_kib")
            ),
            "≤ 2 MiB growth",
        );
        row(
            "… ESO RSS before → after (HWM)",
            format!(
                "{} → {} MiB ({} MiB)",
                m("eso", "before", "rss_kib"),
                m("eso", "after", "rss_kib"),
                m("eso", "after", "hwm_kib")
            ),
            "(reference)",
        );
        let n: u64 = u["rekey_requests_while_they_appeared"]
            .as_object()
            .map(|o| o.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        row("… rekey requests while they appeared", n.to_string(), "0");
    }
    if let Some(Value::Array(sizes)) = r.get("scale") {
        for s in sizes {
            let partial = if s["partial"] == true {
                " (PARTIAL: capped)"
            } else {
                ""
            };
            row(
                &format!(
                    "{} rotations at once: all Succeeded / baseline without rekey",
                    s["rotations"]
                ),
                format!(
                    "{:.0} s / {:.0} s = {:.2}×{partial} ({} Succeeded, {} Failed)",
                    f(&s["total_s"]),
                    f(&s["baseline_s"]),
                    f(&s["ratio"]),
                    s["succeeded"],
                    s["failed"]
                ),
                "≤ 1.2×",
            );
            row(
                &format!(
                    "… {} rotations: rekey peak (HWM) / steady RSS",
                    s["rotations"]
                ),
                format!("{} / {} MiB", mib(&s["hwm_kib"]), mib(&s["rss_steady_kib"])),
                "≤ 64 MiB",
            );
            row(
                &format!(
                    "… {} rotations: API requests/s (all clients), rekey requests per rotation",
                    s["rotations"]
                ),
                format!(
                    "{:.0}/s, {:.1}",
                    f(&s["api_requests_per_s_all_clients"]),
                    f(&s["rekey_requests_per_rotation"])
                ),
                "",
            );
        }
    }
    if let Some(p) = r.get("providers") {
        row(
            "IBM calls per rotation (peak requests in 1 s, 20 at once)",
            format!(
                "{:.1} ({})",
                f(&p["ibm"]["calls_per_rotation"]),
                p["ibm"]["peak_requests_in_one_second"]
            ),
            "≤ 6 (≤ 5/s)",
        );
        let aws: Vec<String> = p["aws"]["by_call_per_rotation"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| format!("{k} {:.1}", f(v))).collect())
            .unwrap_or_default();
        row(
            "AWS calls per rotation",
            aws.join(", "),
            "1 write, 1 stage move",
        );
    }
    if let Some(fp) = r.get("footprint") {
        row(
            "release binary",
            format!("{:.1} MiB", f(&fp["binary_bytes"]) / 1048576.0),
            "",
        );
        row(
            "start-up to ready",
            spread(&fp["startup_to_ready_ms"], "ms", 0),
            "",
        );
        row(
            "idle RSS",
            format!("{} MiB", mib(&fp["idle_rss_kib"]["median"])),
            "",
        );
    }
    format!("| measure | figure | target |\n|---|---|---|\n{out}")
}

fn main() {
    rekey::install_crypto_provider();
    // The operator logs as the chart runs it, not at the tests' debug level.
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("REKEY_OPERATOR_RUST_LOG", "info,kube=warn") };
    let full = std::env::var("REKEY_BENCH_FULL").is_ok();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut results: BTreeMap<&'static str, Value> = BTreeMap::new();
    let started = Instant::now();
    let mut took = BTreeMap::new();
    runtime.block_on(async {
        let mut timed = Instant::now();
        let mut lap = |name: &'static str, took: &mut BTreeMap<&'static str, f64>| {
            took.insert(name, timed.elapsed().as_secs_f64());
            timed = Instant::now();
        };
        if wanted("footprint") {
            results.insert("footprint", footprint().await);
            lap("footprint", &mut took);
        }
        if wanted("latency") {
            let (latency, api) = latency::run(RUNS).await;
            results.insert("latency", latency);
            results.insert("api", api);
            lap("latency", &mut took);
        }
        if wanted("providers") {
            results.insert("providers", providers::run().await);
            lap("providers", &mut took);
        }
        if wanted("unrelated") {
            results.insert("unrelated", unrelated::run().await);
            lap("unrelated", &mut took);
        }
        if wanted("scale") {
            let sizes: Vec<usize> = if let Ok(list) = std::env::var("REKEY_BENCH_SIZES") {
                list.split(',')
                    .filter_map(|n| n.trim().parse().ok())
                    .collect()
            } else if full {
                [50, 100, 200, 500, 1000]
                    .iter()
                    .flat_map(|&n| [n; RUNS])
                    .collect()
            } else {
                vec![200, 1000]
            };
            let cap = |n: usize| Duration::from_secs(120 + n as u64 / 2);
            results.insert("scale", scale::run(&sizes, cap).await);
            lap("scale", &mut took);
        }
    });
    let date = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let revision = git_revision();
    let report = json!({
        "date": date,
        "revision": revision,
        "machine": machine(),
        "build": "release",
        "full": full,
        "eso_flags": ["--concurrent=4", "--enable-leader-election=false"],
        "duration_s": started.elapsed().as_secs_f64(),
        "scenario_s": took,
        "results": results,
    });
    let table = table(&results);
    println!(
        "\nrekey bench, {date}, revision {revision}, {}\n\n{table}",
        report["machine"]
    );
    let dir = common::repo_root().join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}-{revision}.json", &date[..10]));
    std::fs::write(&file, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("written to {}", file.display());
}
