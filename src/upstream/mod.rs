//! The upstream client: idemproxy's own pool of keep-alive connections to
//! its one upstream, TLS through rustls with HTTP/2 by ALPN, and errors
//! classified for retries and for the client.
//!
//! [`UpstreamService`] is the innermost tower service. It accepts requests whose
//! URI is only a path and query (the edge, heartbeats and verification all
//! build such requests) and sends them to the one configured upstream.
//!
//! - `pool`: the connections (idle HTTP/1.1 ones, one shared HTTP/2 one),
//!   idle timeout and bound, the stale-connection retry;
//! - `body`: the HTTP/1.1 response body that gives its connection back when
//!   read to the end;
//! - `error`: where an exchange failed, and the [`ProxyError`] that says
//!   whether a retry is safe.
//!
//! One upstream needs no pool key, no hashing and no task per request, which
//! a general-purpose pooled client spends on every request.
//!
//! ```no_run
//! # fn example(config: &idemproxy::config::UpstreamConfig) -> Result<(), idemproxy::upstream::ClientBuildError> {
//! let upstream = idemproxy::upstream::UpstreamService::new(config)?;
//! println!("forwarding to {}", upstream.upstream());
//! # Ok(()) }
//! ```

mod body;
mod error;
mod pool;

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use self::error::error_kind;
use self::pool::{Pool, PoolConfig};
use crate::body::Body;
use crate::config::{TlsConfig, Upstream, UpstreamConfig};
use crate::error::ProxyError;
use crate::service::ResponseFuture;

/// Why the upstream client could not be built (bad TLS material).
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot read {what} from {path}: {detail}")]
    Pem {
        /// Which file this was.
        what: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error(
        "the TLS configuration was rejected (check IDEMPROXY_UPSTREAM_CLIENT_CERT and IDEMPROXY_UPSTREAM_CLIENT_KEY belong together): {0}"
    )]
    Tls(#[from] rustls::Error),
    /// No trusted roots at all.
    #[error(
        "no trusted CA certificates: the system has none and IDEMPROXY_UPSTREAM_CA_FILE is not set"
    )]
    NoRoots,
}

/// The innermost service: sends a request to the upstream over the shared pool.
///
/// Cloning it (tower's layers clone their inner service per request) costs
/// one reference count.
#[derive(Clone)]
pub struct UpstreamService {
    pool: Arc<Pool>,
}

/// Largest read from an HTTP/1.1 upstream connection, and so the largest
/// response body chunk handed on to the client.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

impl UpstreamService {
    /// Builds the (empty) pool from the configuration.
    pub fn new(config: &UpstreamConfig) -> Result<Self, ClientBuildError> {
        let tls = tls_config(&config.tls)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let mut http1 = hyper::client::conn::http1::Builder::new();
        // hyper grows a connection's read buffer to ~400 KiB on a fast
        // download, and a buffer still shared with chunks in flight to the
        // client is reallocated rather than reused: a few downloads held
        // tens of MiB. 64 KiB reads keep memory bounded at full speed.
        http1.max_buf_size(UPSTREAM_READ_BUFFER);
        let pool = Pool::new(PoolConfig {
            upstream: config.target.clone(),
            connector,
            http1,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            max_idle: config.max_idle,
        });
        Ok(Self {
            pool: Arc::new(pool),
        })
    }

    /// The upstream this service sends to.
    pub fn upstream(&self) -> &Upstream {
        self.pool.upstream()
    }
}

impl tower::Service<Request<Body>> for UpstreamService {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The connection decides HTTP/1.1 or HTTP/2 (ALPN); a client's h2c
        // request must not force HTTP/2 onto an HTTP/1.1 upstream.
        *req.version_mut() = Version::HTTP_11;
        let pool = self.pool.clone();
        Box::pin(async move {
            pool.send(req)
                .await
                .map_err(|e| error_kind(e, pool.connect_timeout()))
        })
    }
}

fn tls_config(tls: &TlsConfig) -> Result<ClientConfig, ClientBuildError> {
    let mut roots = rustls::RootCertStore::empty();
    if !tls.ca_only {
        // Unreadable individual system certificates are skipped, as every TLS client does.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
    }
    if let Some(path) = &tls.ca_file {
        for cert in read_certs(path, "CA certificates")? {
            roots
                .add(cert)
                .map_err(|e| pem_error("CA certificates", path, e))?;
        }
    }
    if roots.is_empty() {
        return Err(ClientBuildError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match &tls.client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert, "client certificate")?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("client key", key, e))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

fn read_certs(
    path: &std::path::Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ClientBuildError> {
    let file = File::open(path).map_err(|e| pem_error(what, path, e))?;
    let certs = CertificateDer::pem_reader_iter(BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn pem_error(
    what: &'static str,
    path: &std::path::Path,
    detail: impl std::fmt::Display,
) -> ClientBuildError {
    ClientBuildError::Pem {
        what,
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}
