//! The connections to the one upstream: HTTP/1.1 connections kept idle
//! between requests, or one HTTP/2 connection that every request shares,
//! whichever the upstream chose by ALPN.
//!
//! One upstream needs no pool key: the idle list is a `Vec` behind a mutex
//! held for one push or pop, newest last, so the warmest connection is reused
//! first and the oldest expire first. No task is spawned per request; each
//! connection has one task that drives it.
//!
//! An HTTP/1.1 connection is
//! - opened when no idle one is ready, and lent to one request at a time;
//! - given back by its response body once read to the end
//!   ([`super::body::PooledBody`]), unless the response said
//!   `connection: close` or switched protocols, or the idle list already
//!   holds `max_idle` connections: then it is closed;
//! - closed once idle for the idle timeout: never lent after it (checked at
//!   checkout), and closed even without traffic by a sweep every quarter of
//!   the timeout (one task while anything is pooled);
//! - skipped when its connection task says it is closed.
//!
//! The HTTP/2 connection is shared by cloning its sender, replaced when it
//! closes or receives a GOAWAY, and expires like an idle connection when no
//! request used it for the idle timeout. An https upstream that spoke
//! HTTP/2 last time (or that has not been reached yet) is connected to by one
//! request at a time, and whoever waited shares its outcome, the new
//! connection or the error: a burst of first requests opens one connection,
//! not one each, and while the upstream is unreachable no request waits for
//! more than one connect.
//!
//! A request that fails on a reused connection before a byte of it was
//! written (hyper hands such a request back) is sent once more on a fresh
//! connection: the reused connection was stale, the upstream never saw it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::debug;

use super::body::{Lease, PooledBody};
use super::error::{UpstreamError, is_go_away};
use crate::body::{self, Body};
use crate::config::Upstream;

/// The sender of an HTTP/1.1 connection.
pub(super) type H1Sender = http1::SendRequest<Body>;
type H2Sender = http2::SendRequest<Body>;

/// How long a checkout waits for an idle HTTP/1.1 connection that was given
/// back as its response ended but whose connection task has not caught up
/// yet (microseconds, normally). Longer means it is still writing a request
/// body the upstream answered early: it is closed after that exchange and
/// another connection is used.
const READY_GRACE: Duration = Duration::from_millis(50);

/// The shortest interval between two sweeps of expired connections.
const MIN_SWEEP: Duration = Duration::from_millis(10);

/// What the pool was built from.
pub(super) struct PoolConfig {
    /// The upstream.
    pub(super) upstream: Upstream,
    /// Connects TCP (with its timeout, keep-alive and nodelay) and TLS (with ALPN).
    pub(super) connector: HttpsConnector<HttpConnector>,
    /// The HTTP/1.1 settings of each connection.
    pub(super) http1: http1::Builder,
    /// The TCP connect timeout (the connector applies it).
    pub(super) connect_timeout: Duration,
    /// How long a connection may stay idle.
    pub(super) idle_timeout: Duration,
    /// How many idle HTTP/1.1 connections are kept.
    pub(super) max_idle: usize,
}

/// The connections to the upstream.
pub(super) struct Pool {
    state: Mutex<State>,
    /// Held while connecting to an upstream expected to speak HTTP/2.
    connecting_h2: tokio::sync::Mutex<()>,
    /// Whether the upstream negotiated HTTP/2 last time (at first: whether it
    /// is https, so that it may).
    expect_h2: AtomicBool,
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: where the connector connects.
    target: Uri,
    upstream: Upstream,
    /// The `Host` header for HTTP/1.1 requests that have none.
    host: Option<HeaderValue>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

#[derive(Default)]
struct State {
    /// Idle HTTP/1.1 connections, oldest first.
    idle: Vec<Idle>,
    shared_h2: Option<SharedH2>,
    /// The id the next HTTP/2 connection gets.
    next_h2_id: u64,
    /// Why the last connect that others waited for failed (cleared when
    /// the next one starts).
    h2_failure: Option<Arc<UpstreamError>>,
    /// Whether a sweep task is running.
    sweeping: bool,
}

struct Idle {
    sender: H1Sender,
    since: Instant,
}

struct SharedH2 {
    sender: H2Sender,
    id: u64,
    last_used: Instant,
}

/// A connection lent to one request.
enum Conn {
    H1(H1Sender),
    H2 { sender: H2Sender, id: u64 },
}

/// A failed send, with the request if hyper handed it back unsent.
struct Failed {
    error: UpstreamError,
    unsent: Option<Request<Body>>,
}

impl From<TrySendError<Request<Body>>> for Failed {
    fn from(mut e: TrySendError<Request<Body>>) -> Self {
        let unsent = e.take_message();
        Self {
            error: UpstreamError::send(e.into_error()),
            unsent,
        }
    }
}

impl Pool {
    /// An empty pool; nothing connects until the first request.
    pub(super) fn new(config: PoolConfig) -> Self {
        let PoolConfig {
            upstream,
            connector,
            http1,
            connect_timeout,
            idle_timeout,
            max_idle,
        } = config;
        let target = Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(upstream.scheme.clone());
            parts.authority = Some(upstream.authority.clone());
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
            parts
        })
        .unwrap_or_default();
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        Self {
            state: Mutex::new(State::default()),
            connecting_h2: tokio::sync::Mutex::new(()),
            expect_h2: AtomicBool::new(upstream.scheme == http::uri::Scheme::HTTPS),
            connector,
            target,
            host: host_header(&upstream),
            upstream,
            http1,
            http2,
            connect_timeout,
            idle_timeout,
            max_idle,
        }
    }

    /// The upstream.
    pub(super) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The TCP connect timeout, for the error that reports it.
    pub(super) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Sends `req` (origin-form URI) on a pooled or new connection, and once
    /// more on a fresh one if a reused connection turned out stale before
    /// the request was written.
    pub(super) async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let (conn, reused) = match self.checkout().await {
            Some(conn) => (conn, true),
            // Boxed: connecting is rare, and its state would make every
            // request's future larger.
            None => (Box::pin(self.connect(None)).await?, false),
        };
        let stale_h2 = match &conn {
            Conn::H2 { id, .. } => Some(*id),
            Conn::H1(_) => None,
        };
        match self.send_on(conn, req).await {
            Ok(resp) => Ok(resp),
            Err(Failed {
                unsent: Some(req), ..
            }) if reused => {
                let conn = Box::pin(self.connect(stale_h2)).await?;
                self.send_on(conn, req).await.map_err(|f| f.error)
            }
            Err(f) => Err(f.error),
        }
    }

    /// Sends `req` on `conn` in the form its protocol wants.
    async fn send_on(
        self: &Arc<Self>,
        conn: Conn,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, Failed> {
        match conn {
            Conn::H1(mut sender) => {
                self.origin_form(&mut req);
                let resp = sender.try_send_request(req).await?;
                Ok(self.lend(sender, resp))
            }
            Conn::H2 { mut sender, id } => {
                if let Err(e) = self.absolute_form(&mut req) {
                    return Err(Failed {
                        error: UpstreamError::send(e),
                        unsent: None,
                    });
                }
                match sender.try_send_request(req).await {
                    Ok(resp) => Ok(resp.map(body::boxed)),
                    Err(e) => {
                        let failed = Failed::from(e);
                        if sender.is_closed() || is_go_away(&failed.error) {
                            self.forget_h2(id);
                        }
                        Err(failed)
                    }
                }
            }
        }
    }

    /// HTTP/1.1 wants the path and query only, and a `Host` header.
    fn origin_form(&self, req: &mut Request<Body>) {
        let uri = req.uri();
        if uri.scheme().is_some() || uri.path_and_query().is_none() {
            let pq = uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        }
        if let Some(host) = &self.host {
            if !req.headers().contains_key(header::HOST) {
                req.headers_mut().insert(header::HOST, host.clone());
            }
        }
    }

    /// HTTP/2 wants scheme and authority (`:scheme`, `:authority`) in front
    /// of the path and query, which move over as they are.
    fn absolute_form(&self, req: &mut Request<Body>) -> Result<(), http::uri::InvalidUriParts> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.upstream.scheme.clone());
        parts.authority = Some(self.upstream.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts)?;
        Ok(())
    }

    /// The response, its body holding the connection until read to the end;
    /// a connection that cannot carry another exchange is not lent on.
    fn lend(self: &Arc<Self>, sender: H1Sender, resp: Response<Incoming>) -> Response<Body> {
        let reusable = self.max_idle > 0
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            && !says_close(resp.headers());
        let lease = reusable.then(|| Lease::new(sender, self.clone()));
        resp.map(|incoming| body::boxed(PooledBody::new(incoming, lease)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the list is still sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expired(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) >= self.idle_timeout
    }

    /// A pooled connection: the shared HTTP/2 one, or the newest idle
    /// HTTP/1.1 one that is open, ready and not expired.
    async fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        loop {
            let idle = {
                let mut state = self.lock();
                if let Some(h2) = &mut state.shared_h2 {
                    if !h2.sender.is_closed() && !self.expired(h2.last_used, now) {
                        h2.last_used = now;
                        return Some(Conn::H2 {
                            sender: h2.sender.clone(),
                            id: h2.id,
                        });
                    }
                    state.shared_h2 = None;
                }
                state.idle.pop()
            };
            let Idle { mut sender, since } = idle?;
            if self.expired(since, now) || sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Some(Conn::H1(sender));
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_GRACE, sender.ready()).await {
                return Some(Conn::H1(sender));
            }
        }
    }

    /// A new connection. To an upstream expected to speak HTTP/2, one
    /// request connects at a time; the others wait for its outcome and
    /// share it: the connection (unless it is `stale_h2`, the one that just
    /// failed), or the error. So a burst opens one connection, and while the
    /// upstream is unreachable nobody waits for more than one connect.
    async fn connect(self: &Arc<Self>, stale_h2: Option<u64>) -> Result<Conn, UpstreamError> {
        if !self.expect_h2.load(Ordering::Relaxed) {
            return self.open().await;
        }
        let Ok(_one_at_a_time) = self.connecting_h2.try_lock() else {
            drop(self.connecting_h2.lock().await);
            if let Some(conn) = self.shared_h2_except(stale_h2) {
                return Ok(conn);
            }
            if let Some(failure) = self.lock().h2_failure.clone() {
                return Err(UpstreamError::shared(failure));
            }
            // It spoke HTTP/1.1, or its connection is already gone.
            return self.open().await;
        };
        // Another request may have connected since this one's checkout.
        if let Some(conn) = self.shared_h2_except(stale_h2) {
            return Ok(conn);
        }
        self.lock().h2_failure = None;
        match self.open().await {
            Ok(conn) => Ok(conn),
            Err(e) => {
                let failure = Arc::new(e);
                self.lock().h2_failure = Some(failure.clone());
                Err(UpstreamError::shared(failure))
            }
        }
    }

    /// Connects, and starts the task that drives the connection.
    async fn open(self: &Arc<Self>) -> Result<Conn, UpstreamError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await
            .map_err(UpstreamError::connect)?;
        if io.connected().is_negotiated_h2() {
            self.expect_h2.store(true, Ordering::Relaxed);
            let (sender, conn) = self
                .http2
                .handshake(io)
                .await
                .map_err(UpstreamError::connect)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            Ok(self.share_h2(sender))
        } else {
            self.expect_h2.store(false, Ordering::Relaxed);
            let (sender, conn) = self
                .http1
                .handshake(io)
                .await
                .map_err(UpstreamError::connect)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "upstream connection ended with an error");
                }
            });
            Ok(Conn::H1(sender))
        }
    }

    /// The shared HTTP/2 connection, if open and not `except`.
    fn shared_h2_except(&self, except: Option<u64>) -> Option<Conn> {
        let mut state = self.lock();
        let h2 = state.shared_h2.as_mut()?;
        if h2.sender.is_closed() || Some(h2.id) == except {
            return None;
        }
        h2.last_used = Instant::now();
        Some(Conn::H2 {
            sender: h2.sender.clone(),
            id: h2.id,
        })
    }

    /// Makes `sender` the shared HTTP/2 connection, replacing the old one.
    fn share_h2(self: &Arc<Self>, sender: H2Sender) -> Conn {
        let (id, old, start_sweep) = {
            let mut state = self.lock();
            let id = state.next_h2_id;
            state.next_h2_id = id.wrapping_add(1);
            let old = state.shared_h2.replace(SharedH2 {
                sender: sender.clone(),
                id,
                last_used: Instant::now(),
            });
            (id, old, !std::mem::replace(&mut state.sweeping, true))
        };
        drop(old);
        if start_sweep {
            self.start_sweeper();
        }
        Conn::H2 { sender, id }
    }

    /// Stops sharing HTTP/2 connection `id` (closed, or going away).
    fn forget_h2(&self, id: u64) {
        let old = {
            let mut state = self.lock();
            match &state.shared_h2 {
                Some(h2) if h2.id == id => state.shared_h2.take(),
                _ => None,
            }
        };
        drop(old);
    }

    /// Gives an HTTP/1.1 connection back whose response was read to the
    /// end; it is closed instead when the idle list is full.
    pub(super) fn put_back(self: &Arc<Self>, sender: H1Sender) {
        if sender.is_closed() {
            return;
        }
        let since = Instant::now();
        let (refused, start_sweep) = {
            let mut state = self.lock();
            if state.idle.len() >= self.max_idle {
                (Some(sender), false)
            } else {
                state.idle.push(Idle { sender, since });
                (None, !std::mem::replace(&mut state.sweeping, true))
            }
        };
        drop(refused);
        if start_sweep {
            self.start_sweeper();
        }
    }

    /// Starts the task that closes expired connections; it ends when the
    /// pool is empty or gone.
    fn start_sweeper(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        let period = (self.idle_timeout / 4).max(MIN_SWEEP);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(sweep(pool, period))),
            // Outside a runtime nothing sweeps; checkouts still skip expired connections.
            Err(_) => self.lock().sweeping = false,
        }
    }

    /// Closes expired and closed connections; `false` (and the sweep ends)
    /// when nothing is pooled any more.
    fn sweep_once(&self) -> bool {
        let now = Instant::now();
        let (expired, h2, more) = {
            let mut state = self.lock();
            let n = state
                .idle
                .partition_point(|idle| self.expired(idle.since, now));
            let expired: Vec<Idle> = state.idle.drain(..n).collect();
            state.idle.retain(|idle| !idle.sender.is_closed());
            let h2 = match &state.shared_h2 {
                Some(h2) if h2.sender.is_closed() || self.expired(h2.last_used, now) => {
                    state.shared_h2.take()
                }
                _ => None,
            };
            let more = !state.idle.is_empty() || state.shared_h2.is_some();
            state.sweeping = more;
            (expired, h2, more)
        };
        drop((expired, h2));
        more
    }
}

/// Sweeps `pool` every `period` while it holds connections.
async fn sweep(pool: Weak<Pool>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if !pool.sweep_once() {
            return;
        }
    }
}

/// The `Host` of the upstream, without the scheme's default port.
fn host_header(upstream: &Upstream) -> Option<HeaderValue> {
    let authority = &upstream.authority;
    let default_port = if upstream.scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    let host = match authority.port_u16() {
        Some(port) if port == default_port => authority.host(),
        _ => authority.as_str(),
    };
    HeaderValue::from_str(host).ok()
}

/// Whether a `Connection` header carries the `close` token.
fn says_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};
    use tokio::net::TcpListener;

    use super::*;

    /// A pool for the plain-HTTP upstream at `addr`.
    fn pool_for(addr: SocketAddr) -> Arc<Pool> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Arc::new(Pool::new(PoolConfig {
            upstream: upstream(&format!("http://{addr}")),
            connector,
            http1: http1::Builder::new(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_idle: 8,
        }))
    }

    /// A connection whose peer has gone without its connection task having
    /// noticed yet: reads report end-of-file once `gone` is set (which wakes
    /// no one), writes vanish.
    struct Vanishing {
        gone: Arc<AtomicBool>,
    }

    impl tokio::io::AsyncRead for Vanishing {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.gone.load(Ordering::SeqCst) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }

    impl tokio::io::AsyncWrite for Vanishing {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// An idle connection whose upstream closed it just before a request
    /// was queued on it hands the request back unsent; the pool sends it
    /// once more on a fresh connection and the caller gets the answer.
    #[tokio::test]
    async fn request_on_a_stale_connection_is_sent_again_on_a_fresh_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool_for(listener.local_addr().unwrap());
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(stream.read_u8().await.unwrap());
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")
                .await
                .unwrap();
            stream
        });

        let gone = Arc::new(AtomicBool::new(false));
        let io = TokioIo::new(Vanishing { gone: gone.clone() });
        let (mut stale, conn) = http1::Builder::new().handshake(io).await.unwrap();
        let driver = tokio::spawn(conn);
        stale.ready().await.unwrap();
        pool.lock().idle.push(Idle {
            sender: stale,
            since: Instant::now(),
        });
        gone.store(true, Ordering::SeqCst);

        let req = Request::get("/x").body(crate::body::empty()).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), pool.send(req))
            .await
            .expect("answered in time")
            .expect("sent again on a fresh connection");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "fresh");
        drop(upstream.await.unwrap());
        assert!(driver.await.is_ok(), "the stale connection ended");
    }

    fn upstream(url: &str) -> Upstream {
        let uri: Uri = url.parse().unwrap();
        Upstream {
            scheme: uri.scheme().unwrap().clone(),
            authority: uri.authority().unwrap().clone(),
        }
    }

    /// The Host header drops the scheme's default port and keeps any other.
    #[test]
    fn host_header_drops_only_the_default_port() {
        assert_eq!(
            host_header(&upstream("https://a.example:443")).unwrap(),
            "a.example"
        );
        assert_eq!(
            host_header(&upstream("http://a.example:80")).unwrap(),
            "a.example"
        );
        assert_eq!(
            host_header(&upstream("http://a.example:443")).unwrap(),
            "a.example:443"
        );
        assert_eq!(
            host_header(&upstream("http://127.0.0.1:8080")).unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            host_header(&upstream("https://a.example")).unwrap(),
            "a.example"
        );
    }

    /// `Connection: keep-alive, Close` says close; `keep-alive` or `closed` does not.
    #[test]
    fn connection_close_is_found_among_tokens() {
        let mut headers = HeaderMap::new();
        assert!(!says_close(&headers));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!says_close(&headers));
        headers.append(header::CONNECTION, HeaderValue::from_static("closed"));
        assert!(!says_close(&headers));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Close"),
        );
        assert!(says_close(&headers));
    }
}
