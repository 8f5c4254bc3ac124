//! The body of an HTTP/1.1 upstream response, which gives its connection
//! back to the pool when it has been read to the end.
//!
//! An HTTP/1.1 connection carries one exchange at a time, so it is free again
//! only once the response body is complete. The end is seen either as the
//! last frame (hyper's body reports `is_end_stream` after it, and a server
//! writing a sized body stops polling there) or as the end of the stream.
//! A body dropped before its end, or failing, takes its connection with it:
//! hyper closes a connection whose response was not read.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::{H1Sender, Pool};

/// A connection lent to one response: given back with [`Lease::release`],
/// closed when dropped instead.
pub(super) struct Lease {
    sender: H1Sender,
    pool: Arc<Pool>,
}

impl Lease {
    /// Lends `sender` from `pool` to one response.
    pub(super) fn new(sender: H1Sender, pool: Arc<Pool>) -> Self {
        Self { sender, pool }
    }

    /// Gives the connection back to the pool's idle list.
    fn release(self) {
        self.pool.put_back(self.sender);
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/1.1 response body holding its connection's [`Lease`] until the end.
    pub(super) struct PooledBody {
        #[pin]
        inner: Incoming,
        lease: Option<Lease>,
    }
}

impl PooledBody {
    /// Wraps `inner`; with no `lease` the connection is not reused. A body
    /// that is already complete (no body at all) gives the lease back now.
    pub(super) fn new(inner: Incoming, mut lease: Option<Lease>) -> Self {
        if inner.is_end_stream() {
            if let Some(lease) = lease.take() {
                lease.release();
            }
        }
        Self { inner, lease }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(_)) if !this.inner.is_end_stream() => {}
            Some(Ok(_)) | None => {
                if let Some(lease) = this.lease.take() {
                    lease.release();
                }
            }
            // The connection is broken: dropping the lease closes it.
            Some(Err(_)) => drop(this.lease.take()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
