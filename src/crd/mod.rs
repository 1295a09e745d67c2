//! The `SecretRotation` custom resource (rekey.dev/v1alpha1).
//!
//! `///` comments on fields are user documentation: they become the CRD's
//! descriptions and show in `kubectl explain`. Developer notes use `//`.
//! Every rule that needs no cluster lookup is a CEL rule in the schema.

// kube's printcolumn(...) entries repeat `type_ = ...`, which clippy mistakes
// for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A SecretRotation rotates one credential end to end: it obtains a new value,
/// writes it to every target store, proves that External Secrets Operator
/// synced it and that the workloads rolled out on it, and only then
/// invalidates the old value.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rekey.dev",
    version = "v1alpha1",
    kind = "SecretRotation",
    namespaced,
    status = "SecretRotationStatus",
    shortname = "srot",
    category = "rekey",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Last Rotation",
        type_ = "date",
        json_path = ".status.lastRotation.finishedAt"
    ),
    printcolumn(
        name = "Last Result",
        type_ = "string",
        json_path = ".status.lastRotation.result"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.lastRotation.failure.reason"
    ),
    printcolumn(
        name = "Next Rotation",
        type_ = "date",
        json_path = ".status.nextRotationAt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("(has(self.proof.nothingToProve) && self.proof.nothingToProve) || (has(self.proof.externalSecrets) && size(self.proof.externalSecrets) > 0) || (has(self.proof.workloads) && size(self.proof.workloads) > 0) || (has(self.proof.clusters) && size(self.proof.clusters) > 0)")
        .message("proof must name at least one ExternalSecret, workload or cluster; set proof.nothingToProve: true to rotate without proof"),
    validation = Rule::new("!has(self.proof.nothingToProve) || !self.proof.nothingToProve || ((!has(self.proof.externalSecrets) || size(self.proof.externalSecrets) == 0) && (!has(self.proof.workloads) || size(self.proof.workloads) == 0) && (!has(self.proof.clusters) || size(self.proof.clusters) == 0))")
        .message("proof.nothingToProve: true cannot be combined with externalSecrets, workloads or clusters"),
    validation = Rule::new("!has(self.approval) || !has(self.approval.changeRequests) || self.approval.changeRequests.environments.all(e, self.targets.exists(t, has(t.environment) && t.environment == e) || (has(self.proof.clusters) && self.proof.clusters.exists(c, has(c.environment) && c.environment == e)))")
        .message("every approval.changeRequests.environments entry must be the environment of a target or of a proof.clusters entry"),
)]
#[serde(rename_all = "camelCase")]
pub struct SecretRotationSpec {
    /// Where a new value comes from, and where the old value is invalidated.
    /// Exactly one source must be set.
    pub credential: CredentialSource,

    /// How long the identity provider keeps the old value valid after a new one
    /// was issued (its grace window), as a duration such as `30m` or `2h`.
    /// rekey must prove the rollout inside this window; it warns loudly
    /// (Warning Event, `GraceWindowAtRisk` condition) when proof is not reached
    /// with a margin of 20% of the window. Between 1m and 720h.
    #[serde(default = "default_old_value_valid_for")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('720h')")
        .message("oldValueValidFor must be a duration between 1m and 720h, e.g. 30m"))]
    pub old_value_valid_for: String,

    /// Every store that must hold the new value, e.g. one Secrets Manager
    /// instance per environment. All are written in the Writing phase.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u.name == t.name))")
        .message("target names must be unique"))]
    pub targets: Vec<Target>,

    /// What must be observed before the old value is invalidated.
    pub proof: Proof,

    /// Optional periodic rotation, by fixed interval or cron expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,

    /// Any change of this string requests a rotation (GitOps: commit a new
    /// change-request number here), including a change back to an earlier
    /// value (a Git revert rotates again). The first value does not trigger
    /// one by itself; creating the resource does, unless `rotateOnCreate` is
    /// false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub trigger: Option<String>,

    /// Whether creating this SecretRotation starts a rotation (default
    /// true). Set it to false where objects are recreated without their
    /// status (a disaster-recovery restore, a reinstall): the object then
    /// only records its trigger and waits for the next request (a trigger
    /// change, the annotation, or its schedule, counted from creation).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub rotate_on_create: bool,

    /// An optional approval gate. When `required`, every rotation waits in
    /// phase `AwaitingApproval` until someone sets the annotation
    /// `rekey.dev/approve` to the rotation id shown in `status.rotation.id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,

    /// What to do when a rotation fails before the old value was invalidated.
    /// `Hold` (default) leaves every store as it is and reports the failure;
    /// `Rollback` writes the previous value back to every target and proves
    /// that ESO synced it again. The old value stays valid either way.
    #[serde(default)]
    pub on_failure: FailurePolicy,

    /// Stop after Preflight: check everything, change nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

fn default_old_value_valid_for() -> String {
    "30m".into()
}

/// Where new values come from. Exactly one of the fields must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.generated), has(self.webhook), has(self.manual), has(self.keycloak)].filter(x, x).size() == 1")
    .message("credential must set exactly one of generated, webhook, manual, keycloak"))]
#[serde(rename_all = "camelCase")]
pub struct CredentialSource {
    /// rekey generates the value itself (CSPRNG). There is no upstream
    /// identity provider, so there is nothing to invalidate at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<GeneratedSource>,
    /// An HTTP service issues new values and invalidates old ones. See
    /// docs/sources.md for the JSON contract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSource>,
    /// A person supplies the new value in a Secret, and at the end confirms
    /// that the old value was invalidated at the identity provider by setting
    /// the annotation `rekey.dev/confirm-invalidated` to the rotation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<ManualSource>,
    /// A confidential client's secret in Keycloak, rotated with Keycloak's
    /// client secret rotation: the old secret stays valid for the policy's
    /// rotated-secret lifetime, and is deleted once the proof is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keycloak: Option<KeycloakSource>,
}

/// A Keycloak client whose secret is rotated. Needs Keycloak's
/// `client-secret-rotation` feature and a client policy that applies a
/// profile with the `secret-rotation` executor to the client.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeycloakSource {
    /// Keycloak's base URL, e.g. `https://sso.example.com`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("keycloak.url must be an http(s) URL"))]
    pub url: String,
    /// Realm of the client.
    #[schemars(length(min = 1, max = 255))]
    pub realm: String,
    /// The client's `clientId` (not its internal id).
    #[schemars(length(min = 1, max = 255))]
    pub client_id: String,
    /// Secret (same namespace) with admin credentials: keys `username` and
    /// `password` (password grant of `admin-cli`), or `clientId` and
    /// `clientSecret` (a service account with manage-clients and view-realm).
    pub admin_secret_ref: LocalSecretRef,
    /// Realm the admin credentials belong to; default `master`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub admin_realm: Option<String>,
    /// Accept that, without a secret-rotation policy, regenerating the secret
    /// invalidates the old one at once (an outage until the rollout is done).
    /// Default false: such rotations are refused in Preflight.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_immediate_invalidation: bool,
}

/// A value generated by rekey.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedSource {
    /// Number of characters, 16 to 256.
    #[serde(default = "default_length")]
    #[schemars(range(min = 16, max = 256))]
    pub length: i32,
    /// Characters to draw from.
    #[serde(default)]
    pub alphabet: Alphabet,
}

fn default_length() -> i32 {
    48
}

/// Character set of a generated value.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Alphabet {
    /// A-Z, a-z, 0-9.
    #[default]
    Alphanumeric,
    /// 0-9, a-f.
    Hex,
    /// URL-safe base64 characters: A-Z, a-z, 0-9, `-` and `_`.
    Base64Url,
}

/// A credential issued and invalidated through HTTP calls.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSource {
    /// URL that issues a new value: rekey POSTs
    /// `{"rotationId": "...", "namespace": "...", "name": "..."}` with header
    /// `Idempotency-Key: <rotationId>` and expects `{"value": "..."}`. The same
    /// rotation id must return the same value.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("issueUrl must be an http(s) URL"))]
    pub issue_url: String,
    /// URL that invalidates the old value: rekey POSTs the same body, once the
    /// proof is complete, and treats any 2xx as done.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("invalidateUrl must be an http(s) URL"))]
    pub invalidate_url: String,
    /// Optional Secret (same namespace) whose key holds a bearer token sent as
    /// `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretKeyRef>,
}

/// A value supplied by a person.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManualSource {
    /// The Secret (same namespace) and key where the person puts the new value
    /// before requesting the rotation.
    pub secret_ref: SecretKeyRef,
}

/// A key in a Secret in the namespace of the SecretRotation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A store that must hold the new value. Exactly one store kind must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.kubernetesSecret), has(self.ibmSecretsManager), has(self.awsSecretsManager)].filter(x, x).size() == 1")
    .message("each target must set exactly one store kind: kubernetesSecret, ibmSecretsManager or awsSecretsManager"))]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Name of the target, unique in this SecretRotation, e.g. `dev-stage` or
    /// `prod`. Shown in status and Events.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The environment this target serves, e.g. `stage`. Targets and remote
    /// clusters with the same environment form one group: a change request
    /// (`approval.changeRequests`) covers a group. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub environment: Option<String>,
    /// A Kubernetes Secret, e.g. one that ESO's kubernetes provider reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_secret: Option<KubernetesSecretTarget>,
    /// A secret in an IBM Cloud Secrets Manager instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ibm_secrets_manager: Option<IbmSecretsManagerTarget>,
    /// A secret in AWS Secrets Manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_secrets_manager: Option<AwsSecretsManagerTarget>,
}

/// A secret in IBM Cloud Secrets Manager (API v2). Each write creates a new
/// secret version whose `version_custom_metadata.rekey_rotation_id` names the
/// rotation; a retried write finds it and creates nothing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.secretId) != has(self.secretName)").message("ibmSecretsManager must set exactly one of secretId, secretName"))]
#[x_kube(validation = Rule::new("has(self.apiKeySecretRef) != has(self.trustedProfile)").message("ibmSecretsManager must set exactly one of apiKeySecretRef (an API key) or trustedProfile (a ServiceAccount of this namespace)"))]
#[serde(rename_all = "camelCase")]
pub struct IbmSecretsManagerTarget {
    /// The instance's endpoint, e.g.
    /// `https://<instance-id>.us-south.secrets-manager.appdomain.cloud`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("serviceUrl must be an http(s) URL"))]
    pub service_url: String,
    /// The secret's id (a UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub secret_id: Option<String>,
    /// Alternatively, the secret's name, looked up in `secretGroup` by `secretType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub secret_name: Option<String>,
    /// Secret group id for a lookup by name; default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub secret_group: Option<String>,
    /// Secret type for a lookup by name: `arbitrary` (default), `kv` or
    /// `username_password`. Looked up from the secret when `secretId` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub secret_type: Option<String>,
    /// For `kv` secrets: the key inside the secret's data that holds the value
    /// (other keys are kept). `arbitrary` secrets hold the value as payload,
    /// `username_password` secrets as password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub key: Option<String>,
    /// Secret (same namespace) and key holding an IBM Cloud API key allowed to
    /// read and write the secret. The static fallback: prefer `trustedProfile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Authenticate as an IAM trusted profile instead of with an API key:
    /// rekey requests a short-lived token (audience `iam`) for a
    /// ServiceAccount of this SecretRotation's namespace and exchanges it at
    /// IAM (grant type `cr-token`) for the profile's access token. The
    /// profile must trust that ServiceAccount (a compute-resource link to the
    /// cluster, namespace and ServiceAccount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_profile: Option<IbmTrustedProfile>,
    /// IAM endpoint that exchanges the API key for a token.
    #[serde(default = "default_iam_url")]
    #[schemars(length(min = 1, max = 2048))]
    pub iam_url: String,
}

/// An IAM trusted profile that a ServiceAccount of the SecretRotation's
/// namespace may assume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IbmTrustedProfile {
    /// The trusted profile's id, e.g. `Profile-8b1ec0a1-...`.
    #[schemars(length(min = 1, max = 128))]
    pub profile_id: String,
    /// The ServiceAccount (same namespace) whose token IAM exchanges.
    pub service_account_ref: ServiceAccountRef,
}

/// A ServiceAccount in the namespace of the SecretRotation: rekey requests
/// short-lived tokens for it (TokenRequest API), never uses its own identity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Name of the ServiceAccount.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

fn default_iam_url() -> String {
    "https://iam.cloud.ibm.com".into()
}

/// A secret in AWS Secrets Manager, written the way AWS's own rotation works:
/// the new value becomes a version (`ClientRequestToken` derived from the
/// rotation id) staged `AWSPENDING`, then `AWSCURRENT` moves to it and the old
/// version keeps `AWSPREVIOUS`. Rollback moves `AWSCURRENT` back.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.credentialsSecretRef) ? !has(self.serviceAccountRef) && !has(self.roleArn) : has(self.serviceAccountRef) && has(self.roleArn)")
    .message("awsSecretsManager must set exactly one identity: credentialsSecretRef (static keys), or serviceAccountRef together with roleArn (a ServiceAccount of this namespace assumes the role)"))]
#[serde(rename_all = "camelCase")]
pub struct AwsSecretsManagerTarget {
    /// AWS region, e.g. `eu-central-1`.
    #[schemars(length(min = 1, max = 32))]
    pub region: String,
    /// Name or ARN of the secret (it must exist).
    #[schemars(length(min = 1, max = 2048))]
    pub secret_id: String,
    /// When set, the secret's string is a JSON object and the value goes to
    /// this key (other keys are kept); otherwise the whole string is the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub key: Option<String>,
    /// Secret (same namespace) with keys `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and optionally `AWS_SESSION_TOKEN`. The static
    /// fallback: prefer `serviceAccountRef` with `roleArn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalSecretRef>,
    /// A ServiceAccount (same namespace) that assumes `roleArn`: rekey
    /// requests a short-lived token for it (audience `sts.amazonaws.com`) and
    /// exchanges it with STS AssumeRoleWithWebIdentity. The role's trust
    /// policy must trust the cluster's OIDC issuer for
    /// `system:serviceaccount:<namespace>:<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<ServiceAccountRef>,
    /// The IAM role to assume with `serviceAccountRef`, e.g.
    /// `arn:aws:iam::123456789012:role/rekey-ai-component`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 20, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$')").message("roleArn must be an IAM role ARN, e.g. arn:aws:iam::123456789012:role/name"))]
    pub role_arn: Option<String>,
    /// Endpoint override, e.g. a VPC endpoint or a local emulator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub endpoint: Option<String>,
    /// STS endpoint override for `serviceAccountRef` (default: the region's
    /// STS endpoint), e.g. an STS VPC endpoint or a local emulator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub sts_endpoint: Option<String>,
}

/// A Secret in the namespace of the SecretRotation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// A key in a Kubernetes Secret that rekey writes (and creates if missing).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesSecretTarget {
    /// Namespace of the Secret; defaults to the SecretRotation's namespace.
    /// Another namespace only with a grant made there: the Secret must
    /// already exist and carry the annotation
    /// `rekey.dev/allow-rotation-from: <this SecretRotation's namespace>`
    /// (comma-separated for several). Its previous value is then not kept in
    /// the write-ahead record (no value crosses into this namespace), so
    /// `onFailure: Rollback` is refused for such a target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
    /// Allow rekey to overwrite this Secret although rekey did not create it
    /// (for example a Secret made by hand or by Helm that ESO's kubernetes
    /// provider reads). Without it, Preflight refuses an existing Secret that
    /// does not carry rekey's `rekey.dev/written-by-rotation` annotation. A
    /// Secret with an owner reference or managed by ESO (an ExternalSecret's
    /// output) is refused either way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt_existing: bool,
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key that holds the value.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Periodic rotation. Exactly one of `every` and `cron` must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.every) != has(self.cron)").message("schedule must set exactly one of every, cron"))]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// Rotate this long after the last rotation finished, e.g. `2160h` (90
    /// days). Between 1m and 8760h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('8760h')")
        .message("schedule.every must be a duration between 1m and 8760h, e.g. 2160h"))]
    pub every: Option<String>,
    /// A cron expression in UTC with five fields, e.g. `0 3 1 */3 *`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 128))]
    #[x_kube(validation = Rule::new("self.split(' ').filter(f, f != '').size() == 5")
        .message("schedule.cron must have five fields: minute hour day-of-month month day-of-week"))]
    #[x_kube(validation = Rule::new("self.split(' ').filter(f, f != '').all(f, f.matches('^([*]|[?]|[0-9]+|[A-Za-z]{3})([-/,#]([*]|[0-9]+|[A-Za-z]{3}))*[LW]?$'))")
        .message("schedule.cron fields may hold only numbers, *, ?, ranges (-), steps (/), lists (,) and three-letter month or day names"))]
    pub cron: Option<String>,
    /// Spread scheduled rotations: each SecretRotation's rotation is due a
    /// stable offset between 0 and this duration (derived from its uid)
    /// later, so that many objects with one schedule do not all start at
    /// once. At most 24h, e.g. `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('0s') && duration(self) <= duration('24h')")
        .message("schedule.jitter must be a duration between 0s and 24h, e.g. 30m"))]
    pub jitter: Option<String>,
}

/// What to do when a rotation fails.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Leave every store as it is; the old value stays valid.
    #[default]
    Hold,
    /// Write the previous value back to every target and prove the sync.
    Rollback,
}

mod approval;
mod consumers;
pub mod keys;
mod proof;
mod status;
pub use approval::*;
pub use consumers::*;
pub use proof::*;
pub use status::*;
