//! AwaitingSync: requests a refresh of every ExternalSecret (idempotent per
//! rotation id) and waits until each one's Secret holds the new value.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::super::view::View;
use crate::decide::Outcome;
use crate::error::{Error, Result};
use crate::proof::eso::SyncState;
use crate::reason::Reason;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let value = v.new_value().await?;
    let id = v.rotation().id.clone();
    let eso = v.ctx.providers.sync(&v.namespace);
    let mut waiting = vec![];
    for es in &v.sr.spec.proof.external_secrets {
        if let SyncState::Waiting(why) = eso.refresh_and_check(es, &id, &value).await? {
            waiting.push(why);
        }
    }
    if waiting.is_empty() {
        v.rotation_mut().synced_at = Some(Time(v.now));
        return Ok(Outcome::Done);
    }
    let waiting = waiting.join("; ");
    if v.phase_timed_out() {
        return Err(Error::permanent(
            Reason::SyncTimeout,
            format!(
                "the new value was not synced within {}: {waiting}",
                v.sr.spec.proof.timeout
            ),
        ));
    }
    Ok(Outcome::Waiting(waiting))
}
