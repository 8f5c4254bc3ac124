//! One client connection, from its first byte to its close.
//!
//! The first bytes choose the protocol: the HTTP/2 connection preface means
//! h2c with prior knowledge, anything else HTTP/1.1. Both have to arrive
//! within the header read timeout, so a client that sends nothing (or half a
//! preface) cannot hold a connection slot.
//!
//! An HTTP/1.1 connection is served by hyper only while it is in use: once
//! every answer is written and flushed, hyper waits for the next head, and
//! no request has come for a grace period ([`IDLE_GRACE`]), the connection
//! is taken apart ([`hyper::server::conn::http1::Connection::into_parts`]),
//! hyper's read and write buffers (8 KiB each) are freed, and the bare
//! socket waits for its next bytes (for at most the header read timeout, as
//! hyper's own keep-alive wait did). Bytes hyper had read but not used go in
//! front of the socket for the next round.
//!
//! The grace spares a busy connection the cost of rebuilding hyper's state
//! for every request (about a tenth of a request's instructions). It is
//! bounded in bytes: with more than [`BUFFERED_IDLE_LIMIT`] connections
//! holding buffers, an idle one gives them back at once.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;
use tracing::debug;

use super::Protocols;
use crate::proxy::{Client, Proxy, ResponseBody};

/// How long an HTTP/1.1 connection waits for its next request with hyper's
/// buffers before it gives them back: busy connections keep them, a
/// connection idle for one to two grace periods frees them.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// How many HTTP/1.1 connections may keep hyper's buffers (16 KiB each)
/// through the idle grace: past it, a connection gives them back as soon as
/// it is idle, so many idle connections never hold more than 2 MiB of them.
const BUFFERED_IDLE_LIMIT: usize = 128;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one accepted connection until it closes or the server drains.
pub(super) async fn serve(
    mut stream: TcpStream,
    remote: SocketAddr,
    protocols: &Protocols,
    mut draining: watch::Receiver<bool>,
) {
    let opening = tokio::select! {
        biased;
        () = drained(&mut draining) => return,
        read = tokio::time::timeout(protocols.header_read_timeout, read_opening(&mut stream)) => match read {
            Ok(Ok(opening)) => opening,
            Ok(Err(e)) => {
                debug!(%remote, error = %e, "client connection ended before its first request");
                return;
            }
            Err(_) => {
                debug!(%remote, "no request within the header read timeout; closing");
                return;
            }
        },
    };
    let Some(opening) = opening else { return };
    let state = Arc::new(ConnState::default());
    let io = ClientIo {
        stream,
        unread: opening.bytes,
        state: state.clone(),
    };
    let result = if opening.http2 {
        serve_http2(io, remote, protocols, &state, draining).await
    } else {
        serve_http1(io, remote, protocols, &state, draining).await
    };
    if let Err(e) = result {
        debug!(%remote, error = %e, "client connection ended with an error");
    }
}

/// What the first bytes said.
struct Opening {
    /// The bytes read to decide (handed to hyper before the socket's).
    bytes: Bytes,
    /// They were the HTTP/2 preface.
    http2: bool,
}

/// Reads until the bytes either are the HTTP/2 preface or cannot be:
/// `None` when the client closed first.
async fn read_opening(stream: &mut TcpStream) -> io::Result<Option<Opening>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        let read = &buf[..len];
        if read != &H2_PREFACE[..len] || len == H2_PREFACE.len() {
            return Ok(Some(Opening {
                bytes: Bytes::copy_from_slice(read),
                http2: read == H2_PREFACE.as_slice(),
            }));
        }
    }
}

/// Resolves once the server drains (or is gone).
async fn drained(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|drain| *drain).await;
}

/// The per-connection service: the proxy, told the client's address, with
/// each answer counted until its body ends.
#[derive(Clone)]
struct ProxyService {
    proxy: Proxy,
    client: Client,
    state: Arc<ConnState>,
}

impl ProxyService {
    fn new(remote: SocketAddr, protocols: &Protocols, state: &Arc<ConnState>) -> Self {
        Self {
            proxy: protocols.proxy.clone(),
            client: Client::new(remote),
            state: state.clone(),
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, req: Request<Incoming>) -> Answering {
        let answer = Answer::start(&self.state);
        Answering {
            served: self.proxy.serve(req, Some(&self.client)),
            answer: Some(answer),
        }
    }
}

pin_project_lite::pin_project! {
    /// The proxy's answer to one request, its body wrapped in [`Tracked`].
    struct Answering {
        #[pin]
        served: BoxFuture<'static, Result<Response<ResponseBody>, Infallible>>,
        answer: Option<Answer>,
    }
}

impl Future for Answering {
    type Output = Result<Response<Tracked>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(resp) = std::task::ready!(this.served.poll(cx));
        let answer = this.answer.take();
        Poll::Ready(Ok(resp.map(|body| Tracked { body, answer })))
    }
}

async fn serve_http1(
    mut io: ClientIo,
    remote: SocketAddr,
    protocols: &Protocols,
    state: &ConnState,
    mut draining: watch::Receiver<bool>,
) -> hyper::Result<()> {
    let mut svc = ProxyService::new(remote, protocols, &io.state);
    // One drain signal and one timer for the connection's whole life (an
    // idle connection's task is small): the timer counts the idle grace
    // while hyper serves, and the keep-alive wait while the socket is parked.
    let mut drain = std::pin::pin!(drained(&mut draining));
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    loop {
        state.reset();
        // Boxed: the connection state is large, and an idle connection's
        // task should not keep room for it.
        let buffered = Buffered::hold(protocols);
        let mut conn = Box::pin(
            protocols
                .http1
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
        );
        let mut closing = false;
        // Armed the first time hyper is seen idle, and re-armed at most once
        // a grace period while requests keep coming: no timer work per request.
        let mut armed = false;
        let mut answers_at_arming = 0;
        let idle = poll_fn(|cx| {
            if !closing && drain.as_mut().poll(cx).is_ready() {
                // hyper answers an in-flight request with `connection: close`
                // and closes an idle connection at once.
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            if let Poll::Ready(done) = conn.as_mut().poll(cx) {
                return Poll::Ready(Err(done));
            }
            if closing || !state.is_idle() {
                return Poll::Pending;
            }
            if buffered.crowded() {
                // Past the budget of buffered connections: give them back now.
                return Poll::Ready(Ok(()));
            }
            if !armed {
                armed = true;
                answers_at_arming = state.answers();
                arm(&mut timer, IDLE_GRACE);
            }
            let Some(grace) = timer.as_mut() else {
                return Poll::Pending;
            };
            while grace.as_mut().poll(cx).is_ready() {
                let answers = state.answers();
                if answers == answers_at_arming {
                    return Poll::Ready(Ok(()));
                }
                answers_at_arming = answers;
                grace
                    .as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_GRACE);
            }
            Poll::Pending
        })
        .await;
        if let Err(done) = idle {
            return done;
        }
        drop(buffered);
        // Upgraded connections never come here: their future is done.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return Ok(());
        };
        svc = parts.service;
        io = parts.io.into_inner();
        io.unread_first(parts.read_buf);
        if !io.unread.is_empty() {
            continue;
        }
        debug!(%remote, "idle client connection parked without buffers");
        // hyper's wait for the next head counted against the header read
        // timeout; so does the grace it spent waiting here.
        arm(
            &mut timer,
            protocols.header_read_timeout.saturating_sub(IDLE_GRACE),
        );
        let woken = poll_fn(|cx| {
            if drain.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Drain);
            }
            if let Poll::Ready(ready) = io.stream.poll_read_ready(cx) {
                return Poll::Ready(ready.map_or_else(Wake::Failed, |()| Wake::Bytes));
            }
            match timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                Some(Poll::Pending) => Poll::Pending,
                _ => Poll::Ready(Wake::TimedOut),
            }
        })
        .await;
        match woken {
            Wake::Bytes => {}
            Wake::Drain => return Ok(()),
            Wake::Failed(e) => {
                debug!(%remote, error = %e, "idle client connection failed");
                return Ok(());
            }
            Wake::TimedOut => {
                debug!(%remote, "idle client connection closed after the header read timeout");
                return Ok(());
            }
        }
    }
}

/// Counts this connection among those holding hyper's buffers while it does.
struct Buffered<'a>(&'a AtomicUsize);

impl<'a> Buffered<'a> {
    fn hold(protocols: &'a Protocols) -> Self {
        protocols.buffered.fetch_add(1, Ordering::Relaxed);
        Self(&protocols.buffered)
    }

    /// More connections hold buffers than may idle with them.
    fn crowded(&self) -> bool {
        self.0.load(Ordering::Relaxed) > BUFFERED_IDLE_LIMIT
    }
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a parked connection woke up.
enum Wake {
    Bytes,
    Drain,
    Failed(io::Error),
    TimedOut,
}

/// Sets `timer` to fire `after` from now, making it the first time.
fn arm(timer: &mut Option<Pin<Box<Sleep>>>, after: Duration) {
    match timer {
        Some(timer) => timer.as_mut().reset(tokio::time::Instant::now() + after),
        None => *timer = Some(Box::pin(tokio::time::sleep(after))),
    }
}

async fn serve_http2(
    io: ClientIo,
    remote: SocketAddr,
    protocols: &Protocols,
    state: &ConnState,
    mut draining: watch::Receiver<bool>,
) -> hyper::Result<()> {
    let svc = ProxyService::new(remote, protocols, &io.state);
    let mut conn = Box::pin(protocols.http2.serve_connection(TokioIo::new(io), svc));
    let mut drain = std::pin::pin!(drained(&mut draining));
    // The preface is not a request: the first one must follow within the
    // header read timeout, too.
    let mut first = std::pin::pin!(tokio::time::sleep(protocols.header_read_timeout));
    let mut closing = false;
    poll_fn(|cx| {
        if !closing && drain.as_mut().poll(cx).is_ready() {
            closing = true;
            conn.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(done) = conn.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        if !state.served() && first.as_mut().poll(cx).is_ready() {
            debug!(%remote, "no HTTP/2 request within the header read timeout; closing");
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    })
    .await
}

/// What the socket wrapper and the service saw since the connection was last
/// (re)built: enough to tell that hyper holds nothing but an empty wait.
#[derive(Default)]
struct ConnState {
    flags: AtomicU8,
    /// Requests whose answer has not ended (or been dropped).
    in_flight: AtomicUsize,
    /// Requests handed to the proxy so far (wrapping).
    answers: AtomicU32,
}

/// The last socket operation was a read that found nothing.
const READ_PENDING: u8 = 1;
/// Bytes arrived since the last request was handed to the proxy.
const READ_DATA: u8 = 2;
/// Bytes were written (or wait to be) and not yet flushed.
const UNFLUSHED: u8 = 4;
/// A request has been served on this connection.
const SERVED: u8 = 8;

impl ConnState {
    fn reset(&self) {
        self.flags.fetch_and(SERVED, Ordering::Relaxed);
    }

    /// hyper has written and flushed every answer, started no request since
    /// it last read, and now waits for bytes that are not there.
    fn is_idle(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & (READ_PENDING | READ_DATA | UNFLUSHED) == READ_PENDING
            && self.in_flight.load(Ordering::Acquire) == 0
    }

    fn answers(&self) -> u32 {
        self.answers.load(Ordering::Relaxed)
    }

    fn served(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & SERVED != 0
    }

    fn read(&self, got_bytes: bool) {
        self.flags.fetch_and(!READ_PENDING, Ordering::Relaxed);
        if got_bytes {
            self.flags.fetch_or(READ_DATA, Ordering::Relaxed);
        }
    }

    fn read_pending(&self) {
        self.flags.fetch_or(READ_PENDING, Ordering::Relaxed);
    }

    fn wrote(&self) {
        self.flags.fetch_and(!READ_PENDING, Ordering::Relaxed);
        self.flags.fetch_or(UNFLUSHED, Ordering::Relaxed);
    }

    fn flushed(&self) {
        self.flags.fetch_and(!UNFLUSHED, Ordering::Relaxed);
    }
}

/// A request handed to the proxy, counted until its answer's body ends.
struct Answer(Arc<ConnState>);

impl Answer {
    fn start(state: &Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.answers.fetch_add(1, Ordering::Relaxed);
        state.flags.fetch_and(!READ_DATA, Ordering::Relaxed);
        state.flags.fetch_or(SERVED, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// The answer's body, holding its [`Answer`] until it ends or is dropped.
    pub(super) struct Tracked {
        #[pin]
        body: ResponseBody,
        answer: Option<Answer>,
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket as hyper sees it: bytes already read go first, and
/// every operation is noted in the connection's [`ConnState`].
struct ClientIo {
    stream: TcpStream,
    unread: Bytes,
    state: Arc<ConnState>,
}

impl ClientIo {
    /// Puts `bytes`, read before the ones still unread, back in front.
    fn unread_first(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.unread.is_empty() {
            self.unread = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.unread.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.unread);
            self.unread = joined.freeze();
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.advance(n);
            this.state.read(n > 0);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        match &polled {
            Poll::Ready(_) => this.state.read(buf.filled().len() > before),
            Poll::Pending => this.state.read_pending(),
        }
        polled
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state.wrote();
        Pin::new(&mut this.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state.wrote();
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.state.flushed();
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.wrote();
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}
