//! What providers (sources, stores, proofs) may use: a Kubernetes client, an
//! HTTP client, the metrics, and a reader for Secrets they reference. Never
//! the machine's context, so imports run one way: providers know nothing of
//! the machine that drives them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_secretsmanager::config::{IdentityCache, SharedIdentityCache};
use aws_smithy_async::time::SharedTimeSource;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::remote::RemoteClients;
use crate::value::SecretValue;

/// The narrow dependency set handed to every provider.
#[derive(Clone)]
pub struct Deps {
    pub client: Client,
    pub http: reqwest::Client,
    pub metrics: Metrics,
    /// Bearer tokens, shared by the providers built for every reconcile.
    pub tokens: Tokens,
    /// Paces the requests to each IBM Secrets Manager instance.
    pub ibm_pace: Pace,
    /// AWS credentials assumed with ServiceAccount tokens, shared by the
    /// stores built for every reconcile.
    pub aws: AwsIdentities,
    /// Clients of the remote clusters of `proof.clusters`, per kubeconfig.
    pub remotes: Arc<RemoteClients>,
}

impl Deps {
    pub fn new(client: Client, metrics: Metrics) -> Self {
        Self {
            client,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            metrics,
            tokens: Tokens::default(),
            ibm_pace: Pace::new(DEFAULT_IBM_REQUESTS_PER_SECOND),
            aws: AwsIdentities::new(SharedTimeSource::default()),
            remotes: Arc::default(),
        }
    }

    /// Reads one key of a Secret in `namespace` as a value.
    pub async fn secret_key(&self, namespace: &str, name: &str, key: &str) -> Result<SecretValue> {
        read_secret_key(&self.client, namespace, name, key).await
    }

    /// The clock AWS credentials are judged by (a test injects its own).
    pub fn with_aws_time_source(mut self, time: SharedTimeSource) -> Self {
        self.aws = AwsIdentities::new(time);
        self
    }

    /// A short-lived token of ServiceAccount `name` in `namespace` for `audience`.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
    ) -> Result<SecretValue> {
        service_account_token(&self.client, namespace, name, audience).await
    }
}

/// How long a requested ServiceAccount token lives: it is exchanged at once,
/// and 10 minutes is the least the API server grants.
pub const SERVICE_ACCOUNT_TOKEN_SECONDS: i64 = 600;

/// Requests a token of ServiceAccount `name` in `namespace` for `audience`
/// (TokenRequest API, `create` on `serviceaccounts/token`). The identity of
/// a namespace's workloads, never the operator's own: a SecretRotation can
/// only name ServiceAccounts of its own namespace.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    name: &str,
    audience: &str,
) -> Result<SecretValue> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(SERVICE_ACCOUNT_TOKEN_SECONDS),
            bound_object_ref: None,
        }),
        ..Default::default()
    };
    let answer = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            Error::kube(
                &format!("request a token of ServiceAccount {namespace}/{name}"),
                e,
            )
        })?;
    answer
        .status
        .and_then(|s| s.token)
        .map(SecretValue::new)
        .filter(|t| !t.expose().is_empty())
        .ok_or_else(|| {
            Error::permanent(
                Reason::KubernetesApiError,
                format!("the API server answered no token for ServiceAccount {namespace}/{name}"),
            )
        })
}

/// AWS credentials are refreshed when they have less than this left (the
/// SDK's lazy cache moves the point by a random jitter of up to half of it
/// towards expiry: at the latest 150 s before), so no rotation's call runs
/// on credentials about to lapse.
pub const AWS_REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);

/// AWS credential providers by identity (namespace, ServiceAccount, role,
/// region, endpoints), and the SDK's lazy identity cache they share: each
/// provider is one cache partition, loaded on first use and again before
/// its credentials expire, whichever reconcile asks.
#[derive(Clone)]
pub struct AwsIdentities {
    pub cache: SharedIdentityCache,
    pub time: SharedTimeSource,
    providers: Arc<Mutex<HashMap<String, SharedCredentialsProvider>>>,
}

impl AwsIdentities {
    pub fn new(time: SharedTimeSource) -> Self {
        Self {
            cache: IdentityCache::lazy()
                .time_source(time.clone())
                .buffer_time(AWS_REFRESH_BEFORE_EXPIRY)
                .max_partitions(4096)
                .build(),
            time,
            providers: Arc::default(),
        }
    }

    /// The provider under `key`, made by `make` the first time.
    pub fn provider(
        &self,
        key: &str,
        make: impl FnOnce() -> SharedCredentialsProvider,
    ) -> SharedCredentialsProvider {
        self.providers
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_insert_with(make)
            .clone()
    }
}

/// An IBM Secrets Manager instance answers 429 above its request limit, and
/// ESO and the applications read the same instance: rekey keeps to 5
/// requests per second per instance. A rotation makes 6 calls, so this
/// still rotates 50 secrets of one instance a minute.
pub const DEFAULT_IBM_REQUESTS_PER_SECOND: f64 = 5.0;

/// One async lock per key (e.g. per service instance): who holds a key's
/// lock has its turn; the others wait, first come, first served.
struct Turns<T>(Mutex<HashMap<String, Arc<tokio::sync::Mutex<T>>>>);

impl<T: Default> Default for Turns<T> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T: Default> Turns<T> {
    async fn take(&self, key: &str) -> tokio::sync::OwnedMutexGuard<T> {
        let turn = self
            .0
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .clone();
        turn.lock_owned().await
    }
}

/// Bearer tokens by a key the provider chooses (e.g. the token URL and a
/// digest of the credential), each until its refresh time.
#[derive(Clone, Default)]
pub struct Tokens {
    tokens: Arc<Mutex<HashMap<String, (SecretValue, Instant)>>>,
    fetching: Arc<Turns<()>>,
}

impl Tokens {
    /// Held while a token for `key` is fetched, so that rotations that need
    /// one at the same moment fetch it once (the others find it cached).
    pub async fn fetch_turn(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.fetching.take(key).await
    }

    /// The token under `key`, unless it is due for refresh.
    pub fn get(&self, key: &str) -> Option<SecretValue> {
        let tokens = self.tokens.lock().unwrap();
        let (token, refresh_after) = tokens.get(key)?;
        (Instant::now() < *refresh_after).then(|| token.clone())
    }

    pub fn put(&self, key: &str, token: SecretValue, refresh_after: Instant) {
        self.tokens
            .lock()
            .unwrap()
            .insert(key.to_string(), (token, refresh_after));
    }

    /// Drops a token the service refused.
    pub fn forget(&self, key: &str) {
        self.tokens.lock().unwrap().remove(key);
    }
}

/// Spaces requests to one service instance (by key) at least
/// `1.1 / per_second` apart, measured when each is sent, so no window of one
/// second holds more than `per_second` of them (the 10% absorbs jitter on
/// the way). Requests to one key wait in turn (first come, first served).
/// 0 or less: no pacing.
#[derive(Clone)]
pub struct Pace {
    interval: Option<Duration>,
    /// Per key: when its last request was sent.
    last_sent: Arc<Turns<Option<TokioInstant>>>,
}

impl Pace {
    pub fn new(per_second: f64) -> Self {
        Self {
            interval: (per_second > 0.0).then(|| Duration::from_secs_f64(1.1 / per_second)),
            last_sent: Arc::default(),
        }
    }

    /// Waits for this request's turn at `key`; the request is sent when
    /// this returns.
    pub async fn wait(&self, key: &str) {
        let Some(interval) = self.interval else {
            return;
        };
        let mut last = self.last_sent.take(key).await;
        tokio::time::sleep_until(next_slot(TokioInstant::now(), *last, interval)).await;
        *last = Some(TokioInstant::now());
    }
}

/// When a request may go: `now`, or `interval` after the last one sent to
/// the same key when that is later.
pub fn next_slot(
    now: TokioInstant,
    last_sent: Option<TokioInstant>,
    interval: Duration,
) -> TokioInstant {
    last_sent.map_or(now, |l| (l + interval).max(now))
}

/// The one outcome-label vocabulary of provider calls.
pub fn outcome(ok: bool) -> &'static str {
    if ok { "success" } else { "error" }
}

/// Reads one key of a Secret in `namespace` as a value.
pub async fn read_secret_key(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<SecretValue> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| Error::kube("read referenced Secret", e))?
        .ok_or_else(|| {
            Error::permanent(
                Reason::SecretNotFound,
                format!("Secret {namespace}/{name} not found"),
            )
        })?;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| SecretValue::from_bytes(&b.0))
        .filter(|v| !v.expose().is_empty())
        .ok_or_else(|| {
            Error::permanent(
                Reason::SecretKeyMissing,
                format!("Secret {namespace}/{name} has no non-empty key {key}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_its_interval_after_the_last_one_and_an_idle_key_goes_at_once() {
        let t0 = TokioInstant::now();
        let gap = Duration::from_millis(220);
        assert_eq!(next_slot(t0, None, gap), t0);
        let sent = t0 + Duration::from_millis(50);
        assert_eq!(next_slot(t0, Some(sent), gap), sent + gap);
        // Long after the last request: no wait.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(next_slot(later, Some(sent), gap), later);
    }

    #[tokio::test(start_paused = true)]
    async fn paced_requests_to_one_key_never_exceed_the_rate_in_any_second() {
        let pace = Pace::new(5.0);
        let sent = Arc::new(Mutex::new(vec![]));
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (pace, sent) = (pace.clone(), sent.clone());
                tokio::spawn(async move {
                    pace.wait("instance").await;
                    sent.lock().unwrap().push(tokio::time::Instant::now());
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut sent = sent.lock().unwrap().clone();
        sent.sort();
        for w in sent.windows(6) {
            assert!(
                w[5] - w[0] >= Duration::from_secs(1),
                "six requests within a second"
            );
        }
        // Another instance is not held up by this one.
        let started = tokio::time::Instant::now();
        pace.wait("other").await;
        assert_eq!(tokio::time::Instant::now(), started);
    }
}
