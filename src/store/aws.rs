//! `awsSecretsManager` target, with the official AWS SDK for Rust (measured:
//! +11 s of cold debug build over hand-signed SigV4 requests with reqwest, for
//! AWS's own retry, signing and error model).
//!
//! Writing follows AWS's staging-label model in one call: the new value
//! becomes a version whose `ClientRequestToken` (= version id) is derived
//! from the rotation id; a version written without stages becomes
//! `AWSCURRENT` and AWS labels the old one `AWSPREVIOUS`. A retry finds the
//! version by its id and creates nothing. Rollback moves `AWSCURRENT` back to
//! the `AWSPREVIOUS` version. A rotation makes 6 calls: 2 reads at
//! Preflight, 1 at Issuing (the previous value), `DescribeSecret` and one
//! `PutSecretValue` when writing, 1 read in the final re-check.
//!
//! Identity: static keys from a Secret, or a ServiceAccount of the
//! SecretRotation's namespace that assumes a role ([`WebIdentity`]): a
//! TokenRequest (audience `sts.amazonaws.com`) exchanged with STS
//! AssumeRoleWithWebIdentity, behind the SDK's lazy identity cache shared by
//! every reconcile ([`crate::deps::AwsIdentities`]). There is no default
//! credential chain: rekey never acts with the operator pod's own identity.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};

use super::Store;
use crate::crd::AwsSecretsManagerTarget;
use crate::deps::AwsIdentities;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::value::SecretValue;

const PROVIDER: &str = "aws-secrets-manager";

/// Bounds on every AWS call (the SDK sets none on reading an answer): a
/// store that accepts a connection and never answers fails the call, and
/// the rotation retries it with backoff, saying so, instead of hanging.
/// Each attempt 10 s, the whole call with the SDK's retries 30 s, as the
/// IBM and webhook HTTP client's 30 s.
fn timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(30))
        .build()
}
const CURRENT: &str = "AWSCURRENT";
const PREVIOUS: &str = "AWSPREVIOUS";

pub struct AwsSecretsManagerStore {
    client: Client,
    metrics: Metrics,
    secret_id: String,
    key: Option<String>,
}

/// The version id (ClientRequestToken, 32 to 64 characters) of a rotation.
pub fn version_id(rotation_id: &str) -> String {
    format!("rekey-rotation-{rotation_id}")
}

/// The audience of the ServiceAccount tokens rekey hands to STS.
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

fn map_err<E, R>(call: &str, secret: &str, e: &SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    // Credentials that could not be obtained (a refused TokenRequest or
    // AssumeRoleWithWebIdentity) say so with their own reason.
    if let Some(identity) = identity_error(e) {
        return identity;
    }
    // No answer: said as such (retried until proof.timeout).
    let unanswered = match e {
        SdkError::TimeoutError(_) => Some("timed out"),
        SdkError::DispatchFailure(d) if d.is_timeout() => Some("timed out"),
        SdkError::DispatchFailure(d) if d.is_io() => Some("connection failed"),
        _ => None,
    };
    if let Some(what) = unanswered {
        return Error::transient(
            Reason::AwsSecretsManagerError,
            format!("AWS Secrets Manager {call} on {secret}: {what}"),
        );
    }
    // Only the error code is kept: AWS messages are not ours to vouch for.
    let code = e.code().unwrap_or("Unknown");
    let message = format!("AWS Secrets Manager {call} on {secret}: {code}");
    match code {
        "ResourceNotFoundException" => Error::permanent(Reason::AwsSecretNotFound, message),
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch" => Error::permanent(Reason::AwsCredentialsRejected, message),
        "InvalidRequestException"
        | "InvalidParameterException"
        | "ResourceExistsException"
        | "LimitExceededException"
        | "EncryptionFailure"
        | "DecryptionFailure" => Error::permanent(Reason::AwsSecretsManagerRejected, message),
        _ => Error::transient(Reason::AwsSecretsManagerError, message),
    }
}

/// The first rekey error in `e`'s chain of sources: why credentials could
/// not be had.
fn identity_error(e: &(dyn std::error::Error + 'static)) -> Option<Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<Error>() {
            return Some(found.clone());
        }
        next = err.source();
    }
    None
}

impl AwsSecretsManagerStore {
    /// A store acting with static keys (from `credentialsSecretRef`).
    pub fn new(
        metrics: Metrics,
        t: &AwsSecretsManagerTarget,
        access_key_id: SecretValue,
        secret_access_key: SecretValue,
        session_token: Option<SecretValue>,
    ) -> Self {
        let creds = Credentials::new(
            access_key_id.expose(),
            secret_access_key.expose(),
            session_token.map(|s| s.expose().to_string()),
            None,
            "rekey-secret-ref",
        );
        let config = aws_sdk_secretsmanager::Config::builder().credentials_provider(creds);
        Self::with_config(metrics, t, config)
    }

    /// A store acting with `provider`'s credentials, cached (and refreshed
    /// before they expire) in `identities`' cache, by its clock.
    pub fn with_provider(
        metrics: Metrics,
        t: &AwsSecretsManagerTarget,
        provider: SharedCredentialsProvider,
        identities: &AwsIdentities,
    ) -> Self {
        let mut config = aws_sdk_secretsmanager::Config::builder()
            .identity_cache(identities.cache.clone())
            .time_source(identities.time.clone());
        // `set_`, not `credentials_provider(..)`, which would wrap the
        // provider anew: a new cache partition, a new session per store.
        config.set_credentials_provider(Some(provider));
        Self::with_config(metrics, t, config)
    }

    fn with_config(
        metrics: Metrics,
        t: &AwsSecretsManagerTarget,
        config: aws_sdk_secretsmanager::config::Builder,
    ) -> Self {
        let mut config = config
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(t.region.clone()))
            .timeout_config(timeouts());
        if let Some(endpoint) = &t.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Self {
            client: Client::from_conf(config.build()),
            metrics,
            secret_id: t.secret_id.clone(),
            key: t.key.clone(),
        }
    }

    fn observe<T, E>(&self, call: &str, started: Instant, r: &std::result::Result<T, E>) {
        let outcome = crate::deps::outcome(r.is_ok());
        self.metrics
            .provider_call(PROVIDER, call, outcome, started.elapsed());
    }

    /// version id -> staging labels.
    async fn stages(&self) -> Result<HashMap<String, Vec<String>>> {
        let started = Instant::now();
        let r = self
            .client
            .describe_secret()
            .secret_id(&self.secret_id)
            .send()
            .await;
        self.observe("DescribeSecret", started, &r);
        let d = r.map_err(|e| map_err("DescribeSecret", &self.secret_id, &e))?;
        Ok(d.version_ids_to_stages.unwrap_or_default())
    }

    async fn current_string(&self) -> Result<Option<String>> {
        let started = Instant::now();
        // The stage is explicit (it is AWS's default too): moto's default
        // ignores stage moves made with UpdateSecretVersionStage.
        let r = self
            .client
            .get_secret_value()
            .secret_id(&self.secret_id)
            .version_stage(CURRENT)
            .send()
            .await;
        self.observe("GetSecretValue", started, &r);
        match r {
            Ok(v) => Ok(v.secret_string),
            Err(e)
                if e.code() == Some("ResourceNotFoundException") && self.stages().await.is_ok() =>
            {
                Ok(None)
            }
            Err(e) => Err(map_err("GetSecretValue", &self.secret_id, &e)),
        }
    }

    async fn move_stage(&self, stage: &str, to: Option<&str>, from: Option<&str>) -> Result<()> {
        let started = Instant::now();
        let r = self
            .client
            .update_secret_version_stage()
            .secret_id(&self.secret_id)
            .version_stage(stage)
            .set_move_to_version_id(to.map(String::from))
            .set_remove_from_version_id(from.map(String::from))
            .send()
            .await;
        self.observe("UpdateSecretVersionStage", started, &r);
        r.map_err(|e| map_err("UpdateSecretVersionStage", &self.secret_id, &e))?;
        Ok(())
    }
}

fn holding<'a>(stages: &'a HashMap<String, Vec<String>>, label: &str) -> Option<&'a str> {
    stages
        .iter()
        .find(|(_, s)| s.iter().any(|l| l == label))
        .map(|(v, _)| v.as_str())
}

#[async_trait]
impl Store for AwsSecretsManagerStore {
    async fn read_current(&self) -> Result<Option<SecretValue>> {
        let Some(s) = self.current_string().await? else {
            return Ok(None);
        };
        Ok(match &self.key {
            None => Some(SecretValue::new(s)),
            Some(k) => {
                // The answer and its parsed keys are wiped once the value
                // is taken.
                let s = zeroize::Zeroizing::new(s);
                let v = crate::value::WipedJson(serde_json::from_str(&s).unwrap_or_default());
                v.0.get(k).and_then(|x| x.as_str()).map(SecretValue::new)
            }
        })
    }

    async fn write(&self, value: &SecretValue, rotation_id: &str) -> Result<String> {
        let version = version_id(rotation_id);
        let stages = self.stages().await?;
        let current = holding(&stages, CURRENT).map(String::from);
        if !stages.contains_key(&version) {
            let string = match &self.key {
                None => value.expose().to_string(),
                Some(k) => {
                    let mut obj = self
                        .current_string()
                        .await?
                        .and_then(|s| {
                            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&s)
                                .ok()
                        })
                        .unwrap_or_default();
                    obj.insert(k.clone(), value.expose().into());
                    let string = serde_json::to_string(&obj).expect("a JSON map serializes");
                    // Ours is wiped; the string goes to the SDK (docs/secrets.md).
                    obj.values_mut().for_each(crate::value::wipe_json);
                    string
                }
            };
            let started = Instant::now();
            let r = self
                .client
                .put_secret_value()
                .secret_id(&self.secret_id)
                .client_request_token(&version)
                .secret_string(string)
                .send()
                .await;
            self.observe("PutSecretValue", started, &r);
            r.map_err(|e| map_err("PutSecretValue", &self.secret_id, &e))?;
        }
        // A new version without stages becomes AWSCURRENT, and AWS moves
        // AWSPREVIOUS to the version it replaced. Only a version this
        // rotation wrote earlier that is no longer current is moved back.
        if stages.contains_key(&version) && current.as_deref() != Some(version.as_str()) {
            self.move_stage(CURRENT, Some(&version), current.as_deref())
                .await?;
        }
        Ok(version)
    }

    async fn restore(&self, _previous: &SecretValue, rotation_id: &str) -> Result<String> {
        let version = version_id(rotation_id);
        let stages = self.stages().await?;
        if holding(&stages, CURRENT) == Some(version.as_str()) {
            let previous = holding(&stages, PREVIOUS)
                .ok_or_else(|| {
                    Error::permanent(
                        Reason::AwsNoPreviousVersion,
                        "no AWSPREVIOUS version to roll back to",
                    )
                })?
                .to_string();
            self.move_stage(CURRENT, Some(&previous), Some(&version))
                .await?;
        }
        let stages = self.stages().await?;
        Ok(holding(&stages, CURRENT).unwrap_or_default().to_string())
    }

    async fn preflight(&self) -> Result<Option<SecretValue>> {
        let stages = self.stages().await?;
        if holding(&stages, CURRENT).is_none() {
            return Err(Error::permanent(
                Reason::AwsSecretEmpty,
                format!("AWS secret {} has no AWSCURRENT version", self.secret_id),
            ));
        }
        self.read_current().await
    }
}

/// Credentials of a role assumed by a ServiceAccount of the SecretRotation's
/// namespace: each load requests a fresh ServiceAccount token (audience
/// `sts.amazonaws.com`) and exchanges it with STS AssumeRoleWithWebIdentity.
/// The SDK's identity cache decides when to load (first use, and before the
/// session expires); errors carry a rekey [`Error`], never a token.
pub struct WebIdentity {
    client: kube::Client,
    namespace: String,
    service_account: String,
    role_arn: String,
    sts: aws_sdk_sts::Client,
    metrics: Metrics,
}

impl std::fmt::Debug for WebIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebIdentity")
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .field("role_arn", &self.role_arn)
            .finish()
    }
}

impl WebIdentity {
    pub fn new(
        client: kube::Client,
        metrics: Metrics,
        namespace: &str,
        service_account: &str,
        t: &AwsSecretsManagerTarget,
        identities: &AwsIdentities,
    ) -> Self {
        // No credentials provider: AssumeRoleWithWebIdentity is unsigned,
        // the token is the only proof of identity.
        let mut config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new(t.region.clone()))
            .timeout_config(timeouts())
            .time_source(identities.time.clone());
        if let Some(endpoint) = &t.sts_endpoint {
            config = config.endpoint_url(endpoint);
        }
        Self {
            client,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            role_arn: t.role_arn.clone().unwrap_or_default(),
            sts: aws_sdk_sts::Client::from_conf(config.build()),
            metrics,
        }
    }

    /// The key of this identity in [`AwsIdentities`]: one provider (and one
    /// cached session) per namespace, ServiceAccount, role, region and
    /// endpoints.
    pub fn key(namespace: &str, service_account: &str, t: &AwsSecretsManagerTarget) -> String {
        [
            namespace,
            service_account,
            t.role_arn.as_deref().unwrap_or_default(),
            &t.region,
            t.endpoint.as_deref().unwrap_or_default(),
            t.sts_endpoint.as_deref().unwrap_or_default(),
        ]
        .join("\n")
    }

    async fn load(&self) -> Result<Credentials> {
        let who = format!(
            "ServiceAccount {}/{} assuming {}",
            self.namespace, self.service_account, self.role_arn
        );
        let token = crate::deps::service_account_token(
            &self.client,
            &self.namespace,
            &self.service_account,
            STS_AUDIENCE,
        )
        .await?;
        let started = Instant::now();
        let r = self
            .sts
            .assume_role_with_web_identity()
            .role_arn(&self.role_arn)
            .role_session_name(session_name(&self.namespace, &self.service_account))
            .web_identity_token(token.expose())
            .send()
            .await;
        self.metrics.provider_call(
            "aws-sts",
            "AssumeRoleWithWebIdentity",
            crate::deps::outcome(r.is_ok()),
            started.elapsed(),
        );
        let out = r.map_err(|e| {
            let code = e.code().unwrap_or("Unknown");
            let message = format!("AWS STS AssumeRoleWithWebIdentity ({who}): {code}");
            match code {
                "AccessDenied"
                | "InvalidIdentityToken"
                | "IDPRejectedClaim"
                | "ExpiredTokenException"
                | "RegionDisabledException"
                | "MalformedPolicyDocument"
                | "PackedPolicyTooLarge"
                | "ValidationError" => Error::permanent(Reason::AwsCredentialsRejected, message),
                _ => Error::transient(Reason::AwsSecretsManagerError, message),
            }
        })?;
        let c = out.credentials.ok_or_else(|| {
            Error::transient(
                Reason::AwsSecretsManagerError,
                format!("AWS STS AssumeRoleWithWebIdentity ({who}) answered no credentials"),
            )
        })?;
        let expires = SystemTime::try_from(c.expiration).map_err(|_| {
            Error::transient(
                Reason::AwsSecretsManagerError,
                format!("AWS STS AssumeRoleWithWebIdentity ({who}) answered no expiry"),
            )
        })?;
        Ok(Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            Some(c.session_token),
            Some(expires),
            "rekey-web-identity",
        ))
    }
}

/// The role session name AWS records in CloudTrail (2 to 64 of
/// `[\w+=,.@-]`): `rekey-<namespace>-<serviceaccount>`, cut at 64.
fn session_name(namespace: &str, service_account: &str) -> String {
    let mut name = format!("rekey-{namespace}-{service_account}");
    name.truncate(64);
    name
}

impl ProvideCredentials for WebIdentity {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.load().await.map_err(CredentialsError::provider_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_session_names_fit_sts_bounds() {
        assert_eq!(session_name("aihelp", "rotator"), "rekey-aihelp-rotator");
        let long = session_name(&"n".repeat(63), &"s.a".repeat(84));
        assert_eq!(long.len(), 64);
        // Namespace and ServiceAccount names are DNS names: STS's alphabet.
        assert!(
            long.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c))
        );
    }

    #[test]
    fn why_credentials_failed_is_found_through_the_sdk_error_chain() {
        let cause = Error::permanent(
            Reason::AwsCredentialsRejected,
            "AWS STS AssumeRoleWithWebIdentity (ServiceAccount a/b assuming r): AccessDenied",
        );
        let wrapped = CredentialsError::provider_error(cause.clone());
        let found = identity_error(&wrapped).expect("found");
        assert_eq!((found.reason, found.message), (cause.reason, cause.message));
        let unrelated = std::io::Error::other("connection reset");
        assert!(identity_error(&unrelated).is_none());
    }

    #[test]
    fn version_ids_fit_aws_client_request_token_bounds() {
        let id = crate::crd::new_rotation_id(jiff::Timestamp::now());
        let v = super::version_id(&id);
        assert!((32..=64).contains(&v.len()), "{v} ({} chars)", v.len());
        assert!(v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
