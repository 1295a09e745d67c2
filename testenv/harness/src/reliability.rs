//! Figures the tests measure for the README's Reliability section: each
//! area writes `target/reliability/<area>.json` (never into the source
//! tree); `make reliability` renders them into docs/reliability.md.

use std::path::PathBuf;

use serde_json::Value;

/// Where the figures go: `<repo>/target/reliability`.
pub fn dir() -> PathBuf {
    crate::cluster::repo_root().join("target/reliability")
}

/// Writes the figures of `area` (a JSON object), replacing earlier ones,
/// with the time they were measured.
pub fn record(area: &str, mut figures: Value) {
    if let Value::Object(map) = &mut figures {
        map.insert(
            "measured_at".into(),
            Value::String(jiff::Timestamp::now().to_string()),
        );
    }
    let dir = dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{area}.json"));
    if let Err(e) = std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap()) {
        eprintln!("could not write {}: {e}", path.display());
    }
}
