//! `why`: what a SecretRotation waits for or why it failed, which parts of
//! the proof are missing, and what a person can do. Pure: built from the
//! object alone.

use jiff::Timestamp;
use kube::ResourceExt;
use rekey::crd::{Phase, SecretRotation};
use serde::Serialize;

use super::show::ago;

/// The answer, as printed (or as JSON with `-o json`).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Why {
    pub namespace: String,
    pub name: String,
    /// Where it stands, in one sentence.
    pub state: String,
    /// What it waits for, or why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    /// Parts of the proof not observed yet, with what each waits for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_proven: Vec<String>,
    /// Parts of the proof already observed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub proven: Vec<String>,
    /// Deadlines that matter now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deadlines: Vec<String>,
    /// What a person can do.
    pub what_to_do: Vec<String>,
}

impl Why {
    pub fn to_text(&self) -> String {
        let mut out = format!("{}/{}: {}.\n", self.namespace, self.name, self.state);
        if let Some(b) = &self.blocked_by {
            out.push_str(&format!("Blocked by: {b}\n"));
        }
        if !self.not_proven.is_empty() || !self.proven.is_empty() {
            out.push_str("Proof:\n");
            for p in &self.not_proven {
                out.push_str(&format!("  … {p}\n"));
            }
            for p in &self.proven {
                out.push_str(&format!("  ✓ {p}\n"));
            }
        }
        for d in &self.deadlines {
            out.push_str(&format!("Deadline: {d}\n"));
        }
        out.push_str("What to do:\n");
        for w in &self.what_to_do {
            out.push_str(&format!("  - {w}\n"));
        }
        out
    }
}

/// The "what to do" column of the failure reasons in docs/concepts.md:
/// one text for users, in the docs and here.
fn failure_hint(reason: &str) -> Option<String> {
    let docs = include_str!("../../../docs/concepts.md");
    docs.lines().find_map(|line| {
        let cells: Vec<&str> = line.split(" | ").collect();
        let names = cells.first()?.trim_start_matches("| ");
        let named = names.split(", ").any(|n| n.trim_matches('`') == reason);
        (named && cells.len() >= 3).then(|| cells[2].trim_end_matches(" |").replace('`', ""))
    })
}

/// The kubectl resource name of a workload kind.
fn resource(kind: &str) -> String {
    kind.to_ascii_lowercase()
}

pub fn why(sr: &SecretRotation, now: Timestamp) -> Why {
    let namespace = sr.namespace().unwrap_or_default();
    let name = sr.name_any();
    let status = sr.status.clone().unwrap_or_default();
    let condition = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_);
    let mut w = Why {
        namespace: namespace.clone(),
        name: name.clone(),
        ..Default::default()
    };
    let Some(rot) = &status.rotation else {
        match (&status.last_rotation, status.phase) {
            (_, None) => {
                w.state = "rekey has not looked at it yet".into();
                w.what_to_do.push(
                    "check that rekey runs and watches this namespace (its logs, and the chart's `namespaces`)"
                        .into(),
                );
            }
            (Some(last), Some(Phase::Failed)) => {
                w.state = format!(
                    "rotation {} failed {}",
                    last.id,
                    ago(last.finished_at.as_ref(), now)
                );
                if let Some(f) = &last.failure {
                    w.blocked_by = Some(format!("{} in {}: {}", f.reason, f.phase, f.message));
                    w.what_to_do.extend(failure_hint(&f.reason));
                }
                w.what_to_do.push(format!(
                    "then request a new rotation: kubectl rekey -n {namespace} rotate {name}"
                ));
            }
            (last, Some(phase)) => {
                w.state = match last {
                    Some(l) => format!(
                        "no rotation in progress; the last one {} {}",
                        l.result,
                        ago(l.finished_at.as_ref(), now)
                    ),
                    None => format!("no rotation in progress ({phase})"),
                };
                if let Some(r) = &status.pending_request {
                    w.blocked_by = condition("Rotating").map(|c| c.message.clone());
                    w.what_to_do
                        .push(format!("a rotation is requested ({r}) and starts soon"));
                } else {
                    w.what_to_do.push(format!(
                        "nothing blocks it; to rotate now: kubectl rekey -n {namespace} rotate {name}"
                    ));
                }
            }
        }
        return w;
    };

    let phase = status.phase.unwrap_or(Phase::Pending);
    let since = ago(
        rot.phase_started_at
            .as_ref()
            .map(|t| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.0))
            .as_ref(),
        now,
    );
    w.state = format!(
        "rotation {} ({}) is in {phase}, since {since}",
        rot.id, rot.reason
    );
    w.blocked_by = condition("Rotating").map(|c| c.message.clone());
    for p in &rot.proof {
        let what = format!("{} {}", p.kind, p.name);
        if p.proven {
            w.proven.push(what);
        } else {
            w.not_proven.push(format!("{what}: {}", p.waiting_for));
        }
    }
    if let Some(d) = &rot.proof_deadline {
        w.deadlines.push(format!(
            "the proof must be complete by {} ({})",
            d.0,
            ago(Some(d), now)
        ));
    }
    if let Some(u) = &rot.old_value_valid_until {
        w.deadlines.push(format!(
            "the old value is valid until {} ({})",
            u.0,
            ago(Some(u), now)
        ));
    }
    if let Some(c) = condition("GraceWindowAtRisk").filter(|c| c.status == "True") {
        w.deadlines.push(format!("{}: {}", c.reason, c.message));
    }
    let ns = &namespace;
    match phase {
        Phase::AwaitingApproval => w.what_to_do.push(format!(
            "approve it (someone allowed to approve{}): kubectl rekey -n {ns} approve {name}",
            rot.requested_by
                .as_deref()
                .map(|who| format!(", not its requester {who}"))
                .unwrap_or_default()
        )),
        Phase::AwaitingConfirmation => w.what_to_do.push(format!(
            "invalidate the old value at the identity provider, then: kubectl rekey -n {ns} confirm-invalidated {name}"
        )),
        Phase::AwaitingSync => {
            for p in rot.proof.iter().filter(|p| !p.proven) {
                w.what_to_do.push(format!(
                    "kubectl -n {ns} describe externalsecret {} (its Ready condition, its SecretStore, ESO's logs)",
                    p.name
                ));
            }
        }
        Phase::AwaitingRollout => {
            let workloads: Vec<String> = sr
                .spec
                .proof
                .workloads
                .iter()
                .map(|w| format!("{:?}/{}", w.kind, w.name))
                .collect();
            for p in rot.proof.iter().filter(|p| !p.proven) {
                if workloads.contains(&format!("{}/{}", p.kind, p.name)) {
                    w.what_to_do.push(format!(
                        "kubectl -n {ns} rollout status {}/{} (quotas, image pulls, readiness: kubectl -n {ns} describe {} {})",
                        resource(&p.kind),
                        p.name,
                        resource(&p.kind),
                        p.name
                    ));
                } else {
                    w.what_to_do.push(format!(
                        "{} {} still has pods from before the new value: kubectl -n {ns} get pods (long terminationGracePeriodSeconds, finalizers, a running Job)",
                        p.kind, p.name
                    ));
                }
            }
        }
        _ => {}
    }
    if w.what_to_do.is_empty() {
        let retrying = w
            .blocked_by
            .as_deref()
            .is_some_and(|m| m.contains("retrying after error"));
        w.what_to_do.push(if retrying {
            "rekey retries until proof.timeout; the error above says what to fix".into()
        } else {
            "nothing: the rotation is moving on its own".into()
        });
    }
    if super::rollback_refusal(sr, rot, phase).is_none() {
        w.what_to_do.push(format!(
            "to give up and write the previous value back: kubectl rekey -n {ns} rollback {name}"
        ));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sr(status: serde_json::Value) -> SecretRotation {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
            "metadata": {"name": "app-secret", "namespace": "team"},
            "spec": {"credential": {"generated": {}}, "targets": [],
                     "proof": {"workloads": [{"kind": "Deployment", "name": "app"}]}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_failure_names_the_reason_and_the_documented_remedy() {
        let w = why(
            &sr(serde_json::json!({"phase": "Failed", "lastRotation": {
                "id": "r1", "result": "Failed", "reason": "OnDemand", "durationSeconds": 3.0,
                "startedAt": null, "finishedAt": null,
                "failure": {"reason": "RolloutTimeout", "message": "Deployment app rolling out", "phase": "AwaitingRollout"}}})),
            Timestamp::now(),
        );
        let text = w.to_text();
        assert!(text.contains("RolloutTimeout in AwaitingRollout"), "{text}");
        assert!(text.contains("kubectl rollout status; quotas"), "{text}");
        assert!(
            text.contains("kubectl rekey -n team rotate app-secret"),
            "{text}"
        );
    }

    #[test]
    fn a_waiting_rollout_lists_what_is_not_proven_and_offers_a_rollback() {
        let w = why(
            &sr(serde_json::json!({"phase": "AwaitingRollout", "rotation": {
                "id": "r2", "reason": "OnDemand", "requestedAt": null, "phaseStartedAt": null,
                "issuedAt": "2026-11-27T00:00:00Z",
                "proof": [
                    {"kind": "ExternalSecret", "name": "app-creds", "proven": true},
                    {"kind": "Deployment", "name": "app", "proven": false, "waitingFor": "rolling out (0/2 updated, 2 ready, 2 available)"}]}})),
            Timestamp::now(),
        );
        assert_eq!(w.proven, ["ExternalSecret app-creds"]);
        assert_eq!(
            w.not_proven,
            ["Deployment app: rolling out (0/2 updated, 2 ready, 2 available)"]
        );
        assert!(
            w.what_to_do[0].starts_with("kubectl -n team rollout status deployment/app"),
            "{w:?}"
        );
        assert!(w.what_to_do.last().unwrap().contains("rollback app-secret"));
    }

    #[test]
    fn every_failure_reason_has_a_remedy() {
        for reason in rekey::reason::Reason::ALL {
            assert!(
                failure_hint(reason.as_str()).is_some_and(|h| !h.is_empty()),
                "{reason:?}"
            );
        }
    }
}
