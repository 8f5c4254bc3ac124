//! Exponential backoff with full jitter.
//!
//! The cap doubles from `base` with every retry until it reaches `max`; the
//! delay is drawn uniformly from `0..=cap` ("full jitter"), which spreads the
//! retries of many clients that failed together.
//!
//! ```
//! use std::time::Duration;
//! use idemproxy::retry::backoff::Backoff;
//! let b = Backoff::new(Duration::from_millis(25), Duration::from_secs(2));
//! assert_eq!(b.cap(3), Duration::from_millis(100));
//! assert!(b.delay(3, &mut rand::rng()) <= Duration::from_millis(100));
//! ```

use std::time::Duration;

use rand::Rng;

/// Exponential backoff from `base` doubling up to `max`, with full jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff whose first retry waits up to `base` and no retry more than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The longest wait before retry number `retry` (1 for the first retry):
    /// `base * 2^(retry-1)`, at most `max`.
    pub fn cap(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry number `retry`: uniform in `0..=cap(retry)`.
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let cap = u64::try_from(self.cap(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap doubles from base and stops at max, even for huge retry numbers.
    #[test]
    fn cap_doubles_up_to_max() {
        let b = Backoff::new(Duration::from_millis(25), Duration::from_secs(2));
        let caps: Vec<u128> = (1..=9).map(|n| b.cap(n).as_millis()).collect();
        assert_eq!(caps, [25, 50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.cap(u32::MAX), Duration::from_secs(2));
        assert_eq!(b.cap(0), Duration::from_millis(25));
    }

    /// Delays stay within 0..=cap and are spread over the range (full jitter).
    #[test]
    fn delay_is_full_jitter_within_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = rand::rng();
        let delays: Vec<Duration> = (0..1000).map(|_| b.delay(2, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(200)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(50)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(150)));
        let zero = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.delay(5, &mut rng), Duration::ZERO);
    }
}
