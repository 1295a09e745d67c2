//! rekey: rotates credentials end to end and proves every step before the old
//! value is taken away. See DESIGN.md and docs/.
#![forbid(unsafe_code)]

pub mod crd;
