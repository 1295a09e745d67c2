//! The gates before a rotation acts: a person's approval and change
//! requests per environment.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LocalSecretRef, SecretKeyRef};

/// Approval gate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// When true, each rotation waits for the annotation
    /// `rekey.dev/approve: <rotation id>` before changing anything.
    #[serde(default)]
    pub required: bool,
    /// Change requests: before changing anything, each rotation opens one
    /// change request per environment listed here (in ServiceNow or through
    /// a webhook), waits until every one is approved and its change window
    /// is open, and closes each with the result and the phase timeline when
    /// the rotation ends. A rejected or cancelled change ends the rotation
    /// before any side effect, for every environment. Combined with
    /// `required`, both gates apply (the changes first). Dry runs open none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_requests: Option<ChangeRequests>,
}

/// Change requests for a rotation: where to open them and for which
/// environments. Exactly one of `serviceNow` and `webhook` must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.serviceNow) != has(self.webhook)").message("changeRequests must set exactly one of serviceNow, webhook"))]
#[serde(rename_all = "camelCase")]
pub struct ChangeRequests {
    /// The environments that need a change request, e.g. `[stage, prod]`:
    /// values of `targets[].environment` and `proof.clusters[].environment`.
    /// One change request is opened per environment; the rotation acts on
    /// every target only when all are approved (a rejected `stage` change
    /// stops the shared value for `dev` too).
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(e, self.exists_one(f, f == e))").message("changeRequests.environments must be unique"))]
    pub environments: Vec<ChangeEnvironment>,
    /// ServiceNow Change Management (REST API `/api/sn_chg_rest/change`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_now: Option<ServiceNowChanges>,
    /// Any change system behind the generic webhook contract of
    /// docs/sources.md (open, read, start, close).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<ChangeWebhook>,
}

/// An environment name, as in `targets[].environment`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(transparent)]
pub struct ChangeEnvironment(
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub String,
);

/// Change requests in ServiceNow.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.type != 'Standard' || has(self.standardTemplateId)").message("serviceNow.type Standard needs standardTemplateId"))]
#[serde(rename_all = "camelCase")]
pub struct ServiceNowChanges {
    /// The instance, e.g. `https://example.service-now.com`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("instanceUrl must be an http(s) URL"))]
    pub instance_url: String,
    /// A Secret (same namespace) with keys `username` and `password` of a
    /// ServiceNow user allowed to create and update change requests (basic
    /// authentication).
    pub credentials_secret_ref: LocalSecretRef,
    /// `Normal` (default): rekey requests approval (state Assess) and waits
    /// for the approvers. `Standard`: created from a pre-approved standard
    /// change template (`standardTemplateId`) and scheduled at once; the
    /// approval is still read back, never assumed.
    #[serde(default, rename = "type")]
    pub change_type: ServiceNowChangeType,
    /// The sys_id of the standard change template (type `Standard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9]+$"))]
    pub standard_template_id: Option<String>,
    /// The assignment group (its sys_id or name) set on each change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub assignment_group: Option<String>,
    /// The short description of each change; default: `Rotate credential
    /// <namespace>/<name> in <environment> (rekey rotation <id>)`. The
    /// environment is appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 120))]
    pub short_description: Option<String>,
}

/// The kind of ServiceNow change request.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceNowChangeType {
    /// Approved by the change's approvers (CAB).
    #[default]
    Normal,
    /// Pre-approved, from a standard change template.
    Standard,
}

/// Change requests through the generic webhook contract (docs/sources.md).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChangeWebhook {
    /// Base URL: rekey calls `POST <url>/changes`, `GET <url>/changes/<id>`,
    /// `POST <url>/changes/<id>/start` and `POST <url>/changes/<id>/close`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("url must be an http(s) URL"))]
    pub url: String,
    /// Optional Secret (same namespace) whose key holds a bearer token sent as
    /// `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretKeyRef>,
}
