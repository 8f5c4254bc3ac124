//! Wiring: builds the layer stack, the listeners and the admin endpoints from
//! a [`Config`], and runs them until shutdown. This is the one place that
//! decides the order of the layers.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tower::util::BoxCloneSyncService;
use tracing::info;

use crate::admin::{Admin, Readiness};
use crate::config::Config;
use crate::error::UpstreamError;
use crate::metrics::ProxyMetrics;
use crate::proxy::{EdgeOptions, Proxy, Stack};
use crate::server::{self, ServerLimits};
use crate::upstream::{ClientBuildError, UpstreamService};

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
/// 1. deadline: the whole exchange until response headers is bounded by
///    `IDEMPROXY_REQUEST_TIMEOUT` (504 past it).
pub fn build_stack(config: &Config, upstream: UpstreamService, _registry: &mut Registry) -> Stack {
    let timeout = config.request_timeout;
    BoxCloneSyncService::new(tower::service_fn(move |req| {
        let mut upstream = upstream.clone();
        async move {
            match tokio::time::timeout(timeout, upstream.call(req)).await {
                Ok(result) => result,
                Err(_) => Err(UpstreamError::Timeout(timeout)),
            }
        }
    }))
}

/// Binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::new(&mut registry);
    let upstream = UpstreamService::new(&config)?;
    let stack = build_stack(&config, upstream, &mut registry);
    let proxy = Proxy::new(
        stack,
        config.upstream.clone(),
        EdgeOptions {
            preserve_host: config.preserve_host,
            forwarded_headers: config.forwarded_headers,
        },
        metrics,
    );
    let listener = server::bind(config.listen).await?;
    let admin_listener = server::bind(config.admin_listen).await?;
    let listen_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let readiness = Readiness::default();
    let admin = Admin::new(registry, readiness.clone());
    let shutdown = CancellationToken::new();
    let limits = ServerLimits {
        max_header_size: config.max_header_size,
        header_read_timeout: config.header_read_timeout,
        max_connections: config.max_connections,
        drain_timeout: config.drain_timeout,
    };
    info!(listen = %listen_addr, admin = %admin_addr, upstream = %config.upstream, "idemproxy started");
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let admin_stop = CancellationToken::new();
        let admin_task =
            tokio::spawn(admin.serve(admin_listener, admin_stop.clone().cancelled_owned()));
        readiness.set(true);
        let ready = readiness.clone();
        let stop = async move {
            token.cancelled().await;
            ready.set(false);
            info!("shutdown requested: readiness off, no new connections");
        };
        server::serve(listener, proxy, limits, stop).await;
        admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
        info!("idemproxy stopped");
    });
    Ok(Running {
        listen_addr,
        admin_addr,
        shutdown,
        task,
    })
}
