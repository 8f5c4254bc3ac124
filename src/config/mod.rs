//! Configuration: one typed struct, read from `IDEMPROXY_*` environment
//! variables or the matching `--flags`, validated completely at start-up.
//!
//! | module | holds |
//! | --- | --- |
//! | [`options`] | every option, declared once: variable, kind (value name, parser, fallback), default, help line, redaction |
//! | `args` | [`Args`]: the clap command built from the declarations; every option as text, from the command line and a [`Strings`] source |
//! | [`source`] | [`Strings`]: the process environment for the binary, a map in tests |
//! | `checker` | validation by the declarations, every issue collected ([`ConfigError`]) |
//! | `parse` | the small parsers and the redaction of secrets |
//! | [`profiles`] | `IDEMPROXY_PROFILE`: backend profiles, expanded into routes and options before validation |
//! | `render` | `--check-config` ([`Config::render`]) |
//! | [`reference`](mod@reference) | `--env-reference`: the READMEs' table, from clap's introspection |
//!
//! [`Config::from_args`] turns [`Args`] into the typed [`Config`] and
//! reports *every* bad value at once, each naming the variable, the flag,
//! the value and what is expected.
//!
//! ```
//! use std::collections::HashMap;
//! use idemproxy::config::{Args, Config};
//! let args = Args::try_parse_from_strings(["idemproxy", "--upstream", "http://127.0.0.1:8080"], &HashMap::new()).unwrap();
//! let config = Config::from_args(&args).unwrap();
//! assert_eq!(config.upstream.target.authority.as_str(), "127.0.0.1:8080");
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::uri::{Authority, Scheme};

use crate::admin::{AdminToken, ControlConfig};
use crate::idempotency::{CacheConfig, KeyConfig, KeyMode};
use crate::retry::{RetryConfig, RetryOn};
use crate::routes::{
    FieldPath, HeartbeatTemplate, RouteTable, SessionSource, SessionSourceKind, Template,
};
use crate::sessions::{SessionConfig, SessionLayerConfig};

mod args;
mod checker;
pub mod options;
mod parse;
pub mod profiles;
pub mod reference;
mod render;
pub mod source;

pub use args::Args;
pub use checker::{ConfigError, ConfigIssue};
pub use parse::{REDACTED, parse_bool};
pub use source::{ProcessEnv, Strings};

use checker::Checker;
use options::*;
use parse::{
    parse_addr, parse_header_names, parse_loopback_addr, parse_methods, parse_set_headers,
    parse_statuses, parse_upstream, pem_certificates, pem_private_key, same_port,
};

/// Default traffic listener: loopback, because the client lives in the same pod.
/// The port avoids Istio (150xx), Linkerd (41xx) and Dapr (3500, 50001).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";
/// Default admin listener: all interfaces, so the kubelet's probes reach it.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:7481";

/// The most runtime worker threads ([`options::WORKERS`]): more could not
/// all be started.
pub const MAX_WORKERS: usize = 1024;
/// The most attempts of one request ([`options::MAX_ATTEMPTS`]).
pub const MAX_ATTEMPTS: usize = 100;
/// The largest value of every other count (connections, idle connections,
/// sessions, cache entries, heartbeat failures, heartbeats and retries per
/// second). Durations are capped at [`crate::units::MAX_DURATION`]. A larger value
/// is refused at start-up like any bad value, so that no accepted value can
/// overflow at run time.
pub const MAX_COUNT: usize = 1_000_000;

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

/// The validated configuration of one idemproxy process, in one group per
/// part of the proxy; the wiring ([`crate::app`]) hands each group to its
/// part as it is.
#[derive(Debug, Clone)]
pub struct Config {
    /// The listeners and the client connections' limits.
    pub server: ServerConfig,
    /// Where requests go, and how.
    pub upstream: UpstreamConfig,
    /// Retries (the deadline is [`UpstreamConfig::request_timeout`]).
    pub retry: RetryConfig,
    /// Idempotency keys and the cache for client-supplied ones.
    pub idempotency: IdempotencyConfig,
    /// The route table, the profiles' routes included (after the user's own).
    pub routes: Arc<RouteTable>,
    /// The backend profiles that were expanded into routes and options
    /// ([`profiles`]), by name.
    pub profiles: Vec<&'static str>,
    /// Session tracking, heartbeats and how sessions are learned.
    pub sessions: SessionsConfig,
    /// The process: worker threads and logs.
    pub process: ProcessConfig,
}

/// The listeners and the client connections' limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Traffic listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Who may change state: the loopback control listener and the token.
    pub admin_control: ControlConfig,
    /// Limits applied to client connections.
    pub limits: ServerLimits,
    /// What the edge does to every request (Host, `X-Forwarded-*`).
    pub edge: EdgeOptions,
}

/// Limits applied to client connections (the server takes them as they are).
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Largest request head.
    pub max_header_size: usize,
    /// Time allowed for a request head.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Drain window on shutdown.
    pub drain_timeout: Duration,
}

/// What the edge does to every request (it takes these as they are).
#[derive(Clone, Debug)]
pub struct EdgeOptions {
    /// Keep the client's `Host` header.
    pub preserve_host: bool,
    /// Add `X-Forwarded-For/Proto/Host`.
    pub forwarded_headers: bool,
}

/// The upstream and the pooled client's settings.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Where requests go.
    pub target: Upstream,
    /// TCP connect timeout to the upstream.
    pub connect_timeout: Duration,
    /// Overall deadline to response headers.
    pub request_timeout: Duration,
    /// Idle timeout of pooled upstream connections.
    pub idle_timeout: Duration,
    /// Idle pooled connections kept.
    pub max_idle: usize,
    /// TLS to the upstream.
    pub tls: TlsConfig,
}

/// Idempotency keys.
#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    /// Which requests get a key, under which header.
    pub keys: KeyConfig,
    /// The local cache for client-supplied keys (`None`: off).
    pub cache: Option<CacheConfig>,
}

/// Sessions: the tracker with its heartbeat scheduler, and the layer that
/// learns sessions from requests and answers.
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// Session tracking and the heartbeat scheduler.
    pub tracker: SessionConfig,
    /// How sessions are learned (its `sources` are tried on every request)
    /// and heartbeats built.
    pub layer: SessionLayerConfig,
}

impl SessionsConfig {
    /// Whether any session source is configured, globally or on a route of
    /// `routes`: only then are sessions tracked.
    pub fn enabled(&self, routes: &RouteTable) -> bool {
        !self.layer.sources.is_empty() || routes.iter().any(|r| !r.session.is_empty())
    }
}

/// The process: runtime worker threads and logs.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Runtime worker threads (resolved: never 0).
    pub workers: usize,
    /// Log filter directive.
    pub log: Option<String>,
    /// Log format (resolved from `auto`).
    pub log_format: LogFormat,
}

/// [`ADMIN_CONTROL_LISTEN`] and [`ADMIN_TOKEN_FILE`]; both off when empty.
/// `others` are the traffic and admin listeners.
fn admin_control_config(c: &mut Checker<'_>, others: [Option<SocketAddr>; 2]) -> ControlConfig {
    let text = c.text(&ADMIN_CONTROL_LISTEN).unwrap_or_default();
    let listen = if text.trim().is_empty() {
        None
    } else {
        c.parse(&ADMIN_CONTROL_LISTEN, None, |v| {
            parse_loopback_addr(v, ADMIN_TOKEN_FILE.name).map(Some)
        })
    };
    let taken = listen.and_then(|l| others.into_iter().flatten().find(|o| same_port(l, *o)));
    if let Some(other) = taken {
        c.issue(
            &ADMIN_CONTROL_LISTEN,
            text,
            format!(
                "a loopback address on a port that no other listener of idemproxy uses ({other} is)"
            ),
        );
    }
    let token = match c.text(&ADMIN_TOKEN_FILE) {
        Some(p) if !p.trim().is_empty() => c.parse_given(&ADMIN_TOKEN_FILE, AdminToken::read),
        _ => None,
    };
    ControlConfig { listen, token }
}

fn retry_config(c: &mut Checker<'_>, request_timeout: Duration) -> RetryConfig {
    let retry_on = c.parse(&RETRY_ON, RetryOn::empty(), RetryOn::parse);
    let statuses = c.parse(&RETRY_STATUSES, Vec::new(), parse_statuses);
    let retriable_status_codes = c.parse(&RETRIABLE_STATUS_CODES, Vec::new(), parse_statuses);
    let max_attempts = c.get(&options::MAX_ATTEMPTS);
    let try_timeout = c.get(&TRY_TIMEOUT);
    let backoff_base = c.get(&BACKOFF_BASE);
    let backoff_max = c.get(&BACKOFF_MAX);
    if backoff_max < backoff_base {
        c.issue(
            &BACKOFF_MAX,
            c.text(&BACKOFF_MAX).unwrap_or_default(),
            format!(
                "a duration at least {} ({})",
                BACKOFF_BASE.name,
                c.text(&BACKOFF_BASE).unwrap_or_default()
            ),
        );
    }
    let budget_ratio = c.parse(&RETRY_BUDGET_RATIO, 0.0, |v| {
        match v.trim().parse::<f32>() {
            Ok(r) if (0.0..=1000.0).contains(&r) => Ok(r),
            _ => Err("a non-negative number such as 0.2 (retries per request)"),
        }
    });
    let budget_min_per_sec = c.get(&RETRY_BUDGET_MIN_PER_SEC);
    let methods = c.parse(&RETRY_METHODS, Vec::new(), parse_methods);
    let max_replay_body = c.get(&MAX_REPLAY_BODY);
    let max_replay_memory = c.get(&MAX_REPLAY_MEMORY);
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
        retry_unsafe_requests: c.get(&RETRY_UNSAFE_REQUESTS),
    }
}

fn key_config(c: &mut Checker<'_>) -> KeyConfig {
    let header = c.parse(
        &IDEMPOTENCY_HEADER,
        HeaderName::from_static("idempotency-key"),
        |v| HeaderName::from_bytes(v.trim().as_bytes()).map_err(|_| "a valid HTTP header name"),
    );
    let methods = c.parse(&IDEMPOTENCY_METHODS, Vec::new(), parse_methods);
    let mode = c.parse(
        &IDEMPOTENCY_KEY_MODE,
        KeyMode::Random,
        str::parse::<KeyMode>,
    );
    KeyConfig {
        header,
        methods,
        mode,
    }
}

/// An option whose empty (or blank) text means "none": `None` then,
/// otherwise parsed with `parse`.
fn unless_blank<K: Kind + Sync, T, E: fmt::Display>(
    c: &mut Checker<'_>,
    opt: &Opt<K>,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Option<T> {
    if c.text(opt).unwrap_or_default().trim().is_empty() {
        None
    } else {
        c.parse(opt, None, |v| parse(v).map(Some))
    }
}

fn session_config(
    c: &mut Checker<'_>,
    sources: Vec<SessionSource>,
) -> (SessionConfig, SessionLayerConfig) {
    let heartbeat = unless_blank(c, &HEARTBEAT, |v| {
        HeartbeatTemplate::parse(v).map_err(|e| {
            format!("`METHOD /path/template` such as POST /v1/sessions/{{session}}/heartbeat ({e})")
        })
    });
    let heartbeat_body = unless_blank(c, &HEARTBEAT_BODY, |v| {
        let expected = "a JSON body template such as {\"ID\":\"{session}\"}";
        match Template::parse_json(v) {
            Ok(t) => match t.stored_placeholder() {
                Some(p) => Err(format!(
                    "{expected} ({p} is only for a route's recovered-body=)"
                )),
                None => Ok(t),
            },
            Err(e) => Err(format!("{expected} ({e})")),
        }
    });
    let interval = c.get(&HEARTBEAT_INTERVAL);
    let idle_timeout = c.get(&SESSION_IDLE_TIMEOUT);
    let copy_headers = c.parse(&HEARTBEAT_HEADERS, Vec::new(), parse_header_names);
    // Header values may be credentials: an error shows the names only (the
    // option's redaction).
    let set_headers = c.parse(&HEARTBEAT_SET_HEADERS, Vec::new(), parse_set_headers);
    let alive_field = unless_blank(c, &HEARTBEAT_ALIVE_FIELD, |v| {
        FieldPath::parse(v.trim())
            .map(|_| v.trim().split('.').map(str::to_owned).collect::<Vec<_>>())
            .map_err(|_| "a JSON field path such as result.TTL")
    });
    let max_failures = c.get(&HEARTBEAT_MAX_FAILURES);
    let max_per_sec = c.get(&HEARTBEAT_MAX_PER_SEC);
    let request_timeout = c.get(&HEARTBEAT_TIMEOUT);
    let max_sessions = c.get(&MAX_SESSIONS);
    let max_bytes = c.get(&MAX_SESSION_BYTES);
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
        sources,
        heartbeat,
        heartbeat_body,
        set_headers,
        copy_headers,
        requests_renew: c.get(&REQUESTS_RENEW),
        interval_set: c.given(&HEARTBEAT_INTERVAL),
        max_response_body: 64 * 1024,
    };
    (sessions, layer)
}

impl Config {
    /// Validates every option, reporting all bad ones (and every unknown
    /// `IDEMPROXY_*` variable) together.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let (args, profile_issues) = match profiles::expand(args) {
            Ok(expanded) => (expanded, Vec::new()),
            Err(issues) => (args.clone(), issues),
        };
        let mut c = Checker::new(&args);
        c.extend(profile_issues);
        let upstream = match c.text(&UPSTREAM) {
            // A password in the URL is refused, and never echoed (the option's redaction).
            Some(_) => c.parse(&UPSTREAM, None, |v| parse_upstream(v).map(Some)),
            None => {
                c.issue(
                    &UPSTREAM,
                    "",
                    "the upstream URL, e.g. http://127.0.0.1:8080 (it is required)",
                );
                None
            }
        };
        let listen = c.parse(&LISTEN, None, |v| parse_addr(v).map(Some));
        let admin_listen = c.parse(&ADMIN_LISTEN, None, |v| parse_addr(v).map(Some));
        let admin_control = admin_control_config(&mut c, [listen, admin_listen]);
        let connect_timeout = c.get(&CONNECT_TIMEOUT);
        let request_timeout = c.get(&REQUEST_TIMEOUT);
        let upstream_idle_timeout = c.get(&UPSTREAM_IDLE_TIMEOUT);
        let upstream_max_idle = c.get(&UPSTREAM_MAX_IDLE);
        let ca_file = c.parse_given(&UPSTREAM_CA_FILE, pem_certificates);
        let ca_only = c.get(&UPSTREAM_CA_ONLY);
        if ca_only && c.text(&UPSTREAM_CA_FILE).is_none() {
            c.issue(
                &UPSTREAM_CA_ONLY,
                c.text(&UPSTREAM_CA_ONLY).unwrap_or_default(),
                format!("off unless {} is set", UPSTREAM_CA_FILE.name),
            );
        }
        let cert = c.parse_given(&UPSTREAM_CLIENT_CERT, pem_certificates);
        let key = c.parse_given(&UPSTREAM_CLIENT_KEY, pem_private_key);
        match (c.text(&UPSTREAM_CLIENT_CERT), c.text(&UPSTREAM_CLIENT_KEY)) {
            (Some(_), None) => c.issue(
                &UPSTREAM_CLIENT_KEY,
                "",
                format!(
                    "the client key's path, because {} is set",
                    UPSTREAM_CLIENT_CERT.name
                ),
            ),
            (None, Some(p)) => c.issue(
                &UPSTREAM_CLIENT_CERT,
                "",
                format!(
                    "the client certificate's path, because {} is set ({p})",
                    UPSTREAM_CLIENT_KEY.name
                ),
            ),
            _ => {}
        }
        let preserve_host = c.get(&PRESERVE_HOST);
        let forwarded_headers = c.get(&FORWARDED_HEADERS);
        let max_header_size = c.get(&MAX_HEADER_SIZE);
        let header_read_timeout = c.get(&HEADER_READ_TIMEOUT);
        let max_connections = c.get(&MAX_CONNECTIONS);
        let drain_timeout = c.get(&DRAIN_TIMEOUT);
        let workers = match c.get(&WORKERS) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let log_format = c.parse(&LOG_FORMAT, LogFormat::Text, |v| {
            match v.trim().to_ascii_lowercase().as_str() {
                "json" => Ok(LogFormat::Json),
                "text" => Ok(LogFormat::Text),
                "auto" => Ok(if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    LogFormat::Text
                } else {
                    LogFormat::Json
                }),
                _ => Err("json, text or auto"),
            }
        });
        let log = c.text(&LOG).map(str::to_owned);
        if log.is_some() {
            c.parse(&LOG, (), |v| {
                tracing_subscriber::EnvFilter::try_new(v)
                    .map(|_| ())
                    .map_err(|_| "a log filter such as info, warn or idemproxy=debug")
            });
        }
        let retry = retry_config(&mut c, request_timeout);
        let keys = key_config(&mut c);
        let cache_ttl = c.get(&IDEMPOTENCY_TTL);
        let cache_entries = c.get(&IDEMPOTENCY_CACHE_ENTRIES);
        let cache_bytes = c.get(&IDEMPOTENCY_CACHE_BYTES);
        let scope_headers = c.parse(&IDEMPOTENCY_SCOPE_HEADERS, Vec::new(), parse_header_names);
        let mut idempotency_cache = (!cache_ttl.is_zero()).then(|| CacheConfig {
            header: keys.header.clone(),
            scope_headers,
            ttl: cache_ttl,
            max_entries: cache_entries,
            max_bytes: cache_bytes,
            max_body: cache_bytes.min(retry.max_replay_body.max(64 * 1024)),
        });
        let routes = match RouteTable::parse(c.text(&ROUTES).unwrap_or_default()) {
            Ok(table) => table,
            Err(e) => {
                // The route error names the line and the word; show it whole.
                c.issue(
                    &ROUTES,
                    &e.text,
                    format!(
                        "a valid route table; line {}: {:?}: {}",
                        e.line, e.word, e.reason
                    ),
                );
                RouteTable::default()
            }
        };
        let session_sources = c.parse(&SESSION_SOURCES, Vec::new(), SessionSource::parse_list);
        let (tracker, layer) = session_config(&mut c, session_sources);
        let sessions = SessionsConfig { tracker, layer };
        if let Some(cache) = &mut idempotency_cache {
            // A session's own header identifies its client as well.
            let session_headers = sessions
                .layer
                .sources
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
        if sessions.layer.heartbeat.is_some() && !sessions.enabled(&routes) {
            c.issue(
                &HEARTBEAT,
                c.text(&HEARTBEAT).unwrap_or_default(),
                format!(
                    "a session source too: set {} or a route's session=, otherwise no session is ever learned and no heartbeat is sent",
                    SESSION_SOURCES.name
                ),
            );
        }
        c.finish()?;
        let (Some(upstream), Some(listen), Some(admin_listen)) = (upstream, listen, admin_listen)
        else {
            // Unreachable in practice: a missing value was recorded as an issue above.
            return Err(ConfigError(Vec::new()));
        };
        Ok(Config {
            server: ServerConfig {
                listen,
                admin_listen,
                admin_control,
                limits: ServerLimits {
                    max_header_size,
                    header_read_timeout,
                    max_connections,
                    drain_timeout,
                },
                edge: EdgeOptions {
                    preserve_host,
                    forwarded_headers,
                },
            },
            upstream: UpstreamConfig {
                target: upstream,
                connect_timeout,
                request_timeout,
                idle_timeout: upstream_idle_timeout,
                max_idle: upstream_max_idle,
                tls: TlsConfig {
                    ca_file,
                    ca_only,
                    client_cert: cert.zip(key),
                },
            },
            retry,
            idempotency: IdempotencyConfig {
                keys,
                cache: idempotency_cache,
            },
            routes: Arc::new(routes),
            profiles: profiles::names_in(args.get(&PROFILE).unwrap_or_default()),
            sessions,
            process: ProcessConfig {
                workers,
                log,
                log_format,
            },
        })
    }
}

#[cfg(test)]
mod tests;
