//! A recording HTTP proxy for tests: forwards every request to an upstream
//! (e.g. moto) unchanged and keeps each request and answer, so a test can
//! assert on what rekey sent (moto's STS accepts any web identity token, so
//! the token itself must be checked here) and which credentials signed it.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One request that went through the proxy, and its answer.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub status: u16,
    pub response: String,
}

impl Exchange {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A field of a form-encoded body (the AWS query protocol, IAM's token call).
    pub fn form(&self, field: &str) -> Option<String> {
        url::form_urlencoded::parse(self.body.as_bytes())
            .find(|(k, _)| k == field)
            .map(|(_, v)| v.into_owned())
    }

    /// The AWS query-protocol action (`Action=...`) or JSON-protocol target
    /// (`X-Amz-Target: secretsmanager.PutSecretValue`), e.g. `PutSecretValue`.
    pub fn aws_action(&self) -> Option<String> {
        self.form("Action").or_else(|| {
            self.header("x-amz-target")
                .and_then(|t| t.rsplit('.').next())
                .map(String::from)
        })
    }

    /// The access key id that signed the request (SigV4 `Credential=`).
    pub fn access_key_id(&self) -> Option<String> {
        let auth = self.header("authorization")?;
        let cred = auth.split("Credential=").nth(1)?;
        cred.split('/').next().map(String::from)
    }

    /// The text of the first `<tag>` element of an XML answer.
    pub fn response_xml(&self, tag: &str) -> Option<String> {
        let open = format!("<{tag}>");
        let start = self.response.find(&open)? + open.len();
        let end = self.response[start..].find(&format!("</{tag}>"))? + start;
        Some(self.response[start..end].to_string())
    }
}

#[derive(Clone)]
pub struct Recorder {
    pub url: String,
    upstream: String,
    http: reqwest::Client,
    pub exchanges: Arc<Mutex<Vec<Exchange>>>,
}

impl Recorder {
    /// Starts a proxy to `upstream` on a free loopback port.
    pub async fn start(upstream: &str) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let recorder = Recorder {
            url: format!("http://{}", listener.local_addr().unwrap()),
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            exchanges: Arc::default(),
        };
        let app = Router::new().fallback(forward).with_state(recorder.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        recorder
    }

    /// Every exchange so far.
    pub fn all(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap().clone()
    }

    /// The exchanges of one AWS action, e.g. `AssumeRoleWithWebIdentity`.
    pub fn action(&self, action: &str) -> Vec<Exchange> {
        self.all()
            .into_iter()
            .filter(|e| e.aws_action().as_deref() == Some(action))
            .collect()
    }
}

async fn forward(
    State(r): State<Recorder>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut req = r
        .http
        .request(method.clone(), format!("{}{path}", r.upstream))
        .body(body.clone());
    for (name, value) in &headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            req = req.header(name, value);
        }
    }
    let (status, answer_headers, answer) = match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let h = resp.headers().clone();
            (status, h, resp.bytes().await.unwrap_or_default())
        }
        Err(_) => (StatusCode::BAD_GATEWAY, HeaderMap::new(), Bytes::new()),
    };
    r.exchanges.lock().unwrap().push(Exchange {
        method: method.to_string(),
        path,
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: status.as_u16(),
        response: String::from_utf8_lossy(&answer).into_owned(),
    });
    let mut out = Response::builder().status(status.as_u16());
    for (name, value) in &answer_headers {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            out = out.header(name.as_str(), value.as_bytes());
        }
    }
    out.body(Body::from(answer))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// The claims of a JWT (its payload, not verified: ask the API server with a
/// TokenReview for that).
pub fn jwt_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}

/// Asks the API server who `token` is for `audience` (a TokenReview): the
/// username (`system:serviceaccount:<ns>:<name>`) when it is authentic,
/// unexpired and meant for that audience.
pub async fn token_review(client: &kube::Client, token: &str, audience: &str) -> Option<String> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let answer = api
        .create(&kube::api::PostParams::default(), &review)
        .await
        .unwrap();
    let status = answer.status?;
    if status.authenticated != Some(true) {
        return None;
    }
    status.user.and_then(|u| u.username)
}
