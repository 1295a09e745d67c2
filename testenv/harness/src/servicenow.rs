//! An emulator of ServiceNow's Change Management REST API
//! (`/api/sn_chg_rest/change`), for tests. No public emulator exists, so this
//! one follows ServiceNow's public API documentation (API reference, "Change
//! Management API") as closely as the tests need, and refuses what the
//! state model refuses. The tests drive it like a change advisory board
//! would (`approve`, `reject`, `cancel`, `set_window`).
//!
//! - Every call needs basic authentication of a known user → else 401 with
//!   `{"error": {"message", "detail"}, "status": "failure"}`.
//! - `POST /api/sn_chg_rest/change/normal`: creates a normal change from the
//!   JSON name-value pairs of the body (New, approval `not requested`).
//! - `POST /api/sn_chg_rest/change/standard/{standard_change_template_id}`:
//!   a standard change from a published template (404 for an unknown one).
//! - `GET /api/sn_chg_rest/change` with `sysparm_query` (`field=value`
//!   terms joined by `^`): `{"result": [...]}`.
//! - `GET /api/sn_chg_rest/change/{sys_id}`; `PATCH` the same path updates
//!   fields; 404 `No Record found` for an unknown sys_id.
//! - Answers are `{"result": {...}}`, each field a `{"value",
//!   "display_value"}` pair (`sysparm_display_value=all`, the API's default).
//! - States: New -5, Assess -4, Authorize -3, Scheduled -2, Implement -1,
//!   Review 0, Closed 3, Canceled 4. Normal model: New → Assess (approval
//!   `requested`) → Authorize → Scheduled (approval `approved`, set by the
//!   approvers) → Implement → Review → Closed (needs `close_code` and
//!   `close_notes`); a rejection sets approval `rejected` and the change back
//!   to New. Standard model (pre-approved): New → Scheduled (approval
//!   `approved` from the template) → Implement → Review → Closed. Any open
//!   change may be Canceled. A transition outside the model → 400
//!   (ServiceNow refuses state changes its model does not allow).
//! - `start_date`/`end_date`: the planned window, `YYYY-MM-DD HH:MM:SS` UTC.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Map, Value, json};

pub const NEW: i64 = -5;
pub const ASSESS: i64 = -4;
pub const AUTHORIZE: i64 = -3;
pub const SCHEDULED: i64 = -2;
pub const IMPLEMENT: i64 = -1;
pub const REVIEW: i64 = 0;
pub const CLOSED: i64 = 3;
pub const CANCELED: i64 = 4;

/// One change_request record: its fields as ServiceNow stores them (values).
#[derive(Clone, Debug)]
pub struct ChangeRecord {
    pub fields: BTreeMap<String, String>,
    /// Every state it passed, in order.
    pub states: Vec<i64>,
}

impl ChangeRecord {
    pub fn get(&self, field: &str) -> &str {
        self.fields
            .get(field)
            .map(String::as_str)
            .unwrap_or_default()
    }
    pub fn state(&self) -> i64 {
        self.get("state").parse().unwrap()
    }
    pub fn number(&self) -> &str {
        self.get("number")
    }
    /// Every text field, for checks that no secret value reached a change.
    pub fn text(&self) -> String {
        self.fields.values().cloned().collect::<Vec<_>>().join("\n")
    }
}

#[derive(Default)]
pub struct Inner {
    /// user -> password
    pub users: HashMap<String, String>,
    /// Published standard change templates (sys_ids).
    pub templates: Vec<String>,
    /// sys_id -> record, in creation order by `order`.
    pub changes: HashMap<String, ChangeRecord>,
    pub order: Vec<String>,
    /// Every request, as "METHOD path".
    pub calls: Vec<String>,
    /// Create the next N changes, then answer 500 anyway (an answer lost
    /// after the change was created).
    pub lose_next_create_answers: u32,
}

#[derive(Clone, Default)]
pub struct ServiceNowEmulator {
    pub state: Arc<Mutex<Inner>>,
    pub url: String,
}

fn error(status: StatusCode, message: &str, detail: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "detail": detail}, "status": "failure"})),
    )
        .into_response()
}

fn state_name(state: i64) -> &'static str {
    match state {
        NEW => "New",
        ASSESS => "Assess",
        AUTHORIZE => "Authorize",
        SCHEDULED => "Scheduled",
        IMPLEMENT => "Implement",
        REVIEW => "Review",
        CLOSED => "Closed",
        CANCELED => "Canceled",
        _ => "",
    }
}

fn approval_name(approval: &str) -> String {
    match approval {
        "not requested" => "Not Yet Requested".into(),
        "requested" => "Requested".into(),
        "approved" => "Approved".into(),
        "rejected" => "Rejected".into(),
        other => other.into(),
    }
}

/// The record as the API answers it: `{"value", "display_value"}` pairs.
fn render(record: &ChangeRecord) -> Value {
    let mut out = Map::new();
    for (k, v) in &record.fields {
        let display = match k.as_str() {
            "state" => state_name(v.parse().unwrap_or(99)).to_string(),
            "approval" => approval_name(v),
            _ => v.clone(),
        };
        out.insert(k.clone(), json!({"value": v, "display_value": display}));
    }
    Value::Object(out)
}

fn now_text() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// A ServiceNow date-time (UTC) from a timestamp.
pub fn date(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S").to_string()
}

fn sys_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn authenticated(st: &Inner, headers: &HeaderMap) -> bool {
    let Some(basic) = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic) else {
        return false;
    };
    let text = String::from_utf8_lossy(&decoded).to_string();
    let Some((user, password)) = text.split_once(':') else {
        return false;
    };
    st.users.get(user).is_some_and(|p| p == password)
}

fn unauthenticated() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "User Not Authenticated",
        "Required to provide Auth information",
    )
}

/// Fields a caller may set: strings (a ServiceNow field takes its text).
fn fields_of(body: &Value) -> BTreeMap<String, String> {
    body.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn create(emu: &ServiceNowEmulator, kind: &str, body: &Value) -> Response {
    let mut st = emu.state.lock().unwrap();
    let id = sys_id();
    let number = format!("CHG{:07}", 30001 + st.order.len());
    let mut fields = fields_of(body);
    // Fields the API sets itself.
    for protected in ["sys_id", "number", "state", "approval", "type"] {
        fields.remove(protected);
    }
    fields.insert("sys_id".into(), id.clone());
    fields.insert("number".into(), number);
    fields.insert("type".into(), kind.into());
    fields.insert("state".into(), NEW.to_string());
    fields.insert("approval".into(), "not requested".into());
    fields.insert("sys_created_on".into(), now_text());
    fields.insert("sys_updated_on".into(), now_text());
    for f in [
        "start_date",
        "end_date",
        "close_code",
        "close_notes",
        "correlation_id",
    ] {
        fields.entry(f.into()).or_default();
    }
    let record = ChangeRecord {
        fields,
        states: vec![NEW],
    };
    st.changes.insert(id.clone(), record.clone());
    st.order.push(id);
    if st.lose_next_create_answers > 0 {
        st.lose_next_create_answers -= 1;
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Operation Failed",
            "the answer was lost",
        );
    }
    axum::Json(json!({"result": render(&record)})).into_response()
}

async fn create_normal(
    State(emu): State<ServiceNowEmulator>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    {
        let mut st = emu.state.lock().unwrap();
        st.calls.push("POST /change/normal".into());
        if !authenticated(&st, &headers) {
            return unauthenticated();
        }
    }
    create(&emu, "normal", &body)
}

async fn create_standard(
    State(emu): State<ServiceNowEmulator>,
    Path(template): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    {
        let mut st = emu.state.lock().unwrap();
        st.calls.push("POST /change/standard".into());
        if !authenticated(&st, &headers) {
            return unauthenticated();
        }
        if !st.templates.contains(&template) {
            return error(
                StatusCode::NOT_FOUND,
                "No Record found",
                "Record doesn't exist or ACL restricts the record retrieval",
            );
        }
    }
    create(&emu, "standard", &body)
}

async fn list(
    State(emu): State<ServiceNowEmulator>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut st = emu.state.lock().unwrap();
    st.calls.push("GET /change".into());
    if !authenticated(&st, &headers) {
        return unauthenticated();
    }
    let terms: Vec<(String, String)> = q
        .get("sysparm_query")
        .map(|query| {
            query
                .split('^')
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let result: Vec<Value> = st
        .order
        .iter()
        .map(|id| &st.changes[id])
        .filter(|r| terms.iter().all(|(k, v)| r.get(k) == v))
        .map(render)
        .collect();
    axum::Json(json!({"result": result})).into_response()
}

async fn read(
    State(emu): State<ServiceNowEmulator>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut st = emu.state.lock().unwrap();
    st.calls.push("GET /change/{sys_id}".into());
    if !authenticated(&st, &headers) {
        return unauthenticated();
    }
    match st.changes.get(&id) {
        Some(r) => axum::Json(json!({"result": render(r)})).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "No Record found",
            "Record doesn't exist or ACL restricts the record retrieval",
        ),
    }
}

/// Whether the state model lets a caller move a change from `from` to `to`.
fn allowed(kind: &str, approval: &str, from: i64, to: i64) -> bool {
    if from == to {
        return true;
    }
    match (kind, from, to) {
        (_, CLOSED | CANCELED, _) => false,
        (_, _, CANCELED) => true,
        ("normal", NEW, ASSESS) => true,
        ("standard", NEW, SCHEDULED) => true,
        (_, SCHEDULED, IMPLEMENT) => approval == "approved",
        (_, IMPLEMENT, REVIEW) => true,
        (_, REVIEW, CLOSED) => true,
        // Assess → Authorize → Scheduled is the approvers' (see `approve`).
        _ => false,
    }
}

async fn patch(
    State(emu): State<ServiceNowEmulator>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut st = emu.state.lock().unwrap();
    st.calls.push("PATCH /change/{sys_id}".into());
    if !authenticated(&st, &headers) {
        return unauthenticated();
    }
    let Some(record) = st.changes.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "No Record found",
            "Record doesn't exist or ACL restricts the record retrieval",
        );
    };
    let mut fields = fields_of(&body);
    for protected in ["sys_id", "number", "type", "approval"] {
        fields.remove(protected);
    }
    if let Some(to) = fields.get("state") {
        let Ok(to) = to.parse::<i64>() else {
            return error(StatusCode::BAD_REQUEST, "Invalid state", to);
        };
        let from = record.state();
        if !allowed(record.get("type"), record.get("approval"), from, to) {
            return error(
                StatusCode::BAD_REQUEST,
                "State transition not allowed",
                &format!("{} to {}", state_name(from), state_name(to)),
            );
        }
        let close_code = fields
            .get("close_code")
            .map(String::as_str)
            .unwrap_or(record.get("close_code"));
        let close_notes = fields
            .get("close_notes")
            .map(String::as_str)
            .unwrap_or(record.get("close_notes"));
        if to == CLOSED && (close_code.is_empty() || close_notes.is_empty()) {
            return error(
                StatusCode::BAD_REQUEST,
                "Data Policy Exception",
                "The following fields are mandatory: Close code, Close notes",
            );
        }
        if to != from {
            record.states.push(to);
        }
        if record.get("type") == "normal" && from == NEW && to == ASSESS {
            record.fields.insert("approval".into(), "requested".into());
        }
        if record.get("type") == "standard" && to == SCHEDULED {
            // The template's approval.
            record.fields.insert("approval".into(), "approved".into());
        }
    }
    for (k, v) in fields {
        record.fields.insert(k, v);
    }
    record.fields.insert("sys_updated_on".into(), now_text());
    axum::Json(json!({"result": render(record)})).into_response()
}

impl ServiceNowEmulator {
    /// Starts the emulator on a free loopback port.
    pub async fn start() -> ServiceNowEmulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut emu = ServiceNowEmulator {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..Default::default()
        };
        emu.state = Arc::default();
        let app = Router::new()
            .route("/api/sn_chg_rest/change", get(list))
            .route("/api/sn_chg_rest/change/normal", post(create_normal))
            .route(
                "/api/sn_chg_rest/change/standard/{template}",
                post(create_standard),
            )
            .route("/api/sn_chg_rest/change/{id}", get(read).patch(patch))
            .with_state(emu.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        emu
    }

    pub fn add_user(&self, user: &str, password: &str) {
        self.state
            .lock()
            .unwrap()
            .users
            .insert(user.into(), password.into());
    }

    pub fn add_template(&self, sys_id: &str) {
        self.state.lock().unwrap().templates.push(sys_id.into());
    }

    /// Every change, in creation order.
    pub fn changes(&self) -> Vec<ChangeRecord> {
        let st = self.state.lock().unwrap();
        st.order.iter().map(|id| st.changes[id].clone()).collect()
    }

    /// The change whose correlation id ends with `-<environment>`.
    pub fn change_for(&self, environment: &str) -> Option<ChangeRecord> {
        let suffix = format!("-{environment}");
        self.changes()
            .into_iter()
            .find(|c| c.get("correlation_id").ends_with(&suffix))
    }

    fn update(&self, number: &str, f: impl FnOnce(&mut ChangeRecord)) {
        let mut st = self.state.lock().unwrap();
        let record = st
            .changes
            .values_mut()
            .find(|r| r.number() == number)
            .expect("no such change");
        f(record);
        record.fields.insert("sys_updated_on".into(), now_text());
    }

    /// The approvers approve: Assess → Authorize → Scheduled, approved.
    pub fn approve(&self, number: &str) {
        self.update(number, |r| {
            assert_eq!(r.state(), ASSESS, "only a change in Assess is approved");
            r.states.extend([AUTHORIZE, SCHEDULED]);
            r.fields.insert("state".into(), SCHEDULED.to_string());
            r.fields.insert("approval".into(), "approved".into());
        });
    }

    /// The approvers reject: approval rejected, the change back to New.
    pub fn reject(&self, number: &str) {
        self.update(number, |r| {
            r.states.push(NEW);
            r.fields.insert("state".into(), NEW.to_string());
            r.fields.insert("approval".into(), "rejected".into());
        });
    }

    pub fn cancel(&self, number: &str) {
        self.update(number, |r| {
            r.states.push(CANCELED);
            r.fields.insert("state".into(), CANCELED.to_string());
        });
    }

    /// Plans (or re-plans) the change window.
    pub fn set_window(&self, number: &str, start: jiff::Timestamp, end: jiff::Timestamp) {
        self.update(number, |r| {
            r.fields.insert("start_date".into(), date(start));
            r.fields.insert("end_date".into(), date(end));
        });
    }
}
