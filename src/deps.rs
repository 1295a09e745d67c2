//! What providers (sources, stores, proofs) may use: a Kubernetes client, an
//! HTTP client, the metrics, and a reader for Secrets they reference. Never
//! the machine's context, so imports run one way: providers know nothing of
//! the machine that drives them.

use std::time::Duration;

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
        }
    }

    /// Reads one key of a Secret in `namespace` as a value.
    pub async fn secret_key(&self, namespace: &str, name: &str, key: &str) -> Result<SecretValue> {
        read_secret_key(&self.client, namespace, name, key).await
    }
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
