//! What the tower services of the stack share: the bound each layer puts
//! on the service below it, the boxed future of an upstream answer, the
//! future of a layer that passes most requests straight through, and taking
//! the service `poll_ready` made ready.
//!
//! ```
//! use idemproxy::service::take_ready;
//!
//! let mut ready = vec![1];
//! let taken = take_ready(&mut ready);
//! assert_eq!((taken, ready), (vec![1], vec![1]));
//! ```

use futures_util::future::{BoxFuture, Either};
use http::{Request, Response};
use tower::Service;

use crate::body::Body;
use crate::error::ProxyError;

/// The service below a layer of the stack (and the upstream client under
/// them all): HTTP requests in, HTTP responses or an [`ProxyError`] out,
/// cloned per request and sent across tasks.
pub trait HttpService:
    Service<Request<Body>, Response = Response<Body>, Error = ProxyError, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> HttpService for S where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A boxed future of an upstream answer: what a layer returns when it has
/// work of its own to do around the inner service.
pub type ResponseFuture = BoxFuture<'static, Result<Response<Body>, ProxyError>>;

/// The future of a layer with nothing to do for most requests: those go
/// straight to the inner future `F`, the others get a [`ResponseFuture`].
pub type PassThrough<F> = Either<F, ResponseFuture>;

/// Takes the service that `poll_ready` drove to readiness, for a future that
/// calls it later, and leaves a clone behind for the next request (tower's
/// clone-and-swap). The stack's services hold their state in `Arc`s, so the
/// clone costs reference counts.
pub fn take_ready<S: Clone>(service: &mut S) -> S {
    let clone = service.clone();
    std::mem::replace(service, clone)
}
