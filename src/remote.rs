//! Remote clusters of `proof.clusters`: a Kubernetes client built from a
//! kubeconfig kept in a Secret of the SecretRotation's namespace.
//!
//! A SecretRotation's author chooses that kubeconfig, so it must not make
//! the operator run a command (exec and auth-provider plugins) or read a
//! file of its own (paths to certificates, keys or tokens): only inline
//! credentials are accepted. Clients are kept per Secret and rebuilt when
//! the kubeconfig changes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::crd::RemoteCluster;
use crate::error::{Error, Result};
use crate::fingerprint::fnv1a;
use crate::reason::Reason;
use crate::value::SecretValue;

/// How long a remote API server may take to accept a connection or answer:
/// short, so an unreachable cluster holds the rotation without stalling the
/// operator's other work.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected remote cluster.
#[derive(Clone)]
pub struct Remote {
    pub client: Client,
    /// The namespace rekey proves in there.
    pub namespace: String,
    /// The API server's URL (checked against `--allowed-hosts`).
    pub server: String,
}

/// A kubeconfig Secret: namespace, name, key.
type SecretKey = (String, String, String);

/// Clients per kubeconfig Secret, shared by every reconcile.
#[derive(Default)]
pub struct RemoteClients {
    /// Per Secret: the fingerprint of the kubeconfig, and its client.
    cache: Mutex<HashMap<SecretKey, (String, Remote)>>,
}

impl RemoteClients {
    /// The cluster's client from the kubeconfig `value` (read from the
    /// Secret `cluster.kubeConfig.secretRef` of `namespace`).
    pub async fn connect(
        &self,
        namespace: &str,
        cluster: &RemoteCluster,
        value: &SecretValue,
    ) -> Result<Remote> {
        let r = &cluster.kube_config.secret_ref;
        let key = (namespace.to_string(), r.name.clone(), r.key.clone());
        let fingerprint = fnv1a(value.expose().as_bytes());
        if let Some((f, remote)) = self.cache.lock().expect("remote clients").get(&key)
            && *f == fingerprint
        {
            return Ok(remote.clone());
        }
        let remote = build(namespace, cluster, value).await?;
        self.cache
            .lock()
            .expect("remote clients")
            .insert(key, (fingerprint, remote.clone()));
        Ok(remote)
    }
}

async fn build(namespace: &str, cluster: &RemoteCluster, value: &SecretValue) -> Result<Remote> {
    let invalid = |why: &str| {
        Error::permanent(
            Reason::InvalidKubeconfig,
            format!(
                "cluster {}: the kubeconfig in Secret {}/{} key {} {why}",
                cluster.name,
                namespace,
                cluster.kube_config.secret_ref.name,
                cluster.kube_config.secret_ref.key
            ),
        )
    };
    let text = value.expose();
    // The parser's error may quote the document: not kept.
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|_| invalid("is not a kubeconfig"))?;
    if let Some(why) = refusal(&kubeconfig) {
        return Err(invalid(&why));
    }
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| invalid(&format!("cannot be used ({})", kind_of(&e))))?;
    config.connect_timeout = Some(REMOTE_TIMEOUT);
    config.read_timeout = Some(REMOTE_TIMEOUT);
    config.write_timeout = Some(REMOTE_TIMEOUT);
    let remote_namespace = cluster
        .namespace
        .clone()
        .unwrap_or_else(|| kube_default_namespace(&config, namespace));
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config)
        .map_err(|e| invalid(&format!("cannot be used ({})", kind_of_client(&e))))?;
    Ok(Remote {
        client,
        namespace: remote_namespace,
        server,
    })
}

/// The context's namespace when the kubeconfig names one, else the
/// SecretRotation's (kube defaults to `default` when none is named).
fn kube_default_namespace(config: &Config, namespace: &str) -> String {
    if config.default_namespace == "default" {
        namespace.to_string()
    } else {
        config.default_namespace.clone()
    }
}

fn kind_of(e: &kube::config::KubeconfigError) -> &'static str {
    use kube::config::KubeconfigError as K;
    match e {
        K::CurrentContextNotSet | K::LoadContext(_) => "no usable current context",
        K::LoadClusterOfContext(_) => "its context names no cluster",
        K::MissingClusterUrl | K::ParseClusterUrl(_) => "no valid server URL",
        _ => "unusable credentials or certificates",
    }
}

fn kind_of_client(_: &kube::Error) -> &'static str {
    "its TLS settings could not be loaded"
}

/// Why a kubeconfig is refused: anything that would run a command or read
/// a local file. Pure.
pub fn refusal(kc: &Kubeconfig) -> Option<String> {
    for c in &kc.clusters {
        let Some(cluster) = &c.cluster else { continue };
        if cluster.certificate_authority.is_some() {
            return Some(format!(
                "names a file (cluster {} certificate-authority); use certificate-authority-data",
                c.name
            ));
        }
    }
    for a in &kc.auth_infos {
        let Some(auth) = &a.auth_info else { continue };
        let refused = if auth.exec.is_some() {
            Some("an exec plugin")
        } else if auth.auth_provider.is_some() {
            Some("an auth-provider plugin")
        } else if auth.token_file.is_some() {
            Some("a file (tokenFile)")
        } else if auth.client_certificate.is_some() {
            Some("a file (client-certificate); use client-certificate-data")
        } else if auth.client_key.is_some() {
            Some("a file (client-key); use client-key-data")
        } else {
            None
        };
        if let Some(what) = refused {
            return Some(format!(
                "uses {what} in user {}: only inline credentials are accepted",
                a.name
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Kubeconfig {
        Kubeconfig::from_yaml(yaml).unwrap()
    }

    const INLINE: &str = r#"
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:6443", certificate-authority-data: "Zm9v"}
users:
- name: u
  user: {token: "t"}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
"#;

    #[test]
    fn inline_credentials_are_accepted() {
        assert_eq!(refusal(&parse(INLINE)), None);
    }

    #[test]
    fn plugins_and_files_are_refused() {
        for (from, to, named) in [
            (
                "user: {token: \"t\"}",
                "user: {exec: {command: /bin/sh, apiVersion: client.authentication.k8s.io/v1}}",
                "exec plugin",
            ),
            (
                "user: {token: \"t\"}",
                "user: {auth-provider: {name: gcp, config: {}}}",
                "auth-provider",
            ),
            (
                "user: {token: \"t\"}",
                "user: {tokenFile: /var/run/secrets/token}",
                "tokenFile",
            ),
            (
                "user: {token: \"t\"}",
                "user: {client-certificate: /etc/cert, client-key-data: \"a\"}",
                "client-certificate",
            ),
            (
                "user: {token: \"t\"}",
                "user: {client-certificate-data: \"a\", client-key: /etc/key}",
                "client-key",
            ),
            (
                "certificate-authority-data: \"Zm9v\"",
                "certificate-authority: /etc/ca.crt",
                "certificate-authority",
            ),
        ] {
            let yaml = INLINE.replace(from, to);
            assert_ne!(yaml, INLINE);
            let why = refusal(&parse(&yaml)).unwrap_or_else(|| panic!("accepted: {to}"));
            assert!(why.contains(named), "{why}");
        }
    }
}
