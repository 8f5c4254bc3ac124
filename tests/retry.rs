//! End-to-end tests of retries (issue 3): a real proxy in front of real TCP
//! upstreams that fail on command. Each test starts its own upstream and
//! proxy on `127.0.0.1:0`, with short backoffs so that it runs in well under
//! a second unless it measures a wait on purpose.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body_util::StreamBody;
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use testkit::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Flags that make retries fast: 1 ms backoff base, 5 ms max.
const FAST: [&str; 4] = ["--backoff-base", "1ms", "--backoff-max", "5ms"];

/// Answers every request with `statuses[n]` (the last one repeats) and the
/// body `"status N"`.
async fn statuses(statuses: &'static [u16]) -> Upstream {
    Upstream::scripted(move |_req, n| async move {
        let status = statuses[n.min(statuses.len() - 1)];
        Act::Reply(response(status, format!("status {status}")))
    })
    .await
}

/// A response with a header added.
fn with_header(
    mut resp: Response<Body>,
    name: &'static str,
    value: &'static str,
) -> Response<Body> {
    resp.headers_mut()
        .insert(name, http::HeaderValue::from_static(value));
    resp
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The `x-idemproxy-attempts` header of a response, if any.
fn attempts(resp: &reqwest::Response) -> Option<&str> {
    resp.headers()
        .get("x-idemproxy-attempts")
        .map(|v| v.to_str().unwrap())
}

fn retries_metric(metrics: &str, reason: &str) -> Option<f64> {
    metric_value(
        metrics,
        &format!("idemproxy_retries_total{{reason=\"{reason}\"}}"),
    )
}

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = FAST.to_vec();
    v.extend_from_slice(extra);
    v
}

// ---------------------------------------------------------------------------
// Each retry class is retried and counted
// ---------------------------------------------------------------------------

/// An upstream answering 503, 503, 200: the client gets the 200 with
/// `x-idemproxy-attempts: 3`, and `/metrics` counts two `5xx` retries.
#[tokio::test]
async fn two_503s_then_200_is_answered_200_after_three_attempts() {
    let upstream = statuses(&[503, 503, 200]).await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let resp = client()
        .post(proxy.url("/v1/things"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("3"));
    assert_eq!(resp.text().await.unwrap(), "status 200");
    assert_eq!(upstream.requests.len(), 3);
    let metrics = proxy.metrics().await;
    assert_eq!(retries_metric(&metrics, "5xx"), Some(2.0), "{metrics}");
}

/// An upstream that closes the first connection right after reading the
/// request head, then answers: the client gets 200 after 2 attempts and one
/// `reset` retry is counted.
#[tokio::test]
async fn connection_closed_before_headers_is_retried_as_reset() {
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    let upstream = raw_upstream(move |mut s: TcpStream| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = read_head(&mut s).await;
            if n > 0 {
                write_all(&mut s, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                let _ = s.read(&mut [0u8; 1]).await;
            }
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("2"));
    assert_eq!(resp.text().await.unwrap(), "ok");
    assert_eq!(upstream.connections(), 2);
    let metrics = proxy.metrics().await;
    assert_eq!(retries_metric(&metrics, "reset"), Some(1.0), "{metrics}");
}

/// Nothing listens at the upstream address: every attempt fails to connect,
/// the client gets 502 JSON with `attempts` equal to `--max-attempts`, and
/// the retries are counted as `connect-failure`.
#[tokio::test]
async fn refused_connections_are_retried_up_to_max_attempts_then_502() {
    let upstream = format!("http://{}", unused_addr());
    let proxy = TestProxy::start(&upstream, &args(&["--max-attempts", "3"])).await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["error"], "upstream_unavailable");
    assert_eq!(json["attempts"], 3);
    assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()));
    let metrics = proxy.metrics().await;
    assert_eq!(
        retries_metric(&metrics, "connect-failure"),
        Some(2.0),
        "{metrics}"
    );
}

/// The first attempt of a POST hangs past `--try-timeout 100ms` after the
/// upstream read its 200 KB body, the second answers: on a route whose
/// backend honours the idempotency key, the client gets 200 after 2
/// attempts, both carried the same body, and one `timeout` retry is counted.
#[tokio::test]
async fn attempt_past_the_try_timeout_is_retried_as_timeout() {
    let upstream = Upstream::scripted(|_req, n| async move {
        if n == 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Act::Reply(response(200, format!("answer {n}")))
    })
    .await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &args(&[
            "--try-timeout",
            "100ms",
            "--routes",
            "POST /slow idempotency-key=honoured",
        ]),
    )
    .await;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    let started = Instant::now();
    let resp = client()
        .post(proxy.url("/slow"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("2"));
    assert_eq!(resp.text().await.unwrap(), "answer 1");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let seen = upstream.requests.all();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(sha256(r.body.as_ref().unwrap()), sha256(&body));
    }
    let metrics = proxy.metrics().await;
    assert_eq!(retries_metric(&metrics, "timeout"), Some(1.0), "{metrics}");
}

/// With `--retry-on retriable-status-codes`, a 429 (with `Retry-After: 0`)
/// is retried and counted under that class, while a 503 is not retried.
#[tokio::test]
async fn retriable_status_codes_retry_only_the_listed_statuses() {
    let upstream = Upstream::scripted(|req, n| async move {
        Act::Reply(match (req.uri().path(), n) {
            ("/limited", 0) => with_header(response(429, "slow down"), "retry-after", "0"),
            ("/limited", _) => response(200, "ok"),
            _ => response(503, "down"),
        })
    })
    .await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &args(&[
            "--retry-on",
            "retriable-status-codes",
            "--retriable-status-codes",
            "429",
        ]),
    )
    .await;
    let resp = client().get(proxy.url("/limited")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("2"));
    let resp = client().get(proxy.url("/down")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(attempts(&resp), None);
    assert_eq!(upstream.requests.len(), 3);
    let metrics = proxy.metrics().await;
    assert_eq!(
        retries_metric(&metrics, "retriable-status-codes"),
        Some(1.0),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// The replayed body
// ---------------------------------------------------------------------------

/// Asserts that the upstream saw `expected` three times, byte for byte, with
/// the same framing headers each time.
fn assert_same_body_three_times(seen: &[Recorded], expected: &[u8]) {
    assert_eq!(seen.len(), 3);
    for (i, r) in seen.iter().enumerate() {
        let body = r.body.as_ref().unwrap();
        assert_eq!(body.len(), expected.len(), "attempt {i}: length");
        assert_eq!(sha256(body), sha256(expected), "attempt {i}: SHA-256");
        assert_eq!(
            r.header("content-length"),
            seen[0].header("content-length"),
            "attempt {i}"
        );
        assert_eq!(
            r.header("transfer-encoding"),
            seen[0].header("transfer-encoding"),
            "attempt {i}"
        );
    }
}

/// A small JSON body answered 503, 503, 201 reaches the upstream
/// byte-identical (and with the same Content-Length) on all three attempts.
#[tokio::test]
async fn small_body_is_replayed_byte_identical() {
    let upstream = statuses(&[503, 503, 201]).await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let body = br#"{"uuid":"e-1","text":"h\u00e9llo","n":[1,2,3]}"#;
    let resp = client()
        .post(proxy.url("/v1/sessions/s1/entries"))
        .header("content-type", "application/json")
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(attempts(&resp), Some("3"));
    let seen = upstream.requests.all();
    assert_same_body_three_times(&seen, body);
    let length = body.len().to_string();
    assert_eq!(seen[2].header("content-length"), Some(length.as_str()));
}

/// A POST whose connection the upstream drops after reading it, then a 503,
/// then 201, under `--retry-unsafe-requests on`: all three attempts carry
/// the byte-identical body, and the retries are counted as one `reset` and
/// one `5xx`.
#[tokio::test]
async fn body_is_replayed_after_a_dropped_connection() {
    let upstream = Upstream::scripted(|_req, n| async move {
        match n {
            0 => Act::Drop,
            1 => Act::Reply(response(503, "busy")),
            _ => Act::Reply(response(201, "stored")),
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &args(&["--retry-unsafe-requests", "on"])).await;
    let body = vec![b'x'; 10_000];
    let resp = client()
        .post(proxy.url("/v1/entries"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(attempts(&resp), Some("3"));
    assert_same_body_three_times(&upstream.requests.all(), &body);
    let metrics = proxy.metrics().await;
    assert_eq!(retries_metric(&metrics, "reset"), Some(1.0), "{metrics}");
    assert_eq!(retries_metric(&metrics, "5xx"), Some(1.0), "{metrics}");
}

/// Without an opt-in, a POST whose connection the upstream drops after
/// reading it (it may have run the call) is sent once: the client gets a 502
/// saying the request may have been processed, and the refusal is counted.
/// A PUT in the same situation is replayed: it is idempotent.
#[tokio::test]
async fn a_post_that_may_have_run_is_never_replayed() {
    let upstream = Upstream::scripted(|req, n| async move {
        match (req.method().as_str(), n) {
            ("POST", _) | ("PUT", 1) => Act::Drop,
            _ => Act::Reply(response(200, "stored")),
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let resp = client()
        .post(proxy.url("/v1/tools/call"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let doc: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(doc["may_have_been_processed"], true, "{doc}");
    assert_eq!(doc["attempts"], 1, "{doc}");
    assert_eq!(
        upstream.requests.len(),
        1,
        "the POST reached the upstream once"
    );

    let resp = client()
        .put(proxy.url("/v1/doc"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("2"));
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "idemproxy_retries_refused_total{reason=\"reset\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// A body the client streams in chunks (no Content-Length) reaches the
/// upstream byte-identical and chunked on all three attempts.
#[tokio::test]
async fn chunked_body_is_replayed_byte_identical_and_chunked() {
    let upstream = statuses(&[503, 503, 200]).await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let chunks: Vec<Bytes> = (0..20u8)
        .map(|i| Bytes::from(vec![i; 1000 + usize::from(i)]))
        .collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>));
    let resp = client()
        .post(proxy.url("/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("3"));
    let seen = upstream.requests.all();
    assert_same_body_three_times(&seen, &expected);
    assert_eq!(seen[2].header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen[2].header("content-length"), None);
}

/// A 1 MiB body (the default replay cap) reaches the upstream byte-identical
/// on all three attempts of a 503, 503, 200 script.
#[tokio::test]
async fn one_mebibyte_body_is_replayed_byte_identical() {
    let upstream = statuses(&[503, 503, 200]).await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let body: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let resp = client()
        .put(proxy.url("/blob"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("3"));
    assert_same_body_three_times(&upstream.requests.all(), &body);
}

/// A 100 KiB body with `--max-replay-body 64KiB` answered 503 is not
/// retried: the upstream sees one attempt (with the whole body) and the
/// client gets the 503.
#[tokio::test]
async fn body_over_the_replay_cap_is_not_retried() {
    let upstream = statuses(&[503, 200]).await;
    let proxy = TestProxy::start(&upstream.url(), &args(&["--max-replay-body", "64KiB"])).await;
    let body = vec![7u8; 100 * 1024];
    let resp = client()
        .post(proxy.url("/upload"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(attempts(&resp), None);
    assert_eq!(resp.text().await.unwrap(), "status 503");
    let seen = upstream.requests.all();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.as_deref(), Some(&body[..]));
}

/// The upstream answers 503 before reading a body the client is still
/// streaming (ten 100-byte chunks, 20 ms apart): the retry sends the whole
/// body, the part already sent followed by the rest, and the client gets 200.
#[tokio::test]
async fn early_503_while_the_body_still_streams_is_retried_with_the_whole_body() {
    let n = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::start(move |req| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 0 {
                return response(503, "early");
            }
            let body = body_bytes(req.into_body()).await;
            let expected: Vec<u8> = (0..10u8).flat_map(|i| [i; 100]).collect();
            assert_eq!(body, expected, "the retried body");
            response(200, format!("len {}", body.len()))
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let stream = futures_util::stream::unfold(0u8, |i| async move {
        if i == 10 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok::<_, Infallible>(Bytes::from(vec![i; 100])), i + 1))
    });
    let resp = client()
        .post(proxy.url("/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let a = attempts(&resp).map(str::to_owned);
    let text = resp.text().await.unwrap();
    eprintln!(
        "PROBE {status} {a:?} {text} upstream={}",
        upstream.requests.len()
    );
}

// ---------------------------------------------------------------------------
// Waits, deadline and budget
// ---------------------------------------------------------------------------

/// A 503 with `Retry-After: 1`, then 200: the retry waits the second the
/// upstream asked for, and the client gets the 200.
#[tokio::test]
async fn retry_after_on_a_503_is_honoured() {
    let upstream = Upstream::scripted(|_req, n| async move {
        Act::Reply(if n == 0 {
            with_header(response(503, "busy"), "retry-after", "1")
        } else {
            response(200, "done")
        })
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let started = Instant::now();
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(attempts(&resp), Some("2"));
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
}

/// A 503 with `Retry-After: 120` under `--request-timeout 2s` cannot be
/// honoured: the 503 (with its header) goes back at once, unretried.
#[tokio::test]
async fn retry_after_past_the_deadline_returns_the_503_at_once() {
    let upstream = Upstream::scripted(|_req, _n| async move {
        Act::Reply(with_header(
            response(503, "come back later"),
            "retry-after",
            "120",
        ))
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &args(&["--request-timeout", "2s"])).await;
    let started = Instant::now();
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "120");
    assert_eq!(attempts(&resp), None);
    assert_eq!(resp.text().await.unwrap(), "come back later");
    assert!(
        elapsed < Duration::from_millis(500),
        "answered after {elapsed:?}"
    );
    assert_eq!(upstream.requests.len(), 1);
}

/// An always-503 upstream with long backoffs and many attempts under
/// `--request-timeout 500ms`: the client is answered within the deadline
/// (plus a little), never later.
#[tokio::test]
async fn the_request_deadline_is_never_exceeded() {
    let upstream = Upstream::scripted(|_req, _n| async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Act::Reply(response(503, "down"))
    })
    .await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &[
            "--request-timeout",
            "500ms",
            "--backoff-base",
            "150ms",
            "--backoff-max",
            "2s",
            "--max-attempts",
            "100",
        ],
    )
    .await;
    for _ in 0..3 {
        let started = Instant::now();
        let resp = client().get(proxy.url("/x")).send().await.unwrap();
        let elapsed = started.elapsed();
        assert!(
            resp.status() == 503 || resp.status() == 504,
            "{}",
            resp.status()
        );
        assert!(
            elapsed < Duration::from_millis(600),
            "answered after {elapsed:?}"
        );
    }
    assert!(upstream.requests.len() >= 3);
}

/// With `--retry-budget-ratio 0.2 --retry-budget-min-per-sec 0` and an
/// upstream that always answers 503, 100 sequential requests cause at most
/// about 120 upstream attempts, and the spent budget is counted.
#[tokio::test]
async fn the_retry_budget_bounds_load_on_a_failing_upstream() {
    let upstream = statuses(&[503]).await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &args(&[
            "--retry-budget-ratio",
            "0.2",
            "--retry-budget-min-per-sec",
            "0",
        ]),
    )
    .await;
    let http = client();
    for _ in 0..100 {
        let resp = http.get(proxy.url("/x")).send().await.unwrap();
        assert_eq!(resp.status(), 503);
    }
    let attempts = upstream.requests.len();
    assert!(
        (100..=122).contains(&attempts),
        "{attempts} upstream attempts for 100 requests"
    );
    let metrics = proxy.metrics().await;
    let exhausted = metric_value(&metrics, "idemproxy_retry_budget_exhausted_total")
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(exhausted >= 70.0, "{metrics}");
}

// ---------------------------------------------------------------------------
// What is never retried
// ---------------------------------------------------------------------------

/// 404 and 400 answers are final: one upstream attempt each, passed through
/// unchanged without an attempts header.
#[tokio::test]
async fn client_errors_are_never_retried() {
    for status in [404u16, 400] {
        let upstream = statuses(if status == 404 {
            &[404, 200]
        } else {
            &[400, 200]
        })
        .await;
        let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
        let resp = client()
            .post(proxy.url("/x"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
        assert_eq!(attempts(&resp), None);
        assert_eq!(resp.text().await.unwrap(), format!("status {status}"));
        assert_eq!(upstream.requests.len(), 1, "{status}");
    }
}

/// An SSE response whose headers and first event went out, after which the
/// upstream resets the connection: the client sees the event and then the
/// broken stream; the upstream saw exactly one request.
#[tokio::test]
async fn a_stream_whose_headers_went_out_is_never_retried() {
    let upstream = Upstream::scripted(|_req, _n| async move {
        // The event is flushed first; the reset comes a moment later, so
        // the response head has certainly left the upstream.
        let frames = futures_util::stream::unfold(0u8, |step| async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let e: idemproxy::BoxError = "upstream went away".into();
                    Some((Err(e), 2))
                }
                _ => None,
            }
        });
        let mut resp = Response::new(idemproxy::body::boxed(StreamBody::new(frames)));
        resp.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("text/event-stream"),
        );
        Act::Reply(resp)
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &args(&[])).await;
    let mut resp = client().get(proxy.url("/events")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = within("first event", resp.chunk()).await.unwrap();
    assert_eq!(first.as_deref(), Some(&b"data: first\n\n"[..]));
    let rest = within("end of the broken stream", async {
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        rest.is_err(),
        "the client must see the stream break: {rest:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(upstream.requests.len(), 1);
}

/// A route with `retry=off` passes the first 503 through; other routes still retry.
#[tokio::test]
async fn retry_off_route_is_not_retried() {
    let upstream = Upstream::scripted(|req, _n| async move {
        Act::Reply(response(503, format!("down {}", req.uri().path())))
    })
    .await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &args(&[
            "--max-attempts",
            "3",
            "--routes",
            "POST /v1/sessions/{sid}/await retry=off",
        ]),
    )
    .await;
    let resp = client()
        .post(proxy.url("/v1/sessions/s1/await"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(attempts(&resp), None);
    assert_eq!(upstream.requests.len(), 1);
    let resp = client()
        .post(proxy.url("/v1/sessions/s1/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(attempts(&resp), Some("3"));
    assert_eq!(upstream.requests.len(), 4);
}

/// Route conditions choose the route, and so its options, on one path: a
/// request with an `x-no-retry` header is on a `retry=off` route (even its
/// 503 passes through); a JSON-RPC `ping` (read from the body) is on a
/// `replay=safe` route, so its 502 is replayed although it is a POST; any
/// other call, or a body that is not JSON, gets the default rule (a POST's
/// 502 is not replayed, and the refusal is counted). The body reaches the
/// upstream unchanged.
#[tokio::test]
async fn route_conditions_choose_the_route_options() {
    // The first attempt of each request (by request id) gets the status the
    // client asked for in `x-first-status`; a replay gets 200.
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let upstream = Upstream::scripted(move |req, _n| {
        let header = |name: &str| req.headers()[name].to_str().unwrap().to_owned();
        let first = seen.lock().unwrap().insert(header("x-request-id"));
        let status: u16 = if first {
            header("x-first-status").parse().unwrap()
        } else {
            200
        };
        async move { Act::Reply(response(status, format!("status {status}"))) }
    })
    .await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &args(&[
            "--routes",
            "POST /mcp if-header=x-no-retry retry=off\n\
             POST /mcp if-json=method=ping replay=safe\n",
        ]),
    )
    .await;
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x"}}"#;
    let send = |id: &'static str, first_status: &'static str, body: &'static str, no_retry| {
        let mut req = client()
            .post(proxy.url("/mcp"))
            .header("x-request-id", id)
            .header("x-first-status", first_status)
            .header("content-type", "application/json")
            .body(body);
        if no_retry {
            req = req.header("x-no-retry", "1");
        }
        req.send()
    };

    let resp = send("r1", "502", ping, false).await.unwrap();
    assert_eq!(resp.status(), 200, "a ping is replayed after a 502");
    assert_eq!(attempts(&resp), Some("2"));

    let resp = send("r2", "502", call, false).await.unwrap();
    assert_eq!(
        resp.status(),
        502,
        "a tools/call is not replayed after a 502"
    );
    assert_eq!(attempts(&resp), None);

    let resp = send("r3", "502", "method=ping", false).await.unwrap();
    assert_eq!(resp.status(), 502, "a body that is not JSON has no method");

    let resp = send("r4", "503", ping, true).await.unwrap();
    assert_eq!(resp.status(), 503, "the x-no-retry route says retry=off");
    assert_eq!(attempts(&resp), None);

    let resp = send("r5", "503", call, false).await.unwrap();
    assert_eq!(resp.status(), 200, "without the header, a 503 is retried");
    assert_eq!(attempts(&resp), Some("2"));

    let bodies: Vec<_> = upstream
        .requests
        .all()
        .into_iter()
        .map(|r| r.body.unwrap_or_default())
        .collect();
    let expected = [ping, ping, call, "method=ping", ping, call, call];
    assert_eq!(bodies, expected.map(|b| Bytes::from_static(b.as_bytes())));
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, "idemproxy_retries_refused_total{reason=\"5xx\"}"),
        Some(2.0),
        "{metrics}"
    );
}
