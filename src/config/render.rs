//! `--check-config`: the effective configuration as `IDEMPROXY_*=value`
//! lines, each under its option's name, secrets redacted.

use std::fmt;
use std::path::PathBuf;

use super::options::*;
use super::{Config, REDACTED};
use crate::units;

impl Config {
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
            (UPSTREAM.name, self.upstream.target.to_string()),
            // Expanded: their routes and options are in the lines below.
            (PROFILE.name, self.profiles.join(",")),
            (LISTEN.name, self.server.listen.to_string()),
            (ADMIN_LISTEN.name, self.server.admin_listen.to_string()),
            (
                ADMIN_CONTROL_LISTEN.name,
                self.server
                    .admin_control
                    .listen
                    .map_or(String::new(), |a| a.to_string()),
            ),
            (
                // The path only: the token itself is never shown.
                ADMIN_TOKEN_FILE.name,
                self.server
                    .admin_control
                    .token
                    .as_ref()
                    .map_or(String::new(), |t| t.path().display().to_string()),
            ),
            (CONNECT_TIMEOUT.name, fmt_d(self.upstream.connect_timeout)),
            (REQUEST_TIMEOUT.name, fmt_d(self.upstream.request_timeout)),
            (
                UPSTREAM_IDLE_TIMEOUT.name,
                fmt_d(self.upstream.idle_timeout),
            ),
            (UPSTREAM_MAX_IDLE.name, self.upstream.max_idle.to_string()),
            (UPSTREAM_CA_FILE.name, path(&self.upstream.tls.ca_file)),
            (UPSTREAM_CA_ONLY.name, on(self.upstream.tls.ca_only).into()),
            (
                UPSTREAM_CLIENT_CERT.name,
                path(&self.upstream.tls.client_cert.as_ref().map(|c| c.0.clone())),
            ),
            (
                UPSTREAM_CLIENT_KEY.name,
                path(&self.upstream.tls.client_cert.as_ref().map(|c| c.1.clone())),
            ),
            (
                PRESERVE_HOST.name,
                on(self.server.edge.preserve_host).into(),
            ),
            (
                FORWARDED_HEADERS.name,
                on(self.server.edge.forwarded_headers).into(),
            ),
            (
                MAX_HEADER_SIZE.name,
                units::format_size(self.server.limits.max_header_size as u64),
            ),
            (
                HEADER_READ_TIMEOUT.name,
                fmt_d(self.server.limits.header_read_timeout),
            ),
            (
                MAX_CONNECTIONS.name,
                self.server.limits.max_connections.to_string(),
            ),
            (DRAIN_TIMEOUT.name, fmt_d(self.server.limits.drain_timeout)),
            (WORKERS.name, self.process.workers.to_string()),
            (LOG.name, self.process.log.clone().unwrap_or_default()),
            (
                LOG_FORMAT.name,
                format!("{:?}", self.process.log_format).to_ascii_lowercase(),
            ),
            (RETRY_ON.name, self.retry.retry_on.to_string()),
            (
                RETRY_STATUSES.name,
                join(self.retry.statuses.iter().map(|s| s.as_u16())),
            ),
            (
                RETRIABLE_STATUS_CODES.name,
                join(self.retry.retriable_status_codes.iter().map(|s| s.as_u16())),
            ),
            (MAX_ATTEMPTS.name, self.retry.max_attempts.to_string()),
            (
                TRY_TIMEOUT.name,
                self.retry.try_timeout.map_or("0".into(), fmt_d),
            ),
            (BACKOFF_BASE.name, fmt_d(self.retry.backoff_base)),
            (BACKOFF_MAX.name, fmt_d(self.retry.backoff_max)),
            (RETRY_BUDGET_RATIO.name, self.retry.budget_ratio.to_string()),
            (
                RETRY_BUDGET_MIN_PER_SEC.name,
                self.retry.budget_min_per_sec.to_string(),
            ),
            (
                RETRY_METHODS.name,
                self.retry
                    .methods
                    .as_deref()
                    .map_or(String::new(), |m| join(m.iter())),
            ),
            (
                RETRY_UNSAFE_REQUESTS.name,
                on(self.retry.retry_unsafe_requests).into(),
            ),
            (
                MAX_REPLAY_BODY.name,
                units::format_size(self.retry.max_replay_body as u64),
            ),
            (
                MAX_REPLAY_MEMORY.name,
                units::format_size(self.retry.max_replay_memory as u64),
            ),
            (
                IDEMPOTENCY_HEADER.name,
                self.idempotency.keys.header.to_string(),
            ),
            (
                IDEMPOTENCY_METHODS.name,
                join(self.idempotency.keys.methods.iter()),
            ),
            (
                IDEMPOTENCY_KEY_MODE.name,
                format!("{:?}", self.idempotency.keys.mode).to_ascii_lowercase(),
            ),
            (
                IDEMPOTENCY_TTL.name,
                self.idempotency
                    .cache
                    .as_ref()
                    .map_or("0".into(), |c| fmt_d(c.ttl)),
            ),
            (
                IDEMPOTENCY_CACHE_ENTRIES.name,
                self.idempotency
                    .cache
                    .as_ref()
                    .map_or(String::new(), |c| c.max_entries.to_string()),
            ),
            (
                IDEMPOTENCY_CACHE_BYTES.name,
                self.idempotency
                    .cache
                    .as_ref()
                    .map_or(String::new(), |c| units::format_size(c.max_bytes as u64)),
            ),
            (
                IDEMPOTENCY_SCOPE_HEADERS.name,
                self.idempotency
                    .cache
                    .as_ref()
                    .map_or(String::new(), |c| join(c.scope_headers.iter())),
            ),
            (
                SESSION_SOURCES.name,
                join(self.sessions.layer.sources.iter()),
            ),
            (
                HEARTBEAT.name,
                self.sessions
                    .layer
                    .heartbeat
                    .as_ref()
                    .map_or(String::new(), |h| format!("{} {}", h.method, h.template)),
            ),
            (
                HEARTBEAT_BODY.name,
                self.sessions
                    .layer
                    .heartbeat_body
                    .as_ref()
                    .map_or(String::new(), |t| t.to_string()),
            ),
            (
                HEARTBEAT_INTERVAL.name,
                fmt_d(self.sessions.tracker.interval),
            ),
            (
                REQUESTS_RENEW.name,
                on(self.sessions.layer.requests_renew).into(),
            ),
            (
                SESSION_IDLE_TIMEOUT.name,
                fmt_d(self.sessions.tracker.idle_timeout),
            ),
            (
                HEARTBEAT_HEADERS.name,
                join(self.sessions.layer.copy_headers.iter()),
            ),
            (
                HEARTBEAT_SET_HEADERS.name,
                // Values may be credentials: names only.
                self.sessions
                    .layer
                    .set_headers
                    .iter()
                    .map(|(n, _)| format!("{n}: {REDACTED}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            (
                HEARTBEAT_ALIVE_FIELD.name,
                self.sessions
                    .tracker
                    .alive_field
                    .as_ref()
                    .map_or(String::new(), |f| f.join(".")),
            ),
            (
                HEARTBEAT_MAX_FAILURES.name,
                self.sessions.tracker.max_failures.to_string(),
            ),
            (
                HEARTBEAT_MAX_PER_SEC.name,
                self.sessions.tracker.max_per_sec.to_string(),
            ),
            (
                HEARTBEAT_TIMEOUT.name,
                fmt_d(self.sessions.tracker.request_timeout),
            ),
            (
                MAX_SESSIONS.name,
                self.sessions.tracker.max_sessions.to_string(),
            ),
            (
                MAX_SESSION_BYTES.name,
                units::format_size(self.sessions.tracker.max_bytes as u64),
            ),
        ];
        let mut out = String::new();
        for (name, value) in lines {
            out.push_str(name);
            out.push('=');
            out.push_str(&value);
            out.push('\n');
        }
        // The route table in canonical form, one route a line, as the variable takes it.
        out.push_str(ROUTES.name);
        out.push('=');
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
