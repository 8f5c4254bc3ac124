//! Compact per-session storage: there may be 100 000 sessions, so each keeps
//! its heartbeat and credentials in as few small allocations as possible.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method};

use super::HeartbeatSpec;

/// Headers never copied from a client request onto a heartbeat: they describe
/// the client's body or connection, or are set by the heartbeat itself.
const NOT_COPIED: [HeaderName; 12] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::HOST,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::EXPECT,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("x-request-id"),
];

/// Whether `value` is a valid header value (what `HeaderValue::from_bytes` accepts).
fn valid_value(value: &[u8]) -> bool {
    value.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// The credentials headers that are kept, in order.
fn kept<'a>(
    pairs: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) -> impl Iterator<Item = (&'a HeaderName, &'a [u8])> {
    pairs
        .filter(|(name, _)| !NOT_COPIED.contains(name))
        .map(|(name, value)| (name, value.as_bytes()))
        .filter(|(_, value)| valid_value(value) && u32::try_from(value.len()).is_ok())
}

/// A session's copied credentials headers, in one shared allocation: for each
/// header, its name's length (u16 LE), the name, its value's length (u32 LE)
/// and the value. Copies (never slices of a connection's read buffer); turned
/// back into sensitive header values only to build a heartbeat.
#[derive(Clone)]
pub(super) struct Credentials(Arc<[u8]>);

impl Credentials {
    /// Copies the credentials headers among `pairs` (those that may travel on
    /// a heartbeat).
    pub(super) fn copy<'a>(pairs: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>) -> Self {
        let mut buf = Vec::new();
        for (name, value) in kept(pairs) {
            let name = name.as_str().as_bytes();
            // A header name is at most 65 535 bytes long.
            buf.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_le_bytes());
            buf.extend_from_slice(name);
            buf.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes());
            buf.extend_from_slice(value);
        }
        Self(Arc::from(buf))
    }

    /// Whether these are exactly the credentials [`Credentials::copy`] would
    /// make of `pairs`; allocates nothing.
    pub(super) fn matches<'a>(
        &self,
        pairs: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    ) -> bool {
        let mut stored = self.iter();
        for (name, value) in kept(pairs) {
            match stored.next() {
                Some((n, v)) if n == name.as_str().as_bytes() && v == value => {}
                _ => return false,
            }
        }
        stored.next().is_none()
    }

    /// The bytes of the copy.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// The same allocation (so nothing changed).
    pub(super) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The headers: name and value bytes, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let (name, tail) = tail.split_at_checked(usize::from(u16::from_le_bytes(*len)))?;
            let (len, tail) = tail.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            let (value, tail) = tail.split_at_checked(len)?;
            rest = tail;
            Some((name, value))
        })
    }

    /// The headers as sensitive header values.
    pub(super) fn headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        self.iter().filter_map(|(name, value)| {
            let name = HeaderName::from_bytes(name).ok()?;
            let mut value = HeaderValue::from_bytes(value).ok()?;
            value.set_sensitive(true);
            Some((name, value))
        })
    }
}

/// The part of heartbeats that sessions usually share: method and extra headers.
#[derive(Debug)]
pub(super) struct Common {
    pub(super) method: Method,
    pub(super) set_headers: HeaderMap,
}

impl Common {
    fn same_as(&self, spec: &HeartbeatSpec) -> bool {
        self.method == spec.method && self.set_headers.iter().eq(spec.set_headers.iter())
    }
}

/// The last [`Common`] made, so that sessions with the same method and extra
/// headers share one.
#[derive(Debug, Default)]
pub(super) struct Commons(Mutex<Option<Arc<Common>>>);

impl Commons {
    fn get(&self, spec: &HeartbeatSpec) -> Arc<Common> {
        let mut last = match self.0.lock() {
            Ok(last) => last,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &*last {
            Some(common) if common.same_as(spec) => Arc::clone(common),
            _ => {
                let common = Arc::new(Common {
                    method: spec.method.clone(),
                    set_headers: spec.set_headers.clone(),
                });
                *last = Some(Arc::clone(&common));
                common
            }
        }
    }
}

/// A session's heartbeat as stored: the shared [`Common`] part, and the path
/// and body in one allocation of their own.
pub(super) struct Beat {
    pub(super) common: Arc<Common>,
    /// The path and query, then the body (if any).
    text: Box<[u8]>,
    path_len: u32,
    has_body: bool,
    /// The session's own interval in milliseconds; 0: the global one.
    interval_ms: u32,
}

impl Beat {
    /// Stores `spec`, or `None` if it cannot be stored compactly (a path over
    /// 4 GiB, never seen in practice).
    pub(super) fn new(spec: &HeartbeatSpec, commons: &Commons) -> Option<Box<Self>> {
        let path = spec.path_and_query.as_str().as_bytes();
        let path_len = u32::try_from(path.len()).ok()?;
        let body = spec.body.as_deref().unwrap_or_default();
        let mut text = Vec::with_capacity(path.len() + body.len());
        text.extend_from_slice(path);
        text.extend_from_slice(body);
        Some(Box::new(Self {
            common: commons.get(spec),
            text: text.into_boxed_slice(),
            path_len,
            has_body: spec.body.is_some(),
            interval_ms: spec.interval.map_or(0, |i| {
                u32::try_from(i.as_millis()).unwrap_or(u32::MAX).max(1)
            }),
        }))
    }

    /// The bytes of its own allocation (the shared part is not counted).
    pub(super) fn len(&self) -> usize {
        self.text.len()
    }

    fn split(&self) -> (&[u8], &[u8]) {
        self.text
            .split_at_checked(self.path_len as usize)
            .unwrap_or((&self.text, &[]))
    }

    /// The path and query (re-parsed from the text of a valid one).
    pub(super) fn path_and_query(&self) -> PathAndQuery {
        PathAndQuery::try_from(self.split().0).unwrap_or_else(|_| PathAndQuery::from_static("/"))
    }

    /// The session's own interval, if it has one.
    pub(super) fn interval(&self) -> Option<Duration> {
        (self.interval_ms > 0).then(|| Duration::from_millis(u64::from(self.interval_ms)))
    }

    /// The body, if any.
    pub(super) fn body(&self) -> Option<Bytes> {
        self.has_body
            .then(|| Bytes::copy_from_slice(self.split().1))
    }
}
