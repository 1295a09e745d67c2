//! `kubectl rekey`: look at and steer SecretRotations from a terminal.
//!
//!   kubectl rekey status [NAME]            table; with NAME, the phase timeline
//!   kubectl rekey rotate NAME [--wait]     request a rotation now (as you: rekey.dev/requested-by)
//!   kubectl rekey wait NAME                wait for the requested rotation; non-zero on Failed
//!   kubectl rekey approve NAME             approve the rotation waiting for approval (as you)
//!   kubectl rekey confirm-invalidated NAME confirm a manual invalidation
//!   kubectl rekey history NAME             the last rotations
//!   kubectl rekey why NAME                 what blocks it, and what to do
//!   kubectl rekey rollback NAME            stop the rotation, write the previous value back
//!   kubectl rekey completion SHELL         shell completion script
//!
//! `-n NAMESPACE`, `-A` (status), `-o json` for scripts.
#![forbid(unsafe_code)]

mod show;
mod wait;
mod why;

use show::{ago, history_rows, phase, print_table, timeline};
use wait::wait_for_rotation;

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rekey::crd::keys::{
    APPROVE_ANNOTATION, APPROVED_BY_ANNOTATION, CONFIRM_ANNOTATION, REQUESTED_BY_ANNOTATION,
    ROLLBACK_ANNOTATION, ROTATE_ANNOTATION,
};
use rekey::crd::{Phase, SecretRotation};

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
    /// Request a rotation now (sets the rekey.dev/rotate annotation, and
    /// rekey.dev/requested-by to your user name as the API server knows it).
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
    /// Approve the rotation that waits in AwaitingApproval (sets
    /// rekey.dev/approve, and rekey.dev/approved-by to your user name).
    Approve { name: String },
    /// Confirm that the old value was invalidated by hand (manual source).
    ConfirmInvalidated { name: String },
    /// Show the last rotations with their phase durations.
    History { name: String },
    /// Say what the rotation waits for or why it failed, and what to do.
    Why { name: String },
    /// Stop the rotation in progress and write the previous value back
    /// where it was written (the rules of onFailure: Rollback). Refused
    /// once the old value is being invalidated.
    Rollback { name: String },
    /// Print a shell completion script (e.g. `kubectl rekey completion bash
    /// > /etc/bash_completion.d/kubectl-rekey`).
    Completion { shell: clap_complete::Shell },
}

async fn annotate(api: &Api<SecretRotation>, name: &str, key: &str, value: &str) -> Result<()> {
    annotate_as(api, name, key, value, None).await
}

/// Sets `key: value` and, with `by`, the annotation naming who did it
/// (`by.0: by.1`) in the same write: the chart's admission policy checks
/// them together.
async fn annotate_as(
    api: &Api<SecretRotation>,
    name: &str,
    key: &str,
    value: &str,
    by: Option<(&str, &str)>,
) -> Result<()> {
    let mut annotations = serde_json::Map::new();
    annotations.insert(key.into(), value.into());
    if let Some((by_key, user)) = by {
        annotations.insert(by_key.into(), user.into());
    }
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // A refusal (RBAC, the admission policy) is a sentence.
        Err(kube::Error::Api(s)) => bail!("annotate {name}: {} (HTTP {})", s.message, s.code),
        Err(e) => Err(e).with_context(|| format!("annotate {name}")),
    }
}

/// The caller's user name as the API server sees it (a SelfSubjectReview):
/// what the admission policy compares `requested-by` and `approved-by` with.
async fn whoami(client: &Client) -> Result<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("find out who you are (SelfSubjectReview, authentication.k8s.io/v1)")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .context("the API server's SelfSubjectReview names no user")
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
            let me = whoami(&client).await?;
            let by = Some((REQUESTED_BY_ANNOTATION, me.as_str()));
            annotate_as(&api, &name, ROTATE_ANNOTATION, &token, by).await?;
            if json && !wait {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "requested": token, "requestedBy": me})
                );
            } else if !json {
                println!(
                    "Rotation of {ns}/{name} requested by {me} ({ROTATE_ANNOTATION}={token})."
                );
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
            let me = whoami(&client).await?;
            let by = Some((APPROVED_BY_ANNOTATION, me.as_str()));
            annotate_as(&api, &name, APPROVE_ANNOTATION, &id, by).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "approved": id, "approvedBy": me})
                );
            } else {
                println!("Rotation {id} of {ns}/{name} approved by {me}.");
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
        Command::Why { name } => {
            let sr = get(&api, &ns, &name).await?;
            let answer = why::why(&sr, now);
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", answer.to_text());
            }
        }
        Command::Rollback { name } => {
            let id = rollback(&api, &ns, &name).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "rollbackRequested": id})
                );
            } else {
                println!(
                    "Rollback of rotation {id} of {ns}/{name} requested: rekey writes the previous value back where it was written and ends the rotation Failed (RollbackRequested). Follow it with: kubectl rekey wait {name}"
                );
            }
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "kubectl-rekey",
                &mut std::io::stdout(),
            );
        }
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    rekey::duration::parse(s).ok_or_else(|| format!("not a duration: {s} (e.g. 90s, 30m, 2h)"))
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

/// Requests a rollback of the rotation in progress, where rekey would serve
/// it (the same rule the controller applies: `decide::rollback_refusal`).
async fn rollback(api: &Api<SecretRotation>, ns: &str, name: &str) -> Result<String> {
    let sr = get(api, ns, name).await?;
    let status = sr.status.clone().unwrap_or_default();
    let Some(rot) = &status.rotation else {
        bail!("{name} has no rotation in progress: nothing to roll back");
    };
    let phase = status.phase.unwrap_or(Phase::Pending);
    if let Some(why) = rollback_refusal(&sr, rot, phase) {
        bail!(
            "rotation {} of {ns}/{name} cannot be rolled back in {phase}: {why}",
            rot.id
        );
    }
    annotate(api, name, ROLLBACK_ANNOTATION, &rot.id).await?;
    Ok(rot.id.clone())
}

/// Why the rotation `rot` of `sr` cannot be rolled back in `phase`, as the
/// controller decides it (`decide::rollback_refusal`); only Keycloak expires
/// the old value on its own timer.
fn rollback_refusal(
    sr: &SecretRotation,
    rot: &rekey::crd::RotationStatus,
    phase: Phase,
) -> Option<&'static str> {
    rekey::decide::rollback_refusal(
        phase,
        rot.invalidation_started,
        rot.issued_at.is_some(),
        sr.spec.credential.keycloak.is_some(),
    )
}
