//! Every type that the layers pass to each other in a request's extensions,
//! in one place, with who writes and who reads each. A layer reads what an
//! outer layer wrote; nothing is computed twice.
//!
//! | type | written by | read by |
//! |---|---|---|
//! | [`Classified`] | classify (the matched route and its captures) | sessions, verify |
//! | [`RequestPolicy`] | classify (the route's decisions) | idempotency key, verify, retry (the replay rule) |
//! | [`SessionId`] | classify (the first request source that found one) | sessions, idempotency key (fingerprints), verify |
//! | [`SessionSourceLabel`] | classify, next to [`SessionId`] | sessions |
//! | [`BufferedBody`] | classify, when a later step or a route's `if-json=` condition reads the body | sessions, idempotency cache and key, verify |
//! | [`IdempotencyKey`] | idempotency key | verify (logs, and left off the verification read) |
//! | [`Deadline`] | verify or retry, whichever is outermost for the request ([`Deadline::of`]) | retry, verify |
//! | [`Attempts`] (response) | retry, when it made more than one; verify carries the write's own onto a recovered answer | the edge, which turns it into `x-idemproxy-attempts` |
//!
//! [`BufferedBody`] lives with the read-ahead that makes it
//! (`crate::buffered`) and is named here so that this table is whole.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use tokio::time::Instant;

pub use crate::buffered::BufferedBody;
use crate::routes::{Captures, Route, RouteTable};

/// The matched route of a request, as a request extension.
#[derive(Clone, Debug)]
pub struct Classified {
    pub(crate) table: Arc<RouteTable>,
    pub(crate) index: usize,
    /// The path template's captures, percent-decoded.
    pub captures: Captures,
}

impl Classified {
    /// The matched route.
    pub fn route(&self) -> Option<&Route> {
        self.table.get(self.index)
    }
}

/// What the route table decided for one request. A request without this
/// extension gets the global defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestPolicy {
    /// `Some(false)` when the matched route says `retry=off`.
    pub retry: Option<bool>,
    /// The route's overall deadline (`timeout=`), replacing the global one.
    pub timeout: Option<Duration>,
    /// `Some(true)`/`Some(false)` when the route says `idempotency-key=on|off`
    /// (`honoured` is `Some(true)`).
    pub idempotency_key: Option<bool>,
    /// The route's word on a replay after the upstream may have processed
    /// the request. `Some(true)`: safe whatever the method (`replay=safe`,
    /// `idempotency-key=honoured`, or a `verify=` rule: a replay that meets
    /// the stored write gets a 409, which is verified). `Some(false)`
    /// (`replay=unsafe`): never, even for an idempotent method or with
    /// `IDEMPROXY_RETRY_UNSAFE_REQUESTS`. `None`: the method and the global
    /// opt-in decide.
    pub replay_after_send: Option<bool>,
}

impl RequestPolicy {
    /// What classification puts in the extensions of a request on `route`.
    pub fn of(route: &Route) -> Self {
        Self {
            retry: route.retry,
            timeout: route.timeout,
            idempotency_key: route.idempotency_key,
            replay_after_send: route.replay_after_send(),
        }
    }
}

/// The session a request belongs to, when a session source found one.
/// Layers read it from the request's extensions (fingerprint keys, heartbeats).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionId(pub std::sync::Arc<str>);

/// The label of the session source that found the request's [`SessionId`]
/// (e.g. `header:Mcp-Session-Id`), as the session metrics and `/sessions`
/// show it; set next to the id, so later layers need not search again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSourceLabel(pub std::sync::Arc<str>);

/// The key a request carries upstream, as a request extension (for logs and the 409 verifier).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The key.
    pub value: HeaderValue,
    /// Whether the client sent it (`false`: idemproxy made it).
    pub from_client: bool,
}

/// The request's overall deadline to response headers: the route's
/// `timeout=` ([`RequestPolicy::timeout`]) or the global
/// `IDEMPROXY_REQUEST_TIMEOUT`, counted from when the outermost layer that
/// needs it first saw the request. That layer inserts it, so that every
/// layer below keeps the same instant (a verification read shares the
/// write's deadline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// The time allowed, for error messages (`timed out after …`).
    pub limit: Duration,
    /// When it passes; `None` when it cannot be represented (never, in practice).
    pub at: Option<Instant>,
}

impl Deadline {
    /// The request's deadline: the one an outer layer set, else one
    /// starting now from the route's `timeout=` or `default`.
    pub fn of<B>(req: &Request<B>, default: Duration) -> Deadline {
        if let Some(d) = req.extensions().get::<Deadline>() {
            return *d;
        }
        let limit = req
            .extensions()
            .get::<RequestPolicy>()
            .and_then(|p| p.timeout)
            .unwrap_or(default);
        Deadline {
            limit,
            at: Instant::now().checked_add(limit),
        }
    }
}

/// The response header that shows [`Attempts`].
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-idemproxy-attempts");

/// How many attempts an answer took, as a *response* extension, set only
/// when more than one was made; the edge shows it as [`ATTEMPTS_HEADER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts(pub u32);
