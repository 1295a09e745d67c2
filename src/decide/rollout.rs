//! The rollout verdict: is a workload's rollout complete, and on which template.

use jiff::Timestamp;

use crate::crd::{RestartMode, RotationStatus, WorkloadRef};

/// Rollout counters of a Deployment, StatefulSet or DaemonSet, normalised.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RolloutFacts {
    pub generation: i64,
    pub observed_generation: i64,
    /// Desired pods.
    pub desired: i32,
    /// Pods in total (old and new revisions).
    pub current: i32,
    /// Pods of the newest revision.
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    /// StatefulSet: currentRevision == updateRevision (always true for others).
    pub revisions_converged: bool,
}

/// A rollout is complete when the controller has seen the newest spec and
/// every desired pod runs the newest template, ready and available, with no
/// pod of an older revision left.
pub fn rollout_complete(f: &RolloutFacts) -> bool {
    f.observed_generation >= f.generation
        && f.updated == f.desired
        && f.ready == f.desired
        && f.available == f.desired
        && f.current == f.desired
        && f.revisions_converged
}

/// Whether workload `w` runs a pod template of this rotation: stamped with
/// its id (restart: Trigger), or changed since the baseline recorded before
/// the refresh request (restart: Await; a scale does not change it).
pub fn on_rotation_template(
    mode: RestartMode,
    rotation: &RotationStatus,
    cluster: &str,
    w: &WorkloadRef,
    stamped: Option<&str>,
    template: &str,
) -> bool {
    match mode {
        RestartMode::Trigger => stamped == Some(rotation.id.as_str()),
        RestartMode::Await => rotation
            .workload_baselines
            .iter()
            .find(|b| b.cluster == cluster && b.kind == w.kind && b.name == w.name)
            .is_some_and(|b| template != b.template),
    }
}

/// Whether a workload's pods all started after the new value reached the
/// synced Secrets (restart: Await). Both times have second precision, so a
/// pod created in the same second counts. No pod: nothing runs the old value.
pub fn started_after_sync(oldest_pod: Option<Timestamp>, synced: Option<Timestamp>) -> bool {
    match (oldest_pod, synced) {
        (Some(pod), Some(synced)) => pod.as_second() >= synced.as_second(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pods_started_in_or_after_the_sync_second_count() {
        let t = |s: &str| Some(s.parse::<Timestamp>().unwrap());
        let synced = t("2026-01-01T00:00:10.700Z");
        assert!(started_after_sync(t("2026-01-01T00:00:11Z"), synced));
        assert!(started_after_sync(t("2026-01-01T00:00:10Z"), synced));
        assert!(!started_after_sync(t("2026-01-01T00:00:09Z"), synced));
        assert!(started_after_sync(None, synced));
    }

    #[test]
    fn rollout_is_complete_only_when_every_counter_agrees() {
        let done = RolloutFacts {
            generation: 2,
            observed_generation: 2,
            desired: 3,
            current: 3,
            updated: 3,
            ready: 3,
            available: 3,
            revisions_converged: true,
        };
        assert!(rollout_complete(&done));
        for broken in [
            RolloutFacts {
                observed_generation: 1,
                ..done.clone()
            },
            RolloutFacts {
                updated: 2,
                ..done.clone()
            },
            RolloutFacts {
                ready: 2,
                ..done.clone()
            },
            RolloutFacts {
                available: 2,
                ..done.clone()
            },
            RolloutFacts {
                current: 4,
                ..done.clone()
            }, // an old pod is still there
            RolloutFacts {
                revisions_converged: false,
                ..done.clone()
            },
        ] {
            assert!(!rollout_complete(&broken), "{broken:?}");
        }
    }
}
