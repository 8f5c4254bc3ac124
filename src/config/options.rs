//! Every option, declared once: its variable (the flag is the same name in
//! kebab case: `IDEMPROXY_CONNECT_TIMEOUT` is `--connect-timeout`), the kind
//! of its value (which names the value in `--help`, parses it and stands in
//! for a bad one), its default, its help line, and what an error may show of
//! a bad value. `--help`, `idemproxy --env-reference`, the unknown-variable
//! check and every error message derive from this table;
//! [`Config::from_args`](super::Config::from_args) takes each value from it
//! and [`Config::render`](super::Config::render) prints each line under its
//! name.
//!
//! Adding an option: one line here, its use in `from_args` (and its line in
//! `render`), and its tests (a bad value in `tests/cli.rs`).
//!
//! ```
//! use idemproxy::config::options::{self, Describe};
//! assert_eq!(options::CONNECT_TIMEOUT.name, "IDEMPROXY_CONNECT_TIMEOUT");
//! assert_eq!(options::CONNECT_TIMEOUT.flag(), "connect-timeout");
//! assert_eq!(options::CONNECT_TIMEOUT.value_name(), "DURATION");
//! assert_eq!(options::CONNECT_TIMEOUT.default, Some("3s"));
//! assert!(options::ALL.iter().any(|o| o.name() == "IDEMPROXY_ROUTES"));
//! ```

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use super::MAX_COUNT;
use super::parse::{parse_bool, redact_header_values, redact_userinfo};
use crate::units::{self, DURATION_EXPECTED, SIZE_EXPECTED};

/// The prefix of every variable.
pub const PREFIX: &str = "IDEMPROXY_";

/// One option: see the [module](self) documentation.
#[derive(Debug, Clone, Copy)]
pub struct Opt<K> {
    /// The variable, e.g. `IDEMPROXY_CONNECT_TIMEOUT`.
    pub name: &'static str,
    /// What the value is: names it, parses it.
    pub kind: K,
    /// The default, as text; `None`: unset unless given.
    pub default: Option<&'static str>,
    /// The line `--help` shows.
    pub help: &'static str,
    /// What an error may show of a bad value.
    pub redact: Redact,
}

/// What an error may show of a bad value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redact {
    /// The value as given.
    Nothing,
    /// A URL without its user information (`user:password@`).
    UserInfo,
    /// Header templates with the names only (values may be credentials).
    HeaderValues,
}

impl Redact {
    /// What an error shows of `value`.
    pub fn apply(self, value: &str) -> String {
        match self {
            Redact::Nothing => value.to_owned(),
            Redact::UserInfo => redact_userinfo(value),
            Redact::HeaderValues => redact_header_values(value),
        }
    }
}

/// The kind of an option's value.
pub trait Kind {
    /// The parsed value.
    type Value;
    /// The value's name in `--help` (`DURATION`, `N`, ...).
    fn value_name(&self) -> &'static str;
    /// Parses the text, or says what is expected.
    fn parse(&self, text: &str) -> Result<Self::Value, String>;
    /// What stands in for a bad value, so that checking goes on and reports
    /// every bad value at once.
    fn fallback(&self) -> Self::Value;
}

/// A duration, zero included (`250ms`, `10s`, `1h30m`, at most a year).
#[derive(Debug, Clone, Copy)]
pub struct AnyDuration;

impl Kind for AnyDuration {
    type Value = Duration;
    fn value_name(&self) -> &'static str {
        "DURATION"
    }
    fn parse(&self, text: &str) -> Result<Duration, String> {
        units::parse_duration(text).map_err(str::to_owned)
    }
    fn fallback(&self) -> Duration {
        Duration::ZERO
    }
}

/// A duration of more than zero.
#[derive(Debug, Clone, Copy)]
pub struct PositiveDuration;

impl Kind for PositiveDuration {
    type Value = Duration;
    fn value_name(&self) -> &'static str {
        "DURATION"
    }
    fn parse(&self, text: &str) -> Result<Duration, String> {
        match units::parse_duration(text) {
            Ok(d) if d > Duration::ZERO => Ok(d),
            Ok(_) => Err(format!("more than zero: {DURATION_EXPECTED}")),
            Err(e) => Err(e.to_owned()),
        }
    }
    fn fallback(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// A size in bytes (`512`, `64KiB`, `1MiB`), at least `min`.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// The smallest size accepted.
    pub min: u64,
}

impl Kind for Size {
    type Value = usize;
    fn value_name(&self) -> &'static str {
        "SIZE"
    }
    fn parse(&self, text: &str) -> Result<usize, String> {
        match units::parse_size(text) {
            Ok(n) if n < self.min => Err(format!(
                "{SIZE_EXPECTED}, at least {}",
                units::format_size(self.min)
            )),
            Ok(n) => usize::try_from(n).map_err(|_| SIZE_EXPECTED.to_owned()),
            Err(e) => Err(e.to_owned()),
        }
    }
    fn fallback(&self) -> usize {
        0
    }
}

/// A whole number in `min..=max`.
#[derive(Debug, Clone, Copy)]
pub struct Count {
    /// The smallest number accepted.
    pub min: usize,
    /// The largest number accepted.
    pub max: usize,
}

impl Kind for Count {
    type Value = usize;
    fn value_name(&self) -> &'static str {
        "N"
    }
    fn parse(&self, text: &str) -> Result<usize, String> {
        match text.trim().parse::<usize>() {
            Ok(n) if (self.min..=self.max).contains(&n) => Ok(n),
            _ => Err(format!("a whole number from {} to {}", self.min, self.max)),
        }
    }
    fn fallback(&self) -> usize {
        self.min
    }
}

/// `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
#[derive(Debug, Clone, Copy)]
pub struct Bool;

impl Kind for Bool {
    type Value = bool;
    fn value_name(&self) -> &'static str {
        "BOOL"
    }
    fn parse(&self, text: &str) -> Result<bool, String> {
        parse_bool(text).map_err(str::to_owned)
    }
    fn fallback(&self) -> bool {
        false
    }
}

/// Text that its use parses (a URL, an address, a list, the route table...).
#[derive(Debug, Clone, Copy)]
pub struct Text {
    /// The value's name in `--help` (`URL`, `ADDR`, `LIST`, ...).
    pub value: &'static str,
}

impl Kind for Text {
    type Value = String;
    fn value_name(&self) -> &'static str {
        self.value
    }
    fn parse(&self, text: &str) -> Result<String, String> {
        Ok(text.to_owned())
    }
    fn fallback(&self) -> String {
        String::new()
    }
}

/// What `--help` shows of an option, whatever its kind.
pub trait Describe: Sync {
    /// The variable.
    fn name(&self) -> &'static str;
    /// The flag, without its dashes: the variable's name in kebab case.
    fn flag(&self) -> &'static str;
    /// The value's name.
    fn value_name(&self) -> &'static str;
    /// The default, as text.
    fn default(&self) -> Option<&'static str>;
    /// The help line.
    fn help(&self) -> &'static str;
}

impl<K: Kind + Sync> Describe for Opt<K> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn flag(&self) -> &'static str {
        flag_of(self.name)
    }
    fn value_name(&self) -> &'static str {
        self.kind.value_name()
    }
    fn default(&self) -> Option<&'static str> {
        self.default
    }
    fn help(&self) -> &'static str {
        self.help
    }
}

/// `IDEMPROXY_CONNECT_TIMEOUT` -> `connect-timeout`, made once per name
/// (clap keeps flags as `&'static str`).
fn flag_of(name: &'static str) -> &'static str {
    static FLAGS: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    let kebab = |name: &str| {
        name.trim_start_matches(PREFIX)
            .to_ascii_lowercase()
            .replace('_', "-")
    };
    FLAGS
        .get_or_init(|| ALL.iter().map(|o| (o.name(), kebab(o.name()))).collect())
        .get(name)
        .map_or("", String::as_str)
}

/// Declares every option as a `const` of type `Opt<Kind>` (its help line is
/// its doc) and [`ALL`], in this order.
macro_rules! options {
    ($(
        $id:ident: $kind:ident $({ $($field:ident: $value:expr),* })? $(= $default:expr)?,
            $help:literal $(, redact $redact:ident)?;
    )*) => {
        $(
            #[doc = $help]
            pub const $id: Opt<$kind> = Opt {
                name: concat!("IDEMPROXY_", stringify!($id)),
                kind: $kind $({ $($field: $value),* })?,
                default: options!(@default $($default)?),
                help: $help,
                redact: options!(@redact $($redact)?),
            };
        )*
        /// Every option, in the order `--help` shows them.
        pub const ALL: &[&dyn Describe] = &[$(&$id),*];
    };
    (@default) => { None };
    (@default $default:expr) => { Some($default) };
    (@redact) => { Redact::Nothing };
    (@redact $redact:ident) => { Redact::$redact };
}

options! {
    // --- Listeners, the upstream, connections ----------------------------------
    UPSTREAM: Text { value: "URL" },
        "The session backend to forward to: http://host:port or https://host:port (no path)", redact UserInfo;
    LISTEN: Text { value: "ADDR" } = super::DEFAULT_LISTEN,
        "Address the client connects to (HTTP/1.1 and h2c)";
    ADMIN_LISTEN: Text { value: "ADDR" } = super::DEFAULT_ADMIN_LISTEN,
        "Address of the admin listener: /healthz, /readyz, /metrics, /sessions";
    ADMIN_CONTROL_LISTEN: Text { value: "ADDR" } = "",
        "Loopback address (e.g. 127.0.0.1:7482) of the admin control listener: the admin endpoints plus the ones that change state (DELETE /sessions/{digest}); empty: off";
    ADMIN_TOKEN_FILE: Text { value: "PATH" },
        "File holding a bearer token (its content, trimmed) that allows changes (DELETE /sessions/{digest}) on the admin listener too, sent as `Authorization: Bearer <token>`; read once at start-up";
    CONNECT_TIMEOUT: PositiveDuration = "3s",
        "Time allowed to open a TCP connection to the upstream";
    REQUEST_TIMEOUT: PositiveDuration = "30s",
        "Overall deadline of one request until response headers arrive, retries included";
    UPSTREAM_IDLE_TIMEOUT: PositiveDuration = "4s",
        "Idle pooled upstream connections are closed after this; keep it below the upstream's keep-alive timeout (Node.js: 5s, nginx: 75s)";
    UPSTREAM_MAX_IDLE: Count { min: 0, max: MAX_COUNT } = "128",
        "Idle pooled connections kept to the upstream";
    UPSTREAM_CA_FILE: Text { value: "PATH" },
        "Extra PEM CA bundle trusted for an https upstream (besides the system roots)";
    UPSTREAM_CLIENT_CERT: Text { value: "PATH" },
        "PEM client certificate chain for mTLS to the upstream";
    UPSTREAM_CLIENT_KEY: Text { value: "PATH" },
        "PEM private key of the client certificate";
    UPSTREAM_CA_ONLY: Bool = "off",
        "Trust only the CA file, not the system roots: on|off";
    PRESERVE_HOST: Bool = "off",
        "Send the client's Host header upstream instead of the upstream's authority: on|off";
    FORWARDED_HEADERS: Bool = "on",
        "Add X-Forwarded-For, X-Forwarded-Proto and X-Forwarded-Host: on|off";
    // hyper cannot read a request head in a buffer smaller than 8 KiB.
    MAX_HEADER_SIZE: Size { min: 8192 } = "64KiB",
        "Largest request head (request line and headers) accepted; larger gets 431";
    HEADER_READ_TIMEOUT: PositiveDuration = "10s",
        "A client must send its complete request head within this time";
    MAX_CONNECTIONS: Count { min: 1, max: MAX_COUNT } = "4096",
        "Client connections served at once; more are answered 503 and closed";
    DRAIN_TIMEOUT: AnyDuration = "20s",
        "On SIGTERM, time given to in-flight requests before the process exits";
    WORKERS: Count { min: 0, max: super::MAX_WORKERS } = "0",
        "Runtime worker threads; 0 means one per available core";
    LOG: Text { value: "FILTER" },
        "Log filter, e.g. info or idemproxy=debug (falls back to RUST_LOG)";
    LOG_FORMAT: Text { value: "FORMAT" } = "auto",
        "Log format: json, text, or auto (json unless stdout is a terminal)";

    // --- Retries ---------------------------------------------------------------
    RETRY_ON: Text { value: "LIST" } = "5xx,reset,connect-failure,timeout",
        "Retry classes (Envoy's words): 5xx, gateway-error, reset, reset-before-request, refused-stream, connect-failure, timeout, retriable-status-codes; a failure after which the upstream may have processed the request is retried only when a replay is safe (see README)";
    RETRY_STATUSES: Text { value: "CODES" } = "500,502,503,504",
        "Statuses that the `5xx` class retries";
    RETRIABLE_STATUS_CODES: Text { value: "CODES" } = "429",
        "Extra statuses retried by the `retriable-status-codes` class (e.g. 429)";
    MAX_ATTEMPTS: Count { min: 1, max: super::MAX_ATTEMPTS } = "5",
        "Attempts per request, the first included (1 turns retries off)";
    TRY_TIMEOUT: AnyDuration = "0",
        "Per-attempt timeout to response headers (retried as `timeout`); 0 means none";
    BACKOFF_BASE: PositiveDuration = "25ms",
        "First retry's backoff ceiling; doubles per retry, with full jitter";
    BACKOFF_MAX: PositiveDuration = "2s",
        "Largest backoff between two attempts";
    RETRY_BUDGET_RATIO: Text { value: "RATIO" } = "0.2",
        "Retries allowed as a fraction of requests over a 10 s window";
    RETRY_BUDGET_MIN_PER_SEC: Count { min: 0, max: MAX_COUNT } = "10",
        "Retries always allowed per second, on top of the ratio";
    RETRY_UNSAFE_REQUESTS: Bool = "off",
        "Replay non-idempotent requests (POST, PATCH) even after the upstream may have processed them: a lost answer can then run a call twice. on|off";
    RETRY_METHODS: Text { value: "METHODS" } = "",
        "Only these methods are retried (comma list); empty means all (subject to the replay rules)";
    MAX_REPLAY_BODY: Size { min: 0 } = "1MiB",
        "Request bodies up to this size are kept for replay; larger ones are not retried once sent";
    MAX_REPLAY_MEMORY: Size { min: 0 } = "64MiB",
        "Total memory for replay copies; past it, new requests stream without retry";

    // --- Routes and idempotency ------------------------------------------------
    PROFILE: Text { value: "NAMES" } = "",
        "Backend profiles (comma list) that expand into routes and options: mcp, etcd, couchdb, azure-table, azure-blob-lease, session-api. Your own routes come first and your options win; --check-config shows the expansion";
    ROUTES: Text { value: "TABLE" } = "",
        "The route table: one `METHOD PATH-TEMPLATE [option=value ...]` per line (see README)";
    IDEMPOTENCY_HEADER: Text { value: "NAME" } = "Idempotency-Key",
        "Header that carries the idempotency key";
    IDEMPOTENCY_METHODS: Text { value: "METHODS" } = "POST,PATCH",
        "Methods that get an idempotency key (routes may say otherwise)";
    IDEMPOTENCY_KEY_MODE: Text { value: "MODE" } = "random",
        "How a missing key is made: random (a UUID) or fingerprint (digest of session, method, path, body)";
    IDEMPOTENCY_TTL: AnyDuration = "10m",
        "How long a completed answer to a client-supplied key is replayed from the local cache (0 turns the cache off)";
    IDEMPOTENCY_CACHE_ENTRIES: Count { min: 1, max: MAX_COUNT } = "10000",
        "Answers kept in the local idempotency cache at most";
    IDEMPOTENCY_CACHE_BYTES: Size { min: 0 } = "64MiB",
        "Bytes of answers kept in the local idempotency cache at most";
    IDEMPOTENCY_SCOPE_HEADERS: Text { value: "NAMES" } = "authorization,cookie",
        "Request headers whose values scope a client's idempotency key to that client (plus the session's own header): an answer is never replayed to, coalesced with or refused for a request with other values";

    // --- Sessions and heartbeats -----------------------------------------------
    HEARTBEAT: Text { value: "REQUEST" } = "",
        "Heartbeat request `METHOD TEMPLATE`, e.g. `POST /v1/sessions/{session}/heartbeat`; empty: no heartbeats";
    HEARTBEAT_BODY: Text { value: "TEMPLATE" } = "",
        "JSON body template of a heartbeat, e.g. {\"ID\":\"{session}\"}";
    HEARTBEAT_INTERVAL: PositiveDuration = "30s",
        "Time from a session's last renewal (a heartbeat answered alive, or a renewing request) to its next heartbeat (±10% jitter)";
    REQUESTS_RENEW: Bool = "off",
        "Every client request of a session answered 2xx renews it (backends that extend a session on any request, such as MCP servers): on|off. Off: only heartbeats and `renews` routes do";
    SESSION_IDLE_TIMEOUT: PositiveDuration = "30m",
        "Heartbeats stop after this long without client traffic";
    HEARTBEAT_HEADERS: Text { value: "NAMES" } = "authorization,cookie",
        "Headers of the session's latest request copied onto its heartbeats (plus its own session header)";
    HEARTBEAT_SET_HEADERS: Text { value: "HEADERS" } = "",
        "Extra heartbeat headers from templates, `;`-separated: `x-ms-lease-action: renew; x-ms-lease-id: {session}`", redact HeaderValues;
    HEARTBEAT_ALIVE_FIELD: Text { value: "FIELD" } = "",
        "JSON field a live heartbeat answer must contain (e.g. result.TTL); a 2xx without it means gone";
    HEARTBEAT_MAX_FAILURES: Count { min: 1, max: MAX_COUNT } = "3",
        "A session is dropped after this many heartbeat failures in a row";
    HEARTBEAT_MAX_PER_SEC: Count { min: 1, max: MAX_COUNT } = "500",
        "Heartbeats sent per second at most, across all sessions";
    HEARTBEAT_TIMEOUT: PositiveDuration = "5s",
        "Deadline of one heartbeat request";
    MAX_SESSIONS: Count { min: 1, max: MAX_COUNT } = "10000",
        "Sessions tracked at most; the oldest idle one is evicted first";
    MAX_SESSION_BYTES: Size { min: 64 * 1024 } = "64MiB",
        "Bytes the session table holds at most (ids, copied credentials, heartbeats, fixed costs); the oldest idle session is evicted first. A session id over 1 KiB or credentials over 16 KiB are not tracked";
    SESSION_SOURCES: Text { value: "LIST" } = "",
        "Session id sources tried on every request, e.g. header:Mcp-Session-Id,cookie:sid";
}
