//! Pure decisions: should a rotation start, where does it go next, what does
//! a failure lead to, is a rollout complete, is the grace window at risk,
//! what does a finished rotation report. No I/O; the clock is an argument.
//! The machine (`crate::machine`) applies what these functions compute.

pub mod consumers;
pub mod grace;
pub mod health;
pub mod herd;
pub mod request;
pub mod rollout;
pub mod summary;
pub mod transition;

pub use grace::{
    Grace, budget_problem, grace, grace_left, safety_margin, timed_out, under_proof_deadline,
};
pub use health::{Health, health};
pub use herd::{StartBucket, StartRate, jitter_for};
pub use request::{Request, Served, cron_is_valid, next_cron, next_rotation_at, rotation_request};
pub use rollout::{RolloutFacts, on_rotation_template, rollout_complete, started_after_sync};
pub use transition::{
    AfterFailure, FailureFacts, Next, OnTransient, Outcome, Route, after_failure, next,
    on_transient_error, retry_delay, rollback_refusal, spec_change_allowed, steps_at_once,
    waits_for_a_person,
};
