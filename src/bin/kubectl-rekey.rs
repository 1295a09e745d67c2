//! `kubectl rekey`: look at and steer SecretRotations from a terminal.
//!
//!   kubectl rekey status [NAME]            table; with NAME, the phase timeline
//!   kubectl rekey rotate NAME [--wait]     request a rotation now
//!   kubectl rekey wait NAME                wait for the requested rotation; non-zero on Failed
//!   kubectl rekey approve NAME             approve the rotation waiting for approval
//!   kubectl rekey confirm-invalidated NAME confirm a manual invalidation
//!   kubectl rekey history NAME             the last rotations
//!
//! `-n NAMESPACE`, `-A` (status), `-o json` for scripts.
#![forbid(unsafe_code)]

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use rekey::crd::keys::{APPROVE_ANNOTATION, CONFIRM_ANNOTATION, ROTATE_ANNOTATION};
use rekey::crd::{Phase, RotationSummary, SecretRotation};

#[derive(Parser)]
#[command(
    name = "kubectl rekey",
    version,
    about = "Look at and steer SecretRotations"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Show SecretRotations; with NAME, its current rotation phase by phase.
    Status {
        name: Option<String>,
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Request a rotation now (sets the rekey.dev/rotate annotation).
    Rotate {
        name: String,
        /// Then wait for it, as `kubectl rekey wait` does.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits (e.g. 30m).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Wait until the requested rotation ends: exit 0 when it succeeded, at
    /// once non-zero when it failed (kubectl wait --for=condition=Ready
    /// cannot tell an annotation request from the previous Ready).
    Wait {
        name: String,
        /// How long to wait (e.g. 30m).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Approve the rotation that waits in AwaitingApproval.
    Approve { name: String },
    /// Confirm that the old value was invalidated by hand (manual source).
    ConfirmInvalidated { name: String },
    /// Show the last rotations with their phase durations.
    History { name: String },
}

fn ago(t: Option<&Time>, now: Timestamp) -> String {
    let Some(t) = t else { return "-".into() };
    let secs = now.duration_since(t.0).as_secs();
    let (n, unit) = match secs.abs() {
        s if s < 120 => (s, "s"),
        s if s < 7200 => (s / 60, "m"),
        s if s < 172_800 => (s / 3600, "h"),
        s => (s / 86400, "d"),
    };
    if secs < 0 {
        format!("in {n}{unit}")
    } else {
        format!("{n}{unit} ago")
    }
}

fn phase(p: Option<Phase>) -> String {
    p.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into())
}

fn print_table(rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

async fn annotate(api: &Api<SecretRotation>, name: &str, key: &str, value: &str) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("annotate {name}"))?;
    Ok(())
}

fn timeline(sr: &SecretRotation, now: Timestamp) {
    let status = sr.status.clone().unwrap_or_default();
    println!(
        "Name:       {}/{}",
        sr.namespace().unwrap_or_default(),
        sr.name_any()
    );
    println!("Phase:      {}", phase(status.phase));
    if let Some(rot) = &status.rotation {
        println!(
            "Rotation:   {} ({}), requested {}",
            rot.id,
            rot.reason,
            ago(rot.requested_at.as_ref().map(|t| Time(t.0)).as_ref(), now)
        );
        if let Some(until) = &rot.old_value_valid_until {
            println!(
                "Old value valid until: {} ({})",
                until.0,
                ago(Some(until), now)
            );
        }
        for p in &rot.phases {
            println!("  ✓ {:<22} {:>8.1}s", format!("{:?}", p.phase), p.seconds);
        }
        let since = rot
            .phase_started_at
            .as_ref()
            .map(|t| now.duration_since(t.0).as_secs_f64())
            .unwrap_or(0.0);
        println!("  ▶ {:<22} {:>8.1}s so far", phase(status.phase), since);
        for t in &rot.targets {
            println!("  target {} version {}", t.name, t.version);
        }
    } else if let Some(last) = &status.last_rotation {
        println!(
            "Last:       {} {:?} {} ({:.0}s)",
            last.id,
            last.result,
            ago(last.finished_at.as_ref(), now),
            last.duration_seconds
        );
        for (i, p) in last.phases.iter().enumerate() {
            // The phase a rotation failed in is its last: shown once, as failed.
            let failed = last
                .failure
                .as_ref()
                .filter(|f| i + 1 == last.phases.len() && f.phase == p.phase);
            match failed {
                Some(f) => println!(
                    "  ✗ {:<22} {:>8.1}s  {}: {}",
                    format!("{:?}", p.phase),
                    p.seconds,
                    f.reason,
                    f.message
                ),
                None => println!("  ✓ {:<22} {:>8.1}s", format!("{:?}", p.phase), p.seconds),
            }
        }
        if let Some(f) = last
            .failure
            .as_ref()
            .filter(|f| last.phases.last().is_none_or(|p| p.phase != f.phase))
        {
            println!("  ✗ {:?}: {}: {}", f.phase, f.reason, f.message);
        }
    }
    println!(
        "Next:       {}",
        status
            .next_rotation_at
            .as_ref()
            .map(|t| format!("{} ({})", t.0, ago(Some(t), now)))
            .unwrap_or("-".into())
    );
    if let Some(p) = &status.pending_request {
        println!("Pending:    {p} (served after the current rotation)");
    }
    for c in &status.conditions {
        println!(
            "Condition:  {}={} {}: {}",
            c.type_, c.status, c.reason, c.message
        );
    }
}

fn history_rows(h: &[RotationSummary], now: Timestamp) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "ROTATION".into(),
        "RESULT".into(),
        "REASON".into(),
        "FINISHED".into(),
        "DURATION".into(),
        "PHASES".into(),
        "FAILURE".into(),
    ]];
    for r in h {
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|p| format!("{:?} {:.1}s", p.phase, p.seconds))
            .collect();
        rows.push(vec![
            r.id.clone(),
            format!("{:?}", r.result),
            r.reason.clone(),
            ago(r.finished_at.as_ref(), now),
            format!("{:.1}s", r.duration_seconds),
            phases.join(", "),
            r.failure
                .as_ref()
                .map(|f| f.reason.clone())
                .unwrap_or_default(),
        ]);
    }
    rows
}

/// Reads one SecretRotation; a missing one or a refusal is a sentence, not
/// the API's error structure.
async fn get(api: &Api<SecretRotation>, ns: &str, name: &str) -> Result<SecretRotation> {
    match api.get(name).await {
        Ok(sr) => Ok(sr),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            bail!("no SecretRotation named {name} in namespace {ns}")
        }
        Err(kube::Error::Api(s)) => {
            bail!(
                "could not read SecretRotation {ns}/{name}: {} (HTTP {})",
                s.message,
                s.code
            )
        }
        Err(e) => bail!("could not read SecretRotation {ns}/{name}: {e}"),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    rekey::install_crypto_provider();
    let cli = Cli::parse();
    let config = kube::Config::infer().await.context("load kubeconfig")?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    let api: Api<SecretRotation> = Api::namespaced(client.clone(), &ns);
    let now = Timestamp::now();
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Status {
            name: Some(name), ..
        } => {
            let sr = get(&api, &ns, &name).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"name": name, "namespace": ns, "status": sr.status})
                    )?
                );
            } else {
                timeline(&sr, now);
            }
        }
        Command::Status {
            name: None,
            all_namespaces,
        } => {
            let list = if all_namespaces {
                Api::<SecretRotation>::all(client)
                    .list(&ListParams::default())
                    .await?
            } else {
                api.list(&ListParams::default()).await?
            };
            if json {
                let items: Vec<_> = list
                    .items
                    .iter()
                    .map(|sr| serde_json::json!({"name": sr.name_any(), "namespace": sr.namespace(), "status": sr.status}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(());
            }
            let mut rows = vec![vec![
                "NAMESPACE".into(),
                "NAME".into(),
                "PHASE".into(),
                "ROTATION".into(),
                "LAST RESULT".into(),
                "REASON".into(),
                "LAST ROTATION".into(),
                "NEXT ROTATION".into(),
                "PENDING".into(),
            ]];
            for sr in &list.items {
                let s = sr.status.clone().unwrap_or_default();
                rows.push(vec![
                    sr.namespace().unwrap_or_default(),
                    sr.name_any(),
                    phase(s.phase),
                    s.rotation
                        .as_ref()
                        .map(|r| r.id.clone())
                        .unwrap_or("-".into()),
                    s.last_rotation
                        .as_ref()
                        .map(|l| format!("{:?}", l.result))
                        .unwrap_or("-".into()),
                    s.last_rotation
                        .as_ref()
                        .and_then(|l| l.failure.as_ref())
                        .map(|f| f.reason.clone())
                        .unwrap_or("-".into()),
                    ago(
                        s.last_rotation
                            .as_ref()
                            .and_then(|l| l.finished_at.as_ref()),
                        now,
                    ),
                    ago(s.next_rotation_at.as_ref(), now),
                    s.pending_request.unwrap_or("-".into()),
                ]);
            }
            if list.items.is_empty() {
                println!(
                    "No SecretRotations in {}.",
                    if all_namespaces {
                        "any namespace".into()
                    } else {
                        format!("namespace {ns}")
                    }
                );
            } else {
                print_table(rows);
            }
        }
        Command::Rotate {
            name,
            wait,
            timeout,
        } => {
            let token = now.to_string();
            annotate(&api, &name, ROTATE_ANNOTATION, &token).await?;
            if json && !wait {
                println!("{}", serde_json::json!({"name": name, "requested": token}));
            } else if !json {
                println!("Rotation of {ns}/{name} requested ({ROTATE_ANNOTATION}={token}).");
            }
            if wait {
                wait_for_rotation(&api, &ns, &name, timeout, json).await?;
            }
        }
        Command::Wait { name, timeout } => {
            get(&api, &ns, &name).await?;
            wait_for_rotation(&api, &ns, &name, timeout, json).await?;
        }
        Command::Approve { name } => {
            let id = waiting_rotation(&api, &ns, &name, Phase::AwaitingApproval).await?;
            annotate(&api, &name, APPROVE_ANNOTATION, &id).await?;
            if json {
                println!("{}", serde_json::json!({"name": name, "approved": id}));
            } else {
                println!("Rotation {id} of {ns}/{name} approved.");
            }
        }
        Command::ConfirmInvalidated { name } => {
            let id = waiting_rotation(&api, &ns, &name, Phase::AwaitingConfirmation).await?;
            annotate(&api, &name, CONFIRM_ANNOTATION, &id).await?;
            if json {
                println!("{}", serde_json::json!({"name": name, "confirmed": id}));
            } else {
                println!(
                    "Invalidation of the old value confirmed for rotation {id} of {ns}/{name}."
                );
            }
        }
        Command::History { name } => {
            let sr = get(&api, &ns, &name).await?;
            let history = sr.status.map(|s| s.history).unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else if history.is_empty() {
                println!("{ns}/{name} has not finished a rotation yet.");
            } else {
                print_table(history_rows(&history, now));
            }
        }
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    rekey::duration::parse(s).ok_or_else(|| format!("not a duration: {s} (e.g. 90s, 30m, 2h)"))
}

/// Where the rotation requested of a SecretRotation stands.
#[derive(Debug, PartialEq)]
enum Verdict {
    Succeeded(String),
    Failed(String),
    NotYet,
}

fn condition<'a>(
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
async fn wait_for_rotation(
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

fn humanize(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The id of the rotation of `name` that waits in `want`.
async fn waiting_rotation(
    api: &Api<SecretRotation>,
    ns: &str,
    name: &str,
    want: Phase,
) -> Result<String> {
    let sr = get(api, ns, name).await?;
    let status = sr.status.unwrap_or_default();
    match (&status.rotation, status.phase) {
        (Some(rot), Some(p)) if p == want => Ok(rot.id.clone()),
        _ => bail!(
            "{name} is in phase {}, not {want:?}: nothing to do",
            phase(status.phase)
        ),
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
