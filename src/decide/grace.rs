//! The identity provider's grace window and phase time budgets.

use std::time::Duration;

use jiff::Timestamp;

use crate::crd::{Phase, RotationSummary};

/// Where a rotation stands relative to the identity provider's grace window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grace {
    /// Plenty of time left.
    Ok,
    /// Less than the margin (20% of the window) left: warn.
    AtRisk,
    /// The window has ended: the old value may already be dead.
    Exceeded,
}

pub fn grace(issued_at: Timestamp, window: Duration, now: Timestamp) -> Grace {
    let elapsed = now.duration_since(issued_at).as_secs_f64();
    let window = window.as_secs_f64();
    if elapsed >= window {
        Grace::Exceeded
    } else if elapsed >= window * 0.8 {
        Grace::AtRisk
    } else {
        Grace::Ok
    }
}

/// Seconds of grace left (negative once exceeded).
pub fn grace_left(issued_at: Timestamp, window: Duration, now: Timestamp) -> f64 {
    window.as_secs_f64() - now.duration_since(issued_at).as_secs_f64()
}

/// Phases that run against the one proof deadline (`proof.timeout` after
/// the new value was issued) rather than a budget of their own.
pub fn under_proof_deadline(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Writing
            | Phase::AwaitingSync
            | Phase::AwaitingRollout
            | Phase::Verifying
            | Phase::Invalidating
    )
}

/// Time kept free at the end of the grace window: a tenth of it. The
/// invalidation and the final re-check run in it.
pub fn safety_margin(window: Duration) -> Duration {
    window / 10
}

/// Rotations of the history whose sync and rollout times are compared.
pub const HISTORY_SAMPLES: usize = 5;

/// Why a proof budget does not fit in the grace window, if it does not:
/// `proof.timeout` plus the safety margin, or (unless `trust_timeout`)
/// twice the slowest sync plus rollout of the recent successful rotations.
pub fn budget_problem(
    window: Duration,
    timeout: Duration,
    history: &[RotationSummary],
    trust_timeout: bool,
) -> Option<String> {
    let margin = safety_margin(window);
    if timeout + margin > window {
        return Some(format!(
            "proof.timeout ({}s) plus a safety margin of {}s does not fit in oldValueValidFor ({}s): a slow proof would outlive the old value",
            timeout.as_secs(),
            margin.as_secs(),
            window.as_secs()
        ));
    }
    if trust_timeout {
        return None;
    }
    let slowest = history
        .iter()
        .filter(|h| h.result == Phase::Succeeded)
        .take(HISTORY_SAMPLES)
        .map(|h| {
            h.phases
                .iter()
                .filter(|p| matches!(p.phase, Phase::AwaitingSync | Phase::AwaitingRollout))
                .map(|p| p.seconds)
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    let needed = 2.0 * slowest + margin.as_secs_f64();
    (needed > window.as_secs_f64()).then(|| {
        format!(
            "the slowest of the last rotations took {slowest:.0}s to sync and roll out; twice that plus a safety margin of {}s does not fit in oldValueValidFor ({}s) (set proof.ignoreHistory to rely on proof.timeout alone)",
            margin.as_secs(),
            window.as_secs()
        )
    })
}

/// Whether a wait that started at `since` has run out of `timeout`.
pub fn timed_out(since: Timestamp, timeout: Duration, now: Timestamp) -> bool {
    now.duration_since(since).as_secs_f64() > timeout.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn grace_warns_in_the_last_fifth_of_the_window() {
        let issued = ts("2026-01-01T00:00:00Z");
        let w = Duration::from_secs(1800);
        assert_eq!(grace(issued, w, ts("2026-01-01T00:23:59Z")), Grace::Ok);
        assert_eq!(grace(issued, w, ts("2026-01-01T00:24:00Z")), Grace::AtRisk);
        assert_eq!(
            grace(issued, w, ts("2026-01-01T00:30:00Z")),
            Grace::Exceeded
        );
        assert_eq!(grace_left(issued, w, ts("2026-01-01T00:10:00Z")), 1200.0);
    }

    fn summary(result: Phase, sync: f64, rollout: f64) -> RotationSummary {
        use crate::crd::PhaseTiming;
        RotationSummary {
            id: "r".into(),
            result,
            reason: String::new(),
            requested_by: None,
            approved_by: None,
            failure: None,
            started_at: None,
            finished_at: None,
            consumers: vec![],
            proof: vec![],
            changes: vec![],
            duration_seconds: sync + rollout,
            phases: vec![
                PhaseTiming {
                    phase: Phase::AwaitingSync,
                    seconds: sync,
                },
                PhaseTiming {
                    phase: Phase::AwaitingRollout,
                    seconds: rollout,
                },
            ],
            targets: vec![],
            rolled_back: false,
            grace_exceeded: false,
        }
    }

    #[test]
    fn the_proof_budget_must_fit_the_window_with_a_margin() {
        let m = |s: u64| Duration::from_secs(s * 60);
        assert!(budget_problem(m(30), m(20), &[], false).is_none());
        assert!(budget_problem(m(30), m(27), &[], false).is_none());
        assert!(budget_problem(m(30), m(28), &[], false).is_some());
        // Recent rotations that needed 14 min: twice that does not fit.
        let slow = [summary(Phase::Succeeded, 240.0, 600.0)];
        let problem = budget_problem(m(30), m(20), &slow, false).unwrap();
        assert!(problem.contains("840s"), "{problem}");
        assert!(budget_problem(m(30), m(20), &slow, true).is_none());
        // Failed rotations and older ones than the sample do not count.
        let failed = [summary(Phase::Failed, 900.0, 900.0)];
        assert!(budget_problem(m(30), m(20), &failed, false).is_none());
        let mut old = vec![summary(Phase::Succeeded, 1.0, 1.0); HISTORY_SAMPLES];
        old.push(summary(Phase::Succeeded, 900.0, 900.0));
        assert!(budget_problem(m(30), m(20), &old, false).is_none());
    }

    #[test]
    fn timeouts() {
        let t0 = ts("2026-01-01T00:00:00Z");
        assert!(!timed_out(
            t0,
            Duration::from_secs(60),
            ts("2026-01-01T00:01:00Z")
        ));
        assert!(timed_out(
            t0,
            Duration::from_secs(60),
            ts("2026-01-01T00:01:01Z")
        ));
    }
}
