//! Idempotency keys: every non-idempotent request reaches the upstream with
//! an `Idempotency-Key`, the same on every attempt, so a retry of a write that
//! was stored but whose answer was lost is recognised by the backend.
//!
//! [`IdempotencyKeyLayer`] keeps a key the client sent and never changes it;
//! otherwise it makes one ([`KeyMode::Random`]: a UUID; [`KeyMode::Fingerprint`]:
//! a digest of session, method, path and body, so that the client's own
//! repeats of the same write carry the same key).
//!
//! ```
//! use http::{Method, Request};
//! use idemproxy::idempotency::{IdempotencyKeyLayer, KeyConfig};
//! use tower::{Layer, ServiceExt, service_fn};
//! # async fn demo() {
//! let layer = IdempotencyKeyLayer::new(KeyConfig::default());
//! let svc = layer.layer(service_fn(|req: Request<()>| async move {
//!     Ok::<_, std::convert::Infallible>(req.headers().contains_key("idempotency-key"))
//! }));
//! let req = Request::post("/v1/entries").body(()).unwrap();
//! assert!(svc.oneshot(req).await.unwrap());
//! # }
//! ```

mod cache;
mod key;

pub use cache::{
    CacheConfig, CacheMetrics, IDEMPOTENT_REPLAYED, IdempotencyCache, IdempotencyCacheLayer,
};
pub use key::{IdempotencyKeyLayer, IdempotencyKeyService, KeyConfig, KeyMode};
