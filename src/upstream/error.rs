//! What went wrong talking to the upstream, and what that means for a retry.
//!
//! [`UpstreamError`] says only where it failed (connecting or sending) and
//! keeps the cause; its message names every cause in the chain, so a refused
//! certificate reaches the client's error detail and the logs. [`error_kind`]
//! reads the chain once and picks the [`ProxyError`] the retry layer decides
//! on: `ResetBeforeRequest` and `RefusedStream` only when the upstream
//! certainly never saw the request.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::BoxError;
use crate::error::ProxyError;

/// Where the exchange with the upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// TCP connect, TLS handshake or HTTP handshake: no request was sent.
    Connect,
    /// Sending the request or reading the response head.
    Send,
}

/// An exchange with the upstream that failed, and its cause.
#[derive(Debug)]
pub(super) struct UpstreamError {
    stage: Stage,
    cause: BoxError,
}

impl UpstreamError {
    /// Connecting (TCP, TLS, HTTP handshake) failed.
    pub(super) fn connect(cause: impl Into<BoxError>) -> Self {
        Self {
            stage: Stage::Connect,
            cause: cause.into(),
        }
    }

    /// The same failure as `shared`'s, for a request that waited for it.
    pub(super) fn shared(shared: Arc<UpstreamError>) -> Self {
        Self {
            stage: shared.stage,
            cause: Box::new(Shared(shared)),
        }
    }

    /// Sending the request or reading the response head failed.
    pub(super) fn send(cause: impl Into<BoxError>) -> Self {
        Self {
            stage: Stage::Send,
            cause: cause.into(),
        }
    }
}

impl fmt::Display for UpstreamError {
    /// "connect failed: tcp connect error: Connection refused (os error 111)":
    /// the stage, then each cause of the chain once.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::from(match self.stage {
            Stage::Connect => "connect failed",
            Stage::Send => "request failed",
        });
        let mut source: Option<&(dyn StdError + 'static)> = Some(&*self.cause);
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

impl StdError for UpstreamError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.cause)
    }
}

/// The cause of a failure that several requests share: it reads as the
/// cause, which comes next in its chain.
#[derive(Debug)]
struct Shared(Arc<UpstreamError>);

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0.cause, f)
    }
}

impl StdError for Shared {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0.cause)
    }
}

/// Maps an upstream error to what happened, for retries, metrics and the client.
pub(super) fn error_kind(err: UpstreamError, connect_timeout: Duration) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(&*err.cause);
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
    let stage = err.stage;
    let err: BoxError = Box::new(err);
    if stage == Stage::Connect {
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

/// Whether the error chain holds an HTTP/2 GOAWAY: the connection takes no
/// new streams, so it must not be shared any longer.
pub(super) fn is_go_away(err: &UpstreamError) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = Some(&*err.cause);
    while let Some(e) = source {
        if e.downcast_ref::<h2::Error>()
            .is_some_and(h2::Error::is_go_away)
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connect error whose cause is a refused certificate is a `Tls`
    /// error, and its message names the certificate problem.
    #[test]
    fn refused_certificate_is_tls_and_named_in_the_message() {
        let rustls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, rustls);
        let err = error_kind(UpstreamError::connect(io), Duration::from_secs(1));
        assert_eq!(err.kind(), "tls");
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    /// A connect that timed out is a `ConnectTimeout` with the configured duration.
    #[test]
    fn timed_out_connect_is_connect_timeout() {
        let io = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        let err = error_kind(UpstreamError::connect(io), Duration::from_millis(250));
        assert!(matches!(err, ProxyError::ConnectTimeout(d) if d == Duration::from_millis(250)));
    }

    /// A reset while sending may have reached the upstream: `Reset`, not
    /// `ResetBeforeRequest`; a reset while connecting is a `Connect` error.
    #[test]
    fn reset_while_sending_is_reset_and_while_connecting_is_connect() {
        let reset = || io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(
            error_kind(UpstreamError::send(reset()), Duration::ZERO).kind(),
            "reset"
        );
        assert_eq!(
            error_kind(UpstreamError::connect(reset()), Duration::ZERO).kind(),
            "connect"
        );
    }

    /// A shared connect failure reads and classifies like the original.
    #[test]
    fn shared_failure_reads_and_classifies_like_the_original() {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        let original = UpstreamError::connect(timed_out());
        let text = original.to_string();
        let shared = UpstreamError::shared(Arc::new(UpstreamError::connect(timed_out())));
        assert_eq!(shared.to_string(), text);
        let err = error_kind(shared, Duration::from_secs(3));
        assert_eq!(err.kind(), "connect_timeout");
    }

    /// The message names the stage and each cause once.
    #[test]
    fn message_names_the_stage_and_each_cause_once() {
        let io = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let text = UpstreamError::connect(io).to_string();
        assert_eq!(text, "connect failed: refused");
    }
}
