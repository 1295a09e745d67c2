//! The suite-wide leak capture: every value made with [`crate::canary`] is
//! registered here (process-global), and every operator the harness started
//! is scanned for all of them when it is dropped: its whole log (stdout and
//! stderr, panic messages included), a last scrape of its metrics page, the
//! Events rekey recorded and the status of every SecretRotation in the
//! namespaces it watched. A hit fails the test; the report names the
//! canary's tag and where it was found, never the value.
//!
//! The totals (operators scanned, canaries registered, hits, bytes and
//! objects scanned, time spent) go to `target/reliability/canary.json`,
//! summed over the test processes of the current run (see [`record`]).

use std::sync::Mutex;

use base64::Engine;

/// One registered canary: its tag and the forms it is looked for in.
struct Canary {
    tag: String,
    /// The value, then its base64 forms (Secret `data` is base64 in every
    /// Kubernetes object and in kube-rs' debug output).
    forms: Vec<(String, &'static str)>,
}

static REGISTRY: Mutex<Vec<Canary>> = Mutex::new(Vec::new());

/// Registers `value` (made by [`crate::canary`] with `tag`) for every later
/// scan of this process.
pub fn register(tag: &str, value: &str) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let canary = Canary {
        tag: tag.to_string(),
        forms: vec![
            (value.to_string(), "value"),
            (b64.encode(value), "base64"),
            (b64url.encode(value), "base64url"),
        ],
    };
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(canary);
}

/// How many canaries this process registered so far.
pub fn registered() -> usize {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// One registered canary found somewhere it must never be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The tag given to `canary()`, e.g. "new" (never the value).
    pub tag: String,
    /// "value", "base64" or "base64url".
    pub form: &'static str,
    /// Where: "log rekey-ns-1-0.log line 12", "metrics", "Event ns/name", ...
    pub place: String,
}

impl std::fmt::Display for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "canary {:?} ({}) in {}", self.tag, self.form, self.place)
    }
}

/// Every registered canary, in any of its forms, found in `text`; `place`
/// says where the text came from. Lines are numbered for logs.
pub fn scan(text: &str, place: &str) -> Vec<Hit> {
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut hits = vec![];
    if registry.is_empty() || text.is_empty() {
        return hits;
    }
    // Every canary starts with "canary-" (base64 forms with "Y2FuYXJ5", the
    // encoding of "canary"): texts holding neither are done in one pass.
    if !text.contains("canary-") && !text.contains("Y2FuYXJ5L") {
        return hits;
    }
    for (n, line) in text.lines().enumerate() {
        if !line.contains("canary-") && !line.contains("Y2FuYXJ5L") {
            continue;
        }
        for c in registry.iter() {
            for (form, kind) in &c.forms {
                if line.contains(form.as_str()) {
                    hits.push(Hit {
                        tag: c.tag.clone(),
                        form: kind,
                        place: format!("{place} line {}", n + 1),
                    });
                }
            }
        }
    }
    hits
}

/// What the scans of this process found so far.
#[derive(Default)]
struct Totals {
    operators: u64,
    log_bytes: u64,
    metrics_pages: u64,
    events: u64,
    statuses: u64,
    hits: u64,
    deliberate_hits: u64,
    not_scanned_api: u64,
    scan_ms_total: f64,
    scan_ms_max: f64,
}

static TOTALS: Mutex<Totals> = Mutex::new(Totals {
    operators: 0,
    log_bytes: 0,
    metrics_pages: 0,
    events: 0,
    statuses: 0,
    hits: 0,
    deliberate_hits: 0,
    not_scanned_api: 0,
    scan_ms_total: 0.0,
    scan_ms_max: 0.0,
});

/// The figures of one operator's scan.
#[derive(Default)]
pub struct Scanned {
    pub log_bytes: u64,
    pub metrics_page: bool,
    /// None when the API server could not be read (a cluster already gone).
    pub events: Option<u64>,
    pub statuses: u64,
    pub hits: u64,
    /// The hits were made on purpose (tests/it/leaks.rs).
    pub deliberate: bool,
    pub millis: f64,
}

/// Adds one operator's scan to this process's totals, writes them to
/// `target/reliability/canary-runs/<pid>.json`, and sums the files there
/// into `target/reliability/canary.json`: test processes running side by
/// side each add theirs; files of processes that ended are dropped by the
/// next process's first scan, so the sum is the current run's.
pub fn record(s: Scanned) {
    let mine = {
        let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        t.operators += 1;
        t.log_bytes += s.log_bytes;
        t.metrics_pages += u64::from(s.metrics_page);
        match s.events {
            Some(n) => t.events += n,
            None => t.not_scanned_api += 1,
        }
        t.statuses += s.statuses;
        if s.deliberate {
            t.deliberate_hits += s.hits;
        } else {
            t.hits += s.hits;
        }
        t.scan_ms_total += s.millis;
        t.scan_ms_max = t.scan_ms_max.max(s.millis);
        serde_json::json!({
            "operators_scanned": t.operators,
            "canaries_registered": registered(),
            "hits": t.hits,
            "deliberate_hits": t.deliberate_hits,
            "log_bytes_scanned": t.log_bytes,
            "metrics_pages_scanned": t.metrics_pages,
            "events_scanned": t.events,
            "statuses_scanned": t.statuses,
            "operators_without_api_scan": t.not_scanned_api,
            "scan_ms_total": (t.scan_ms_total * 10.0).round() / 10.0,
            "scan_ms_max": (t.scan_ms_max * 10.0).round() / 10.0,
        })
    };
    let dir = crate::repo_root().join("target/reliability");
    let runs = dir.join("canary-runs");
    static PRUNED: std::sync::Once = std::sync::Once::new();
    PRUNED.call_once(|| {
        for f in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
            let pid = f
                .path()
                .file_stem()
                .and_then(|p| p.to_str()?.parse::<u32>().ok());
            if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_file(f.path());
            }
        }
    });
    let _ = std::fs::create_dir_all(&runs);
    let pid = std::process::id();
    // Whole files only (written aside, then renamed): a reader never sees
    // half of one.
    let write = |path: std::path::PathBuf, v: &serde_json::Value| {
        let tmp = dir.join(format!(".canary-{pid}.tmp"));
        if std::fs::write(&tmp, serde_json::to_string_pretty(v).unwrap()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    };
    write(runs.join(format!("{pid}.json")), &mine);
    let mut sum = serde_json::Map::new();
    let mut processes = 0;
    for f in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
        let Some(serde_json::Value::Object(run)) = std::fs::read_to_string(f.path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        else {
            continue;
        };
        processes += 1;
        for (k, v) in run {
            let v = v.as_f64().unwrap_or_default();
            let e = sum.entry(k.clone()).or_insert(serde_json::json!(0.0));
            let acc = e.as_f64().unwrap_or_default();
            *e = serde_json::json!(if k == "scan_ms_max" {
                acc.max(v)
            } else {
                acc + v
            });
        }
    }
    for v in sum.values_mut() {
        if let Some(n) = v.as_f64().filter(|n| n.fract() == 0.0) {
            *v = serde_json::json!(n as u64);
        }
    }
    sum.insert("test_processes".into(), serde_json::json!(processes));
    sum.insert(
        "measured_at".into(),
        serde_json::json!(jiff::Timestamp::now().to_string()),
    );
    write(dir.join("canary.json"), &serde_json::Value::Object(sum));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_finds_a_registered_canary_in_a_log_and_names_only_its_tag() {
        let value = crate::canary("scanner-test");
        let other = crate::canary("scanner-absent");
        let log = format!(
            "INFO starting\nDEBUG wrote {value} to the store\nINFO done\n{}\n",
            base64::engine::general_purpose::STANDARD.encode(&value)
        );
        let dir = std::env::temp_dir().join(format!("rekey-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rekey.log");
        std::fs::write(&file, &log).unwrap();

        let hits = scan(&std::fs::read_to_string(&file).unwrap(), "log rekey.log");
        let _ = std::fs::remove_dir_all(&dir);

        assert!(hits.iter().all(|h| h.tag == "scanner-test"), "{hits:?}");
        assert!(hits.contains(&Hit {
            tag: "scanner-test".into(),
            form: "value",
            place: "log rekey.log line 2".into()
        }));
        assert!(
            hits.iter()
                .any(|h| h.form == "base64" && h.place.ends_with("line 4"))
        );
        let shown = hits.iter().map(|h| h.to_string()).collect::<String>();
        assert!(!shown.contains(&value) && !shown.contains(&other));
        assert!(scan("INFO nothing to see\n", "log").is_empty());
    }
}
