//! Stores: where the new value is written (one per target).

pub mod aws;
pub mod ibm;
pub mod kubernetes;

use async_trait::async_trait;

use crate::deps::Deps;
use crate::error::{Error, Result};
use crate::plan::{StorePlan, TargetPlan};
use crate::reason::Reason;
use crate::value::SecretValue;
use aws_credential_types::provider::SharedCredentialsProvider;

/// A place that holds the current value of a credential, e.g. a Secrets
/// Manager instance or a Kubernetes Secret that ESO reads.
///
/// # Guarantees
/// - `write` is idempotent per `rotation_id`: calling it again after a crash
///   (with the same value and id) creates no second version and returns the
///   version written the first time.
/// - After `write` returns, `read_current` returns the written value.
///
/// # Assumptions
/// - Nothing else writes the same store entry during a rotation.
///
/// # Caveats
/// - Errors never carry the store's response body (it may echo the value).
#[async_trait]
pub trait Store: Send + Sync {
    /// The value the store holds now, if any.
    async fn read_current(&self) -> Result<Option<SecretValue>>;
    /// Makes `value` the current value, tagged with `rotation_id`; returns the
    /// store's version id.
    async fn write(&self, value: &SecretValue, rotation_id: &str) -> Result<String>;
    /// Checks that the store answers and the credentials work, without
    /// writing; returns the value it holds now (as `read_current`, in the
    /// same calls).
    async fn preflight(&self) -> Result<Option<SecretValue>>;
    /// Undoes `write` of `rotation_id` after a failure (onFailure: Rollback):
    /// makes `previous` the current value again; returns the version now
    /// current. Idempotent. By default `previous` is written as a new version.
    async fn restore(&self, previous: &SecretValue, rotation_id: &str) -> Result<String> {
        self.write(previous, &format!("{rotation_id}-rollback"))
            .await
    }
}

/// Builds the store of a target; reads its credentials from Secrets in `namespace`.
/// `rotation` names the SecretRotation, so that writes of different
/// rotations and targets to one Secret do not take each other's fields.
pub async fn build(
    target: &TargetPlan,
    deps: &Deps,
    namespace: &str,
    rotation: &str,
) -> Result<Box<dyn Store>> {
    Ok(match &target.store {
        StorePlan::KubernetesSecret(k) => Box::new(
            kubernetes::KubernetesSecretStore::new(
                deps.client.clone(),
                k,
                namespace,
                &format!("rekey/{namespace}/{rotation}/{}", target.name),
            )
            .with_metrics(deps.metrics.clone()),
        ),
        StorePlan::IbmSecretsManager(t) => {
            let auth = match (&t.api_key_secret_ref, &t.trusted_profile) {
                (Some(r), _) => {
                    ibm::IbmAuth::ApiKey(deps.secret_key(namespace, &r.name, &r.key).await?)
                }
                (None, Some(p)) => ibm::IbmAuth::TrustedProfile {
                    client: deps.client.clone(),
                    namespace: namespace.to_string(),
                    service_account: p.service_account_ref.name.clone(),
                    profile_id: p.profile_id.clone(),
                },
                (None, None) => {
                    return Err(Error::permanent(
                        Reason::InvalidSpec,
                        "ibmSecretsManager needs apiKeySecretRef or trustedProfile",
                    ));
                }
            };
            Box::new(
                ibm::IbmSecretsManagerStore::with_auth(
                    deps.http.clone(),
                    deps.metrics.clone(),
                    t,
                    auth,
                )
                .shared(deps.tokens.clone(), deps.ibm_pace.clone()),
            )
        }
        StorePlan::AwsSecretsManager(t) => {
            match (&t.credentials_secret_ref, &t.service_account_ref) {
                (None, Some(sa)) => {
                    let key = aws::WebIdentity::key(namespace, &sa.name, t);
                    let provider = deps.aws.provider(&key, || {
                        SharedCredentialsProvider::new(aws::WebIdentity::new(
                            deps.client.clone(),
                            deps.metrics.clone(),
                            namespace,
                            &sa.name,
                            t,
                            &deps.aws,
                        ))
                    });
                    Box::new(aws::AwsSecretsManagerStore::with_provider(
                        deps.metrics.clone(),
                        t,
                        provider,
                        &deps.aws,
                    ))
                }
                (Some(r), _) => {
                    let r = &r.name;
                    let id = deps.secret_key(namespace, r, "AWS_ACCESS_KEY_ID").await?;
                    let secret = deps
                        .secret_key(namespace, r, "AWS_SECRET_ACCESS_KEY")
                        .await?;
                    let session = deps
                        .secret_key(namespace, r, "AWS_SESSION_TOKEN")
                        .await
                        .ok();
                    Box::new(aws::AwsSecretsManagerStore::new(
                        deps.metrics.clone(),
                        t,
                        id,
                        secret,
                        session,
                    ))
                }
                (None, None) => {
                    return Err(Error::permanent(
                        Reason::InvalidSpec,
                        "awsSecretsManager needs credentialsSecretRef or serviceAccountRef with roleArn",
                    ));
                }
            }
        }
    })
}
