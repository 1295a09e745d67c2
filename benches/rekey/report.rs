//! Figures: percentiles, medians over runs, the machine, the revision, and
//! the table `make bench` prints.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Nearest-rank percentile of `samples` (ms).
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

pub fn summary(samples: &[f64]) -> Value {
    json!({
        "n": samples.len(),
        "p50_ms": percentile(samples, 50.0),
        "p99_ms": percentile(samples, 99.0),
        "max_ms": percentile(samples, 100.0),
    })
}

pub fn machine() -> Value {
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    })
}

pub fn git_revision() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let rev = run(&["rev-parse", "--short=12", "HEAD"]);
    let dirty = !run(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty { format!("{rev}-dirty") } else { rev }
}

/// Median and spread (min, max) of one figure over runs.
pub fn over_runs(values: &[f64]) -> Value {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return json!({"runs": 0});
    }
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    json!({"runs": v.len(), "median": median, "min": v[0], "max": v[v.len() - 1]})
}

/// `median (min–max)` of an `over_runs` value, with a unit.
pub fn spread(v: &Value, unit: &str, digits: usize) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if v["runs"].as_u64().unwrap_or(0) <= 1 {
        return format!("{:.digits$} {unit}", f("median"));
    }
    format!(
        "{:.digits$} {unit} ({:.digits$}–{:.digits$}, {} runs)",
        f("median"),
        f("min"),
        f("max"),
        v["runs"]
    )
}

/// The user agent's program name: `external-secrets/v0.x (linux/amd64)…`
/// → `external-secrets`.
pub fn agent_name(user_agent: &str) -> String {
    match user_agent.split('/').next().unwrap_or_default() {
        // The benchmark's own client (kube-rs sends no user agent).
        "" => "benchmark".into(),
        name => name.to_string(),
    }
}

/// Requests per client program.
pub fn by_agent(requests: &[rekey_testenv::audit::Request]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        *counts.entry(agent_name(&r.user_agent)).or_default() += 1;
    }
    counts
}

pub fn mib(kib: &Value) -> String {
    match kib.as_f64() {
        Some(k) => format!("{:.1}", k / 1024.0),
        None => "–".into(),
    }
}
