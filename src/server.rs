//! Accepting client connections: HTTP/1.1 and h2c on one port, limits on
//! connections, head size and head read time, and graceful draining.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::extensions::RemoteAddr;
use crate::proxy::Proxy;

pub use crate::config::ServerLimits;

const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 85\r\n\r\n{\"error\":\"too_many_connections\",\"detail\":\"idemproxy is at IDEMPROXY_MAX_CONNECTIONS\"}";

/// Serves `proxy` on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish within the drain timeout, and returns.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
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
        let conn_proxy = proxy.clone();
        // hyper's header read timeout only starts once the protocol is detected, so a
        // client that sends nothing (or half an h2 preface) would hold its connection
        // slot forever: its first request must arrive within the header read timeout.
        let first_request = Arc::new(Notify::new());
        let arrived = first_request.clone();
        let svc = service_fn(move |mut req| {
            arrived.notify_one();
            req.extensions_mut().insert(RemoteAddr(remote));
            conn_proxy.serve(req)
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        // Boxed once here: an idle keep-alive connection then costs its
        // connection state (~1.7 KiB) plus a small task, where moving the
        // connection into the task's async blocks kept two more copies of
        // that space in the task (5.5 KiB a connection in all).
        let mut conn = Box::pin(graceful.watch(conn.into_owned()));
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            open.inc();
            let served = async {
                let first = tokio::time::timeout(header_read_timeout, first_request.notified());
                tokio::select! {
                    result = conn.as_mut() => return result,
                    in_time = first => if in_time.is_err() {
                        debug!(%remote, "no request within the header read timeout; closing");
                        return Ok(());
                    },
                }
                conn.await
            };
            if let Err(e) = served.await {
                debug!(%remote, error = %e, "client connection ended with an error");
            }
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    info!(drain_timeout = ?limits.drain_timeout, "draining client connections");
    tokio::select! {
        () = graceful.shutdown() => info!("all client connections drained"),
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
