//! An emulator of IBM Cloud IAM's token endpoint and of the IBM Cloud Secrets
//! Manager v2 API, for tests. No public emulator exists, so this one follows
//! the public API (cloud.ibm.com/apidocs/secrets-manager/secrets-manager-v2,
//! and the behaviour of IBM's Go SDK that ESO uses) as closely as the tests
//! need, and rejects what the real service rejects:
//!
//! - `POST /identity/token`, form-encoded, grant types `apikey` and `cr-token`
//!   (trusted profiles, what ESO's containerAuth uses: `cr_token` and
//!   `profile_id` or `profile_name`, as IBM's SDKs send them); wrong key →
//!   400. A cr-token is accepted when it is one of `cr_tokens`, or a
//!   ServiceAccount token (a JWT with audience `iam`, unexpired) whose
//!   `sub` is a ServiceAccount the profile links (IBM's compute-resource
//!   link: cluster, namespace, ServiceAccount); every cr-token request is
//!   kept in `cr_token_requests` so a test can check the token is genuine
//!   (the emulator cannot verify the cluster's signature: a TokenReview can).
//! - every `/api/v2` call needs `Authorization: Bearer <unexpired token>` → 401.
//! - `GET /api/v2/secrets/{id}`; by name:
//!   `GET /api/v2/secret_groups/{group}/secret_types/{type}/secrets/{name}`.
//! - `POST /api/v2/secrets/{id}/versions` (arbitrary: `payload`; kv: `data`;
//!   username_password: `password`) → 201; the old current becomes `previous`,
//!   older versions lose their payload. 412 when the previous version is locked.
//! - `GET /api/v2/secrets/{id}/versions/{version_id|current|previous}/metadata`.
//! - `POST|DELETE /api/v2/secrets/{id}/versions/{version_id}/locks_bulk`.
//! - errors as `{"errors":[{"code","message","more_info"}],"status_code","trace"}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub struct Version {
    pub id: String,
    pub created_at: String,
    /// arbitrary: Value::String; kv: Value::Object; username_password: {"username","password"}.
    pub payload: Option<Value>,
    pub custom_metadata: Value,
    pub locks: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct SmSecret {
    pub id: String,
    pub name: String,
    pub group: String,
    pub secret_type: String,
    pub created_at: String,
    /// Oldest first; the last one is `current`, the one before `previous`.
    pub versions: Vec<Version>,
}

/// One cr-token grant request as IAM received it.
#[derive(Clone, Debug)]
pub struct CrTokenRequest {
    pub cr_token: String,
    pub profile_id: Option<String>,
    pub profile_name: Option<String>,
    /// Whether IAM answered with an access token.
    pub granted: bool,
}

#[derive(Default)]
pub struct Inner {
    pub api_keys: Vec<String>,
    pub cr_tokens: Vec<String>,
    /// Trusted profile id -> the ServiceAccounts it trusts
    /// (`system:serviceaccount:<ns>:<name>`).
    pub profile_links: HashMap<String, Vec<String>>,
    /// Every cr-token grant request, in order.
    pub cr_token_requests: Vec<CrTokenRequest>,
    /// token -> expiry (unix seconds)
    pub tokens: HashMap<String, i64>,
    pub secrets: HashMap<String, SmSecret>,
    /// Every request, as "METHOD path", for tests that count calls.
    pub calls: Vec<String>,
    /// When each of `calls` arrived.
    pub call_times: Vec<std::time::Instant>,
    /// Answer the next N version writes with this status (e.g. 503) first.
    pub fail_next_writes: Vec<u16>,
    /// Create the next N versions, then answer with this status anyway (a
    /// response lost after the service did the work).
    pub fail_after_create: Vec<u16>,
}

#[derive(Clone, Default)]
pub struct IbmEmulator {
    pub state: Arc<Mutex<Inner>>,
    pub url: String,
}

fn now_unix() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        u16::from_be_bytes([b[8], b[9]]) & 0x0fff,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "errors": [{"code": code, "message": message, "more_info": "https://cloud.ibm.com/apidocs/secrets-manager/secrets-manager-v2"}],
            "status_code": status.as_u16(),
            "trace": uuid(),
        })),
    )
        .into_response()
}

impl SmSecret {
    fn current(&self) -> &Version {
        self.versions.last().expect("a secret has a version")
    }

    fn alias_of(&self, idx: usize) -> Option<&'static str> {
        let n = self.versions.len();
        if idx + 1 == n {
            Some("current")
        } else if idx + 2 == n {
            Some("previous")
        } else {
            None
        }
    }

    fn base_json(&self) -> Value {
        json!({
            "created_by": "iam-ServiceId-emulator",
            "created_at": self.created_at,
            "crn": format!("crn:v1:bluemix:public:secrets-manager:us-south:a/emulator:instance:secret:{}", self.id),
            "custom_metadata": {},
            "description": "",
            "downloaded": true,
            "id": self.id,
            "labels": [],
            "locks_total": self.versions.iter().map(|v| v.locks.len()).sum::<usize>(),
            "name": self.name,
            "secret_group_id": self.group,
            "secret_type": self.secret_type,
            "state": 1,
            "state_description": "active",
            "updated_at": self.current().created_at,
            "versions_total": self.versions.len(),
        })
    }

    fn with_payload(&self, mut v: Value, payload: &Option<Value>) -> Value {
        match (self.secret_type.as_str(), payload) {
            ("arbitrary", Some(p)) => v["payload"] = p.clone(),
            ("kv", Some(p)) => v["data"] = p.clone(),
            ("username_password", Some(p)) => {
                v["username"] = p["username"].clone();
                v["password"] = p["password"].clone();
            }
            _ => {}
        }
        v
    }

    fn version_json(&self, idx: usize, with_payload: bool) -> Value {
        let ver = &self.versions[idx];
        let mut v = json!({
            "auto_rotated": false,
            "created_by": "iam-ServiceId-emulator",
            "created_at": ver.created_at,
            "downloaded": false,
            "id": ver.id,
            "secret_name": self.name,
            "secret_type": self.secret_type,
            "secret_group_id": self.group,
            "payload_available": ver.payload.is_some(),
            "secret_id": self.id,
            "version_custom_metadata": ver.custom_metadata,
        });
        if let Some(alias) = self.alias_of(idx) {
            v["alias"] = alias.into();
        }
        if with_payload {
            self.with_payload(v, &ver.payload)
        } else {
            v
        }
    }

    fn version_index(&self, id: &str) -> Option<usize> {
        let n = self.versions.len();
        match id {
            "current" => Some(n - 1),
            "previous" if n >= 2 => Some(n - 2),
            "previous" => None,
            other => self.versions.iter().position(|v| v.id == other),
        }
    }
}

type S = IbmEmulator;

fn authorized(s: &S, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    else {
        return false;
    };
    s.state
        .lock()
        .unwrap()
        .tokens
        .get(token)
        .is_some_and(|exp| *exp > now_unix())
}

async fn token(
    State(s): State<S>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    s.state.lock().unwrap().record("POST /identity/token");
    let ct = headers
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"errorCode": "BXNIM0109E", "errorMessage": "Property missing or empty."}),
            ),
        )
            .into_response();
    }
    let ok = {
        let st = s.state.lock().unwrap();
        match form.get("grant_type").map(String::as_str) {
            Some("urn:ibm:params:oauth:grant-type:apikey") => {
                form.get("apikey").is_some_and(|k| st.api_keys.contains(k))
            }
            Some("urn:ibm:params:oauth:grant-type:cr-token") => {
                let token = form.get("cr_token").map(|t| t.trim().to_string());
                let profile = form.get("profile_id").or(form.get("profile_name"));
                let ok = match (&token, profile) {
                    (Some(t), Some(p)) => {
                        st.cr_tokens.contains(t)
                            || st
                                .profile_links
                                .get(p)
                                .is_some_and(|links| linked_service_account(t, links))
                    }
                    _ => false,
                };
                drop(st);
                s.state
                    .lock()
                    .unwrap()
                    .cr_token_requests
                    .push(CrTokenRequest {
                        cr_token: token.unwrap_or_default(),
                        profile_id: form.get("profile_id").cloned(),
                        profile_name: form.get("profile_name").cloned(),
                        granted: ok,
                    });
                ok
            }
            _ => {
                return (StatusCode::BAD_REQUEST, axum::Json(json!({"errorCode": "BXNIM0103E", "errorMessage": "Grant type not supported."}))).into_response();
            }
        }
    };
    if !ok {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found.", "context": {"requestId": uuid()}})),
        )
            .into_response();
    }
    let access = format!("emu-{}", uuid());
    let exp = now_unix() + 3600;
    s.state.lock().unwrap().tokens.insert(access.clone(), exp);
    axum::Json(json!({
        "access_token": access,
        "refresh_token": "not_supported",
        "ims_user_id": 1234567,
        "token_type": "Bearer",
        "expires_in": 3600,
        "expiration": exp,
        "scope": "ibm openid",
    }))
    .into_response()
}

/// Whether `token` is an unexpired ServiceAccount token for audience `iam`
/// of one of `links` (its claims only: the signature is the cluster's).
fn linked_service_account(token: &str, links: &[String]) -> bool {
    let claims = crate::recorder::jwt_claims(token);
    let aud_ok = match &claims["aud"] {
        Value::String(a) => a == "iam",
        Value::Array(a) => a.iter().any(|x| x == "iam"),
        _ => false,
    };
    let unexpired = claims["exp"].as_i64().is_some_and(|e| e > now_unix());
    let sub_ok = claims["sub"]
        .as_str()
        .is_some_and(|sub| links.iter().any(|l| l == sub));
    aud_ok && unexpired && sub_ok
}

async fn get_secret(State(s): State<S>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    s.state
        .lock()
        .unwrap()
        .record(format!("GET /api/v2/secrets/{id}"));
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized");
    }
    let st = s.state.lock().unwrap();
    match st.secrets.get(&id) {
        Some(sec) => {
            axum::Json(sec.with_payload(sec.base_json(), &sec.current().payload)).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            "Secret not found",
        ),
    }
}

async fn get_secret_by_name(
    State(s): State<S>,
    headers: HeaderMap,
    Path((group, typ, name)): Path<(String, String, String)>,
) -> Response {
    s.state.lock().unwrap().record(format!(
        "GET /api/v2/secret_groups/{group}/secret_types/{typ}/secrets/{name}"
    ));
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized");
    }
    let st = s.state.lock().unwrap();
    match st
        .secrets
        .values()
        .find(|x| x.group == group && x.secret_type == typ && x.name == name)
    {
        Some(sec) => {
            axum::Json(sec.with_payload(sec.base_json(), &sec.current().payload)).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            "Secret not found",
        ),
    }
}

async fn create_version(
    State(s): State<S>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: String,
) -> Response {
    s.state
        .lock()
        .unwrap()
        .record(format!("POST /api/v2/secrets/{id}/versions"));
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized");
    }
    let ct = headers
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Content-Type must be application/json",
        );
    }
    let mut st = s.state.lock().unwrap();
    if !st.fail_next_writes.is_empty() {
        let code = st.fail_next_writes.remove(0);
        return error(
            StatusCode::from_u16(code).unwrap(),
            "injected",
            "injected failure",
        );
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "The request body is not valid JSON",
        );
    };
    let Some(sec) = st.secrets.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            "Secret not found",
        );
    };
    let payload = match sec.secret_type.as_str() {
        "arbitrary" => match req.get("payload") {
            Some(Value::String(p)) if !p.is_empty() => Value::String(p.clone()),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "payload is required for arbitrary secrets",
                );
            }
        },
        "kv" => match req.get("data") {
            Some(Value::Object(o)) if !o.is_empty() => Value::Object(o.clone()),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "data is required for kv secrets",
                );
            }
        },
        "username_password" => match req.get("password") {
            Some(Value::String(p)) if !p.is_empty() => {
                json!({"username": sec.current().payload.as_ref().map(|c| c["username"].clone()), "password": p})
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "password is required",
                );
            }
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "this secret type cannot get versions this way",
            );
        }
    };
    // The previous version would lose its payload: refused while it is locked.
    let n = sec.versions.len();
    if n >= 2 && !sec.versions[n - 2].locks.is_empty() {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "secret_version_locked",
            "The requested action can't be completed because the secret version is locked.",
        );
    }
    if n >= 2 {
        sec.versions[n - 2].payload = None;
    }
    sec.versions.push(Version {
        id: uuid(),
        created_at: rfc3339(),
        payload: Some(payload),
        custom_metadata: req
            .get("version_custom_metadata")
            .cloned()
            .unwrap_or(json!({})),
        locks: vec![],
    });
    let idx = sec.versions.len() - 1;
    let created = sec.version_json(idx, true);
    if !st.fail_after_create.is_empty() {
        let code = st.fail_after_create.remove(0);
        return error(
            StatusCode::from_u16(code).unwrap(),
            "injected",
            "injected failure after create",
        );
    }
    (StatusCode::CREATED, axum::Json(created)).into_response()
}

async fn version_metadata(
    State(s): State<S>,
    headers: HeaderMap,
    Path((id, vid)): Path<(String, String)>,
) -> Response {
    s.state
        .lock()
        .unwrap()
        .record(format!("GET /api/v2/secrets/{id}/versions/{vid}/metadata"));
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized");
    }
    let st = s.state.lock().unwrap();
    let Some(sec) = st.secrets.get(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            "Secret not found",
        );
    };
    match sec.version_index(&vid) {
        Some(i) => axum::Json(sec.version_json(i, false)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "version_not_found",
            "Secret version not found",
        ),
    }
}

async fn locks_bulk(
    State(s): State<S>,
    headers: HeaderMap,
    method: axum::http::Method,
    Path((id, vid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: String,
) -> Response {
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized");
    }
    let mut st = s.state.lock().unwrap();
    let Some(sec) = st.secrets.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            "Secret not found",
        );
    };
    let Some(i) = sec.version_index(&vid) else {
        return error(
            StatusCode::NOT_FOUND,
            "version_not_found",
            "Secret version not found",
        );
    };
    let status = if method == axum::http::Method::POST {
        let req: Value = serde_json::from_str(&body).unwrap_or(json!({}));
        for l in req["locks"].as_array().cloned().unwrap_or_default() {
            if let Some(name) = l["name"].as_str() {
                sec.versions[i].locks.push(name.to_string());
            }
        }
        StatusCode::CREATED
    } else {
        let names: Vec<String> = q
            .get("name")
            .map(|n| n.split(',').map(String::from).collect())
            .unwrap_or_default();
        sec.versions[i].locks.retain(|l| !names.contains(l));
        StatusCode::OK
    };
    let versions: Vec<Value> = sec
        .versions
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.locks.is_empty())
        .map(|(j, v)| json!({"version_id": v.id, "version_alias": sec.alias_of(j), "locks": v.locks, "payload_available": v.payload.is_some()}))
        .collect();
    (
        status,
        axum::Json(json!({"secret_id": sec.id, "secret_group_id": sec.group, "secret_type": sec.secret_type, "secret_name": sec.name, "versions": versions})),
    )
        .into_response()
}

impl Inner {
    fn record(&mut self, call: impl Into<String>) {
        self.calls.push(call.into());
        self.call_times.push(std::time::Instant::now());
    }
}

impl IbmEmulator {
    /// Starts the emulator on a free loopback port.
    pub async fn start() -> IbmEmulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut emu = IbmEmulator {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..Default::default()
        };
        emu.state = Arc::default();
        let app = Router::new()
            .route("/identity/token", post(token))
            .route("/api/v2/secrets/{id}", get(get_secret))
            .route(
                "/api/v2/secret_groups/{group}/secret_types/{typ}/secrets/{name}",
                get(get_secret_by_name),
            )
            .route("/api/v2/secrets/{id}/versions", post(create_version))
            .route(
                "/api/v2/secrets/{id}/versions/{vid}/metadata",
                get(version_metadata),
            )
            .route(
                "/api/v2/secrets/{id}/versions/{vid}/locks_bulk",
                post(locks_bulk).delete(locks_bulk),
            )
            .with_state(emu.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        emu
    }

    pub fn add_api_key(&self, key: &str) {
        self.state.lock().unwrap().api_keys.push(key.into());
    }

    pub fn add_cr_token(&self, token: &str) {
        self.state.lock().unwrap().cr_tokens.push(token.into());
    }

    /// Creates trusted profile `profile_id` trusting ServiceAccount
    /// `name` of `namespace` (a compute-resource link).
    pub fn link_profile(&self, profile_id: &str, namespace: &str, name: &str) {
        self.state
            .lock()
            .unwrap()
            .profile_links
            .entry(profile_id.into())
            .or_default()
            .push(format!("system:serviceaccount:{namespace}:{name}"));
    }

    /// Every cr-token grant request so far.
    pub fn cr_token_requests(&self) -> Vec<CrTokenRequest> {
        self.state.lock().unwrap().cr_token_requests.clone()
    }

    /// Creates a secret with one version; returns its id.
    pub fn create_secret(&self, name: &str, secret_type: &str, payload: Value) -> String {
        let id = uuid();
        let secret = SmSecret {
            id: id.clone(),
            name: name.into(),
            group: "default".into(),
            secret_type: secret_type.into(),
            created_at: rfc3339(),
            versions: vec![Version {
                id: uuid(),
                created_at: rfc3339(),
                payload: Some(payload),
                custom_metadata: json!({}),
                locks: vec![],
            }],
        };
        self.state
            .lock()
            .unwrap()
            .secrets
            .insert(id.clone(), secret);
        id
    }

    pub fn secret(&self, id: &str) -> SmSecret {
        self.state.lock().unwrap().secrets[id].clone()
    }

    pub fn lock_version(&self, id: &str, index_from_end: usize, lock: &str) {
        let mut st = self.state.lock().unwrap();
        let s = st.secrets.get_mut(id).unwrap();
        let n = s.versions.len();
        s.versions[n - 1 - index_from_end].locks.push(lock.into());
    }
}
