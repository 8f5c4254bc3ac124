//! Bounded waits: every wait in a test ends after [`WAIT`], so a hang fails
//! the test with a message instead of stalling the suite.
//!
//! ```no_run
//! # async fn example(requests: testkit::Requests) {
//! testkit::eventually("two requests", || requests.len() >= 2).await;
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Upper bound for any single wait in a test: long enough for a slow CI
/// machine, short enough that a hang fails quickly.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, panicking with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// Polls `check` every 10 ms until it returns true, panicking after [`WAIT`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    within(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Aborts the task when dropped, so a test's servers stop with the test.
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
