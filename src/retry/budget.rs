//! The retry budget shared by all requests: retries may add at most a ratio
//! of the requests seen over the last 10 seconds, plus a small floor per
//! second, so a failing upstream never gets a retry storm.
//!
//! This wraps tower's [`TpsBudget`] (the budget is the reusable part of
//! `tower::retry`; its `Retry` service cannot replay a streaming body).
//!
//! ```
//! use idemproxy::retry::budget::RetryBudget;
//! let budget = RetryBudget::new(0.5, 0);
//! budget.deposit();
//! budget.deposit();
//! assert!(budget.withdraw());
//! assert!(!budget.withdraw());
//! ```

use std::fmt;
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

/// A retry budget: deposit once per original request, withdraw once per retry.
pub struct RetryBudget {
    inner: TpsBudget,
    ratio: f32,
    min_per_sec: u32,
}

impl RetryBudget {
    /// How long a deposit counts.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A budget allowing `ratio` retries per request seen over [`Self::WINDOW`]
    /// plus `min_per_sec` retries per second. Out-of-range values are clamped
    /// (`ratio` to `0..=1000`, NaN to 0). A ratio below 1 is applied as
    /// one retry per `floor(1/ratio)` requests (0.2 → one per 5, 0.3 → one per 3).
    pub fn new(ratio: f32, min_per_sec: u32) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1000.0)
        };
        // TpsBudget multiplies the floor by the window and the withdraw amount
        // (up to 1000 for tiny ratios); keep that well inside isize.
        let min_per_sec = min_per_sec.min(1_000_000);
        Self {
            inner: TpsBudget::new(Self::WINDOW, min_per_sec, ratio),
            ratio,
            min_per_sec,
        }
    }

    /// Records one original request.
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Takes the allowance for one retry; `false` when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.ratio)
            .field("min_per_sec", &self.min_per_sec)
            .field("inner", &self.inner)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At ratio 0.2 and no floor, 100 requests allow exactly 20 retries.
    #[tokio::test(start_paused = true)]
    async fn ratio_bounds_retries() {
        let budget = RetryBudget::new(0.2, 0);
        let mut retries = 0;
        for _ in 0..100 {
            budget.deposit();
            while budget.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 20);
    }

    /// The floor allows min_per_sec retries per second of window with no traffic.
    #[tokio::test(start_paused = true)]
    async fn floor_allows_retries_without_traffic() {
        let budget = RetryBudget::new(0.2, 1);
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 10);
    }

    /// Deposits expire after the window.
    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_window() {
        let budget = RetryBudget::new(1.0, 0);
        budget.deposit();
        tokio::time::advance(RetryBudget::WINDOW + Duration::from_secs(2)).await;
        assert!(!budget.withdraw());
    }

    /// Absurd settings are clamped instead of panicking.
    #[test]
    fn absurd_settings_do_not_panic() {
        let _ = RetryBudget::new(f32::NAN, u32::MAX);
        let _ = RetryBudget::new(-1.0, 0);
        let _ = RetryBudget::new(f32::INFINITY, 0);
        let _ = RetryBudget::new(1e-9, u32::MAX);
    }
}
