//! Preflight: checks everything that can be checked without changing anything.

use super::super::claims as claim;
use super::super::view::View;
use super::super::view::condition;
use super::consumers;
use crate::crd::keys::restart_annotation;
use crate::crd::{FailurePolicy, RestartMode};
use crate::decide::{self, Outcome};
use crate::error::{Error, Result};
use crate::plan::{claims, host_allowed};
use crate::reason::Reason;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let plan = v.plan()?.clone();
    // One rotation per thing: taken in a fixed order, so two rotations
    // never hold one claim each while waiting for the other's.
    let mut things = claims(&v.sr.spec, &v.namespace);
    things.sort();
    things.dedup();
    let acquire = claim::acquire(v, &things);
    if let Some(waiting) = crate::failpoint::around("claim", acquire).await? {
        return Ok(Outcome::Waiting(waiting));
    }
    let spec = &v.sr.spec;
    if let Some(cron) = spec.schedule.as_ref().and_then(|s| s.cron.as_deref())
        && !decide::cron_is_valid(cron)
    {
        return Err(Error::permanent(
            Reason::InvalidSpec,
            "schedule.cron is not a valid cron expression",
        ));
    }
    if !plan.route.nothing_to_prove
        && let Some(problem) = decide::budget_problem(
            plan.grace_window,
            plan.proof_timeout,
            &v.status.history,
            spec.proof.ignore_history,
        )
    {
        return Err(Error::permanent(Reason::GraceWindowTooShort, problem));
    }
    if let Some(allowed) = &v.ctx.allowed_hosts {
        for (field, url) in plan.outbound_urls() {
            if !host_allowed(url, allowed) {
                return Err(Error::permanent(
                    Reason::HostNotAllowed,
                    format!("{field} names a host outside this operator's --allowed-hosts"),
                ));
            }
        }
    }
    if plan.on_failure == FailurePolicy::Rollback
        && let Some(t) = plan
            .targets
            .iter()
            .find(|t| t.crosses_namespace(&v.namespace))
    {
        return Err(Error::permanent(
            Reason::InvalidSpec,
            format!(
                "target {} is in another namespace: its previous value is not kept, so onFailure: Rollback cannot restore it",
                t.name
            ),
        ));
    }
    let names: Vec<String> = plan.targets.iter().map(|t| t.name.clone()).collect();
    v.wal().check_writable(&v.sr, &names).await?;
    // What each target holds now: the source checks the first, the proof
    // keys must hold one of them.
    let mut current = vec![];
    for target in &plan.targets {
        let store = v.store(target).await?;
        if let Some(value) = store.preflight().await? {
            current.push(value);
        }
    }
    v.source()?.preflight(current.first()).await?;
    let annotation = restart_annotation(&v.name);
    let mut competing = vec![];
    let mut covered = vec![];
    for place in &plan.places {
        // A remote cluster is reached (and its kubeconfig checked) here,
        // before anything changes.
        let proofs = v.proofs(place).await?;
        for es in &place.proof.external_secrets {
            proofs.sync.preflight(es, &current).await?;
        }
        for w in &place.proof.workloads {
            let o = proofs.rollouts.observe(w, &annotation).await?;
            if let Some(stuck) = o.stuck {
                return Err(Error::permanent(
                    Reason::RolloutCannotProgress,
                    place.say(&stuck),
                ));
            }
            competing.extend(
                o.other_restarters.iter().map(|r| {
                    place.say(&format!("{:?} {} is also restarted by {r}", w.kind, w.name))
                }),
            );
        }
        covered.extend(consumers::covered(v, &plan, place).await?);
    }
    v.rotation_mut().consumers = covered;
    warn_competing_restarters(v, &competing);
    Ok(Outcome::Done)
}

/// A warning condition while a proven workload has another restarter.
fn warn_competing_restarters(v: &mut View, competing: &[String]) {
    if competing.is_empty() {
        if v.has_condition(condition::COMPETING_RESTARTER) {
            v.set_condition(condition::COMPETING_RESTARTER, "False", "None", "");
        }
        return;
    }
    let hint = match v.sr.spec.proof.restart {
        RestartMode::Trigger => {
            "each rotation rolls it out twice; set proof.restart: Await to let the other restarter do it"
        }
        RestartMode::Await => "rekey waits for that restart",
    };
    let message = format!("{}: {hint}", competing.join("; "));
    v.set_condition(
        condition::COMPETING_RESTARTER,
        "True",
        "OtherRestarter",
        &message,
    );
}
