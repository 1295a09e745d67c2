//! Verifying: proves the new value works where the source allows it.

use super::super::view::View;
use crate::decide::Outcome;
use crate::error::Result;

pub async fn step(v: &mut View) -> Result<Outcome> {
    let value = v.new_value().await?;
    let source = v.source()?;
    crate::failpoint::around("verify", source.verify(&value)).await?;
    Ok(Outcome::Done)
}
