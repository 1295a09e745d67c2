//! Prometheus metrics, all prefixed `rekey_`. Labels name objects, phases,
//! providers and reasons: never a value.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::Phase;
use crate::reason::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub namespace: String,
    pub name: String,
    pub result: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub name: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseOnly {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub provider: String,
    pub call: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallKind {
    pub provider: String,
    pub call: String,
}

/// Every metric family rekey exports (without the `rekey_` prefix and the
/// `_total`/`_bucket` suffixes). Families without series yet (e.g.
/// `grace_seconds_left` between rotations) are absent from a scrape.
pub const FAMILIES: [&str; 13] = [
    "rotations_started",
    "rotations_finished",
    "rotation_duration_seconds",
    "phase_duration_seconds",
    "rotation_phase",
    "grace_seconds_left",
    "grace_window_seconds",
    "phase_started_timestamp_seconds",
    "next_rotation_timestamp_seconds",
    "leader",
    "provider_calls",
    "provider_call_duration_seconds",
    "reconcile_errors",
];

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.5, 2.0, 16))
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Seconds since the Unix epoch, as Prometheus compares with `time()`.
fn unix_seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    pub rotations_started: Family<RotationLabels, Counter>,
    pub rotations_finished: Family<ResultLabels, Counter>,
    pub rotation_duration: Family<PhaseOnly, Histogram, fn() -> Histogram>,
    pub phase_duration: Family<PhaseOnly, Histogram, fn() -> Histogram>,
    pub current_phase: Family<PhaseLabels, Gauge>,
    pub grace_seconds_left: Family<RotationLabels, F64Gauge>,
    /// The length of the grace window `grace_seconds_left` counts down.
    pub grace_window: Family<RotationLabels, F64Gauge>,
    pub phase_started: Family<RotationLabels, F64Gauge>,
    pub next_rotation: Family<RotationLabels, F64Gauge>,
    pub leader: Gauge,
    pub provider_calls: Family<CallLabels, Counter>,
    pub provider_latency: Family<CallKind, Histogram, fn() -> Histogram>,
    pub reconcile_errors: Family<RotationLabels, Counter>,
    /// The SecretRotations that have series, so those of one deleted
    /// without its last reconcile can be found and removed.
    known: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("rekey");
        let m = Self {
            registry: Arc::default(),
            rotations_started: Family::default(),
            rotations_finished: Family::default(),
            rotation_duration: Family::new_with_constructor(seconds_histogram),
            phase_duration: Family::new_with_constructor(seconds_histogram),
            current_phase: Family::default(),
            grace_seconds_left: Family::default(),
            grace_window: Family::default(),
            phase_started: Family::default(),
            next_rotation: Family::default(),
            leader: Gauge::default(),
            provider_calls: Family::default(),
            provider_latency: Family::new_with_constructor(latency_histogram),
            reconcile_errors: Family::default(),
            known: Arc::default(),
        };
        r.register(
            "rotations_started",
            "Rotations started",
            m.rotations_started.clone(),
        );
        r.register(
            "rotations_finished",
            "Rotations finished, by result and failure reason",
            m.rotations_finished.clone(),
        );
        r.register(
            "rotation_duration_seconds",
            "Duration of finished rotations (label phase: the result)",
            m.rotation_duration.clone(),
        );
        r.register(
            "phase_duration_seconds",
            "Time spent in each rotation phase",
            m.phase_duration.clone(),
        );
        r.register(
            "rotation_phase",
            "1 for the current phase of each SecretRotation",
            m.current_phase.clone(),
        );
        r.register(
            "grace_seconds_left",
            "Seconds until the old value's grace window ends, for rotations in progress",
            m.grace_seconds_left.clone(),
        );
        r.register(
            "grace_window_seconds",
            "Length of the old value's grace window (oldValueValidFor), for rotations in progress that issued a new value",
            m.grace_window.clone(),
        );
        r.register(
            "phase_started_timestamp_seconds",
            "When the current phase of the rotation in progress began (Unix time)",
            m.phase_started.clone(),
        );
        r.register(
            "next_rotation_timestamp_seconds",
            "When the schedule asks for the next rotation (Unix time; status.nextRotationAt)",
            m.next_rotation.clone(),
        );
        r.register(
            "leader",
            "1 when this replica reconciles (it holds the leader lease, or leader election is off), 0 on a standby",
            m.leader.clone(),
        );
        r.register(
            "provider_calls",
            "Calls to stores and identity providers",
            m.provider_calls.clone(),
        );
        r.register(
            "provider_call_duration_seconds",
            "Latency of calls to stores and identity providers",
            m.provider_latency.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile errors",
            m.reconcile_errors.clone(),
        );
        *m.registry.lock().unwrap() = r;
        m
    }

    pub fn provider_call(&self, provider: &str, call: &str, outcome: &str, took: Duration) {
        self.provider_calls
            .get_or_create(&CallLabels {
                provider: provider.into(),
                call: call.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.provider_latency
            .get_or_create(&CallKind {
                provider: provider.into(),
                call: call.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Sets the phase gauge of one SecretRotation: one series, for `phase`
    /// (the series of the phase it leaves is removed, so a SecretRotation
    /// keeps one series however many phases it went through).
    pub fn set_phase(&self, namespace: &str, name: &str, phase: Phase) {
        self.known
            .lock()
            .unwrap()
            .insert((namespace.into(), name.into()));
        for p in Phase::ALL {
            let l = PhaseLabels {
                namespace: namespace.into(),
                name: name.into(),
                phase: p.as_str().into(),
            };
            if p == phase {
                self.current_phase.get_or_create(&l).set(1);
            } else {
                self.current_phase.remove(&l);
            }
        }
    }

    /// Sets the timestamps that follow a SecretRotation's status: when the
    /// current phase of its rotation in progress began, and when its
    /// schedule asks for the next rotation. `None` removes the series.
    pub fn set_times(
        &self,
        namespace: &str,
        name: &str,
        phase_started: Option<Timestamp>,
        next_rotation: Option<Timestamp>,
    ) {
        self.known
            .lock()
            .unwrap()
            .insert((namespace.into(), name.into()));
        let l = RotationLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        for (family, at) in [
            (&self.phase_started, phase_started),
            (&self.next_rotation, next_rotation),
        ] {
            match at {
                Some(t) => {
                    family.get_or_create(&l).set(unix_seconds(t));
                }
                None => {
                    family.remove(&l);
                }
            }
        }
    }

    /// Removes every series of a SecretRotation that is gone, so a deleted
    /// rotation costs no memory and no scrape line.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.known
            .lock()
            .unwrap()
            .remove(&(namespace.to_string(), name.to_string()));
        let rotation = RotationLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.rotations_started.remove(&rotation);
        self.grace_seconds_left.remove(&rotation);
        self.grace_window.remove(&rotation);
        self.phase_started.remove(&rotation);
        self.next_rotation.remove(&rotation);
        self.reconcile_errors.remove(&rotation);
        for p in Phase::ALL {
            self.current_phase.remove(&PhaseLabels {
                namespace: namespace.into(),
                name: name.into(),
                phase: p.as_str().into(),
            });
        }
        let reasons = Reason::ALL.iter().map(|r| r.as_str()).chain([""]);
        for reason in reasons {
            for result in Phase::ALL.iter().filter(|p| p.is_terminal()) {
                self.rotations_finished.remove(&ResultLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    result: result.as_str().into(),
                    reason: reason.into(),
                });
            }
        }
    }

    pub fn reconcile_error(&self, namespace: &str, name: &str) {
        self.known
            .lock()
            .unwrap()
            .insert((namespace.into(), name.into()));
        self.reconcile_errors
            .get_or_create(&RotationLabels {
                namespace: namespace.into(),
                name: name.into(),
            })
            .inc();
    }

    /// Forgets every SecretRotation for which `exists` is false.
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        let known: Vec<(String, String)> = self.known.lock().unwrap().iter().cloned().collect();
        for (namespace, name) in known {
            if !exists(&namespace, &name) {
                self.forget(&namespace, &name);
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap())
            .unwrap();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(m: &Metrics, name: &str) -> usize {
        m.encode()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("name=\"{name}\"")))
            .count()
    }

    #[test]
    fn one_phase_series_per_rotation_and_none_once_it_is_gone() {
        let m = Metrics::new();
        m.set_phase("ns", "a", Phase::Preflight);
        m.set_phase("ns", "a", Phase::Writing);
        m.set_phase("ns", "a", Phase::Succeeded);
        m.set_phase("ns", "b", Phase::Writing);
        m.reconcile_error("ns", "b");
        assert_eq!(lines_of(&m, "a"), 1);
        let at = |s| Timestamp::from_second(s).ok();
        m.set_times("ns", "a", at(1_700_000_000), at(1_700_086_400));
        assert_eq!(lines_of(&m, "a"), 3);
        let scrape = m.encode();
        assert!(
            scrape.contains(
                "rekey_next_rotation_timestamp_seconds{namespace=\"ns\",name=\"a\"} 1700086400"
            ),
            "{scrape}"
        );
        // Finished: no phase in progress; no schedule.
        m.set_times("ns", "a", None, None);
        assert_eq!(lines_of(&m, "a"), 1);
        m.set_times("ns", "a", at(1_700_000_000), at(1_700_086_400));
        m.forget("ns", "a");
        assert_eq!(lines_of(&m, "a"), 0);
        // A rotation deleted without its last reconcile: found by `retain`.
        assert_eq!(lines_of(&m, "b"), 2);
        m.retain(|_, name| name != "b");
        assert_eq!(lines_of(&m, "b"), 0);
    }
}
