//! Proof: ESO synced the new value, and the workloads rolled out on it.

pub mod eso;
pub mod rollout;
