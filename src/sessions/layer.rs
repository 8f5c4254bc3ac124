//! The request-path side of sessions: learns session ids from requests and
//! responses, registers a session only on a `2xx`, keeps it in use while a
//! request of it is in flight (until the response body ends), renews it on a
//! `2xx` when its route (or `IDEMPROXY_REQUESTS_RENEW`) says the backend
//! counts the request as renewal, and ends it on a `session-end` route.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use tower::{Layer, Service};
use tracing::{debug, warn};

use super::compact::Credentials;
use super::tracker::NewCredentials;
use super::{EndReason, HeartbeatSpec, InFlight, SessionTracker};
use crate::BoxError;
use crate::body::{self, Body};
use crate::buffered::{BufferedBody, read_ahead};
use crate::error::ProxyError;
use crate::extensions::{Classified, SessionId, SessionSourceLabel};
use crate::routes::{
    Captures, HeartbeatTemplate, RenderContext, SessionSource, SessionSourceKind, Template,
};
use crate::service::{HttpService, PassThrough, ResponseFuture, take_ready};
use crate::units::MAX_DURATION;

/// How sessions are learned and heartbeated; built by the configuration.
#[derive(Clone, Debug, Default)]
pub struct SessionLayerConfig {
    /// `IDEMPROXY_SESSION_SOURCES`: tried on every request and response.
    pub sources: Vec<SessionSource>,
    /// `IDEMPROXY_HEARTBEAT`: the global heartbeat (`None`: no heartbeats unless a route has one).
    pub heartbeat: Option<HeartbeatTemplate>,
    /// `IDEMPROXY_HEARTBEAT_BODY`: a JSON body template.
    pub heartbeat_body: Option<Template>,
    /// `IDEMPROXY_HEARTBEAT_SET_HEADERS`: headers added to every heartbeat.
    pub set_headers: Vec<(HeaderName, Template)>,
    /// `IDEMPROXY_HEARTBEAT_HEADERS`: request headers copied onto heartbeats
    /// (the session's own header or cookie source is always added).
    pub copy_headers: Vec<HeaderName>,
    /// `IDEMPROXY_REQUESTS_RENEW`: every request of a session answered `2xx`
    /// renews it (unless its route says `renews=off`); otherwise only
    /// heartbeats and `renews` routes do.
    pub requests_renew: bool,
    /// Largest response body read to find a `response-json:` session id.
    pub max_response_body: usize,
    /// `IDEMPROXY_HEARTBEAT_INTERVAL` was set: it wins over a lease length
    /// learned by a route's `lease-ttl=`.
    pub interval_set: bool,
}

/// Adds [`Sessions`] around a service.
#[derive(Clone, Debug)]
pub struct SessionLayer {
    tracker: SessionTracker,
    config: Arc<SessionLayerConfig>,
}

impl SessionLayer {
    /// A layer feeding `tracker`.
    pub fn new(tracker: SessionTracker, config: SessionLayerConfig) -> Self {
        Self {
            tracker,
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = Sessions<S>;
    fn layer(&self, inner: S) -> Sessions<S> {
        Sessions {
            inner,
            tracker: self.tracker.clone(),
            config: self.config.clone(),
        }
    }
}

/// Learns and tracks sessions; see the module docs.
#[derive(Clone, Debug)]
pub struct Sessions<S> {
    inner: S,
    tracker: SessionTracker,
    config: Arc<SessionLayerConfig>,
}

/// What is kept of a request until its response decides about its session.
struct Pending {
    id: Option<Arc<str>>,
    source: Option<Arc<str>>,
    classified: Option<Classified>,
    query: Option<String>,
    /// The request's credentials headers, unless `known` holds them.
    credentials: HeaderMap,
    /// The session's stored credentials, when they were exactly the
    /// request's as it was sent.
    known: Option<Credentials>,
    /// The lease length the request states (a route's `lease-ttl=` on a
    /// request header or body field).
    lease: Option<Duration>,
}

impl<S> Service<Request<Body>> for Sessions<S>
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

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let classified = req.extensions().get::<Classified>();
        let has_sources = !self.config.sources.is_empty()
            || classified
                .and_then(|c| c.route())
                .is_some_and(|r| !r.session.is_empty());
        if !has_sources {
            // No session to learn: straight to the service poll_ready made
            // ready, with no clone of the layers below.
            return Either::Left(self.inner.call(req));
        }
        let classified = classified.cloned();
        let route_sources = classified
            .as_ref()
            .and_then(|c| c.route())
            .map(|r| r.session.as_slice());
        let mut inner = take_ready(&mut self.inner);
        let id = req.extensions().get::<SessionId>().map(|s| s.0.clone());
        let captures = classified
            .as_ref()
            .map_or(&*EMPTY_CAPTURES, |c| &c.captures);
        let json = req
            .extensions()
            .get::<BufferedBody>()
            .and_then(BufferedBody::json);
        let learned_from = req
            .extensions()
            .get::<SessionSourceLabel>()
            .map(|l| l.0.clone());
        // Classify names the source it found the id with; without it (this
        // layer used on its own), the sources are searched here.
        let source = learned_from.or_else(|| {
            let id = id.as_deref()?;
            route_sources
                .unwrap_or_default()
                .iter()
                .chain(self.config.sources.iter())
                .filter(|s| !s.is_response())
                .find(|s| s.from_request(captures, req.headers(), json).as_deref() == Some(id))
                .map(SessionSource::shared_label)
        });
        let pairs = || credential_pairs(&self.config, req.headers(), route_sources);
        // One lookup gives the session's in-flight guard and, when its
        // credentials are unchanged (the usual case), the stored ones: then
        // nothing is copied (nor allocated).
        let (known, guard) = match id.as_deref() {
            Some(id) => self.tracker.begin_with_credentials(id, pairs()),
            None => (None, None),
        };
        let credentials = match known {
            Some(_) => HeaderMap::new(),
            None => copy_credentials(pairs()),
        };
        let lease = classified
            .as_ref()
            .and_then(|c| c.route())
            .and_then(|r| r.lease_ttl.as_ref())
            .filter(|s| !s.is_response())
            .and_then(|s| s.from_request(captures, req.headers(), json))
            .and_then(|text| lease_length(&text));
        let pending = Pending {
            credentials,
            known,
            id,
            source,
            classified,
            query: req.uri().query().map(str::to_owned),
            lease,
        };
        let tracker = self.tracker.clone();
        let config = self.config.clone();
        Either::Right(Box::pin(async move {
            let fut: ResponseFuture = Box::pin(inner.call(req));
            let resp = fut.await?;
            Ok(after_response(&tracker, &config, pending, guard, resp).await)
        }))
    }
}

static EMPTY_CAPTURES: std::sync::LazyLock<Captures> = std::sync::LazyLock::new(Captures::new);

/// The `Cookie` header, as a `'static` reference.
static COOKIE: HeaderName = header::COOKIE;

/// The credentials headers of a request to copy onto heartbeats: those of
/// `IDEMPROXY_HEARTBEAT_HEADERS`, then the session's own header (or cookie),
/// which travels with its heartbeats. Each header name contributes its
/// values once, at its first listing, however often it is listed (`cookie`
/// copied by default and also the source of a `cookie:` session): a
/// heartbeat never repeats a header line. Allocates nothing.
fn credential_pairs<'a>(
    config: &'a SessionLayerConfig,
    headers: &'a HeaderMap,
    route_sources: Option<&'a [SessionSource]>,
) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
    let names = move || {
        let sources = route_sources
            .unwrap_or_default()
            .iter()
            .chain(config.sources.iter())
            .filter_map(|source| match source.kind() {
                SessionSourceKind::Header(name) => Some(name),
                SessionSourceKind::Cookie(_) => Some(&COOKIE),
                _ => None,
            });
        config.copy_headers.iter().chain(sources)
    };
    names()
        .enumerate()
        .filter(move |&(i, name)| !names().take(i).any(|n| n == name))
        .flat_map(move |(_, name)| headers.get_all(name).iter().map(move |v| (name, v)))
}

fn copy_credentials<'a>(
    pairs: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in pairs {
        out.append(name.clone(), value.clone());
    }
    out
}

async fn after_response(
    tracker: &SessionTracker,
    config: &SessionLayerConfig,
    mut pending: Pending,
    mut guard: Option<InFlight>,
    resp: Response<Body>,
) -> Response<Body> {
    let route = pending.classified.as_ref().and_then(|c| c.route());
    if !resp.status().is_success() {
        // Ending a session the backend no longer knows: it is gone either way.
        if route.is_some_and(|r| r.session_end)
            && matches!(resp.status(), StatusCode::NOT_FOUND | StatusCode::GONE)
        {
            if let Some(id) = &pending.id {
                drop(guard.take());
                tracker.end(id, EndReason::Gone);
            }
        }
        // A failed response never registers a session.
        return with_guard(resp, guard);
    }
    let route_sources = route.map(|r| r.session.as_slice()).unwrap_or_default();
    let lease_source = route
        .and_then(|r| r.lease_ttl.as_ref())
        .filter(|s| s.is_response());
    let response_sources: Vec<&SessionSource> = if pending.id.is_none() {
        route_sources
            .iter()
            .chain(config.sources.iter())
            .filter(|s| s.is_response())
            .collect()
    } else {
        Vec::new()
    };
    let mut resp = resp;
    let json_body = if response_sources
        .iter()
        .copied()
        .chain(lease_source)
        .any(SessionSource::needs_response_body)
        && is_json(resp.headers())
    {
        let (r, json) = read_json(resp, config.max_response_body).await;
        resp = r;
        json
    } else {
        None
    };
    if let Some(source) = lease_source {
        pending.lease = source
            .from_response(resp.headers(), json_body.as_ref())
            .and_then(|text| lease_length(&text));
    }
    // Empty unless the id is still to be learned.
    for source in response_sources {
        if let Some(id) = source.from_response(resp.headers(), json_body.as_ref()) {
            if let SessionSourceKind::ResponseHeader(name) = source.kind() {
                // Later requests send the id back in this header (MCP's
                // `Mcp-Session-Id`); heartbeats must carry it as well.
                if let (false, Ok(value)) = (
                    pending.credentials.contains_key(name),
                    HeaderValue::from_str(&id),
                ) {
                    pending.credentials.insert(name.clone(), value);
                }
            }
            pending.id = Some(id.into());
            pending.source = Some(source.shared_label());
            break;
        }
    }
    let Some(id) = pending.id.clone() else {
        return with_guard(resp, guard);
    };
    if route.is_some_and(|r| r.session_end) {
        drop(guard.take());
        if tracker.end(&id, EndReason::ClientEnd) {
            debug!(session = %tracker.digest(&id), "session ended by the client");
        }
        return resp;
    }
    let route_heartbeat = route.and_then(|r| r.heartbeat.as_ref());
    let heartbeat = if !tracker.contains(&id) || route_heartbeat.is_some() {
        route_heartbeat
            .or(config.heartbeat.as_ref())
            .and_then(|hb| render_heartbeat(tracker, config, hb, &pending, &id))
            .map(|spec| match pending.lease {
                // Renewed every third of the lease: two heartbeats may fail
                // (or come late) before it runs out.
                Some(lease) if !config.interval_set => spec.with_interval(lease / 3),
                _ => spec,
            })
            .map(Arc::new)
    } else {
        None
    };
    let source = pending
        .source
        .clone()
        .unwrap_or_else(|| Arc::from("unknown"));
    let credentials = match pending.known.take() {
        Some(known) => NewCredentials::Known(known),
        None => NewCredentials::Headers(&pending.credentials),
    };
    let renews = route
        .and_then(|r| r.renews)
        .unwrap_or(config.requests_renew);
    tracker.observe_with(id.clone(), source, heartbeat, credentials, renews);
    if guard.is_none() {
        // A session first seen in this response is active while its body streams.
        guard = tracker.begin_request(&id);
    }
    with_guard(resp, guard)
}

fn render_heartbeat(
    tracker: &SessionTracker,
    config: &SessionLayerConfig,
    hb: &HeartbeatTemplate,
    pending: &Pending,
    id: &str,
) -> Option<HeartbeatSpec> {
    let captures = pending
        .classified
        .as_ref()
        .map_or(&*EMPTY_CAPTURES, |c| &c.captures);
    let no_headers = HeaderMap::new();
    let ctx = RenderContext::new(captures, &no_headers)
        .with_query(pending.query.as_deref())
        .with_session(Some(id));
    let rendered = hb.template.render(&ctx).and_then(|path| {
        PathAndQuery::try_from(path).map_err(|_| crate::routes::RenderError::InvalidQuery)
    });
    let path = match rendered {
        Ok(p) => p,
        Err(e) => {
            warn!(session = %tracker.digest(id), error = %e, "cannot build this session's heartbeat; it gets none");
            return None;
        }
    };
    let mut spec = HeartbeatSpec::new(hb.method.clone(), path);
    if let Some(body) = &config.heartbeat_body {
        match body.render_json_string(&ctx) {
            Ok(b) => spec = spec.with_json_body(b),
            Err(e) => {
                warn!(session = %tracker.digest(id), error = %e, "cannot build this session's heartbeat body; it gets none");
                return None;
            }
        }
    }
    for (name, template) in &config.set_headers {
        match template.render_header_value(&ctx) {
            Ok(v) => {
                spec.set_headers.insert(name.clone(), v);
            }
            Err(e) => {
                warn!(session = %tracker.digest(id), header = %name, error = %e, "cannot build a heartbeat header; this session gets no heartbeat");
                return None;
            }
        }
    }
    Some(spec)
}

/// A lease length as backends state it: whole seconds, as a JSON number or
/// string or a header value (etcd's `"TTL":"60"`, Azure's
/// `x-ms-lease-duration: 15`). `None` for anything else, including Azure's
/// `-1` (a lease that never runs out: the global interval applies).
fn lease_length(text: &str) -> Option<Duration> {
    match text.trim().parse::<u64>() {
        Ok(secs) if secs > 0 => Some(Duration::from_secs(secs.min(MAX_DURATION.as_secs()))),
        _ => None,
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"))
}

/// Reads a small JSON response body to find a session id in it; the client
/// still gets the same bytes. A body over the cap is passed on unread.
async fn read_json(
    resp: Response<Body>,
    cap: usize,
) -> (Response<Body>, Option<serde_json::Value>) {
    let (parts, body) = resp.into_parts();
    match read_ahead(body, cap).await {
        Ok((body, buffered)) => {
            let json = buffered.and_then(|b| b.json().cloned());
            (Response::from_parts(parts, body), json)
        }
        // The upstream's body broke: the client sees it break too.
        Err(e) => (
            Response::from_parts(parts, body::boxed(Failed(Some(e)))),
            None,
        ),
    }
}

fn with_guard(resp: Response<Body>, guard: Option<InFlight>) -> Response<Body> {
    match guard {
        None => resp,
        Some(guard) => resp.map(|b| {
            // The session stays active until the response body ends.
            body::boxed(body::WithGuard::new(b, guard))
        }),
    }
}

/// A body that yields one error: the upstream's body failed while being read.
struct Failed(Option<BoxError>);

impl http_body::Body for Failed {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.take().map(Err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_lengths_are_whole_positive_seconds() {
        assert_eq!(lease_length("60"), Some(Duration::from_secs(60)));
        assert_eq!(lease_length(" 15 "), Some(Duration::from_secs(15)));
        // Azure's infinite lease, zero, fractions and words leave the global interval.
        for text in ["-1", "0", "1.5", "", "sixty", "18446744073709551616"] {
            assert_eq!(lease_length(text), None, "{text:?}");
        }
        // Far too long is capped, never an overflow later.
        assert_eq!(
            lease_length("18446744073709551615"),
            Some(Duration::from_secs(MAX_DURATION.as_secs()))
        );
    }
}
