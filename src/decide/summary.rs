//! What a finished rotation reports, and how long a phase took. Pure; the
//! clock is an argument.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::grace::{Grace, grace};
use crate::crd::{Phase, RotationStatus, RotationSummary};

/// Seconds between two instants, to the millisecond.
pub fn seconds_between(since: Timestamp, now: Timestamp) -> f64 {
    (now.duration_since(since).as_secs_f64() * 1000.0).round() / 1000.0
}

/// The summary of `rotation`, ending now with `result`.
pub fn summarize(
    rotation: &RotationStatus,
    result: Phase,
    grace_window: Duration,
    now: Timestamp,
) -> RotationSummary {
    let started = rotation.requested_at.as_ref().map(|t| t.0).unwrap_or(now);
    RotationSummary {
        id: rotation.id.clone(),
        result,
        reason: rotation.reason.clone(),
        requested_by: rotation.requested_by.clone(),
        approved_by: rotation.approved_by.clone(),
        failure: rotation.failure.clone(),
        started_at: rotation.requested_at.as_ref().map(|t| Time(t.0)),
        finished_at: Some(Time(now)),
        duration_seconds: seconds_between(started, now),
        phases: rotation.phases.clone(),
        targets: rotation.targets.clone(),
        consumers: rotation.consumers.clone(),
        proof: rotation.proof.clone(),
        rolled_back: result == Phase::Failed && rotation.rolled_back,
        changes: rotation.changes.clone(),
        grace_exceeded: rotation
            .issued_at
            .as_ref()
            .is_some_and(|t| grace(t.0, grace_window, now) == Grace::Exceeded),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn summary_reports_duration_grace_and_rollback() {
        let rot = RotationStatus {
            id: "r1".into(),
            requested_at: Some(MicroTime(ts("2026-01-01T00:00:00Z"))),
            issued_at: Some(Time(ts("2026-01-01T00:00:10Z"))),
            rolled_back: true,
            requested_by: Some("alice".into()),
            approved_by: Some("bob".into()),
            ..Default::default()
        };
        let window = Duration::from_secs(60);
        let ok = summarize(
            &rot,
            Phase::Succeeded,
            window,
            ts("2026-01-01T00:01:09.9996Z"),
        );
        assert_eq!(ok.duration_seconds, 70.0);
        assert!(!ok.grace_exceeded);
        assert!(!ok.rolled_back, "only a failed rotation reports a rollback");
        assert_eq!(
            (ok.requested_by.as_deref(), ok.approved_by.as_deref()),
            (Some("alice"), Some("bob")),
            "the summary keeps who requested and who approved"
        );
        let late = summarize(&rot, Phase::Failed, window, ts("2026-01-01T00:01:10Z"));
        assert!(late.grace_exceeded);
        assert!(late.rolled_back);
    }
}
