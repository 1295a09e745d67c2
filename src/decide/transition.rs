//! The phase graph and the failure policy, on one screen. A phase step
//! reports an [`Outcome`]; [`next`] says where the rotation goes. Errors go
//! through [`on_transient_error`] and [`after_failure`]. No I/O.
//!
//! ```text
//! Pending ─┬─ approval required ─> AwaitingApproval ─> Preflight
//!          └───────────────────────────────────────> Preflight ─┬─ dry run ─> DryRunSucceeded
//!                                                               └─> Issuing ─> Writing
//! Writing ─┬─ nothing to prove ──────────────────────────────────────────> Verifying
//!          └─> AwaitingSync ─> AwaitingRollout ─> Verifying
//! Verifying ─> Invalidating ─┬─> Succeeded
//!                            └─ a person must act ─> AwaitingConfirmation ─> Succeeded
//! any failure ─┬─ onFailure Rollback, a target written ─> RollingBack ─> Failed
//!              └─> Failed
//! ```

use crate::crd::{FailurePolicy, Phase, SecretRotationSpec};
use crate::reason::Reason;

/// What a phase step reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The phase's work is done (for a wait: what it waited for is observed).
    Done,
    /// Not yet; the text says what is awaited (safe to show).
    Waiting(String),
    /// The old value must be invalidated by a person, who then confirms.
    NeedsConfirmation,
}

/// The facts of the spec that shape the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Route {
    /// `spec.approval.required`, or change requests to open (not for a dry run).
    pub approval_required: bool,
    /// `spec.dryRun`.
    pub dry_run: bool,
    /// `spec.proof.nothingToProve`.
    pub nothing_to_prove: bool,
}

impl Route {
    pub fn of(spec: &SecretRotationSpec) -> Route {
        Route {
            approval_required: spec
                .approval
                .as_ref()
                .is_some_and(|a| a.required || (a.change_requests.is_some() && !spec.dry_run)),
            dry_run: spec.dry_run,
            nothing_to_prove: spec.proof.nothing_to_prove,
        }
    }
}

/// Where the rotation goes after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Stay in the phase and look again later.
    Stay,
    /// Enter this phase.
    Enter(Phase),
    /// End the rotation with this result.
    End(Phase),
}

/// The transition table.
pub fn next(phase: Phase, route: Route, outcome: &Outcome) -> Next {
    use Next::{End, Enter, Stay};
    use Outcome::{Done, NeedsConfirmation, Waiting};
    use Phase::*;
    match (phase, outcome) {
        (Succeeded | Failed | DryRunSucceeded, _) => End(phase),
        (_, Waiting(_)) => Stay,
        (Pending, _) if route.approval_required => Enter(AwaitingApproval),
        (Pending, _) => Enter(Preflight),
        (AwaitingApproval, Done) => Enter(Preflight),
        (Preflight, Done) if route.dry_run => End(DryRunSucceeded),
        (Preflight, Done) => Enter(Issuing),
        (Issuing, Done) => Enter(Writing),
        (Writing, Done) if route.nothing_to_prove => Enter(Verifying),
        (Writing, Done) => Enter(AwaitingSync),
        (AwaitingSync, Done) => Enter(AwaitingRollout),
        (AwaitingRollout, Done) => Enter(Verifying),
        (Verifying, Done) => Enter(Invalidating),
        (Invalidating, NeedsConfirmation) => Enter(AwaitingConfirmation),
        (Invalidating | AwaitingConfirmation, Done) => End(Succeeded),
        (RollingBack, Done) => End(Failed),
        // Only invalidation asks for a person; elsewhere it cannot advance.
        (_, NeedsConfirmation) => Stay,
    }
}

/// Phases that wait for a person: a transient error there is retried
/// without a time budget.
pub fn waits_for_a_person(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::AwaitingApproval | Phase::AwaitingConfirmation | Phase::Invalidating
    )
}

/// What to do with a transient error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTransient {
    Retry,
    /// The phase's time budget is spent: the error fails the rotation.
    GiveUp,
}

pub fn on_transient_error(phase: Phase, phase_timed_out: bool) -> OnTransient {
    if waits_for_a_person(phase) || !phase_timed_out {
        OnTransient::Retry
    } else {
        OnTransient::GiveUp
    }
}

/// Whether a change of `credential`, `targets` or `proof` may be taken over
/// by the rotation in progress: only before anything was issued (or while
/// undoing, which acts on what was recorded).
pub fn spec_change_allowed(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Pending | Phase::AwaitingApproval | Phase::Preflight | Phase::RollingBack
    )
}

/// The facts a failure is judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureFacts {
    pub phase: Phase,
    pub reason: Reason,
    pub policy: FailurePolicy,
    /// At least one target was (or may have been) written.
    pub targets_written: bool,
    /// A new value was issued (the grace clock runs).
    pub issued: bool,
    /// The source's old value dies on the identity provider's own timer.
    pub old_value_expires: bool,
}

/// What a failure leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Write the previous values back, prove it, then end Failed.
    RollBack,
    /// End Failed, leaving the stores as they are. `rollback_refused`: the
    /// policy asked for a rollback that would hand out a value the identity
    /// provider expires on its own.
    Hold { rollback_refused: bool },
}

pub fn after_failure(f: FailureFacts) -> AfterFailure {
    let rollback = f.policy == FailurePolicy::Rollback
        && f.targets_written
        && f.reason != Reason::SpecChangedDuringRotation
        && !matches!(
            f.phase,
            Phase::RollingBack | Phase::Invalidating | Phase::AwaitingConfirmation
        );
    match (rollback, f.issued && f.old_value_expires) {
        (false, _) => AfterFailure::Hold {
            rollback_refused: false,
        },
        (true, true) => AfterFailure::Hold {
            rollback_refused: true,
        },
        (true, false) => AfterFailure::RollBack,
    }
}

/// How long to wait before the next attempt after the `attempt`-th
/// consecutive transient error (1-based): doubling from `base`, at most
/// `max`, plus up to a quarter more drawn from `jitter` in [0, 1), so that
/// many rotations failing on one store at once do not retry in step.
pub fn retry_delay(
    attempt: u32,
    base: std::time::Duration,
    max: std::time::Duration,
    jitter: f64,
) -> std::time::Duration {
    let doubled = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let delay = doubled.min(max);
    delay + delay.mul_f64(jitter.clamp(0.0, 1.0) / 4.0)
}

/// Why a person's rollback request (`rekey.dev/rollback`) cannot be served
/// now; `None`: it can, and the rotation fails with `RollbackRequested`
/// under `onFailure: Rollback`'s rules ([`after_failure`]).
pub fn rollback_refusal(
    phase: Phase,
    invalidation_started: bool,
    issued: bool,
    old_value_expires: bool,
) -> Option<&'static str> {
    if phase.is_terminal() {
        return Some("the rotation has ended");
    }
    if phase == Phase::RollingBack {
        return Some("the rotation is already rolling back");
    }
    if invalidation_started || matches!(phase, Phase::Invalidating | Phase::AwaitingConfirmation) {
        return Some("the old value is being invalidated: it cannot be written back");
    }
    if issued && old_value_expires {
        return Some(
            "the identity provider expires the old value at the end of its grace window: written back, it would stop working then. Finish the rotation instead",
        );
    }
    None
}

#[cfg(test)]
#[path = "transition_tests.rs"]
mod tests;

/// Whether the step of a phase just entered runs in the same reconcile:
/// the phases that go on from proof already in hand (the refresh request
/// after the writes, the restart after the sync, verification and the
/// final re-check after the rollout). The status naming the phase is
/// written before, so nothing is skipped; waiting for that write to come
/// back through the watch would only add latency.
pub fn steps_at_once(entered: Phase) -> bool {
    matches!(
        entered,
        Phase::AwaitingSync | Phase::AwaitingRollout | Phase::Verifying | Phase::Invalidating
    )
}
