//! Crash points for the crash matrix (tests/it/crash.rs), compiled only with
//! the cargo feature `failpoints`; without it `hit` is an empty inline
//! function and every call compiles to nothing.
//!
//! `REKEY_FAILPOINT=<before|after>:<effect>` (read once per process) makes the
//! process abort right before or right after that side effect: no
//! destructor, no flush, no shutdown, as close to SIGKILL as safe code gets
//! (`std::process::abort`). Effects are named after what `View::act` is
//! told (spaces as dashes: `issue`, `write-ahead-record`, `write`,
//! `refresh-request`, `restart`, `invalidate`, `restore`,
//! `rollback-refresh-request`, `rollback-restart`) plus the effects outside
//! it: `claim`, `verify`, `delete-write-ahead-record`, `release-claims`,
//! `add-finalizer`, `remove-finalizer`, `sweep-write-ahead-record`.
//!
//! Hand-rolled instead of the `fail` crate: the one action needed (abort)
//! is not one of `fail`'s, which would also bring a second `rand` (0.8)
//! and `log` into the test build for a one-line comparison.

/// Aborts the process when `REKEY_FAILPOINT` names `<when>:<what>`.
#[cfg(feature = "failpoints")]
pub fn hit(when: &str, what: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(point) = POINT
        .get_or_init(|| std::env::var("REKEY_FAILPOINT").ok())
        .as_deref()
    else {
        return;
    };
    let name = format!("{when}:{}", what.replace(' ', "-"));
    if point == name {
        // stderr is unbuffered: the line is out before the abort.
        eprintln!("rekey failpoint {name}: aborting the process");
        std::process::abort();
    }
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_when: &str, _what: &str) {}

/// Runs `call` between the `before:` and `after:` points of `what` (the
/// `after:` point only when it succeeded: a failed call changed nothing to
/// crash after).
#[cfg(feature = "failpoints")]
pub async fn around<T, E>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    hit("before", what);
    let out = call.await;
    if out.is_ok() {
        hit("after", what);
    }
    out
}

/// Without the `failpoints` feature: `call` itself, untouched.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn around<F>(_what: &str, call: F) -> F {
    call
}
