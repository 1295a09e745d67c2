//! `wait` and `rotate --wait`: follow the requested rotation to its end.

use anyhow::{Context as _, Result, bail};
use kube::ResourceExt;
use kube::api::Api;
use rekey::crd::SecretRotation;
use rekey::crd::keys::ROTATE_ANNOTATION;

use super::get;

/// Where the rotation requested of a SecretRotation stands.
#[derive(Debug, PartialEq)]
enum Verdict {
    Succeeded(String),
    Failed(String),
    NotYet,
}

pub fn condition<'a>(
    status: &'a rekey::crd::SecretRotationStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Judges one look at the object. The request must be known to rekey
/// first: a status older than the spec, or one that has not seen the
/// current `rekey.dev/rotate` value, still speaks of the previous rotation.
fn verdict(sr: &SecretRotation) -> Verdict {
    let Some(s) = &sr.status else {
        return Verdict::NotYet;
    };
    if s.observed_generation != sr.metadata.generation {
        return Verdict::NotYet;
    }
    if let Some(asked) = sr.annotations().get(ROTATE_ANNOTATION) {
        let seen = s.observed_rotate_request.as_ref() == Some(asked)
            || s.rotation.as_ref().and_then(|r| r.rotate_request.as_ref()) == Some(asked)
            || s.pending_request.is_some();
        if !seen {
            return Verdict::NotYet;
        }
    }
    let is_true = |type_| condition(s, type_).filter(|c| c.status == "True");
    if let Some(c) = is_true("Stalled") {
        return Verdict::Failed(c.message.clone());
    }
    if is_true("Reconciling").is_some() {
        return Verdict::NotYet;
    }
    match is_true("Ready") {
        Some(c) => Verdict::Succeeded(c.message.clone()),
        None => Verdict::NotYet,
    }
}

/// Watches `name` until `verdict` decides, or `timeout` passes.
pub async fn wait_for_rotation(
    api: &Api<SecretRotation>,
    ns: &str,
    name: &str,
    timeout: std::time::Duration,
    json: bool,
) -> Result<()> {
    let decided = |sr: Option<&SecretRotation>| sr.is_none_or(|sr| verdict(sr) != Verdict::NotYet);
    let waited = kube::runtime::wait::await_condition(api.clone(), name, decided);
    let seen = match tokio::time::timeout(timeout, waited).await {
        Err(_) => {
            let phase = get(api, ns, name)
                .await
                .ok()
                .and_then(|sr| sr.status.and_then(|s| s.phase));
            bail!(
                "{ns}/{name} did not finish within {}; it is in phase {} (kubectl rekey status {name})",
                humanize(timeout),
                phase.map_or("-".to_string(), |p| p.to_string())
            )
        }
        Ok(seen) => seen.with_context(|| format!("watch SecretRotation {ns}/{name}"))?,
    };
    let Some(sr) = seen else {
        bail!("SecretRotation {ns}/{name} was deleted while waiting")
    };
    match verdict(&sr) {
        Verdict::Succeeded(message) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "result": "Succeeded", "message": message})
                );
            } else {
                println!("{ns}/{name}: {message}.");
            }
            Ok(())
        }
        Verdict::Failed(message) => bail!("{ns}/{name}: {message}"),
        Verdict::NotYet => unreachable!("the watch ends only on a verdict"),
    }
}

pub fn humanize(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sr(generation: i64, annotation: Option<&str>, status: serde_json::Value) -> SecretRotation {
        let mut o = serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
            "metadata": {"name": "a", "generation": generation, "annotations": {}},
            "spec": {"credential": {"generated": {}}, "targets": [], "proof": {"nothingToProve": true}},
            "status": status,
        });
        if let Some(a) = annotation {
            o["metadata"]["annotations"][ROTATE_ANNOTATION] = a.into();
        }
        serde_json::from_value(o).unwrap()
    }

    fn conditions(ready: &str, reconciling: &str, stalled: &str) -> serde_json::Value {
        let c = |t: &str, s: &str| serde_json::json!({"type": t, "status": s, "reason": "R", "message": format!("{t} says {s}"), "lastTransitionTime": "2026-11-27T00:00:00Z"});
        serde_json::json!([
            c("Ready", ready),
            c("Reconciling", reconciling),
            c("Stalled", stalled)
        ])
    }

    #[test]
    fn waits_until_the_request_is_seen_then_follows_the_conditions() {
        let done = conditions("True", "False", "False");
        // A spec change rekey has not seen: the old Ready does not count.
        let stale = sr(
            3,
            None,
            serde_json::json!({"observedGeneration": 2, "conditions": done}),
        );
        assert_eq!(verdict(&stale), Verdict::NotYet);
        // An annotation rekey has not seen: likewise.
        let unseen = sr(
            3,
            Some("t2"),
            serde_json::json!({"observedGeneration": 3, "observedRotateRequest": "t1", "conditions": done}),
        );
        assert_eq!(verdict(&unseen), Verdict::NotYet);
        let served = sr(
            3,
            Some("t2"),
            serde_json::json!({"observedGeneration": 3, "observedRotateRequest": "t2", "conditions": done}),
        );
        assert_eq!(
            verdict(&served),
            Verdict::Succeeded("Ready says True".into())
        );
        let running = sr(
            3,
            Some("t2"),
            serde_json::json!({"observedGeneration": 3, "observedRotateRequest": "t1",
                "rotation": {"id": "r", "reason": "OnDemand", "rotateRequest": "t2", "requestedAt": null, "phaseStartedAt": null},
                "conditions": conditions("False", "True", "False")}),
        );
        assert_eq!(verdict(&running), Verdict::NotYet);
        let failed = sr(
            3,
            None,
            serde_json::json!({"observedGeneration": 3, "conditions": conditions("False", "False", "True")}),
        );
        assert_eq!(
            verdict(&failed),
            Verdict::Failed("Stalled says True".into())
        );
        assert_eq!(
            verdict(&sr(1, None, serde_json::Value::Null)),
            Verdict::NotYet
        );
    }
}
