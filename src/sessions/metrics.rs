//! Prometheus metrics of the session tracker.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::EndReason;

/// How one heartbeat attempt turned out; the `outcome` label of
/// `idemproxy_heartbeats_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeartbeatOutcome {
    /// The session is alive.
    Ok,
    /// The session is gone (401, 403, 404, 410, or the alive field is missing).
    Gone,
    /// The heartbeat failed after its retries (or with a non-retryable answer).
    Failed,
    /// The attempt failed and another one is scheduled.
    Retried,
}

impl HeartbeatOutcome {
    /// Every outcome, in label order.
    pub const ALL: [HeartbeatOutcome; 4] = [Self::Ok, Self::Gone, Self::Failed, Self::Retried];

    /// The metric label value (`ok`, `gone`, `failed`, `retried`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Gone => "gone",
            Self::Failed => "failed",
            Self::Retried => "retried",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The counter families behind [`SessionMetrics`], for registration.
type Families = (
    Family<OutcomeLabels, Counter>,
    Family<ReasonLabels, Counter>,
    Family<ReasonLabels, Counter>,
);

/// Why a session seen on a request was not tracked; the `reason` label of
/// `idemproxy_sessions_untracked_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Untracked {
    /// The table is full of sessions with requests in flight.
    Full,
    /// The session id is longer than the tracker keeps.
    IdTooLong,
    /// Its copied credentials headers are larger than the tracker keeps.
    CredentialsTooLarge,
}

impl Untracked {
    /// Every reason, in label order.
    pub const ALL: [Untracked; 3] = [Self::Full, Self::IdTooLong, Self::CredentialsTooLarge];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::IdTooLong => "id_too_long",
            Self::CredentialsTooLarge => "credentials_too_large",
        }
    }
}

/// The tracker's metrics: `idemproxy_sessions` (gauge of tracked sessions),
/// `idemproxy_session_table_bytes` (gauge of the bytes they hold),
/// `idemproxy_heartbeats_total{outcome}`,
/// `idemproxy_sessions_ended_total{reason}` and
/// `idemproxy_sessions_untracked_total{reason}`.
///
/// Cheap to clone (handles to shared atomics). Every label value is created
/// up front, so each series shows up at 0 before it first counts.
#[derive(Clone, Debug)]
pub struct SessionMetrics {
    sessions: Gauge,
    bytes: Gauge,
    heartbeats: [Counter; 4],
    ended: [Counter; 6],
    untracked: [Counter; 3],
}

impl SessionMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let (metrics, (heartbeats, ended, untracked)) = Self::build();
        registry.register(
            "idemproxy_sessions",
            "Sessions currently tracked for heartbeats",
            metrics.sessions.clone(),
        );
        registry.register(
            "idemproxy_session_table_bytes",
            "Bytes held by the session table (ids, copied credentials, heartbeats, fixed costs)",
            metrics.bytes.clone(),
        );
        registry.register(
            "idemproxy_sessions_untracked",
            "Sessions seen on a request but not tracked, by reason",
            untracked,
        );
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "idemproxy_heartbeats",
            "Heartbeat attempts sent to the upstream, by outcome",
            heartbeats,
        );
        registry.register(
            "idemproxy_sessions_ended",
            "Sessions no longer tracked, by reason",
            ended,
        );
        metrics
    }

    /// Metrics that are counted but not exported (tests, or heartbeats without `/metrics`).
    pub fn unregistered() -> Self {
        Self::build().0
    }

    /// The metrics and the families to register (heartbeats, ended, untracked).
    fn build() -> (Self, Families) {
        let heartbeats = Family::<OutcomeLabels, Counter>::default();
        let ended = Family::<ReasonLabels, Counter>::default();
        let untracked = Family::<ReasonLabels, Counter>::default();
        let metrics = Self {
            sessions: Gauge::default(),
            bytes: Gauge::default(),
            untracked: Untracked::ALL.map(|r| {
                untracked
                    .get_or_create(&ReasonLabels { reason: r.as_str() })
                    .clone()
            }),
            heartbeats: HeartbeatOutcome::ALL.map(|o| {
                heartbeats
                    .get_or_create(&OutcomeLabels {
                        outcome: o.as_str(),
                    })
                    .clone()
            }),
            ended: EndReason::ALL.map(|r| {
                ended
                    .get_or_create(&ReasonLabels { reason: r.as_str() })
                    .clone()
            }),
        };
        (metrics, (heartbeats, ended, untracked))
    }

    /// The number of tracked sessions, as last reported.
    pub fn sessions(&self) -> i64 {
        self.sessions.get()
    }

    /// How many heartbeat attempts had this outcome.
    pub fn heartbeats(&self, outcome: HeartbeatOutcome) -> u64 {
        self.heartbeats[outcome as usize].get()
    }

    /// How many sessions were not tracked for this reason.
    pub fn untracked(&self, reason: Untracked) -> u64 {
        self.untracked[reason as usize].get()
    }

    /// The bytes the session table holds, as last reported.
    pub fn table_bytes(&self) -> i64 {
        self.bytes.get()
    }

    pub(super) fn set_table_bytes(&self, bytes: usize) {
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub(super) fn session_untracked(&self, reason: Untracked) {
        self.untracked[reason as usize].inc();
    }

    /// How many sessions ended for this reason.
    pub fn ended(&self, reason: EndReason) -> u64 {
        self.ended[reason as usize].get()
    }

    pub(super) fn session_added(&self) {
        self.sessions.inc();
    }

    pub(super) fn session_ended(&self, reason: EndReason) {
        self.sessions.dec();
        self.ended[reason as usize].inc();
    }

    pub(super) fn heartbeat(&self, outcome: HeartbeatOutcome) {
        self.heartbeats[outcome as usize].inc();
    }
}

impl Default for SessionMetrics {
    fn default() -> Self {
        Self::unregistered()
    }
}
