//! The checks of a client's HTTP/1 request head that hyper leaves to the
//! server (RFC 9112): a request that fails one is answered here and never
//! reaches the upstream.
//!
//! - `Host` (§3.2): an HTTP/1.1 request without one, any request with more
//!   than one `Host` line, or with a value that is no `host[:port]`, gets 400.
//!   An empty `Host` is valid (a target without authority).
//! - `Transfer-Encoding` (§6.1): hyper decodes the final `chunked` and
//!   passes the header on (a body whose last coding is not `chunked` it
//!   answers 400 itself, §6.3); any other coding (`gzip, chunked`) would be
//!   lost when the body is forwarded re-chunked, so it gets 501, as a server
//!   does for a coding it does not understand. `chunked` twice gets 400.
//!
//! ```
//! use http::{HeaderMap, HeaderValue, Version, header};
//! use idemproxy::proxy::conformance::{HeadProblem, check_head};
//! let mut headers = HeaderMap::new();
//! headers.insert(header::HOST, HeaderValue::from_static("backend:8080"));
//! assert_eq!(check_head(Version::HTTP_11, &headers), Ok(()));
//! headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
//! assert_eq!(
//!     check_head(Version::HTTP_11, &headers),
//!     Err(HeadProblem::UnsupportedTransferCoding)
//! );
//! ```

use http::header::{self, HeaderMap};
use http::{Response, StatusCode, Version};

use crate::body::Body;
use crate::error::json_error;

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProblem {
    /// HTTP/1.1 without `Host`.
    MissingHost,
    /// More than one `Host` line.
    DuplicateHost,
    /// A `Host` that is not `host[:port]`.
    InvalidHost,
    /// A transfer coding other than one final `chunked`.
    UnsupportedTransferCoding,
    /// `chunked` more than once.
    RepeatedChunked,
}

impl HeadProblem {
    /// The JSON error answer: 400, or 501 for an unknown transfer coding.
    pub fn into_response(self) -> Response<Body> {
        let (status, error, detail) = match self {
            Self::MissingHost => (
                StatusCode::BAD_REQUEST,
                "bad_host",
                "an HTTP/1.1 request must carry a Host header (RFC 9112 section 3.2)",
            ),
            Self::DuplicateHost => (
                StatusCode::BAD_REQUEST,
                "bad_host",
                "the request carries more than one Host header; send exactly one (RFC 9112 section 3.2)",
            ),
            Self::InvalidHost => (
                StatusCode::BAD_REQUEST,
                "bad_host",
                "the Host header is not host[:port]; send the authority of the URL (RFC 9112 section 3.2)",
            ),
            Self::UnsupportedTransferCoding => (
                StatusCode::NOT_IMPLEMENTED,
                "unsupported_transfer_coding",
                "idemproxy understands only the chunked transfer coding; send the body with Transfer-Encoding: chunked alone, or with Content-Length (RFC 9112 section 6.1)",
            ),
            Self::RepeatedChunked => (
                StatusCode::BAD_REQUEST,
                "bad_transfer_encoding",
                "chunked is applied more than once; send Transfer-Encoding: chunked once (RFC 9112 section 6.1)",
            ),
        };
        json_error(status, error, detail, None)
    }
}

/// Checks `Host` and `Transfer-Encoding` of an HTTP/1 request head; HTTP/2
/// heads are framed and carry `:authority`, so they pass.
pub fn check_head(version: Version, headers: &HeaderMap) -> Result<(), HeadProblem> {
    if version == Version::HTTP_2 || version == Version::HTTP_3 {
        return Ok(());
    }
    check_host(version, headers)?;
    check_transfer_encoding(headers)
}

fn check_host(version: Version, headers: &HeaderMap) -> Result<(), HeadProblem> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return if version == Version::HTTP_11 {
            Err(HeadProblem::MissingHost)
        } else {
            Ok(())
        };
    };
    if hosts.next().is_some() {
        return Err(HeadProblem::DuplicateHost);
    }
    // Host = uri-host [ ":" port ]; an empty value is valid.
    if host.is_empty() || is_host_and_port(host.as_bytes()) {
        Ok(())
    } else {
        Err(HeadProblem::InvalidHost)
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2): a bracketed IPv6 literal or a
/// reg-name / IPv4 address (never user information), then an optional port
/// up to 65535. Checked in place: this runs on every request, so it
/// allocates nothing.
fn is_host_and_port(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        match value.iter().position(|&b| b == b']') {
            Some(end) => value.split_at(end + 1),
            None => return false,
        }
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(colon) => value.split_at(colon),
            None => (value, &[][..]),
        }
    };
    let host_ok = match host {
        [b'[', inside @ .., b']'] => {
            !inside.is_empty()
                && inside
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        }
        _ => {
            !host.is_empty()
                && host
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b))
        }
    };
    let port_ok = match port {
        [] | [b':'] => true,
        [b':', digits @ ..] => {
            digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= 65535
        }
        _ => false,
    };
    host_ok && port_ok
}

fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), HeadProblem> {
    let mut chunked = 0usize;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Err(HeadProblem::UnsupportedTransferCoding);
        };
        // A list; empty elements are allowed (RFC 9110 section 5.6.1).
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else {
                return Err(HeadProblem::UnsupportedTransferCoding);
            }
        }
    }
    if chunked > 1 {
        return Err(HeadProblem::RepeatedChunked);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn host_rules_follow_rfc_9112() {
        let v11 = Version::HTTP_11;
        assert_eq!(check_head(v11, &head(&[("host", "a:1")])), Ok(()));
        assert_eq!(check_head(v11, &head(&[("host", "")])), Ok(()));
        assert_eq!(check_head(v11, &head(&[("host", "[::1]:80")])), Ok(()));
        assert_eq!(check_head(v11, &head(&[("host", "[::1]")])), Ok(()));
        assert_eq!(check_head(v11, &head(&[("host", "a:")])), Ok(()));
        assert_eq!(check_head(Version::HTTP_10, &head(&[])), Ok(()));
        assert_eq!(check_head(Version::HTTP_2, &head(&[])), Ok(()));
        assert_eq!(check_head(v11, &head(&[])), Err(HeadProblem::MissingHost));
        assert_eq!(
            check_head(Version::HTTP_10, &head(&[("host", "a"), ("host", "a")])),
            Err(HeadProblem::DuplicateHost)
        );
        for bad in ["a b", "u@a", "a/b", "a:port", "a:99999", "[::1]x"] {
            assert_eq!(
                check_head(v11, &head(&[("host", bad)])),
                Err(HeadProblem::InvalidHost),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_one_final_chunked_is_understood() {
        let with = |te| head(&[("host", "a"), ("transfer-encoding", te)]);
        assert_eq!(check_head(Version::HTTP_11, &with("chunked")), Ok(()));
        assert_eq!(check_head(Version::HTTP_11, &with(" Chunked ,")), Ok(()));
        for bad in ["gzip, chunked", "chunked;x=1", "identity", "x, chunked"] {
            assert_eq!(
                check_head(Version::HTTP_11, &with(bad)),
                Err(HeadProblem::UnsupportedTransferCoding),
                "{bad}"
            );
        }
        assert_eq!(
            check_head(Version::HTTP_11, &with("chunked, chunked")),
            Err(HeadProblem::RepeatedChunked)
        );
    }
}
