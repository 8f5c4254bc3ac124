//! The admin listener, separate from traffic: `/healthz` (the process is
//! alive), `/readyz` (listening and not draining), `/metrics` (Prometheus
//! text), `/sessions` (tracked sessions, ids shown only as digests) and
//! `DELETE /sessions/{digest}` (stop one).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::debug;

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

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    registry: Arc<Registry>,
    readiness: Readiness,
    sessions: Option<SessionTracker>,
}

impl Admin {
    /// Creates the admin endpoints over a finished registry.
    pub fn new(registry: Registry, readiness: Readiness, sessions: Option<SessionTracker>) -> Self {
        Self {
            registry: Arc::new(registry),
            readiness,
            sessions,
        }
    }

    /// Answers one admin request.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Body> {
        let text = |status: StatusCode, body: &'static str| {
            let mut r = Response::new(body::full(body));
            *r.status_mut() = status;
            r
        };
        if req.method() == Method::DELETE {
            // DELETE /sessions/{digest}: stop tracking one session.
            let digest = req.uri().path().strip_prefix("/sessions/");
            return match (digest, &self.sessions) {
                (Some(d), Some(t)) if t.remove_by_digest(d) => text(StatusCode::NO_CONTENT, ""),
                (Some(_), _) => text(StatusCode::NOT_FOUND, "no such session\n"),
                (None, _) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            };
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
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
                    header::HeaderValue::from_static(
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
                let doc = serde_json::json!({ "sessions": views });
                let mut r = Response::new(body::full(doc.to_string()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz, /metrics or /sessions\n",
            ),
        }
    }

    /// Serves the admin endpoints until `shutdown` resolves.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        debug!(error = %e, "admin accept failed");
                        continue;
                    }
                },
            };
            let admin = self.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = admin.handle(&req);
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
