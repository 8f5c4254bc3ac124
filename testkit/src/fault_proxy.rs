//! A fault-injecting TCP proxy for HTTP/1.1, placed between idemproxy and a
//! real upstream.
//!
//! It relays bytes both ways. It frames the requests it relays (head, then a
//! `Content-Length` or chunked body) so that each request of a keep-alive
//! connection is judged on its own: a request that matches [`FaultPlan::matches`]
//! and is picked by [`Pick`] is forwarded to the upstream, the proxy waits
//! until the upstream has started answering (or until its answer contains
//! [`DropAfter::Contains`]) so that the server surely ran it, then closes
//! the connection to the client without relaying a byte of that answer:
//! "store then drop". Every request is kept, so it also serves as a wire tap
//! ([`FaultProxy::count_lines`], [`FaultProxy::count_containing`]) with
//! [`FaultPlan::none`].
//!
//! Anything it cannot frame (an `Upgrade`, `Expect: 100-continue`, HTTP/2, a
//! body larger than [`MAX_INSPECT`]) is relayed as is for the rest of that
//! connection, without faults.
//!
//! ```no_run
//! use testkit::TestProxy;
//! use testkit::fault_proxy::{DropAfter, FaultPlan, FaultProxy, Pick};
//!
//! # async fn example(upstream_url: &str) {
//! let faults = FaultProxy::start(upstream_url, FaultPlan {
//!     matches: Box::new(|req| req.contains("\"tools/call\"")),
//!     pick: Pick::Chance { probability: 0.2, seed: 7 },
//!     drop_after: DropAfter::Contains(b"\"result\"".to_vec()),
//! }).await;
//! let proxy = TestProxy::start(&faults.url(), &[]).await;
//! // ... faults.dropped() lists what the client never got an answer to.
//! # drop(proxy);
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

/// Which matching requests are dropped.
#[derive(Clone, Debug)]
pub enum Pick {
    /// None: a pure relay (and wire tap).
    Never,
    /// Every matching request.
    Always,
    /// The Nth, 2Nth, ... matching request (counted over all connections).
    EveryNth(usize),
    /// Each matching request with this probability, from a seeded generator
    /// (the same seed drops the same positions of the matching sequence).
    Chance {
        /// 0.0 to 1.0.
        probability: f64,
        /// Seed of the generator.
        seed: u64,
    },
}

/// When a picked request's connection is closed.
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
    /// Which candidates are dropped.
    pub pick: Pick,
    /// When the connection of a dropped one closes.
    pub drop_after: DropAfter,
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

/// A request whose answer was never relayed.
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
    enabled: AtomicBool,
    matched: AtomicUsize,
    rng: Mutex<u64>,
    requests: Mutex<Vec<FramedRequest>>,
    dropped: Mutex<Vec<Dropped>>,
    connections: AtomicUsize,
}

impl Shared {
    /// Whether this request is to be dropped (counts matches, draws the dice).
    fn pick(&self, req: &FramedRequest) -> bool {
        if !self.enabled.load(Ordering::SeqCst) || !(self.plan.matches)(req) {
            return false;
        }
        let n = self.matched.fetch_add(1, Ordering::SeqCst) + 1;
        match &self.plan.pick {
            Pick::Never => false,
            Pick::Always => true,
            Pick::EveryNth(every) => *every > 0 && n % every == 0,
            Pick::Chance { probability, .. } => {
                let mut state = self.rng.lock().unwrap();
                let draw = splitmix64(&mut state) as f64 / u64::MAX as f64;
                draw < *probability
            }
        }
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
    /// Starts a proxy on 127.0.0.1 in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str, plan: FaultPlan) -> FaultProxy {
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
            enabled: AtomicBool::new(true),
            matched: AtomicUsize::new(0),
            rng: Mutex::new(seed),
            requests: Mutex::new(Vec::new()),
            dropped: Mutex::new(Vec::new()),
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

    /// Every request relayed so far (dropped ones included), in order.
    pub fn requests(&self) -> Vec<FramedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The request line of every request relayed so far, in order.
    pub fn request_lines(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.request_line().to_owned())
            .collect()
    }

    /// How many requests relayed so far have a request line that starts with
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

    /// How many requests relayed so far contain `needle` in head or body
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

    /// The requests whose answers were dropped, in order.
    pub fn dropped(&self) -> Vec<Dropped> {
        self.shared.dropped.lock().unwrap().clone()
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

/// Serves one client connection.
async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        return; // the client sees the connection close, as with a refused connect
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let capture = Arc::new(Mutex::new(Capture::default()));

    // Upstream to client. Returns when the upstream closed (nothing more to
    // relay); while a drop is waiting it never returns, so that the other
    // side records the drop before the connection goes.
    let down = {
        let capture = capture.clone();
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
                if relay && client_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };

    // Client to upstream, one framed request at a time. Returns after a drop.
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
                shared.requests.lock().unwrap().push(req.clone());
                if !shared.pick(&req) {
                    if upstream_write.write_all(&raw).await.is_err() {
                        return;
                    }
                    continue;
                }
                // Store then drop: forward, wait for the answer, close.
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
                shared.dropped.lock().unwrap().push(Dropped {
                    request: req,
                    answer_prefix: prefix.into(),
                    answered,
                });
                return;
            }
        }
    };

    // The connection ends after a drop, or when the upstream closed and
    // everything it sent was relayed. Dropping both halves closes both sockets.
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
