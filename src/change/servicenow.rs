//! ServiceNow Change Management REST API (`/api/sn_chg_rest/change`), as
//! documented by ServiceNow:
//!
//! - basic authentication (a ServiceNow user allowed to create and update
//!   change requests);
//! - `POST /api/sn_chg_rest/change/normal` and
//!   `POST /api/sn_chg_rest/change/standard/{standard_change_template_id}`
//!   create a change (fields as JSON name-value pairs);
//! - `GET /api/sn_chg_rest/change?sysparm_query=correlation_id=...` finds one
//!   (rekey sets `correlation_id` to rotation id + environment);
//! - `GET /api/sn_chg_rest/change/{sys_id}` reads one, `PATCH` the same path
//!   updates fields (`state`, `close_code`, `close_notes`);
//! - answers are `{"result": {...}}` (lists: `{"result": [...]}`), each field
//!   a `{"value", "display_value"}` pair;
//! - `state`: New -5, Assess -4, Authorize -3, Scheduled -2, Implement -1,
//!   Review 0, Closed 3, Canceled 4; `approval`: not requested, requested,
//!   approved, rejected; `start_date`/`end_date`: the planned window
//!   (`YYYY-MM-DD HH:MM:SS`, UTC in `value`).
//!
//! Normal changes: rekey moves a new change to Assess (requests approval) and
//! waits until the approvers have it Scheduled with approval `approved`.
//! Standard changes (pre-approved templates): rekey moves a new change to
//! Scheduled, and still reads the approval back.

use async_trait::async_trait;
use jiff::Timestamp;
use serde_json::{Value, json};

use super::{Change, ChangeSystem, CloseResult, Closing, Opening, Standing, status_error};
use crate::crd::{ServiceNowChangeType, ServiceNowChanges};
use crate::deps::Deps;
use crate::error::{Error, Result};
use crate::reason::Reason;

pub const NEW: i64 = -5;
pub const ASSESS: i64 = -4;
pub const SCHEDULED: i64 = -2;
pub const IMPLEMENT: i64 = -1;
pub const REVIEW: i64 = 0;
pub const CLOSED: i64 = 3;
pub const CANCELED: i64 = 4;

pub struct ServiceNow {
    deps: Deps,
    spec: ServiceNowChanges,
    namespace: String,
}

impl ServiceNow {
    pub fn new(spec: &ServiceNowChanges, deps: &Deps, namespace: &str) -> Self {
        Self {
            deps: deps.clone(),
            spec: spec.clone(),
            namespace: namespace.into(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/api/sn_chg_rest/change{path}",
            self.spec.instance_url.trim_end_matches('/')
        )
    }

    /// One call; the `result` of the answer.
    async fn call(
        &self,
        call: &'static str,
        method: reqwest::Method,
        url: String,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value> {
        let secret = &self.spec.credentials_secret_ref.name;
        let user = self
            .deps
            .secret_key(&self.namespace, secret, "username")
            .await?;
        let password = self
            .deps
            .secret_key(&self.namespace, secret, "password")
            .await?;
        let url = reqwest::Url::parse_with_params(&url, query).map_err(|_| {
            Error::permanent(Reason::InvalidSpec, "serviceNow.instanceUrl is not a URL")
        })?;
        let mut req = self
            .deps
            .http
            .request(method, url)
            .header("Accept", "application/json")
            .basic_auth(user.expose(), Some(password.expose()));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let started = std::time::Instant::now();
        let result = req.send().await;
        let outcome = crate::deps::outcome(matches!(&result, Ok(r) if r.status().is_success()));
        self.deps
            .metrics
            .provider_call("servicenow", call, outcome, started.elapsed());
        let resp = result.map_err(|e| {
            Error::http(
                Reason::ChangeSystemUnreachable,
                &format!("ServiceNow {call}"),
                &e,
            )
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error("ServiceNow", call, status));
        }
        let body: Value = resp.json().await.map_err(|_| bad(call))?;
        body.get("result").cloned().ok_or_else(|| bad(call))
    }

    async fn patch(&self, call: &'static str, id: &str, fields: Value) -> Result<Change> {
        let result = self
            .call(
                call,
                reqwest::Method::PATCH,
                self.url(&format!("/{id}")),
                &[],
                Some(fields),
            )
            .await?;
        parse(&result).ok_or_else(|| bad(call))
    }
}

fn bad(call: &str) -> Error {
    Error::permanent(
        Reason::ChangeSystemRejected,
        format!("ServiceNow {call} answered without a readable change"),
    )
}

/// A field's `value` (a plain string is taken as it is).
fn value<'a>(change: &'a Value, field: &str) -> &'a str {
    let f = &change[field];
    f.get("value")
        .and_then(Value::as_str)
        .or(f.as_str())
        .unwrap_or_default()
}

/// A field's `display_value`, else its value.
fn display<'a>(change: &'a Value, field: &str) -> &'a str {
    change[field]
        .get("display_value")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| value(change, field))
}

/// `YYYY-MM-DD HH:MM:SS` in UTC; empty: no window.
fn date(change: &Value, field: &str) -> Option<Timestamp> {
    let text = value(change, field);
    let civil = jiff::civil::DateTime::strptime("%Y-%m-%d %H:%M:%S", text).ok()?;
    civil
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

/// The name ServiceNow gives a state value.
pub fn state_name(state: i64) -> &'static str {
    match state {
        NEW => "New",
        ASSESS => "Assess",
        -3 => "Authorize",
        SCHEDULED => "Scheduled",
        IMPLEMENT => "Implement",
        REVIEW => "Review",
        CLOSED => "Closed",
        CANCELED => "Canceled",
        _ => "Unknown",
    }
}

/// A change from an answer's `result`.
pub fn parse(change: &Value) -> Option<Change> {
    let id = value(change, "sys_id");
    if id.is_empty() {
        return None;
    }
    let state: i64 = value(change, "state").parse().ok()?;
    let approval = value(change, "approval");
    let standing = match (state, approval) {
        (CANCELED, _) | (_, "rejected") => Standing::Rejected,
        (CLOSED, _) => Standing::Closed,
        (IMPLEMENT | REVIEW, _) => Standing::Implementing,
        (SCHEDULED, "approved") => Standing::Approved,
        (NEW, "not requested" | "") => Standing::New,
        _ => Standing::Pending,
    };
    let state_text = match display(change, "state") {
        s if s.parse::<i64>().is_ok() => state_name(state).to_string(),
        s => s.to_string(),
    };
    Some(Change {
        id: id.to_string(),
        number: value(change, "number").to_string(),
        state: state_text,
        approval: display(change, "approval").to_string(),
        standing,
        ended: matches!(state, CLOSED | CANCELED),
        window_start: date(change, "start_date"),
        window_end: date(change, "end_date"),
    })
}

#[async_trait]
impl ChangeSystem for ServiceNow {
    async fn find(&self, correlation_id: &str) -> Result<Option<Change>> {
        let query = format!("correlation_id={correlation_id}");
        let result = self
            .call(
                "find change",
                reqwest::Method::GET,
                self.url(""),
                &[("sysparm_query", &query)],
                None,
            )
            .await?;
        let list = result.as_array().ok_or_else(|| bad("find change"))?;
        Ok(list
            .iter()
            .filter(|c| value(c, "correlation_id") == correlation_id)
            .find_map(parse))
    }

    async fn open(&self, o: &Opening) -> Result<Change> {
        let path = match (self.spec.change_type, &self.spec.standard_template_id) {
            (ServiceNowChangeType::Standard, Some(template)) => format!("/standard/{template}"),
            (ServiceNowChangeType::Standard, None) => {
                return Err(Error::permanent(
                    Reason::InvalidSpec,
                    "serviceNow.type Standard needs standardTemplateId",
                ));
            }
            (ServiceNowChangeType::Normal, _) => "/normal".to_string(),
        };
        let mut fields = json!({
            "short_description": o.short_description,
            "description": o.description,
            "correlation_id": o.correlation_id,
            "correlation_display": "rekey",
        });
        if let Some(group) = &self.spec.assignment_group {
            fields["assignment_group"] = json!(group);
        }
        let result = self
            .call(
                "open change",
                reqwest::Method::POST,
                self.url(&path),
                &[],
                Some(fields),
            )
            .await?;
        parse(&result).ok_or_else(|| bad("open change"))
    }

    async fn request_approval(&self, id: &str) -> Result<Change> {
        let next = match self.spec.change_type {
            ServiceNowChangeType::Normal => ASSESS,
            ServiceNowChangeType::Standard => SCHEDULED,
        };
        self.patch(
            "request change approval",
            id,
            json!({"state": next.to_string()}),
        )
        .await
    }

    async fn read(&self, id: &str) -> Result<Change> {
        let result = self
            .call(
                "read change",
                reqwest::Method::GET,
                self.url(&format!("/{id}")),
                &[],
                None,
            )
            .await?;
        parse(&result).ok_or_else(|| bad("read change"))
    }

    async fn start(&self, id: &str) -> Result<Change> {
        self.patch("start change", id, json!({"state": IMPLEMENT.to_string()}))
            .await
    }

    async fn close(&self, id: &str, closing: &Closing) -> Result<Change> {
        let (result, notes) = (closing.result, &closing.notes);
        let raw = self
            .call(
                "read change",
                reqwest::Method::GET,
                self.url(&format!("/{id}")),
                &[],
                None,
            )
            .await?;
        let change = parse(&raw).ok_or_else(|| bad("read change"))?;
        if change.ended {
            return Ok(change);
        }
        if result == CloseResult::Canceled || change.standing != Standing::Implementing {
            return self
                .patch(
                    "cancel change",
                    id,
                    json!({"state": CANCELED.to_string(), "close_notes": notes, "work_notes": notes}),
                )
                .await;
        }
        if value(&raw, "state") != REVIEW.to_string() {
            self.patch("review change", id, json!({"state": REVIEW.to_string()}))
                .await?;
        }
        let code = match result {
            CloseResult::Successful => "successful",
            _ => "unsuccessful",
        };
        self.patch(
            "close change",
            id,
            json!({"state": CLOSED.to_string(), "close_code": code, "close_notes": notes}),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_read_from_value_and_display_value_pairs() {
        let answer = json!({
            "sys_id": {"value": "abc", "display_value": "abc"},
            "number": {"value": "CHG0030001", "display_value": "CHG0030001"},
            "state": {"value": "-2", "display_value": "Scheduled"},
            "approval": {"value": "approved", "display_value": "Approved"},
            "start_date": {"value": "2026-11-27 07:00:00", "display_value": "2026-11-27 08:00:00"},
            "end_date": {"value": "", "display_value": ""},
        });
        let c = parse(&answer).unwrap();
        assert_eq!(c.standing, Standing::Approved);
        assert_eq!(c.state, "Scheduled");
        assert_eq!(c.approval, "Approved");
        assert_eq!(
            c.window_start,
            Some("2026-11-27T07:00:00Z".parse().unwrap())
        );
        assert_eq!(c.window_end, None);
    }

    #[test]
    fn approval_is_read_back_never_assumed() {
        let with = |state: &str, approval: &str| {
            parse(&json!({"sys_id": "x", "state": state, "approval": approval}))
                .unwrap()
                .standing
        };
        // Scheduled without an approval is not approved.
        assert_eq!(with("-2", "requested"), Standing::Pending);
        assert_eq!(with("-3", "approved"), Standing::Pending);
        assert_eq!(with("-5", "not requested"), Standing::New);
        assert_eq!(with("-5", "rejected"), Standing::Rejected);
        assert_eq!(with("4", "approved"), Standing::Rejected);
        assert_eq!(with("3", "approved"), Standing::Closed);
        assert_eq!(with("-1", "approved"), Standing::Implementing);
    }
}
