//! The retry layer's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, linear_buckets};
use prometheus_client::registry::Registry;

use super::policy::RetryClass;

/// The label of `idemproxy_retries_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Counters of the retry layer. [`RetryMetrics::default`] makes unregistered
/// metrics (for tests); [`RetryMetrics::new`] registers them.
#[derive(Clone, Debug)]
pub struct RetryMetrics {
    retries: Family<ReasonLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    attempts: Histogram,
    budget_exhausted: Counter,
}

impl Default for RetryMetrics {
    fn default() -> Self {
        Self {
            retries: Family::default(),
            refused: Family::default(),
            attempts: Histogram::new(linear_buckets(1.0, 1.0, 10)),
            budget_exhausted: Counter::default(),
        }
    }
}

impl RetryMetrics {
    /// Registers `idemproxy_retries_total{reason}`,
    /// `idemproxy_retries_refused_total{reason}`, `idemproxy_attempts` and
    /// `idemproxy_retry_budget_exhausted_total` in `registry` (full names: use
    /// a registry without prefix).
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        // Every reason is exported from the start, so 0 reads as 0, not as absent.
        for class in super::RetryClass::ALL {
            let label = ReasonLabel {
                reason: class.as_str(),
            };
            let _ = metrics.retries.get_or_create(&label);
            let _ = metrics.refused.get_or_create(&label);
        }
        registry.register(
            "idemproxy_retries",
            "Retries sent upstream, by reason (Envoy retry_on word)",
            metrics.retries.clone(),
        );
        registry.register(
            "idemproxy_retries_refused",
            "Retries not sent because the request may have been processed and a replay could run it twice, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "idemproxy_attempts",
            "Upstream attempts per request, retries included",
            metrics.attempts.clone(),
        );
        registry.register(
            "idemproxy_retry_budget_exhausted",
            "Retries not sent because the retry budget was spent",
            metrics.budget_exhausted.clone(),
        );
        metrics
    }

    pub(crate) fn retried(&self, reason: RetryClass) {
        self.retries
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub(crate) fn refused(&self, reason: RetryClass) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub(crate) fn attempts(&self, attempts: u32) {
        self.attempts.observe(f64::from(attempts));
    }

    pub(crate) fn budget_exhausted(&self) {
        self.budget_exhausted.inc();
    }
}
