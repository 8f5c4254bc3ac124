//! Per-request policy decided when a request is classified against the route
//! table, and read by the layers below it from the request's extensions.

use std::time::Duration;

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
    /// The route makes a replay after sending safe whatever the method: it
    /// says `idempotency-key=honoured`, or it has a `verify=` rule (a replay
    /// that meets the stored write gets a 409, which is verified).
    pub replay_after_send: bool,
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
