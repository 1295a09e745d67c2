//! `ibmSecretsManager` target: IBM Cloud Secrets Manager v2.
//!
//! Auth: the API key, or a trusted profile's ServiceAccount token (grant
//! type `cr-token`: a TokenRequest with audience `iam` for a ServiceAccount
//! of the SecretRotation's namespace), is exchanged at
//! `POST {iamUrl}/identity/token` for a bearer token, cached until a minute
//! before it expires. Writing creates a
//! new secret version stamped with `version_custom_metadata.rekey_rotation_id`;
//! before writing, the current version's metadata is read and the write is
//! skipped when it already carries this rotation id, so a retry after a crash
//! never creates a second version. Errors map to fixed reasons; response
//! bodies are never read into them.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::Store;
use crate::crd::IbmSecretsManagerTarget;
use crate::deps::{Pace, Tokens};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::value::SecretValue;

const PROVIDER: &str = "ibm-secrets-manager";
/// Key of the version metadata that names the rotation which wrote a version.
pub const ROTATION_METADATA_KEY: &str = "rekey_rotation_id";

pub struct IbmSecretsManagerStore {
    http: reqwest::Client,
    metrics: Metrics,
    service_url: String,
    iam_url: String,
    auth: IbmAuth,
    target: IbmSecretsManagerTarget,
    /// IAM tokens (shared across reconciles by `shared`), under `token_key`.
    tokens: Tokens,
    token_key: String,
    /// Paces the requests to this instance.
    pace: Pace,
    /// The secret id, once resolved (from `secretId`, or by group/type/name).
    secret_id: Mutex<Option<String>>,
}

/// The audience of the ServiceAccount tokens rekey hands to IBM IAM (as
/// IBM's examples project them for trusted profiles).
pub const IAM_AUDIENCE: &str = "iam";

/// How rekey gets an IAM token.
pub enum IbmAuth {
    /// An API key (`apiKeySecretRef`).
    ApiKey(SecretValue),
    /// A trusted profile assumed with a token of a ServiceAccount of the
    /// SecretRotation's namespace (`trustedProfile`).
    TrustedProfile {
        client: kube::Client,
        namespace: String,
        service_account: String,
        profile_id: String,
    },
}

/// What the current version holds, as far as rekey cares.
struct Current {
    secret_type: String,
    value: Option<SecretValue>,
    /// kv secrets: the whole data map (other keys are kept on write).
    data: Option<serde_json::Map<String, Value>>,
}

impl IbmSecretsManagerStore {
    pub fn new(
        http: reqwest::Client,
        metrics: Metrics,
        target: &IbmSecretsManagerTarget,
        api_key: SecretValue,
    ) -> Self {
        Self::with_auth(http, metrics, target, IbmAuth::ApiKey(api_key))
    }

    pub fn with_auth(
        http: reqwest::Client,
        metrics: Metrics,
        target: &IbmSecretsManagerTarget,
        auth: IbmAuth,
    ) -> Self {
        let token_key = token_key(&target.iam_url, &auth);
        Self {
            http,
            metrics,
            service_url: target.service_url.trim_end_matches('/').to_string(),
            iam_url: target
                .iam_url
                .trim_end_matches('/')
                .trim_end_matches("/identity/token")
                .to_string(),
            auth,
            target: target.clone(),
            tokens: Tokens::default(),
            token_key,
            pace: Pace::new(0.0),
            secret_id: Mutex::new(target.secret_id.clone()),
        }
    }

    /// Shares IAM tokens and the request pace with every other store of
    /// the process (the machine builds a store per reconcile).
    pub fn shared(mut self, tokens: Tokens, pace: Pace) -> Self {
        self.tokens = tokens;
        self.pace = pace;
        self
    }

    async fn bearer(&self) -> Result<SecretValue> {
        if let Some(token) = self.tokens.get(&self.token_key) {
            return Ok(token);
        }
        let _turn = self.tokens.fetch_turn(&self.token_key).await;
        // Another rotation may have fetched it while this one waited.
        if let Some(token) = self.tokens.get(&self.token_key) {
            return Ok(token);
        }
        // The ServiceAccount token of a trusted profile, requested anew for
        // every exchange (it lives 10 minutes; the IAM token an hour).
        let cr_token = match &self.auth {
            IbmAuth::ApiKey(_) => None,
            IbmAuth::TrustedProfile {
                client,
                namespace,
                service_account,
                ..
            } => Some(
                crate::deps::service_account_token(
                    client,
                    namespace,
                    service_account,
                    IAM_AUDIENCE,
                )
                .await?,
            ),
        };
        let (form, refused) = match (&self.auth, &cr_token) {
            (IbmAuth::ApiKey(key), _) => (
                vec![
                    ("grant_type", "urn:ibm:params:oauth:grant-type:apikey"),
                    ("apikey", key.expose()),
                ],
                "the API key".to_string(),
            ),
            (
                IbmAuth::TrustedProfile {
                    namespace,
                    service_account,
                    profile_id,
                    ..
                },
                token,
            ) => (
                vec![
                    ("grant_type", "urn:ibm:params:oauth:grant-type:cr-token"),
                    ("cr_token", token.as_ref().map_or("", |t| t.expose())),
                    ("profile_id", profile_id.as_str()),
                ],
                format!(
                    "the ServiceAccount token of {namespace}/{service_account} for trusted profile {profile_id}"
                ),
            ),
        };
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}/identity/token", self.iam_url))
            .header("Accept", "application/json")
            .form(&form)
            .send()
            .await;
        let outcome = crate::deps::outcome(resp.as_ref().is_ok_and(|r| r.status().is_success()));
        self.metrics
            .provider_call("ibm-iam", "token", outcome, started.elapsed());
        let resp =
            resp.map_err(|e| Error::http(Reason::IbmIamUnreachable, "IBM IAM token request", &e))?;
        let status = resp.status();
        if status.is_client_error() {
            return Err(Error::permanent(
                Reason::IbmCredentialsRejected,
                format!("IBM IAM refused {refused} (HTTP {})", status.as_u16()),
            ));
        }
        if !status.is_success() {
            return Err(Error::transient(
                Reason::IbmIamError,
                format!("IBM IAM answered HTTP {}", status.as_u16()),
            ));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: Option<u64>,
        }
        let body: TokenResponse = resp.json().await.map_err(|_| {
            Error::transient(
                Reason::IbmIamError,
                "IBM IAM answered without an access token",
            )
        })?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(3600));
        let value = SecretValue::new(body.access_token);
        self.tokens.put(
            &self.token_key,
            value.clone(),
            Instant::now() + lifetime.saturating_sub(Duration::from_secs(60)),
        );
        Ok(value)
    }

    /// One API call, retried with backoff and jitter on 429 and 5xx.
    async fn call(
        &self,
        method: Method,
        path: &str,
        call: &'static str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut delay = Duration::from_millis(300);
        for attempt in 1..=4 {
            let token = self.bearer().await?;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.service_url))
                .bearer_auth(token.expose())
                .header("Accept", "application/json");
            if let Some(b) = body {
                req = req.json(b);
            }
            self.pace.wait(&self.service_url).await;
            let started = Instant::now();
            let resp = req.send().await;
            let status = resp.as_ref().map(|r| r.status()).ok();
            let outcome = crate::deps::outcome(status.is_some_and(|s| s.is_success()));
            self.metrics
                .provider_call(PROVIDER, call, outcome, started.elapsed());
            // Only reads are retried here: a POST that timed out may have
            // created a version; the caller re-checks before creating again.
            let retryable = method == Method::GET
                && match &resp {
                    Err(_) => true,
                    Ok(r) => {
                        r.status() == StatusCode::TOO_MANY_REQUESTS
                            || r.status().is_server_error()
                            || r.status() == StatusCode::UNAUTHORIZED
                    }
                };
            if resp
                .as_ref()
                .is_ok_and(|r| r.status() == StatusCode::UNAUTHORIZED)
            {
                // An expired or revoked token: forget it, the next attempt gets a new one.
                self.tokens.forget(&self.token_key);
            }
            if retryable && attempt < 4 {
                let jitter = Duration::from_millis(
                    rand::random::<u64>() % (delay.as_millis() as u64 / 2 + 1),
                );
                tokio::time::sleep(delay + jitter).await;
                delay *= 2;
                continue;
            }
            let resp = resp.map_err(|e| {
                Error::http(
                    Reason::IbmSecretsManagerUnreachable,
                    &format!("IBM Secrets Manager {call}"),
                    &e,
                )
            })?;
            let status = resp.status();
            if status.is_success() {
                return resp.json().await.map_err(|_| {
                    Error::transient(
                        Reason::IbmSecretsManagerError,
                        format!("IBM Secrets Manager {call}: response is not JSON"),
                    )
                });
            }
            return Err(map_status(status, call, &self.target));
        }
        unreachable!("the last attempt returns")
    }

    async fn secret_id(&self) -> Result<String> {
        let mut id = self.secret_id.lock().await;
        if let Some(id) = id.as_ref() {
            return Ok(id.clone());
        }
        let name = self.target.secret_name.as_deref().unwrap_or_default();
        let path = format!(
            "/api/v2/secret_groups/{}/secret_types/{}/secrets/{name}",
            self.target.secret_group.as_deref().unwrap_or("default"),
            self.target.secret_type.as_deref().unwrap_or("arbitrary"),
        );
        let secret = self
            .call(Method::GET, &path, "get_secret_by_name", None)
            .await?;
        let found = secret["id"]
            .as_str()
            .ok_or_else(|| {
                Error::permanent(
                    Reason::IbmSecretsManagerError,
                    "secret lookup by name returned no id",
                )
            })?
            .to_string();
        *id = Some(found.clone());
        Ok(found)
    }

    async fn current(&self) -> Result<Current> {
        let id = self.secret_id().await?;
        // The parsed answer is wiped when dropped; the value is kept in a
        // SecretValue (and a kv secret's data for the next version's body).
        let secret = crate::value::WipedJson(
            self.call(
                Method::GET,
                &format!("/api/v2/secrets/{id}"),
                "get_secret",
                None,
            )
            .await?,
        );
        let secret = &secret.0;
        let secret_type = secret["secret_type"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (value, data) = match secret_type.as_str() {
            "arbitrary" => (secret["payload"].as_str().map(SecretValue::new), None),
            "username_password" => (secret["password"].as_str().map(SecretValue::new), None),
            "kv" => {
                let data = secret["data"].as_object().cloned().unwrap_or_default();
                let key = self.target.key.as_deref().unwrap_or_default();
                (
                    data.get(key).and_then(Value::as_str).map(SecretValue::new),
                    Some(data),
                )
            }
            other => {
                return Err(Error::permanent(
                    Reason::IbmUnsupportedSecretType,
                    format!(
                        "IBM secret {id} has type {other}; rekey writes arbitrary, kv and username_password secrets"
                    ),
                ));
            }
        };
        Ok(Current {
            secret_type,
            value,
            data,
        })
    }
}

fn map_status(status: StatusCode, call: &str, target: &IbmSecretsManagerTarget) -> Error {
    let what = target
        .secret_id
        .as_deref()
        .or(target.secret_name.as_deref())
        .unwrap_or("?");
    match status.as_u16() {
        401 | 403 => Error::permanent(
            Reason::IbmCredentialsRejected,
            format!(
                "IBM Secrets Manager {call}: the API key may not access secret {what} (HTTP {})",
                status.as_u16()
            ),
        ),
        404 => Error::permanent(
            Reason::IbmSecretNotFound,
            format!("IBM Secrets Manager {call}: secret {what} not found"),
        ),
        412 => Error::permanent(
            Reason::IbmSecretLocked,
            format!(
                "IBM Secrets Manager {call}: secret {what} has a locked version; remove the lock or rotate later"
            ),
        ),
        429 => Error::transient(
            Reason::IbmRateLimited,
            format!("IBM Secrets Manager {call}: rate limited"),
        ),
        s if s >= 500 => Error::transient(
            Reason::IbmSecretsManagerError,
            format!("IBM Secrets Manager {call}: HTTP {s}"),
        ),
        s => Error::permanent(
            Reason::IbmSecretsManagerRejected,
            format!("IBM Secrets Manager {call}: HTTP {s}"),
        ),
    }
}

#[async_trait]
impl Store for IbmSecretsManagerStore {
    async fn read_current(&self) -> Result<Option<SecretValue>> {
        let mut current = self.current().await?;
        // A kv secret's other keys are not needed here: wiped.
        if let Some(data) = &mut current.data {
            data.values_mut().for_each(crate::value::wipe_json);
        }
        Ok(current.value)
    }

    async fn write(&self, value: &SecretValue, rotation_id: &str) -> Result<String> {
        let id = self.secret_id().await?;
        let meta_path = format!("/api/v2/secrets/{id}/versions/current/metadata");
        let meta = self
            .call(Method::GET, &meta_path, "get_version_metadata", None)
            .await?;
        if meta["version_custom_metadata"][ROTATION_METADATA_KEY].as_str() == Some(rotation_id) {
            return Ok(meta["id"].as_str().unwrap_or_default().to_string());
        }
        let current = self.current().await?;
        let metadata = json!({ ROTATION_METADATA_KEY: rotation_id });
        // The request body is wiped when dropped, sent or not.
        let body = crate::value::WipedJson(match current.secret_type.as_str() {
            "kv" => {
                let mut data = current.data.unwrap_or_default();
                data.insert(
                    self.target.key.clone().unwrap_or_default(),
                    Value::String(value.expose().into()),
                );
                json!({"data": data, "version_custom_metadata": metadata})
            }
            "username_password" => {
                json!({"password": value.expose(), "version_custom_metadata": metadata})
            }
            _ => json!({"payload": value.expose(), "version_custom_metadata": metadata}),
        });
        let created = self
            .call(
                Method::POST,
                &format!("/api/v2/secrets/{id}/versions"),
                "create_version",
                Some(&body.0),
            )
            .await?;
        // A new version is the current one once created (IBM's version
        // model); the final re-check before invalidation reads the store
        // again, so a version that is not current never lets the old value die.
        Ok(created["id"].as_str().unwrap_or_default().to_string())
    }

    async fn preflight(&self) -> Result<Option<SecretValue>> {
        let current = self.current().await?;
        if current.secret_type == "kv" && self.target.key.is_none() {
            return Err(Error::permanent(
                Reason::InvalidSpec,
                "ibmSecretsManager: a kv secret needs `key`",
            ));
        }
        Ok(current.value)
    }
}

/// The key of an IAM token: the IAM URL and a digest of the API key (the
/// key itself is never a map key), or the trusted profile and its
/// ServiceAccount.
fn token_key(iam_url: &str, auth: &IbmAuth) -> String {
    use std::hash::BuildHasher;
    static SEED: std::sync::LazyLock<std::collections::hash_map::RandomState> =
        std::sync::LazyLock::new(Default::default);
    match auth {
        IbmAuth::ApiKey(key) => format!("{iam_url} {:016x}", SEED.hash_one(key.expose())),
        IbmAuth::TrustedProfile {
            namespace,
            service_account,
            profile_id,
            ..
        } => format!("{iam_url} profile {profile_id} {namespace}/{service_account}"),
    }
}
