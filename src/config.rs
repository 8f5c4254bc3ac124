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

use crate::units::{self, DURATION_EXPECTED, SIZE_EXPECTED};

/// Default traffic listener: loopback, because the client lives in the same pod.
/// The port avoids Istio (150xx), Linkerd (41xx) and Dapr (3500, 50001).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";
/// Default admin listener: all interfaces, so the kubelet's probes reach it.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:7481";

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
        write!(
            f,
            "invalid {} (--{flag}) {:?}: expected {}",
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
                Ok(_) => Err(format!("{DURATION_EXPECTED}, more than zero")),
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

    pub(crate) fn count(&mut self, variable: &'static str, value: &str, min: usize) -> usize {
        self.parse(variable, value, min, |v| match v.trim().parse::<usize>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(format!("a whole number, at least {min}")),
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

fn existing_file(text: &str) -> Result<PathBuf, &'static str> {
    let path = PathBuf::from(text);
    if path.is_file() {
        Ok(path)
    } else {
        Err("the path of a readable file")
    }
}

impl Config {
    /// Validates every option, reporting all bad ones together.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let mut c = Checker::default();
        let upstream = match &args.upstream {
            Some(u) => c.parse("IDEMPROXY_UPSTREAM", u, None, |v| {
                parse_upstream(v).map(Some)
            }),
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
        let connect_timeout =
            c.positive_duration("IDEMPROXY_CONNECT_TIMEOUT", &args.connect_timeout);
        let request_timeout =
            c.positive_duration("IDEMPROXY_REQUEST_TIMEOUT", &args.request_timeout);
        let upstream_idle_timeout = c.positive_duration(
            "IDEMPROXY_UPSTREAM_IDLE_TIMEOUT",
            &args.upstream_idle_timeout,
        );
        let upstream_max_idle = c.count("IDEMPROXY_UPSTREAM_MAX_IDLE", &args.upstream_max_idle, 0);
        let ca_file = args.upstream_ca_file.as_deref().and_then(|p| {
            c.parse("IDEMPROXY_UPSTREAM_CA_FILE", p, None, |v| {
                existing_file(v).map(Some)
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
                existing_file(v).map(Some)
            })
        });
        let key = args.upstream_client_key.as_deref().and_then(|p| {
            c.parse("IDEMPROXY_UPSTREAM_CLIENT_KEY", p, None, |v| {
                existing_file(v).map(Some)
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
        let max_connections = c.count("IDEMPROXY_MAX_CONNECTIONS", &args.max_connections, 1);
        let drain_timeout = c.duration("IDEMPROXY_DRAIN_TIMEOUT", &args.drain_timeout);
        let workers = match c.count("IDEMPROXY_WORKERS", &args.workers, 0) {
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
        ];
        let mut out = String::new();
        for (name, value) in lines {
            out.push_str("IDEMPROXY_");
            out.push_str(name);
            out.push('=');
            out.push_str(&value);
            out.push('\n');
        }
        out
    }
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
