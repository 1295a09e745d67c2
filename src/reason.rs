//! The vocabulary of failure reasons. A reason is the `Ready` condition's
//! reason after a failure, `status.rotation.failure.reason`, the `reason`
//! label of `rekey_rotations_finished_total`, and the first word of every
//! error message. Each one is documented for users in docs/concepts.md
//! (a unit test below keeps that true).

use std::fmt;

/// How the machine treats an error of this reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Fails the rotation at once: retrying cannot help.
    Never,
    /// Retried until the phase's time budget (`proof.timeout`) runs out.
    UntilTimeout,
    /// Decided per error (e.g. by the HTTP status the API server answered).
    PerError,
}

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $name:ident: $retry:ident,)*) => {
        /// Why a rotation step failed.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $name,)*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The CamelCase text users see.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                }
            }

            /// Whether an error of this reason is retried.
            pub fn retry(self) -> Retry {
                match self {
                    $(Reason::$name => Retry::$retry,)*
                }
            }
        }
    };
}

reasons! {
    // Spec and rotation rules.
    /// The spec cannot be acted on (a duration, cron expression or store setting).
    InvalidSpec: Never,
    /// `proof.timeout` is not shorter than `oldValueValidFor`.
    GraceWindowTooShort: Never,
    /// `credential`, `targets` or `proof` changed after Preflight.
    SpecChangedDuringRotation: Never,
    /// A person asked for a rollback (`kubectl rekey rollback`, annotation
    /// `rekey.dev/rollback`) before the old value was invalidated.
    RollbackRequested: Never,
    /// The source returned the value a target already holds.
    NewValueNotNew: Never,
    /// The write-ahead record of the rotation is gone.
    WriteAheadRecordMissing: Never,
    /// A bug in rekey (an object it built was refused).
    Internal: Never,
    /// A kubernetesSecret target exists, was not created by rekey, and
    /// `adoptExisting` is not set.
    TargetSecretNotAdopted: Never,
    /// A kubernetesSecret target has an owner reference or is managed by ESO.
    TargetSecretManaged: Never,
    /// A kubernetesSecret target in another namespace carries no grant for
    /// this SecretRotation's namespace.
    TargetNamespaceNotGranted: Never,
    /// A URL of the spec names a host outside the operator's `--allowed-hosts`.
    HostNotAllowed: Never,
    // Proof.
    /// An ExternalSecret did not deliver the new value within `proof.timeout`.
    SyncTimeout: Never,
    /// A workload did not complete its rollout within `proof.timeout`.
    RolloutTimeout: Never,
    /// A rollback was not synced within `proof.timeout`.
    RollbackTimeout: Never,
    /// An ExternalSecret ignores refresh requests.
    RefreshNotHonoured: Never,
    /// A proof key is not in the ExternalSecret's Secret.
    ProofKeyMissing: Never,
    /// A proof key does not hold the value the targets hold.
    ProofKeyMismatch: Never,
    /// A named ExternalSecret does not exist.
    ExternalSecretNotFound: Never,
    /// A named workload does not exist.
    WorkloadNotFound: Never,
    /// A consumer of the value (a pod's owner, a workload whose template
    /// reads it, another ExternalSecret pulling the same key) is neither in
    /// `proof.workloads` nor in `proof.consumers`.
    UncoveredConsumer: Never,
    /// A workload's rollout can never progress: a paused Deployment, or an
    /// `OnDelete` update strategy.
    RolloutCannotProgress: Never,
    /// Pods that started before the new value was synced were still running
    /// or terminating when `proof.timeout` ran out.
    DrainTimeout: Never,
    /// A remote cluster of `proof.clusters` could not be reached, or refused
    /// rekey's credentials. It never counts as proven; retried until
    /// `proof.timeout`.
    ClusterUnreachable: UntilTimeout,
    /// A remote cluster's kubeconfig is unusable or refused (an exec or
    /// auth-provider plugin, or a file path).
    InvalidKubeconfig: Never,
    /// A referenced Secret does not exist.
    SecretNotFound: Never,
    /// A referenced Secret lacks the key, or it is empty.
    SecretKeyMissing: Never,
    /// With leader election: a side effect was not started (or was cut)
    /// because the leader lease could run out before the call ends.
    LeaseNotRenewed: UntilTimeout,
    /// The Kubernetes API answered with an error (permanent for 400, 403, 404, 422).
    KubernetesApiError: PerError,
    /// Right before invalidation, a store, synced Secret or workload no
    /// longer held the new value (someone changed it after the proof).
    ProofLost: Never,
    /// The proof succeeded but the old value could not be invalidated.
    InvalidationFailed: PerError,
    // Change requests (`approval.changeRequests`).
    /// A change request was rejected, cancelled or closed: before the
    /// rotation acted (nothing was changed, in any environment), or while it
    /// acted (it ends before the invalidation).
    ChangeRejected: Never,
    /// A change was approved only after its change window ended: the
    /// approval is refused, nothing was changed.
    ChangeWindowClosed: Never,
    /// The change system could not be reached.
    ChangeSystemUnreachable: UntilTimeout,
    /// The change system answered 5xx or 429.
    ChangeSystemError: UntilTimeout,
    /// The change system refused a request (401, 403, 404, another 4xx) or
    /// answered something unreadable.
    ChangeSystemRejected: Never,
    // Sources.
    /// The manual Secret still holds the current value.
    ManualValueUnchanged: Never,
    /// The webhook could not be reached.
    WebhookUnreachable: UntilTimeout,
    /// The webhook answered 5xx.
    WebhookError: UntilTimeout,
    /// The webhook answered 4xx.
    WebhookRejected: Never,
    /// The webhook's answer held no usable value.
    WebhookBadResponse: Never,
    /// The identity provider refused a token request with the new value.
    NewValueRejected: Never,
    /// Keycloak could not be reached.
    KeycloakUnreachable: UntilTimeout,
    /// Keycloak answered 5xx or an unreadable answer.
    KeycloakError: PerError,
    /// Keycloak refused the admin credentials.
    KeycloakCredentialsRejected: Never,
    /// Keycloak answered 404 (realm or object).
    KeycloakNotFound: Never,
    /// Keycloak answered another 4xx.
    KeycloakRejected: Never,
    /// The client id does not exist in the realm.
    KeycloakClientNotFound: Never,
    /// The client is public or bearer-only: it has no secret.
    KeycloakClientNotConfidential: Never,
    /// The client has no service account, so the new secret cannot be tried.
    KeycloakCannotVerify: Never,
    /// The client's rotated-expiration-period is shorter than `oldValueValidFor`.
    KeycloakGraceWindowTooShort: Never,
    /// The client already has a rotated secret: regenerating would kill it.
    KeycloakRotatedSlotInUse: Never,
    /// An earlier regenerate call got no answer and may still commit.
    KeycloakIssuePending: UntilTimeout,
    /// Right before invalidation, Keycloak's current secret was not the one
    /// rekey distributed.
    KeycloakSecretChanged: Never,
    /// No enabled client policy applies a secret-rotation profile to the client.
    KeycloakRotationPolicyMissing: Never,
    /// The stores do not hold the client's current secret.
    KeycloakTargetsOutOfSync: Never,
    // Stores.
    /// IBM IAM could not be reached.
    IbmIamUnreachable: UntilTimeout,
    /// IBM IAM answered 5xx or an unreadable token.
    IbmIamError: UntilTimeout,
    /// IBM answered 401/403.
    IbmCredentialsRejected: Never,
    /// IBM Secrets Manager could not be reached.
    IbmSecretsManagerUnreachable: UntilTimeout,
    /// IBM Secrets Manager answered 5xx or an unreadable answer.
    IbmSecretsManagerError: PerError,
    /// IBM Secrets Manager answered another 4xx.
    IbmSecretsManagerRejected: Never,
    /// IBM Secrets Manager answered 404.
    IbmSecretNotFound: Never,
    /// IBM Secrets Manager answered 412: a version is locked.
    IbmSecretLocked: Never,
    /// IBM Secrets Manager answered 429.
    IbmRateLimited: UntilTimeout,
    /// The IBM secret type is not arbitrary, kv or username_password.
    IbmUnsupportedSecretType: Never,
    /// AWS refused the credentials.
    AwsCredentialsRejected: Never,
    /// The AWS secret does not exist.
    AwsSecretNotFound: Never,
    /// AWS refused the request.
    AwsSecretsManagerRejected: Never,
    /// AWS answered with a server error or could not be reached.
    AwsSecretsManagerError: UntilTimeout,
    /// A rollback found no previous AWS version.
    AwsNoPreviousVersion: Never,
    /// The AWS secret holds no string value.
    AwsSecretEmpty: Never,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn every_reason_is_documented_for_users() {
        let docs = include_str!("../docs/concepts.md");
        let missing: Vec<&str> = Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .filter(|r| !docs.contains(&format!("`{r}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "reasons missing from docs/concepts.md: {missing:?}"
        );
    }
}
