//! One module per phase. Each step does its phase's work (recording status
//! before every side effect) and reports a `decide::Outcome`; the machine
//! asks the transition table where to go. `idle`, `grace`, `fail` and
//! `finish` are the steps around a rotation.

pub mod approval;
pub mod change;
pub mod consumers;
pub mod fail;
pub mod finish;
pub mod grace;
pub mod idle;
pub mod invalidate;
pub mod issuing;
pub mod preflight;
pub mod rollback;
pub mod rollout;
pub mod sync;
pub mod verify;
pub mod writing;
