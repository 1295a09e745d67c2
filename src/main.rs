#![forbid(unsafe_code)]
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;

#[derive(Parser)]
#[command(
    name = "rekey",
    version,
    about = "Rotates credentials end to end, with proof"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print the SecretRotation CRD as YAML.
    Crd,
    /// Run the controller (uses KUBECONFIG or the in-cluster service account).
    Run {
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, env = "REKEY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Watch only these namespaces (comma-separated); empty: the whole cluster.
        #[arg(long, env = "REKEY_NAMESPACES", value_delimiter = ',')]
        namespaces: Vec<String>,
        /// How long a waiting rotation sleeps when no watch event wakes it,
        /// e.g. 30s: a safety net, since watches on what it waits for wake it.
        #[arg(long, env = "REKEY_POLL", default_value = "30s", value_parser = parse_duration)]
        poll: Duration,
        /// Merge the wake-ups of one SecretRotation that arrive within this
        /// long into one reconcile, e.g. 100ms; 0s: none.
        #[arg(long, env = "REKEY_DEBOUNCE", default_value = "0s", value_parser = parse_duration)]
        debounce: Duration,
        /// Log format: text or json.
        #[arg(long, env = "REKEY_LOG_FORMAT", default_value = "text")]
        log_format: String,
        /// Hosts that SecretRotations may send credentials to (webhook,
        /// Keycloak, IBM and AWS endpoint URLs), comma-separated; `*.suffix`
        /// matches subdomains. Empty: any host.
        #[arg(long, env = "REKEY_ALLOWED_HOSTS", value_delimiter = ',')]
        allowed_hosts: Vec<String>,
        /// Rotations that may start at once (then --starts-per-minute).
        #[arg(long, env = "REKEY_START_BURST", default_value_t = 20)]
        start_burst: u32,
        /// Rotations that may start per minute after the burst; 0: no limit.
        #[arg(long, env = "REKEY_STARTS_PER_MINUTE", default_value_t = 60)]
        starts_per_minute: u32,
        /// Requests per second rekey sends to one IBM Secrets Manager
        /// instance (ESO and the applications share its limit); 0: no limit.
        #[arg(long, env = "REKEY_IBM_REQUESTS_PER_SECOND", default_value_t = rekey::deps::DEFAULT_IBM_REQUESTS_PER_SECOND)]
        ibm_requests_per_second: f64,
        /// Reconciles that may run at once (per watched namespace).
        #[arg(long, env = "REKEY_MAX_CONCURRENT_RECONCILES", default_value_t = 16)]
        max_concurrent_reconciles: u16,
        /// Enable leader election on a Lease in this namespace (for replicas > 1).
        #[arg(long, env = "REKEY_LEADER_ELECTION_NAMESPACE")]
        leader_election_namespace: Option<String>,
        /// How long a leader's renewal holds the lease; a standby takes it
        /// after seeing it unrenewed this long.
        #[arg(long, env = "REKEY_LEADER_LEASE_DURATION", default_value = "10s", value_parser = parse_duration)]
        leader_lease_duration: Duration,
        /// A leader that could not renew for this long exits (shorter than
        /// the lease duration).
        #[arg(long, env = "REKEY_LEADER_RENEW_DEADLINE", default_value = "6s", value_parser = parse_duration)]
        leader_renew_deadline: Duration,
        /// How often the leader renews and a standby looks (shorter than
        /// the renew deadline).
        #[arg(long, env = "REKEY_LEADER_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
        leader_retry_period: Duration,
        /// The longest a side effect (issue, store write, restart,
        /// invalidation) may take under leader election: it starts only
        /// while the lease outlives it, and is cut at it. Shorter than the
        /// lease duration minus the retry period. Default: lease duration −
        /// renew deadline + 1.5 × retry period (8s for the defaults).
        #[arg(long, env = "REKEY_LEADER_CALL_TIMEOUT", value_parser = parse_duration)]
        leader_call_timeout: Option<Duration>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    rekey::duration::parse(s).ok_or_else(|| format!("not a duration: {s}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rekey::install_crypto_provider();
    match Cli::parse().command {
        Command::Crd => {
            print!(
                "{}",
                serde_yaml::to_string(&rekey::crd::SecretRotation::crd())?
            );
        }
        Command::Run {
            metrics_addr,
            namespaces,
            poll,
            log_format,
            leader_election_namespace,
            allowed_hosts,
            start_burst,
            starts_per_minute,
            ibm_requests_per_second,
            max_concurrent_reconciles,
            debounce,
            leader_lease_duration,
            leader_renew_deadline,
            leader_retry_period,
            leader_call_timeout,
        } => {
            // Checked before anything starts: a wrong combination is a
            // configuration error, not something to find at the first failover.
            let timings = rekey::leader::Timings::new(
                leader_lease_duration,
                leader_renew_deadline,
                leader_retry_period,
                leader_call_timeout,
            )
            .map_err(anyhow::Error::msg)?;
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
            if log_format == "json" {
                tracing_subscriber::fmt()
                    .json()
                    .with_env_filter(filter)
                    .init();
            } else {
                tracing_subscriber::fmt().with_env_filter(filter).init();
            }
            // Named in the API server's audit log and metrics as `rekey/<version>`.
            let mut config = kube::Config::infer().await?;
            config.headers.push((
                reqwest::header::USER_AGENT,
                reqwest::header::HeaderValue::from_static(concat!(
                    "rekey/",
                    env!("CARGO_PKG_VERSION")
                )),
            ));
            let client = kube::Client::try_from(config)?;
            let metrics = rekey::metrics::Metrics::new();
            let mut deps = rekey::deps::Deps::new(client, metrics.clone());
            deps.ibm_pace = rekey::deps::Pace::new(ibm_requests_per_second);
            let mut ctx = rekey::machine::Context::new(deps, poll);
            ctx.allowed_hosts = (!allowed_hosts.is_empty()).then_some(allowed_hosts);
            ctx.start_rate = (starts_per_minute > 0).then_some(rekey::decide::StartRate {
                burst: start_burst.max(1),
                per_minute: starts_per_minute,
            });
            tracing::info!(%metrics_addr, ?namespaces, "rekey starting");
            let ready = rekey::server::Readiness::default();
            let leader = metrics.leader.clone();
            let serve = tokio::spawn(rekey::server::serve(metrics_addr, metrics, ready.clone()));
            if let Some(ns) = leader_election_namespace {
                // A standby is ready to take over; the leader is ready once
                // it has listed the SecretRotations.
                ready.set(true);
                leader.set(0);
                let identity = std::env::var("POD_NAME")
                    .unwrap_or_else(|_| format!("rekey-{:08x}", rand::random::<u32>()));
                let election =
                    rekey::leader::LeaderElection::new(ctx.client.clone(), &ns, &identity, timings);
                ctx.fence = election.fence();
                election.acquire_and_hold().await;
                ready.set(false);
            }
            // This replica reconciles from now on (a leader that loses its
            // lease exits).
            leader.set(1);
            tokio::select! {
                r = serve => r??,
                _ = rekey::machine::run(ctx, namespaces, max_concurrent_reconciles.max(1), debounce, ready) => {},
            }
        }
    }
    Ok(())
}
