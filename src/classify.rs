//! Classification: the first step of a request's life after the edge. Matches
//! the request against the route table, puts the route's decisions in the
//! request's extensions for the layers below, finds the session id, and reads
//! the body ahead when some later step must see it first, or when a route's
//! `if-json=` condition decides whether it matches (then the request is
//! matched again with its body; a body too large to read ahead, or not JSON,
//! has no fields). Tables without `if-json=` conditions never read a body for
//! matching.
//!
//! ```
//! use std::sync::Arc;
//! use idemproxy::classify::ClassifyConfig;
//! use idemproxy::routes::{RouteRequest, RouteTable};
//! let table = RouteTable::parse("POST /v1/sessions/{sid}/entries session=path:sid").unwrap();
//! let config = ClassifyConfig { table: Arc::new(table), ..ClassifyConfig::default() };
//! let req = RouteRequest::new(&http::Method::POST, "/v1/sessions/s1/entries");
//! assert!(config.table.route_match(&req).is_some());
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};
use tracing::debug;

use crate::body::Body;
use crate::buffered::{BufferedBody, read_ahead};
use crate::error::ProxyError;
use crate::extensions::{Classified, RequestPolicy, SessionId, SessionSourceLabel};
use crate::idempotency::KeyConfig;
use crate::routes::{
    Captures, NeedsBody, Route, RouteMatch, RouteRequest, RouteTable, SessionSource,
};
use crate::service::{HttpService, PassThrough, ResponseFuture, take_ready};

/// What classification needs to know.
#[derive(Clone, Debug, Default)]
pub struct ClassifyConfig {
    /// `IDEMPROXY_ROUTES`.
    pub table: Arc<RouteTable>,
    /// `IDEMPROXY_SESSION_SOURCES`: sources tried on every request.
    pub session_sources: Arc<Vec<SessionSource>>,
    /// How keys are made (a fingerprint key needs the body).
    pub keys: Option<KeyConfig>,
    /// Bodies read ahead only up to this size (`IDEMPROXY_MAX_REPLAY_BODY`).
    pub max_body: usize,
    /// Whether client-keyed requests are read ahead (for the local idempotency cache).
    pub body_for_client_keys: bool,
}

/// Adds [`Classify`] around a service.
#[derive(Clone, Debug)]
pub struct ClassifyLayer {
    config: Arc<ClassifyConfig>,
}

impl ClassifyLayer {
    /// A layer with this configuration.
    pub fn new(config: ClassifyConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;
    fn layer(&self, inner: S) -> Classify<S> {
        Classify {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Classifies each request; see the module docs.
#[derive(Clone, Debug)]
pub struct Classify<S> {
    inner: S,
    config: Arc<ClassifyConfig>,
}

impl<S> Service<Request<Body>> for Classify<S>
where
    S: HttpService,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    /// A request whose body nothing reads (most of them) is classified here
    /// and goes straight to the inner service's future; one whose body must
    /// be read first gets a boxed future that reads it.
    type Future = PassThrough<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let config = &*self.config;
        let matched = config.table.route_match_before_body(&route_request(&parts));
        let needs_body = needs_body(config, &parts, &matched);
        // The body decides the route: matched again once it is read.
        let body_decides = matched.is_err();
        let (index, captures) = index_and_captures(matched.unwrap_or_default());
        if !needs_body {
            let req = finish(config, parts, body, None, index, captures);
            return Either::Left(self.inner.call(req));
        }
        let config = self.config.clone();
        let mut inner = take_ready(&mut self.inner);
        Either::Right(Box::pin(async move {
            let (body, buffered) = read_ahead(body, config.max_body)
                .await
                .map_err(ProxyError::RequestBody)?;
            let (index, captures) = if body_decides {
                let json = buffered.as_ref().and_then(BufferedBody::json);
                let req = route_request(&parts).with_body(json);
                index_and_captures(config.table.route_match(&req))
            } else {
                (index, captures)
            };
            let req = finish(&config, parts, body, buffered, index, captures);
            // Boxed: the inner future's higher-ranked lifetimes would otherwise
            // keep this future from being `Send` (a compiler limitation).
            let fut: ResponseFuture = Box::pin(inner.call(req));
            fut.await
        }))
    }
}

/// What the route table matches a request with: its method, path, query
/// and headers (and its JSON body, once read ahead).
fn route_request(parts: &http::request::Parts) -> RouteRequest<'_> {
    RouteRequest::new(&parts.method, parts.uri.path())
        .with_query(parts.uri.query())
        .with_headers(&parts.headers)
}

fn index_and_captures(matched: Option<RouteMatch<'_>>) -> (Option<usize>, Captures) {
    match matched {
        Some(m) => (Some(m.index), m.captures),
        None => (None, Captures::default()),
    }
}

/// Whether the body decides the route (an `if-json=` condition, [`NeedsBody`]),
/// or the matched route, a session source or the idempotency keys read the
/// request's body, which must then be read ahead before the request goes on.
fn needs_body(
    config: &ClassifyConfig,
    parts: &http::request::Parts,
    matched: &Result<Option<RouteMatch<'_>>, NeedsBody>,
) -> bool {
    let route = match matched {
        Ok(m) => m.as_ref().map(|m| m.route),
        Err(NeedsBody) => return true,
    };
    // Each feature says whether it reads the body.
    route.is_some_and(Route::needs_body)
        || config
            .session_sources
            .iter()
            .any(SessionSource::needs_request_body)
        || config.keys.as_ref().is_some_and(|k| {
            k.needs_body(
                &parts.method,
                &parts.headers,
                route.and_then(|r| r.idempotency_key),
                config.body_for_client_keys,
            )
        })
}

/// Attaches what classification found to the request: the session id, the
/// route's policy and match, and the read-ahead body.
fn finish(
    config: &ClassifyConfig,
    mut parts: http::request::Parts,
    body: Body,
    buffered: Option<BufferedBody>,
    index: Option<usize>,
    captures: Captures,
) -> Request<Body> {
    let route = index.and_then(|i| config.table.get(i));
    let json = buffered.as_ref().and_then(BufferedBody::json);
    let session = route
        .into_iter()
        .flat_map(|r| r.session.iter())
        .chain(config.session_sources.iter())
        .filter(|s| !s.is_response())
        .find_map(|s| {
            s.from_request(&captures, &parts.headers, json)
                .map(|id| (id, s.shared_label()))
        });
    if let Some((id, label)) = session {
        parts.extensions.insert(SessionId(id.into()));
        parts.extensions.insert(SessionSourceLabel(label));
    }
    if let (Some(route), Some(index)) = (route, index) {
        debug!(route = route.line_number, "classified");
        parts.extensions.insert(RequestPolicy::of(route));
        parts.extensions.insert(Classified {
            table: config.table.clone(),
            index,
            captures,
        });
    }
    if let Some(b) = buffered {
        parts.extensions.insert(b);
    }
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::{ServiceExt, service_fn};

    /// What the service below saw of a request.
    #[derive(Clone, Debug, PartialEq)]
    struct Seen {
        /// The matched route's index.
        route: Option<usize>,
        /// Whether the body was read ahead.
        read_ahead: bool,
        body: bytes::Bytes,
    }

    async fn classify(table: &str, max_body: usize, req: Request<Body>) -> Seen {
        let config = ClassifyConfig {
            table: Arc::new(RouteTable::parse(table).unwrap()),
            max_body,
            ..ClassifyConfig::default()
        };
        let inner = service_fn(|req: Request<Body>| async move {
            let route = req.extensions().get::<Classified>().map(|c| c.index);
            let read_ahead = req.extensions().get::<BufferedBody>().is_some();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut rsp = Response::new(crate::body::empty());
            rsp.extensions_mut().insert(Seen {
                route,
                read_ahead,
                body,
            });
            Ok::<_, ProxyError>(rsp)
        });
        let rsp = ClassifyLayer::new(config)
            .layer(inner)
            .oneshot(req)
            .await
            .unwrap();
        rsp.extensions().get::<Seen>().unwrap().clone()
    }

    fn post(path: &str, body: &'static str) -> Request<Body> {
        Request::post(path)
            .header("x-mode", "fast")
            .body(crate::body::full(body))
            .unwrap()
    }

    const MCP: &str = "POST /mcp if-json=method=ping\nPOST /mcp if-header=x-mode=fast\n";

    #[tokio::test]
    async fn an_if_json_route_reads_the_body_ahead_and_matches_with_it() {
        let ping = r#"{"method":"ping"}"#;
        let seen = classify(MCP, 1024, post("/mcp", ping)).await;
        assert_eq!((seen.route, seen.read_ahead), (Some(0), true));
        assert_eq!(seen.body, ping);
        // Another method, a body that is not JSON or one too large to read
        // ahead: the `if-json` field is absent, the next route matches, and
        // the body goes on unchanged.
        let call = r#"{"method":"tools/call"}"#;
        let seen = classify(MCP, 1024, post("/mcp", call)).await;
        assert_eq!(seen.route, Some(1));
        assert_eq!(seen.body, call);
        let seen = classify(MCP, 1024, post("/mcp", "method=ping")).await;
        assert_eq!(seen.route, Some(1));
        let seen = classify(MCP, 4, post("/mcp", ping)).await;
        assert_eq!((seen.route, seen.read_ahead), (Some(1), false));
        assert_eq!(seen.body, ping);
    }

    #[tokio::test]
    async fn tables_without_if_json_never_read_the_body_to_match() {
        let table = "POST /mcp if-header=x-mode=slow\nPOST /mcp if-query=fast\nPOST /mcp if-header=x-mode=fast\n";
        let seen = classify(table, 1024, post("/mcp?fast", "{}")).await;
        assert_eq!((seen.route, seen.read_ahead), (Some(1), false));
        let seen = classify(table, 1024, post("/mcp", "{}")).await;
        assert_eq!((seen.route, seen.read_ahead), (Some(2), false));
        // Nor when an earlier route already matched without its body.
        let table = "POST /mcp if-header=x-mode\nPOST /mcp if-json=method=ping\n";
        let seen = classify(table, 1024, post("/mcp", "{}")).await;
        assert_eq!((seen.route, seen.read_ahead), (Some(0), false));
    }
}
