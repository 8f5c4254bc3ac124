//! The edge of the proxy: turns a client's request into an upstream request,
//! runs it through the layer stack, and turns the answer (or the error) into
//! the client's response.
//!
//! What happens here and nowhere else: refusing requests for other hosts
//! (idemproxy is never an open proxy) and malformed heads ([`conformance`]:
//! `Host`, `Transfer-Encoding`), `x-request-id`, hop-by-hop headers,
//! `Host` and `X-Forwarded-*`, tunnelling upgrades, error responses, and the
//! per-request metrics. Everything that decides *how* a request reaches the
//! upstream (retries, idempotency keys, 409 verification) is a tower layer in
//! the [`Stack`] that this edge calls.

pub mod conformance;
pub mod headers;

use crate::extensions::{ATTEMPTS_HEADER, Attempts};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use crate::body::{self, Body};
use crate::config::Upstream;
use crate::error::json_error;
use crate::metrics::{ErrorKind, ProxyMetrics};
use crate::request_id::ensure_request_id;
use crate::service::{HttpService, ResponseFuture};

/// The layered upstream service the edge calls: any tower stack ending in
/// [`crate::upstream::UpstreamService`], type-erased so layers can be added
/// without changing the edge.
///
/// Shared by every connection. Each request calls a clone of the stack
/// made on the call's own stack frame (the layers hold their state in
/// `Arc`s, so that is a few reference counts) and boxes only the response
/// future: `tower::util::BoxCloneSyncService` boxed both the clone and the
/// future, two allocations a request.
#[derive(Clone)]
pub struct Stack(Arc<dyn CallStack>);

impl Stack {
    /// Erases the type of a layered service.
    pub fn new<S>(service: S) -> Self
    where
        S: HttpService + Sync,
    {
        Self(Arc::new(service))
    }

    /// Sends a request through the stack.
    pub fn call(&self, req: Request<Body>) -> ResponseFuture {
        self.0.call_clone(req)
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stack")
    }
}

trait CallStack: Send + Sync {
    fn call_clone(&self, req: Request<Body>) -> ResponseFuture;
}

impl<S> CallStack for S
where
    S: HttpService + Sync,
{
    fn call_clone(&self, req: Request<Body>) -> ResponseFuture {
        let mut svc = self.clone();
        // The layers are ready at once (nothing below them queues); should one
        // ever not be, the request waits for it inside the future.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Box::pin(svc.call(req)),
            Poll::Ready(Err(e)) => Box::pin(std::future::ready(Err(e))),
            Poll::Pending => Box::pin(async move {
                std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                // Boxed: the inner future's higher-ranked lifetimes would
                // otherwise keep this future from being `Send`.
                let fut: ResponseFuture = Box::pin(svc.call(req));
                fut.await
            }),
        }
    }
}

pub use crate::config::EdgeOptions;

/// The client end of a connection, as `X-Forwarded-For` names it: made once
/// per connection, so a request only clones it.
#[derive(Clone, Debug)]
pub struct Client {
    forwarded_for: HeaderValue,
}

impl Client {
    /// The client at `addr`.
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            forwarded_for: headers::ip_value(addr.ip()),
        }
    }
}

/// The client-facing service. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    stack: Stack,
    upstream: Upstream,
    host: HeaderValue,
    options: EdgeOptions,
    metrics: ProxyMetrics,
}

impl Proxy {
    /// Creates the edge in front of `stack`, which sends to `upstream`.
    pub fn new(
        stack: Stack,
        upstream: Upstream,
        options: EdgeOptions,
        metrics: ProxyMetrics,
    ) -> Self {
        let host = HeaderValue::from_str(upstream.authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            shared: Arc::new(Shared {
                stack,
                upstream,
                host,
                options,
                metrics,
            }),
        }
    }

    /// The metrics this edge records.
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.shared.metrics
    }

    /// Serves one client request; never fails (errors become responses).
    ///
    /// The future is boxed on purpose: it erases the layer stack's types, whose
    /// higher-ranked lifetimes otherwise stop the connection task from being `Send`.
    pub fn serve(
        &self,
        req: Request<Incoming>,
        client: Option<&Client>,
    ) -> BoxFuture<'static, Result<Response<ResponseBody>, Infallible>> {
        let this = self.clone();
        let client = client.cloned();
        Box::pin(async move { this.serve_inner(req, client.as_ref()).await })
    }

    async fn serve_inner(
        &self,
        req: Request<Incoming>,
        client: Option<&Client>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let shared = &self.shared;
        let started = tokio::time::Instant::now();
        let guard = InFlight::new(&shared.metrics);
        let (mut parts, incoming) = req.into_parts();
        let request_id = ensure_request_id(&mut parts.headers);

        let resp = match self.prepare(&mut parts, client) {
            Err(refusal) => refusal.into_response(&shared.upstream),
            Ok(client_upgrade) => {
                let method = parts.method.clone();
                let version = parts.version;
                let req = Request::from_parts(parts, body::boxed(incoming));
                let result = shared.stack.call(req).await;
                match result {
                    Ok(mut resp) => {
                        // Answer in the client's protocol, whatever the upstream spoke.
                        *resp.version_mut() = version;
                        if let Some(Attempts(n)) = resp.extensions().get::<Attempts>().copied() {
                            resp.headers_mut()
                                .insert(ATTEMPTS_HEADER, HeaderValue::from(n));
                        }
                        finish_response(resp, client_upgrade)
                    }
                    Err(err) => {
                        shared
                            .metrics
                            .upstream_errors
                            .get_or_create(&ErrorKind { kind: err.kind() })
                            .inc();
                        warn!(
                            request_id = request_id.to_str().unwrap_or("-"),
                            %method,
                            upstream = %shared.upstream,
                            kind = err.kind(),
                            attempts = err.attempts(),
                            error = %err,
                            "upstream request failed"
                        );
                        err.into_response()
                    }
                }
            }
        };
        let mut resp = resp;
        if !resp
            .headers()
            .contains_key(&crate::request_id::X_REQUEST_ID)
        {
            resp.headers_mut()
                .insert(crate::request_id::X_REQUEST_ID.clone(), request_id.clone());
        }
        shared.metrics.count_status(resp.status());
        shared
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        debug!(
            request_id = request_id.to_str().unwrap_or("-"),
            status = resp.status().as_u16(),
            "answered"
        );
        Ok(resp.map(|b| ResponseBody::new(b, guard)))
    }

    /// Checks the target and rewrites the request head for the upstream.
    /// Returns the client's pending upgrade for a tunnelled request, or a
    /// refusal to send back.
    fn prepare(
        &self,
        parts: &mut http::request::Parts,
        client: Option<&Client>,
    ) -> Result<Option<hyper::upgrade::OnUpgrade>, Refusal> {
        let shared = &self.shared;
        if parts.method == Method::CONNECT {
            return Err(Refusal::Connect);
        }
        // Before anything reads `Host` or strips `Transfer-Encoding`.
        conformance::check_head(parts.version, &parts.headers).map_err(Refusal::Head)?;
        // HTTP/1 absolute-form (a client using HTTP_PROXY): only for our upstream.
        // An HTTP/2 request always carries :authority, which plays the role of Host.
        if parts.version != Version::HTTP_2
            && parts
                .uri
                .authority()
                .is_some_and(|a| !shared.upstream.is_same_authority(a))
        {
            return Err(Refusal::ForeignTarget);
        }
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });

        let upgrade = parts.version == Version::HTTP_11 && headers::is_upgrade(&parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        // hyper answers `Expect: 100-continue` itself when the body is first read,
        // which happens as the body streams upstream.
        if parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            parts.headers.remove(header::EXPECT);
        }
        if shared.options.preserve_host {
            if let Some(host) = &original_host {
                parts.headers.insert(header::HOST, host.clone());
            }
        } else {
            parts.headers.insert(header::HOST, shared.host.clone());
        }
        if shared.options.forwarded_headers {
            if let Some(client) = client {
                headers::add_forwarded(&mut parts.headers, &client.forwarded_for, original_host);
            }
        }
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
        Ok(if upgrade {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        })
    }
}

/// Why a request is refused before it goes anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `CONNECT`: no raw tunnels.
    Connect,
    /// Absolute-form request for another host: never an open proxy.
    ForeignTarget,
    /// A head that breaks RFC 9112 (`Host`, `Transfer-Encoding`).
    Head(conformance::HeadProblem),
}

impl Refusal {
    fn into_response(self, upstream: &Upstream) -> Response<Body> {
        match self {
            Self::Connect => json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "connect_not_supported",
                "idemproxy is a reverse proxy for one upstream; it does not open tunnels with CONNECT",
                None,
            ),
            Self::ForeignTarget => json_error(
                StatusCode::FORBIDDEN,
                "foreign_target",
                &format!("idemproxy forwards only to {upstream}; it is not an open proxy"),
                None,
            ),
            Self::Head(problem) => problem.into_response(),
        }
    }
}

fn finish_response(
    mut resp: Response<Body>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    match (switching, client_upgrade) {
        (true, Some(client)) => {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(client, upstream));
            headers::strip_hop_by_hop(resp.headers_mut(), true);
        }
        _ => headers::strip_hop_by_hop(resp.headers_mut(), false),
    }
    resp
}

/// Copies bytes both ways between an upgraded client and upstream connection.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
            }
        }
        Err(e) => info!(error = %e, "protocol upgrade failed"),
    }
}

/// Counts a request in `idemproxy_requests_in_flight` until its response body
/// is finished or dropped.
pub struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn new(metrics: &ProxyMetrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The body sent to the client: the upstream's body, streamed as it comes,
/// counted in flight until it ends.
pub type ResponseBody = crate::body::WithGuard<InFlight>;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::Service;

    use super::*;
    use crate::error::ProxyError;

    /// Not ready on its first poll (it wakes the task), ready after: a
    /// layer that queues. The edge must wait for it, not call it unready.
    #[derive(Clone)]
    struct ReadyOnSecondPoll {
        polls: Arc<AtomicUsize>,
    }

    impl Service<Request<Body>> for ReadyOnSecondPoll {
        type Response = Response<Body>;
        type Error = ProxyError;
        type Future = std::future::Ready<Result<Response<Body>, ProxyError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }

        fn call(&mut self, _req: Request<Body>) -> Self::Future {
            assert!(
                self.polls.load(Ordering::SeqCst) >= 2,
                "called before it was ready"
            );
            let resp = Response::builder()
                .status(StatusCode::ACCEPTED)
                .body(body::empty())
                .map_err(|e| ProxyError::Other(e.into()));
            std::future::ready(resp)
        }
    }

    #[tokio::test]
    async fn stack_waits_for_a_layer_that_is_not_ready() {
        let polls = Arc::new(AtomicUsize::new(0));
        let stack = Stack::new(ReadyOnSecondPoll {
            polls: polls.clone(),
        });
        let req = Request::new(body::empty());
        let resp = stack.call(req).await.map(|r| r.status());
        assert_eq!(resp.ok(), Some(StatusCode::ACCEPTED));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
