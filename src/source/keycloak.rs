//! `keycloak`: a confidential client's secret in Keycloak, rotated with
//! Keycloak's client secret rotation (preview feature `client-secret-rotation`):
//! regenerating moves the old secret to a "rotated" slot that stays valid for
//! the `secret-rotation` executor's `rotated-expiration-period`.
//!
//! - Preflight refuses unless an enabled client policy applies a profile with
//!   that executor to the client and its rotated-secret lifetime covers
//!   `oldValueValidFor` (regenerating without it kills the old secret at once),
//!   unless `allowImmediateInvalidation` says the outage is accepted.
//! - Issuing regenerates the secret once. The client's
//!   `client.secret.creation.time` is recorded in status before the call; a
//!   retry that finds it changed reads the new secret back instead of
//!   regenerating again.
//! - Verifying requests a real `client_credentials` token with the new secret.
//! - Invalidating deletes the rotated secret.
//!
//! Client representations hold secrets (`client.secret.rotated`): they are
//! read into JSON values here and never logged or put into errors.

use std::collections::BTreeMap;
use std::time::Instant;

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{CredentialSource, Invalidation};
use crate::crd::KeycloakSource;
use crate::deps::Deps;
use crate::duration;
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::value::SecretValue;

const PROVIDER: &str = "keycloak";
const CREATION_TIME: &str = "client.secret.creation.time";
const ROTATED_CREATION_TIME: &str = "client.secret.rotated.creation.time";
const ROTATED_SECRET: &str = "client.secret.rotated";
/// How long after a regenerate call whose answer was lost rekey waits
/// before it regenerates again (the lost call commits or never will).
const ISSUE_SETTLE: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

pub struct Keycloak {
    deps: Deps,
    spec: KeycloakSource,
    namespace: String,
    old_value_valid_for: String,
    /// The admin token, fetched once per step (an instance lives for one
    /// reconcile; Keycloak's admin tokens live for a minute or more).
    token: tokio::sync::Mutex<Option<SecretValue>>,
}

impl Keycloak {
    pub fn new(
        spec: &KeycloakSource,
        deps: &Deps,
        namespace: &str,
        old_value_valid_for: &str,
    ) -> Self {
        Self {
            deps: deps.clone(),
            spec: spec.clone(),
            namespace: namespace.into(),
            old_value_valid_for: old_value_valid_for.into(),
            token: tokio::sync::Mutex::new(None),
        }
    }

    fn base(&self) -> &str {
        self.spec.url.trim_end_matches('/')
    }

    fn observe(&self, call: &str, started: Instant, ok: bool) {
        self.deps.metrics.provider_call(
            PROVIDER,
            call,
            crate::deps::outcome(ok),
            started.elapsed(),
        );
    }

    /// An admin access token, from the referenced Secret: `username` and
    /// `password` (admin-cli password grant) or `clientId` and `clientSecret`.
    async fn admin_token(&self) -> Result<SecretValue> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            return Ok(token.clone());
        }
        let name = &self.spec.admin_secret_ref.name;
        let ns = &self.namespace;
        let form: Vec<(&str, String)> = match self.deps.secret_key(ns, name, "clientSecret").await {
            Ok(secret) => {
                let id = self.deps.secret_key(ns, name, "clientId").await?;
                vec![
                    ("grant_type", "client_credentials".into()),
                    ("client_id", id.expose().into()),
                    ("client_secret", secret.expose().into()),
                ]
            }
            Err(e) if e.reason == Reason::SecretKeyMissing => {
                let user = self.deps.secret_key(ns, name, "username").await?;
                let password = self.deps.secret_key(ns, name, "password").await?;
                vec![
                    ("grant_type", "password".into()),
                    ("client_id", "admin-cli".into()),
                    ("username", user.expose().into()),
                    ("password", password.expose().into()),
                ]
            }
            Err(e) => return Err(e),
        };
        let realm = self.spec.admin_realm.as_deref().unwrap_or("master");
        let started = Instant::now();
        let resp = self
            .deps
            .http
            .post(format!(
                "{}/realms/{realm}/protocol/openid-connect/token",
                self.base()
            ))
            .form(&form)
            .send()
            .await;
        // The form's copies of the admin credentials, wiped once sent.
        let mut form = form;
        crate::value::wipe_form(&mut form);
        self.observe(
            "admin_token",
            started,
            resp.as_ref().is_ok_and(|r| r.status().is_success()),
        );
        let resp = resp.map_err(|e| {
            Error::http(
                Reason::KeycloakUnreachable,
                "Keycloak admin token request",
                &e,
            )
        })?;
        match resp.status() {
            s if s.is_success() => {}
            s if s.is_client_error() => {
                return Err(Error::permanent(
                    Reason::KeycloakCredentialsRejected,
                    format!(
                        "Keycloak refused the admin credentials of Secret {name} (HTTP {})",
                        s.as_u16()
                    ),
                ));
            }
            s => {
                return Err(Error::transient(
                    Reason::KeycloakError,
                    format!("Keycloak admin token: HTTP {}", s.as_u16()),
                ));
            }
        }
        #[derive(serde::Deserialize)]
        struct Token {
            access_token: String,
        }
        let t: Token = resp.json().await.map_err(|_| {
            Error::transient(
                Reason::KeycloakError,
                "Keycloak admin token: no access_token",
            )
        })?;
        let token = SecretValue::new(t.access_token);
        *cached = Some(token.clone());
        Ok(token)
    }

    /// One admin API call; returns the JSON body (Null when empty).
    async fn admin(&self, method: Method, path: &str, call: &'static str) -> Result<Value> {
        let token = self.admin_token().await?;
        let started = Instant::now();
        let resp = self
            .deps
            .http
            .request(
                method,
                format!("{}/admin/realms/{}{path}", self.base(), self.spec.realm),
            )
            .bearer_auth(token.expose())
            .header("Accept", "application/json")
            .send()
            .await;
        self.observe(
            call,
            started,
            resp.as_ref().is_ok_and(|r| r.status().is_success()),
        );
        let resp = resp.map_err(|e| {
            Error::http(Reason::KeycloakUnreachable, &format!("Keycloak {call}"), &e)
        })?;
        let status = resp.status();
        if !status.is_success() {
            let message = format!(
                "Keycloak {call} in realm {}: HTTP {}",
                self.spec.realm,
                status.as_u16()
            );
            return Err(match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    Error::permanent(Reason::KeycloakCredentialsRejected, message)
                }
                StatusCode::NOT_FOUND => Error::permanent(Reason::KeycloakNotFound, message),
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    Error::transient(Reason::KeycloakError, message)
                }
                _ => Error::permanent(Reason::KeycloakRejected, message),
            });
        }
        let text = resp
            .text()
            .await
            .map_err(|e| Error::http(Reason::KeycloakError, &format!("Keycloak {call}"), &e))?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|_| {
            Error::transient(
                Reason::KeycloakError,
                format!("Keycloak {call}: response is not JSON"),
            )
        })
    }

    /// The client's internal id and representation.
    async fn client(&self) -> Result<(String, Value)> {
        let list = self
            .admin(
                Method::GET,
                &format!("/clients?clientId={}", urlencode(&self.spec.client_id)),
                "find_client",
            )
            .await?;
        let client = list
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c["clientId"].as_str() == Some(self.spec.client_id.as_str()))
            })
            .cloned()
            .ok_or_else(|| {
                Error::permanent(
                    Reason::KeycloakClientNotFound,
                    format!(
                        "client {} not found in realm {}",
                        self.spec.client_id, self.spec.realm
                    ),
                )
            })?;
        let id = client["id"].as_str().unwrap_or_default().to_string();
        Ok((id, client))
    }

    /// The creation times of the current and the rotated secret: changes when
    /// (and only when) the secret is regenerated.
    fn marker_of(client: &Value) -> String {
        let attr = |k: &str| {
            client["attributes"][k]
                .as_str()
                .unwrap_or("none")
                .to_string()
        };
        format!("{}/{}", attr(CREATION_TIME), attr(ROTATED_CREATION_TIME))
    }

    /// Refuses to regenerate while the rotated slot holds a secret: it is the
    /// old secret of a rotation that has not ended (rekey's own ones delete
    /// it when they end), and regenerating would kill it at once.
    fn refuse_occupied_rotated_slot(&self, client: &Value) -> Result<()> {
        let occupied = client["attributes"][ROTATED_SECRET]
            .as_str()
            .is_some_and(|s| !s.is_empty());
        if occupied {
            return Err(Error::permanent(
                Reason::KeycloakRotatedSlotInUse,
                format!(
                    "client {} already has a rotated secret (a rotation that has not ended): regenerating now would invalidate it at once; finish that rotation or delete the rotated secret first",
                    self.spec.client_id
                ),
            ));
        }
        Ok(())
    }

    /// Seconds the rotated (old) secret stays valid under the policies that
    /// apply to `client`; None when no secret-rotation policy applies.
    async fn rotated_lifetime(&self, client: &Value) -> Result<Option<u64>> {
        let policies = self
            .admin(
                Method::GET,
                "/client-policies/policies",
                "get_client_policies",
            )
            .await?;
        let profiles = self
            .admin(
                Method::GET,
                "/client-policies/profiles?include-global-profiles=true",
                "get_client_profiles",
            )
            .await?;
        let all_profiles: Vec<&Value> = ["profiles", "globalProfiles"]
            .iter()
            .flat_map(|k| profiles[*k].as_array().into_iter().flatten())
            .collect();
        let mut best: Option<u64> = None;
        for policy in policies["policies"].as_array().into_iter().flatten() {
            if policy["enabled"].as_bool() == Some(false) || !policy_applies(policy, client) {
                continue;
            }
            for name in policy["profiles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let Some(profile) = all_profiles
                    .iter()
                    .find(|p| p["name"].as_str() == Some(name))
                else {
                    continue;
                };
                for ex in profile["executors"].as_array().into_iter().flatten() {
                    if ex["executor"].as_str() != Some("secret-rotation") {
                        continue;
                    }
                    let period = &ex["configuration"]["rotated-expiration-period"];
                    let secs = period
                        .as_u64()
                        .or_else(|| period.as_str().and_then(|s| s.parse().ok()));
                    if let Some(secs) = secs {
                        best = Some(best.map_or(secs, |b| b.max(secs)));
                    }
                }
            }
        }
        Ok(best)
    }
}

/// Whether every condition of a client policy matches `client`. Conditions
/// rekey cannot evaluate count as not matching: then the policy is not
/// relied on.
fn policy_applies(policy: &Value, client: &Value) -> bool {
    let conditions = policy["conditions"].as_array().cloned().unwrap_or_default();
    !conditions.is_empty()
        && conditions.iter().all(|c| match c["condition"].as_str() {
            _ if c["configuration"]["is-negative-logic"].as_bool() == Some(true)
                || c["configuration"]["is-negative-logic"].as_str() == Some("true") =>
            {
                false
            }
            Some("any-client") => true,
            Some("client-access-type") => {
                let access = if client["bearerOnly"].as_bool() == Some(true) {
                    "bearer-only"
                } else if client["publicClient"].as_bool() == Some(true) {
                    "public"
                } else {
                    "confidential"
                };
                let types = &c["configuration"]["type"];
                types
                    .as_array()
                    .is_some_and(|t| t.iter().any(|x| x.as_str() == Some(access)))
                    || types.as_str() == Some(access)
            }
            _ => false,
        })
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[async_trait]
impl CredentialSource for Keycloak {
    async fn preflight(&self, current: Option<&SecretValue>) -> Result<()> {
        let (id, client) = self.client().await?;
        // Regenerating pushes the secret the stores hold into the rotated
        // slot; if they hold anything else (say, the rotated secret of an
        // unfinished rotation), that value would die at once.
        if let Some(current) = current {
            let secret = self
                .admin(
                    Method::GET,
                    &format!("/clients/{id}/client-secret"),
                    "read_client_secret",
                )
                .await?;
            if secret["value"].as_str() != Some(current.expose()) {
                return Err(Error::permanent(
                    Reason::KeycloakTargetsOutOfSync,
                    format!(
                        "the first target does not hold client {}'s current secret: finish or repair the previous rotation first",
                        self.spec.client_id
                    ),
                ));
            }
        }
        self.refuse_occupied_rotated_slot(&client)?;
        if client["publicClient"].as_bool() == Some(true) {
            return Err(Error::permanent(
                Reason::KeycloakClientNotConfidential,
                format!("client {} is public: it has no secret", self.spec.client_id),
            ));
        }
        if client["serviceAccountsEnabled"].as_bool() != Some(true) {
            return Err(Error::permanent(
                Reason::KeycloakCannotVerify,
                format!(
                    "client {} has no service account: rekey could not prove the new secret with a token request",
                    self.spec.client_id
                ),
            ));
        }
        let window = duration::parse(&self.old_value_valid_for)
            .unwrap_or_default()
            .as_secs();
        match self.rotated_lifetime(&client).await? {
            Some(secs) if secs >= window => Ok(()),
            Some(secs) => Err(Error::permanent(
                Reason::KeycloakGraceWindowTooShort,
                format!(
                    "the secret-rotation policy keeps the old secret of {} valid for {secs}s, less than oldValueValidFor ({window}s)",
                    self.spec.client_id
                ),
            )),
            None if self.spec.allow_immediate_invalidation => Ok(()),
            None => Err(Error::permanent(
                Reason::KeycloakRotationPolicyMissing,
                format!(
                    "no enabled client policy applies a secret-rotation executor to client {} in realm {}: regenerating would invalidate the old secret at once (enable the client-secret-rotation feature and add a policy, or set allowImmediateInvalidation)",
                    self.spec.client_id, self.spec.realm
                ),
            )),
        }
    }

    fn old_value_expires(&self) -> bool {
        true
    }

    async fn old_value_lifetime(&self) -> Result<Option<std::time::Duration>> {
        let (_, client) = self.client().await?;
        Ok(self
            .rotated_lifetime(&client)
            .await?
            .map(std::time::Duration::from_secs))
    }

    async fn prepare_issue(&self) -> Result<String> {
        let (_, client) = self.client().await?;
        Ok(Self::marker_of(&client))
    }

    async fn issue(
        &self,
        _rotation_id: &str,
        marker: &str,
        earlier_attempt: Option<jiff::Timestamp>,
    ) -> Result<SecretValue> {
        let (id, client) = self.client().await?;
        let path = format!("/clients/{id}/client-secret");
        let secret = if Self::marker_of(&client) != marker {
            // Regenerated already by this rotation (rekey died before it could
            // record the value): read it back, never regenerate twice.
            self.admin(Method::GET, &path, "read_client_secret").await?
        } else {
            // An earlier call whose answer was lost may still commit: a
            // second regenerate before that would push the first new secret
            // into the rotated slot and delete the old one at once.
            if let Some(at) = earlier_attempt
                && let Some(wait_until) = at.checked_add(ISSUE_SETTLE).ok()
                && jiff::Timestamp::now() < wait_until
            {
                return Err(Error::transient(
                    Reason::KeycloakIssuePending,
                    format!(
                        "an earlier regenerate call for client {} got no answer and may still commit; not regenerating again before {wait_until}",
                        self.spec.client_id
                    ),
                ));
            }
            self.refuse_occupied_rotated_slot(&client)?;
            self.admin(Method::POST, &path, "regenerate_client_secret")
                .await?
        };
        // The parsed answer is wiped once the value is taken from it.
        let secret = crate::value::WipedJson(secret);
        secret.0["value"]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(SecretValue::new)
            .ok_or_else(|| {
                Error::permanent(Reason::KeycloakError, "Keycloak returned no client secret")
            })
    }

    async fn verify(&self, value: &SecretValue) -> Result<()> {
        let started = Instant::now();
        let resp = self
            .deps
            .http
            .post(format!(
                "{}/realms/{}/protocol/openid-connect/token",
                self.base(),
                self.spec.realm
            ))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &self.spec.client_id),
                ("client_secret", value.expose()),
            ])
            .send()
            .await;
        self.observe(
            "verify_token",
            started,
            resp.as_ref().is_ok_and(|r| r.status().is_success()),
        );
        let resp = resp.map_err(|e| {
            Error::http(
                Reason::KeycloakUnreachable,
                "Keycloak token request with the new secret",
                &e,
            )
        })?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            // Keycloak is busy or down, not refusing the secret: retried.
            Err(Error::transient(
                Reason::KeycloakError,
                format!(
                    "Keycloak answered HTTP {} to a token request with the new secret",
                    status.as_u16()
                ),
            ))
        } else {
            Err(Error::permanent(
                Reason::NewValueRejected,
                format!(
                    "Keycloak refused a token request with the new secret (HTTP {})",
                    status.as_u16()
                ),
            ))
        }
    }

    async fn invalidate(
        &self,
        _rotation_id: &str,
        _annotations: &BTreeMap<String, String>,
        distributed: &SecretValue,
    ) -> Result<Invalidation> {
        let (id, _) = self.client().await?;
        // Deleting the rotated slot kills whatever is in it: only when the
        // live secret is still the one rekey distributed (otherwise someone
        // regenerated since, and the slot now holds the value in use).
        let current = self
            .admin(
                Method::GET,
                &format!("/clients/{id}/client-secret"),
                "read_client_secret",
            )
            .await?;
        if current["value"].as_str() != Some(distributed.expose()) {
            return Err(Error::permanent(
                Reason::KeycloakSecretChanged,
                format!(
                    "client {}'s current secret is no longer the one rekey distributed (regenerated by someone else): the rotated slot was not deleted",
                    self.spec.client_id
                ),
            ));
        }
        self.admin(
            Method::DELETE,
            &format!("/clients/{id}/client-secret/rotated"),
            "delete_rotated_secret",
        )
        .await?;
        Ok(Invalidation::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::policy_applies;
    use serde_json::json;

    #[test]
    fn only_conditions_rekey_can_evaluate_count() {
        let confidential = json!({"publicClient": false});
        let public = json!({"publicClient": true});
        let by_type = json!({"conditions": [{"condition": "client-access-type", "configuration": {"type": ["confidential"]}}]});
        assert!(policy_applies(&by_type, &confidential));
        assert!(!policy_applies(&by_type, &public));
        assert!(policy_applies(
            &json!({"conditions": [{"condition": "any-client", "configuration": {}}]}),
            &public
        ));
        let negated = json!({"conditions": [{"condition": "any-client", "configuration": {"is-negative-logic": true}}]});
        assert!(!policy_applies(&negated, &confidential));
        let unknown = json!({"conditions": [{"condition": "client-roles", "configuration": {"roles": ["x"]}}]});
        assert!(!policy_applies(&unknown, &confidential), "not relied on");
        assert!(!policy_applies(&json!({"conditions": []}), &confidential));
    }
}
