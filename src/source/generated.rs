//! `generated`: rekey makes the value itself; there is no upstream to invalidate.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{CredentialSource, Invalidation};
use crate::crd::{Alphabet, GeneratedSource};
use crate::error::Result;
use crate::value::SecretValue;

pub struct Generated {
    length: usize,
    alphabet: Alphabet,
}

impl Generated {
    pub fn new(spec: &GeneratedSource) -> Self {
        Self {
            length: spec.length as usize,
            alphabet: spec.alphabet,
        }
    }
}

#[async_trait]
impl CredentialSource for Generated {
    async fn preflight(&self, _current: Option<&SecretValue>) -> Result<()> {
        Ok(())
    }

    // Idempotency comes from the controller's write-ahead record: the value is
    // stored there before any target sees it, and read back on a retry.
    async fn issue(
        &self,
        _rotation_id: &str,
        _marker: &str,
        _earlier_attempt: Option<jiff::Timestamp>,
    ) -> Result<SecretValue> {
        Ok(SecretValue::generate(self.length, self.alphabet))
    }

    async fn invalidate(
        &self,
        _rotation_id: &str,
        _annotations: &BTreeMap<String, String>,
        _distributed: &SecretValue,
    ) -> Result<Invalidation> {
        Ok(Invalidation::Done)
    }
}
