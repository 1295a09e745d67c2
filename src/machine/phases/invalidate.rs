//! Invalidating and AwaitingConfirmation: invalidates the old value at the
//! source, or waits for a person to confirm they did (manual source).

use super::super::view::View;
use crate::decide::Outcome;
use crate::error::{Error, Result};
use crate::reason::Reason;
use crate::source::Invalidation;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let id = v.rotation().id.clone();
    let outcome = v
        .source()?
        .invalidate(&id, v.annotations())
        .await
        .map_err(|e| Error {
            reason: Reason::InvalidationFailed,
            ..e
        })?;
    Ok(match outcome {
        Invalidation::Done => Outcome::Done,
        Invalidation::NeedsConfirmation => Outcome::NeedsConfirmation,
    })
}
