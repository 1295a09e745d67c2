//! Herds: many rotations that would start at once (a disaster-recovery
//! restore, a reinstall, schedules that line up) are spread out. A token
//! bucket bounds how fast this operator starts rotations, and schedules get
//! a stable per-object jitter. Pure; the clock is an argument.

use std::time::Duration;

use jiff::Timestamp;

/// How many rotations may start: `burst` at once, then `per_minute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartRate {
    pub burst: u32,
    pub per_minute: u32,
}

/// Start slots left, as of `at`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StartBucket {
    tokens: f64,
    at: Option<Timestamp>,
}

impl StartBucket {
    /// A full bucket.
    pub fn new(rate: StartRate) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: None,
        }
    }

    /// Takes a start slot, or says how long until one is free.
    pub fn take(&mut self, rate: StartRate, now: Timestamp) -> Result<(), Duration> {
        let per_second = f64::from(rate.per_minute.max(1)) / 60.0;
        let elapsed = self
            .at
            .map_or(0.0, |at| now.duration_since(at).as_secs_f64().max(0.0));
        self.tokens = (self.tokens + elapsed * per_second).min(f64::from(rate.burst.max(1)));
        // Concurrent reconciles read the clock at different moments: the
        // bucket's time only moves forward, or a late reader refills twice.
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }
}

/// A stable offset in `[0, jitter)` for the object `seed` (its uid): the
/// same object always gets the same offset, different objects spread out.
pub fn jitter_for(seed: &str, jitter: Duration) -> Duration {
    let secs = jitter.as_secs();
    if secs == 0 {
        return Duration::ZERO;
    }
    let hash = u64::from_str_radix(&crate::fingerprint::fnv1a(seed.as_bytes()), 16).unwrap_or(0);
    Duration::from_secs(hash % secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn a_burst_then_the_rate() {
        let rate = StartRate {
            burst: 3,
            per_minute: 60,
        };
        let mut b = StartBucket::new(rate);
        for _ in 0..3 {
            assert!(b.take(rate, at(0)).is_ok());
        }
        assert_eq!(b.take(rate, at(0)), Err(Duration::from_secs(1)));
        assert!(b.take(rate, at(1)).is_ok(), "one slot a second");
        assert!(b.take(rate, at(1)).is_err());
        // An idle minute refills up to the burst, not beyond.
        for _ in 0..3 {
            assert!(b.take(rate, at(100)).is_ok());
        }
        assert!(b.take(rate, at(100)).is_err());
    }

    #[test]
    fn a_stale_clock_reading_refills_nothing() {
        let rate = StartRate {
            burst: 1,
            per_minute: 60,
        };
        let mut b = StartBucket::new(rate);
        assert!(b.take(rate, at(10)).is_ok());
        assert!(b.take(rate, at(9)).is_err(), "read before the last take");
        assert!(b.take(rate, at(10)).is_err(), "no slot refilled by it");
        assert!(b.take(rate, at(11)).is_ok());
    }

    #[test]
    fn fifty_requests_at_once_start_over_time() {
        let rate = StartRate {
            burst: 5,
            per_minute: 60,
        };
        let mut b = StartBucket::new(rate);
        let mut started = 0;
        for second in 0..30 {
            while b.take(rate, at(second)).is_ok() {
                started += 1;
            }
        }
        assert_eq!(started, 5 + 29, "the burst, then one a second");
    }

    #[test]
    fn jitter_is_stable_and_spreads() {
        let hour = Duration::from_secs(3600);
        assert_eq!(jitter_for("uid-a", hour), jitter_for("uid-a", hour));
        let offsets: std::collections::BTreeSet<_> = (0..50)
            .map(|i| jitter_for(&format!("uid-{i}"), hour))
            .collect();
        assert!(offsets.len() > 40, "{}", offsets.len());
        assert!(offsets.iter().all(|o| *o < hour));
        assert_eq!(jitter_for("uid-a", Duration::ZERO), Duration::ZERO);
    }
}
