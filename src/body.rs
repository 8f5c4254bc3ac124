//! The body type that flows through every layer of the proxy.
//!
//! Requests and responses are boxed once at the edge so that layers (retry,
//! idempotency, verification) can wrap or replace a body without changing the
//! service's type. Bodies stream: nothing here buffers.
//!
//! ```
//! use idemproxy::body::{self, Body};
//! let b: Body = body::full("hello");
//! # let _ = b;
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::BoxError;

/// A streaming body of `Bytes` chunks, boxed so any layer can wrap it.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body made of one chunk.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no bytes.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A body that holds a guard until it ends or is dropped: a request counted
    /// in flight, a session kept active while its answer streams.
    pub struct WithGuard<G> {
        #[pin]
        inner: Body,
        guard: G,
    }
}

impl<G> WithGuard<G> {
    /// Wraps `inner`, holding `guard` as long as the body lives.
    pub fn new(inner: Body, guard: G) -> Self {
        Self { inner, guard }
    }
}

impl<G> http_body::Body for WithGuard<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
