//! Should a rotation start, and when is the next one due. Pure; the clock is
//! an argument.

use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::crd::keys::ROTATE_ANNOTATION;
use crate::crd::{Schedule, SecretRotationSpec, SecretRotationStatus};
use crate::duration;

/// Why a rotation starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The SecretRotation was created and has never rotated.
    Created,
    /// `spec.trigger` changed (e.g. a new change request committed to Git).
    TriggerChanged,
    /// The `rekey.dev/rotate` annotation holds a new value.
    OnDemand,
    /// The schedule is due.
    Schedule,
}

impl Request {
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Created => "Created",
            Request::TriggerChanged => "TriggerChanged",
            Request::OnDemand => "OnDemand",
            Request::Schedule => "Schedule",
        }
    }
}

/// What a finished (or starting) rotation consumed: the request state it served.
pub struct Served<'a> {
    pub trigger: Option<&'a str>,
    pub rotate_request: Option<&'a str>,
    pub ever_rotated: bool,
    /// rekey has written this object's status before (it recorded the
    /// trigger and annotation it found).
    pub known: bool,
    pub next_rotation_at: Option<Timestamp>,
}

impl<'a> Served<'a> {
    pub fn from_status(status: &'a SecretRotationStatus) -> Self {
        Served {
            trigger: status.observed_trigger.as_deref(),
            rotate_request: status.observed_rotate_request.as_deref(),
            ever_rotated: status.last_rotation.is_some(),
            known: status.observed_generation.is_some(),
            next_rotation_at: status.next_rotation_at.as_ref().map(|t| t.0),
        }
    }
}

/// The ordered chain of checks deciding whether a rotation is requested.
/// Each check is independent; the first that fires names the request.
pub fn rotation_request(
    spec: &SecretRotationSpec,
    served: &Served<'_>,
    annotations: &BTreeMap<String, String>,
    now: Timestamp,
) -> Option<Request> {
    if !served.ever_rotated {
        if spec.rotate_on_create {
            return Some(Request::Created);
        }
        if !served.known {
            // rotateOnCreate: false; the first look records what it found.
            return None;
        }
    }
    if spec.trigger.as_deref() != served.trigger {
        return Some(Request::TriggerChanged);
    }
    if let Some(asked) = annotations.get(ROTATE_ANNOTATION)
        && Some(asked.as_str()) != served.rotate_request
    {
        return Some(Request::OnDemand);
    }
    if spec.schedule.is_some()
        && let Some(due) = served.next_rotation_at
        && due <= now
    {
        return Some(Request::Schedule);
    }
    None
}

/// When the schedule requests the next rotation after one finished at `after`.
pub fn next_rotation_at(
    schedule: Option<&Schedule>,
    after: Timestamp,
    seed: &str,
) -> Option<Timestamp> {
    let schedule = schedule?;
    let due = match schedule.every.as_deref() {
        Some(every) => after
            .checked_add(jiff::SignedDuration::try_from(duration::parse(every)?).ok()?)
            .ok()?,
        None => next_cron(schedule.cron.as_deref()?, after)?,
    };
    let jitter = schedule
        .jitter
        .as_deref()
        .and_then(duration::parse)
        .map(|j| super::herd::jitter_for(seed, j))
        .unwrap_or_default();
    due.checked_add(jiff::SignedDuration::try_from(jitter).ok()?)
        .ok()
}

/// The first time strictly after `after` matching a five-field cron expression (UTC).
pub fn next_cron(expr: &str, after: Timestamp) -> Option<Timestamp> {
    let cron = expr.parse::<croner::Cron>().ok()?;
    let after = after.to_zoned(jiff::tz::TimeZone::UTC);
    let next = cron.find_next_occurrence(&after, false).ok()?;
    Some(next.timestamp())
}

/// What makes a schedule impossible to serve, if anything.
pub fn schedule_problem(schedule: &Schedule) -> Option<&'static str> {
    if let Some(every) = schedule.every.as_deref()
        && duration::parse(every).is_none()
    {
        return Some("schedule.every is not a duration");
    }
    if let Some(cron) = schedule.cron.as_deref()
        && !cron_is_valid(cron)
    {
        return Some("schedule.cron is not a valid cron expression");
    }
    None
}

/// Whether a cron expression parses.
pub fn cron_is_valid(expr: &str) -> bool {
    expr.parse::<croner::Cron>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::*;

    fn spec() -> SecretRotationSpec {
        serde_json::from_value(serde_json::json!({
            "credential": {"generated": {}},
            "targets": [{"name": "t", "kubernetesSecret": {"name": "s", "key": "k"}}],
            "proof": {"nothingToProve": true}
        }))
        .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn served<'a>(
        trigger: Option<&'a str>,
        ann: Option<&'a str>,
        next: Option<&str>,
    ) -> Served<'a> {
        Served {
            trigger,
            rotate_request: ann,
            ever_rotated: true,
            known: true,
            next_rotation_at: next.map(ts),
        }
    }

    #[test]
    fn creation_requests_the_first_rotation() {
        let never = Served {
            trigger: None,
            rotate_request: None,
            ever_rotated: false,
            known: false,
            next_rotation_at: None,
        };
        let now = ts("2026-01-01T00:00:00Z");
        assert_eq!(
            rotation_request(&spec(), &never, &BTreeMap::new(), now),
            Some(Request::Created)
        );
        assert_eq!(
            rotation_request(&spec(), &served(None, None, None), &BTreeMap::new(), now),
            None
        );
    }

    #[test]
    fn without_rotate_on_create_creation_alone_does_not_rotate() {
        let mut s = spec();
        s.rotate_on_create = false;
        s.trigger = Some("CHG1".into());
        let now = ts("2026-01-01T00:00:00Z");
        let fresh = Served {
            trigger: None,
            rotate_request: None,
            ever_rotated: false,
            known: false,
            next_rotation_at: None,
        };
        assert_eq!(rotation_request(&s, &fresh, &BTreeMap::new(), now), None);
        // Once the first look recorded the trigger, a change still rotates.
        let recorded = Served {
            trigger: Some("CHG1"),
            known: true,
            ..fresh
        };
        assert_eq!(rotation_request(&s, &recorded, &BTreeMap::new(), now), None);
        s.trigger = Some("CHG2".into());
        assert_eq!(
            rotation_request(&s, &recorded, &BTreeMap::new(), now),
            Some(Request::TriggerChanged)
        );
    }

    #[test]
    fn trigger_change_requests_a_rotation() {
        let mut s = spec();
        s.trigger = Some("CHG2".into());
        let now = ts("2026-01-01T00:00:00Z");
        assert_eq!(
            rotation_request(&s, &served(Some("CHG1"), None, None), &BTreeMap::new(), now),
            Some(Request::TriggerChanged)
        );
        assert_eq!(
            rotation_request(&s, &served(Some("CHG2"), None, None), &BTreeMap::new(), now),
            None
        );
    }

    #[test]
    fn on_demand_annotation_requests_once_per_value() {
        let now = ts("2026-01-01T00:00:00Z");
        let ann = BTreeMap::from([(
            ROTATE_ANNOTATION.to_string(),
            "2026-01-01T00:00:00Z".to_string(),
        )]);
        assert_eq!(
            rotation_request(&spec(), &served(None, None, None), &ann, now),
            Some(Request::OnDemand)
        );
        let done = served(None, Some("2026-01-01T00:00:00Z"), None);
        assert_eq!(rotation_request(&spec(), &done, &ann, now), None);
    }

    #[test]
    fn schedule_fires_when_due_and_not_before() {
        let mut s = spec();
        s.schedule = Some(Schedule {
            every: Some("1h".into()),
            cron: None,
            jitter: None,
        });
        let due = served(None, None, Some("2026-01-01T01:00:00Z"));
        assert_eq!(
            rotation_request(&s, &due, &BTreeMap::new(), ts("2026-01-01T00:59:59Z")),
            None
        );
        assert_eq!(
            rotation_request(&s, &due, &BTreeMap::new(), ts("2026-01-01T01:00:00Z")),
            Some(Request::Schedule)
        );
        // Removing the schedule cancels a due rotation.
        s.schedule = None;
        assert_eq!(
            rotation_request(&s, &due, &BTreeMap::new(), ts("2026-01-02T00:00:00Z")),
            None
        );
    }

    #[test]
    fn next_rotation_by_interval_and_cron() {
        let every = Schedule {
            every: Some("2160h".into()),
            cron: None,
            jitter: None,
        };
        assert_eq!(
            next_rotation_at(Some(&every), ts("2026-01-01T00:00:00Z"), "uid"),
            Some(ts("2026-04-01T00:00:00Z"))
        );
        let cron = Schedule {
            every: None,
            cron: Some("0 3 1 * *".into()),
            jitter: None,
        };
        assert_eq!(
            next_rotation_at(Some(&cron), ts("2026-01-15T10:00:00Z"), "uid"),
            Some(ts("2026-02-01T03:00:00Z"))
        );
        assert_eq!(
            next_rotation_at(Some(&cron), ts("2026-02-01T03:00:00Z"), "uid"),
            Some(ts("2026-03-01T03:00:00Z")),
            "strictly after"
        );
        assert_eq!(
            next_rotation_at(None, ts("2026-01-01T00:00:00Z"), "uid"),
            None
        );
        // With jitter: a stable offset inside the jitter window.
        let jittered = Schedule {
            jitter: Some("1h".into()),
            ..cron.clone()
        };
        let due = next_rotation_at(Some(&jittered), ts("2026-01-15T10:00:00Z"), "uid").unwrap();
        assert!(due >= ts("2026-02-01T03:00:00Z") && due < ts("2026-02-01T04:00:00Z"));
        assert_eq!(
            Some(due),
            next_rotation_at(Some(&jittered), ts("2026-01-15T10:00:00Z"), "uid")
        );
        assert!(!cron_is_valid("61 * * * *"));
    }
}
