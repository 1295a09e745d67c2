//! `webhook`: an HTTP service issues and invalidates values.
//!
//! Contract (docs/sources.md): rekey POSTs JSON
//! `{"rotationId", "namespace", "name"}` with `Idempotency-Key: <rotationId>`
//! (and `Authorization: Bearer <token>` when configured) to `issueUrl`, which
//! answers `{"value": "..."}` — the same value for the same rotation id — and
//! later to `invalidateUrl`, where any 2xx means the old value is invalid.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::Deserialize;

use super::{CredentialSource, Invalidation};
use crate::crd::WebhookSource;
use crate::deps::Deps;
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::value::SecretValue;

pub struct Webhook {
    deps: Deps,
    spec: WebhookSource,
    namespace: String,
    name: String,
}

#[derive(Deserialize)]
struct IssueResponse {
    value: String,
}

impl Webhook {
    pub fn new(spec: &WebhookSource, deps: &Deps, namespace: &str, name: &str) -> Self {
        Self {
            deps: deps.clone(),
            spec: spec.clone(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    async fn post(
        &self,
        url: &str,
        call: &'static str,
        rotation_id: &str,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .deps
            .http
            .post(url)
            .header("Idempotency-Key", rotation_id)
            .json(&serde_json::json!({"rotationId": rotation_id, "namespace": self.namespace, "name": self.name}));
        if let Some(auth) = &self.spec.auth_secret_ref {
            let token = self
                .deps
                .secret_key(&self.namespace, &auth.name, &auth.key)
                .await?;
            req = req.bearer_auth(token.expose());
        }
        let started = std::time::Instant::now();
        let result = req.send().await;
        let outcome = crate::deps::outcome(matches!(&result, Ok(r) if r.status().is_success()));
        self.deps
            .metrics
            .provider_call("webhook", call, outcome, started.elapsed());
        let resp = result
            .map_err(|e| Error::http(Reason::WebhookUnreachable, &format!("webhook {call}"), &e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // The body is never read: it may echo a value.
        let message = format!("webhook {call} answered HTTP {}", status.as_u16());
        Err(
            if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                Error::transient(Reason::WebhookError, message)
            } else {
                Error::permanent(Reason::WebhookRejected, message)
            },
        )
    }
}

#[async_trait]
impl CredentialSource for Webhook {
    async fn preflight(&self, _current: Option<&SecretValue>) -> Result<()> {
        if let Some(auth) = &self.spec.auth_secret_ref {
            self.deps
                .secret_key(&self.namespace, &auth.name, &auth.key)
                .await?;
        }
        Ok(())
    }

    async fn issue(
        &self,
        rotation_id: &str,
        _marker: &str,
        _earlier_attempt: Option<jiff::Timestamp>,
    ) -> Result<SecretValue> {
        let resp = self
            .post(&self.spec.issue_url, "issue", rotation_id)
            .await?;
        let body: IssueResponse = resp.json().await.map_err(|_| {
            Error::permanent(
                Reason::WebhookBadResponse,
                "webhook issue answered without a JSON {\"value\": string}",
            )
        })?;
        if body.value.is_empty() {
            return Err(Error::permanent(
                Reason::WebhookBadResponse,
                "webhook issue answered an empty value",
            ));
        }
        Ok(SecretValue::new(body.value))
    }

    async fn invalidate(
        &self,
        rotation_id: &str,
        _annotations: &BTreeMap<String, String>,
        _distributed: &SecretValue,
    ) -> Result<Invalidation> {
        self.post(&self.spec.invalidate_url, "invalidate", rotation_id)
            .await?;
        Ok(Invalidation::Done)
    }
}
