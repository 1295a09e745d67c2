//! Reads the API server's audit log (a cluster started with
//! `Options::audit`): which client asked for what, and when. Used to count
//! rekey's requests per rotation and per idle minute.

use std::collections::BTreeMap;
use std::path::Path;

use jiff::Timestamp;
use serde_json::Value;

/// One request, as the audit log has it at Metadata level.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub user_agent: String,
    pub verb: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub at: Timestamp,
}

impl Request {
    /// Whether the request changes something.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// Every request in the log whose user agent starts with `agent`.
pub fn requests(log: &Path, agent: &str) -> Vec<Request> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        // A watch is logged when it starts (it completes only when it ends);
        // every other request when it completes.
        .filter(|e| {
            let stage = if e["verb"] == "watch" {
                "ResponseStarted"
            } else {
                "ResponseComplete"
            };
            e["stage"] == stage
        })
        .filter_map(|e| {
            let user_agent = e["userAgent"].as_str().unwrap_or_default();
            if !user_agent.starts_with(agent) {
                return None;
            }
            let o = &e["objectRef"];
            let resource = match o["subresource"].as_str() {
                Some(sub) => format!("{}/{sub}", o["resource"].as_str().unwrap_or("-")),
                None => o["resource"].as_str().unwrap_or("-").to_string(),
            };
            Some(Request {
                user_agent: user_agent.to_string(),
                verb: e["verb"].as_str().unwrap_or_default().to_string(),
                resource,
                namespace: o["namespace"].as_str().unwrap_or_default().to_string(),
                name: o["name"].as_str().unwrap_or_default().to_string(),
                at: e["stageTimestamp"].as_str()?.parse().ok()?,
            })
        })
        .collect()
}

/// Counts per `verb resource`, sorted.
pub fn by_verb_and_resource<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        *counts
            .entry(format!("{} {}", r.verb, r.resource))
            .or_default() += 1;
    }
    counts
}

/// Waits until rekey (user agent `rekey/`) watches SecretRotations in the
/// cluster whose audit log is `log`: from then on its requests are counted.
pub async fn wait_for_rekey_watching(log: &Path) {
    crate::wait_for(
        "rekey to start watching",
        std::time::Duration::from_secs(60),
        || async {
            requests(log, "rekey/")
                .iter()
                .any(|r| r.verb == "watch" && r.resource == "secretrotations")
        },
    )
    .await;
}
