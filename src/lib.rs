//! rekey: rotates credentials end to end and proves every step before the old
//! value is taken away. See docs/concepts.md.
#![forbid(unsafe_code)]

pub mod change;
pub mod crd;
pub mod decide;
pub mod deps;
pub mod duration;
pub mod error;
pub mod failpoint;
pub mod fingerprint;
pub mod leader;
pub mod machine;
pub mod metrics;
pub mod plan;
pub mod proof;
pub mod reason;
pub mod remote;
pub mod server;
pub mod source;
pub mod store;
pub mod value;
pub mod wake;
pub mod wal;

/// Selects rustls' crypto provider once per process (kube and reqwest both
/// bring rustls; with more than one provider compiled in, none is default).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
