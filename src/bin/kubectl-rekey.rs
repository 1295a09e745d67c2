//! `kubectl rekey`: look at and steer SecretRotations from a terminal.
//!
//!   kubectl rekey status [NAME]            table; with NAME, the phase timeline
//!   kubectl rekey rotate NAME              request a rotation now
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
    Rotate { name: String },
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
        Command::Rotate { name } => {
            let token = now.to_string();
            annotate(&api, &name, ROTATE_ANNOTATION, &token).await?;
            if json {
                println!("{}", serde_json::json!({"name": name, "requested": token}));
            } else {
                println!("Rotation of {ns}/{name} requested ({ROTATE_ANNOTATION}={token}).");
            }
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
