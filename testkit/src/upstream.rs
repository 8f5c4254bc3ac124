//! Scripted upstreams built on hyper, and what they received.
//!
//! [`Upstream::start`] serves HTTP/1.1 and h2c (with [`Upstream::start_tls`],
//! whatever ALPN negotiated) and hands each request, body streaming, to an
//! async handler; [`Upstream::buffered`] reads the body first;
//! [`Upstream::scripted`] can also drop a connection unanswered or hang
//! ([`Act`]). Each records every request ([`Requests`]) before its handler
//! runs.
//!
//! ```no_run
//! use testkit::{Act, Upstream, response};
//!
//! # async fn example() {
//! // "500, then store and drop the connection, then 200".
//! let upstream = Upstream::scripted(|_req, n| async move {
//!     match n {
//!         0 => Act::Reply(response(500, "")),
//!         1 => Act::Drop,
//!         _ => Act::Reply(response(200, "ok")),
//!     }
//! })
//! .await;
//! upstream.requests.wait_for(3).await;
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{Body, body_bytes};
use crate::wait::{AbortOnDrop, within};

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Request method.
    pub method: Method,
    /// Request target as received (origin-form: path and query).
    pub uri: Uri,
    /// HTTP version the upstream saw.
    pub version: Version,
    /// All request headers.
    pub headers: HeaderMap,
    /// The whole body, for upstreams started with [`Upstream::buffered`];
    /// `None` when the handler streamed it.
    pub body: Option<Bytes>,
    /// When it was recorded (tokio's clock, so paused time applies): after
    /// the head, or with a buffered body after the whole body.
    pub at: Instant,
}

impl From<&Request<Bytes>> for Recorded {
    /// A buffered request as [`Upstream::buffered`] records it, stamped now.
    fn from(req: &Request<Bytes>) -> Recorded {
        Recorded::head(req, Some(req.body().clone()))
    }
}

impl Recorded {
    fn head<B>(req: &Request<B>, body: Option<Bytes>) -> Recorded {
        Recorded {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
            at: Instant::now(),
        }
    }

    /// The first value of `name` as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// Every value of `name` as text, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ASCII header"))
            .collect()
    }
}

/// The requests an upstream received, in arrival order (head recorded before
/// the handler runs). Cheap to clone.
#[derive(Clone, Default)]
pub struct Requests {
    list: Arc<Mutex<Vec<Recorded>>>,
    arrived: Arc<Notify>,
}

impl Requests {
    /// Records `r` and returns its arrival number (0 for the first).
    fn push(&self, r: Recorded) -> usize {
        let n = {
            let mut list = self.list.lock().unwrap();
            list.push(r);
            list.len() - 1
        };
        self.arrived.notify_waiters();
        n
    }

    /// A snapshot of every request so far.
    pub fn all(&self) -> Vec<Recorded> {
        self.list.lock().unwrap().clone()
    }

    /// How many requests arrived.
    pub fn len(&self) -> usize {
        self.list.lock().unwrap().len()
    }

    /// Whether no request arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every request with this method so far.
    pub fn with_method(&self, method: Method) -> Vec<Recorded> {
        self.all()
            .into_iter()
            .filter(|r| r.method == method)
            .collect()
    }

    /// "METHOD path-and-query" of every request so far.
    pub fn lines(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|r| format!("{} {}", r.method, r.uri))
            .collect()
    }

    /// The latest request; panics if there is none.
    pub fn last(&self) -> Recorded {
        self.list
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received no request")
    }

    /// Waits until at least `n` requests arrived (bounded by [`WAIT`](crate::WAIT)).
    pub async fn wait_for(&self, n: usize) {
        within(&format!("upstream to receive {n} request(s)"), async {
            loop {
                let notified = self.arrived.notified();
                if self.len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

/// A TLS acceptor configuration for [`Upstream::start_tls`].
pub type TlsServerConfig = Arc<rustls::ServerConfig>;

/// A scripted HTTP upstream built on hyper. It serves HTTP/1.1 and h2c (or,
/// with TLS, whatever ALPN negotiated), supports upgrades, records every
/// request head and hands the request to an async handler. Stops when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it received.
    pub requests: Requests,
    connections: Arc<AtomicUsize>,
    tls: bool,
    _task: AbortOnDrop,
}

impl Upstream {
    /// Starts a plain-HTTP upstream; `handler` gets each request with its streaming body.
    pub async fn start<H, F>(handler: H) -> Upstream
    where
        H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let requests = Requests::default();
        let recorder = requests.clone();
        Self::spawn(None, requests, move |req: Request<Incoming>| {
            recorder.push(Recorded::head(&req, None));
            handler(req)
        })
        .await
    }

    /// Starts an HTTPS upstream with the given rustls configuration (see [`TestPki`](crate::TestPki)).
    pub async fn start_tls<H, F>(tls: TlsServerConfig, handler: H) -> Upstream
    where
        H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let requests = Requests::default();
        let recorder = requests.clone();
        Self::spawn(Some(tls), requests, move |req: Request<Incoming>| {
            recorder.push(Recorded::head(&req, None));
            handler(req)
        })
        .await
    }

    /// Starts a plain-HTTP upstream that reads each body completely, records
    /// the request with [`Recorded::body`] set, then calls `handler` with it.
    pub async fn buffered<H, F>(handler: H) -> Upstream
    where
        H: Fn(Request<Bytes>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let requests = Requests::default();
        let recorder = requests.clone();
        let handler = Arc::new(handler);
        Self::spawn(None, requests, move |req: Request<Incoming>| {
            let (handler, recorder) = (handler.clone(), recorder.clone());
            async move {
                let (parts, body) = req.into_parts();
                let req = Request::from_parts(parts, body_bytes(body).await);
                recorder.push(Recorded::from(&req));
                handler(req).await
            }
        })
        .await
    }

    async fn spawn<H, F>(tls: Option<TlsServerConfig>, requests: Requests, handler: H) -> Upstream
    where
        H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            // A refused handshake (e.g. no client certificate) just closes.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let io = TokioIo::new(stream);
                                let _ = builder.serve_connection_with_upgrades(io, svc).await;
                            }
                        }
                        None => {
                            let io = TokioIo::new(stream);
                            let _ = builder.serve_connection_with_upgrades(io, svc).await;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            requests,
            connections,
            tls: is_tls,
            _task: AbortOnDrop(task),
        }
    }

    /// The URL to give the proxy as `--upstream`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// TCP connections accepted so far (a pooled proxy reuses them).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// What an [`Upstream::scripted`] handler does with one request.
pub enum Act {
    /// Send this response.
    Reply(Response<Body>),
    /// Close the connection without sending a byte of a response (the whole
    /// request was read, and acted on, first): the proxy sees a reset before
    /// headers ("store then drop").
    Drop,
    /// Never answer.
    Hang,
}

impl Upstream {
    /// Starts a plain HTTP/1.1 upstream that reads each request completely,
    /// records it with [`Recorded::body`] set, and lets `handler` decide what
    /// to do; the handler also gets the request's arrival number (0 for the
    /// first). A body that fails to read is recorded as empty.
    pub async fn scripted<H, F>(handler: H) -> Upstream
    where
        H: Fn(Request<Bytes>, usize) -> F + Send + Sync + 'static,
        F: Future<Output = Act> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Requests::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let (recorder, counter) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_scripted(stream, handler.clone(), recorder.clone()));
            }
        });
        Upstream {
            addr,
            requests,
            connections,
            tls: false,
            _task: AbortOnDrop(task),
        }
    }
}

/// Serves one connection of an [`Upstream::scripted`].
async fn serve_scripted<H, F>(stream: TcpStream, handler: Arc<H>, requests: Requests)
where
    H: Fn(Request<Bytes>, usize) -> F + Send + Sync + 'static,
    F: Future<Output = Act> + Send + 'static,
{
    let abort = Arc::new(Notify::new());
    let on_drop = abort.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (handler, requests, abort) = (handler.clone(), requests.clone(), on_drop.clone());
        async move {
            let (parts, body) = req.into_parts();
            let bytes = match body.collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let req = Request::from_parts(parts, bytes);
            let n = requests.push(Recorded::from(&req));
            match handler(req, n).await {
                Act::Reply(resp) => Ok::<_, Infallible>(resp),
                Act::Drop => {
                    abort.notify_one();
                    std::future::pending().await
                }
                Act::Hang => std::future::pending().await,
            }
        }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        () = abort.notified() => {}
    }
}
