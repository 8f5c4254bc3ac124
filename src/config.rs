//! Configuration: one typed struct, read from `IDEMPROXY_*` environment
//! variables or the matching `--flags`, validated completely at start-up.
//!
//! [`Args`] is what clap reads (every value as text, so that an error can name
//! the variable, the value and what is expected); [`Config::from_args`] turns
//! it into the typed [`Config`] and reports *every* bad value at once.
//!
//! ```
//! use clap::Parser;
//! use idemproxy::config::{Args, Config};
//! let args = Args::try_parse_from(["idemproxy", "--upstream", "http://127.0.0.1:8080"]).unwrap();
//! let config = Config::from_args(&args).unwrap();
//! assert_eq!(config.upstream.authority.as_str(), "127.0.0.1:8080");
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use http::Uri;
use http::uri::{Authority, Scheme};

use http::{HeaderName, Method, StatusCode};

use std::sync::Arc;

use crate::admin::{AdminToken, ControlConfig};
use crate::idempotency::{CacheConfig, KeyConfig, KeyMode};
use crate::retry::{RetryConfig, RetryOn};
use crate::routes::{
    FieldPath, HeartbeatTemplate, RouteTable, SessionSource, SessionSourceKind, Template,
};
use crate::sessions::{SessionConfig, SessionLayerConfig};
use crate::units::{self, DURATION_EXPECTED, SIZE_EXPECTED};

/// Default traffic listener: loopback, because the client lives in the same pod.
/// The port avoids Istio (150xx), Linkerd (41xx) and Dapr (3500, 50001).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";
/// Default admin listener: all interfaces, so the kubelet's probes reach it.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:7481";

/// The most runtime worker threads (`IDEMPROXY_WORKERS`): more could not
/// all be started.
pub const MAX_WORKERS: usize = 1024;
/// The most attempts of one request (`IDEMPROXY_MAX_ATTEMPTS`).
pub const MAX_ATTEMPTS: usize = 100;
/// The largest value of every other count (connections, idle connections,
/// sessions, cache entries, heartbeat failures, heartbeats and retries per
/// second). Durations are capped at [`units::MAX_DURATION`]. A larger value
/// is refused at start-up like any bad value, so that no accepted value can
/// overflow at run time.
pub const MAX_COUNT: usize = 1_000_000;

/// Command-line flags and environment variables, as text. See [`Config`] for meaning.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "idemproxy",
    version,
    about = "Sidecar reverse proxy: idempotent writes, safe retries, verified 409 recovery and session heartbeats for an unchanged client.",
    long_about = None,
    max_term_width = 100
)]
pub struct Args {
    /// The session backend to forward to: http://host:port or https://host:port (no path).
    #[arg(long, env = "IDEMPROXY_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Address the client connects to (HTTP/1.1 and h2c).
    #[arg(long, env = "IDEMPROXY_LISTEN", default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: String,

    /// Address of the admin listener: /healthz, /readyz, /metrics, /sessions.
    #[arg(long, env = "IDEMPROXY_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN, value_name = "ADDR")]
    pub admin_listen: String,

    /// Loopback address (e.g. 127.0.0.1:7482) of the admin control listener: the admin endpoints plus the ones that change state (DELETE /sessions/{digest}); empty: off.
    #[arg(
        long,
        env = "IDEMPROXY_ADMIN_CONTROL_LISTEN",
        default_value = "",
        value_name = "ADDR"
    )]
    pub admin_control_listen: String,

    /// File holding a bearer token (its content, trimmed) that allows changes (DELETE /sessions/{digest}) on the admin listener too, sent as `Authorization: Bearer <token>`; read once at start-up.
    #[arg(long, env = "IDEMPROXY_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<String>,

    /// Time allowed to open a TCP connection to the upstream.
    #[arg(
        long,
        env = "IDEMPROXY_CONNECT_TIMEOUT",
        default_value = "3s",
        value_name = "DURATION"
    )]
    pub connect_timeout: String,

    /// Overall deadline of one request until response headers arrive, retries included.
    #[arg(
        long,
        env = "IDEMPROXY_REQUEST_TIMEOUT",
        default_value = "30s",
        value_name = "DURATION"
    )]
    pub request_timeout: String,

    /// Idle pooled upstream connections are closed after this; keep it below the
    /// upstream's keep-alive timeout (Node.js: 5s, nginx: 75s).
    #[arg(
        long,
        env = "IDEMPROXY_UPSTREAM_IDLE_TIMEOUT",
        default_value = "4s",
        value_name = "DURATION"
    )]
    pub upstream_idle_timeout: String,

    /// Idle pooled connections kept to the upstream.
    #[arg(
        long,
        env = "IDEMPROXY_UPSTREAM_MAX_IDLE",
        default_value = "128",
        value_name = "N"
    )]
    pub upstream_max_idle: String,

    /// Extra PEM CA bundle trusted for an https upstream (besides the system roots).
    #[arg(long, env = "IDEMPROXY_UPSTREAM_CA_FILE", value_name = "PATH")]
    pub upstream_ca_file: Option<String>,

    /// PEM client certificate chain for mTLS to the upstream.
    #[arg(long, env = "IDEMPROXY_UPSTREAM_CLIENT_CERT", value_name = "PATH")]
    pub upstream_client_cert: Option<String>,

    /// PEM private key of the client certificate.
    #[arg(long, env = "IDEMPROXY_UPSTREAM_CLIENT_KEY", value_name = "PATH")]
    pub upstream_client_key: Option<String>,

    /// Trust only the CA file, not the system roots: on|off.
    #[arg(
        long,
        env = "IDEMPROXY_UPSTREAM_CA_ONLY",
        default_value = "off",
        value_name = "BOOL"
    )]
    pub upstream_ca_only: String,

    /// Send the client's Host header upstream instead of the upstream's authority: on|off.
    #[arg(
        long,
        env = "IDEMPROXY_PRESERVE_HOST",
        default_value = "off",
        value_name = "BOOL"
    )]
    pub preserve_host: String,

    /// Add X-Forwarded-For, X-Forwarded-Proto and X-Forwarded-Host: on|off.
    #[arg(
        long,
        env = "IDEMPROXY_FORWARDED_HEADERS",
        default_value = "on",
        value_name = "BOOL"
    )]
    pub forwarded_headers: String,

    /// Largest request head (request line and headers) accepted; larger gets 431.
    #[arg(
        long,
        env = "IDEMPROXY_MAX_HEADER_SIZE",
        default_value = "64KiB",
        value_name = "SIZE"
    )]
    pub max_header_size: String,

    /// A client must send its complete request head within this time.
    #[arg(
        long,
        env = "IDEMPROXY_HEADER_READ_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION"
    )]
    pub header_read_timeout: String,

    /// Client connections served at once; more are answered 503 and closed.
    #[arg(
        long,
        env = "IDEMPROXY_MAX_CONNECTIONS",
        default_value = "4096",
        value_name = "N"
    )]
    pub max_connections: String,

    /// On SIGTERM, time given to in-flight requests before the process exits.
    #[arg(
        long,
        env = "IDEMPROXY_DRAIN_TIMEOUT",
        default_value = "20s",
        value_name = "DURATION"
    )]
    pub drain_timeout: String,

    /// Runtime worker threads; 0 means one per available core.
    #[arg(long, env = "IDEMPROXY_WORKERS", default_value = "0", value_name = "N")]
    pub workers: String,

    /// Log filter, e.g. info or idemproxy=debug (falls back to RUST_LOG).
    #[arg(long, env = "IDEMPROXY_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Log format: json, text, or auto (json unless stdout is a terminal).
    #[arg(
        long,
        env = "IDEMPROXY_LOG_FORMAT",
        default_value = "auto",
        value_name = "FORMAT"
    )]
    pub log_format: String,

    // --- Retries -------------------------------------------------------------
    /// Retry classes (Envoy's words): 5xx, gateway-error, reset, reset-before-request, refused-stream, connect-failure, timeout, retriable-status-codes; a failure after which the upstream may have processed the request is retried only when a replay is safe (see README).
    #[arg(
        long,
        env = "IDEMPROXY_RETRY_ON",
        default_value = "5xx,reset,connect-failure,timeout",
        value_name = "LIST"
    )]
    pub retry_on: String,

    /// Statuses that the `5xx` class retries.
    #[arg(
        long,
        env = "IDEMPROXY_RETRY_STATUSES",
        default_value = "500,502,503,504",
        value_name = "CODES"
    )]
    pub retry_statuses: String,

    /// Extra statuses retried by the `retriable-status-codes` class (e.g. 429).
    #[arg(
        long,
        env = "IDEMPROXY_RETRIABLE_STATUS_CODES",
        default_value = "429",
        value_name = "CODES"
    )]
    pub retriable_status_codes: String,

    /// Attempts per request, the first included (1 turns retries off).
    #[arg(
        long,
        env = "IDEMPROXY_MAX_ATTEMPTS",
        default_value = "5",
        value_name = "N"
    )]
    pub max_attempts: String,

    /// Per-attempt timeout to response headers (retried as `timeout`); 0 means none.
    #[arg(
        long,
        env = "IDEMPROXY_TRY_TIMEOUT",
        default_value = "0",
        value_name = "DURATION"
    )]
    pub try_timeout: String,

    /// First retry's backoff ceiling; doubles per retry, with full jitter.
    #[arg(
        long,
        env = "IDEMPROXY_BACKOFF_BASE",
        default_value = "25ms",
        value_name = "DURATION"
    )]
    pub backoff_base: String,

    /// Largest backoff between two attempts.
    #[arg(
        long,
        env = "IDEMPROXY_BACKOFF_MAX",
        default_value = "2s",
        value_name = "DURATION"
    )]
    pub backoff_max: String,

    /// Retries allowed as a fraction of requests over a 10 s window.
    #[arg(
        long,
        env = "IDEMPROXY_RETRY_BUDGET_RATIO",
        default_value = "0.2",
        value_name = "RATIO"
    )]
    pub retry_budget_ratio: String,

    /// Retries always allowed per second, on top of the ratio.
    #[arg(
        long,
        env = "IDEMPROXY_RETRY_BUDGET_MIN_PER_SEC",
        default_value = "10",
        value_name = "N"
    )]
    pub retry_budget_min_per_sec: String,

    /// Replay non-idempotent requests (POST, PATCH) even after the upstream may have processed them: a lost answer can then run a call twice. on|off.
    #[arg(
        long,
        env = "IDEMPROXY_RETRY_UNSAFE_REQUESTS",
        default_value = "off",
        value_name = "BOOL"
    )]
    pub retry_unsafe_requests: String,

    /// Only these methods are retried (comma list); empty means all (subject to the replay rules).
    #[arg(
        long,
        env = "IDEMPROXY_RETRY_METHODS",
        default_value = "",
        value_name = "METHODS"
    )]
    pub retry_methods: String,

    /// Request bodies up to this size are kept for replay; larger ones are not retried once sent.
    #[arg(
        long,
        env = "IDEMPROXY_MAX_REPLAY_BODY",
        default_value = "1MiB",
        value_name = "SIZE"
    )]
    pub max_replay_body: String,

    /// Total memory for replay copies; past it, new requests stream without retry.
    #[arg(
        long,
        env = "IDEMPROXY_MAX_REPLAY_MEMORY",
        default_value = "64MiB",
        value_name = "SIZE"
    )]
    pub max_replay_memory: String,

    // --- Routes and idempotency ----------------------------------------------
    /// The route table: one `METHOD PATH-TEMPLATE [option=value ...]` per line (see README).
    #[arg(
        long,
        env = "IDEMPROXY_ROUTES",
        default_value = "",
        value_name = "TABLE"
    )]
    pub routes: String,

    /// Header that carries the idempotency key.
    #[arg(
        long,
        env = "IDEMPROXY_IDEMPOTENCY_HEADER",
        default_value = "Idempotency-Key",
        value_name = "NAME"
    )]
    pub idempotency_header: String,

    /// Methods that get an idempotency key (routes may say otherwise).
    #[arg(
        long,
        env = "IDEMPROXY_IDEMPOTENCY_METHODS",
        default_value = "POST,PATCH",
        value_name = "METHODS"
    )]
    pub idempotency_methods: String,

    /// How a missing key is made: random (a UUID) or fingerprint (digest of session, method, path, body).
    #[arg(
        long,
        env = "IDEMPROXY_IDEMPOTENCY_KEY_MODE",
        default_value = "random",
        value_name = "MODE"
    )]
    pub idempotency_key_mode: String,

    /// How long a completed answer to a client-supplied key is replayed from the local cache (0 turns the cache off).
    #[arg(
        long,
        env = "IDEMPROXY_IDEMPOTENCY_TTL",
        default_value = "10m",
        value_name = "DURATION"
    )]
    pub idempotency_ttl: String,

    /// Answers kept in the local idempotency cache at most.
    #[arg(
        long,
        env = "IDEMPROXY_IDEMPOTENCY_CACHE_ENTRIES",
        default_value = "10000",
        value_name = "N"
    )]
    pub idempotency_cache_entries: String,

    /// Bytes of answers kept in the local idempotency cache at most.
    #[arg(
        long,
        env = "IDEMPROXY_IDEMPOTENCY_CACHE_BYTES",
        default_value = "64MiB",
        value_name = "SIZE"
    )]
    pub idempotency_cache_bytes: String,

    /// Request headers whose values scope a client's idempotency key to that client (plus the session's own header): an answer is never replayed to, coalesced with or refused for a request with other values.
    #[arg(
        long,
        env = "IDEMPROXY_IDEMPOTENCY_SCOPE_HEADERS",
        default_value = "authorization,cookie",
        value_name = "NAMES"
    )]
    pub idempotency_scope_headers: String,

    // --- Sessions and heartbeats ---------------------------------------------
    /// Heartbeat request `METHOD TEMPLATE`, e.g. `POST /v1/sessions/{session}/heartbeat`; empty: no heartbeats.
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT",
        default_value = "",
        value_name = "REQUEST"
    )]
    pub heartbeat: String,

    /// JSON body template of a heartbeat, e.g. {"ID":"{session}"}.
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_BODY",
        default_value = "",
        value_name = "TEMPLATE"
    )]
    pub heartbeat_body: String,

    /// Time from a session's last renewal (a heartbeat answered alive, or a renewing request) to its next heartbeat (±10% jitter).
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_INTERVAL",
        default_value = "30s",
        value_name = "DURATION"
    )]
    pub heartbeat_interval: String,

    /// Every client request of a session answered 2xx renews it (backends that extend a session on any request, such as MCP servers): on|off. Off: only heartbeats and `renews` routes do.
    #[arg(
        long,
        env = "IDEMPROXY_REQUESTS_RENEW",
        default_value = "off",
        value_name = "BOOL"
    )]
    pub requests_renew: String,

    /// Heartbeats stop after this long without client traffic.
    #[arg(
        long,
        env = "IDEMPROXY_SESSION_IDLE_TIMEOUT",
        default_value = "30m",
        value_name = "DURATION"
    )]
    pub session_idle_timeout: String,

    /// Headers of the session's latest request copied onto its heartbeats (plus its own session header).
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_HEADERS",
        default_value = "authorization,cookie",
        value_name = "NAMES"
    )]
    pub heartbeat_headers: String,

    /// Extra heartbeat headers from templates, `;`-separated: `x-lease-action: renew; x-lease-id: {session}`.
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_SET_HEADERS",
        default_value = "",
        value_name = "HEADERS"
    )]
    pub heartbeat_set_headers: String,

    /// JSON field a live heartbeat answer must contain (e.g. result.TTL); a 2xx without it means gone.
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_ALIVE_FIELD",
        default_value = "",
        value_name = "FIELD"
    )]
    pub heartbeat_alive_field: String,

    /// A session is dropped after this many heartbeat failures in a row.
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_MAX_FAILURES",
        default_value = "3",
        value_name = "N"
    )]
    pub heartbeat_max_failures: String,

    /// Heartbeats sent per second at most, across all sessions.
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_MAX_PER_SEC",
        default_value = "500",
        value_name = "N"
    )]
    pub heartbeat_max_per_sec: String,

    /// Deadline of one heartbeat request.
    #[arg(
        long,
        env = "IDEMPROXY_HEARTBEAT_TIMEOUT",
        default_value = "5s",
        value_name = "DURATION"
    )]
    pub heartbeat_timeout: String,

    /// Sessions tracked at most; the oldest idle one is evicted first.
    #[arg(
        long,
        env = "IDEMPROXY_MAX_SESSIONS",
        default_value = "10000",
        value_name = "N"
    )]
    pub max_sessions: String,

    /// Bytes the session table holds at most (ids, copied credentials, heartbeats, fixed costs); the oldest idle session is evicted first. A session id over 1 KiB or credentials over 16 KiB are not tracked.
    #[arg(
        long,
        env = "IDEMPROXY_MAX_SESSION_BYTES",
        default_value = "64MiB",
        value_name = "SIZE"
    )]
    pub max_session_bytes: String,

    /// Session id sources tried on every request, e.g. header:Mcp-Session-Id,cookie:sid.
    #[arg(
        long,
        env = "IDEMPROXY_SESSION_SOURCES",
        default_value = "",
        value_name = "LIST"
    )]
    pub session_sources: String,

    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The upstream every request is forwarded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port` as configured (the port may be implicit).
    pub authority: Authority,
}

impl Upstream {
    /// Whether `authority` (from an absolute-form request) names this upstream.
    pub fn is_same_authority(&self, authority: &Authority) -> bool {
        let default_port = if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        self.authority.host().eq_ignore_ascii_case(authority.host())
            && self.authority.port_u16().unwrap_or(default_port)
                == authority.port_u16().unwrap_or(default_port)
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// TLS settings for an https upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// Extra CA bundle (PEM).
    pub ca_file: Option<PathBuf>,
    /// Trust only `ca_file`.
    pub ca_only: bool,
    /// Client certificate chain and key (PEM) for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (containers).
    Json,
    /// Human-readable text (terminals).
    Text,
}

/// The validated configuration of one idemproxy process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where requests go.
    pub upstream: Upstream,
    /// Traffic listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Who may change state: the loopback control listener and the token.
    pub admin_control: ControlConfig,
    /// TCP connect timeout to the upstream.
    pub connect_timeout: Duration,
    /// Overall deadline to response headers.
    pub request_timeout: Duration,
    /// Idle timeout of pooled upstream connections.
    pub upstream_idle_timeout: Duration,
    /// Idle pooled connections kept.
    pub upstream_max_idle: usize,
    /// TLS to the upstream.
    pub tls: TlsConfig,
    /// Keep the client's Host.
    pub preserve_host: bool,
    /// Add X-Forwarded-* headers.
    pub forwarded_headers: bool,
    /// Largest request head.
    pub max_header_size: usize,
    /// Deadline for a client's request head.
    pub header_read_timeout: Duration,
    /// Connection limit.
    pub max_connections: usize,
    /// Drain window on shutdown.
    pub drain_timeout: Duration,
    /// Runtime worker threads (resolved: never 0).
    pub workers: usize,
    /// Log filter directive.
    pub log: Option<String>,
    /// Log format (resolved from `auto`).
    pub log_format: LogFormat,
    /// Retries (the deadline is `request_timeout`).
    pub retry: RetryConfig,
    /// Idempotency keys.
    pub keys: KeyConfig,
    /// The local cache for client-supplied keys (`None`: off).
    pub idempotency_cache: Option<CacheConfig>,
    /// The route table.
    pub routes: Arc<RouteTable>,
    /// Session sources tried on every request.
    pub session_sources: Vec<SessionSource>,
    /// Session tracking and the heartbeat scheduler.
    pub sessions: SessionConfig,
    /// How sessions are learned and heartbeats built.
    pub session_layer: SessionLayerConfig,
}

/// One rejected option: which variable, what value, what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The environment variable, e.g. `IDEMPROXY_CONNECT_TIMEOUT`.
    pub variable: &'static str,
    /// The value given (redacted for secrets).
    pub value: String,
    /// What is expected instead.
    pub expected: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = self
            .variable
            .trim_start_matches("IDEMPROXY_")
            .to_ascii_lowercase()
            .replace('_', "-");
        // Some parsers already phrase their message as "expected ..." or name the bad word.
        let lead = if self.expected.contains("expected") {
            ""
        } else {
            "expected "
        };
        write!(
            f,
            "invalid {} (--{flag}) {:?}: {lead}{}",
            self.variable, self.value, self.expected
        )
    }
}

/// Every bad option found while validating; one line each when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "idemproxy: {issue}")?;
        }
        Ok(())
    }
}

/// Collects values and issues while validating [`Args`].
#[derive(Default)]
pub(crate) struct Checker {
    issues: Vec<ConfigIssue>,
}

impl Checker {
    pub(crate) fn issue(
        &mut self,
        variable: &'static str,
        value: &str,
        expected: impl Into<String>,
    ) {
        self.issues.push(ConfigIssue {
            variable,
            value: value.to_owned(),
            expected: expected.into(),
        });
    }

    /// Parses `value` with `parse`, recording an issue (and returning `fallback`) on failure.
    pub(crate) fn parse<T, E: fmt::Display>(
        &mut self,
        variable: &'static str,
        value: &str,
        fallback: T,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> T {
        match parse(value) {
            Ok(v) => v,
            Err(e) => {
                self.issue(variable, value, e.to_string());
                fallback
            }
        }
    }

    pub(crate) fn duration(&mut self, variable: &'static str, value: &str) -> Duration {
        self.parse(variable, value, Duration::ZERO, units::parse_duration)
    }

    /// A duration that must be more than zero.
    pub(crate) fn positive_duration(&mut self, variable: &'static str, value: &str) -> Duration {
        self.parse(
            variable,
            value,
            Duration::from_secs(1),
            |v| match units::parse_duration(v) {
                Ok(d) if d > Duration::ZERO => Ok(d),
                Ok(_) => Err(format!("more than zero: {DURATION_EXPECTED}")),
                Err(e) => Err(e.to_owned()),
            },
        )
    }

    pub(crate) fn size(&mut self, variable: &'static str, value: &str, min: u64) -> usize {
        self.parse(variable, value, 0, |v| match units::parse_size(v) {
            Ok(n) if n < min => Err(format!(
                "{SIZE_EXPECTED}, at least {}",
                units::format_size(min)
            )),
            Ok(n) => usize::try_from(n).map_err(|_| SIZE_EXPECTED.to_owned()),
            Err(e) => Err(e.to_owned()),
        })
    }

    /// A whole number in `min..=max`.
    pub(crate) fn count(
        &mut self,
        variable: &'static str,
        value: &str,
        min: usize,
        max: usize,
    ) -> usize {
        self.parse(variable, value, min, |v| match v.trim().parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!("a whole number from {min} to {max}")),
        })
    }

    pub(crate) fn boolean(&mut self, variable: &'static str, value: &str) -> bool {
        self.parse(variable, value, false, parse_bool)
    }

    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        if self.issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.issues))
        }
    }
}

/// Reads `on|off`, `true|false`, `yes|no`, `1|0`.
pub fn parse_bool(text: &str) -> Result<bool, &'static str> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err("on or off (also true/false, yes/no, 1/0)"),
    }
}

fn parse_upstream(text: &str) -> Result<Upstream, &'static str> {
    const EXPECTED: &str =
        "an absolute URL with scheme http or https and no path, e.g. http://127.0.0.1:8080";
    let uri: Uri = text.trim().parse().map_err(|_| EXPECTED)?;
    let scheme = uri.scheme().cloned().ok_or(EXPECTED)?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(EXPECTED);
    }
    let authority = uri.authority().cloned().ok_or(EXPECTED)?;
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(EXPECTED);
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(EXPECTED);
    }
    Ok(Upstream { scheme, authority })
}

fn parse_addr(text: &str) -> Result<SocketAddr, &'static str> {
    text.trim()
        .parse()
        .map_err(|_| "a socket address such as 127.0.0.1:7480 or [::1]:7480")
}

/// A loopback socket address: only processes of the pod reach it.
fn parse_loopback_addr(text: &str) -> Result<SocketAddr, String> {
    let addr = parse_addr(text).map_err(str::to_owned)?;
    if addr.ip().to_canonical().is_loopback() {
        Ok(addr)
    } else {
        Err(format!(
            "a loopback address such as 127.0.0.1:7482 or [::1]:7482, because this listener serves the admin endpoints that change state and {} is reachable from outside the pod; to allow changes on the admin listener instead, set IDEMPROXY_ADMIN_TOKEN_FILE",
            addr.ip()
        ))
    }
}

/// Whether listeners on `a` and `b` would compete for one port.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `IDEMPROXY_ADMIN_CONTROL_LISTEN` and `IDEMPROXY_ADMIN_TOKEN_FILE`; both
/// off when empty. `others` are the traffic and admin listeners.
fn admin_control_config(
    c: &mut Checker,
    args: &Args,
    others: [Option<SocketAddr>; 2],
) -> ControlConfig {
    const VAR: &str = "IDEMPROXY_ADMIN_CONTROL_LISTEN";
    let text = args.admin_control_listen.as_str();
    let listen = if text.trim().is_empty() {
        None
    } else {
        c.parse(VAR, text, None, |v| parse_loopback_addr(v).map(Some))
    };
    let taken = listen.and_then(|l| others.into_iter().flatten().find(|o| same_port(l, *o)));
    if let Some(other) = taken {
        c.issue(
            VAR,
            text,
            format!(
                "a loopback address on a port that no other listener of idemproxy uses ({other} is)"
            ),
        );
    }
    let token = args
        .admin_token_file
        .as_deref()
        .filter(|p| !p.trim().is_empty())
        .and_then(|p| {
            c.parse("IDEMPROXY_ADMIN_TOKEN_FILE", p, None, |v| {
                AdminToken::read(v).map(Some)
            })
        });
    ControlConfig { listen, token }
}

fn existing_file(text: &str) -> Result<PathBuf, &'static str> {
    let path = PathBuf::from(text);
    if path.is_file() {
        Ok(path)
    } else {
        Err("the path of a readable file")
    }
}

/// A PEM file holding at least one certificate (checked here so that a bad
/// file is a configuration error naming its variable, not a start-up failure).
fn pem_certificates(text: &str) -> Result<PathBuf, &'static str> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let path = existing_file(text)?;
    match CertificateDer::pem_file_iter(&path).map(|certs| certs.collect::<Result<Vec<_>, _>>()) {
        Ok(Ok(certs)) if !certs.is_empty() => Ok(path),
        _ => Err("the path of a PEM file holding at least one certificate"),
    }
}

/// A PEM file holding a private key.
fn pem_private_key(text: &str) -> Result<PathBuf, &'static str> {
    use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
    let path = existing_file(text)?;
    PrivateKeyDer::from_pem_file(&path)
        .map(|_| path)
        .map_err(|_| "the path of a PEM file holding a private key")
}

fn parse_statuses(text: &str) -> Result<Vec<StatusCode>, &'static str> {
    const EXPECTED: &str =
        "a comma-separated list of HTTP status codes (100-599), e.g. 500,502,503";
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u16>()
                .ok()
                .filter(|n| (100..=599).contains(n))
                .and_then(|n| StatusCode::from_u16(n).ok())
                .ok_or(EXPECTED)
        })
        .collect()
}

fn parse_methods(text: &str) -> Result<Vec<Method>, &'static str> {
    const EXPECTED: &str = "a comma-separated list of HTTP methods, e.g. POST,PATCH";
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| Method::from_bytes(t.to_ascii_uppercase().as_bytes()).map_err(|_| EXPECTED))
        .collect()
}

fn retry_config(c: &mut Checker, args: &Args, request_timeout: Duration) -> RetryConfig {
    let retry_on = c.parse(
        "IDEMPROXY_RETRY_ON",
        &args.retry_on,
        RetryOn::empty(),
        RetryOn::parse,
    );
    let statuses = c.parse(
        "IDEMPROXY_RETRY_STATUSES",
        &args.retry_statuses,
        Vec::new(),
        parse_statuses,
    );
    let retriable_status_codes = c.parse(
        "IDEMPROXY_RETRIABLE_STATUS_CODES",
        &args.retriable_status_codes,
        Vec::new(),
        parse_statuses,
    );
    let max_attempts = c.count(
        "IDEMPROXY_MAX_ATTEMPTS",
        &args.max_attempts,
        1,
        MAX_ATTEMPTS,
    );
    let try_timeout = c.duration("IDEMPROXY_TRY_TIMEOUT", &args.try_timeout);
    let backoff_base = c.positive_duration("IDEMPROXY_BACKOFF_BASE", &args.backoff_base);
    let backoff_max = c.positive_duration("IDEMPROXY_BACKOFF_MAX", &args.backoff_max);
    if backoff_max < backoff_base {
        c.issue(
            "IDEMPROXY_BACKOFF_MAX",
            &args.backoff_max,
            format!(
                "a duration at least IDEMPROXY_BACKOFF_BASE ({})",
                args.backoff_base
            ),
        );
    }
    let budget_ratio = c.parse(
        "IDEMPROXY_RETRY_BUDGET_RATIO",
        &args.retry_budget_ratio,
        0.0,
        |v| match v.trim().parse::<f32>() {
            Ok(r) if (0.0..=1000.0).contains(&r) => Ok(r),
            _ => Err("a non-negative number such as 0.2 (retries per request)"),
        },
    );
    let budget_min_per_sec = c.count(
        "IDEMPROXY_RETRY_BUDGET_MIN_PER_SEC",
        &args.retry_budget_min_per_sec,
        0,
        MAX_COUNT,
    );
    let methods = c.parse(
        "IDEMPROXY_RETRY_METHODS",
        &args.retry_methods,
        Vec::new(),
        parse_methods,
    );
    let max_replay_body = c.size("IDEMPROXY_MAX_REPLAY_BODY", &args.max_replay_body, 0);
    let max_replay_memory = c.size("IDEMPROXY_MAX_REPLAY_MEMORY", &args.max_replay_memory, 0);
    RetryConfig {
        retry_on,
        statuses,
        retriable_status_codes,
        max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
        request_timeout,
        try_timeout: (!try_timeout.is_zero()).then_some(try_timeout),
        backoff_base,
        backoff_max,
        budget_ratio,
        budget_min_per_sec: u32::try_from(budget_min_per_sec).unwrap_or(u32::MAX),
        methods: (!methods.is_empty()).then_some(methods),
        max_replay_body,
        max_replay_memory,
        retry_unsafe_requests: c.boolean(
            "IDEMPROXY_RETRY_UNSAFE_REQUESTS",
            &args.retry_unsafe_requests,
        ),
    }
}

fn key_config(c: &mut Checker, args: &Args) -> KeyConfig {
    let header = c.parse(
        "IDEMPROXY_IDEMPOTENCY_HEADER",
        &args.idempotency_header,
        HeaderName::from_static("idempotency-key"),
        |v| HeaderName::from_bytes(v.trim().as_bytes()).map_err(|_| "a valid HTTP header name"),
    );
    let methods = c.parse(
        "IDEMPROXY_IDEMPOTENCY_METHODS",
        &args.idempotency_methods,
        Vec::new(),
        parse_methods,
    );
    let mode = c.parse(
        "IDEMPROXY_IDEMPOTENCY_KEY_MODE",
        &args.idempotency_key_mode,
        KeyMode::Random,
        str::parse::<KeyMode>,
    );
    KeyConfig {
        header,
        methods,
        mode,
    }
}

fn parse_header_names(text: &str) -> Result<Vec<HeaderName>, &'static str> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            HeaderName::from_bytes(t.as_bytes())
                .map_err(|_| "a comma-separated list of header names")
        })
        .collect()
}

/// What `--check-config` and error messages show instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// A header-template option (`name: value` pairs separated by `;` or
/// newlines) with every value replaced by [`REDACTED`]: header values may be
/// credentials (`authorization: Bearer ...`). A part without `:` has no
/// value and is kept, so that an error still shows what is wrong.
fn redact_header_values(text: &str) -> String {
    text.split([';', '\n'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|pair| match pair.split_once(':') {
            Some((name, _)) => format!("{}: {REDACTED}", name.trim()),
            None => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A URL with its user information (`user:password@`) replaced by [`REDACTED`].
fn redact_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

fn parse_set_headers(text: &str) -> Result<Vec<(HeaderName, Template)>, String> {
    const EXPECTED: &str = "`name: template` pairs separated by `;` or newlines, e.g. x-lease-action: renew; x-lease-id: {session}";
    text.split([';', '\n'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once(':').ok_or_else(|| EXPECTED.to_owned())?;
            let name =
                HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| EXPECTED.to_owned())?;
            let template =
                Template::parse_header(value.trim()).map_err(|e| format!("{EXPECTED} ({e})"))?;
            Ok((name, template))
        })
        .collect()
}

fn session_config(
    c: &mut Checker,
    args: &Args,
    sources: &[SessionSource],
) -> (SessionConfig, SessionLayerConfig) {
    let heartbeat = if args.heartbeat.trim().is_empty() {
        None
    } else {
        c.parse("IDEMPROXY_HEARTBEAT", &args.heartbeat, None, |v| {
            HeartbeatTemplate::parse(v).map(Some).map_err(|e| {
                format!(
                    "`METHOD /path/template` such as POST /v1/sessions/{{session}}/heartbeat ({e})"
                )
            })
        })
    };
    let heartbeat_body = if args.heartbeat_body.trim().is_empty() {
        None
    } else {
        c.parse(
            "IDEMPROXY_HEARTBEAT_BODY",
            &args.heartbeat_body,
            None,
            |v| {
                Template::parse_json(v).map(Some).map_err(|e| {
                    format!("a JSON body template such as {{\"ID\":\"{{session}}\"}} ({e})")
                })
            },
        )
    };
    let interval = c.positive_duration("IDEMPROXY_HEARTBEAT_INTERVAL", &args.heartbeat_interval);
    let idle_timeout =
        c.positive_duration("IDEMPROXY_SESSION_IDLE_TIMEOUT", &args.session_idle_timeout);
    let copy_headers = c.parse(
        "IDEMPROXY_HEARTBEAT_HEADERS",
        &args.heartbeat_headers,
        Vec::new(),
        parse_header_names,
    );
    // Header values may be credentials: an error shows the names only.
    let set_headers = match parse_set_headers(&args.heartbeat_set_headers) {
        Ok(pairs) => pairs,
        Err(e) => {
            c.issue(
                "IDEMPROXY_HEARTBEAT_SET_HEADERS",
                &redact_header_values(&args.heartbeat_set_headers),
                e,
            );
            Vec::new()
        }
    };
    let alive_field = if args.heartbeat_alive_field.trim().is_empty() {
        None
    } else {
        c.parse(
            "IDEMPROXY_HEARTBEAT_ALIVE_FIELD",
            &args.heartbeat_alive_field,
            None,
            |v| {
                FieldPath::parse(v.trim())
                    .map(|_| Some(v.trim().split('.').map(str::to_owned).collect::<Vec<_>>()))
                    .map_err(|_| "a JSON field path such as result.TTL")
            },
        )
    };
    let max_failures = c.count(
        "IDEMPROXY_HEARTBEAT_MAX_FAILURES",
        &args.heartbeat_max_failures,
        1,
        MAX_COUNT,
    );
    let max_per_sec = c.count(
        "IDEMPROXY_HEARTBEAT_MAX_PER_SEC",
        &args.heartbeat_max_per_sec,
        1,
        MAX_COUNT,
    );
    let request_timeout =
        c.positive_duration("IDEMPROXY_HEARTBEAT_TIMEOUT", &args.heartbeat_timeout);
    let max_sessions = c.count("IDEMPROXY_MAX_SESSIONS", &args.max_sessions, 1, MAX_COUNT);
    let max_bytes = c.size(
        "IDEMPROXY_MAX_SESSION_BYTES",
        &args.max_session_bytes,
        64 * 1024,
    );
    let sessions = SessionConfig {
        interval,
        idle_timeout,
        max_failures: u32::try_from(max_failures).unwrap_or(u32::MAX),
        max_sessions,
        max_bytes,
        max_per_sec: u32::try_from(max_per_sec).unwrap_or(u32::MAX),
        alive_field,
        request_timeout,
    };
    let layer = SessionLayerConfig {
        sources: sources.to_vec(),
        heartbeat,
        heartbeat_body,
        set_headers,
        copy_headers,
        requests_renew: c.boolean("IDEMPROXY_REQUESTS_RENEW", &args.requests_renew),
        max_response_body: 64 * 1024,
    };
    (sessions, layer)
}

impl Config {
    /// Validates every option, reporting all bad ones together.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let mut c = Checker::default();
        let upstream = match &args.upstream {
            Some(u) => match parse_upstream(u) {
                Ok(upstream) => Some(upstream),
                Err(e) => {
                    // A password in the URL is refused, and never echoed.
                    c.issue("IDEMPROXY_UPSTREAM", &redact_userinfo(u), e);
                    None
                }
            },
            None => {
                c.issue(
                    "IDEMPROXY_UPSTREAM",
                    "",
                    "the upstream URL, e.g. http://127.0.0.1:8080 (it is required)",
                );
                None
            }
        };
        let listen = c.parse("IDEMPROXY_LISTEN", &args.listen, None, |v| {
            parse_addr(v).map(Some)
        });
        let admin_listen = c.parse("IDEMPROXY_ADMIN_LISTEN", &args.admin_listen, None, |v| {
            parse_addr(v).map(Some)
        });
        let admin_control = admin_control_config(&mut c, args, [listen, admin_listen]);
        let connect_timeout =
            c.positive_duration("IDEMPROXY_CONNECT_TIMEOUT", &args.connect_timeout);
        let request_timeout =
            c.positive_duration("IDEMPROXY_REQUEST_TIMEOUT", &args.request_timeout);
        let upstream_idle_timeout = c.positive_duration(
            "IDEMPROXY_UPSTREAM_IDLE_TIMEOUT",
            &args.upstream_idle_timeout,
        );
        let upstream_max_idle = c.count(
            "IDEMPROXY_UPSTREAM_MAX_IDLE",
            &args.upstream_max_idle,
            0,
            MAX_COUNT,
        );
        let ca_file = args.upstream_ca_file.as_deref().and_then(|p| {
            c.parse("IDEMPROXY_UPSTREAM_CA_FILE", p, None, |v| {
                pem_certificates(v).map(Some)
            })
        });
        let ca_only = c.boolean("IDEMPROXY_UPSTREAM_CA_ONLY", &args.upstream_ca_only);
        if ca_only && args.upstream_ca_file.is_none() {
            c.issue(
                "IDEMPROXY_UPSTREAM_CA_ONLY",
                &args.upstream_ca_only,
                "off unless IDEMPROXY_UPSTREAM_CA_FILE is set",
            );
        }
        let cert = args.upstream_client_cert.as_deref().and_then(|p| {
            c.parse("IDEMPROXY_UPSTREAM_CLIENT_CERT", p, None, |v| {
                pem_certificates(v).map(Some)
            })
        });
        let key = args.upstream_client_key.as_deref().and_then(|p| {
            c.parse("IDEMPROXY_UPSTREAM_CLIENT_KEY", p, None, |v| {
                pem_private_key(v).map(Some)
            })
        });
        match (&args.upstream_client_cert, &args.upstream_client_key) {
            (Some(_), None) => c.issue("IDEMPROXY_UPSTREAM_CLIENT_KEY", "", "the client key's path, because IDEMPROXY_UPSTREAM_CLIENT_CERT is set"),
            (None, Some(p)) => c.issue("IDEMPROXY_UPSTREAM_CLIENT_CERT", "", format!("the client certificate's path, because IDEMPROXY_UPSTREAM_CLIENT_KEY is set ({p})")),
            _ => {}
        }
        let preserve_host = c.boolean("IDEMPROXY_PRESERVE_HOST", &args.preserve_host);
        let forwarded_headers = c.boolean("IDEMPROXY_FORWARDED_HEADERS", &args.forwarded_headers);
        // hyper cannot read a request head in a buffer smaller than 8 KiB.
        let max_header_size = c.size("IDEMPROXY_MAX_HEADER_SIZE", &args.max_header_size, 8192);
        let header_read_timeout =
            c.positive_duration("IDEMPROXY_HEADER_READ_TIMEOUT", &args.header_read_timeout);
        let max_connections = c.count(
            "IDEMPROXY_MAX_CONNECTIONS",
            &args.max_connections,
            1,
            MAX_COUNT,
        );
        let drain_timeout = c.duration("IDEMPROXY_DRAIN_TIMEOUT", &args.drain_timeout);
        let workers = match c.count("IDEMPROXY_WORKERS", &args.workers, 0, MAX_WORKERS) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let log_format = c.parse(
            "IDEMPROXY_LOG_FORMAT",
            &args.log_format,
            LogFormat::Text,
            |v| match v.trim().to_ascii_lowercase().as_str() {
                "json" => Ok(LogFormat::Json),
                "text" => Ok(LogFormat::Text),
                "auto" => Ok(if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    LogFormat::Text
                } else {
                    LogFormat::Json
                }),
                _ => Err("json, text or auto"),
            },
        );
        if let Some(filter) = &args.log {
            c.parse("IDEMPROXY_LOG", filter, (), |v| {
                tracing_subscriber::EnvFilter::try_new(v)
                    .map(|_| ())
                    .map_err(|_| "a log filter such as info, warn or idemproxy=debug")
            });
        }
        let retry = retry_config(&mut c, args, request_timeout);
        let keys = key_config(&mut c, args);
        let cache_ttl = c.duration("IDEMPROXY_IDEMPOTENCY_TTL", &args.idempotency_ttl);
        let cache_entries = c.count(
            "IDEMPROXY_IDEMPOTENCY_CACHE_ENTRIES",
            &args.idempotency_cache_entries,
            1,
            MAX_COUNT,
        );
        let cache_bytes = c.size(
            "IDEMPROXY_IDEMPOTENCY_CACHE_BYTES",
            &args.idempotency_cache_bytes,
            0,
        );
        let scope_headers = c.parse(
            "IDEMPROXY_IDEMPOTENCY_SCOPE_HEADERS",
            &args.idempotency_scope_headers,
            Vec::new(),
            parse_header_names,
        );
        let mut idempotency_cache = (!cache_ttl.is_zero()).then(|| CacheConfig {
            header: keys.header.clone(),
            scope_headers,
            ttl: cache_ttl,
            max_entries: cache_entries,
            max_bytes: cache_bytes,
            max_body: cache_bytes.min(retry.max_replay_body.max(64 * 1024)),
        });
        let routes = match RouteTable::parse(&args.routes) {
            Ok(table) => table,
            Err(e) => {
                // The route error names the line and the word; show it whole.
                c.issue(
                    "IDEMPROXY_ROUTES",
                    &e.text,
                    format!(
                        "a valid route table; line {}: {:?}: {}",
                        e.line, e.word, e.reason
                    ),
                );
                RouteTable::default()
            }
        };
        let session_sources = c.parse(
            "IDEMPROXY_SESSION_SOURCES",
            &args.session_sources,
            Vec::new(),
            SessionSource::parse_list,
        );
        let (sessions, session_layer) = session_config(&mut c, args, &session_sources);
        if let Some(cache) = &mut idempotency_cache {
            // A session's own header identifies its client as well.
            let session_headers = session_sources
                .iter()
                .chain(routes.iter().flat_map(|r| r.session.iter()))
                .filter_map(|s| match s.kind() {
                    SessionSourceKind::Header(name) => Some(name),
                    _ => None,
                });
            for name in session_headers {
                if !cache.scope_headers.contains(name) {
                    cache.scope_headers.push(name.clone());
                }
            }
        }
        let any_source =
            !session_sources.is_empty() || routes.iter().any(|r| !r.session.is_empty());
        if session_layer.heartbeat.is_some() && !any_source {
            c.issue(
                "IDEMPROXY_HEARTBEAT",
                &args.heartbeat,
                "a session source too: set IDEMPROXY_SESSION_SOURCES or a route's session=, otherwise no session is ever learned and no heartbeat is sent",
            );
        }
        c.finish()?;
        let (Some(upstream), Some(listen), Some(admin_listen)) = (upstream, listen, admin_listen)
        else {
            // Unreachable in practice: a missing value was recorded as an issue above.
            return Err(ConfigError(Vec::new()));
        };
        Ok(Config {
            upstream,
            listen,
            admin_listen,
            admin_control,
            connect_timeout,
            request_timeout,
            upstream_idle_timeout,
            upstream_max_idle,
            tls: TlsConfig {
                ca_file,
                ca_only,
                client_cert: cert.zip(key),
            },
            preserve_host,
            forwarded_headers,
            max_header_size,
            header_read_timeout,
            max_connections,
            drain_timeout,
            workers,
            log: args.log.clone(),
            log_format,
            retry,
            keys,
            idempotency_cache,
            routes: Arc::new(routes),
            session_sources,
            sessions,
            session_layer,
        })
    }

    /// The effective configuration as `IDEMPROXY_*=value` lines, secrets redacted
    /// (file paths are shown, their contents never are).
    pub fn render(&self) -> String {
        let fmt_d = units::format_duration;
        let on = |b: bool| if b { "on" } else { "off" };
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        };
        let lines = [
            ("UPSTREAM", self.upstream.to_string()),
            ("LISTEN", self.listen.to_string()),
            ("ADMIN_LISTEN", self.admin_listen.to_string()),
            (
                "ADMIN_CONTROL_LISTEN",
                self.admin_control
                    .listen
                    .map_or(String::new(), |a| a.to_string()),
            ),
            (
                // The path only: the token itself is never shown.
                "ADMIN_TOKEN_FILE",
                self.admin_control
                    .token
                    .as_ref()
                    .map_or(String::new(), |t| t.path().display().to_string()),
            ),
            ("CONNECT_TIMEOUT", fmt_d(self.connect_timeout)),
            ("REQUEST_TIMEOUT", fmt_d(self.request_timeout)),
            ("UPSTREAM_IDLE_TIMEOUT", fmt_d(self.upstream_idle_timeout)),
            ("UPSTREAM_MAX_IDLE", self.upstream_max_idle.to_string()),
            ("UPSTREAM_CA_FILE", path(&self.tls.ca_file)),
            ("UPSTREAM_CA_ONLY", on(self.tls.ca_only).into()),
            (
                "UPSTREAM_CLIENT_CERT",
                path(&self.tls.client_cert.as_ref().map(|c| c.0.clone())),
            ),
            (
                "UPSTREAM_CLIENT_KEY",
                path(&self.tls.client_cert.as_ref().map(|c| c.1.clone())),
            ),
            ("PRESERVE_HOST", on(self.preserve_host).into()),
            ("FORWARDED_HEADERS", on(self.forwarded_headers).into()),
            (
                "MAX_HEADER_SIZE",
                units::format_size(self.max_header_size as u64),
            ),
            ("HEADER_READ_TIMEOUT", fmt_d(self.header_read_timeout)),
            ("MAX_CONNECTIONS", self.max_connections.to_string()),
            ("DRAIN_TIMEOUT", fmt_d(self.drain_timeout)),
            ("WORKERS", self.workers.to_string()),
            ("LOG", self.log.clone().unwrap_or_default()),
            (
                "LOG_FORMAT",
                format!("{:?}", self.log_format).to_ascii_lowercase(),
            ),
            ("RETRY_ON", self.retry.retry_on.to_string()),
            (
                "RETRY_STATUSES",
                join(self.retry.statuses.iter().map(|s| s.as_u16())),
            ),
            (
                "RETRIABLE_STATUS_CODES",
                join(self.retry.retriable_status_codes.iter().map(|s| s.as_u16())),
            ),
            ("MAX_ATTEMPTS", self.retry.max_attempts.to_string()),
            (
                "TRY_TIMEOUT",
                self.retry.try_timeout.map_or("0".into(), fmt_d),
            ),
            ("BACKOFF_BASE", fmt_d(self.retry.backoff_base)),
            ("BACKOFF_MAX", fmt_d(self.retry.backoff_max)),
            ("RETRY_BUDGET_RATIO", self.retry.budget_ratio.to_string()),
            (
                "RETRY_BUDGET_MIN_PER_SEC",
                self.retry.budget_min_per_sec.to_string(),
            ),
            (
                "RETRY_METHODS",
                self.retry
                    .methods
                    .as_deref()
                    .map_or(String::new(), |m| join(m.iter())),
            ),
            (
                "RETRY_UNSAFE_REQUESTS",
                on(self.retry.retry_unsafe_requests).into(),
            ),
            (
                "MAX_REPLAY_BODY",
                units::format_size(self.retry.max_replay_body as u64),
            ),
            (
                "MAX_REPLAY_MEMORY",
                units::format_size(self.retry.max_replay_memory as u64),
            ),
            ("IDEMPOTENCY_HEADER", self.keys.header.to_string()),
            ("IDEMPOTENCY_METHODS", join(self.keys.methods.iter())),
            (
                "IDEMPOTENCY_KEY_MODE",
                format!("{:?}", self.keys.mode).to_ascii_lowercase(),
            ),
            (
                "IDEMPOTENCY_TTL",
                self.idempotency_cache
                    .as_ref()
                    .map_or("0".into(), |c| fmt_d(c.ttl)),
            ),
            (
                "IDEMPOTENCY_CACHE_ENTRIES",
                self.idempotency_cache
                    .as_ref()
                    .map_or(String::new(), |c| c.max_entries.to_string()),
            ),
            (
                "IDEMPOTENCY_CACHE_BYTES",
                self.idempotency_cache
                    .as_ref()
                    .map_or(String::new(), |c| units::format_size(c.max_bytes as u64)),
            ),
            (
                "IDEMPOTENCY_SCOPE_HEADERS",
                self.idempotency_cache
                    .as_ref()
                    .map_or(String::new(), |c| join(c.scope_headers.iter())),
            ),
            ("SESSION_SOURCES", join(self.session_sources.iter())),
            (
                "HEARTBEAT",
                self.session_layer
                    .heartbeat
                    .as_ref()
                    .map_or(String::new(), |h| format!("{} {}", h.method, h.template)),
            ),
            (
                "HEARTBEAT_BODY",
                self.session_layer
                    .heartbeat_body
                    .as_ref()
                    .map_or(String::new(), |t| t.to_string()),
            ),
            ("HEARTBEAT_INTERVAL", fmt_d(self.sessions.interval)),
            (
                "REQUESTS_RENEW",
                on(self.session_layer.requests_renew).into(),
            ),
            ("SESSION_IDLE_TIMEOUT", fmt_d(self.sessions.idle_timeout)),
            (
                "HEARTBEAT_HEADERS",
                join(self.session_layer.copy_headers.iter()),
            ),
            (
                "HEARTBEAT_SET_HEADERS",
                // Values may be credentials: names only.
                self.session_layer
                    .set_headers
                    .iter()
                    .map(|(n, _)| format!("{n}: {REDACTED}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            (
                "HEARTBEAT_ALIVE_FIELD",
                self.sessions
                    .alive_field
                    .as_ref()
                    .map_or(String::new(), |f| f.join(".")),
            ),
            (
                "HEARTBEAT_MAX_FAILURES",
                self.sessions.max_failures.to_string(),
            ),
            (
                "HEARTBEAT_MAX_PER_SEC",
                self.sessions.max_per_sec.to_string(),
            ),
            ("HEARTBEAT_TIMEOUT", fmt_d(self.sessions.request_timeout)),
            ("MAX_SESSIONS", self.sessions.max_sessions.to_string()),
            (
                "MAX_SESSION_BYTES",
                units::format_size(self.sessions.max_bytes as u64),
            ),
        ];
        let mut out = String::new();
        for (name, value) in lines {
            out.push_str("IDEMPROXY_");
            out.push_str(name);
            out.push('=');
            out.push_str(&value);
            out.push('\n');
        }
        // The route table in canonical form, one route a line, as the variable takes it.
        out.push_str("IDEMPROXY_ROUTES=");
        if !self.routes.is_empty() {
            out.push('\n');
            for route in self.routes.iter() {
                out.push_str("  ");
                out.push_str(&route.to_string());
                out.push('\n');
            }
        } else {
            out.push('\n');
        }
        out
    }
}

fn join<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["idemproxy", "--upstream", "http://127.0.0.1:8080"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_validate() {
        let c = Config::from_args(&args(&[])).unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.max_header_size, 64 * 1024);
        assert!(c.workers >= 1);
    }

    #[test]
    fn every_bad_value_is_reported_with_its_variable() {
        let err = Config::from_args(&args(&[
            "--connect-timeout",
            "5x",
            "--max-header-size",
            "1KiB",
            "--preserve-host",
            "maybe",
        ]))
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("IDEMPROXY_CONNECT_TIMEOUT"), "{text}");
        assert!(text.contains("\"5x\""), "{text}");
        assert!(text.contains("IDEMPROXY_MAX_HEADER_SIZE"), "{text}");
        assert!(text.contains("IDEMPROXY_PRESERVE_HOST"), "{text}");
    }

    #[test]
    fn secrets_are_redacted_in_errors() {
        assert_eq!(
            redact_userinfo("http://user:pw@x:1/a@b"),
            "http://<redacted>@x:1/a@b"
        );
        assert_eq!(redact_userinfo("user:pw@x"), "<redacted>@x");
        assert_eq!(redact_userinfo("http://x/a@b"), "http://x/a@b");
        assert_eq!(
            redact_header_values("authorization: Bearer s3cret; x-a: {session}\nbad"),
            "authorization: <redacted>; x-a: <redacted>; bad"
        );
        let err = Config::from_args(&args(&[
            "--heartbeat-set-headers",
            "authorization: Bearer s3cret; oops",
        ]))
        .unwrap_err()
        .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("IDEMPROXY_HEARTBEAT_SET_HEADERS"), "{err}");
        assert!(err.contains("oops"), "{err}");
    }

    #[test]
    fn upstream_must_be_http_or_https_without_path() {
        for bad in [
            "ftp://x",
            "127.0.0.1:8080",
            "http://x/api",
            "http://user:pw@x",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
        let u = parse_upstream("https://backend.example:8443").unwrap();
        assert!(u.is_same_authority(&"BACKEND.example:8443".parse().unwrap()));
        let u = parse_upstream("http://backend").unwrap();
        assert!(u.is_same_authority(&"backend:80".parse().unwrap()));
        assert!(!u.is_same_authority(&"evil:80".parse().unwrap()));
    }
}
