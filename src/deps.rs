//! What providers (sources, stores, proofs) may use: a Kubernetes client, an
//! HTTP client, the metrics, and a reader for Secrets they reference. Never
//! the machine's context, so imports run one way: providers know nothing of
//! the machine that drives them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reason::Reason;
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
        }
    }

    /// Reads one key of a Secret in `namespace` as a value.
    pub async fn secret_key(&self, namespace: &str, name: &str, key: &str) -> Result<SecretValue> {
        read_secret_key(&self.client, namespace, name, key).await
    }
}

/// An IBM Secrets Manager instance answers 429 above its request limit, and
/// ESO and the applications read the same instance: rekey keeps to 5
/// requests per second per instance. A rotation makes 6 calls, so this
/// still rotates 50 secrets of one instance a minute.
pub const DEFAULT_IBM_REQUESTS_PER_SECOND: f64 = 5.0;

/// Bearer tokens by a key the provider chooses (e.g. the token URL and a
/// digest of the credential), each until its refresh time.
#[derive(Clone, Default)]
pub struct Tokens(Arc<Mutex<HashMap<String, (SecretValue, Instant)>>>);

impl Tokens {
    /// The token under `key`, unless it is due for refresh.
    pub fn get(&self, key: &str) -> Option<SecretValue> {
        let tokens = self.0.lock().unwrap();
        let (token, refresh_after) = tokens.get(key)?;
        (Instant::now() < *refresh_after).then(|| token.clone())
    }

    pub fn put(&self, key: &str, token: SecretValue, refresh_after: Instant) {
        self.0
            .lock()
            .unwrap()
            .insert(key.to_string(), (token, refresh_after));
    }

    /// Drops a token the service refused.
    pub fn forget(&self, key: &str) {
        self.0.lock().unwrap().remove(key);
    }
}

/// Spaces requests to one service instance (by key) at least
/// `1 / per_second` apart, so no window of one second holds more than
/// `per_second` of them. 0 or less: no pacing.
#[derive(Clone)]
pub struct Pace {
    interval: Option<Duration>,
    next_free: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Pace {
    pub fn new(per_second: f64) -> Self {
        Self {
            // 10% apart more than the rate asks: jitter on the way must not
            // put one request too many into a second at the service.
            interval: (per_second > 0.0).then(|| Duration::from_secs_f64(1.1 / per_second)),
            next_free: Arc::default(),
        }
    }

    /// Waits for this request's turn at `key`.
    pub async fn wait(&self, key: &str) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next_free = self.next_free.lock().unwrap();
            let (slot, next) = next_slot(Instant::now(), next_free.get(key).copied(), interval);
            next_free.insert(key.to_string(), next);
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// When a request may go (`now`, or the key's next free slot when later),
/// and the slot after it.
pub fn next_slot(
    now: Instant,
    next_free: Option<Instant>,
    interval: Duration,
) -> (Instant, Instant) {
    let slot = next_free.map_or(now, |n| n.max(now));
    (slot, slot + interval)
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
    fn paced_requests_keep_their_interval_and_an_idle_key_goes_at_once() {
        let t0 = Instant::now();
        let gap = Duration::from_millis(200);
        let (first, next) = next_slot(t0, None, gap);
        assert_eq!(first, t0);
        // Five requests at the same moment: 0, 200, 400, 600, 800 ms.
        let mut free = Some(next);
        let mut slots = vec![first];
        for _ in 0..4 {
            let (slot, next) = next_slot(t0, free, gap);
            slots.push(slot);
            free = Some(next);
        }
        assert_eq!(slots[4] - t0, Duration::from_millis(800));
        // A request long after the last one does not wait.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(next_slot(later, free, gap).0, later);
    }
}
