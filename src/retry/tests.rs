//! Tests of the retry layer against a scripted fake upstream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, StreamBody};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::BoxError;

/// What the fake upstream does with one attempt.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Reads the whole body, answers with this status.
    Status(u16),
    /// Reads the whole body, answers with this status and `Retry-After`.
    RetryAfter(u16, &'static str),
    /// Fails to connect: answers before reading any byte.
    ConnectFail,
    /// Reads the whole body, then the connection breaks.
    Reset,
    /// The connection closes before any byte of the request is read.
    ResetBeforeRequest,
    /// The HTTP/2 stream is refused before any byte of the request is read.
    RefusedStream,
    /// Reads one frame of the body, then answers with this status.
    PartialThen(u16),
    /// Reads the whole body, then never answers.
    Hang,
    /// Reads one frame of the body, then never answers.
    HangAfterFrame,
}

/// What the fake upstream saw of one attempt.
#[derive(Clone, Debug, Default)]
struct Seen {
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    exact: Option<u64>,
    end_at_start: bool,
}

/// A scripted upstream that records every attempt.
#[derive(Clone)]
struct Upstream {
    script: Arc<Mutex<VecDeque<Step>>>,
    fallback: Step,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn new(steps: &[Step]) -> Self {
        Self::with_fallback(steps, Step::Status(200))
    }

    fn with_fallback(steps: &[Step], fallback: Step) -> Self {
        Self {
            script: Arc::new(Mutex::new(steps.iter().copied().collect())),
            fallback,
            seen: Arc::default(),
        }
    }

    fn service(
        &self,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = ProxyError,
        Future = ResponseFuture,
    > + Clone
    + Send
    + 'static {
        let this = self.clone();
        service_fn(move |req: Request<Body>| -> ResponseFuture {
            Box::pin(this.clone().handle(req))
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn handle(self, req: Request<Body>) -> Result<Response<Body>, ProxyError> {
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(self.fallback);
        let mut body = req.into_body();
        let mut seen = Seen {
            exact: body.size_hint().exact(),
            end_at_start: body.is_end_stream(),
            ..Seen::default()
        };
        let frames = match step {
            Step::ConnectFail | Step::ResetBeforeRequest | Step::RefusedStream => Some(0),
            Step::PartialThen(_) | Step::HangAfterFrame => Some(1),
            _ => None,
        };
        let read = read_body(&mut body, &mut seen, frames).await;
        self.seen.lock().unwrap().push(seen);
        read.map_err(ProxyError::RequestBody)?;
        let status = |code: u16| {
            let mut rsp = Response::new(body::full(format!("status {code}")));
            *rsp.status_mut() = StatusCode::from_u16(code).unwrap();
            rsp
        };
        match step {
            Step::Status(code) | Step::PartialThen(code) => Ok(status(code)),
            Step::RetryAfter(code, after) => {
                let mut rsp = status(code);
                let value = HeaderValue::from_static(after);
                rsp.headers_mut().insert(header::RETRY_AFTER, value);
                Ok(rsp)
            }
            Step::ConnectFail => Err(ProxyError::Connect("connection refused".into())),
            Step::Reset => Err(ProxyError::Reset("connection reset".into())),
            Step::ResetBeforeRequest => Err(ProxyError::ResetBeforeRequest("closed".into())),
            Step::RefusedStream => Err(ProxyError::RefusedStream("REFUSED_STREAM".into())),
            Step::Hang | Step::HangAfterFrame => std::future::pending().await,
        }
    }
}

/// Reads `frames` frames of `body` (all when `None`) into `seen`.
async fn read_body(
    body: &mut Body,
    seen: &mut Seen,
    frames: Option<usize>,
) -> Result<(), BoxError> {
    let mut n = 0;
    while frames.is_none_or(|max| n < max) {
        let Some(frame) = body.frame().await.transpose()? else {
            break;
        };
        n += 1;
        match frame.into_data() {
            Ok(data) => seen.body.extend_from_slice(&data),
            Err(frame) => seen.trailers = frame.into_trailers().ok(),
        }
    }
    Ok(())
}

/// The layer under test over a scripted upstream, with registered metrics.
struct Harness {
    upstream: Upstream,
    layer: RetryLayer,
    registry: Registry,
}

impl Harness {
    fn new(config: RetryConfig, upstream: Upstream) -> Self {
        let mut registry = Registry::default();
        let layer = RetryLayer::new(config, RetryMetrics::new(&mut registry));
        Self {
            upstream,
            layer,
            registry,
        }
    }

    /// Sends `req` through the layer; boxed so spawned tasks stay `Send`.
    fn send(&self, req: Request<Body>) -> ResponseFuture {
        Box::pin(self.layer.layer(self.upstream.service()).oneshot(req))
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

/// A config with no backoff, so tests do not depend on jitter.
fn fast() -> RetryConfig {
    RetryConfig {
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        ..RetryConfig::default()
    }
}

/// The policy of a route whose replays are safe (a `verify=` route).
fn safe_route() -> RequestPolicy {
    RequestPolicy {
        replay_after_send: Some(true),
        ..RequestPolicy::default()
    }
}

/// A POST on a route whose replays are safe: what most tests here replay.
fn post(body: Body) -> Request<Body> {
    let mut req = unsafe_post(body);
    req.extensions_mut().insert(safe_route());
    req
}

/// A POST on no route: a replay after it may have been processed is unsafe.
fn unsafe_post(body: Body) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri("/v1/sessions/s1/entries")
        .header("x-request-id", "req-1")
        .body(body)
        .unwrap()
}

/// The attempts count that the edge shows as `x-idemproxy-attempts`.
fn attempts_header(rsp: &Response<Body>) -> Option<String> {
    rsp.extensions()
        .get::<Attempts>()
        .map(|Attempts(n)| n.to_string())
}

/// A chunked body fed through a channel: nothing about its length is known.
fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Body) {
    let (tx, rx) = mpsc::channel(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    (tx, body::boxed(StreamBody::new(stream)))
}

/// A chunked body made of the given frames.
fn stream_body(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> Body {
    body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

fn data(bytes: &'static [u8]) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::data(Bytes::from_static(bytes)))
}

/// 503, 503, 200: the client gets the 200 with `x-idemproxy-attempts: 3`.
#[tokio::test]
async fn retries_503_until_200_and_reports_attempts() {
    let up = Upstream::new(&[Step::Status(503), Step::Status(503), Step::Status(200)]);
    let h = Harness::new(fast(), up);
    let rsp = h.send(post(body::full("{}"))).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(attempts_header(&rsp).as_deref(), Some("3"));
    assert_eq!(
        rsp.into_body().collect().await.unwrap().to_bytes(),
        "status 200"
    );
    let metrics = h.metrics();
    assert!(
        metrics.contains("idemproxy_retries_total{reason=\"5xx\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("idemproxy_attempts_count 1"), "{metrics}");
    assert!(metrics.contains("idemproxy_attempts_sum 3.0"), "{metrics}");
}

/// Every class is retried when configured and counted under its Envoy word.
#[tokio::test(start_paused = true)]
async fn each_reason_is_retried_and_counted() {
    let cases = [
        ("5xx", Step::Status(500)),
        ("gateway-error", Step::Status(502)),
        ("retriable-status-codes", Step::Status(429)),
        ("reset", Step::Reset),
        ("reset-before-request", Step::ResetBeforeRequest),
        ("refused-stream", Step::RefusedStream),
        ("connect-failure", Step::ConnectFail),
        ("timeout", Step::Hang),
    ];
    for (word, step) in cases {
        let config = RetryConfig {
            retry_on: RetryOn::parse(word).unwrap(),
            try_timeout: Some(Duration::from_secs(1)),
            ..fast()
        };
        let h = Harness::new(config, Upstream::new(&[step]));
        let rsp = h.send(post(body::full("x"))).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK, "{word}");
        assert_eq!(attempts_header(&rsp).as_deref(), Some("2"), "{word}");
        let line = format!("idemproxy_retries_total{{reason=\"{word}\"}} 1");
        assert!(h.metrics().contains(&line), "{word}: {}", h.metrics());
    }
}

/// A class that is not configured is not retried: 502 with only `5xx` of 500.
#[tokio::test]
async fn unconfigured_class_is_not_retried() {
    let config = RetryConfig {
        retry_on: RetryOn::parse("5xx").unwrap(),
        statuses: vec![StatusCode::INTERNAL_SERVER_ERROR],
        ..fast()
    };
    let h = Harness::new(config, Upstream::new(&[Step::Status(502), Step::Reset]));
    let rsp = h.send(post(body::empty())).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    let err = h.send(post(body::empty())).await.unwrap_err();
    assert!(matches!(err, ProxyError::Reset(_)), "{err:?}");
    assert_eq!(h.upstream.attempts(), 2);
}

/// A small body with a known length arrives byte-identical, with that length, every time.
#[tokio::test]
async fn small_body_is_identical_with_its_length_on_every_attempt() {
    let up = Upstream::new(&[Step::Status(503), Step::Reset, Step::Status(200)]);
    let h = Harness::new(fast(), up);
    let rsp = h.send(post(body::full(r#"{"uuid":"e1"}"#))).await.unwrap();
    assert_eq!(attempts_header(&rsp).as_deref(), Some("3"));
    let seen = h.upstream.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.body, br#"{"uuid":"e1"}"#);
        assert_eq!(s.exact, Some(13));
    }
}

/// An empty body is at its end on every attempt and announces length 0.
#[tokio::test]
async fn empty_body_is_empty_on_every_attempt() {
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(503)]));
    let rsp = h.send(post(body::empty())).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    for s in h.upstream.seen() {
        assert!(s.end_at_start && s.body.is_empty());
        assert_eq!(s.exact, Some(0));
    }
}

/// A chunked multi-frame body with trailers is replayed identically and stays chunked.
#[tokio::test]
async fn chunked_body_with_trailers_is_replayed_identically() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let frames = vec![
        data(b"first,"),
        data(b"second,"),
        data(b"third"),
        Ok(Frame::trailers(trailers.clone())),
    ];
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(503), Step::Reset]));
    let rsp = h.send(post(stream_body(frames))).await.unwrap();
    assert_eq!(attempts_header(&rsp).as_deref(), Some("3"));
    for s in h.upstream.seen() {
        assert_eq!(s.body, b"first,second,third");
        assert_eq!(s.trailers.as_ref(), Some(&trailers));
        assert_eq!(s.exact, None, "a chunked body must stay chunked");
    }
}

/// The first attempt streams before the body is complete; after it failed
/// mid-body, the retry replays the part read and continues from the client.
#[tokio::test]
async fn partly_sent_body_is_replayed_then_continued() {
    let (tx, body) = channel_body();
    let h = Arc::new(Harness::new(
        fast(),
        Upstream::new(&[Step::PartialThen(503)]),
    ));
    tx.send(data(b"part-1;")).await.unwrap();
    let task = tokio::spawn({
        let h = h.clone();
        async move { h.send(post(body)).await }
    });
    // Attempt 1 got the first chunk before the rest of the body existed.
    while h.upstream.attempts() == 0 {
        tokio::task::yield_now().await;
    }
    tx.send(data(b"part-2;")).await.unwrap();
    tx.send(data(b"part-3")).await.unwrap();
    drop(tx);
    let rsp = task.await.unwrap().unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let seen = h.upstream.seen();
    assert_eq!(seen[0].body, b"part-1;");
    assert_eq!(seen[1].body, b"part-1;part-2;part-3");
}

/// A 1 MiB body (the default cap) in many chunks is replayed byte-identically.
#[tokio::test]
async fn one_mebibyte_body_is_replayed_identically() {
    let payload: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let frames = payload
        .chunks(16 << 10)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(503)]));
    let rsp = h.send(post(stream_body(frames))).await.unwrap();
    assert_eq!(attempts_header(&rsp).as_deref(), Some("2"));
    let seen = h.upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.body == payload));
    assert_eq!(
        h.layer.replay_memory().used(),
        0,
        "copy freed after the decision"
    );
}

/// A body over the cap is forwarded whole but not retried once a byte was sent.
#[tokio::test]
async fn body_over_cap_is_not_retried_once_sent() {
    let config = RetryConfig {
        max_replay_body: 1024,
        ..fast()
    };
    let frames = (0..8).map(|_| data(&[7; 512])).collect();
    let h = Harness::new(config.clone(), Upstream::new(&[Step::Status(503)]));
    let rsp = h.send(post(stream_body(frames))).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempts_header(&rsp), None);
    assert_eq!(
        h.upstream.seen()[0].body.len(),
        4096,
        "still forwarded whole"
    );

    // Known too large from its length: same answer.
    let h = Harness::new(config, Upstream::new(&[Step::Reset]));
    let err = h.send(post(body::full(vec![7u8; 4096]))).await.unwrap_err();
    assert!(matches!(err, ProxyError::Reset(_)), "{err:?}");
    assert_eq!(h.upstream.attempts(), 1);
}

/// A body over the cap is retried after a connect failure that read no byte.
#[tokio::test]
async fn body_over_cap_is_retried_after_connect_failure() {
    let config = RetryConfig {
        max_replay_body: 1024,
        ..fast()
    };
    let h = Harness::new(
        config,
        Upstream::new(&[Step::ConnectFail, Step::ConnectFail]),
    );
    let rsp = h.send(post(body::full(vec![7u8; 4096]))).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(attempts_header(&rsp).as_deref(), Some("3"));
    let seen = h.upstream.seen();
    assert_eq!(seen[2].body, vec![7u8; 4096]);
    assert_eq!(seen[2].exact, Some(4096));
}

/// `Retry-After: 3` on a 503 makes the retry wait exactly 3 s.
#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let up = Upstream::new(&[Step::RetryAfter(503, "3")]);
    let h = Harness::new(RetryConfig::default(), up);
    let start = Instant::now();
    let rsp = h.send(post(body::empty())).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

/// A `Retry-After` past the deadline returns that 429 at once, unretried.
#[tokio::test(start_paused = true)]
async fn retry_after_past_deadline_returns_the_response() {
    let config = RetryConfig {
        request_timeout: Duration::from_secs(10),
        ..RetryConfig::default()
    };
    let h = Harness::new(config, Upstream::new(&[Step::RetryAfter(429, "60")]));
    let start = Instant::now();
    let rsp = h.send(post(body::empty())).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(rsp.headers()[header::RETRY_AFTER], "60");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(h.upstream.attempts(), 1);
}

/// An upstream that never answers is cut at the deadline with a 504 timeout.
#[tokio::test(start_paused = true)]
async fn hanging_attempt_is_cut_at_the_deadline() {
    let config = RetryConfig {
        request_timeout: Duration::from_secs(5),
        backoff_base: Duration::from_secs(1),
        ..RetryConfig::default()
    };
    let h = Harness::new(config, Upstream::new(&[Step::Status(503), Step::Hang]));
    let start = Instant::now();
    let err = h.send(post(body::empty())).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(matches!(err.last(), ProxyError::Timeout(d) if *d == Duration::from_secs(5)));
    assert_eq!(err.attempts(), 2);
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
}

/// The route's deadline replaces the global one, and backoffs that would
/// end past it are not started: the last 503 comes back before it.
#[tokio::test(start_paused = true)]
async fn retries_never_outlive_the_route_deadline() {
    let config = RetryConfig {
        backoff_base: Duration::from_secs(2),
        backoff_max: Duration::from_secs(2),
        max_attempts: 100,
        ..RetryConfig::default()
    };
    let up = Upstream::with_fallback(&[], Step::Status(503));
    let h = Harness::new(config, up);
    for _ in 0..20 {
        let mut req = post(body::empty());
        req.extensions_mut().insert(RequestPolicy {
            timeout: Some(Duration::from_secs(7)),
            ..safe_route()
        });
        let start = Instant::now();
        let rsp = h.send(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            start.elapsed() < Duration::from_secs(7),
            "{:?}",
            start.elapsed()
        );
    }
}

/// Per-try timeouts are retried but the deadline still bounds the whole exchange.
#[tokio::test(start_paused = true)]
async fn per_try_timeouts_stop_at_the_deadline() {
    let config = RetryConfig {
        request_timeout: Duration::from_millis(2500),
        try_timeout: Some(Duration::from_secs(1)),
        ..fast()
    };
    let h = Harness::new(config, Upstream::with_fallback(&[], Step::Hang));
    let start = Instant::now();
    let err = h.send(post(body::empty())).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
    assert_eq!(err.attempts(), 3);
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
}

/// Under 100% failure, 100 requests at ratio 0.2 and no floor send at most 120 attempts.
#[tokio::test(start_paused = true)]
async fn budget_bounds_attempts_under_total_failure() {
    let config = RetryConfig {
        budget_ratio: 0.2,
        budget_min_per_sec: 0,
        ..fast()
    };
    let h = Harness::new(config, Upstream::with_fallback(&[], Step::Status(503)));
    for _ in 0..100 {
        let rsp = h.send(post(body::empty())).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let attempts = h.upstream.attempts();
    assert!((110..=120).contains(&attempts), "{attempts} attempts");
    let metrics = h.metrics();
    assert!(
        !metrics.contains("idemproxy_retry_budget_exhausted_total 0"),
        "{metrics}"
    );
}

/// A 404 is never retried.
#[tokio::test]
async fn not_found_is_never_retried() {
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(404)]));
    let rsp = h.send(post(body::full("x"))).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::NOT_FOUND);
    assert_eq!(attempts_header(&rsp), None);
    assert_eq!(h.upstream.attempts(), 1);
}

/// A route with `retry=off` gets the first answer.
#[tokio::test]
async fn route_retry_off_disables_retries() {
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(503)]));
    let mut req = post(body::full("x"));
    req.extensions_mut().insert(RequestPolicy {
        retry: Some(false),
        ..safe_route()
    });
    let rsp = h.send(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream.attempts(), 1);
}

/// A method outside the configured list is not retried; one inside is.
#[tokio::test]
async fn methods_outside_the_list_are_not_retried() {
    let config = RetryConfig {
        methods: Some(vec![Method::GET, Method::PUT]),
        ..fast()
    };
    let h = Harness::new(
        config,
        Upstream::new(&[Step::Status(503), Step::Status(503)]),
    );
    let rsp = h.send(post(body::empty())).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let mut put = post(body::empty());
    *put.method_mut() = Method::PUT;
    let rsp = h.send(put).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(h.upstream.attempts(), 3);
}

/// Out of attempts: the last 503 comes back unchanged, with the attempts header.
#[tokio::test]
async fn exhausted_attempts_return_the_last_response() {
    let config = RetryConfig {
        max_attempts: 3,
        ..fast()
    };
    let h = Harness::new(
        config,
        Upstream::with_fallback(&[], Step::RetryAfter(503, "0")),
    );
    let rsp = h.send(post(body::empty())).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempts_header(&rsp).as_deref(), Some("3"));
    assert_eq!(rsp.headers()[header::RETRY_AFTER], "0");
    assert_eq!(
        rsp.into_body().collect().await.unwrap().to_bytes(),
        "status 503"
    );
}

/// Out of attempts after errors: `Exhausted` with the count; one attempt: the bare error.
#[tokio::test]
async fn exhausted_errors_carry_the_attempt_count() {
    let config = RetryConfig {
        max_attempts: 2,
        ..fast()
    };
    let h = Harness::new(config, Upstream::with_fallback(&[], Step::ConnectFail));
    let err = h.send(post(body::empty())).await.unwrap_err();
    assert!(
        matches!(&err, ProxyError::Exhausted { attempts: 2, last, may_have_been_processed: false } if matches!(**last, ProxyError::Connect(_)))
    );
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
}

/// A failing client body is never retried, whatever the transport made of it.
#[tokio::test]
async fn broken_request_body_is_never_retried() {
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(200)]));
    let frames = vec![data(b"ok"), Err("client went away".into())];
    let err = h.send(post(stream_body(frames))).await.unwrap_err();
    assert!(matches!(err, ProxyError::RequestBody(_)), "{err:?}");
    assert_eq!(h.upstream.attempts(), 1);
}

/// When the shared replay memory is held by other requests, a new request
/// streams without a copy and is not retried; the memory comes back on drop.
#[tokio::test]
async fn full_replay_memory_makes_new_requests_stream_without_retry() {
    let config = RetryConfig {
        max_replay_memory: 12,
        ..fast()
    };
    let up = Upstream::new(&[Step::HangAfterFrame, Step::Status(503)]);
    let h = Arc::new(Harness::new(config, up));
    let (tx, body) = channel_body();
    tx.send(data(b"0123456789")).await.unwrap();
    let holder = tokio::spawn({
        let h = h.clone();
        async move { h.send(post(body)).await }
    });
    while h.upstream.attempts() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.layer.replay_memory().used(), 10);

    let rsp = h.send(post(body::full("abcdef"))).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream.seen()[1].body, b"abcdef", "streamed whole");
    assert_eq!(h.upstream.attempts(), 2);

    holder.abort();
    let _ = holder.await;
    assert_eq!(h.layer.replay_memory().used(), 0);
}

/// The request id and a non-cloneable inner service state are not required:
/// a request without `x-request-id` still retries.
#[tokio::test]
async fn request_without_id_is_retried() {
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(500)]));
    let rsp = h.send(Request::new(body::empty())).await.unwrap();
    assert_eq!(attempts_header(&rsp).as_deref(), Some("2"));
}

/// Every retry class × idempotent or not × each opt-in: how many times the
/// upstream saw the request. A failure after which the upstream cannot have
/// processed it is always retried; one after which it may have is retried
/// only when a replay cannot run the call twice.
#[tokio::test(start_paused = true)]
async fn replays_after_sending_only_when_safe() {
    // (class word, the failing step, whether the upstream may have processed it)
    let failures = [
        ("5xx", Step::Status(500), true),
        ("5xx", Step::Status(502), true),
        ("5xx", Step::Status(504), true),
        ("gateway-error", Step::Status(502), true),
        ("5xx", Step::Status(503), false),
        ("retriable-status-codes", Step::Status(429), false),
        ("reset", Step::Reset, true),
        ("timeout", Step::Hang, true),
        ("reset", Step::ResetBeforeRequest, false),
        ("reset-before-request", Step::ResetBeforeRequest, false),
        ("refused-stream", Step::RefusedStream, false),
        ("connect-failure", Step::ConnectFail, false),
    ];
    // (what the request is, how to make it, whether its replay is safe);
    // each also runs under the global opt-in (`IDEMPROXY_RETRY_UNSAFE_REQUESTS`).
    type Make = fn() -> (Request<Body>, bool);
    let requests: [(&str, Make); 7] = [
        ("POST, no opt-in", || (unsafe_post(body::full("x")), false)),
        ("PATCH, no opt-in", || {
            let mut req = unsafe_post(body::full("x"));
            *req.method_mut() = Method::PATCH;
            (req, false)
        }),
        ("GET", || {
            let mut req = unsafe_post(body::empty());
            *req.method_mut() = Method::GET;
            (req, true)
        }),
        ("PUT", || {
            let mut req = unsafe_post(body::full("x"));
            *req.method_mut() = Method::PUT;
            (req, true)
        }),
        ("DELETE", || {
            let mut req = unsafe_post(body::empty());
            *req.method_mut() = Method::DELETE;
            (req, true)
        }),
        (
            "POST on a verify= or idempotency-key=honoured route",
            || (post(body::full("x")), true),
        ),
        ("POST with retry=off on a safe route", || {
            let mut req = unsafe_post(body::full("x"));
            req.extensions_mut().insert(RequestPolicy {
                retry: Some(false),
                ..safe_route()
            });
            (req, false)
        }),
    ];
    for unsafe_opt_in in [false, true] {
        for (word, step, processed) in failures {
            for (what, make) in requests {
                let config = RetryConfig {
                    retry_on: RetryOn::parse(word).unwrap(),
                    try_timeout: Some(Duration::from_secs(1)),
                    retry_unsafe_requests: unsafe_opt_in,
                    ..fast()
                };
                let h = Harness::new(config, Upstream::new(&[step]));
                let (req, safe) = make();
                let retry_off = what.contains("retry=off");
                let expect_retry = !retry_off && (!processed || safe || unsafe_opt_in);
                let result = h.send(req).await;
                let case = format!("{word} {step:?} / {what} / opt-in {unsafe_opt_in}");
                assert_eq!(
                    h.upstream.attempts(),
                    if expect_retry { 2 } else { 1 },
                    "{case}"
                );
                let refused = format!("idemproxy_retries_refused_total{{reason=\"{word}\"}} 1");
                assert_eq!(
                    h.metrics().contains(&refused),
                    !expect_retry && !retry_off,
                    "{case}: {}",
                    h.metrics()
                );
                match result {
                    Ok(rsp) if expect_retry => assert_eq!(rsp.status(), StatusCode::OK, "{case}"),
                    // Not retried: the upstream's own answer, unchanged.
                    Ok(rsp) => assert_ne!(rsp.status(), StatusCode::OK, "{case}"),
                    Err(err) => {
                        assert!(!expect_retry, "{case}: {err}");
                        assert_eq!(err.may_have_been_processed(), processed, "{case}");
                    }
                }
            }
        }
    }
}

/// A request on a route with `replay=safe` or `replay=unsafe`.
fn on_replay_route(method: Method, safe: bool) -> Request<Body> {
    let mut req = unsafe_post(body::full("x"));
    *req.method_mut() = method;
    req.extensions_mut().insert(RequestPolicy {
        replay_after_send: Some(safe),
        ..RequestPolicy::default()
    });
    req
}

/// `replay=safe` replays a POST after a 502; `replay=unsafe` keeps a PUT
/// (idempotent) from being replayed after a 502, counting the refusal, but
/// still retries it after a connect failure or a 503, which cannot have
/// been processed.
#[tokio::test]
async fn route_replay_option_decides_replays_after_sending() {
    let h = Harness::new(fast(), Upstream::new(&[Step::Status(502)]));
    let rsp = h.send(on_replay_route(Method::POST, true)).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(attempts_header(&rsp).as_deref(), Some("2"));
    assert_eq!(h.upstream.attempts(), 2);

    let h = Harness::new(fast(), Upstream::new(&[Step::Status(502)]));
    let rsp = h.send(on_replay_route(Method::PUT, false)).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(attempts_header(&rsp), None);
    assert_eq!(h.upstream.attempts(), 1);
    let metrics = h.metrics();
    assert!(
        metrics.contains("idemproxy_retries_refused_total{reason=\"5xx\"} 1"),
        "{metrics}"
    );

    for step in [Step::ConnectFail, Step::Status(503)] {
        let h = Harness::new(fast(), Upstream::new(&[step]));
        let rsp = h.send(on_replay_route(Method::PUT, false)).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK, "{step:?}");
        assert_eq!(h.upstream.attempts(), 2, "{step:?}");
    }
}

/// Every class × `replay=safe|unsafe` × the global opt-in: the route's word
/// decides every failure after which the upstream may have processed the
/// request, whatever the method and `IDEMPROXY_RETRY_UNSAFE_REQUESTS`; the
/// others are retried anyway.
#[tokio::test(start_paused = true)]
async fn route_replay_option_overrides_the_method_and_the_opt_in() {
    let failures = [
        ("5xx", Step::Status(500), true),
        ("5xx", Step::Status(504), true),
        ("reset", Step::Reset, true),
        ("timeout", Step::Hang, true),
        ("5xx", Step::Status(503), false),
        ("retriable-status-codes", Step::Status(429), false),
        ("reset-before-request", Step::ResetBeforeRequest, false),
        ("refused-stream", Step::RefusedStream, false),
        ("connect-failure", Step::ConnectFail, false),
    ];
    for unsafe_opt_in in [false, true] {
        for (word, step, processed) in failures {
            for method in [Method::GET, Method::PUT, Method::POST, Method::PATCH] {
                for safe in [true, false] {
                    let config = RetryConfig {
                        retry_on: RetryOn::parse(word).unwrap(),
                        try_timeout: Some(Duration::from_secs(1)),
                        retry_unsafe_requests: unsafe_opt_in,
                        ..fast()
                    };
                    let h = Harness::new(config, Upstream::new(&[step]));
                    let case = format!(
                        "{word} {step:?} / {method} replay={safe} / opt-in {unsafe_opt_in}"
                    );
                    let result = h.send(on_replay_route(method.clone(), safe)).await;
                    let expect_retry = safe || !processed;
                    assert_eq!(
                        h.upstream.attempts(),
                        if expect_retry { 2 } else { 1 },
                        "{case}"
                    );
                    let refused = format!("idemproxy_retries_refused_total{{reason=\"{word}\"}} 1");
                    assert_eq!(h.metrics().contains(&refused), !expect_retry, "{case}");
                    if expect_retry {
                        assert_eq!(
                            result.map(|r| r.status()).ok(),
                            Some(StatusCode::OK),
                            "{case}"
                        );
                    }
                }
            }
        }
    }
}

/// With no response at all, the client's 502 says whether the request may
/// have been processed: `true` after a reset once sent, `false` when every
/// attempt failed to connect.
#[tokio::test]
async fn error_answer_says_whether_the_request_may_have_been_processed() {
    let h = Harness::new(fast(), Upstream::new(&[Step::Reset]));
    let err = h.send(unsafe_post(body::full("x"))).await.unwrap_err();
    let doc = json_body(err.into_response()).await;
    assert_eq!(doc["may_have_been_processed"], true, "{doc}");
    assert_eq!(doc["attempts"], 1, "{doc}");

    let config = RetryConfig {
        max_attempts: 2,
        ..fast()
    };
    let h = Harness::new(config, Upstream::with_fallback(&[], Step::ConnectFail));
    let err = h.send(unsafe_post(body::full("x"))).await.unwrap_err();
    let rsp = err.into_response();
    assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    let doc = json_body(rsp).await;
    assert_eq!(doc["may_have_been_processed"], false, "{doc}");
    assert_eq!(doc["attempts"], 2, "{doc}");

    // A GET that was reset once sent, then could not connect: it may have been processed.
    let h = Harness::new(
        config_with_attempts(2),
        Upstream::new(&[Step::Reset, Step::ConnectFail]),
    );
    let mut get = unsafe_post(body::empty());
    *get.method_mut() = Method::GET;
    let err = h.send(get).await.unwrap_err();
    assert!(err.may_have_been_processed(), "{err}");
}

fn config_with_attempts(max_attempts: u32) -> RetryConfig {
    RetryConfig {
        max_attempts,
        ..fast()
    }
}

async fn json_body(rsp: Response<Body>) -> serde_json::Value {
    let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}
