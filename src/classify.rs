//! Classification: the first step of a request's life after the edge. Matches
//! the request against the route table, puts the route's decisions in the
//! request's extensions for the layers below, finds the session id, and reads
//! the body ahead when some later step must see it first.
//!
//! ```
//! use std::sync::Arc;
//! use idemproxy::classify::ClassifyConfig;
//! use idemproxy::routes::RouteTable;
//! let table = RouteTable::parse("POST /v1/sessions/{sid}/entries session=path:sid").unwrap();
//! let config = ClassifyConfig { table: Arc::new(table), ..ClassifyConfig::default() };
//! assert!(config.table.route_match(&http::Method::POST, "/v1/sessions/s1/entries").is_some());
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
use crate::extensions::{Classified, SessionId, SessionSourceLabel};
use crate::idempotency::{KeyConfig, KeyMode};
use crate::routes::{Captures, MatchMode, Route, RouteTable, SessionSource, VerifyTarget};
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
        let matched = config.table.route_match(&parts.method, parts.uri.path());
        let needs_body = needs_body(config, &parts, matched.as_ref().map(|m| m.route));
        let (index, captures) = match matched {
            Some(m) => (Some(m.index), m.captures),
            None => (None, Captures::default()),
        };
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
            let req = finish(&config, parts, body, buffered, index, captures);
            // Boxed: the inner future's higher-ranked lifetimes would otherwise
            // keep this future from being `Send` (a compiler limitation).
            let fut: ResponseFuture = Box::pin(inner.call(req));
            fut.await
        }))
    }
}

/// Whether a route, a session source or the idempotency keys read the
/// request's body, which must then be read ahead before the request goes on.
fn needs_body(
    config: &ClassifyConfig,
    parts: &http::request::Parts,
    route: Option<&Route>,
) -> bool {
    route.is_some_and(route_needs_body)
        || config
            .session_sources
            .iter()
            .any(SessionSource::needs_request_body)
        || config.keys.as_ref().is_some_and(|k| {
            let client_key = parts.headers.contains_key(&k.header);
            (config.body_for_client_keys && client_key)
                || (k.mode == KeyMode::Fingerprint && !client_key && key_wanted(k, parts, route))
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
        parts.extensions.insert(route.policy());
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

fn key_wanted(keys: &KeyConfig, parts: &http::request::Parts, route: Option<&Route>) -> bool {
    match route.and_then(|r| r.idempotency_key) {
        Some(on) => on,
        None => keys.methods.contains(&parts.method),
    }
}

/// Whether a route's verification or session source reads the request body.
fn route_needs_body(route: &Route) -> bool {
    let verify_reads_body = route.verify.as_ref().is_some_and(|v| {
        v.match_mode != MatchMode::Exists
            || matches!(&v.target, VerifyTarget::Template { template, .. } if template.needs_body())
    });
    verify_reads_body || route.session.iter().any(SessionSource::needs_request_body)
}
