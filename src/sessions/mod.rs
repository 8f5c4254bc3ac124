//! Session tracking and heartbeats: keep the backend sessions of idle clients alive.
//!
//! The request path tells the [`SessionTracker`] about every session id it
//! sees ([`SessionTracker::observe`]) and wraps each forwarded request in an
//! [`InFlight`] guard ([`SessionTracker::begin_request`]). One scheduler task
//! ([`SessionTracker::spawn_scheduler`]) serves every session from a single
//! timer queue (no task per session) and sends each session's heartbeat to the
//! upstream `interval` ±10% after its last **renewal**:
//!
//! - a renewal is a heartbeat answered alive, or a client request that the
//!   backend itself counts as one ([`SessionTracker::renew`]; the request
//!   path calls it for routes declared `renews`). Other client traffic never
//!   postpones a heartbeat: on most backends it does not extend the session,
//!   and a busy session must stay alive as surely as a silent one;
//! - client traffic keeps a session in use: the idle timeout counts from the
//!   last activity, and a request in flight (a long poll, a stream) keeps the
//!   session in use while heartbeats go on;
//! - a `2xx` keeps the session (when [`SessionConfig::alive_field`] is set, the
//!   JSON answer must also contain that field); `401`, `403`, `404` and `410`
//!   mean the session is gone: it is forgotten and never heartbeated again;
//! - a `5xx`, a timeout or a connection error is retried twice with a short
//!   backoff, then counts as one failure; other `4xx` count as a failure;
//!   after [`SessionConfig::max_failures`] failures in a row the session is
//!   dropped;
//! - a session with no activity for [`SessionConfig::idle_timeout`] and no
//!   request in flight is dropped; [`SessionTracker::end`] drops one at once;
//! - heartbeats are paced to [`SessionConfig::max_per_sec`], so thousands of
//!   sessions that became due together never flood the backend.
//!
//! A session id may itself be a credential: it is shown and logged only as a
//! short keyed digest ([`SessionTracker::digest`]), and the copied credentials
//! headers are kept in memory only, marked sensitive, never logged or shown.
//!
//! This module knows nothing of routes or templates: the caller extracts the
//! id and renders the [`HeartbeatSpec`].
//!
//! ```
//! use std::sync::Arc;
//! use http::{HeaderMap, Method, Response, header};
//! use idemproxy::body::{self, Body};
//! use idemproxy::error::ProxyError;
//! use idemproxy::sessions::{
//!     EndReason, HeartbeatSpec, Registration, SessionConfig, SessionMetrics, SessionTracker,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut registry = prometheus_client::registry::Registry::default();
//! let tracker = SessionTracker::new(SessionConfig::default(), SessionMetrics::new(&mut registry));
//!
//! // The proxy's upstream service; here one that answers 200 to everything.
//! let upstream = tower::service_fn(|_req: http::Request<Body>| async {
//!     Ok::<_, ProxyError>(Response::new(body::empty()))
//! });
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let scheduler = tracker.spawn_scheduler(upstream, async move { let _ = stopped.await; });
//!
//! // On each request that carries a session id:
//! let mut credentials = HeaderMap::new();
//! credentials.insert(header::AUTHORIZATION, "Bearer t0k3n".parse().unwrap());
//! tracker.observe(Registration {
//!     id: "8f14e45f".into(),
//!     source: "header:Mcp-Session-Id".into(),
//!     heartbeat: Some(Arc::new(HeartbeatSpec::new(
//!         Method::POST,
//!         "/v1/sessions/8f14e45f/heartbeat".parse().unwrap(),
//!     ))),
//!     credentials,
//! });
//! let in_flight = tracker.begin_request("8f14e45f");
//! // ... forward the request ...
//! drop(in_flight);
//!
//! assert_eq!(tracker.len(), 1);
//! tracker.end("8f14e45f", EndReason::ClientEnd);
//! assert!(tracker.is_empty());
//!
//! let _ = stop.send(());
//! scheduler.await.unwrap();
//! # }
//! ```

mod compact;
mod heartbeat;
mod layer;
mod metrics;
mod scheduler;
mod table;
mod tracker;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method};

pub use layer::{SessionLayer, SessionLayerConfig, Sessions};
pub use metrics::{HeartbeatOutcome, SessionMetrics, Untracked};
pub use tracker::{
    InFlight, MAX_CREDENTIALS_LEN, MAX_SESSION_ID_LEN, Observed, SessionTracker, SessionView,
};

/// Settings of the session tracker and its heartbeat scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Time from a session's last renewal (or last heartbeat round) to its
    /// next heartbeat, ±10% jitter. Default 30s; values under 100ms are raised to 100ms.
    pub interval: Duration,
    /// A session with no client activity for this long and no request in
    /// flight is dropped. Default 30m.
    pub idle_timeout: Duration,
    /// Consecutive failed heartbeats (each after its retries) that drop a
    /// session. Default 3; 0 is read as 1.
    pub max_failures: u32,
    /// The most sessions tracked at once; a new one evicts the session with
    /// the oldest activity that has no request in flight. Default 10 000.
    pub max_sessions: usize,
    /// The most bytes the table holds: ids, copied credentials, rendered
    /// heartbeats and each session's fixed cost. A new session evicts as for
    /// `max_sessions`. Default 64 MiB.
    pub max_bytes: usize,
    /// The most heartbeat requests per second sent to the upstream, retries
    /// included. Default 500; 0 means no limit.
    pub max_per_sec: u32,
    /// A JSON field path (`["result", "TTL"]`; array indexes as numeric
    /// segments) that a live `2xx` heartbeat answer must contain with a
    /// non-null value; a `2xx` without it means the session is gone.
    /// `None` (the default): any `2xx` means alive.
    pub alive_field: Option<Vec<String>>,
    /// Deadline of one heartbeat attempt, response headers and (when read)
    /// body included. Default 5s.
    pub request_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30 * 60),
            max_failures: 3,
            max_sessions: 10_000,
            max_bytes: 64 << 20,
            max_per_sec: 500,
            alive_field: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// What to send upstream to keep one session alive, rendered by the caller.
///
/// Its URI is only a path and query: the upstream service fills in the scheme
/// and authority. The `Debug` output hides the path, body and header values,
/// which usually contain the session id.
#[derive(Clone, PartialEq, Eq)]
pub struct HeartbeatSpec {
    /// The heartbeat's method.
    pub method: Method,
    /// The heartbeat's path and query, e.g. `/v1/sessions/8f14e45f/heartbeat`.
    pub path_and_query: PathAndQuery,
    /// A body, sent with `content-type: application/json`.
    pub body: Option<Bytes>,
    /// Extra headers (already rendered templates); they replace copied
    /// credentials headers of the same name.
    pub set_headers: HeaderMap,
    /// This session's own interval (a third of a lease length the backend
    /// stated, see a route's `lease-ttl=`); `None`: the global one.
    pub interval: Option<Duration>,
}

impl HeartbeatSpec {
    /// A heartbeat without body or extra headers.
    pub fn new(method: Method, path_and_query: PathAndQuery) -> Self {
        Self {
            method,
            path_and_query,
            body: None,
            set_headers: HeaderMap::new(),
            interval: None,
        }
    }

    /// Sets this session's own interval.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Sets the JSON body.
    pub fn with_json_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }
}

impl fmt::Debug for HeartbeatSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatSpec")
            .field("method", &self.method)
            .field("path_and_query", &"<redacted>")
            .field("body_len", &self.body.as_ref().map(Bytes::len))
            .field("set_headers", &self.set_headers.keys().collect::<Vec<_>>())
            .field("interval", &self.interval)
            .finish()
    }
}

/// One sighting of a session id on a request (or its response), for
/// [`SessionTracker::observe`].
#[derive(Clone)]
pub struct Registration {
    /// The session id, exactly as the backend carries it (the request's
    /// `extensions::SessionId`). A new session keeps this very allocation as its key.
    pub id: Arc<str>,
    /// Where the id was found, e.g. `header:Mcp-Session-Id`. An `Arc` so the
    /// caller shares one label per configured source among all sessions.
    pub source: Arc<str>,
    /// The heartbeat for this session.
    ///
    /// - For a new session, `Some` is its heartbeat; `None` tracks it without
    ///   heartbeats (activity, idle expiry and `/sessions` only).
    /// - For a known session, `Some` replaces its heartbeat and `None` keeps
    ///   the one it has. The request that registered a session usually
    ///   defines its heartbeat (its captures are in the template), so pass
    ///   `Some` when [`SessionTracker::contains`] says the id is new or when
    ///   the request's route sets its own `heartbeat=`, `None` otherwise; this
    ///   also saves rendering a template on every request.
    ///
    /// An `Arc` so identical specs (a template without `{session}`) are
    /// shared by all sessions.
    pub heartbeat: Option<Arc<HeartbeatSpec>>,
    /// The credentials headers of this request to copy onto heartbeats
    /// (`Authorization`, `Cookie`, the session's own header, ...). They
    /// replace those of earlier requests: a later request may carry a
    /// refreshed token. Values are copied (never kept as slices of the
    /// connection's read buffer) and marked sensitive; headers that describe a
    /// body or a connection (`content-length`, `host`, `connection`, ...) and
    /// `x-request-id` are left out.
    pub credentials: HeaderMap,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("id", &"<redacted>")
            .field("source", &self.source)
            .field("heartbeat", &self.heartbeat)
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a session stopped being tracked; the `reason` label of
/// `idemproxy_sessions_ended_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// No activity for the idle timeout and nothing in flight.
    Idle,
    /// The client ended it (a `session-end` route answered 2xx).
    ClientEnd,
    /// A heartbeat answered 401, 403, 404 or 410, or lacked the alive field.
    Gone,
    /// Too many heartbeats failed in a row.
    Failures,
    /// Evicted to make room under `max_sessions`.
    Evicted,
    /// Removed on the admin port.
    Admin,
}

impl EndReason {
    /// Every reason, in label order.
    pub const ALL: [EndReason; 6] = [
        Self::Idle,
        Self::ClientEnd,
        Self::Gone,
        Self::Failures,
        Self::Evicted,
        Self::Admin,
    ];

    /// The metric label value (`idle`, `client_end`, `gone`, `failures`, `evicted`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::ClientEnd => "client_end",
            Self::Gone => "gone",
            Self::Failures => "failures",
            Self::Evicted => "evicted",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
