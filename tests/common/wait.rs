//! The one way the tests wait: poll a condition until it holds or a deadline passes, and
//! panic naming what was awaited (plus, for processes, what they logged). Never a bare sleep:
//! the only sleeps here are the poll interval between two looks at the condition.
//!
//! [`until`] is for async tests (the appliance under test runs on the same runtime, so the
//! wait must yield); [`until_blocking`] is the same loop for tests that drive processes from a
//! plain thread.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a real process (`lockstep serve`, `lockstep agent`, a browser) may take for
/// anything we wait on: generous, the tests share two cores.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Time between two looks at the condition.
pub const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` every [`POLL`] until it holds; panics with `what` after `within`.
#[track_caller]
pub fn until<F, Fut>(what: &str, within: Duration, mut cond: F) -> impl Future<Output = ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let caller = std::panic::Location::caller();
    let what = what.to_string();
    async move {
        let deadline = Instant::now() + within;
        loop {
            if cond().await {
                return;
            }
            if Instant::now() >= deadline {
                panic!("waited {within:?} for {what} (at {caller})");
            }
            // The poll interval, not a synchronisation: the condition decides.
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Polls `cond` every [`POLL`] until it holds; panics with `what` and `context()` (a
/// process's log, say) after `within`.
#[track_caller]
pub fn until_blocking(
    what: &str,
    within: Duration,
    context: impl Fn() -> String,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("waited {within:?} for {what}\n{}", context());
        }
        // The poll interval, not a synchronisation: the condition decides.
        std::thread::sleep(POLL);
    }
}
