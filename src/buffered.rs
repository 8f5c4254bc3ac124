//! A request body read ahead into memory, for the layers that must see the
//! body before sending it (a verification rule, a session id in a JSON field,
//! a fingerprint key, a client key's body digest).
//!
//! Only bodies up to a cap are read ahead; a larger body is passed on
//! unchanged (what was read, followed by the rest, still streaming), and the
//! features that needed it are skipped for that request.
//!
//! ```
//! # async fn demo() {
//! use idemproxy::{body, buffered::read_ahead};
//! let (body, buffered) = read_ahead(body::full("{\"a\":1}"), 1024).await.unwrap();
//! let buffered = buffered.unwrap();
//! assert_eq!(buffered.json().unwrap()["a"], 1);
//! # drop(body);
//! # }
//! ```

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::BoxError;
use crate::body::{self, Body};

/// A whole request body held in memory, shared by the layers through a request extension.
#[derive(Clone, Debug)]
pub struct BufferedBody(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bytes: Bytes,
    json: OnceLock<Option<serde_json::Value>>,
}

impl BufferedBody {
    /// Wraps complete body bytes.
    pub fn new(bytes: Bytes) -> Self {
        Self(Arc::new(Inner {
            bytes,
            json: OnceLock::new(),
        }))
    }

    /// The body's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0.bytes
    }

    /// The body parsed as JSON (parsed once, on first use); `None` if it is not JSON.
    pub fn json(&self) -> Option<&serde_json::Value> {
        self.0
            .json
            .get_or_init(|| serde_json::from_slice(&self.0.bytes).ok())
            .as_ref()
    }
}

/// Reads `body` ahead up to `cap` bytes.
///
/// Returns the body to send on (byte-identical to the original) and, when the
/// whole body fitted under the cap and had no trailers, its bytes.
pub async fn read_ahead(
    mut body: Body,
    cap: usize,
) -> Result<(Body, Option<BufferedBody>), BoxError> {
    if body.is_end_stream() {
        return Ok((body, Some(BufferedBody::new(Bytes::new()))));
    }
    if body.size_hint().lower() > cap as u64 {
        return Ok((body, None));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                buf.extend_from_slice(&data);
                if buf.len() > cap {
                    return Ok((prefixed(buf.freeze(), body, None), None));
                }
            }
            Err(frame) => {
                // Trailers: keep them, and the body is no longer "just bytes".
                return Ok((prefixed(buf.freeze(), body, Some(frame)), None));
            }
        }
    }
    let bytes = buf.freeze();
    Ok((body::full(bytes.clone()), Some(BufferedBody::new(bytes))))
}

fn prefixed(prefix: Bytes, rest: Body, trailers: Option<Frame<Bytes>>) -> Body {
    body::boxed(Prefixed {
        prefix: (!prefix.is_empty()).then_some(prefix),
        trailers,
        rest,
    })
}

pin_project_lite::pin_project! {
    /// The bytes already read, then the trailers already read, then the rest of the body.
    struct Prefixed {
        prefix: Option<Bytes>,
        trailers: Option<Frame<Bytes>>,
        #[pin]
        rest: Body,
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.trailers.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + extra);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_small_body_is_buffered_whole() {
        let (body, buffered) = read_ahead(chunks(&["{\"a\":", "1}"]), 64).await.unwrap();
        assert_eq!(buffered.unwrap().bytes().as_ref(), b"{\"a\":1}");
        assert_eq!(
            body.collect().await.unwrap().to_bytes().as_ref(),
            b"{\"a\":1}"
        );
    }

    #[tokio::test]
    async fn a_body_over_the_cap_passes_unchanged_and_unbuffered() {
        let (body, buffered) = read_ahead(chunks(&["aaaa", "bbbb", "cccc"]), 6)
            .await
            .unwrap();
        assert!(buffered.is_none());
        assert_eq!(
            body.collect().await.unwrap().to_bytes().as_ref(),
            b"aaaabbbbcccc"
        );
    }
}
