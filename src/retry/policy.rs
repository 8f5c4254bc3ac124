//! Which outcomes are retried, in Envoy's vocabulary, and how long a
//! `Retry-After` asks us to wait.
//!
//! ```
//! use idemproxy::retry::policy::{RetryClass, RetryOn};
//! let on = RetryOn::parse("5xx,reset,connect-failure").unwrap();
//! assert!(on.contains(RetryClass::Reset));
//! assert!(!on.contains(RetryClass::Timeout));
//! assert!(RetryOn::parse("5xx,flaky").unwrap_err().to_string().contains("flaky"));
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header};

use crate::error::ProxyError;

/// One class of retriable outcome; its name is Envoy's `retry_on` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryClass {
    /// `5xx`: a response status in the configured list (default 500, 502, 503, 504).
    FiveXx,
    /// `gateway-error`: a 502, 503 or 504 response.
    GatewayError,
    /// `reset`: the connection closed before response headers, whether or not
    /// the request was sent (it includes `reset-before-request` and
    /// `refused-stream`).
    Reset,
    /// `reset-before-request`: the connection closed before any byte of the
    /// request was written.
    ResetBeforeRequest,
    /// `refused-stream`: the HTTP/2 upstream refused the stream
    /// (`REFUSED_STREAM`, or a GOAWAY whose last stream id is below it).
    RefusedStream,
    /// `connect-failure`: the connection could not be made (refused, TLS, connect timeout).
    ConnectFailure,
    /// `timeout`: no response headers within the per-try timeout.
    Timeout,
    /// `retriable-status-codes`: a response status in the explicit extra list (e.g. 429).
    RetriableStatusCodes,
}

impl RetryClass {
    /// Every class, in the order they are documented.
    pub const ALL: [RetryClass; 8] = [
        Self::FiveXx,
        Self::GatewayError,
        Self::Reset,
        Self::ResetBeforeRequest,
        Self::RefusedStream,
        Self::ConnectFailure,
        Self::Timeout,
        Self::RetriableStatusCodes,
    ];

    /// The valid words, for help texts and error messages.
    pub const VALID_WORDS: &'static str = "5xx, gateway-error, reset, reset-before-request, \
         refused-stream, connect-failure, timeout, retriable-status-codes";

    /// The Envoy word for this class; also the `reason` label of the retry metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FiveXx => "5xx",
            Self::GatewayError => "gateway-error",
            Self::Reset => "reset",
            Self::ResetBeforeRequest => "reset-before-request",
            Self::RefusedStream => "refused-stream",
            Self::ConnectFailure => "connect-failure",
            Self::Timeout => "timeout",
            Self::RetriableStatusCodes => "retriable-status-codes",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for RetryClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word of a `retry_on` list that is not one of Envoy's classes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown retry class `{word}`; expected a comma-separated list of: {}",
    RetryClass::VALID_WORDS
)]
pub struct ParseRetryOnError {
    /// The word that was not understood.
    pub word: String,
}

/// A set of [`RetryClass`]es, parsed from a comma-separated list such as
/// `5xx,reset,connect-failure,timeout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn(u8);

impl RetryOn {
    /// No class: nothing is retried.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Parses a comma-separated list of Envoy words; spaces around words and
    /// empty items are ignored, so `""` is the empty set.
    pub fn parse(text: &str) -> Result<Self, ParseRetryOnError> {
        let mut set = Self::empty();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let class = RetryClass::ALL
                .into_iter()
                .find(|c| c.as_str().eq_ignore_ascii_case(word))
                .ok_or_else(|| ParseRetryOnError { word: word.into() })?;
            set = set.with(class);
        }
        Ok(set)
    }

    /// This set plus `class`.
    #[must_use]
    pub const fn with(self, class: RetryClass) -> Self {
        Self(self.0 | (1 << (class as u8)))
    }

    /// Whether `class` is in the set.
    pub fn contains(self, class: RetryClass) -> bool {
        self.0 & class.bit() != 0
    }

    /// Whether the set has no class.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The classes in the set, in documented order.
    pub fn iter(self) -> impl Iterator<Item = RetryClass> {
        RetryClass::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }
}

impl FromStr for RetryOn {
    type Err = ParseRetryOnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for RetryOn {
    /// Writes the set the way [`RetryOn::parse`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, class) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(class.as_str())?;
        }
        Ok(())
    }
}

/// The statuses of `gateway-error`.
const GATEWAY_ERRORS: [StatusCode; 3] = [
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// The class a response status falls in, if it is retried at all. When a
/// status is in several classes, `5xx` wins over `gateway-error` over
/// `retriable-status-codes`.
pub fn status_class(
    status: StatusCode,
    on: RetryOn,
    statuses: &[StatusCode],
    retriable: &[StatusCode],
) -> Option<RetryClass> {
    if on.contains(RetryClass::FiveXx) && statuses.contains(&status) {
        Some(RetryClass::FiveXx)
    } else if on.contains(RetryClass::GatewayError) && GATEWAY_ERRORS.contains(&status) {
        Some(RetryClass::GatewayError)
    } else if on.contains(RetryClass::RetriableStatusCodes) && retriable.contains(&status) {
        Some(RetryClass::RetriableStatusCodes)
    } else {
        None
    }
}

/// The class an upstream error falls in, if it is retried at all. A broken
/// request body (the client's fault) and unclassified errors never are. The
/// narrower `reset-before-request` and `refused-stream` are named when
/// enabled themselves or through `reset`.
pub fn error_class(error: &ProxyError, on: RetryOn) -> Option<RetryClass> {
    let narrow =
        |class: RetryClass| (on.contains(class) || on.contains(RetryClass::Reset)).then_some(class);
    let class = match error {
        ProxyError::Connect(_) | ProxyError::ConnectTimeout(_) => RetryClass::ConnectFailure,
        ProxyError::Reset(_) => RetryClass::Reset,
        ProxyError::ResetBeforeRequest(_) => return narrow(RetryClass::ResetBeforeRequest),
        ProxyError::RefusedStream(_) => return narrow(RetryClass::RefusedStream),
        ProxyError::Timeout(_) => RetryClass::Timeout,
        ProxyError::RequestBody(_)
        | ProxyError::Tls(_)
        | ProxyError::Other(_)
        | ProxyError::Exhausted { .. } => {
            return None;
        }
    };
    on.contains(class).then_some(class)
}

/// Whether the upstream may have processed a request that got `status`.
/// `503` and `429` say it did not handle the request (RFC 9110 §15.6.4,
/// RFC 6585 §4); any other status may come after the work was done.
pub fn status_may_have_been_processed(status: StatusCode) -> bool {
    status != StatusCode::SERVICE_UNAVAILABLE && status != StatusCode::TOO_MANY_REQUESTS
}

/// How long a `503` or `429` response asks the client to wait (`Retry-After`
/// as delta-seconds or an HTTP-date relative to `now`). `None` for other
/// statuses and for a missing or unreadable header; a date in the past is zero;
/// a number too large to represent is [`Duration::MAX`].
pub fn retry_after(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if status != StatusCode::SERVICE_UNAVAILABLE && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Every Envoy word parses, round-trips through Display, and spaces are allowed.
    #[test]
    fn retry_on_parses_envoy_words() {
        let all = RetryOn::parse(
            "5xx, gateway-error,reset,connect-failure , timeout,retriable-status-codes,\
             reset-before-request, refused-stream",
        )
        .unwrap();
        for class in RetryClass::ALL {
            assert!(all.contains(class), "{class}");
        }
        assert_eq!(RetryOn::parse(&all.to_string()), Ok(all));
        assert!(RetryOn::parse("").unwrap().is_empty());
    }

    /// An unknown word is an error naming the word and the valid list.
    #[test]
    fn retry_on_rejects_unknown_word() {
        let err = RetryOn::parse("5xx,retriable-4xx").unwrap_err();
        assert_eq!(err.word, "retriable-4xx");
        let text = err.to_string();
        assert!(text.contains("retriable-4xx") && text.contains(RetryClass::VALID_WORDS));
    }

    /// Statuses map to the configured class; other statuses are not retried.
    #[test]
    fn statuses_classify_by_configured_class() {
        let statuses = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
        ];
        let extra = [StatusCode::TOO_MANY_REQUESTS];
        let on = RetryOn::parse("gateway-error,retriable-status-codes").unwrap();
        let c = |s: u16| status_class(StatusCode::from_u16(s).unwrap(), on, &statuses, &extra);
        assert_eq!(c(502), Some(RetryClass::GatewayError));
        assert_eq!(c(500), None);
        assert_eq!(c(429), Some(RetryClass::RetriableStatusCodes));
        assert_eq!(c(404), None);
        let on = RetryOn::parse("5xx").unwrap();
        let c = |s: u16| status_class(StatusCode::from_u16(s).unwrap(), on, &statuses, &extra);
        assert_eq!(c(500), Some(RetryClass::FiveXx));
        assert_eq!(c(502), None);
    }

    /// A broken request body is never retried, even with every class on.
    #[test]
    fn request_body_errors_are_never_retried() {
        let all = RetryOn::parse(RetryClass::VALID_WORDS).unwrap();
        assert_eq!(error_class(&ProxyError::RequestBody("x".into()), all), None);
        assert_eq!(
            error_class(&ProxyError::ConnectTimeout(Duration::from_secs(1)), all),
            Some(RetryClass::ConnectFailure)
        );
        assert_eq!(
            error_class(&ProxyError::Reset("x".into()), RetryOn::empty()),
            None
        );
    }

    /// Retry-After reads seconds and HTTP-dates, only on 503 and 429.
    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            retry_after(unavailable, &h, now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(StatusCode::INTERNAL_SERVER_ERROR, &h, now),
            None
        );
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:50:07 GMT"),
        );
        assert_eq!(
            retry_after(StatusCode::TOO_MANY_REQUESTS, &h, now),
            Some(Duration::from_secs(30))
        );
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:00:00 GMT"),
        );
        assert_eq!(retry_after(unavailable, &h, now), Some(Duration::ZERO));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(unavailable, &h, now), None);
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("99999999999999999999999"),
        );
        assert_eq!(retry_after(unavailable, &h, now), Some(Duration::MAX));
    }
}
