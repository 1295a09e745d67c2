//! The table is checked by invariants over every path, not by repeating it:
//! every phase × route (approval, dry run, nothing to prove) × onFailure ×
//! outcome, including a failure at every phase for every kind of failure.

use super::*;

const OUTCOMES: [Outcome; 3] = [
    Outcome::Done,
    Outcome::Waiting(String::new()),
    Outcome::NeedsConfirmation,
];

fn routes() -> Vec<Route> {
    let mut all = vec![];
    for approval_required in [false, true] {
        for dry_run in [false, true] {
            for nothing_to_prove in [false, true] {
                all.push(Route {
                    approval_required,
                    dry_run,
                    nothing_to_prove,
                });
            }
        }
    }
    all
}

/// How a failure looks at a point of a path.
#[derive(Clone, Copy, Debug)]
struct Failure {
    policy: FailurePolicy,
    reason: Reason,
    old_value_expires: bool,
}

fn failures() -> Vec<Failure> {
    let mut all = vec![];
    for policy in [FailurePolicy::Hold, FailurePolicy::Rollback] {
        for reason in [Reason::SyncTimeout, Reason::SpecChangedDuringRotation] {
            for old_value_expires in [false, true] {
                all.push(Failure {
                    policy,
                    reason,
                    old_value_expires,
                });
            }
        }
    }
    all
}

/// Every path from Pending to an end, as the list of phases entered (the
/// result last). A path takes every outcome and every failure at every phase.
fn paths(route: Route) -> Vec<Vec<Phase>> {
    let mut done = vec![];
    let mut stack = vec![vec![Phase::Pending]];
    while let Some(path) = stack.pop() {
        assert!(path.len() < 20, "a cycle: {path:?}");
        let phase = *path.last().unwrap();
        if phase.is_terminal() {
            done.push(path);
            continue;
        }
        let mut go = |next: Phase| {
            let mut p = path.clone();
            p.push(next);
            stack.push(p);
        };
        for outcome in &OUTCOMES {
            match next(phase, route, outcome) {
                Next::Stay => {}
                Next::Enter(p) | Next::End(p) => go(p),
            }
        }
        for f in failures() {
            let facts = FailureFacts {
                phase,
                reason: f.reason,
                policy: f.policy,
                targets_written: path.contains(&Phase::Writing),
                issued: path.contains(&Phase::Issuing),
                old_value_expires: f.old_value_expires,
            };
            match after_failure(facts) {
                AfterFailure::RollBack => go(Phase::RollingBack),
                AfterFailure::Hold { .. } => go(Phase::Failed),
            }
        }
    }
    done
}

fn position(path: &[Phase], p: Phase) -> Option<usize> {
    path.iter().position(|x| *x == p)
}

#[test]
fn invalidation_comes_only_after_the_whole_proof() {
    for route in routes() {
        for path in paths(route) {
            let Some(inv) = position(&path, Phase::Invalidating) else {
                continue;
            };
            let required: &[Phase] = if route.nothing_to_prove {
                &[Phase::Writing, Phase::Verifying]
            } else {
                &[
                    Phase::Writing,
                    Phase::AwaitingSync,
                    Phase::AwaitingRollout,
                    Phase::Verifying,
                ]
            };
            let mut last = 0;
            for p in required {
                let at = position(&path, *p)
                    .unwrap_or_else(|| panic!("{route:?}: {path:?} skips {p:?}"));
                assert!(at > last && at < inv, "{route:?}: {path:?} order");
                last = at;
            }
        }
    }
}

#[test]
fn success_only_through_invalidation() {
    for route in routes() {
        for path in paths(route) {
            if path.last() == Some(&Phase::Succeeded) {
                assert!(path.contains(&Phase::Invalidating), "{route:?}: {path:?}");
            }
        }
    }
}

#[test]
fn a_dry_run_never_passes_preflight() {
    for route in routes().into_iter().filter(|r| r.dry_run) {
        for path in paths(route) {
            let past = [
                Phase::Issuing,
                Phase::Writing,
                Phase::AwaitingSync,
                Phase::AwaitingRollout,
                Phase::Verifying,
                Phase::Invalidating,
                Phase::AwaitingConfirmation,
                Phase::RollingBack,
                Phase::Succeeded,
            ];
            assert!(
                !path.iter().any(|p| past.contains(p)),
                "{route:?}: {path:?}"
            );
        }
    }
}

#[test]
fn approval_comes_before_any_check() {
    for route in routes().into_iter().filter(|r| r.approval_required) {
        for path in paths(route) {
            if let Some(pre) = position(&path, Phase::Preflight) {
                assert!(
                    position(&path, Phase::AwaitingApproval).is_some_and(|a| a < pre),
                    "{path:?}"
                );
            }
        }
    }
}

#[test]
fn rollback_only_of_written_targets_and_never_after_invalidation() {
    for route in routes() {
        for path in paths(route) {
            if let Some(rb) = position(&path, Phase::RollingBack) {
                assert!(position(&path, Phase::Writing).is_some_and(|w| w < rb));
                assert!(!path[..rb].contains(&Phase::Invalidating), "{path:?}");
                assert_eq!(path[rb + 1..], [Phase::Failed], "{path:?}");
            }
        }
    }
}

#[test]
fn every_path_ends_and_waiting_never_moves() {
    for route in routes() {
        let all = paths(route);
        assert!(!all.is_empty());
        for phase in Phase::ALL.into_iter().filter(|p| !p.is_terminal()) {
            assert_eq!(
                next(phase, route, &Outcome::Waiting("x".into())),
                Next::Stay
            );
        }
        for phase in Phase::ALL.into_iter().filter(|p| p.is_terminal()) {
            for outcome in &OUTCOMES {
                assert_eq!(next(phase, route, outcome), Next::End(phase));
            }
        }
    }
}

#[test]
fn every_phase_is_reachable_on_some_route() {
    let seen: Vec<Phase> = routes().into_iter().flat_map(paths).flatten().collect();
    for p in Phase::ALL {
        assert!(seen.contains(&p), "{p:?} unreachable");
    }
}

#[test]
fn failure_policy() {
    for phase in Phase::ALL {
        for f in failures() {
            for targets_written in [false, true] {
                for issued in [false, true] {
                    let after = after_failure(FailureFacts {
                        phase,
                        reason: f.reason,
                        policy: f.policy,
                        targets_written,
                        issued,
                        old_value_expires: f.old_value_expires,
                    });
                    if after == AfterFailure::RollBack {
                        assert_eq!(f.policy, FailurePolicy::Rollback);
                        assert!(targets_written);
                        // Writing the old value back must not hand out a
                        // value the identity provider expires by itself.
                        assert!(!(issued && f.old_value_expires));
                        // What was issued for another spec is not undone blindly.
                        assert_ne!(f.reason, Reason::SpecChangedDuringRotation);
                    }
                    if f.policy == FailurePolicy::Hold {
                        assert_eq!(
                            after,
                            AfterFailure::Hold {
                                rollback_refused: false
                            }
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn transient_errors_are_retried_within_budget_or_while_a_person_acts() {
    for phase in Phase::ALL {
        assert_eq!(on_transient_error(phase, false), OnTransient::Retry);
        assert_eq!(
            on_transient_error(phase, true) == OnTransient::Retry,
            waits_for_a_person(phase)
        );
    }
}

#[test]
fn spec_changes_are_taken_over_only_before_issuing() {
    for route in routes() {
        for path in paths(route) {
            if let Some(i) = position(&path, Phase::Issuing) {
                for p in &path[i..] {
                    if *p != Phase::RollingBack {
                        assert!(!spec_change_allowed(*p), "{p:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_rollback_request_is_served_only_before_invalidation_and_never_for_an_expiring_old_value() {
    for phase in Phase::ALL {
        let served = rollback_refusal(phase, false, true, false).is_none();
        let before_invalidation = !phase.is_terminal()
            && !matches!(
                phase,
                Phase::Invalidating | Phase::AwaitingConfirmation | Phase::RollingBack
            );
        assert_eq!(served, before_invalidation, "{phase:?}");
        // Once invalidation began (a retry may be in Verifying's successor), never.
        assert!(rollback_refusal(phase, true, true, false).is_some());
        // Keycloak: once issued, the old value dies on its own timer.
        assert!(rollback_refusal(phase, false, true, true).is_some());
    }
    // Before anything was issued, even a Keycloak rotation can stop.
    assert!(rollback_refusal(Phase::Preflight, false, false, true).is_none());
}

#[test]
fn transient_retries_back_off_with_jitter_up_to_a_bound() {
    use std::time::Duration;
    let (base, max) = (Duration::from_secs(2), Duration::from_secs(30));
    let plain: Vec<u64> = (1..=7)
        .map(|a| retry_delay(a, base, max, 0.0).as_secs())
        .collect();
    assert_eq!(plain, [2, 4, 8, 16, 30, 30, 30]);
    assert_eq!(retry_delay(3, base, max, 0.999).as_millis(), 9998);
    assert_eq!(
        retry_delay(1000, base, max, 1.0),
        Duration::from_millis(37_500)
    );
}
