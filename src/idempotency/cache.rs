//! The local idempotency cache for keys the client sent itself.
//!
//! - A key is scoped to its client: the cache key is a digest of the client's
//!   credentials headers ([`CacheConfig::scope_headers`]: `Authorization`,
//!   `Cookie` and the session's own header by default) and the key. An
//!   answer is never replayed to, coalesced with, or refused (`422`) for a
//!   request with other credentials, as the IETF draft scopes a key to its
//!   client.
//! - A concurrent duplicate (same scope, key and body) waits for the first
//!   request and gets its answer: one upstream request.
//! - A completed answer is replayed for the TTL, with `Idempotent-Replayed:
//!   true`, and without `Set-Cookie`: a cookie goes only to the request that
//!   caused it.
//! - The same key with a different method, path or body gets `422` and a JSON error.
//! - A key longer than [`MAX_KEY_LEN`] bytes gets `400` and a JSON error.
//! - Bounded by entry count and bytes, every entry's fixed cost counted (the
//!   key is kept only as a 32-byte digest). Eviction takes the oldest answer
//!   in O(1): every answer lives the same TTL, so the oldest is also the first
//!   to expire. Streaming responses (`text/event-stream`), bodies over the
//!   per-answer cap, `5xx` and `429` answers are never cached: a duplicate
//!   then goes upstream itself, with the same key, and the backend decides.
//!
//! A request whose body was too large to read ahead is not cached either.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::debug;

use crate::BoxError;
use crate::body::{self, Body};
use crate::buffered::BufferedBody;
use crate::error::{ProxyError, json_error};
use crate::service::{HttpService, PassThrough, ResponseFuture, take_ready};

/// `Idempotent-Replayed`, set on an answer served from the cache.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest client key accepted, in bytes (Stripe's limit); a longer one
/// gets `400`.
pub const MAX_KEY_LEN: usize = 255;

/// What one entry costs besides its answer's headers and body: the map
/// entry (digest key and slot), the answer's allocation and its place in the
/// eviction queue, rounded up.
const ENTRY_OVERHEAD: usize = 256;

/// Limits of the cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// The header carrying the client's key.
    pub header: HeaderName,
    /// The request headers whose values scope a key to its client
    /// (`IDEMPROXY_IDEMPOTENCY_SCOPE_HEADERS`, plus the session's own header
    /// sources).
    pub scope_headers: Vec<HeaderName>,
    /// How long a completed answer is replayed.
    pub ttl: Duration,
    /// Entries kept at most.
    pub max_entries: usize,
    /// Bytes of cached answers kept at most.
    pub max_bytes: usize,
    /// Largest single answer body cached.
    pub max_body: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            scope_headers: vec![header::AUTHORIZATION, header::COOKIE],
            ttl: Duration::from_secs(600),
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_body: 1 << 20,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// `idemproxy_idempotency_cache_total{result}`: miss, hit, coalesced,
/// mismatch, bypass, uncacheable, evicted, key_too_long.
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    results: Family<ResultLabel, Counter>,
}

impl CacheMetrics {
    /// Creates and registers the metric.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        for result in [
            "miss",
            "hit",
            "coalesced",
            "mismatch",
            "bypass",
            "uncacheable",
            "evicted",
            "key_too_long",
        ] {
            m.count_zero(result);
        }
        registry.register(
            "idemproxy_idempotency_cache",
            "Requests with a client idempotency key, by cache result",
            m.results.clone(),
        );
        m
    }

    fn count_zero(&self, result: &'static str) {
        let _ = self.results.get_or_create(&ResultLabel { result });
    }

    fn count(&self, result: &'static str) {
        self.results.get_or_create(&ResultLabel { result }).inc();
    }

    /// The count of one result (for tests and the admin).
    pub fn get(&self, result: &'static str) -> u64 {
        self.results.get_or_create(&ResultLabel { result }).get()
    }
}

/// A completed answer.
#[derive(Debug)]
struct Cached {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    expires: Instant,
    seq: u64,
}

impl Cached {
    /// The bytes this entry holds, fixed costs included.
    fn size(&self) -> usize {
        ENTRY_OVERHEAD
            + self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 32)
                .sum::<usize>()
    }

    fn replay(&self) -> Response<Body> {
        let mut resp = Response::new(body::full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp.headers_mut().insert(
            IDEMPOTENT_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
        resp
    }
}

/// What waiters learn when the first request of a key is over.
#[derive(Clone, Debug)]
enum Outcome {
    Pending,
    /// `Some`: replay it; `None`: not cacheable, go upstream yourself.
    Done(Option<Arc<Cached>>),
}

#[derive(Debug)]
enum Slot {
    InFlight {
        digest: [u8; 32],
        done: watch::Receiver<Outcome>,
        owner: u64,
    },
    Done {
        digest: [u8; 32],
        answer: Arc<Cached>,
    },
}

/// A cache key: the digest of the client's scope and its key.
type CacheKey = [u8; 32];

/// One stored answer's place in the eviction order.
#[derive(Debug)]
struct Stored {
    seq: u64,
    expires: Instant,
    key: CacheKey,
}

#[derive(Debug)]
struct Cache {
    map: DashMap<CacheKey, Slot>,
    /// Completed answers in the order they were stored (and so of expiry):
    /// the eviction order. An element whose slot was replaced since is
    /// skipped when it comes up.
    order: Mutex<VecDeque<Stored>>,
    /// Completed answers in the map.
    done: AtomicUsize,
    bytes: AtomicUsize,
    seq: AtomicU64,
    config: CacheConfig,
    metrics: CacheMetrics,
}

/// Adds [`IdempotencyCache`] around a service.
#[derive(Clone, Debug)]
pub struct IdempotencyCacheLayer {
    cache: Arc<Cache>,
}

impl IdempotencyCacheLayer {
    /// A layer with its own cache.
    pub fn new(config: CacheConfig, metrics: CacheMetrics) -> Self {
        Self {
            cache: Arc::new(Cache {
                map: DashMap::new(),
                order: Mutex::new(VecDeque::new()),
                done: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                seq: AtomicU64::new(0),
                config,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for IdempotencyCacheLayer {
    type Service = IdempotencyCache<S>;
    fn layer(&self, inner: S) -> IdempotencyCache<S> {
        IdempotencyCache {
            inner,
            cache: self.cache.clone(),
        }
    }
}

/// Serves duplicates of client-keyed requests; see the module docs.
#[derive(Clone, Debug)]
pub struct IdempotencyCache<S> {
    inner: S,
    cache: Arc<Cache>,
}

impl<S> Service<Request<Body>> for IdempotencyCache<S>
where
    S: HttpService,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    /// A request this layer has nothing to do for goes straight to the inner
    /// service's future, without a boxed future of its own.
    type Future = PassThrough<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Without a client key (or its body) the request passes through to
        // the service poll_ready made ready, with no clone of the layers below.
        let Some(key) = req.headers().get(&self.cache.config.header) else {
            return Either::Left(self.inner.call(req));
        };
        if key.len() > MAX_KEY_LEN {
            self.cache.metrics.count("key_too_long");
            let detail = format!(
                "the {} header is longer than {MAX_KEY_LEN} bytes; use a shorter key (a UUID is 36)",
                self.cache.config.header
            );
            let resp = json_error(
                StatusCode::BAD_REQUEST,
                "idempotency_key_too_long",
                &detail,
                None,
            );
            return Either::Right(Box::pin(std::future::ready(Ok(resp))));
        }
        let Some(buffered) = req.extensions().get::<BufferedBody>() else {
            self.cache.metrics.count("bypass");
            return Either::Left(self.inner.call(req));
        };
        let key = scoped_key(&self.cache.config.scope_headers, req.headers(), key);
        let digest = request_digest(&req, buffered);
        let cache = self.cache.clone();
        let mut inner = take_ready(&mut self.inner);
        Either::Right(Box::pin(async move {
            let forward = |inner: &mut S, req| -> ResponseFuture { Box::pin(inner.call(req)) };
            match cache.claim(&key, digest) {
                Claim::Replay(answer) => {
                    cache.metrics.count("hit");
                    Ok(answer.replay())
                }
                Claim::Mismatch => {
                    cache.metrics.count("mismatch");
                    Ok(json_error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was already used with a different request (method, path or body); use a new key for a new request",
                        None,
                    ))
                }
                Claim::Wait(mut done) => {
                    let outcome = done
                        .wait_for(|o| !matches!(o, Outcome::Pending))
                        .await
                        .map(|o| o.clone());
                    match outcome {
                        Ok(Outcome::Done(Some(answer))) => {
                            cache.metrics.count("coalesced");
                            Ok(answer.replay())
                        }
                        // The first request's answer is not reusable: send our own.
                        _ => forward(&mut inner, req).await,
                    }
                }
                Claim::Lead(leader) => {
                    cache.metrics.count("miss");
                    let resp = forward(&mut inner, req).await?;
                    Ok(leader.finish(resp))
                }
                Claim::Bypass => {
                    cache.metrics.count("bypass");
                    forward(&mut inner, req).await
                }
            }
        }))
    }
}

enum Claim {
    Replay(Arc<Cached>),
    Mismatch,
    Wait(watch::Receiver<Outcome>),
    Lead(Leader),
    Bypass,
}

impl Cache {
    fn claim(self: &Arc<Self>, key: &CacheKey, digest: [u8; 32]) -> Claim {
        let now = Instant::now();
        // Counted before taking the entry: `len` locks every shard.
        let crowded = self.map.len() >= self.config.max_entries.saturating_mul(2);
        match self.map.entry(*key) {
            MapEntry::Occupied(mut e) => match e.get() {
                Slot::Done { digest: d, answer } if answer.expires > now => {
                    if *d == digest {
                        Claim::Replay(answer.clone())
                    } else {
                        Claim::Mismatch
                    }
                }
                Slot::Done { answer, .. } => {
                    // Expired: take the slot over (its place in the eviction
                    // order is skipped when it comes up).
                    self.bytes.fetch_sub(answer.size(), Ordering::Relaxed);
                    self.done.fetch_sub(1, Ordering::Relaxed);
                    let (leader, slot) = self.leader(key, digest);
                    e.insert(slot);
                    Claim::Lead(leader)
                }
                Slot::InFlight {
                    digest: d, done, ..
                } => {
                    if *d == digest {
                        Claim::Wait(done.clone())
                    } else {
                        Claim::Mismatch
                    }
                }
            },
            MapEntry::Vacant(v) => {
                if crowded {
                    // Far over the cap with in-flight entries only: don't grow without bound.
                    return Claim::Bypass;
                }
                let (leader, slot) = self.leader(key, digest);
                v.insert(slot);
                Claim::Lead(leader)
            }
        }
    }

    fn leader(self: &Arc<Self>, key: &CacheKey, digest: [u8; 32]) -> (Leader, Slot) {
        let (tx, rx) = watch::channel(Outcome::Pending);
        let owner = self.seq.fetch_add(1, Ordering::Relaxed);
        let leader = Leader {
            cache: self.clone(),
            key: *key,
            digest,
            owner,
            tx: Some(tx),
        };
        (
            leader,
            Slot::InFlight {
                digest,
                done: rx,
                owner,
            },
        )
    }

    /// Stores a completed answer, then evicts down to the caps.
    fn store(&self, key: &CacheKey, digest: [u8; 32], owner: u64, answer: Arc<Cached>) {
        let size = answer.size();
        if size > self.config.max_bytes {
            self.forget(key, owner);
            return;
        }
        let stored_answer = Stored {
            seq: answer.seq,
            expires: answer.expires,
            key: *key,
        };
        let mut order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let stored = match self.map.get_mut(key) {
            Some(mut slot) if matches!(&*slot, Slot::InFlight { owner: o, .. } if *o == owner) => {
                *slot = Slot::Done { digest, answer };
                true
            }
            _ => false,
        };
        if stored {
            self.bytes.fetch_add(size, Ordering::Relaxed);
            self.done.fetch_add(1, Ordering::Relaxed);
            order.push_back(stored_answer);
        }
        self.evict(&mut order);
    }

    /// Removes the in-flight slot of `owner`, if it is still there.
    fn forget(&self, key: &CacheKey, owner: u64) {
        self.map.remove_if(
            key,
            |_, slot| matches!(slot, Slot::InFlight { owner: o, .. } if *o == owner),
        );
    }

    /// Drops answers from the front of the eviction order while they have
    /// expired or the cache is over a cap, and elements whose answer is gone
    /// meanwhile. One map operation per element; in-flight entries are never
    /// evicted.
    fn evict(&self, order: &mut VecDeque<Stored>) {
        let now = Instant::now();
        while let Some(front) = order.front() {
            let expired = front.expires <= now;
            let over = self.done.load(Ordering::Relaxed) > self.config.max_entries
                || self.bytes.load(Ordering::Relaxed) > self.config.max_bytes;
            if !expired && !over {
                // The oldest answer is live (or was replaced by a younger one)
                // and the cache is within its caps.
                return;
            }
            let seq = front.seq;
            let removed = self.map.remove_if(
                &front.key,
                |_, slot| matches!(slot, Slot::Done { answer, .. } if answer.seq == seq),
            );
            // None: its slot was taken over or removed since; nothing to free.
            if let Some((_, Slot::Done { answer, .. })) = removed {
                self.bytes.fetch_sub(answer.size(), Ordering::Relaxed);
                self.done.fetch_sub(1, Ordering::Relaxed);
                if !expired {
                    self.metrics.count("evicted");
                }
            }
            order.pop_front();
        }
    }
}

/// The cache key of client key `key` in the scope of `headers`: a digest of
/// the values of the scope headers (each with its name, so that a token in
/// `Authorization` never equals the same text in `Cookie`) and the key.
fn scoped_key(scope: &[HeaderName], headers: &HeaderMap, key: &HeaderValue) -> CacheKey {
    let mut h = Sha256::new();
    for name in scope {
        for value in headers.get_all(name) {
            h.update(name.as_str().as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value.as_bytes());
        }
    }
    h.update(b"\0key\0");
    h.update(key.as_bytes());
    h.finalize().into()
}

/// The first request of a key: publishes its answer to waiters and the cache.
struct Leader {
    cache: Arc<Cache>,
    key: CacheKey,
    digest: [u8; 32],
    owner: u64,
    tx: Option<watch::Sender<Outcome>>,
}

impl Leader {
    fn finish(mut self, resp: Response<Body>) -> Response<Body> {
        let config = &self.cache.config;
        let streaming = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        let status = resp.status();
        let too_large = resp.body().size_hint().lower() > config.max_body as u64;
        if streaming
            || too_large
            || status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            self.abandon();
            return resp;
        }
        let (parts, body) = resp.into_parts();
        if body.is_end_stream() {
            // Nothing to stream (e.g. 204): the answer is complete now.
            self.complete(status, parts.headers.clone(), Bytes::new());
            return Response::from_parts(parts, body);
        }
        let headers = parts.headers.clone();
        let tee = Tee {
            inner: body,
            copy: BytesMut::new(),
            leader: Some(self),
            status,
            headers,
        };
        Response::from_parts(parts, body::boxed(tee))
    }

    /// Not cacheable: waiters send their own request.
    fn abandon(&mut self) {
        self.cache.metrics.count("uncacheable");
        self.cache.forget(&self.key, self.owner);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Outcome::Done(None));
        }
    }

    fn complete(mut self, status: StatusCode, mut headers: HeaderMap, body: Bytes) {
        let cache = self.cache.clone();
        // A cookie goes only to the request that caused it, never to a replay.
        headers.remove(header::SET_COOKIE);
        let answer = Arc::new(Cached {
            status,
            headers,
            body,
            expires: expiry(cache.config.ttl),
            seq: cache.seq.fetch_add(1, Ordering::Relaxed),
        });
        cache.store(&self.key, self.digest, self.owner, answer.clone());
        debug!("idempotency cache stored an answer");
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Outcome::Done(Some(answer)));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Dropped without completing (client gone, body failed): release waiters.
        if self.tx.is_some() {
            self.abandon();
        }
    }
}

pin_project_lite::pin_project! {
    /// Streams the answer to the client while keeping a copy for the cache.
    struct Tee {
        #[pin]
        inner: Body,
        copy: BytesMut,
        leader: Option<Leader>,
        status: StatusCode,
        headers: HeaderMap,
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(leader) = this.leader.as_mut() {
                        if this.copy.len() + data.len() > leader.cache.config.max_body {
                            leader.abandon();
                            *this.leader = None;
                        } else {
                            this.copy.extend_from_slice(data);
                        }
                    }
                }
                // A server may stop polling once the body says it has ended.
                if inner.is_end_stream() {
                    if let Some(leader) = this.leader.take() {
                        let body = std::mem::take(this.copy).freeze();
                        leader.complete(*this.status, std::mem::take(this.headers), body);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(leader) = this.leader.take() {
                    let body = std::mem::take(this.copy).freeze();
                    leader.complete(*this.status, std::mem::take(this.headers), body);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut leader) = this.leader.take() {
                    leader.abandon();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// When an answer stored now expires. The configuration caps the TTL; a
/// longer one is read as that cap, so the sum never overflows.
fn expiry(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl.min(crate::units::MAX_DURATION))
        .unwrap_or(now)
}

fn request_digest(req: &Request<Body>, body: &BufferedBody) -> [u8; 32] {
    let mut h = Sha256::new();
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
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicU32;
    use tower::{ServiceExt, service_fn};

    /// An upstream that counts calls and answers `201 <n>` after a short delay.
    fn upstream(
        calls: Arc<AtomicU32>,
        status: StatusCode,
        content_type: &'static str,
    ) -> impl HttpService {
        service_fn(move |_req: Request<Body>| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut resp = Response::new(body::full(format!("answer {n}")));
                *resp.status_mut() = status;
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                Ok::<_, ProxyError>(resp)
            }
        })
    }

    fn request(key: &str, body: &'static str) -> Request<Body> {
        let mut req = Request::post("/v1/entries")
            .header("idempotency-key", key)
            .body(body::full(body))
            .unwrap();
        req.extensions_mut()
            .insert(BufferedBody::new(Bytes::from_static(body.as_bytes())));
        req
    }

    async fn send<S>(svc: &S, req: Request<Body>) -> (StatusCode, HeaderMap, Bytes)
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Clone,
    {
        let resp = svc.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    /// The cache over an upstream that answers `201 answer <n>` (JSON),
    /// with the upstream's call count and the cache's metrics.
    fn created(config: CacheConfig) -> (impl HttpService, Arc<AtomicU32>, CacheMetrics) {
        let calls = Arc::new(AtomicU32::new(0));
        let (layer, metrics) = cache_layer(config);
        let svc = layer.layer(upstream(
            calls.clone(),
            StatusCode::CREATED,
            "application/json",
        ));
        (svc, calls, metrics)
    }

    fn cache_layer(config: CacheConfig) -> (IdempotencyCacheLayer, CacheMetrics) {
        let metrics = CacheMetrics::default();
        (IdempotencyCacheLayer::new(config, metrics.clone()), metrics)
    }

    /// Ten concurrent requests with one key and body cause one upstream request and get the same answer.
    #[tokio::test]
    async fn concurrent_duplicates_coalesce_onto_one_upstream_request() {
        let (svc, calls, metrics) = created(CacheConfig::default());
        let answers =
            futures_util::future::join_all((0..10).map(|_| send(&svc, request("k1", "{\"a\":1}"))))
                .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for (status, _, body) in &answers {
            assert_eq!(*status, StatusCode::CREATED);
            assert_eq!(body.as_ref(), b"answer 1");
        }
        assert_eq!(metrics.get("miss"), 1);
        assert_eq!(metrics.get("coalesced") + metrics.get("hit"), 9);
    }

    /// A completed answer is replayed with `Idempotent-Replayed: true`, and not after the TTL.
    #[tokio::test(start_paused = true)]
    async fn completed_answers_replay_until_the_ttl() {
        let calls = Arc::new(AtomicU32::new(0));
        let (layer, _) = cache_layer(CacheConfig {
            ttl: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let svc = layer.layer(upstream(
            calls.clone(),
            StatusCode::CREATED,
            "application/json",
        ));
        let (_, first_headers, first) = send(&svc, request("k2", "{}")).await;
        assert!(!first_headers.contains_key(&IDEMPOTENT_REPLAYED));
        let (status, headers, again) = send(&svc, request("k2", "{}")).await;
        assert_eq!((status, &again), (StatusCode::CREATED, &first));
        assert_eq!(headers[&IDEMPOTENT_REPLAYED], "true");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        let (_, _, later) = send(&svc, request("k2", "{}")).await;
        assert_eq!(later.as_ref(), b"answer 2");
    }

    /// The same key with a different body gets 422 and nothing goes upstream.
    #[tokio::test]
    async fn a_reused_key_with_another_body_gets_422() {
        let (svc, calls, metrics) = created(CacheConfig::default());
        send(&svc, request("k3", "{\"a\":1}")).await;
        let (status, headers, body) = send(&svc, request("k3", "{\"a\":2}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(String::from_utf8_lossy(&body).contains("idempotency_key_reused"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.get("mismatch"), 1);
    }

    /// 5xx answers and event streams are never cached: a repeat goes upstream again.
    #[tokio::test]
    async fn server_errors_and_event_streams_are_not_cached() {
        for (status, ct) in [
            (StatusCode::SERVICE_UNAVAILABLE, "application/json"),
            (StatusCode::OK, "text/event-stream"),
        ] {
            let calls = Arc::new(AtomicU32::new(0));
            let (layer, _) = cache_layer(CacheConfig::default());
            let svc = layer.layer(upstream(calls.clone(), status, ct));
            send(&svc, request("k4", "{}")).await;
            let (_, headers, _) = send(&svc, request("k4", "{}")).await;
            assert!(!headers.contains_key(&IDEMPOTENT_REPLAYED));
            assert_eq!(calls.load(Ordering::SeqCst), 2, "{status} {ct}");
        }
    }

    /// Past the entry cap the oldest answer is evicted; past the byte cap too.
    #[tokio::test]
    async fn the_caps_evict_the_oldest_answers() {
        let calls = Arc::new(AtomicU32::new(0));
        let (layer, metrics) = cache_layer(CacheConfig {
            max_entries: 2,
            ..CacheConfig::default()
        });
        let svc = layer.layer(upstream(
            calls.clone(),
            StatusCode::CREATED,
            "application/json",
        ));
        for key in ["a", "b", "c"] {
            send(&svc, request(key, "{}")).await;
        }
        assert_eq!(metrics.get("evicted"), 1);
        send(&svc, request("c", "{}")).await; // still cached
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        send(&svc, request("a", "{}")).await; // evicted: goes upstream
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        let (layer, metrics) = cache_layer(CacheConfig {
            max_bytes: 700, // two answers of ~330 bytes (fixed cost included) fit, a third does not
            ..CacheConfig::default()
        });
        let svc = layer.layer(upstream(
            Arc::new(AtomicU32::new(0)),
            StatusCode::CREATED,
            "application/json",
        ));
        for key in ["x", "y", "z"] {
            send(&svc, request(key, "{}")).await;
        }
        assert!(metrics.get("evicted") >= 1);
    }

    fn request_as(key: &str, body: &'static str, credentials: &[(&str, &str)]) -> Request<Body> {
        let mut req = request(key, body);
        for (name, value) in credentials {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        req
    }

    /// A key is scoped to its client: another client's request with the same
    /// key and body (other credentials, or none) gets its own upstream answer,
    /// and the same key with another body is no 422 across clients.
    #[tokio::test]
    async fn keys_are_scoped_to_the_client_credentials() {
        let (svc, calls, metrics) = created(CacheConfig::default());
        let alice = [("authorization", "Bearer alice")];
        let bob = [("authorization", "Bearer bob")];
        let (_, _, a) = send(&svc, request_as("k", "{}", &alice)).await;
        assert_eq!(a.as_ref(), b"answer 1");
        for other in [&bob[..], &[], &[("cookie", "sid=alice")]] {
            let (status, headers, b) = send(&svc, request_as("k", "{}", other)).await;
            assert_eq!(status, StatusCode::CREATED, "{other:?}");
            assert_ne!(b, a, "{other:?} got alice's answer");
            assert!(!headers.contains_key(&IDEMPOTENT_REPLAYED), "{other:?}");
        }
        let (status, _, _) = send(&svc, request_as("k", "{\"x\":1}", &bob)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bob's own key reused"
        );
        let (status, _, _) = send(
            &svc,
            request_as("k", "{\"x\":2}", &[("authorization", "Bearer carol")]),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "carol never used the key");
        // Alice's own repeat still replays.
        let (_, headers, again) = send(&svc, request_as("k", "{}", &alice)).await;
        assert_eq!(
            (again, headers[&IDEMPOTENT_REPLAYED].to_str().unwrap()),
            (a, "true")
        );
        assert_eq!(metrics.get("mismatch"), 1);
        // Alice, bob, anonymous, the cookie client and carol went upstream.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    /// Ten concurrent requests with one key but ten credentials are not
    /// coalesced: ten upstream requests, ten answers.
    #[tokio::test]
    async fn concurrent_requests_of_different_clients_are_not_coalesced() {
        let (svc, calls, _) = created(CacheConfig::default());
        let tokens: Vec<String> = (0..10).map(|i| format!("Bearer t{i}")).collect();
        let answers = futures_util::future::join_all(tokens.iter().map(|t| {
            let mut req = request("shared", "{}");
            req.headers_mut()
                .insert(header::AUTHORIZATION, HeaderValue::from_str(t).unwrap());
            send(&svc, req)
        }))
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 10);
        let mut bodies: Vec<Bytes> = answers.into_iter().map(|(_, _, b)| b).collect();
        bodies.sort();
        bodies.dedup();
        assert_eq!(bodies.len(), 10);
    }

    /// A replayed answer never carries the `Set-Cookie` of the first one.
    #[tokio::test]
    async fn replays_carry_no_set_cookie() {
        let svc =
            cache_layer(CacheConfig::default())
                .0
                .layer(service_fn(|_req: Request<Body>| async {
                    let mut resp = Response::new(body::full("stored"));
                    resp.headers_mut()
                        .insert(header::SET_COOKIE, HeaderValue::from_static("sid=secret"));
                    Ok::<_, ProxyError>(resp)
                }));
        let (_, first, _) = send(&svc, request("c", "{}")).await;
        assert_eq!(first[header::SET_COOKIE], "sid=secret");
        let (_, replay, body) = send(&svc, request("c", "{}")).await;
        assert_eq!(replay[&IDEMPOTENT_REPLAYED], "true");
        assert_eq!(body.as_ref(), b"stored");
        assert!(!replay.contains_key(header::SET_COOKIE), "{replay:?}");
    }

    /// A key longer than 255 bytes gets 400 JSON and nothing goes upstream;
    /// one of 255 bytes is cached.
    #[tokio::test]
    async fn overlong_keys_are_refused() {
        let (svc, calls, metrics) = created(CacheConfig::default());
        let (status, headers, body) = send(&svc, request(&"k".repeat(256), "{}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(String::from_utf8_lossy(&body).contains("idempotency_key_too_long"));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(metrics.get("key_too_long"), 1);
        send(&svc, request(&"k".repeat(255), "{}")).await;
        let (_, headers, _) = send(&svc, request(&"k".repeat(255), "{}")).await;
        assert_eq!(headers[&IDEMPOTENT_REPLAYED], "true");
    }

    /// 10,000 answers under maximal keys stay within a 1 MiB cap with every
    /// entry's fixed cost counted, and the eviction order never outgrows the
    /// answers kept, however often entries expire and are taken over.
    #[tokio::test(start_paused = true)]
    async fn the_byte_cap_counts_every_entry_and_the_order_stays_bounded() {
        let (layer, metrics) = cache_layer(CacheConfig {
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(1),
            ..CacheConfig::default()
        });
        let cache = layer.cache.clone();
        let svc = layer.layer(service_fn(|_req: Request<Body>| async {
            Ok::<_, ProxyError>(Response::new(body::full("ok")))
        }));
        for i in 0..10_000 {
            let key = format!("{i:0>255}");
            send(&svc, request(&key, "{}")).await;
            assert!(cache.bytes.load(Ordering::Relaxed) <= 1 << 20);
        }
        let kept = cache.done.load(Ordering::Relaxed);
        assert!(kept < 10_000 && kept * ENTRY_OVERHEAD <= 1 << 20, "{kept}");
        assert_eq!(kept, cache.map.len());
        assert!(metrics.get("evicted") >= 10_000 - kept as u64);
        // The same 100 keys, expiring and taken over 50 times each.
        for round in 0..50 {
            tokio::time::advance(Duration::from_secs(2)).await;
            for i in 0..100 {
                send(&svc, request(&format!("again-{i}"), "{}")).await;
            }
            let order = cache.order.lock().unwrap().len();
            assert!(
                order <= cache.done.load(Ordering::Relaxed) + 100,
                "round {round}: {order}"
            );
        }
    }

    /// A request without a client key passes straight through.
    #[tokio::test]
    async fn requests_without_a_client_key_pass_through() {
        let (svc, calls, metrics) = created(CacheConfig::default());
        for _ in 0..2 {
            send(&svc, Request::post("/x").body(body::full("{}")).unwrap()).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.get("miss"), 0);
    }
}
