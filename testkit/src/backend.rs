//! An example session backend: a small, real HTTP/1.1 server that stands for the third-party
//! service idemproxy sits in front of, with switchable fault injection.
//!
//! It keeps agent sessions that expire `--session-ttl` after creation or after the last
//! heartbeat (ordinary calls do not extend them), append-only session entries keyed by a
//! client-chosen `uuid` (a duplicate is a `409`), session actions (a side effect with no natural
//! key: every call runs again), and a CouchDB-like document store.
//! It deliberately does not use the idemproxy library.
//!
//! Its command line is the `session_backend` example ([`run`]):
//! ```text
//! cargo run --example session_backend -- --listen 127.0.0.1:8080 --session-ttl 30s
//! cargo run --example session_backend -- --listen 127.0.0.1:0 --store-then-drop-rate 0.3 --seed 7
//! ```
//! On start it prints exactly one line to stdout, `session_backend listening on http://ADDR`,
//! and runs until Ctrl-C. Every flag is also an environment variable `SESSION_BACKEND_<FLAG>`.
//! Tests and the demo serve it in-process instead:
//! ```no_run
//! use std::time::Duration;
//! use testkit::backend::{Backend, Options};
//!
//! # async fn example() {
//! let backend = Backend::new(&Options {
//!     session_ttl: Duration::from_secs(2),
//!     ..Options::default()
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! tokio::spawn(backend.clone().serve(listener, async move {
//!     let _ = stopped.await;
//! }));
//! // ... requests ..., then `backend.stats()`, and `stop.send(())`.
//! # drop(stop);
//! # }
//! ```
//!
//! API (JSON everywhere; errors are `{"error": ..., "detail": ...}`):
//! - `POST /v1/sessions` → 201 `{"id","expires_in_ms"}` and `x-session-id`
//! - `GET /v1/sessions/{sid}` → `{"id","expires_in_ms","entries"}`; `DELETE` → 204
//! - `POST /v1/sessions/{sid}/heartbeat` → `{"id","expires_in_ms"}` (expiry = now + TTL)
//! - `POST /v1/sessions/{sid}/entries` with `{"uuid": ..., ...}` → 201 and `Location`, or 409
//! - `GET /v1/sessions/{sid}/entries[/{uuid}]`, `PUT|GET /db/{doc}`, `GET /healthz`, `GET /stats`
//! - `POST /v1/sessions/{sid}/actions` with an optional JSON body runs an action (say, sends an
//!   email) and records it: 201 `{"run": N}`, where N counts this session's runs so far. It has
//!   no key, so a repeated call runs again. `GET /v1/sessions/{sid}/actions` →
//!   `{"runs": N, "actions": [body, ...]}`.
//!
//! Faults (`--fail-rate`, `--store-then-drop-rate`, `--reset-rate`) hit writes only
//! (`POST .../entries`, `POST .../actions`, `PUT /db/...`): `fail` answers 503 without storing,
//! `reset` closes the connection before storing, `store-then-drop` processes the write and then
//! closes the connection without sending any response (curl: "Empty reply from server").
//! `--max-faults N` stops injecting after N faults (e.g. `--store-then-drop-rate 1
//! --max-faults 1`: exactly the first write's answer is lost).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use clap::{CommandFactory as _, Parser};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// Largest request body accepted (larger ones get 413).
const MAX_BODY: usize = 1024 * 1024;
/// Longest session TTL honoured (about 100 years).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// How long `serve` waits for in-flight requests after the shutdown signal.
const DRAIN: Duration = Duration::from_secs(5);

const JSON: HeaderValue = HeaderValue::from_static("application/json");

type Resp = Response<Full<Bytes>>;

/// Command-line options; each flag is also the environment variable `SESSION_BACKEND_<FLAG>`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "session_backend",
    about = "Example session backend with fault injection"
)]
pub struct Options {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "SESSION_BACKEND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Session lifetime after creation or the last heartbeat (e.g. 30s, 500ms, 2m).
    #[arg(long, env = "SESSION_BACKEND_SESSION_TTL", default_value = "30s", value_parser = parse_duration)]
    pub session_ttl: Duration,
    /// Fraction of writes answered 503 without storing.
    #[arg(long, env = "SESSION_BACKEND_FAIL_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Fraction of writes stored and then answered by closing the connection.
    #[arg(long, env = "SESSION_BACKEND_STORE_THEN_DROP_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub store_then_drop_rate: f64,
    /// Fraction of writes answered by closing the connection before storing.
    #[arg(long, env = "SESSION_BACKEND_RESET_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub reset_rate: f64,
    /// Inject at most this many faults in all, then none (unset: no limit).
    #[arg(long, env = "SESSION_BACKEND_MAX_FAULTS")]
    pub max_faults: Option<u64>,
    /// Delay added to every request (e.g. 200ms).
    #[arg(long, env = "SESSION_BACKEND_LATENCY", default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,
    /// Seed for the fault RNG, for reproducible runs (unset: random).
    #[arg(long, env = "SESSION_BACKEND_SEED")]
    pub seed: Option<u64>,
    /// Do not print a line per injected fault (the counts stay in /stats).
    #[arg(long, env = "SESSION_BACKEND_QUIET")]
    pub quiet: bool,
}

impl Default for Options {
    /// The CLI defaults, without reading arguments or the environment (handy in tests).
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            session_ttl: Duration::from_secs(30),
            fail_rate: 0.0,
            store_then_drop_rate: 0.0,
            reset_rate: 0.0,
            max_faults: None,
            latency: Duration::ZERO,
            seed: None,
            quiet: false,
        }
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h` (a bare `0` is zero).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 500ms or 30s, got {s:?}"))?;
    let ms_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" if n == 0 => 0,
        _ => return Err(format!("unknown unit in {s:?} (use ms, s, m or h)")),
    };
    n.checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Parses a fraction in `[0, 1]`.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("expected a fraction between 0 and 1, got {s:?}")),
    }
}

/// A fault injected into one write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Fail,
    StoreThenDrop,
    Reset,
}

/// Draws one fault decision per write from a (possibly seeded) RNG.
struct Faults {
    /// The RNG and the number of faults injected so far.
    rng: Mutex<(StdRng, u64)>,
    fail: f64,
    store_then_drop: f64,
    reset: f64,
    max: Option<u64>,
}

impl Faults {
    fn new(opts: &Options) -> Faults {
        let rng = opts
            .seed
            .map_or_else(StdRng::from_os_rng, StdRng::seed_from_u64);
        Faults {
            rng: Mutex::new((rng, 0)),
            fail: opts.fail_rate,
            store_then_drop: opts.store_then_drop_rate,
            reset: opts.reset_rate,
            max: opts.max_faults,
        }
    }

    /// One uniform draw per write, split into consecutive bands: fail, store-then-drop, reset.
    /// Once `max` faults were injected, none is.
    fn next(&self) -> Option<Fault> {
        let mut rng = lock(&self.rng);
        let (rng, injected) = &mut *rng;
        if self.max.is_some_and(|max| *injected >= max) {
            return None;
        }
        let r: f64 = rng.random();
        let bands = [
            (self.fail, Fault::Fail),
            (self.store_then_drop, Fault::StoreThenDrop),
            (self.reset, Fault::Reset),
        ];
        let mut edge = 0.0;
        for (rate, fault) in bands {
            edge += rate;
            if r < edge {
                *injected += 1;
                return Some(fault);
            }
        }
        None
    }
}

/// Counters reported by `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests received (all endpoints, faulted ones included).
    pub requests: u64,
    /// Session entries stored.
    pub entries_total: u64,
    /// `/db` documents stored.
    pub docs_total: u64,
    /// Session actions run (`POST /v1/sessions/{sid}/actions` processed).
    pub actions_total: u64,
    /// Writes answered (or, for store-then-drop, processed as) 409.
    pub conflicts: u64,
    /// Live sessions right now.
    pub sessions: u64,
    /// Heartbeat requests received, whatever their outcome.
    pub heartbeats: u64,
    /// Faults injected, by kind.
    pub faults: FaultStats,
}

/// Injected faults by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultStats {
    /// Writes answered 503 without storing (`--fail-rate`).
    pub fail: u64,
    /// Writes stored, then answered by closing the connection (`--store-then-drop-rate`).
    pub store_then_drop: u64,
    /// Writes answered by closing the connection before storing (`--reset-rate`).
    pub reset: u64,
}

struct Session {
    expires_at: Instant,
    /// Stored documents in insertion order, exactly the bytes the client sent.
    entries: Vec<Bytes>,
    by_uuid: HashMap<String, usize>,
    /// The bodies of the actions run, in order (valid JSON; `{}` for an empty body).
    actions: Vec<Bytes>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    docs: HashMap<String, (HeaderValue, Bytes)>,
    stats: Stats,
}

impl State {
    /// The session if it exists and has not expired; an expired one is removed (lazy cleanup).
    fn live(&mut self, sid: &str, now: Instant) -> Option<&mut Session> {
        if self.sessions.get(sid).is_some_and(|s| s.expires_at <= now) {
            self.sessions.remove(sid);
        }
        self.sessions.get_mut(sid)
    }
}

/// The backend: shared state behind an `Arc`, cheap to clone.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    ttl: Duration,
    latency: Duration,
    quiet: bool,
    faults: Faults,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backend {
    /// A backend with no sessions or documents, configured by `opts` (its
    /// `listen` is for [`run`]; [`Backend::serve`] takes a listener).
    pub fn new(opts: &Options) -> Backend {
        Backend {
            inner: Arc::new(Inner {
                // Capped so that `Instant + ttl` cannot overflow on an absurd --session-ttl.
                ttl: opts.session_ttl.min(MAX_TTL),
                latency: opts.latency,
                quiet: opts.quiet,
                faults: Faults::new(opts),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Entries stored in a live session (0 if it is unknown or expired).
    pub fn entry_count(&self, sid: &str) -> usize {
        lock(&self.inner.state)
            .live(sid, Instant::now())
            .map_or(0, |s| s.entries.len())
    }

    /// The counters of `GET /stats`, with `sessions` counted now.
    pub fn stats(&self) -> Stats {
        let mut st = lock(&self.inner.state);
        let now = Instant::now();
        st.sessions.retain(|_, s| s.expires_at > now);
        let mut stats = st.stats.clone();
        stats.sessions = st.sessions.len() as u64;
        stats
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown` completes, then lets in-flight requests
    /// finish (up to a few seconds) and returns.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut shutdown = pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        conns.spawn(self.clone().serve_connection(stream, drain_rx.clone()));
                    }
                    Err(e) => {
                        eprintln!("session_backend: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        let _ = drain_tx.send(true);
        let drained = async { while conns.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(DRAIN, drained).await;
        conns.shutdown().await;
    }

    /// One connection. A request that must end without a response notifies `abort`; dropping
    /// the hyper connection then closes the socket before any response byte is written.
    async fn serve_connection(self, stream: TcpStream, mut drain: watch::Receiver<bool>) {
        let _ = stream.set_nodelay(true);
        let abort = Arc::new(Notify::new());
        let service = {
            let abort = abort.clone();
            hyper::service::service_fn(move |req| {
                let (backend, abort) = (self.clone(), abort.clone());
                async move { Ok::<_, Infallible>(backend.handle(req, &abort).await) }
            })
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        let mut conn = pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => break, // client errors (resets, bad requests) end the connection
                () = abort.notified() => break,
                _ = drain.changed(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>, abort: &Notify) -> Resp {
        lock(&self.inner.state).stats.requests += 1;
        if !self.inner.latency.is_zero() {
            tokio::time::sleep(self.inner.latency).await;
        }
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        let is_write = matches!(
            (&parts.method, segs.as_slice()),
            (&Method::POST, ["v1", "sessions", _, "entries" | "actions"])
                | (&Method::PUT, ["db", _])
        );
        let fault = if is_write {
            self.inner.faults.next()
        } else {
            None
        };
        if let Some(fault) = fault {
            let mut st = lock(&self.inner.state);
            match fault {
                Fault::Fail => st.stats.faults.fail += 1,
                Fault::StoreThenDrop => st.stats.faults.store_then_drop += 1,
                Fault::Reset => st.stats.faults.reset += 1,
            }
            if !self.inner.quiet {
                eprintln!(
                    "session_backend: injected {fault:?} on {} {path}",
                    parts.method
                );
            }
        }
        if fault == Some(Fault::Reset) {
            return drop_connection(abort).await; // before reading the body: may reset the TCP stream
        }
        // Every body is read in full, so a keep-alive connection stays usable.
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(resp) => return resp,
        };
        if fault == Some(Fault::Fail) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "injected fault",
            );
        }
        let ct = parts.headers.get(CONTENT_TYPE).cloned();
        let resp = self.route(&parts.method, &segs, ct, body);
        if fault == Some(Fault::StoreThenDrop) {
            return drop_connection(abort).await; // processed, but the answer is lost
        }
        resp
    }

    fn route(&self, method: &Method, segs: &[&str], ct: Option<HeaderValue>, body: Bytes) -> Resp {
        if segs.len() > 1 && segs.iter().any(|s| s.is_empty()) {
            return error(StatusCode::NOT_FOUND, "not found", "empty path segment");
        }
        match (method, segs) {
            (&Method::GET, ["healthz"]) => json_resp(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, ["stats"]) => json_resp(StatusCode::OK, &json!(self.stats())),
            (&Method::POST, ["v1", "sessions"]) => self.create_session(),
            (&Method::GET | &Method::DELETE, ["v1", "sessions", sid]) => self.session(method, sid),
            (&Method::POST, ["v1", "sessions", sid, "heartbeat"]) => self.heartbeat(sid),
            (&Method::POST, ["v1", "sessions", sid, "entries"]) => self.add_entry(sid, body),
            (&Method::GET, ["v1", "sessions", sid, "entries"]) => self.list_entries(sid),
            (&Method::GET, ["v1", "sessions", sid, "entries", uuid]) => self.get_entry(sid, uuid),
            (&Method::POST, ["v1", "sessions", sid, "actions"]) => self.run_action(sid, body),
            (&Method::GET, ["v1", "sessions", sid, "actions"]) => self.list_actions(sid),
            (&Method::PUT, ["db", doc]) => self.put_doc(doc, ct, body),
            (&Method::GET, ["db", doc]) => match lock(&self.inner.state).docs.get(*doc) {
                Some((ct, bytes)) => raw_resp(StatusCode::OK, ct.clone(), bytes.clone()),
                None => error(
                    StatusCode::NOT_FOUND,
                    "not found",
                    format!("document {doc} does not exist"),
                ),
            },
            (
                _,
                ["healthz" | "stats"]
                | ["db", _]
                | ["v1", "sessions"]
                | ["v1", "sessions", _]
                | ["v1", "sessions", _, "heartbeat" | "entries" | "actions"]
                | ["v1", "sessions", _, "entries", _],
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                format!("{method} is not supported here"),
            ),
            _ => error(StatusCode::NOT_FOUND, "not found", "no such endpoint"),
        }
    }

    fn create_session(&self) -> Resp {
        let id = format!("{:032x}", rand::random::<u128>());
        let now = Instant::now();
        let mut st = lock(&self.inner.state);
        st.sessions.retain(|_, s| s.expires_at > now);
        let session = Session {
            expires_at: now + self.inner.ttl,
            entries: Vec::new(),
            by_uuid: HashMap::new(),
            actions: Vec::new(),
        };
        st.sessions.insert(id.clone(), session);
        let mut resp = json_resp(
            StatusCode::CREATED,
            &json!({"id": id, "expires_in_ms": ms(self.inner.ttl)}),
        );
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-session-id", v);
        }
        resp
    }

    fn session(&self, method: &Method, sid: &str) -> Resp {
        let now = Instant::now();
        let mut st = lock(&self.inner.state);
        let Some(s) = st.live(sid, now) else {
            return invalid_session(sid);
        };
        if method == Method::DELETE {
            st.sessions.remove(sid);
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            return resp;
        }
        let body =
            json!({"id": sid, "expires_in_ms": ms(s.expires_at - now), "entries": s.entries.len()});
        json_resp(StatusCode::OK, &body)
    }

    fn heartbeat(&self, sid: &str) -> Resp {
        let now = Instant::now();
        let mut st = lock(&self.inner.state);
        st.stats.heartbeats += 1;
        let Some(s) = st.live(sid, now) else {
            return invalid_session(sid);
        };
        s.expires_at = now + self.inner.ttl;
        json_resp(
            StatusCode::OK,
            &json!({"id": sid, "expires_in_ms": ms(self.inner.ttl)}),
        )
    }

    fn add_entry(&self, sid: &str, bytes: Bytes) -> Resp {
        // Resolve the session first: a dead session is a 404 whatever the body.
        let parsed = serde_json::from_slice::<Value>(&bytes);
        let mut st = lock(&self.inner.state);
        let Some(session) = st.live(sid, Instant::now()) else {
            return invalid_session(sid);
        };
        let doc = match parsed {
            Ok(doc) => doc,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid json", e.to_string()),
        };
        let Some(uuid) = doc.get("uuid").and_then(Value::as_str) else {
            return error(
                StatusCode::BAD_REQUEST,
                "missing uuid",
                "body must be a JSON object with a string \"uuid\"",
            );
        };
        if uuid.is_empty()
            || !uuid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~:".contains(&b))
        {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid uuid",
                "uuid must be 1+ characters of [A-Za-z0-9-._~:]",
            );
        }
        let location = format!("/v1/sessions/{sid}/entries/{uuid}");
        let mut resp = if session.by_uuid.contains_key(uuid) {
            st.stats.conflicts += 1;
            error(
                StatusCode::CONFLICT,
                "conflict",
                format!("entry {uuid} already exists"),
            )
        } else {
            session
                .by_uuid
                .insert(uuid.to_owned(), session.entries.len());
            session.entries.push(bytes.clone());
            st.stats.entries_total += 1;
            raw_resp(StatusCode::CREATED, JSON, bytes)
        };
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(LOCATION, v);
        }
        resp
    }

    fn list_entries(&self, sid: &str) -> Resp {
        let mut st = lock(&self.inner.state);
        let Some(session) = st.live(sid, Instant::now()) else {
            return invalid_session(sid);
        };
        let out = json_array(b"{\"entries\":".to_vec(), &session.entries);
        raw_resp(StatusCode::OK, JSON, out.into())
    }

    fn get_entry(&self, sid: &str, uuid: &str) -> Resp {
        let mut st = lock(&self.inner.state);
        let Some(session) = st.live(sid, Instant::now()) else {
            return invalid_session(sid);
        };
        match session
            .by_uuid
            .get(uuid)
            .and_then(|&i| session.entries.get(i))
        {
            Some(doc) => raw_resp(StatusCode::OK, JSON, doc.clone()),
            None => error(
                StatusCode::NOT_FOUND,
                "not found",
                format!("entry {uuid} does not exist"),
            ),
        }
    }

    /// Runs an action: there is no key to recognise a repeat, so every call runs it again.
    fn run_action(&self, sid: &str, bytes: Bytes) -> Resp {
        let parsed = if bytes.iter().all(u8::is_ascii_whitespace) {
            Ok(Bytes::from_static(b"{}"))
        } else {
            serde_json::from_slice::<Value>(&bytes).map(|_| bytes)
        };
        let mut st = lock(&self.inner.state);
        let Some(session) = st.live(sid, Instant::now()) else {
            return invalid_session(sid);
        };
        let body = match parsed {
            Ok(body) => body,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid json", e.to_string()),
        };
        session.actions.push(body);
        let run = session.actions.len();
        st.stats.actions_total += 1;
        json_resp(StatusCode::CREATED, &json!({"run": run}))
    }

    fn list_actions(&self, sid: &str) -> Resp {
        let mut st = lock(&self.inner.state);
        let Some(session) = st.live(sid, Instant::now()) else {
            return invalid_session(sid);
        };
        let head = format!("{{\"runs\":{},\"actions\":", session.actions.len());
        let out = json_array(head.into_bytes(), &session.actions);
        raw_resp(StatusCode::OK, JSON, out.into())
    }

    fn put_doc(&self, doc: &str, ct: Option<HeaderValue>, bytes: Bytes) -> Resp {
        let mut st = lock(&self.inner.state);
        if st.docs.contains_key(doc) {
            st.stats.conflicts += 1;
            return error(
                StatusCode::CONFLICT,
                "conflict",
                format!("document {doc} already exists"),
            );
        }
        let ct = ct.unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
        st.docs.insert(doc.to_owned(), (ct, bytes));
        st.stats.docs_total += 1;
        let mut resp = json_resp(StatusCode::CREATED, &json!({"ok": true, "id": doc}));
        if let Ok(v) = HeaderValue::from_str(&format!("/db/{doc}")) {
            resp.headers_mut().insert(LOCATION, v);
        }
        resp
    }
}

/// Asks the connection task to drop the connection and never produces a response.
async fn drop_connection(abort: &Notify) -> Resp {
    abort.notify_one();
    std::future::pending().await
}

async fn read_body(body: Incoming) -> Result<Bytes, Resp> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            format!("limit is {MAX_BODY} bytes"),
        )),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, "bad body", e.to_string())),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `head`, then `items` as a JSON array, then `}`. The items are validated
/// JSON documents, so splicing their bytes yields valid JSON.
fn json_array<T: AsRef<[u8]>>(mut head: Vec<u8>, items: &[T]) -> Vec<u8> {
    head.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            head.push(b',');
        }
        head.extend_from_slice(item.as_ref());
    }
    head.extend_from_slice(b"]}");
    head
}

fn raw_resp(status: StatusCode, content_type: HeaderValue, body: Bytes) -> Resp {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, content_type);
    resp
}

fn json_resp(status: StatusCode, body: &Value) -> Resp {
    raw_resp(status, JSON, body.to_string().into())
}

fn error(status: StatusCode, error: &str, detail: impl Into<String>) -> Resp {
    json_resp(status, &json!({"error": error, "detail": detail.into()}))
}

fn invalid_session(sid: &str) -> Resp {
    error(
        StatusCode::NOT_FOUND,
        "invalid session",
        format!("session {sid} does not exist or has expired"),
    )
}

/// The `session_backend` example: checks `opts` (exits with a usage error
/// if the fault rates add up to more than 1), listens on `opts.listen`,
/// prints `session_backend listening on http://ADDR` to stdout and serves
/// until Ctrl-C.
pub async fn run(opts: Options) -> ExitCode {
    if opts.fail_rate + opts.store_then_drop_rate + opts.reset_rate > 1.0 {
        let msg = "--fail-rate + --store-then-drop-rate + --reset-rate must not exceed 1";
        Options::command()
            .error(clap::error::ErrorKind::ValueValidation, msg)
            .exit();
    }
    let listener = match TcpListener::bind(opts.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("session_backend: cannot listen on {}: {e}", opts.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(opts.listen);
    let mut out = std::io::stdout().lock();
    if writeln!(out, "session_backend listening on http://{addr}")
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(out);
    eprintln!(
        "session_backend: ttl {:?}, latency {:?}, fail {}, store-then-drop {}, reset {}, max faults {:?}, seed {:?}",
        opts.session_ttl,
        opts.latency,
        opts.fail_rate,
        opts.store_then_drop_rate,
        opts.reset_rate,
        opts.max_faults,
        opts.seed
    );
    let shutdown = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await; // no signal handler: run until killed
        }
    };
    Backend::new(&opts).serve(listener, shutdown).await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "s",
            "5",
            "1.5s",
            "-1s",
            "10 s",
            "3d",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("0.25"), Ok(0.25));
        assert_eq!(parse_rate("1"), Ok(1.0));
        for bad in ["-0.1", "1.5", "NaN", "x"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} should not parse");
        }
    }

    fn draws(opts: &Options, n: usize) -> Vec<Option<Fault>> {
        let faults = Faults::new(opts);
        (0..n).map(|_| faults.next()).collect()
    }

    #[test]
    fn faults_are_reproducible_with_a_seed() {
        let opts = Options {
            seed: Some(7),
            fail_rate: 0.2,
            store_then_drop_rate: 0.2,
            reset_rate: 0.2,
            ..Options::default()
        };
        let a = draws(&opts, 1000);
        assert_eq!(a, draws(&opts, 1000));
        for kind in [
            None,
            Some(Fault::Fail),
            Some(Fault::StoreThenDrop),
            Some(Fault::Reset),
        ] {
            let n = a.iter().filter(|f| **f == kind).count();
            assert!((120..=480).contains(&n), "{kind:?} drawn {n} times");
        }
    }

    #[test]
    fn zero_and_full_rates() {
        let none = Options {
            seed: Some(1),
            ..Options::default()
        };
        assert!(draws(&none, 200).iter().all(Option::is_none));
        let all = Options {
            seed: Some(1),
            store_then_drop_rate: 1.0,
            ..Options::default()
        };
        assert!(
            draws(&all, 200)
                .iter()
                .all(|f| *f == Some(Fault::StoreThenDrop))
        );
    }

    #[test]
    fn max_faults_stops_injecting() {
        let first_only = Options {
            store_then_drop_rate: 1.0,
            max_faults: Some(1),
            ..Options::default()
        };
        let d = draws(&first_only, 50);
        assert_eq!(d.first(), Some(&Some(Fault::StoreThenDrop)));
        assert!(d.iter().skip(1).all(Option::is_none));
        let none = Options {
            fail_rate: 1.0,
            max_faults: Some(0),
            ..Options::default()
        };
        assert!(draws(&none, 50).iter().all(Option::is_none));
    }
}
