//! One reconcile: load, step, transition, record, requeue.

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::view::View;
use super::{announce, finalizer, phases};
use crate::crd::Phase;
use crate::crd::keys::{CONFIRM_ANNOTATION, ROLLBACK_ANNOTATION};
use crate::decide::{self, Next, OnTransient, Outcome, Route};
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::wake::Interest;

pub(super) async fn reconcile(mut v: View) -> Result<Action> {
    v.meter_status();
    if let Some(wake) = v.ctx.wake.clone() {
        // Watches wake a rotation in progress when what it waits on changes.
        let phase = v.phase();
        if v.status.rotation.is_some() && Interest::needs_watches(phase) {
            wake.wait_on(&v.namespace, &v.name, Interest::of(&v.sr.spec, phase));
        } else {
            wake.forget(&v.namespace, &v.name);
        }
    }
    if v.status.rotation.is_none() {
        if finalizer::deleting(&v) {
            // Nothing in progress: the deletion may proceed at once.
            finalizer::release(&mut v).await?;
            v.ctx.metrics.forget(&v.namespace, &v.name);
            return Ok(Action::await_change());
        }
        finalizer::ensure(&mut v).await?;
        return phases::idle::run(&mut v).await;
    }
    phases::grace::watch(&mut v).await?;
    phases::idle::note_pending_request(&mut v);
    let fingerprint = v.spec_fingerprint();
    if fingerprint != v.rotation().spec_fingerprint {
        if !decide::spec_change_allowed(v.phase()) {
            // What was issued, written and proven belongs to the old spec.
            let err = Error::permanent(
                Reason::SpecChangedDuringRotation,
                "spec.credential, targets or proof changed during the rotation; the old value was not invalidated. Request a new rotation",
            );
            return phases::fail::run(&mut v, err).await;
        }
        v.rotation_mut().spec_fingerprint = fingerprint;
    }
    if let Some(err) = rollback_request(&mut v) {
        return phases::fail::run(&mut v, err).await;
    }
    // One phase after the other while each is entered with nothing to
    // wait for (its status is written first, so a crash resumes there).
    loop {
        let phase = v.phase();
        let action = run(&mut v, phase).await?;
        let entered = v.phase();
        if entered == phase || !decide::steps_at_once(entered) {
            return Ok(action);
        }
        v.now = (v.ctx.clock)();
    }
}

/// A person's rollback request for this rotation (`rekey.dev/rollback`
/// holding its id), as the error that fails it; refused (with a Warning
/// Event, once) where `decide::rollback_refusal` says so.
fn rollback_request(v: &mut View) -> Option<Error> {
    let rot = v.rotation();
    if v.annotations().get(ROLLBACK_ANNOTATION) != Some(&rot.id) || rot.failure.is_some() {
        return None;
    }
    let old_value_expires = v.source().is_ok_and(|s| s.old_value_expires());
    let refusal = decide::rollback_refusal(
        v.phase(),
        rot.invalidation_started,
        rot.issued_at.is_some(),
        old_value_expires,
    );
    match refusal {
        None => Some(Error::permanent(
            Reason::RollbackRequested,
            format!("a rollback was requested (annotation {ROLLBACK_ANNOTATION})"),
        )),
        Some(why) => {
            if !rot.rollback_refused {
                let note = format!("Rollback of rotation {} refused: {why}", rot.id);
                v.event(EventType::Warning, "RollbackRefused", note);
                v.rotation_mut().rollback_refused = true;
            }
            None
        }
    }
}

/// Runs the step of `phase` and applies its outcome or error.
async fn run(v: &mut View, phase: Phase) -> Result<Action> {
    match step(v, phase).await {
        Ok(outcome) => {
            v.ctx.succeeded(&v.namespace, &v.name);
            apply(v, phase, outcome).await
        }
        Err(e) if e.permanent => phases::fail::run(v, e).await,
        Err(e) => match decide::on_transient_error(phase, v.phase_timed_out()) {
            OnTransient::Retry => {
                let (attempt, delay) = v.ctx.back_off(&v.namespace, &v.name);
                v.set_rotating(&format!(
                    "retrying after error (attempt {attempt}, next in {}s): {e}",
                    delay.as_secs()
                ));
                v.write_status().await?;
                Ok(Action::requeue(delay))
            }
            OnTransient::GiveUp => {
                let message = format!("{} (gave up after {})", e.message, v.sr.spec.proof.timeout);
                let err = Error {
                    message,
                    permanent: true,
                    ..e
                };
                phases::fail::run(v, err).await
            }
        },
    }
}

/// Runs the step of `phase`.
async fn step(v: &mut View, phase: Phase) -> Result<Outcome> {
    match phase {
        Phase::Pending => Ok(Outcome::Done),
        Phase::AwaitingApproval => phases::approval::step(v).await,
        Phase::Preflight => phases::preflight::step(v).await,
        Phase::Issuing => phases::issuing::step(v).await,
        Phase::Writing => phases::writing::step(v).await,
        Phase::AwaitingSync => phases::sync::step(v).await,
        Phase::AwaitingRollout => phases::rollout::step(v).await,
        Phase::Verifying => phases::verify::step(v).await,
        Phase::Invalidating => match phases::change::hold_invalidation(v).await? {
            Some(held) => Ok(held),
            None => phases::invalidate::step(v).await,
        },
        Phase::AwaitingConfirmation => phases::invalidate::step(v).await,
        Phase::RollingBack => phases::rollback::step(v).await,
        Phase::Succeeded | Phase::Failed | Phase::DryRunSucceeded => Ok(Outcome::Done),
    }
}

/// Asks the transition table where to go, and goes.
async fn apply(v: &mut View, phase: Phase, outcome: Outcome) -> Result<Action> {
    let route = Route::of(&v.sr.spec);
    match decide::next(phase, route, &outcome) {
        Next::Stay => {
            let awaited = match outcome {
                Outcome::Waiting(what) => what,
                Outcome::NeedsConfirmation | Outcome::Done => format!(
                    "invalidate the old value at the identity provider, then: kubectl annotate secretrotation {} {CONFIRM_ANNOTATION}={}",
                    v.name,
                    v.rotation().id
                ),
            };
            v.set_rotating(&awaited);
            v.write_status().await?;
            Ok(Action::requeue(v.ctx.poll))
        }
        Next::Enter(next) => announce::advance(v, next).await,
        Next::End(result) => phases::finish::run(v, result).await,
    }
}
