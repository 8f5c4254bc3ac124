//! Accepting client connections: HTTP/1.1 and h2c on one port, limits on
//! connections, head size and head read time, and graceful draining.
//!
//! Each connection runs in one task (the `connection` module). An idle
//! HTTP/1.1 connection gives hyper's read and write buffers back (after a
//! second, or at once when many connections hold them) and waits for its
//! next bytes as a bare socket.

mod connection;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use crate::proxy::Proxy;

pub use crate::config::ServerLimits;

const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 85\r\n\r\n{\"error\":\"too_many_connections\",\"detail\":\"idemproxy is at IDEMPROXY_MAX_CONNECTIONS\"}";

/// What every connection task shares: the protocol settings and the proxy.
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    proxy: Proxy,
    /// HTTP/1.1 connections holding hyper's buffers now.
    buffered: AtomicUsize,
}

/// Serves `proxy` on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish within the drain timeout, and returns.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size)
        .keep_alive(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX));
    let protocols = Arc::new(Protocols {
        http1,
        http2,
        header_read_timeout: limits.header_read_timeout,
        proxy: proxy.clone(),
        buffered: AtomicUsize::new(0),
    });
    // Every connection task holds a receiver: `true` asks it to finish its
    // request and close, and the sender sees all of them gone once drained.
    let (drain, draining) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            proxy.metrics().connections_rejected.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = proxy.metrics().connections_open.clone();
        let protocols = protocols.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            open.inc();
            connection::serve(stream, remote, &protocols, draining).await;
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    drop(draining);
    info!(drain_timeout = ?limits.drain_timeout, "draining client connections");
    // No receiver left means no connection left; a failed send means the same.
    let _ = drain.send(true);
    tokio::select! {
        () = drain.closed() => info!("all client connections drained"),
        () = tokio::time::sleep(limits.drain_timeout) => warn!("drain timeout reached; closing remaining connections"),
    }
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let write = async {
        stream.write_all(BUSY_RESPONSE).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
