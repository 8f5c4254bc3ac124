//! Wiring: builds the layer stack, the listeners and the admin endpoints from
//! a [`Config`], and runs them until shutdown. This is the one place that
//! decides the order of the layers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tracing::{info, warn};

use crate::admin::{Admin, ControlConfig, Listener, Readiness};
use crate::classify::{ClassifyConfig, ClassifyLayer};
use crate::config::Config;
use crate::idempotency::{CacheMetrics, IdempotencyCacheLayer, IdempotencyKeyLayer};
use crate::metrics::ProxyMetrics;
use crate::proxy::{Proxy, Stack};
use crate::retry::{RetryLayer, RetryMetrics};
use crate::server;
use crate::sessions::{SessionLayer, SessionMetrics, SessionTracker};
use crate::upstream::{ClientBuildError, UpstreamService};
use crate::verify::{VerifyConfig, VerifyLayer, VerifyMetrics};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("{0}")]
    Bind(#[from] std::io::Error),
    /// The upstream client could not be built.
    #[error("upstream client: {0}")]
    Client(#[from] ClientBuildError),
}

/// A started proxy.
pub struct Running {
    /// Where the traffic listener is bound.
    pub listen_addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    /// Where the loopback admin control listener is bound, if configured.
    pub control_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts a graceful shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the proxy has drained and stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Builds the stack between the edge and the upstream client.
///
/// Layers, outermost first (the first sees the request first):
/// 1. classify: matches the route table, reads the body ahead when a later
///    step needs it, and puts the route's decisions in the request's
///    extensions: every layer below reads them;
/// 2. sessions (when any session source is configured): outside verification,
///    so a recovered 409 counts as the success it is for the client; registers
///    sessions on 2xx only and keeps them active while a response streams;
/// 3. idempotency cache (for keys the client sent): duplicates are answered
///    here, before a key is made or anything goes upstream;
/// 4. idempotency key: attached before the retry layer, so every attempt of
///    one request carries the same key (and the verifier can log it);
/// 5. verify: outside the retry layer, so the 409 it verifies is the final
///    answer of the retried request, and its own verification read is retried
///    too (bounded by the same deadline);
/// 6. retry: replays the body on 5xx, resets, refused connections and
///    timeouts, under the budget, but after a failure the upstream may have
///    processed only when a replay cannot run the call twice; bounds the
///    whole exchange by the deadline (`IDEMPROXY_REQUEST_TIMEOUT` or the
///    route's `timeout=`);
/// 7. the pooled upstream client.
pub fn build_stack(
    config: &Config,
    upstream: UpstreamService,
    sessions: Option<&SessionTracker>,
    registry: &mut Registry,
) -> Stack {
    let retry = RetryLayer::new(config.retry.clone(), RetryMetrics::new(registry));
    let classify = ClassifyLayer::new(ClassifyConfig {
        table: config.routes.clone(),
        session_sources: Arc::new(config.sessions.layer.sources.clone()),
        keys: Some(config.idempotency.keys.clone()),
        max_body: config.retry.max_replay_body,
        body_for_client_keys: config.idempotency.cache.is_some(),
    });
    let verify = VerifyLayer::new(
        VerifyConfig {
            upstream: config.upstream.target.clone(),
            request_timeout: config.upstream.request_timeout,
            max_body: config.retry.max_replay_body.max(64 * 1024),
            key_header: config.idempotency.keys.header.clone(),
        },
        VerifyMetrics::new(registry),
    );
    let sessions = sessions.map(|t| SessionLayer::new(t.clone(), config.sessions.layer.clone()));
    let cache = config
        .idempotency
        .cache
        .clone()
        .map(|c| IdempotencyCacheLayer::new(c, CacheMetrics::new(registry)));
    let stack = ServiceBuilder::new()
        .layer(classify)
        .option_layer(sessions)
        .option_layer(cache)
        .layer(IdempotencyKeyLayer::new(config.idempotency.keys.clone()))
        .layer(verify)
        .layer(retry)
        .service(upstream);
    Stack::new(stack)
}

/// Binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::new(&mut registry);
    let upstream = UpstreamService::new(&config.upstream)?;
    let tracker = config.sessions.enabled(&config.routes).then(|| {
        let metrics = SessionMetrics::new(&mut registry);
        SessionTracker::new(config.sessions.tracker.clone(), metrics)
    });
    if tracker.is_some() {
        let t = &config.sessions.tracker;
        let per_sec_needed = t.max_sessions as f64 / t.interval.as_secs_f64();
        if per_sec_needed > f64::from(t.max_per_sec) {
            warn!(
                max_sessions = t.max_sessions,
                interval = ?t.interval,
                max_per_sec = t.max_per_sec,
                "IDEMPROXY_HEARTBEAT_MAX_PER_SEC is below IDEMPROXY_MAX_SESSIONS / IDEMPROXY_HEARTBEAT_INTERVAL: with that many sessions, heartbeats fall behind the interval"
            );
        }
    }
    let stack = build_stack(&config, upstream.clone(), tracker.as_ref(), &mut registry);
    let server_config = &config.server;
    let proxy = Proxy::new(
        stack,
        config.upstream.target.clone(),
        server_config.edge.clone(),
        metrics,
    );
    let listener = server::bind(server_config.listen).await?;
    let admin_listener = server::bind(server_config.admin_listen).await?;
    // Loopback only (checked in `config`): the one admin listener that serves changes.
    let control_listener = match server_config.admin_control.listen {
        Some(addr) => Some(server::bind(addr).await?),
        None => None,
    };
    let listen_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let control_addr = control_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let readiness = Readiness::default();
    let admin = Admin::new(
        registry,
        readiness.clone(),
        tracker.clone(),
        ControlConfig {
            listen: control_addr,
            token: server_config.admin_control.token.clone(),
        },
    );
    let shutdown = CancellationToken::new();
    let limits = server_config.limits.clone();
    info!(
        listen = %listen_addr,
        admin = %admin_addr,
        admin_control = control_addr.map(|a| a.to_string()),
        admin_token = server_config.admin_control.token.is_some(),
        upstream = %config.upstream.target,
        "idemproxy started"
    );
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let admin_stop = CancellationToken::new();
        let control_task = control_listener.map(|l| {
            tokio::spawn(admin.clone().serve(
                l,
                Listener::Control,
                admin_stop.clone().cancelled_owned(),
            ))
        });
        let admin_task = tokio::spawn(admin.serve(
            admin_listener,
            Listener::Admin,
            admin_stop.clone().cancelled_owned(),
        ));
        // One scheduler for every session's heartbeats, through the same pooled client.
        let heartbeat_stop = CancellationToken::new();
        let scheduler = tracker
            .as_ref()
            .map(|t| t.spawn_scheduler(upstream, heartbeat_stop.clone().cancelled_owned()));
        readiness.set(true);
        let ready = readiness.clone();
        let stop = async move {
            token.cancelled().await;
            ready.set(false);
            info!("shutdown requested: readiness off, no new connections");
        };
        server::serve(listener, proxy, limits, stop).await;
        heartbeat_stop.cancel();
        if let Some(scheduler) = scheduler {
            let _ = tokio::time::timeout(Duration::from_secs(1), scheduler).await;
        }
        admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
        if let Some(control_task) = control_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), control_task).await;
        }
        info!("idemproxy stopped");
    });
    Ok(Running {
        listen_addr,
        admin_addr,
        control_addr,
        shutdown,
        task,
    })
}
