//! A fault-injecting TCP proxy for HTTP/1.1, placed between idemproxy and a
//! real upstream.
//!
//! It relays bytes both ways. It frames the requests it relays (head, then a
//! `Content-Length` or chunked body) so that each request of a keep-alive
//! connection is judged on its own: a request that matches [`FaultPlan::matches`]
//! and is picked by [`Pick`] gets a [`Fault`]:
//!
//! - [`Fault::StoreThenDrop`] (what [`FaultProxy::start`] does): the request
//!   is forwarded to the upstream, the proxy waits until the upstream has
//!   started answering (or until its answer contains [`DropAfter::Contains`])
//!   so that the server surely ran it, then closes the connection to the
//!   client without relaying a byte of that answer;
//! - [`Fault::Unavailable`]: the proxy answers `503 Service Unavailable`
//!   itself (no `Retry-After`, the connection kept open); the upstream never
//!   sees the request;
//! - [`Fault::Reset`]: the proxy resets the connection (TCP RST) once it has
//!   read the whole request, without forwarding it: the client cannot tell
//!   this from a reset after the upstream processed it.
//!
//! [`FaultProxy::start_with`] chooses the fault of each picked request
//! ([`Faults`]: one for all, a rotation, or a closure), so that one plan can
//! mix them. [`FaultProxy::injected`] lists every fault in order and
//! [`FaultProxy::counts`] counts them by kind.
//!
//! Every request that reaches the upstream is kept, so it also serves as a
//! wire tap ([`FaultProxy::count_lines`], [`FaultProxy::count_containing`])
//! with [`FaultPlan::none`].
//!
//! Anything it cannot frame (an `Upgrade`, `Expect: 100-continue`, HTTP/2, a
//! body larger than [`MAX_INSPECT`]) is relayed as is for the rest of that
//! connection, without faults.
//!
//! ```no_run
//! use testkit::TestProxy;
//! use testkit::fault_proxy::{DropAfter, Fault, FaultPlan, FaultProxy, Faults, Pick};
//!
//! # async fn example(upstream_url: &str) {
//! // Store then drop a fifth of the tool calls.
//! let faults = FaultProxy::start(upstream_url, FaultPlan {
//!     matches: Box::new(|req| req.contains("\"tools/call\"")),
//!     pick: Pick::Chance { probability: 0.2, seed: 7 },
//!     drop_after: DropAfter::Contains(b"\"result\"".to_vec()),
//! }).await;
//! let proxy = TestProxy::start(&faults.url(), &[]).await;
//! // ... faults.dropped() lists what the client never got an answer to.
//! # drop(proxy);
//!
//! // Every third PUT: a 503, a store-then-drop and a reset, in turn.
//! let mixed = FaultProxy::start_with(
//!     upstream_url,
//!     FaultPlan {
//!         matches: Box::new(|req| req.request_line().starts_with("PUT ")),
//!         pick: Pick::EveryNth(3),
//!         drop_after: DropAfter::FirstByte,
//!     },
//!     Faults::Rotate(vec![Fault::Unavailable, Fault::StoreThenDrop, Fault::Reset]),
//! )
//! .await;
//! // ... mixed.counts().unavailable, .store_then_drop, .reset
//! # drop(mixed);
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bodies up to this size are buffered and shown to the predicate; a
/// connection with a larger request is relayed as is from then on.
pub const MAX_INSPECT: usize = 1 << 20;

/// How long a dropped request waits for the upstream's answer to begin.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One request as the fault proxy framed it.
#[derive(Clone, Debug)]
pub struct FramedRequest {
    /// The head as received (request line and headers, with the blank line).
    pub head: String,
    /// The body, de-chunked.
    pub body: Bytes,
}

impl FramedRequest {
    /// Whether the head or the body contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.head.contains(needle) || find(&self.body, needle.as_bytes()).is_some()
    }

    /// The request line (`POST /mcp HTTP/1.1`).
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Which matching requests get a fault.
#[derive(Clone, Debug)]
pub enum Pick {
    /// None: a pure relay (and wire tap).
    Never,
    /// Every matching request.
    Always,
    /// The Nth, 2Nth, ... matching request (counted over all connections).
    EveryNth(usize),
    /// Each matching request with this probability, from a seeded generator
    /// (the same seed picks the same positions of the matching sequence).
    Chance {
        /// 0.0 to 1.0.
        probability: f64,
        /// Seed of the generator.
        seed: u64,
    },
}

/// When the connection of a request picked for [`Fault::StoreThenDrop`] is closed.
#[derive(Clone, Debug)]
pub enum DropAfter {
    /// As soon as the first byte of the upstream's answer arrives (its status
    /// line: the server has decided, and usually done, the work).
    FirstByte,
    /// Once the upstream's answer so far contains these bytes (e.g. the
    /// `"result"` of a JSON-RPC answer streamed as server-sent events, whose
    /// headers may go out before the work is done), or the upstream closed.
    Contains(Vec<u8>),
}

/// What to break.
pub struct FaultPlan {
    /// Which requests are candidates.
    pub matches: Box<dyn Fn(&FramedRequest) -> bool + Send + Sync>,
    /// Which candidates get a fault (which fault: [`Faults`]).
    pub pick: Pick,
    /// When the connection of a stored-then-dropped one closes.
    pub drop_after: DropAfter,
}

/// What happens to a picked request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Forwarded; once the upstream answers (see [`DropAfter`]) the client
    /// connection is closed without a byte of the answer: the upstream ran
    /// the request, the client never learns it. Listed by [`FaultProxy::dropped`].
    StoreThenDrop,
    /// Not forwarded: the proxy answers `503 Service Unavailable` (a small
    /// JSON body, no `Retry-After`) and keeps the connection open.
    Unavailable,
    /// Not forwarded: the proxy resets the client connection (TCP RST) after
    /// reading the whole request, before any byte of an answer.
    Reset,
}

impl Fault {
    /// The fault's short name, as [`FaultCounts`] prints it: `drop`, `503`, `reset`.
    pub fn label(self) -> &'static str {
        match self {
            Fault::StoreThenDrop => "drop",
            Fault::Unavailable => "503",
            Fault::Reset => "reset",
        }
    }

    /// Whether the upstream received the request.
    pub fn forwards(self) -> bool {
        self == Fault::StoreThenDrop
    }
}

/// Which [`Fault`] each picked request gets.
pub enum Faults {
    /// The same fault for every picked request.
    One(Fault),
    /// The faults in turn: the first picked request gets the first, and so
    /// on, starting over after the last (an empty list means
    /// [`Fault::StoreThenDrop`]). With [`Pick::Chance`] the positions are
    /// seeded and the kinds rotate, so the counts of each kind differ by at
    /// most one.
    Rotate(Vec<Fault>),
    /// Chosen per picked request from the request and its pick index
    /// (0 for the first picked request).
    Each(Box<ChooseFault>),
}

/// The closure of [`Faults::Each`]: the picked request and its pick index to its fault.
pub type ChooseFault = dyn Fn(&FramedRequest, usize) -> Fault + Send + Sync;

impl Faults {
    fn choose(&self, req: &FramedRequest, index: usize) -> Fault {
        match self {
            Faults::One(fault) => *fault,
            Faults::Rotate(list) if list.is_empty() => Fault::StoreThenDrop,
            Faults::Rotate(list) => list[index % list.len()],
            Faults::Each(f) => f(req, index),
        }
    }
}

/// One injected fault, in the order they happened.
#[derive(Clone, Debug)]
pub struct Injected {
    /// What was done.
    pub fault: Fault,
    /// The request it was done to.
    pub request: FramedRequest,
}

/// How many faults of each kind were injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// [`Fault::Unavailable`]: 503 answered by the fault proxy.
    pub unavailable: usize,
    /// [`Fault::StoreThenDrop`]: forwarded, answer dropped.
    pub store_then_drop: usize,
    /// [`Fault::Reset`]: connection reset, not forwarded.
    pub reset: usize,
}

impl FaultCounts {
    /// All faults.
    pub fn total(&self) -> usize {
        self.unavailable + self.store_then_drop + self.reset
    }

    /// The count of one kind.
    pub fn of(&self, fault: Fault) -> usize {
        match fault {
            Fault::Unavailable => self.unavailable,
            Fault::StoreThenDrop => self.store_then_drop,
            Fault::Reset => self.reset,
        }
    }
}

/// `18 (503=6 drop=6 reset=6)`: the total, then each kind (for summary lines).
impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (503={} drop={} reset={})",
            self.total(),
            self.unavailable,
            self.store_then_drop,
            self.reset
        )
    }
}

impl FaultPlan {
    /// No faults: relay everything (and log request lines).
    pub fn none() -> FaultPlan {
        FaultPlan {
            matches: Box::new(|_| false),
            pick: Pick::Never,
            drop_after: DropAfter::FirstByte,
        }
    }
}

/// A stored-then-dropped request: forwarded, its answer never relayed.
#[derive(Clone, Debug)]
pub struct Dropped {
    /// The request (forwarded to the upstream in full).
    pub request: FramedRequest,
    /// What the upstream had answered when the connection was closed.
    pub answer_prefix: Bytes,
    /// Whether the upstream answered at all within 10 s (`ANSWER_TIMEOUT`).
    pub answered: bool,
}

struct Shared {
    upstream: SocketAddr,
    plan: FaultPlan,
    faults: Faults,
    enabled: AtomicBool,
    matched: AtomicUsize,
    picked: AtomicUsize,
    rng: Mutex<u64>,
    requests: Mutex<Vec<FramedRequest>>,
    dropped: Mutex<Vec<Dropped>>,
    injected: Mutex<Vec<Injected>>,
    connections: AtomicUsize,
}

impl Shared {
    /// The fault for this request, if it gets one (counts matches, draws the dice).
    fn pick(&self, req: &FramedRequest) -> Option<Fault> {
        if !self.enabled.load(Ordering::SeqCst) || !(self.plan.matches)(req) {
            return None;
        }
        let n = self.matched.fetch_add(1, Ordering::SeqCst) + 1;
        let picked = match &self.plan.pick {
            Pick::Never => false,
            Pick::Always => true,
            Pick::EveryNth(every) => *every > 0 && n % every == 0,
            Pick::Chance { probability, .. } => {
                let mut state = self.rng.lock().unwrap();
                let draw = splitmix64(&mut state) as f64 / u64::MAX as f64;
                draw < *probability
            }
        };
        if !picked {
            return None;
        }
        let index = self.picked.fetch_add(1, Ordering::SeqCst);
        Some(self.faults.choose(req, index))
    }

    /// Records an injected fault (before the client can see its effect).
    fn record(&self, fault: Fault, request: &FramedRequest) {
        self.injected.lock().unwrap().push(Injected {
            fault,
            request: request.clone(),
        });
    }
}

/// SplitMix64: a tiny, good-enough generator for fault positions.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The proxy. Stops accepting (and drops its connections) when dropped.
pub struct FaultProxy {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 in front of `upstream` (`http://host:port`)
    /// whose picked requests are stored then dropped ([`Fault::StoreThenDrop`]).
    pub async fn start(upstream: &str, plan: FaultPlan) -> FaultProxy {
        Self::start_with(upstream, plan, Faults::One(Fault::StoreThenDrop)).await
    }

    /// Starts a proxy on 127.0.0.1 in front of `upstream` (`http://host:port`)
    /// whose picked requests get the faults that `faults` chooses.
    pub async fn start_with(upstream: &str, plan: FaultPlan, faults: Faults) -> FaultProxy {
        let authority = upstream
            .strip_prefix("http://")
            .expect("an http:// upstream")
            .trim_end_matches('/');
        let upstream: SocketAddr = authority.parse().expect("upstream as IP:port");
        assert!(upstream.ip().is_loopback(), "talk only to 127.0.0.1");
        let seed = match plan.pick {
            Pick::Chance { seed, .. } => seed,
            _ => 0,
        };
        let shared = Arc::new(Shared {
            upstream,
            plan,
            faults,
            enabled: AtomicBool::new(true),
            matched: AtomicUsize::new(0),
            picked: AtomicUsize::new(0),
            rng: Mutex::new(seed),
            requests: Mutex::new(Vec::new()),
            dropped: Mutex::new(Vec::new()),
            injected: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        accept.connections.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(serve(client, accept.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        FaultProxy { addr, shared, task }
    }

    /// The URL to give idemproxy as `--upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Turns fault injection on or off (on at start); requests seen while
    /// off are relayed and not counted as matches.
    pub fn set_enabled(&self, on: bool) {
        self.shared.enabled.store(on, Ordering::SeqCst);
    }

    /// Every request forwarded to the upstream so far, in order: the
    /// stored-then-dropped ones included, not those answered 503 or reset by
    /// the fault proxy (they are in [`injected`](Self::injected)).
    pub fn requests(&self) -> Vec<FramedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The request line of every request forwarded so far, in order.
    pub fn request_lines(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.request_line().to_owned())
            .collect()
    }

    /// How many requests forwarded so far have a request line that starts with
    /// `prefix` (e.g. `POST /v3/lease/keepalive`).
    pub fn count_lines(&self, prefix: &str) -> usize {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.request_line().starts_with(prefix))
            .count()
    }

    /// How many requests forwarded so far contain `needle` in head or body
    /// (e.g. the id of a heartbeat's JSON-RPC ping).
    pub fn count_containing(&self, needle: &str) -> usize {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }

    /// Requests that matched the plan's predicate (while enabled).
    pub fn matched(&self) -> usize {
        self.shared.matched.load(Ordering::SeqCst)
    }

    /// The stored-then-dropped requests ([`Fault::StoreThenDrop`]: forwarded,
    /// their answers never relayed), in order.
    pub fn dropped(&self) -> Vec<Dropped> {
        self.shared.dropped.lock().unwrap().clone()
    }

    /// Every fault injected so far, of any kind, in order.
    pub fn injected(&self) -> Vec<Injected> {
        self.shared.injected.lock().unwrap().clone()
    }

    /// How many faults of each kind were injected so far.
    pub fn counts(&self) -> FaultCounts {
        let mut counts = FaultCounts::default();
        for i in self.shared.injected.lock().unwrap().iter() {
            match i.fault {
                Fault::Unavailable => counts.unavailable += 1,
                Fault::StoreThenDrop => counts.store_then_drop += 1,
                Fault::Reset => counts.reset += 1,
            }
        }
        counts
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

/// What the upstream-to-client relay does with the bytes it reads.
#[derive(Default)]
struct Capture {
    /// Set while a dropped request waits for its answer: bytes go to `got`,
    /// not to the client.
    active: bool,
    /// Told once the answer is far enough along (or the upstream closed).
    done: Option<oneshot::Sender<()>>,
    /// The answer so far.
    got: Vec<u8>,
}

/// The body of the proxy's own 503.
const UNAVAILABLE_BODY: &str = r#"{"error":"fault_proxy","detail":"503 injected by the fault proxy; the request was not forwarded"}"#;

/// Serves one client connection.
async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        return; // the client sees the connection close, as with a refused connect
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, client_write) = client.into_split();
    // Shared: the relay below writes the upstream's answers, the request
    // side its own 503s (between answers: an HTTP/1.1 client sends the next
    // request only once it has read the previous answer).
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let capture = Arc::new(Mutex::new(Capture::default()));

    // Upstream to client. Returns when the upstream closed (nothing more to
    // relay); while a drop is waiting it never returns, so that the other
    // side records the drop before the connection goes.
    let down = {
        let capture = capture.clone();
        let client_write = client_write.clone();
        let drop_after = shared.plan.drop_after.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match upstream_read.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let waiting = {
                            let mut cap = capture.lock().unwrap();
                            if let Some(done) = cap.done.take() {
                                let _ = done.send(());
                            }
                            cap.active
                        };
                        if waiting {
                            std::future::pending::<()>().await;
                        }
                        return;
                    }
                    Ok(n) => n,
                };
                let relay = {
                    let mut cap = capture.lock().unwrap();
                    if cap.active {
                        cap.got.extend_from_slice(&buf[..n]);
                        let complete = match &drop_after {
                            DropAfter::FirstByte => true,
                            DropAfter::Contains(marker) => find(&cap.got, marker).is_some(),
                        };
                        if complete {
                            if let Some(done) = cap.done.take() {
                                let _ = done.send(());
                            }
                        }
                        false
                    } else {
                        true
                    }
                };
                if relay
                    && client_write
                        .lock()
                        .await
                        .write_all(&buf[..n])
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }
    };

    // Client to upstream, one framed request at a time. Returns after a drop
    // or a reset.
    let up = {
        let capture = capture.clone();
        let shared = shared.clone();
        async move {
            let mut pending = Vec::new();
            loop {
                let (req, raw) = match read_request(&mut client_read, &mut pending).await {
                    Framing::Request(req, raw) => (req, raw),
                    Framing::Closed => {
                        // Let the answer in progress (if any) finish.
                        let _ = upstream_write.shutdown().await;
                        std::future::pending::<()>().await;
                        return;
                    }
                    Framing::Opaque => {
                        // Relay the rest of the connection as is.
                        if upstream_write.write_all(&pending).await.is_ok() {
                            let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
                        }
                        let _ = upstream_write.shutdown().await;
                        std::future::pending::<()>().await;
                        return;
                    }
                };
                let fault = shared.pick(&req);
                match fault {
                    None => {
                        shared.requests.lock().unwrap().push(req);
                        if upstream_write.write_all(&raw).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Fault::Unavailable) => {
                        shared.record(Fault::Unavailable, &req);
                        let answer = format!(
                            "HTTP/1.1 503 Service Unavailable\r\n\
                             content-type: application/json\r\n\
                             content-length: {}\r\n\r\n{UNAVAILABLE_BODY}",
                            UNAVAILABLE_BODY.len()
                        );
                        let mut w = client_write.lock().await;
                        if w.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Fault::Reset) => {
                        shared.record(Fault::Reset, &req);
                        // SO_LINGER 0: closing sends RST, not FIN.
                        let _ = client_write.lock().await.as_ref().set_zero_linger();
                        return;
                    }
                    Some(Fault::StoreThenDrop) => {}
                }
                // Store then drop: forward, wait for the answer, close.
                shared.requests.lock().unwrap().push(req.clone());
                let (done, answered) = oneshot::channel();
                {
                    let mut cap = capture.lock().unwrap();
                    cap.active = true;
                    cap.done = Some(done);
                    cap.got.clear();
                }
                let sent = upstream_write.write_all(&raw).await.is_ok();
                let answered = sent
                    && tokio::time::timeout(ANSWER_TIMEOUT, answered)
                        .await
                        .is_ok_and(|r| r.is_ok());
                let prefix = std::mem::take(&mut capture.lock().unwrap().got);
                shared.record(Fault::StoreThenDrop, &req);
                shared.dropped.lock().unwrap().push(Dropped {
                    request: req,
                    answer_prefix: prefix.into(),
                    answered,
                });
                return;
            }
        }
    };

    // The connection ends after a drop or a reset, or when the upstream
    // closed and everything it sent was relayed. Dropping both halves closes
    // both sockets.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

enum Framing {
    /// One whole request: parsed, and its raw bytes to forward.
    Request(FramedRequest, Vec<u8>),
    /// The client closed (or failed) between requests or mid-request.
    Closed,
    /// Not framable; `pending` holds what was read so far.
    Opaque,
}

/// Reads more bytes into `pending`; false at EOF or error.
async fn fill<R: AsyncRead + Unpin>(reader: &mut R, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 16 * 1024];
    match reader.read(&mut buf).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            pending.extend_from_slice(&buf[..n]);
            true
        }
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 request from `reader`, starting with the bytes in
/// `pending`; leaves any bytes after it in `pending`.
async fn read_request<R: AsyncRead + Unpin>(reader: &mut R, pending: &mut Vec<u8>) -> Framing {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let head_end = loop {
        if pending.starts_with(H2_PREFACE) {
            return Framing::Opaque;
        }
        if let Some(i) = find(pending, b"\r\n\r\n") {
            break i + 4;
        }
        if pending.len() > 64 * 1024 {
            return Framing::Opaque;
        }
        if !fill(reader, pending).await {
            return if pending.is_empty() {
                Framing::Closed
            } else {
                Framing::Opaque
            };
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    // An upgrade or tunnel is not HTTP/1.1 afterwards; a client that expects
    // `100 Continue` withholds its body until the upstream answers.
    let expects_continue = header(&head, "expect").is_some();
    if header(&head, "upgrade").is_some() || head.starts_with("CONNECT ") || expects_continue {
        return Framing::Opaque;
    }
    let chunked = header(&head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        // Walk the chunks; `at` is the offset of the next chunk-size line.
        let mut at = head_end;
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&pending[at..], b"\r\n") {
                    break at + i;
                }
                if pending.len() - head_end > MAX_INSPECT || !fill(reader, pending).await {
                    return Framing::Opaque;
                }
            };
            let size_text = String::from_utf8_lossy(&pending[at..line_end]).into_owned();
            let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            else {
                return Framing::Opaque;
            };
            if size == 0 {
                // Trailers end with an empty line.
                let mut t = line_end + 2;
                loop {
                    if let Some(i) = find(&pending[t..], b"\r\n") {
                        if i == 0 {
                            let end = t + 2;
                            let raw: Vec<u8> = pending.drain(..end).collect();
                            let req = FramedRequest {
                                head,
                                body: body.into(),
                            };
                            return Framing::Request(req, raw);
                        }
                        t += i + 2;
                        continue;
                    }
                    if !fill(reader, pending).await {
                        return Framing::Opaque;
                    }
                }
            }
            let data_start = line_end + 2;
            let data_end = data_start + size;
            while pending.len() < data_end + 2 {
                if data_end - head_end > MAX_INSPECT || !fill(reader, pending).await {
                    return Framing::Opaque;
                }
            }
            body.extend_from_slice(&pending[data_start..data_end]);
            at = data_end + 2;
        }
    }
    let length: usize = match header(&head, "content-length") {
        Some(v) => match v.trim().parse() {
            Ok(n) => n,
            Err(_) => return Framing::Opaque,
        },
        None => 0,
    };
    if length > MAX_INSPECT {
        return Framing::Opaque;
    }
    while pending.len() < head_end + length {
        if !fill(reader, pending).await {
            return Framing::Opaque;
        }
    }
    let raw: Vec<u8> = pending.drain(..head_end + length).collect();
    let body = Bytes::copy_from_slice(&raw[head_end..]);
    Framing::Request(FramedRequest { head, body }, raw)
}

/// The first value of header `name` in a raw head (case-insensitive).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Upstream, client, response, within};

    /// Each kind does what it says: a 503 and a reset never reach the
    /// upstream, a store-then-drop does and its answer is lost; the
    /// rotation, the counts and the lists agree.
    #[tokio::test]
    async fn faults_rotate_and_are_counted_by_kind() {
        let upstream = Upstream::start(|_req| async { response(200, "stored") }).await;
        let plan = FaultPlan {
            matches: Box::new(|req| req.request_line().starts_with("POST ")),
            pick: Pick::Always,
            drop_after: DropAfter::FirstByte,
        };
        let faults = Faults::Rotate(vec![Fault::Unavailable, Fault::Reset, Fault::StoreThenDrop]);
        let proxy = FaultProxy::start_with(&upstream.url(), plan, faults).await;
        let http = client();
        let post = |n: u32| {
            http.post(format!("{}/w/{n}", proxy.url()))
                .body(format!("{{\"n\":{n}}}"))
                .send()
        };

        let unavailable = within("POST 1", post(1)).await.expect("a 503 answer");
        assert_eq!(unavailable.status(), 503);
        assert!(
            within("503 body", unavailable.text())
                .await
                .unwrap()
                .contains("fault_proxy")
        );
        assert_eq!(
            upstream.requests.len(),
            0,
            "the 503'd request was forwarded"
        );

        assert!(
            within("POST 2", post(2)).await.is_err(),
            "a reset is an error"
        );
        assert_eq!(
            upstream.requests.len(),
            0,
            "the reset request was forwarded"
        );

        assert!(
            within("POST 3", post(3)).await.is_err(),
            "a dropped answer is an error"
        );
        assert_eq!(
            upstream.requests.len(),
            1,
            "the dropped request was not stored"
        );

        // Not matched: relayed as is.
        let get = within("GET", http.get(format!("{}/r", proxy.url())).send())
            .await
            .unwrap();
        assert_eq!(get.status(), 200);

        let counts = proxy.counts();
        assert_eq!(
            counts,
            FaultCounts {
                unavailable: 1,
                store_then_drop: 1,
                reset: 1
            }
        );
        assert_eq!(counts.to_string(), "3 (503=1 drop=1 reset=1)");
        let kinds: Vec<Fault> = proxy.injected().iter().map(|i| i.fault).collect();
        assert_eq!(
            kinds,
            [Fault::Unavailable, Fault::Reset, Fault::StoreThenDrop]
        );
        assert_eq!(
            proxy.injected()[1].request.request_line(),
            "POST /w/2 HTTP/1.1"
        );
        let dropped = proxy.dropped();
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].answered && dropped[0].answer_prefix.starts_with(b"HTTP/1.1 200"));
        // What reached the upstream: the dropped POST and the GET.
        assert_eq!(
            proxy.request_lines(),
            ["POST /w/3 HTTP/1.1", "GET /r HTTP/1.1"]
        );
        assert_eq!(proxy.matched(), 3);
    }
}
