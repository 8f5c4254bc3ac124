//! The key-attaching layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Method, Request};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::buffered::BufferedBody;
use crate::extensions::{IdempotencyKey, RequestPolicy, SessionId};

/// How a missing key is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyMode {
    /// A fresh random UUID per request.
    #[default]
    Random,
    /// A digest of session, method, path with query, and body: the client's own
    /// repeats get the same key. Needs the body read ahead; a body too large for
    /// that gets a random key.
    Fingerprint,
}

impl std::str::FromStr for KeyMode {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "random" => Ok(Self::Random),
            "fingerprint" => Ok(Self::Fingerprint),
            _ => Err("random or fingerprint"),
        }
    }
}

/// Which requests get a key, and how.
#[derive(Clone, Debug)]
pub struct KeyConfig {
    /// The header carrying the key (default `Idempotency-Key`).
    pub header: HeaderName,
    /// Methods that get a key unless their route says otherwise (default POST, PATCH).
    pub methods: Vec<Method>,
    /// How a key is made.
    pub mode: KeyMode,
}

impl Default for KeyConfig {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            methods: vec![Method::POST, Method::PATCH],
            mode: KeyMode::Random,
        }
    }
}

impl KeyConfig {
    /// Whether this request should carry a key (route option first, then methods).
    pub fn wants_key<B>(&self, req: &Request<B>) -> bool {
        let route = req
            .extensions()
            .get::<RequestPolicy>()
            .and_then(|p| p.idempotency_key);
        self.wants_key_for(req.method(), route)
    }

    /// Whether a request with `method` on a route that says
    /// `idempotency-key=` (`route`, `None` when it says nothing) carries a key.
    pub fn wants_key_for(&self, method: &Method, route: Option<bool>) -> bool {
        route.unwrap_or_else(|| self.methods.contains(method))
    }

    /// Whether keys need this request's body before it goes on: to make a
    /// fingerprint key, or, when the local cache keeps answers to client
    /// keys (`cache`), to tell a client's retry from a different request
    /// under the same key.
    pub fn needs_body(
        &self,
        method: &Method,
        headers: &http::HeaderMap,
        route: Option<bool>,
        cache: bool,
    ) -> bool {
        let client_key = headers.contains_key(&self.header);
        (cache && client_key)
            || (self.mode == KeyMode::Fingerprint
                && !client_key
                && self.wants_key_for(method, route))
    }
}

/// Adds [`IdempotencyKeyService`] around a service.
#[derive(Clone, Debug)]
pub struct IdempotencyKeyLayer {
    config: Arc<KeyConfig>,
}

impl IdempotencyKeyLayer {
    /// A layer with this configuration.
    pub fn new(config: KeyConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for IdempotencyKeyLayer {
    type Service = IdempotencyKeyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyKeyService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Attaches an idempotency key to the requests that need one.
#[derive(Clone, Debug)]
pub struct IdempotencyKeyService<S> {
    inner: S,
    config: Arc<KeyConfig>,
}

impl<S, B> Service<Request<B>> for IdempotencyKeyService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let header = &self.config.header;
        if let Some(value) = req.headers().get(header).cloned() {
            // A client's key is never changed.
            req.extensions_mut().insert(IdempotencyKey {
                value,
                from_client: true,
            });
        } else if self.config.wants_key(&req) {
            let value = match self.config.mode {
                KeyMode::Fingerprint => fingerprint(&req).unwrap_or_else(random_key),
                KeyMode::Random => random_key(),
            };
            req.headers_mut().insert(header.clone(), value.clone());
            req.extensions_mut().insert(IdempotencyKey {
                value,
                from_client: false,
            });
        }
        self.inner.call(req)
    }
}

fn random_key() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("idemproxy-key"))
}

/// `fp-` and 32 hex digits of SHA-256 over session, method, path and body;
/// `None` when the body was not read ahead.
fn fingerprint<B>(req: &Request<B>) -> Option<HeaderValue> {
    let body = req.extensions().get::<BufferedBody>()?;
    let mut h = Sha256::new();
    if let Some(SessionId(id)) = req.extensions().get::<SessionId>() {
        h.update(id.as_bytes());
    }
    h.update(b"\n");
    h.update(req.method().as_str().as_bytes());
    h.update(b"\n");
    h.update(
        req.uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    h.update(b"\n");
    h.update(body.bytes());
    let digest = h.finalize();
    let mut text = String::with_capacity(35);
    text.push_str("fp-");
    for b in &digest[..16] {
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    HeaderValue::from_str(&text).ok()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tower::{ServiceExt, service_fn};

    async fn key_of(config: KeyConfig, req: Request<()>) -> Option<HeaderValue> {
        let header = config.header.clone();
        let svc = IdempotencyKeyLayer::new(config).layer(service_fn(move |req: Request<()>| {
            let v = req.headers().get(&header).cloned();
            async move { Ok::<_, std::convert::Infallible>(v) }
        }));
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn post_gets_a_key_and_get_does_not() {
        let post = Request::post("/x").body(()).unwrap();
        assert!(key_of(KeyConfig::default(), post).await.is_some());
        let get = Request::get("/x").body(()).unwrap();
        assert!(key_of(KeyConfig::default(), get).await.is_none());
    }

    #[tokio::test]
    async fn a_client_key_is_kept() {
        let req = Request::post("/x")
            .header("idempotency-key", "client-1")
            .body(())
            .unwrap();
        assert_eq!(key_of(KeyConfig::default(), req).await.unwrap(), "client-1");
    }

    #[tokio::test]
    async fn route_option_overrides_methods() {
        let mut put = Request::put("/x").body(()).unwrap();
        put.extensions_mut().insert(RequestPolicy {
            idempotency_key: Some(true),
            ..Default::default()
        });
        assert!(key_of(KeyConfig::default(), put).await.is_some());
        let mut post = Request::post("/x").body(()).unwrap();
        post.extensions_mut().insert(RequestPolicy {
            idempotency_key: Some(false),
            ..Default::default()
        });
        assert!(key_of(KeyConfig::default(), post).await.is_none());
    }

    #[tokio::test]
    async fn fingerprint_keys_are_stable_and_tell_bodies_apart() {
        let config = KeyConfig {
            mode: KeyMode::Fingerprint,
            ..Default::default()
        };
        let req = |body: &'static str| {
            let mut r = Request::post("/v1/s/1/entries").body(()).unwrap();
            r.extensions_mut()
                .insert(BufferedBody::new(Bytes::from_static(body.as_bytes())));
            r.extensions_mut().insert(SessionId("s1".into()));
            r
        };
        let a = key_of(config.clone(), req("{\"uuid\":\"a\"}"))
            .await
            .unwrap();
        let a2 = key_of(config.clone(), req("{\"uuid\":\"a\"}"))
            .await
            .unwrap();
        let b = key_of(config.clone(), req("{\"uuid\":\"b\"}"))
            .await
            .unwrap();
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().starts_with("fp-"));
    }
}
