//! The upstream client: pooled keep-alive connections, TLS through rustls with
//! HTTP/2 by ALPN, and errors classified for retries and for the client.
//!
//! [`UpstreamService`] is the innermost tower service. It accepts requests whose
//! URI is only a path and query (the edge, heartbeats and verification all
//! build such requests) and sends them to the one configured upstream.

use std::error::Error as StdError;
use std::fs::File;
use std::io::{self, BufReader};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::body::{self, Body};
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

type HttpsClient = Client<HttpsConnector<HttpConnector>, Body>;

/// The innermost service: sends a request to the upstream over the shared pool.
///
/// Cloning it (tower's layers clone their inner service per request) costs
/// one reference count.
#[derive(Clone)]
pub struct UpstreamService {
    shared: Arc<Shared>,
}

struct Shared {
    client: HttpsClient,
    upstream: Upstream,
    connect_timeout: Duration,
}

/// Largest read from an HTTP/1.1 upstream connection, and so the largest
/// response body chunk handed on to the client.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

impl UpstreamService {
    /// Builds the pooled client from the configuration.
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
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle)
            // hyper grows a connection's read buffer to ~400 KiB on a fast
            // download, and a buffer still shared with chunks in flight to the
            // client is reallocated rather than reused: a few downloads held
            // tens of MiB. 64 KiB reads keep memory bounded at full speed.
            .http1_max_buf_size(UPSTREAM_READ_BUFFER)
            // A request that failed on a reused connection before any byte was
            // written is sent again on a fresh one (hyper-util's default, kept explicit).
            .retry_canceled_requests(true)
            .build(connector);
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                upstream: config.target.clone(),
                connect_timeout: config.connect_timeout,
            }),
        })
    }

    /// The upstream this service sends to.
    pub fn upstream(&self) -> &Upstream {
        &self.shared.upstream
    }

    /// The upstream's scheme and authority in front of the request's path and
    /// query, which moves over as it is (no re-parsing, no copy).
    fn absolute_uri(&self, uri: Uri) -> Result<Uri, http::uri::InvalidUriParts> {
        let mut parts = uri.into_parts();
        parts.scheme = Some(self.shared.upstream.scheme.clone());
        parts.authority = Some(self.shared.upstream.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        Uri::from_parts(parts)
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
        let connect_timeout = self.shared.connect_timeout;
        match self.absolute_uri(std::mem::take(req.uri_mut())) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return Box::pin(std::future::ready(Err(ProxyError::Other(e.into())))),
        }
        // The pool picks HTTP/1.1 or HTTP/2 per connection (ALPN); a client's
        // h2c request must not force HTTP/2 onto an HTTP/1.1 upstream.
        *req.version_mut() = Version::HTTP_11;
        // `request` clones the client into its own (lazy) future: calling it
        // here instead of inside ours saves a second clone of the whole
        // client per request and keeps our future small.
        let response = self.shared.client.request(req);
        Box::pin(async move {
            match response.await {
                Ok(resp) => Ok(resp.map(body::boxed)),
                Err(e) => Err(error_kind(e, connect_timeout)),
            }
        })
    }
}

/// Maps a client error to what happened, for retries, metrics and the client.
fn error_kind(err: hyper_util::client::legacy::Error, connect_timeout: Duration) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    let mut timed_out = false;
    let mut reset = false;
    let mut user = false;
    let mut tls = false;
    let mut before_request = false;
    let mut refused = false;
    while let Some(e) = source {
        if e.downcast_ref::<rustls::Error>().is_some() {
            tls = true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // rustls errors travel inside io::Error, whose source() skips them.
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                tls = true;
            }
            match io.kind() {
                io::ErrorKind::TimedOut => timed_out = true,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => reset = true,
                _ => {}
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            // hyper cancels a request only when it never started writing it
            // (the connection closed while the request was queued).
            if h.is_canceled() {
                before_request = true;
            }
            if h.is_incomplete_message() {
                reset = true;
            }
            if h.is_user() {
                user = true;
            }
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            refused |= is_refused_stream(h2);
        }
        source = e.source();
    }
    let err = Box::new(WithCauses(err));
    if err.0.is_connect() {
        if tls {
            ProxyError::Tls(err)
        } else if timed_out {
            ProxyError::ConnectTimeout(connect_timeout)
        } else {
            ProxyError::Connect(err)
        }
    } else if user {
        ProxyError::RequestBody(err)
    } else if refused {
        ProxyError::RefusedStream(err)
    } else if before_request {
        ProxyError::ResetBeforeRequest(err)
    } else if reset {
        ProxyError::Reset(err)
    } else {
        ProxyError::Other(err)
    }
}

/// Whether an HTTP/2 error says the upstream did not process the stream: a
/// `RST_STREAM(REFUSED_STREAM)`, or a graceful GOAWAY (`NO_ERROR`) from the
/// upstream, which h2 reports only on streams above the GOAWAY's last stream
/// id (streams at or below it are finished normally). A GOAWAY with an error
/// code reaches every open stream, processed or not, so it is not a refusal.
fn is_refused_stream(error: &h2::Error) -> bool {
    match error.reason() {
        Some(h2::Reason::REFUSED_STREAM) => error.is_reset() || error.is_go_away(),
        Some(h2::Reason::NO_ERROR) => error.is_go_away() && error.is_remote(),
        _ => false,
    }
}

/// A client error whose message also names its causes: hyper-util's own stops
/// at "client error (Connect)", which hides e.g. a refused certificate from the
/// client's error detail and from the logs.
#[derive(Debug)]
struct WithCauses(hyper_util::client::legacy::Error);

impl std::fmt::Display for WithCauses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(e) = source {
            let cause = e.to_string();
            // io::Error repeats its inner error's message: name each cause once.
            if !text.contains(&cause) {
                text.push_str(": ");
                text.push_str(&cause);
            }
            source = e.source();
        }
        f.write_str(&text)
    }
}

impl StdError for WithCauses {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
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
