//! The identity provider's grace window and phase time budgets.

use std::time::Duration;

use jiff::Timestamp;

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
