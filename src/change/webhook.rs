//! Change requests through the generic webhook contract (docs/sources.md,
//! "Change request webhook"). rekey calls, with JSON bodies and
//! `Authorization: Bearer <token>` when configured:
//!
//! - `POST <url>/changes` `{"correlationId", "rotationId", "namespace",
//!   "name", "environment", "shortDescription", "description"}` with header
//!   `Idempotency-Key: <correlationId>`: opens a change, or answers the one
//!   already open for that correlation id;
//! - `GET <url>/changes/<id>`: reads it;
//! - `POST <url>/changes/<id>/start`: the rotation begins to act;
//! - `POST <url>/changes/<id>/close` `{"result", "notes", "timeline"}`.
//!
//! Every answer is the change: `{"id", "number"?, "state", "windowStart"?,
//! "windowEnd"?}` with `state` one of `requested`, `approved`, `rejected`,
//! `cancelled`, `implementing`, `closed`, and RFC 3339 window times.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, ChangeSystem, Closing, Opening, Standing, status_error};
use crate::crd::ChangeWebhook;
use crate::deps::Deps;
use crate::error::{Error, Result};
use crate::reason::Reason;

pub struct ChangeHook {
    deps: Deps,
    spec: ChangeWebhook,
    namespace: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    id: String,
    #[serde(default)]
    number: String,
    state: String,
    #[serde(default)]
    window_start: Option<jiff::Timestamp>,
    #[serde(default)]
    window_end: Option<jiff::Timestamp>,
}

impl ChangeHook {
    pub fn new(spec: &ChangeWebhook, deps: &Deps, namespace: &str) -> Self {
        Self {
            deps: deps.clone(),
            spec: spec.clone(),
            namespace: namespace.into(),
        }
    }

    async fn call(
        &self,
        call: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Change> {
        let url = format!("{}/changes{path}", self.spec.url.trim_end_matches('/'));
        let mut req = self.deps.http.request(method, url);
        if let Some(body) = body {
            req = req.json(&body);
        }
        if let Some(key) = idempotency_key {
            req = req.header("Idempotency-Key", key);
        }
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
            .provider_call("change-webhook", call, outcome, started.elapsed());
        let resp = result.map_err(|e| {
            Error::http(
                Reason::ChangeSystemUnreachable,
                &format!("change webhook {call}"),
                &e,
            )
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error("change webhook", call, status));
        }
        let answer: Answer = resp.json().await.map_err(|_| {
            Error::permanent(
                Reason::ChangeSystemRejected,
                format!("change webhook {call} answered without a readable change"),
            )
        })?;
        Ok(change(answer))
    }
}

fn change(a: Answer) -> Change {
    let standing = match a.state.as_str() {
        "approved" => Standing::Approved,
        "implementing" => Standing::Implementing,
        "rejected" | "cancelled" => Standing::Rejected,
        "closed" => Standing::Closed,
        _ => Standing::Pending,
    };
    Change {
        number: if a.number.is_empty() {
            a.id.clone()
        } else {
            a.number
        },
        id: a.id,
        ended: matches!(a.state.as_str(), "closed" | "cancelled"),
        state: a.state,
        approval: match standing {
            Standing::Approved | Standing::Implementing | Standing::Closed => "Approved",
            Standing::Rejected => "Rejected",
            Standing::New | Standing::Pending => "Requested",
        }
        .into(),
        standing,
        window_start: a.window_start,
        window_end: a.window_end,
    }
}

#[async_trait]
impl ChangeSystem for ChangeHook {
    async fn find(&self, _correlation_id: &str) -> Result<Option<Change>> {
        // Opening is idempotent by correlation id: `open` finds it.
        Ok(None)
    }

    async fn open(&self, o: &Opening) -> Result<Change> {
        let body = json!({
            "correlationId": o.correlation_id,
            "rotationId": o.rotation_id,
            "namespace": o.namespace,
            "name": o.name,
            "environment": o.environment,
            "shortDescription": o.short_description,
            "description": o.description,
        });
        self.call(
            "open change",
            reqwest::Method::POST,
            "",
            Some(body),
            Some(&o.correlation_id),
        )
        .await
    }

    async fn request_approval(&self, id: &str) -> Result<Change> {
        // Opening requests the approval.
        self.read(id).await
    }

    async fn read(&self, id: &str) -> Result<Change> {
        self.call(
            "read change",
            reqwest::Method::GET,
            &format!("/{id}"),
            None,
            None,
        )
        .await
    }

    async fn start(&self, id: &str) -> Result<Change> {
        self.call(
            "start change",
            reqwest::Method::POST,
            &format!("/{id}/start"),
            Some(json!({})),
            None,
        )
        .await
    }

    async fn close(&self, id: &str, closing: &Closing) -> Result<Change> {
        let body = json!({
            "result": closing.result.as_str(),
            "notes": closing.notes,
            "timeline": closing.timeline,
        });
        self.call(
            "close change",
            reqwest::Method::POST,
            &format!("/{id}/close"),
            Some(body),
            None,
        )
        .await
    }
}
