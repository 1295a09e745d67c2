//! `manual`: the runbook's way. A person puts the new value in a Secret and,
//! after the proof, invalidates the old value at the identity provider and
//! confirms it with the `rekey.dev/confirm-invalidated` annotation.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{CredentialSource, Invalidation};
use crate::crd::ManualSource;
use crate::crd::keys::CONFIRM_ANNOTATION;
use crate::deps::Deps;
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::value::SecretValue;

pub struct Manual {
    deps: Deps,
    namespace: String,
    name: String,
    key: String,
}

impl Manual {
    pub fn new(spec: &ManualSource, deps: &Deps, namespace: &str) -> Self {
        Self {
            deps: deps.clone(),
            namespace: namespace.into(),
            name: spec.secret_ref.name.clone(),
            key: spec.secret_ref.key.clone(),
        }
    }
}

#[async_trait]
impl CredentialSource for Manual {
    async fn preflight(&self, current: Option<&SecretValue>) -> Result<()> {
        let new = self
            .deps
            .secret_key(&self.namespace, &self.name, &self.key)
            .await?;
        if current.is_some_and(|c| c.same_as(&new)) {
            return Err(Error::permanent(
                Reason::ManualValueUnchanged,
                format!(
                    "Secret {}/{} key {} holds the value the targets already have: put the new value there first",
                    self.namespace, self.name, self.key
                ),
            ));
        }
        Ok(())
    }

    async fn issue(
        &self,
        _rotation_id: &str,
        _marker: &str,
        _earlier_attempt: Option<jiff::Timestamp>,
    ) -> Result<SecretValue> {
        self.deps
            .secret_key(&self.namespace, &self.name, &self.key)
            .await
    }

    async fn invalidate(
        &self,
        rotation_id: &str,
        annotations: &BTreeMap<String, String>,
        _distributed: &SecretValue,
    ) -> Result<Invalidation> {
        if annotations.get(CONFIRM_ANNOTATION).map(String::as_str) == Some(rotation_id) {
            Ok(Invalidation::Done)
        } else {
            Ok(Invalidation::NeedsConfirmation)
        }
    }
}
