//! Leader election on a coordination.k8s.io Lease, for running more than one
//! replica, and the fence that keeps a leader from acting once its lease may
//! have run out.
//!
//! The rules are client-go's: the leader renews every retry period
//! ([`RETRY_PERIOD`] by default) and gives up (the process exits) when it
//! could not renew within the renew deadline ([`RENEW_DEADLINE`], two thirds
//! of [`LEASE_DURATION`]); all four durations are flags ([`Timings`]). A candidate never
//! compares its wall clock with the holder's `renewTime`: it takes the lease
//! only after it has seen the same record, unchanged, for the lease duration
//! on its own monotonic clock, so clock skew between nodes cannot make two
//! leaders. On top of that, the leader's [`Fence`] lets a side effect start
//! only while the lease outlives the call's timeout, and cuts the call at
//! that timeout: no call of an old leader is still in flight when a new one
//! may start.
//!
//! Why not a crate: kube-leader-election (0.32, for kube 0.9x) compares
//! timestamps across nodes and documents itself as "without fencing";
//! kube-lease-manager tolerates a configured skew but reports leadership as
//! a boolean, without the remaining lease a fence needs. This module is
//! small and its decisions are pure functions with unit tests.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::reason::Reason;

const LEASE_NAME: &str = "rekey-leader";
/// How long a renewal holds the lease (default of `--leader-lease-duration`).
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// A leader that could not renew for this long steps down (2/3 of the lease;
/// default of `--leader-renew-deadline`).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(6);
/// How often the leader renews and candidates look (default of
/// `--leader-retry-period`).
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// The longest a fenced side effect may take (default of
/// `--leader-call-timeout`; derived from the other three, see
/// [`Timings::derive_call_timeout`]).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(7);

/// The leader election's durations, checked against each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    pub call_timeout: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: LEASE_DURATION,
            renew_deadline: RENEW_DEADLINE,
            retry_period: RETRY_PERIOD,
            call_timeout: CALL_TIMEOUT,
        }
    }
}

impl Timings {
    /// The call timeout when none is given: what the lease leaves after the
    /// renew deadline, plus one and a half retry periods (8 s for the
    /// defaults 10 s / 6 s / 2 s).
    pub fn derive_call_timeout(lease: Duration, renew: Duration, retry: Duration) -> Duration {
        lease.saturating_sub(renew) + retry.mul_f64(1.5)
    }

    /// Checks the durations against each other: retry period < renew
    /// deadline < lease duration, and a call timeout short enough that a
    /// call may start between two renewals (call timeout < lease duration −
    /// retry period). `call_timeout` None: derived.
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
        call_timeout: Option<Duration>,
    ) -> std::result::Result<Self, String> {
        let call_timeout = call_timeout.unwrap_or_else(|| {
            Self::derive_call_timeout(lease_duration, renew_deadline, retry_period)
        });
        let t = Self {
            lease_duration,
            renew_deadline,
            retry_period,
            call_timeout,
        };
        if retry_period.is_zero() || call_timeout.is_zero() {
            return Err(format!(
                "leader election: the retry period ({retry_period:?}) and the call timeout ({call_timeout:?}) must be more than 0s"
            ));
        }
        if retry_period >= renew_deadline {
            return Err(format!(
                "leader election: the retry period ({retry_period:?}) must be shorter than the renew deadline ({renew_deadline:?}): the leader must get more than one try to renew"
            ));
        }
        if renew_deadline >= lease_duration {
            return Err(format!(
                "leader election: the renew deadline ({renew_deadline:?}) must be shorter than the lease duration ({lease_duration:?}): a leader must step down before another may take its lease"
            ));
        }
        if call_timeout >= lease_duration - retry_period {
            return Err(format!(
                "leader election: the call timeout ({call_timeout:?}) must be shorter than the lease duration minus the retry period ({:?}): a side effect starts only while the lease outlives the call timeout, and a lease renewed every retry period never would",
                lease_duration - retry_period
            ));
        }
        Ok(t)
    }
}

/// Whether a candidate may take a lease whose record it has seen unchanged
/// for `unchanged_for` (its own clock), given the holder's declared duration.
pub fn may_take(holder: Option<&str>, unchanged_for: Duration, lease_duration: Duration) -> bool {
    holder.is_none_or(str::is_empty) || unchanged_for >= lease_duration
}

/// Whether a call that may take `call_timeout` may start with `remaining`
/// of the lease left.
pub fn may_act(remaining: Duration, call_timeout: Duration) -> bool {
    remaining > call_timeout
}

/// Guards side effects: with leader election, a call starts only while the
/// lease outlives the call timeout, and is cut at that timeout.
#[derive(Clone, Default)]
pub struct Fence {
    /// None: no leader election (one replica); otherwise until when (this
    /// process's clock) the lease is surely held.
    held_until: Option<Arc<Mutex<Option<Instant>>>>,
    timings: Timings,
}

impl Fence {
    /// No fence: a single replica (the chart's Recreate strategy).
    pub fn none() -> Self {
        Self::default()
    }

    fn elected(timings: Timings) -> Self {
        Self {
            held_until: Some(Arc::new(Mutex::new(None))),
            timings,
        }
    }

    /// Records a renewal that was sent at `sent`.
    fn renewed(&self, sent: Instant) {
        if let Some(h) = &self.held_until {
            *h.lock().unwrap() = Some(sent + self.timings.lease_duration);
        }
    }

    /// Runs the side effect `call`, if the lease allows it.
    pub async fn run<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let Some(h) = &self.held_until else {
            return call.await;
        };
        let remaining = h
            .lock()
            .unwrap()
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let call_timeout = self.timings.call_timeout;
        if !may_act(remaining, call_timeout) {
            return Err(Error::transient(
                Reason::LeaseNotRenewed,
                format!(
                    "not starting {what}: the leader lease has {}s left, less than the call may take",
                    remaining.as_secs()
                ),
            ));
        }
        let too_late = || {
            Err(Error::transient(
                Reason::LeaseNotRenewed,
                format!("{what} did not answer within {call_timeout:?}"),
            ))
        };
        // The deadline is checked before every step of the call, not only
        // by the timer: a process stopped mid-call (SIGSTOP, a frozen VM)
        // and resumed after it would otherwise take the call's next step
        // (send the request it was about to send) before the timer fires.
        let deadline = Instant::now() + call_timeout;
        let mut call = std::pin::pin!(call);
        let fenced = std::future::poll_fn(|cx| {
            if Instant::now() >= deadline {
                return std::task::Poll::Ready(too_late());
            }
            call.as_mut().poll(cx)
        });
        tokio::time::timeout(call_timeout, fenced)
            .await
            .unwrap_or_else(|_| too_late())
    }
}

pub struct LeaderElection {
    api: Api<Lease>,
    identity: String,
    /// The record last seen (holder, renewTime, resourceVersion) and when
    /// this process first saw it.
    observed: Option<(String, Instant)>,
    fence: Fence,
    timings: Timings,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, identity: &str, timings: Timings) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            identity: identity.into(),
            observed: None,
            fence: Fence::elected(timings),
            timings,
        }
    }

    /// The fence the controller must run its side effects through.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// The lease duration as the Lease records it (whole seconds, rounded
    /// up: a candidate never waits less than this replica holds it).
    fn lease_seconds(&self) -> i32 {
        self.timings.lease_duration.as_secs_f64().ceil().max(1.0) as i32
    }

    /// Tries once to take or renew the lease; true when this replica holds it.
    async fn try_acquire(&mut self) -> kube::Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !mine {
            let record = format!(
                "{:?}/{:?}/{:?}",
                spec.holder_identity,
                spec.renew_time.as_ref().map(|t| t.0),
                lease.metadata.resource_version
            );
            let since = match &self.observed {
                Some((seen, since)) if *seen == record => *since,
                _ => {
                    self.observed = Some((record, Instant::now()));
                    Instant::now()
                }
            };
            let duration = spec
                .lease_duration_seconds
                .map_or(self.timings.lease_duration, |s| {
                    Duration::from_secs(s.max(1) as u64)
                });
            if !may_take(spec.holder_identity.as_deref(), since.elapsed(), duration) {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.lease_seconds());
        // resourceVersion is kept: a concurrent update makes this fail with 409.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica is the leader, then keeps renewing in the
    /// background; the process exits when it cannot renew in time.
    pub async fn acquire_and_hold(mut self) {
        loop {
            let sent = Instant::now();
            match self.try_acquire().await {
                Ok(true) => {
                    self.fence.renewed(sent);
                    break;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(self.timings.retry_period).await;
        }
        info!(identity = %self.identity, "became leader");
        tokio::spawn(async move {
            let mut last_renewed = Instant::now();
            loop {
                tokio::time::sleep(self.timings.retry_period).await;
                let sent = Instant::now();
                let left = self
                    .timings
                    .renew_deadline
                    .saturating_sub(last_renewed.elapsed());
                match tokio::time::timeout(left, self.try_acquire()).await {
                    Ok(Ok(true)) => {
                        self.fence.renewed(sent);
                        last_renewed = sent;
                    }
                    Ok(Ok(false)) => {
                        warn!("lost the leader lease; exiting");
                        std::process::exit(1);
                    }
                    Ok(Err(e)) => warn!(error = %e, "could not renew the leader lease"),
                    Err(_) => warn!("renewing the leader lease timed out"),
                }
                if last_renewed.elapsed() >= self.timings.renew_deadline {
                    warn!("could not renew the leader lease within the renew deadline; exiting");
                    std::process::exit(1);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_waits_a_full_lease_of_its_own_observation() {
        let d = LEASE_DURATION;
        assert!(!may_take(Some("a"), d - Duration::from_secs(1), d));
        assert!(may_take(Some("a"), d, d));
        assert!(may_take(None, Duration::ZERO, d), "nobody holds it");
        assert!(may_take(Some(""), Duration::ZERO, d), "released");
    }

    #[test]
    fn renewing_leaves_a_margin_and_calls_fit_inside_the_lease() {
        assert!(RENEW_DEADLINE.as_secs_f64() <= LEASE_DURATION.as_secs_f64() * 2.0 / 3.0);
        // Right after a renewal a call may start; once the renew deadline
        // passed, none may.
        assert!(may_act(LEASE_DURATION - RETRY_PERIOD, CALL_TIMEOUT));
        assert!(!may_act(LEASE_DURATION - RENEW_DEADLINE, CALL_TIMEOUT));
        assert!(!may_act(CALL_TIMEOUT, CALL_TIMEOUT));
    }

    #[tokio::test]
    async fn the_fence_refuses_without_a_fresh_lease_and_cuts_slow_calls() {
        let fence = Fence::elected(Timings::default());
        let r = fence.run("write", async { Ok(()) }).await;
        assert_eq!(
            r.unwrap_err().reason,
            Reason::LeaseNotRenewed,
            "never renewed"
        );
        fence.renewed(Instant::now());
        assert!(fence.run("write", async { Ok(()) }).await.is_ok());
        fence.renewed(Instant::now() - RENEW_DEADLINE);
        assert!(
            fence.run("write", async { Ok(()) }).await.is_err(),
            "stale lease"
        );
        assert!(Fence::none().run("write", async { Ok(()) }).await.is_ok());
    }

    #[test]
    fn timings_are_checked_against_each_other() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(
            Timings::new(LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD, None),
            Ok(Timings::default()),
            "the defaults derive the default call timeout"
        );
        let test = Timings::new(s(3), s(2), ms(500), None).unwrap();
        assert_eq!(test.call_timeout, ms(1750));
        for (lease, renew, retry, call, says) in [
            (s(15), s(15), s(2), None, "renew deadline"),
            (s(15), s(10), s(10), None, "retry period"),
            (s(15), s(10), s(0), None, "more than 0s"),
            (s(15), s(10), s(2), Some(s(13)), "call timeout"),
            (s(3), s(2), s(1), None, "call timeout"),
        ] {
            let e = Timings::new(lease, renew, retry, call).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        assert!(Timings::new(s(15), s(10), s(2), Some(s(12))).is_ok());
    }

    /// A process stopped (SIGSTOP, a frozen VM) while a fenced call waits,
    /// and resumed after the call's timeout, must not carry on with the
    /// call: by then another replica may lead.
    #[tokio::test(flavor = "current_thread")]
    async fn a_call_resumed_after_its_timeout_does_not_act() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let timings = Timings::new(
            Duration::from_secs(3),
            Duration::from_secs(2),
            Duration::from_millis(500),
            Some(Duration::from_millis(300)),
        )
        .unwrap();
        let fence = Fence::elected(timings);
        fence.renewed(Instant::now());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let acted = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (fence, acted) = (fence.clone(), acted.clone());
            async move {
                fence
                    .run("write", async move {
                        let _ = rx.await;
                        acted.store(true, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
            }
        });
        // The call starts and waits (for its connection, say).
        tokio::task::yield_now().await;
        // The process is stopped past the call timeout; what the call
        // waited for is ready when it resumes.
        std::thread::sleep(Duration::from_millis(400));
        tx.send(()).unwrap();
        let r = task.await.unwrap();
        assert_eq!(
            r.unwrap_err().reason,
            Reason::LeaseNotRenewed,
            "cut at its timeout"
        );
        assert!(!acted.load(Ordering::SeqCst), "acted after its timeout");
    }
}
