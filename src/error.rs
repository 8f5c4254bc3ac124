//! The stack's error, and its one translation into a response.
//!
//! Layers return [`ProxyError`]; only the edge ([`ProxyError::into_response`])
//! turns one into what the client sees: `400` when the client's own request
//! body failed, `502` when the upstream could not be reached or broke the
//! exchange, `504` when a deadline passed, all with a JSON
//! body `{"error", "detail", "attempts", "may_have_been_processed"}`. The last
//! field tells an agent "safe to send again" (`false`: no attempt can have
//! reached the upstream's handler) from "check first" (`true`).

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::BoxError;
use crate::body::{self, Body};

/// Why no upstream response could be produced: the upstream's failure, or
/// the client's own request body's (a `400`).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The TCP connection or TLS handshake failed (refused, unreachable, bad certificate).
    #[error("could not connect to the upstream: {0}")]
    Connect(#[source] BoxError),
    /// The TLS handshake with the upstream failed (certificate not trusted,
    /// name mismatch, client certificate refused). Not transient: never retried.
    #[error("TLS handshake with the upstream failed: {0}")]
    Tls(#[source] BoxError),
    /// The TCP connect did not finish in time.
    #[error("connecting to the upstream timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The upstream closed or reset the connection after (part of) the
    /// request was written and before response headers: it may have
    /// processed the request.
    #[error("the upstream closed the connection before sending response headers: {0}")]
    Reset(#[source] BoxError),
    /// The connection closed before any byte of the request was written: the
    /// upstream cannot have processed it.
    #[error("the upstream connection closed before the request was sent: {0}")]
    ResetBeforeRequest(#[source] BoxError),
    /// The HTTP/2 upstream refused the stream (`REFUSED_STREAM`, or a GOAWAY
    /// that excluded it): it did not process the request.
    #[error("the upstream refused the HTTP/2 stream without processing it: {0}")]
    RefusedStream(#[source] BoxError),
    /// No response headers arrived before the deadline.
    #[error("no response headers from the upstream within {0:?}")]
    Timeout(Duration),
    /// The request body could not be read from the client.
    #[error("the client's request body failed: {0}")]
    RequestBody(#[source] BoxError),
    /// Any other failure of the exchange.
    #[error("the upstream exchange failed: {0}")]
    Other(#[source] BoxError),
    /// Several attempts were made; this is the last one's error.
    #[error("{last} (after {attempts} attempts)")]
    Exhausted {
        /// The error of the last attempt.
        last: Box<ProxyError>,
        /// How many attempts were sent.
        attempts: u32,
        /// Whether any of the attempts may have been processed upstream.
        may_have_been_processed: bool,
    },
}

impl ProxyError {
    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::ConnectTimeout(_) => "connect_timeout",
            Self::Reset(_) => "reset",
            Self::ResetBeforeRequest(_) => "reset_before_request",
            Self::RefusedStream(_) => "refused_stream",
            Self::Timeout(_) => "timeout",
            Self::RequestBody(_) => "request_body",
            Self::Other(_) => "other",
            Self::Exhausted { last, .. } => last.kind(),
        }
    }

    /// The error of the last attempt, looking through [`ProxyError::Exhausted`].
    pub fn last(&self) -> &ProxyError {
        match self {
            Self::Exhausted { last, .. } => last.last(),
            other => other,
        }
    }

    /// How many attempts went upstream (1 unless retried).
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Exhausted { attempts, .. } => *attempts,
            _ => 1,
        }
    }

    /// Whether the upstream may have processed the request despite this
    /// error: `false` only when no attempt can have reached its handler (the
    /// connection failed, closed before the request was written, or the
    /// stream was refused). A broken request body counts as `true`: part of
    /// it may have been sent.
    pub fn may_have_been_processed(&self) -> bool {
        match self {
            Self::Connect(_)
            | Self::Tls(_)
            | Self::ConnectTimeout(_)
            | Self::ResetBeforeRequest(_)
            | Self::RefusedStream(_) => false,
            Self::Reset(_) | Self::Timeout(_) | Self::RequestBody(_) | Self::Other(_) => true,
            Self::Exhausted {
                may_have_been_processed,
                ..
            } => *may_have_been_processed,
        }
    }

    /// The status the client gets: `504` for deadlines, `400` for a broken
    /// request body, `502` otherwise.
    pub fn status(&self) -> StatusCode {
        match self.last() {
            Self::ConnectTimeout(_) | Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The JSON error response the client gets.
    pub fn into_response(&self) -> Response<Body> {
        let status = self.status();
        let error = match status {
            StatusCode::GATEWAY_TIMEOUT => "upstream_timeout",
            StatusCode::BAD_REQUEST => "bad_request_body",
            _ => "upstream_unavailable",
        };
        let doc = serde_json::json!({
            "error": error,
            "detail": self.to_string(),
            "attempts": self.attempts(),
            "may_have_been_processed": self.may_have_been_processed(),
        });
        json_response(status, &doc)
    }
}

/// A JSON error answer `{"error": .., "detail": .., "attempts": ..}` made by the proxy itself.
pub fn json_error(
    status: StatusCode,
    error: &str,
    detail: &str,
    attempts: Option<u32>,
) -> Response<Body> {
    let mut doc = serde_json::json!({ "error": error, "detail": detail });
    if let (Some(n), Some(map)) = (attempts, doc.as_object_mut()) {
        map.insert("attempts".into(), n.into());
    }
    json_response(status, &doc)
}

fn json_response(status: StatusCode, doc: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(body::full(doc.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
