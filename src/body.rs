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

use bytes::Bytes;
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
