//! The write-ahead record: a Secret owned by the SecretRotation that holds the
//! new value (and each target's previous value, for rollback) from the moment
//! it is issued until the rotation ends. Invariant "never lost": if rekey dies
//! after issuing, the value is recovered from here, not issued again.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::{Client, Resource};
use zeroize::Zeroize;

use crate::crd::SecretRotation;
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::value::SecretValue;

use crate::crd::keys::WAL_LABEL;
const ROTATION_KEY: &str = "rotation-id";
const NEW_KEY: &str = "new";
const PREVIOUS_PREFIX: &str = "previous.";

/// What the record holds for one rotation.
pub struct Record {
    pub rotation_id: String,
    pub new: SecretValue,
    /// Previous value per target name (absent where the target was empty).
    pub previous: BTreeMap<String, SecretValue>,
}

pub fn secret_name(rotation_name: &str) -> String {
    let base: String = rotation_name
        .chars()
        .take(253 - ".rekey-wal".len())
        .collect();
    format!("{base}.rekey-wal")
}

pub struct Wal {
    api: Api<Secret>,
    name: String,
}

impl Wal {
    pub fn new(client: Client, sr: &SecretRotation) -> Self {
        let ns = sr.metadata.namespace.clone().unwrap_or_default();
        Self {
            api: Api::namespaced(client, &ns),
            name: secret_name(&sr.metadata.name.clone().unwrap_or_default()),
        }
    }

    /// The record of `rotation_id`, if one was written.
    pub async fn read(&self, rotation_id: &str) -> Result<Option<Record>> {
        let Some(secret) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube("read write-ahead record", e))?
        else {
            return Ok(None);
        };
        // The parsed bytes are wiped when dropped (`Wiped`): what is kept is
        // in SecretValues.
        let data = Wiped(secret.data.unwrap_or_default());
        let data = &data.0;
        let text = |k: &str| data.get(k).and_then(|b| SecretValue::from_bytes(&b.0));
        if text(ROTATION_KEY)
            .map(|v| v.expose().to_string())
            .as_deref()
            != Some(rotation_id)
        {
            return Ok(None);
        }
        let Some(new) = text(NEW_KEY) else {
            return Ok(None);
        };
        let previous = data
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix(PREVIOUS_PREFIX)?.to_string(),
                    SecretValue::from_bytes(&v.0)?,
                ))
            })
            .collect();
        Ok(Some(Record {
            rotation_id: rotation_id.into(),
            new,
            previous,
        }))
    }

    /// Writes (replaces) the record, owned by the SecretRotation.
    pub async fn write(&self, sr: &SecretRotation, record: &Record) -> Result<()> {
        self.apply(sr, record, false).await
    }

    /// A server-side dry run of a record of the usual shape: RBAC, quota and
    /// admission policies are checked before a value is issued, so a value
    /// the identity provider already made is never stranded by a refused
    /// record.
    pub async fn check_writable(&self, sr: &SecretRotation, targets: &[String]) -> Result<()> {
        let placeholder = SecretValue::new("x".repeat(64));
        let record = Record {
            rotation_id: "dry-run".into(),
            new: placeholder.clone(),
            previous: targets
                .iter()
                .map(|t| (t.clone(), placeholder.clone()))
                .collect(),
        };
        self.apply(sr, &record, true).await
    }

    async fn apply(&self, sr: &SecretRotation, record: &Record, dry_run: bool) -> Result<()> {
        let mut data = Wiped(BTreeMap::from([
            (
                ROTATION_KEY.to_string(),
                ByteString(record.rotation_id.as_bytes().to_vec()),
            ),
            (
                NEW_KEY.to_string(),
                ByteString(record.new.expose().as_bytes().to_vec()),
            ),
        ]));
        for (target, value) in &record.previous {
            data.0.insert(
                format!("{PREVIOUS_PREFIX}{target}"),
                ByteString(value.expose().as_bytes().to_vec()),
            );
        }
        let owner = sr
            .controller_owner_ref(&())
            .ok_or_else(|| Error::permanent(Reason::Internal, "SecretRotation has no uid"))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([
                    (WAL_LABEL.to_string(), "true".to_string()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "rekey".to_string(),
                    ),
                ])),
                owner_references: Some(vec![owner]),
                ..Default::default()
            },
            data: Some(std::mem::take(&mut data.0)),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        // The record's bytes are wiped once sent (or refused); the JSON body
        // kube-rs serialized from them is its own (docs/secrets.md).
        let secret = WipedSecret(secret);
        let mut params = PatchParams::apply("rekey").force();
        params.dry_run = dry_run;
        self.api
            .patch(&self.name, &params, &Patch::Apply(&secret.0))
            .await
            .map_err(|e| Error::kube("write write-ahead record", e))?;
        Ok(())
    }

    /// Deletes the record once the rotation is over (no value lingers).
    pub async fn delete(&self) -> Result<()> {
        match self.api.delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::kube("delete write-ahead record", e)),
        }
    }
}

/// Secret data whose bytes are wiped when dropped.
struct Wiped(BTreeMap<String, ByteString>);

impl Drop for Wiped {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// A Secret whose data bytes are wiped when dropped.
struct WipedSecret(Secret);

impl Drop for WipedSecret {
    fn drop(&mut self) {
        if let Some(data) = &mut self.0.data {
            wipe(data);
        }
    }
}

fn wipe(data: &mut BTreeMap<String, ByteString>) {
    for v in data.values_mut() {
        v.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_bytes_are_wiped() {
        let value = b"canary-wal-9d1e".to_vec();
        let mut data = BTreeMap::from([(NEW_KEY.to_string(), ByteString(value))]);
        wipe(&mut data);
        assert!(data.values().all(|v| v.0.is_empty()));
        let secret = WipedSecret(Secret {
            data: Some(data),
            ..Default::default()
        });
        drop(secret);
    }
}
