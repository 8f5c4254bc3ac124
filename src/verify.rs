//! Verified `409` recovery: a write that reached the backend but whose answer
//! was lost must not turn into a client-visible error.
//!
//! On a route with a `verify=` rule, a `409 Conflict` triggers one
//! verification request (built from the rule: the same URL, the 409's
//! `Location`, or a URL template). Only when the answer *proves* the backend
//! holds what the request wanted to store (`exists`: a 2xx; `json-subset`:
//! every sent field stored with an equal value; `exact`: equal bytes) does the
//! client get the recovered status (default `200`) with the stored
//! representation and `x-idemproxy-recovered: 409`. In every other case —
//! different document, not found, verification failed, undecidable — the
//! original 409 goes back unchanged, byte for byte.
//!
//! The layer sits outside the retry layer: the 409 it sees is the final answer
//! of the retried request, and its verification request is itself retried
//! (bounded) and counts against the request's deadline.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::{info, warn};

use crate::body::{self, Body};
use crate::buffered::BufferedBody;
use crate::config::Upstream;
use crate::error::ProxyError;
use crate::extensions::{Attempts, Classified, Deadline, IdempotencyKey, SessionId};
use crate::request_id::X_REQUEST_ID;
use crate::routes::{
    MatchMode, RecoveredBody, RenderContext, VerifyRule, VerifyTarget, json_subset,
};
use crate::service::{HttpService, PassThrough, ResponseFuture, take_ready};

/// `x-idemproxy-recovered`, set on a recovered answer.
pub static X_IDEMPROXY_RECOVERED: HeaderName = HeaderName::from_static("x-idemproxy-recovered");

/// Request headers that describe the request's own body, or make a read
/// conditional: never copied onto a verification request.
const NOT_COPIED: [HeaderName; 11] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Why a 409 was passed through (label of `idemproxy_conflicts_passed_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PassReason {
    /// The stored representation differs from what was sent: a real conflict.
    Mismatch,
    /// The verification request answered 404/410: nothing stored there.
    NotFound,
    /// The verification request failed (error, other status, deadline).
    VerifyFailed,
    /// No verification could be built or decided (missing placeholder value,
    /// body not read, non-JSON body for json-subset, foreign Location, too large).
    Undecidable,
}

impl PassReason {
    fn label(self) -> &'static str {
        match self {
            Self::Mismatch => "mismatch",
            Self::NotFound => "not_found",
            Self::VerifyFailed => "verify_failed",
            Self::Undecidable => "undecidable",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Metrics of 409 verification.
#[derive(Clone, Debug, Default)]
pub struct VerifyMetrics {
    recovered: Counter,
    passed: Family<ReasonLabel, Counter>,
}

impl VerifyMetrics {
    /// Creates and registers `idemproxy_conflicts_recovered_total` and
    /// `idemproxy_conflicts_passed_total{reason}`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        // Every reason is exported from the start, so 0 reads as 0, not as absent.
        for reason in [
            PassReason::Mismatch,
            PassReason::NotFound,
            PassReason::VerifyFailed,
            PassReason::Undecidable,
        ] {
            let _ = m.passed.get_or_create(&ReasonLabel {
                reason: reason.label(),
            });
        }
        registry.register(
            "idemproxy_conflicts_recovered",
            "409 answers turned into success after verification",
            m.recovered.clone(),
        );
        registry.register(
            "idemproxy_conflicts_passed",
            "409 answers on verify routes passed through unchanged, by reason",
            m.passed.clone(),
        );
        m
    }
}

/// Settings of the verification.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// The upstream (a `Location` elsewhere is never followed).
    pub upstream: Upstream,
    /// The global deadline, when the route sets none.
    pub request_timeout: Duration,
    /// Largest stored representation read for comparison.
    pub max_body: usize,
    /// The idempotency-key header, not copied onto the read.
    pub key_header: HeaderName,
}

/// Adds [`Verify`] around a service.
#[derive(Clone, Debug)]
pub struct VerifyLayer {
    config: Arc<VerifyConfig>,
    metrics: VerifyMetrics,
}

impl VerifyLayer {
    /// A layer with this configuration and metrics.
    pub fn new(config: VerifyConfig, metrics: VerifyMetrics) -> Self {
        Self {
            config: Arc::new(config),
            metrics,
        }
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = Verify<S>;
    fn layer(&self, inner: S) -> Verify<S> {
        Verify {
            inner,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Verifies 409 answers on routes with a rule; see the module docs.
#[derive(Clone, Debug)]
pub struct Verify<S> {
    inner: S,
    config: Arc<VerifyConfig>,
    metrics: VerifyMetrics,
}

/// What is kept of the original request to verify its 409.
struct Original {
    rule: VerifyRule,
    classified: Classified,
    uri: Uri,
    headers: HeaderMap,
    body: Option<BufferedBody>,
    session: Option<SessionId>,
    key: Option<IdempotencyKey>,
    /// The write's deadline, which its verification read shares.
    deadline: Deadline,
}

impl<S> Service<Request<Body>> for Verify<S>
where
    S: HttpService,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    /// A request this layer has nothing to do for goes straight to the inner
    /// service's future, without a boxed future of its own.
    type Future = PassThrough<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(original) = self.keep(&req) else {
            // Nothing to verify: the service poll_ready made ready takes the
            // request, with no clone of the layers below.
            return Either::Left(self.inner.call(req));
        };
        // The retry layer below counts the write's deadline from here too.
        req.extensions_mut().insert(original.deadline);
        let mut inner = take_ready(&mut self.inner);
        let config = self.config.clone();
        let metrics = self.metrics.clone();
        Either::Right(Box::pin(async move {
            let fut: ResponseFuture = Box::pin(inner.call(req));
            let resp = fut.await?;
            if resp.status() != StatusCode::CONFLICT {
                return Ok(resp);
            }
            let location = resp.headers().get(header::LOCATION).cloned();
            let attempts = resp.extensions().get::<Attempts>().copied();
            match verify(&config, inner, &original, location).await {
                Ok(mut recovered) => {
                    // The write's own attempts, as on any other answer.
                    match attempts {
                        Some(n) => recovered.extensions_mut().insert(n),
                        None => recovered.extensions_mut().remove::<Attempts>(),
                    };
                    metrics.recovered.inc();
                    info!(
                        request_id = original
                            .headers
                            .get(&X_REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-"),
                        route = original.classified.route().map_or(0, |r| r.line_number),
                        key = original
                            .key
                            .as_ref()
                            .and_then(|k| k.value.to_str().ok())
                            .unwrap_or("-"),
                        "recovered from 409 conflict"
                    );
                    Ok(recovered)
                }
                Err(reason) => {
                    metrics
                        .passed
                        .get_or_create(&ReasonLabel {
                            reason: reason.label(),
                        })
                        .inc();
                    info!(
                        request_id = original
                            .headers
                            .get(&X_REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-"),
                        route = original.classified.route().map_or(0, |r| r.line_number),
                        reason = reason.label(),
                        "409 conflict passed through"
                    );
                    Ok(resp)
                }
            }
        }))
    }
}

impl<S> Verify<S> {
    fn keep(&self, req: &Request<Body>) -> Option<Original> {
        let classified = req.extensions().get::<Classified>()?;
        let rule = classified.route()?.verify.clone()?;
        Some(Original {
            rule,
            classified: classified.clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            body: req.extensions().get::<BufferedBody>().cloned(),
            session: req.extensions().get::<SessionId>().cloned(),
            key: req.extensions().get::<IdempotencyKey>().cloned(),
            deadline: Deadline::of(req, self.config.request_timeout),
        })
    }
}

async fn verify<S>(
    config: &VerifyConfig,
    mut inner: S,
    original: &Original,
    location: Option<HeaderValue>,
) -> Result<Response<Body>, PassReason>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    let (method, target) = target(config, original, location.as_ref())?;
    // What the stored representation is compared with.
    let sent = match original.rule.match_mode {
        MatchMode::Exists => None,
        MatchMode::JsonSubset | MatchMode::Exact => {
            Some(original.body.as_ref().ok_or(PassReason::Undecidable)?)
        }
    };
    if original.rule.match_mode == MatchMode::JsonSubset
        && sent.and_then(BufferedBody::json).is_none()
    {
        warn!(
            route = original.classified.route().map_or(0, |r| r.line_number),
            "match=json-subset needs a JSON request body; the 409 is passed through"
        );
        return Err(PassReason::Undecidable);
    }
    let remaining = match original.deadline.at {
        Some(at) => at.checked_duration_since(Instant::now()),
        // Durations are capped at parse time; a deadline that still could
        // not be represented means the whole limit.
        None => Some(original.deadline.limit),
    }
    .filter(|d| !d.is_zero())
    .ok_or(PassReason::VerifyFailed)?;

    let mut req = Request::new(body::empty());
    *req.method_mut() = method;
    *req.uri_mut() = target;
    let headers = req.headers_mut();
    for (name, value) in &original.headers {
        if !NOT_COPIED.contains(name) && *name != config.key_header {
            headers.append(name.clone(), value.clone());
        }
    }
    // The stored representation is compared, or the answer built from it,
    // here, not passed on as it is.
    let read_stored = sent.is_some() || original.rule.recovered_body.reads_stored();
    if read_stored {
        // Ask for it unencoded, whatever encodings the client itself accepts.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    req.extensions_mut().insert(original.deadline);
    let call = async move {
        // The inner service already served the original request: make it
        // ready again before this second call.
        std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
        // Boxed for the same compiler limitation as in the classify layer.
        let fut: ResponseFuture = Box::pin(inner.call(req));
        fut.await
    };
    let resp = match tokio::time::timeout(remaining, call).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            warn!(error = %e, "409 verification request failed");
            return Err(PassReason::VerifyFailed);
        }
        Err(_) => return Err(PassReason::VerifyFailed),
    };
    match resp.status() {
        s if s.is_success() => {}
        StatusCode::NOT_FOUND | StatusCode::GONE => return Err(PassReason::NotFound),
        _ => return Err(PassReason::VerifyFailed),
    }
    let (mut parts, stored) = resp.into_parts();
    let mut stored_bytes = None;
    let body = match read_stored {
        // `exists`: the 2xx is the proof; the stored representation streams through.
        false => stored,
        true => {
            if parts
                .headers
                .get(header::CONTENT_ENCODING)
                .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
            {
                // Encoded despite `identity`: the bytes cannot be compared.
                return Err(PassReason::Undecidable);
            }
            if stored.size_hint().lower() > config.max_body as u64 {
                return Err(PassReason::Undecidable);
            }
            let bytes = read_capped(stored, config.max_body)
                .await
                .ok_or(PassReason::Undecidable)?;
            let same = match (original.rule.match_mode, sent) {
                (_, None) | (MatchMode::Exists, _) => true,
                (MatchMode::Exact, Some(sent)) => bytes == *sent.bytes(),
                (MatchMode::JsonSubset, Some(sent)) => {
                    let stored_doc: serde_json::Value =
                        serde_json::from_slice(&bytes).map_err(|_| PassReason::Mismatch)?;
                    sent.json().is_some_and(|doc| match doc {
                        serde_json::Value::Object(fields)
                            if !original.rule.match_ignore.is_empty() =>
                        {
                            // The left-out fields of `match-ignore=` are not compared.
                            fields
                                .iter()
                                .filter(|(name, _)| !original.rule.ignores(name))
                                .all(|(name, value)| {
                                    stored_doc
                                        .get(name)
                                        .is_some_and(|stored| json_subset(value, stored))
                                })
                                && stored_doc.is_object()
                        }
                        _ => json_subset(doc, &stored_doc),
                    })
                }
            };
            if !same {
                return Err(PassReason::Mismatch);
            }
            stored_bytes = Some(bytes.clone());
            body::full(bytes)
        }
    };
    parts.status = original.rule.recovered_status;
    let body = match &original.rule.recovered_body {
        RecoveredBody::Stored => body,
        RecoveredBody::Empty => {
            parts.headers.remove(header::CONTENT_TYPE);
            parts.headers.remove(header::CONTENT_LENGTH);
            body::empty()
        }
        RecoveredBody::Template(template) => {
            let doc = match &stored_bytes {
                Some(bytes) => Some(
                    serde_json::from_slice::<serde_json::Value>(bytes)
                        .map_err(|_| PassReason::Undecidable)?,
                ),
                None => None,
            };
            let ctx = RenderContext::new(&original.classified.captures, &original.headers)
                .with_body(original.body.as_ref().and_then(BufferedBody::json))
                .with_query(original.uri.query())
                .with_session(original.session.as_ref().map(|s| &*s.0))
                .with_stored(doc.as_ref());
            let text = template.render_json_string(&ctx).map_err(|e| {
                warn!(
                    route = original.classified.route().map_or(0, |r| r.line_number),
                    error = %e,
                    "cannot build the recovered answer (recovered-body=); the 409 is passed through"
                );
                PassReason::Undecidable
            })?;
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
            // A body made here, never encoded.
            parts.headers.remove(header::CONTENT_ENCODING);
            body::full(text)
        }
    };
    let body = if matches!(
        parts.status,
        StatusCode::NO_CONTENT | StatusCode::RESET_CONTENT
    ) {
        // These statuses carry no body.
        parts.headers.remove(header::CONTENT_LENGTH);
        body::empty()
    } else {
        body
    };
    parts.headers.insert(
        X_IDEMPROXY_RECOVERED.clone(),
        HeaderValue::from_static("409"),
    );
    Ok(Response::from_parts(parts, body))
}

/// Reads a whole body of at most `max` bytes; `None` if larger or broken.
async fn read_capped(mut body: Body, max: usize) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() + data.len() > max {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(buf.freeze())
}

/// The path and query that a 409's `Location` names on `upstream`, or
/// `None` when it names anything else.
///
/// Accepted: a path-absolute reference (`/x`, `/x?y`), or an absolute URL
/// whose scheme, host and port are the upstream's (`http://upstream:8080/x`),
/// without user information. Refused: a scheme-relative `//host/x`, `/\host/x`
/// (read as `//host/x` by some servers), any backslash, raw or
/// percent-encoded (`%5C`), which some servers take for a path separator,
/// relative references (`x`, `../x`), other schemes, hosts or ports, and
/// fragments.
pub fn location_target(upstream: &Upstream, location: &[u8]) -> Option<Uri> {
    let text = std::str::from_utf8(location).ok()?;
    if text.contains('\\') || text.to_ascii_lowercase().contains("%5c") || text.contains('#') {
        return None;
    }
    let path_and_query = if text.starts_with('/') {
        text
    } else {
        let uri: Uri = text.parse().ok()?;
        let scheme = uri.scheme()?;
        let authority = uri.authority()?;
        if *scheme != upstream.scheme
            || authority.as_str().contains('@')
            || !upstream.is_same_authority(authority)
        {
            return None;
        }
        // What follows the authority: an empty path is `/`.
        let start = text.find("://")? + 3;
        let rest = text.get(start + authority.as_str().len()..)?;
        match rest.chars().next() {
            None => "/",
            Some('/') => rest,
            Some('?') => return Uri::try_from(format!("/{rest}")).ok(),
            Some(_) => return None,
        }
    };
    // `//host/x` would name another authority.
    if path_and_query.starts_with("//") {
        return None;
    }
    let uri = Uri::try_from(path_and_query).ok()?;
    (uri.scheme().is_none() && uri.authority().is_none() && uri.path().starts_with('/'))
        .then_some(uri)
}

/// The verification request's method and URI (path and query only).
fn target(
    config: &VerifyConfig,
    original: &Original,
    location: Option<&HeaderValue>,
) -> Result<(Method, Uri), PassReason> {
    let route = original.classified.route().map_or(0, |r| r.line_number);
    match &original.rule.target {
        VerifyTarget::Same => {
            let pq = original.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let uri = Uri::try_from(pq).map_err(|_| PassReason::Undecidable)?;
            Ok((Method::GET, uri))
        }
        VerifyTarget::Location => {
            let location = location.ok_or(PassReason::Undecidable)?;
            let uri = location_target(&config.upstream, location.as_bytes()).ok_or_else(|| {
                warn!(
                    route,
                    "the 409's Location is neither a path (/...) nor a URL on the upstream's own scheme, host and port; not followed"
                );
                PassReason::Undecidable
            })?;
            Ok((Method::GET, uri))
        }
        VerifyTarget::Template { method, template } => {
            let ctx = RenderContext::new(&original.classified.captures, &original.headers)
                .with_body(original.body.as_ref().and_then(BufferedBody::json))
                .with_query(original.uri.query())
                .with_session(original.session.as_ref().map(|s| &*s.0));
            let path = template.render(&ctx).map_err(|e| {
                warn!(route, error = %e, "cannot build the verification request; the 409 is passed through");
                PassReason::Undecidable
            })?;
            let uri = Uri::try_from(path).map_err(|_| PassReason::Undecidable)?;
            Ok((method.clone(), uri))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let uri: Uri = url.parse().unwrap();
        Upstream {
            scheme: uri.scheme().unwrap().clone(),
            authority: uri.authority().unwrap().clone(),
        }
    }

    fn target_of(up: &Upstream, location: &str) -> Option<String> {
        location_target(up, location.as_bytes()).map(|u| u.to_string())
    }

    #[test]
    fn location_on_the_upstream_is_followed_as_path_and_query() {
        let up = upstream("http://backend:8080");
        for (location, expected) in [
            ("/x", "/x"),
            ("/", "/"),
            ("/a/b?c=d", "/a/b?c=d"),
            ("http://backend:8080/x?y", "/x?y"),
            ("HTTP://BACKEND:8080/x", "/x"),
            ("http://backend:8080", "/"),
            ("http://backend:8080?q", "/?q"),
        ] {
            assert_eq!(
                target_of(&up, location).as_deref(),
                Some(expected),
                "{location}"
            );
        }
        let default_port = upstream("http://backend");
        assert_eq!(
            target_of(&default_port, "http://backend:80/x").as_deref(),
            Some("/x")
        );
    }

    #[test]
    fn location_elsewhere_or_ambiguous_is_refused() {
        let up = upstream("http://backend:8080");
        for location in [
            "//other:1/x",
            "//backend:8080/x",
            "/\\other/x",
            "/x\\..\\admin",
            "/%5cother/x",
            "/%5Cother/x",
            "\\\\other\\x",
            "x",
            "../x",
            "",
            "https://backend:8080/x",
            "http://backend:8081/x",
            "http://backend/x",
            "http://other:8080/x",
            "http://user@backend:8080/x",
            "http://backend:8080//other/x",
            "http://backend:8080\\x",
            "ftp://backend:8080/x",
            "/x#frag",
            "mailto:a@b",
        ] {
            assert_eq!(target_of(&up, location), None, "{location:?}");
        }
        assert_eq!(location_target(&up, b"/\xff"), None);
    }
}
