//! A real Keycloak server (the Quarkus distribution from Maven Central, built
//! by `make testenv`) in dev mode with the preview feature
//! `client-secret-rotation`, one per test process, in the shared cluster's
//! process group (so the watchdog reaps it too). Plus admin helpers for tests.

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::cluster::{Cluster, free_port};

pub struct KeycloakServer {
    pub url: String,
    pub admin_user: String,
    pub admin_password: String,
    pub startup: Duration,
}

static KEYCLOAK: OnceLock<Result<KeycloakServer, String>> = OnceLock::new();

/// The Keycloak of this test process, started on first use in `c` (the
/// shared cluster).
/// Startup runs on its own thread, so it can be called from any test's runtime.
pub fn keycloak(c: &'static Cluster) -> &'static KeycloakServer {
    let started = KEYCLOAK.get_or_init(|| {
        std::thread::spawn(move || start(c).map_err(|e| format!("{e:#}")))
            .join()
            .unwrap_or_else(|_| Err("the Keycloak start thread panicked".into()))
    });
    match started {
        Ok(k) => k,
        Err(e) => panic!("Keycloak failed to start: {e}"),
    }
}

fn start(c: &Cluster) -> anyhow::Result<KeycloakServer> {
    let home = c
        .bins
        .all
        .get("REKEY_KEYCLOAK_HOME")
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!("REKEY_KEYCLOAK_HOME missing in target/testenv.env: run `make testenv`")
        })?;
    let java = c.bins.all.get("REKEY_JAVA_HOME").cloned().ok_or_else(|| {
        anyhow::anyhow!("REKEY_JAVA_HOME missing: run `make testenv` (needs a JDK >= 21)")
    })?;
    let (http, mgmt) = (free_port(), free_port());
    let password = super::canary("kc-admin");
    let log = fs::File::create(c.dir.join("keycloak.log"))?;
    let begin = Instant::now();
    Command::new(format!("{home}/bin/kc.sh"))
        .args([
            "start-dev",
            "--http-host=127.0.0.1",
            &format!("--http-port={http}"),
            &format!("--http-management-port={mgmt}"),
            "--health-enabled=true",
            "--features=client-secret-rotation",
            "--db=dev-mem",
            "--log-level=warn",
        ])
        .env("JAVA_HOME", &java)
        .env("KC_BOOTSTRAP_ADMIN_USERNAME", "admin")
        .env("KC_BOOTSTRAP_ADMIN_PASSWORD", &password)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(c.process_group())
        .spawn()?;
    let health = format!("http://127.0.0.1:{mgmt}/health/ready");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    while begin.elapsed() < Duration::from_secs(240) {
        if client
            .get(&health)
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            let startup = begin.elapsed();
            eprintln!("[testenv] Keycloak ready in {:.1}s", startup.as_secs_f64());
            return Ok(KeycloakServer {
                url: format!("http://127.0.0.1:{http}"),
                admin_user: "admin".into(),
                admin_password: password,
                startup,
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    anyhow::bail!(
        "Keycloak not ready after 240s (log: {})",
        c.dir.join("keycloak.log").display()
    )
}

impl KeycloakServer {
    async fn admin_token(&self) -> String {
        let r: Value = reqwest::Client::new()
            .post(format!(
                "{}/realms/master/protocol/openid-connect/token",
                self.url
            ))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", &self.admin_user),
                ("password", &self.admin_password),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["access_token"].as_str().unwrap().to_string()
    }

    /// An admin API call; panics unless 2xx. Returns the JSON body or Null.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new()
            .request(method.clone(), format!("{}/admin/realms{path}", self.url))
            .bearer_auth(self.admin_token().await);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// Creates a realm with a confidential client (service account enabled);
    /// with `rotated_secs`, a client policy keeps a rotated secret valid that
    /// long. Returns the client's internal id and its current secret.
    pub async fn realm_with_client(
        &self,
        realm: &str,
        client_id: &str,
        rotated_secs: Option<u64>,
    ) -> (String, String) {
        use reqwest::Method;
        self.admin(
            Method::POST,
            "",
            Some(json!({"realm": realm, "enabled": true})),
        )
        .await;
        self.admin(
            Method::POST,
            &format!("/{realm}/clients"),
            Some(json!({"clientId": client_id, "publicClient": false, "serviceAccountsEnabled": true, "standardFlowEnabled": false})),
        )
        .await;
        if let Some(secs) = rotated_secs {
            self.admin(
                Method::PUT,
                &format!("/{realm}/client-policies/profiles"),
                Some(json!({"profiles": [{"name": "rotation", "description": "rekey tests", "executors": [{
                    "executor": "secret-rotation",
                    "configuration": {"expiration-period": "31536000", "rotated-expiration-period": secs.to_string(), "remaining-rotation-period": "864000"}
                }]}]})),
            )
            .await;
            self.admin(
                Method::PUT,
                &format!("/{realm}/client-policies/policies"),
                Some(json!({"policies": [{"name": "rotate-confidential", "description": "", "enabled": true,
                    "conditions": [{"condition": "client-access-type", "configuration": {"type": ["confidential"]}}],
                    "profiles": ["rotation"]}]})),
            )
            .await;
        }
        let clients = self
            .admin(
                Method::GET,
                &format!("/{realm}/clients?clientId={client_id}"),
                None,
            )
            .await;
        let id = clients[0]["id"].as_str().unwrap().to_string();
        let secret = self
            .admin(
                Method::GET,
                &format!("/{realm}/clients/{id}/client-secret"),
                None,
            )
            .await;
        (id, secret["value"].as_str().unwrap().to_string())
    }

    /// Whether a client_credentials token request with `secret` succeeds.
    pub async fn token_ok(&self, realm: &str, client_id: &str, secret: &str) -> bool {
        reqwest::Client::new()
            .post(format!(
                "{}/realms/{realm}/protocol/openid-connect/token",
                self.url
            ))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
            ])
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    }
}
