//! The spec, parsed once per reconcile into what the machine acts on: typed
//! durations and exhaustive source and store enums. A new store is one
//! `StorePlan` variant, one file under `src/store/` and its CRD field; the
//! compiler finds every other place.

use std::time::Duration;

use crate::crd::{
    AwsSecretsManagerTarget, FailurePolicy, GeneratedSource, IbmSecretsManagerTarget,
    KeycloakSource, KubernetesSecretTarget, ManualSource, Proof, RemoteCluster, SecretRotationSpec,
    Target, WebhookSource,
};
use crate::decide::Route;
use crate::duration;
use crate::error::{Error, Result};
use crate::reason::Reason;

/// What one rotation acts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub source: SourcePlan,
    pub targets: Vec<TargetPlan>,
    /// `oldValueValidFor`: the identity provider's grace window.
    pub grace_window: Duration,
    /// `proof.timeout`: the time budget of each wait.
    pub proof_timeout: Duration,
    pub route: Route,
    pub on_failure: FailurePolicy,
    /// Where the proof is observed: this cluster first, then each of
    /// `proof.clusters`.
    pub places: Vec<Place>,
}

/// One cluster where the new value must be proven, with what must be
/// proven there.
#[derive(Clone, Debug, PartialEq)]
pub struct Place {
    /// None: the cluster rekey runs in.
    pub cluster: Option<RemoteCluster>,
    /// This cluster's part of the proof: for a remote cluster its
    /// ExternalSecrets and workloads, with the spec's restart mode.
    pub proof: Proof,
}

impl Place {
    /// The remote cluster's name; empty for this cluster.
    pub fn cluster_name(&self) -> &str {
        self.cluster.as_ref().map_or("", |c| c.name.as_str())
    }

    /// `text` as said of this place: prefixed with the cluster when remote.
    pub fn say(&self, text: &str) -> String {
        match &self.cluster {
            None => text.to_string(),
            Some(c) => format!("cluster {}: {text}", c.name),
        }
    }
}

/// This cluster's proof, then one place per remote cluster.
pub fn places(proof: &Proof) -> Vec<Place> {
    let here = Place {
        cluster: None,
        proof: Proof {
            clusters: vec![],
            ..proof.clone()
        },
    };
    let remote = proof.clusters.iter().map(|c| Place {
        cluster: Some(c.clone()),
        proof: Proof {
            external_secrets: c.external_secrets.clone(),
            workloads: c.workloads.clone(),
            consumers: vec![],
            clusters: vec![],
            ..proof.clone()
        },
    });
    std::iter::once(here).chain(remote).collect()
}

/// Where new values come from.
#[derive(Clone, Debug, PartialEq)]
pub enum SourcePlan {
    Generated(GeneratedSource),
    Webhook(WebhookSource),
    Manual(ManualSource),
    Keycloak(KeycloakSource),
}

/// One target: its name and its store.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetPlan {
    pub name: String,
    pub store: StorePlan,
}

/// Where a target's value is written.
#[derive(Clone, Debug, PartialEq)]
pub enum StorePlan {
    KubernetesSecret(KubernetesSecretTarget),
    IbmSecretsManager(IbmSecretsManagerTarget),
    AwsSecretsManager(AwsSecretsManagerTarget),
}

impl TargetPlan {
    /// Whether the target lives outside the SecretRotation's namespace.
    pub fn crosses_namespace(&self, home: &str) -> bool {
        matches!(&self.store, StorePlan::KubernetesSecret(k)
            if k.namespace.as_deref().is_some_and(|n| n != home))
    }
}

impl StorePlan {
    /// The provider label of the store, for metrics.
    pub fn provider(&self) -> &'static str {
        match self {
            StorePlan::KubernetesSecret(_) => "kubernetes",
            StorePlan::IbmSecretsManager(_) => "ibm-secrets-manager",
            StorePlan::AwsSecretsManager(_) => "aws-secrets-manager",
        }
    }
}

impl Plan {
    /// Parses the spec; refuses (with reason `InvalidSpec`) what admission
    /// should have refused already, instead of assuming a default.
    pub fn from_spec(spec: &SecretRotationSpec) -> Result<Plan> {
        Ok(Plan {
            grace_window: parse_duration("oldValueValidFor", &spec.old_value_valid_for)?,
            proof_timeout: parse_duration("proof.timeout", &spec.proof.timeout)?,
            source: source_plan(spec)?,
            targets: spec
                .targets
                .iter()
                .map(target_plan)
                .collect::<Result<_>>()?,
            route: Route::of(spec),
            on_failure: spec.on_failure,
            places: places(&spec.proof),
        })
    }
}

impl Plan {
    /// Every URL rekey will call for this rotation, with the field naming it.
    pub fn outbound_urls(&self) -> Vec<(&'static str, &str)> {
        let mut urls = match &self.source {
            SourcePlan::Webhook(w) => vec![
                ("credential.webhook.issueUrl", w.issue_url.as_str()),
                (
                    "credential.webhook.invalidateUrl",
                    w.invalidate_url.as_str(),
                ),
            ],
            SourcePlan::Keycloak(k) => vec![("credential.keycloak.url", k.url.as_str())],
            SourcePlan::Generated(_) | SourcePlan::Manual(_) => vec![],
        };
        for t in &self.targets {
            match &t.store {
                StorePlan::IbmSecretsManager(i) => {
                    urls.push(("ibmSecretsManager.serviceUrl", i.service_url.as_str()));
                    urls.push(("ibmSecretsManager.iamUrl", i.iam_url.as_str()));
                }
                StorePlan::AwsSecretsManager(a) => {
                    if let Some(e) = a.endpoint.as_deref() {
                        urls.push(("awsSecretsManager.endpoint", e));
                    }
                    if let Some(e) = a.sts_endpoint.as_deref() {
                        urls.push(("awsSecretsManager.stsEndpoint", e));
                    }
                }
                StorePlan::KubernetesSecret(_) => {}
            }
        }
        urls
    }
}

/// One thing a rotation acts on, and the namespace whose Lease claims it:
/// a Secret's own namespace (so rotations from two granted namespaces see
/// each other), the SecretRotation's namespace for everything else.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    pub namespace: String,
    /// Readable text, e.g. `Secret team-a/app key client_secret`.
    pub what: String,
}

/// What a rotation acts on that no other rotation may act on at the same
/// time: each store entry, ExternalSecret and workload. IBM and AWS secrets
/// are claimed whole (their writes have no compare-and-swap, so two
/// rotations of different keys would lose one).
pub fn claims(spec: &crate::crd::SecretRotationSpec, home: &str) -> Vec<Claim> {
    let mut claims = vec![];
    let mut claim = |namespace: &str, what: String| {
        claims.push(Claim {
            namespace: namespace.to_string(),
            what,
        })
    };
    for t in &spec.targets {
        if let Some(k) = &t.kubernetes_secret {
            let ns = k.namespace.as_deref().unwrap_or(home);
            claim(ns, format!("Secret {ns}/{} key {}", k.name, k.key));
        }
        if let Some(i) = &t.ibm_secrets_manager {
            let id = i
                .secret_id
                .clone()
                .or_else(|| i.secret_name.clone())
                .unwrap_or_default();
            claim(
                home,
                format!("IBM secret {id} at {}", i.service_url.trim_end_matches('/')),
            );
        }
        if let Some(a) = &t.aws_secrets_manager {
            claim(
                home,
                format!(
                    "AWS secret {} in {}{}",
                    a.secret_id,
                    a.region,
                    a.endpoint
                        .as_deref()
                        .map(|e| format!(" at {e}"))
                        .unwrap_or_default()
                ),
            );
        }
    }
    for es in &spec.proof.external_secrets {
        claim(home, format!("ExternalSecret {home}/{}", es.name));
    }
    for w in &spec.proof.workloads {
        claim(home, format!("{:?} {home}/{}", w.kind, w.name));
    }
    claims
}

/// Whether `url`'s host matches one of `allowed` (exact, or `*.suffix`).
pub fn host_allowed(url: &str, allowed: &[String]) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = parsed.host_str() else {
        return false;
    };
    allowed.iter().any(|a| match a.strip_prefix("*.") {
        Some(suffix) => host.ends_with(&format!(".{suffix}")),
        None => host == a,
    })
}

fn parse_duration(field: &str, value: &str) -> Result<Duration> {
    duration::parse(value)
        .ok_or_else(|| Error::permanent(Reason::InvalidSpec, format!("{field} is not a duration")))
}

fn source_plan(spec: &SecretRotationSpec) -> Result<SourcePlan> {
    let c = &spec.credential;
    let set = [
        c.generated.clone().map(SourcePlan::Generated),
        c.webhook.clone().map(SourcePlan::Webhook),
        c.manual.clone().map(SourcePlan::Manual),
        c.keycloak.clone().map(SourcePlan::Keycloak),
    ];
    exactly_one(set).ok_or_else(|| {
        Error::permanent(
            Reason::InvalidSpec,
            "credential must set exactly one source",
        )
    })
}

fn target_plan(target: &Target) -> Result<TargetPlan> {
    let set = [
        target
            .kubernetes_secret
            .clone()
            .map(StorePlan::KubernetesSecret),
        target
            .ibm_secrets_manager
            .clone()
            .map(StorePlan::IbmSecretsManager),
        target
            .aws_secrets_manager
            .clone()
            .map(StorePlan::AwsSecretsManager),
    ];
    let store = exactly_one(set).ok_or_else(|| {
        Error::permanent(
            Reason::InvalidSpec,
            format!("target {} must set exactly one store", target.name),
        )
    })?;
    Ok(TargetPlan {
        name: target.name.clone(),
        store,
    })
}

fn exactly_one<T, const N: usize>(options: [Option<T>; N]) -> Option<T> {
    let mut set = options.into_iter().flatten();
    let first = set.next()?;
    set.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> SecretRotationSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parses_durations_sources_and_stores() {
        let plan = Plan::from_spec(&spec(serde_json::json!({
            "credential": {"generated": {}},
            "oldValueValidFor": "1h",
            "targets": [{"name": "t", "kubernetesSecret": {"name": "s", "key": "k"}}],
            "proof": {"nothingToProve": true, "timeout": "90s"}
        })))
        .unwrap();
        assert_eq!(plan.grace_window, Duration::from_secs(3600));
        assert_eq!(plan.proof_timeout, Duration::from_secs(90));
        assert!(matches!(plan.source, SourcePlan::Generated(_)));
        assert_eq!(plan.targets[0].store.provider(), "kubernetes");
        assert!(plan.route.nothing_to_prove);
    }

    #[test]
    fn hosts_match_exactly_or_by_suffix() {
        let allowed = vec![
            "kc.example.com".to_string(),
            "*.appdomain.cloud".to_string(),
        ];
        assert!(host_allowed("https://kc.example.com/realms", &allowed));
        assert!(host_allowed("https://x.eu-de.appdomain.cloud", &allowed));
        assert!(!host_allowed("https://appdomain.cloud", &allowed));
        assert!(!host_allowed("https://kc.example.com.evil.io", &allowed));
        assert!(!host_allowed("http://127.0.0.1:8080/issue", &allowed));
        assert!(!host_allowed("not a url", &allowed));
    }

    #[test]
    fn refuses_instead_of_assuming_a_default() {
        for (field, v) in [
            (
                "oldValueValidFor",
                serde_json::json!({"oldValueValidFor": "soon"}),
            ),
            (
                "proof.timeout",
                serde_json::json!({"proof": {"nothingToProve": true, "timeout": "-1m"}}),
            ),
        ] {
            let mut base = serde_json::json!({
                "credential": {"generated": {}},
                "targets": [{"name": "t", "kubernetesSecret": {"name": "s", "key": "k"}}],
                "proof": {"nothingToProve": true}
            });
            for (k, x) in v.as_object().unwrap() {
                base[k] = x.clone();
            }
            let err = Plan::from_spec(&spec(base)).unwrap_err();
            assert_eq!(err.reason, Reason::InvalidSpec);
            assert!(err.message.contains(field), "{}", err.message);
        }
        let two_sources = spec(serde_json::json!({
            "credential": {"generated": {}, "manual": {"secretRef": {"name": "m", "key": "k"}}},
            "targets": [{"name": "t", "kubernetesSecret": {"name": "s", "key": "k"}}],
            "proof": {"nothingToProve": true}
        }));
        assert_eq!(
            Plan::from_spec(&two_sources).unwrap_err().reason,
            Reason::InvalidSpec
        );
        let no_store = spec(serde_json::json!({
            "credential": {"generated": {}},
            "targets": [{"name": "t"}],
            "proof": {"nothingToProve": true}
        }));
        assert_eq!(
            Plan::from_spec(&no_store).unwrap_err().reason,
            Reason::InvalidSpec
        );
    }
}
