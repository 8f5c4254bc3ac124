//! The admin endpoints, separate from traffic: `/healthz` (the process is
//! alive), `/readyz` (listening and not draining), `/metrics` (Prometheus
//! text), `/sessions` (tracked sessions, ids shown only as digests) and
//! `DELETE /sessions/{digest}` (stop one).
//!
//! They are served on up to two listeners ([`Listener`]):
//!
//! | listener | reads (`GET`, `HEAD`) | changes (`DELETE`) |
//! |---|---|---|
//! | admin (`IDEMPROXY_ADMIN_LISTEN`, reachable from the pod network) | yes | only with `Authorization: Bearer <token>` when `IDEMPROXY_ADMIN_TOKEN_FILE` is set; otherwise 403 |
//! | control (`IDEMPROXY_ADMIN_CONTROL_LISTEN`, loopback only, off by default) | yes | yes |
//!
//! So nothing reachable from the pod network can change state without the
//! token, and with neither option set nothing can change state at all.
//!
//! ```
//! use idemproxy::admin::AdminToken;
//! let token = AdminToken::from_text("/run/secrets/admin-token", "s3cret-0123456789abcdef\n").unwrap();
//! assert!(token.matches(b"s3cret-0123456789abcdef"));
//! assert!(!token.matches(b"s3cret"));
//! assert!(!format!("{token:?}").contains("s3cret"));
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::body::{self, Body};
use crate::sessions::SessionTracker;

/// Shared readiness flag: true while listening and not draining.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the proxy ready or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Whether the proxy is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Which listener an admin request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `IDEMPROXY_ADMIN_LISTEN`: reachable from the pod network (the
    /// kubelet, Prometheus); a change needs the token.
    Admin,
    /// `IDEMPROXY_ADMIN_CONTROL_LISTEN`: loopback only, so only processes of
    /// the pod reach it; changes are served.
    Control,
}

/// The shortest token accepted from `IDEMPROXY_ADMIN_TOKEN_FILE`.
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer token that allows changes on the admin listener
/// (`IDEMPROXY_ADMIN_TOKEN_FILE`). Only a SHA-256 digest of the token is
/// kept, compared in constant time; `Debug` shows the file's path only.
#[derive(Clone)]
pub struct AdminToken {
    path: PathBuf,
    digest: [u8; 32],
}

impl AdminToken {
    /// Reads the token from `path`: its content, trimmed.
    pub fn read(path: &str) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!("the path of a readable file holding the admin token (reading it failed: {e})")
        })?;
        Self::from_text(path, &text)
    }

    /// The token in `text` (trimmed), read from `path`. It must be at least
    /// [`MIN_TOKEN_LEN`] visible ASCII characters, as a bearer token is.
    pub fn from_text(path: impl AsRef<Path>, text: &str) -> Result<AdminToken, String> {
        let token = text.trim();
        // What is wrong, without a word of the content.
        let wrong = if token.is_empty() {
            Some("it is empty".to_owned())
        } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
            Some("it holds spaces, control or non-ASCII characters".to_owned())
        } else if token.len() < MIN_TOKEN_LEN {
            Some(format!("it holds only {} characters", token.len()))
        } else {
            None
        };
        if let Some(wrong) = wrong {
            return Err(format!(
                "a file holding one token of at least {MIN_TOKEN_LEN} visible ASCII characters, no spaces (e.g. made by `openssl rand -hex 32`), but {wrong}"
            ));
        }
        Ok(AdminToken {
            path: path.as_ref().to_path_buf(),
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// The file the token was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `presented` is the token. Both sides are compared as SHA-256
    /// digests, byte by byte without an early exit, so the time taken says
    /// nothing about how much of a guess was right, nor about the token's length.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let diff = digest
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Who may change state through the admin endpoints.
#[derive(Clone, Debug, Default)]
pub struct ControlConfig {
    /// The loopback control listener's address (`IDEMPROXY_ADMIN_CONTROL_LISTEN`), if any.
    pub listen: Option<SocketAddr>,
    /// The token that allows changes on the admin listener (`IDEMPROXY_ADMIN_TOKEN_FILE`), if any.
    pub token: Option<AdminToken>,
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    registry: Arc<Registry>,
    readiness: Readiness,
    sessions: Option<SessionTracker>,
    control: Arc<ControlConfig>,
}

/// How a change was authorised (for the log).
#[derive(Clone, Copy, Debug)]
enum Authorised {
    ControlListener,
    Token,
}

impl Admin {
    /// Creates the admin endpoints over a finished registry. `control`
    /// says who may change state; its `listen` should be the control
    /// listener's bound address, which refusals point to.
    pub fn new(
        registry: Registry,
        readiness: Readiness,
        sessions: Option<SessionTracker>,
        control: ControlConfig,
    ) -> Self {
        Self {
            registry: Arc::new(registry),
            readiness,
            sessions,
            control: Arc::new(control),
        }
    }

    /// Answers one admin request that arrived on `on` from `peer`.
    pub fn handle<B>(&self, req: &Request<B>, on: Listener, peer: SocketAddr) -> Response<Body> {
        let text = |status: StatusCode, body: &'static str| {
            let mut r = Response::new(body::full(body));
            *r.status_mut() = status;
            r
        };
        let path = req.uri().path();
        let digest = path.strip_prefix("/sessions/").filter(|d| !d.is_empty());
        if req.method() == Method::DELETE {
            // DELETE /sessions/{digest}: stop tracking one session.
            let Some(digest) = digest else {
                return not_allowed(false);
            };
            let how = match self.authorise(req, on) {
                Ok(how) => how,
                Err(refusal) => {
                    warn!(%peer, reason = refusal.reason(), "admin: refused DELETE /sessions/{{digest}} on the admin listener");
                    return refusal.into_response(&self.control);
                }
            };
            return match &self.sessions {
                Some(t) if t.remove_by_digest(digest) => {
                    info!(%peer, digest, authorised = ?how, "admin: stopped a session (DELETE /sessions/{{digest}})");
                    text(StatusCode::NO_CONTENT, "")
                }
                _ => text(StatusCode::NOT_FOUND, "no such session\n"),
            };
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return not_allowed(digest.is_some());
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.readiness.get() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => {
                let mut out = String::new();
                if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics encoding failed\n",
                    );
                }
                let mut r = Response::new(body::full(out));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            "/sessions" => {
                let views = self
                    .sessions
                    .as_ref()
                    .map(SessionTracker::snapshot)
                    .unwrap_or_default();
                json_response(StatusCode::OK, &serde_json::json!({ "sessions": views }))
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz, /metrics or /sessions\n",
            ),
        }
    }

    /// Whether a change that arrived on `on` may be made.
    fn authorise<B>(&self, req: &Request<B>, on: Listener) -> Result<Authorised, Refusal> {
        if on == Listener::Control {
            return Ok(Authorised::ControlListener);
        }
        let Some(token) = &self.control.token else {
            return Err(Refusal::NotServed);
        };
        // `Authorization: Bearer <token>` (RFC 6750 §2.1; the scheme is case-insensitive).
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .and_then(|v| {
                let (scheme, rest) = v.split_at_checked(7)?;
                scheme
                    .eq_ignore_ascii_case(b"bearer ")
                    .then(|| rest.trim_ascii())
            });
        match presented {
            Some(p) if token.matches(p) => Ok(Authorised::Token),
            Some(_) => Err(Refusal::WrongToken),
            None => Err(Refusal::NoToken),
        }
    }

    /// Serves the admin endpoints of `on` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        on: Listener,
        shutdown: impl Future<Output = ()>,
    ) {
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        debug!(error = %e, "admin accept failed");
                        continue;
                    }
                },
            };
            let admin = self.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = admin.handle(&req, on, peer);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }
}

/// Why a change was refused on the admin listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// No token is configured: no credentials can help (403).
    NotServed,
    /// A token is configured, the request carries none (401).
    NoToken,
    /// A token is configured, the request carries another one (401).
    WrongToken,
}

impl Refusal {
    /// For the log and the JSON body; never the token.
    fn reason(self) -> &'static str {
        match self {
            Refusal::NotServed => "changes are not served on the admin listener",
            Refusal::NoToken => "no bearer token",
            Refusal::WrongToken => "wrong bearer token",
        }
    }

    /// The JSON answer: why, and where changes are served instead.
    fn into_response(self, control: &ControlConfig) -> Response<Body> {
        let control_listen = control.listen.map(|a| a.to_string());
        const WITH_TOKEN: &str = "here with `Authorization: Bearer <token>`, the token being the content of the file IDEMPROXY_ADMIN_TOKEN_FILE names";
        let instead = match (&control_listen, &control.token) {
            (Some(addr), Some(_)) => format!(
                "send it from inside the pod to the control listener http://{addr} (IDEMPROXY_ADMIN_CONTROL_LISTEN), or {WITH_TOKEN}"
            ),
            (Some(addr), None) => format!(
                "send it from inside the pod to the control listener http://{addr} (IDEMPROXY_ADMIN_CONTROL_LISTEN)"
            ),
            (None, Some(_)) => format!("send it {WITH_TOKEN}"),
            (None, None) => "changes are off: set IDEMPROXY_ADMIN_CONTROL_LISTEN to a loopback address (e.g. 127.0.0.1:7482) and send it there from inside the pod, or set IDEMPROXY_ADMIN_TOKEN_FILE to a file holding a token and send it here with `Authorization: Bearer <token>`".to_owned(),
        };
        let (status, error) = match self {
            Refusal::NotServed => (StatusCode::FORBIDDEN, "forbidden"),
            Refusal::NoToken | Refusal::WrongToken => (StatusCode::UNAUTHORIZED, "unauthorized"),
        };
        let doc = serde_json::json!({
            "error": error,
            "detail": format!("{}: this request changes state, and the admin listener (IDEMPROXY_ADMIN_LISTEN) is reachable from the pod network; {instead}", self.reason()),
            "control_listen": control_listen,
            "token_accepted": control.token.is_some(),
        });
        let mut r = json_response(status, &doc);
        // RFC 6750 §3: a 401 names the scheme, and an invalid token says so.
        let challenge = match self {
            Refusal::NotServed => None,
            Refusal::NoToken => Some("Bearer realm=\"idemproxy-admin\""),
            Refusal::WrongToken => {
                Some("Bearer realm=\"idemproxy-admin\", error=\"invalid_token\"")
            }
        };
        if let Some(challenge) = challenge {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        r
    }
}

/// `405` with the methods the path allows: `DELETE` on `/sessions/{digest}`.
fn not_allowed(session: bool) -> Response<Body> {
    let allow = if session { "DELETE" } else { "GET, HEAD" };
    let mut r = Response::new(body::full("method not allowed\n"));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn json_response(status: StatusCode, doc: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(body::full(doc.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_must_hold_a_long_visible_token() {
        for (bad, why) in [
            ("", "empty"),
            ("  \n", "empty"),
            ("zq9-zq9", "only 7 characters"),
            ("zq9 zq9-0123456789abc", "spaces"),
            ("zq9\nzq9-0123456789abc", "spaces"),
        ] {
            let err = AdminToken::from_text("/t", bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains("at least 16"), "{bad:?}: {err}");
            assert!(
                !err.contains("zq9"),
                "{bad:?}: the error shows the content: {err}"
            );
        }
        let t = AdminToken::from_text("/t", "  0123456789abcdef\n").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b""));
        assert_eq!(t.path(), Path::new("/t"));
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }
}
