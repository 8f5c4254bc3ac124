//! The proxy's own Prometheus metrics. Capability modules (retries, sessions,
//! idempotency) register theirs in the same [`Registry`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of [`ProxyMetrics::requests`]: `1xx` .. `5xx`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeClass {
    /// The status code's class.
    pub code_class: &'static str,
}

/// Label of [`ProxyMetrics::upstream_errors`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorKind {
    /// [`crate::error::ProxyError::kind`].
    pub kind: &'static str,
}

/// Metrics of the forwarding path.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// `idemproxy_requests_total{code_class}`: answered requests.
    pub requests: Family<CodeClass, Counter>,
    /// `idemproxy_request_duration_seconds`: time until response headers went to the client.
    pub duration: Histogram,
    /// `idemproxy_upstream_errors_total{kind}`: requests that got no upstream response.
    pub upstream_errors: Family<ErrorKind, Counter>,
    /// `idemproxy_requests_in_flight`: requests whose response has not finished.
    pub in_flight: Gauge,
    /// `idemproxy_connections_open`: client connections open now.
    pub connections_open: Gauge,
    /// `idemproxy_connections_rejected_total`: connections refused at the limit.
    pub connections_rejected: Counter,
    /// The five `requests` counters, fetched once: a family lookup takes a lock
    /// and a hash on every request.
    by_class: [Counter; 5],
}

impl ProxyMetrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::unregistered();
        registry.register(
            "idemproxy_requests",
            "Requests answered, by status class",
            m.requests.clone(),
        );
        registry.register(
            "idemproxy_request_duration_seconds",
            "Time from request to response headers sent to the client",
            m.duration.clone(),
        );
        registry.register(
            "idemproxy_upstream_errors",
            "Requests that got no upstream response, by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "idemproxy_requests_in_flight",
            "Requests being served",
            m.in_flight.clone(),
        );
        registry.register(
            "idemproxy_connections_open",
            "Open client connections",
            m.connections_open.clone(),
        );
        registry.register(
            "idemproxy_connections_rejected",
            "Client connections refused at IDEMPROXY_MAX_CONNECTIONS",
            m.connections_rejected.clone(),
        );
        m
    }

    /// Metrics not attached to any registry (tests, embedding).
    pub fn unregistered() -> Self {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let requests = Family::<CodeClass, Counter>::default();
        let by_class = ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .map(|code_class| requests.get_or_create(&CodeClass { code_class }).clone());
        Self {
            requests,
            by_class,
            duration: Histogram::new(buckets),
            upstream_errors: Family::default(),
            in_flight: Gauge::default(),
            connections_open: Gauge::default(),
            connections_rejected: Counter::default(),
        }
    }

    /// Counts one answered request.
    pub fn count_status(&self, status: http::StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
    }
}
