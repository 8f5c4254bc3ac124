//! Sessions and heartbeats end to end (issue 5): a real proxy started
//! in-process in front of a scripted, recording upstream (and, at the end, the
//! example session backend). The proxy runs on the real clock, so intervals
//! are short (100-500 ms) and every wait is bounded.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, header};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::{Value, json};
use testkit::backend as session_backend;
use testkit::{Recorded, TestProxy, Upstream, client, eventually, metric_value, response, within};

// ---------------------------------------------------------------------------
// A scripted upstream that records every request with its arrival time
// ---------------------------------------------------------------------------

/// One request as the upstream saw it: the kit's [`Recorded`], in the terms
/// of these tests.
#[derive(Clone, Debug)]
struct Hit {
    at: Instant,
    method: Method,
    /// Path and query, as received.
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

impl From<Recorded> for Hit {
    fn from(r: Recorded) -> Hit {
        Hit {
            at: r.at,
            method: r.method,
            target: r
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            headers: r.headers,
            body: r.body.expect("a buffered upstream records the body"),
        }
    }
}

impl Hit {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn is(&self, method: &str, target: &str) -> bool {
        self.method == method && self.target == target
    }

    /// Whether the path (query aside) ends in `/heartbeat`.
    fn is_heartbeat(&self) -> bool {
        self.target
            .split('?')
            .next()
            .is_some_and(|path| path.ends_with("/heartbeat"))
    }

    /// The path segment after `/v1/sessions/`, if any.
    fn sid(&self) -> Option<&str> {
        self.target
            .strip_prefix("/v1/sessions/")?
            .split(['/', '?'])
            .next()
    }
}

/// What the upstream answers, possibly after a delay (a long poll).
struct Reply {
    delay: Duration,
    response: Response<testkit::Body>,
}

impl From<Response<testkit::Body>> for Reply {
    fn from(response: Response<testkit::Body>) -> Self {
        Reply {
            delay: Duration::ZERO,
            response,
        }
    }
}

/// A reply with `status` and a JSON body.
fn json_reply(status: u16, doc: Value) -> Reply {
    let mut resp = response(status, doc.to_string());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.into()
}

/// A reply with `status` and an empty body.
fn status(code: u16) -> Reply {
    response(code, "").into()
}

/// A body of `chunks` chunks, one every `every`: a response that streams.
fn slow_body(chunks: usize, every: Duration) -> testkit::Body {
    let stream = futures_util::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        tokio::time::sleep(every).await;
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from("tick\n"))),
            i + 1,
        ))
    });
    idemproxy::body::boxed(StreamBody::new(stream))
}

/// The recording upstream (the kit's buffered [`Upstream`], which records
/// each request before `script` decides its answer).
struct Backend {
    upstream: Upstream,
}

impl Backend {
    async fn start(script: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> Backend {
        let upstream = Upstream::buffered(move |req: Request<Bytes>| {
            let reply = script(&Hit::from(Recorded::from(&req)));
            async move {
                tokio::time::sleep(reply.delay).await;
                reply.response
            }
        })
        .await;
        Backend { upstream }
    }

    fn url(&self) -> String {
        self.upstream.url()
    }

    /// Every request so far, in arrival order.
    fn hits(&self) -> Vec<Hit> {
        self.upstream
            .requests
            .all()
            .into_iter()
            .map(Hit::from)
            .collect()
    }

    /// The requests matching `method` and `target`, in arrival order.
    fn hits_to(&self, method: &str, target: &str) -> Vec<Hit> {
        let mut hits = self.hits();
        hits.retain(|h| h.is(method, target));
        hits
    }

    /// Requests whose path ends in `/heartbeat`.
    fn heartbeats(&self) -> Vec<Hit> {
        let mut hits = self.hits();
        hits.retain(|h| h.is_heartbeat());
        hits
    }

    /// Waits (bounded) until `count()` reaches `n`.
    async fn wait_until(&self, what: &str, n: usize, count: impl Fn(&Backend) -> usize) {
        eventually(what, || count(self) >= n).await;
    }
}

/// `POST /v1/sessions/{sid}/heartbeat` for every session id.
const HEARTBEAT: [&str; 2] = ["--heartbeat", "POST /v1/sessions/{session}/heartbeat"];

/// Starts a proxy with `extra` flags plus `flags` (grouped for readability).
async fn proxy(backend: &Backend, flags: &[&[&str]]) -> TestProxy {
    let args: Vec<&str> = flags.iter().flat_map(|f| f.iter().copied()).collect();
    TestProxy::start(&backend.url(), &args).await
}

// ---------------------------------------------------------------------------
// Client and admin helpers
// ---------------------------------------------------------------------------

/// Sends `method path` through the proxy with `headers`; returns status and body.
async fn call(
    proxy: &TestProxy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Bytes) {
    let mut req = client().request(method.parse().unwrap(), proxy.url(path));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = within(&format!("{method} {path}"), req.send())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let code = resp.status().as_u16();
    let body = within("response body", resp.bytes()).await.unwrap();
    (code, body)
}

/// The `sessions` array of `GET /sessions` on the admin port.
async fn sessions(proxy: &TestProxy) -> Vec<Value> {
    let text = admin_text(proxy, "/sessions").await;
    let doc: Value = serde_json::from_str(&text).expect("/sessions is JSON");
    doc["sessions"]
        .as_array()
        .expect("a sessions array")
        .clone()
}

/// The body of `GET path` on the admin port.
async fn admin_text(proxy: &TestProxy, path: &str) -> String {
    let resp = within(path, client().get(proxy.admin_url(path)).send())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.text().await.unwrap()
}

/// Waits (bounded) until the proxy tracks exactly `n` sessions.
async fn wait_sessions(proxy: &TestProxy, n: usize) -> Vec<Value> {
    within(&format!("{n} tracked session(s)"), async {
        loop {
            let list = sessions(proxy).await;
            if list.len() == n {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A counter or gauge of `/metrics` (0 when absent).
async fn metric(proxy: &TestProxy, name_and_labels: &str) -> f64 {
    metric_value(&proxy.metrics().await, name_and_labels).unwrap_or(0.0)
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

// ---------------------------------------------------------------------------
// Heartbeat timing and content
// ---------------------------------------------------------------------------

/// An idle session gets a heartbeat every interval (±10%) with the configured
/// path and body, the client's Authorization and the session's own header.
#[tokio::test]
async fn idle_session_gets_heartbeats_at_the_interval() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-body", r#"{"ID":"{session}"}"#],
            &["--heartbeat-interval", "200ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    let auth = [("authorization", "Bearer t0k3n"), ("x-session-id", "s-1")];
    assert_eq!(call(&proxy, "GET", "/v1/things", &auth).await.0, 200);
    let registered = Instant::now();

    backend
        .wait_until("5 heartbeats", 5, |b| b.heartbeats().len())
        .await;
    let beats = backend.heartbeats();
    for hb in &beats {
        assert!(hb.is("POST", "/v1/sessions/s-1/heartbeat"), "{hb:?}");
        assert_eq!(hb.header("authorization"), Some("Bearer t0k3n"));
        assert_eq!(hb.header("x-session-id"), Some("s-1"));
        assert_eq!(hb.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_slice(&hb.body).unwrap();
        assert_eq!(body, json!({"ID": "s-1"}));
    }
    // The first comes an interval after the request, the next ones an interval apart.
    let first = beats[0].at.duration_since(registered);
    assert!(first >= Duration::from_millis(170), "first after {first:?}");
    for pair in beats.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            (Duration::from_millis(170)..Duration::from_millis(600)).contains(&gap),
            "heartbeats {gap:?} apart"
        );
    }
    let list = sessions(&proxy).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["source"], "header:x-session-id");
    assert_eq!(list[0]["consecutive_failures"], 0);
}

/// A session learned from a cookie (`cookie:sid`, globally and on the
/// route), with `cookie` also among the copied headers (the default): each
/// heartbeat carries the client's `Cookie` line exactly once, and its
/// `Authorization` once.
#[tokio::test]
async fn cookie_session_heartbeat_carries_one_cookie_line() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "100ms"],
            &["--session-sources", "cookie:sid"],
            &["--routes", "GET /v1/things session=cookie:sid"],
        ],
    )
    .await;
    let headers = [
        ("authorization", "Bearer t0k3n"),
        ("cookie", "sid=s-7; theme=dark"),
    ];
    assert_eq!(call(&proxy, "GET", "/v1/things", &headers).await.0, 200);
    backend
        .wait_until("2 heartbeats", 2, |b| b.heartbeats().len())
        .await;
    for hb in backend.heartbeats() {
        assert!(hb.is("POST", "/v1/sessions/s-7/heartbeat"), "{hb:?}");
        let cookies: Vec<&str> = hb
            .headers
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies, ["sid=s-7; theme=dark"], "{hb:?}");
        assert_eq!(hb.headers.get_all("authorization").iter().count(), 1);
    }
}

/// Client traffic every half interval on a backend whose calls do not renew
/// the session: heartbeats go on every interval while the client is busy.
/// On a route declared `renews`, the same traffic renews the session and
/// no heartbeat is needed.
#[tokio::test]
async fn busy_clients_get_heartbeats_unless_their_calls_renew() {
    for (routes, busy_beats) in [("", 3..=6), ("GET /v1/work renews", 0..=1)] {
        let backend = Backend::start(|_| status(200)).await;
        let proxy = proxy(
            &backend,
            &[
                &HEARTBEAT,
                &["--heartbeat-interval", "400ms"],
                &["--session-sources", "header:x-session-id"],
                &["--routes", routes],
            ],
        )
        .await;
        let sid = [("x-session-id", "busy")];
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2000) {
            assert_eq!(call(&proxy, "GET", "/v1/work", &sid).await.0, 200);
            sleep_ms(200).await;
        }
        // A silent session gets 4-5 heartbeats in 2 s.
        let during = backend.heartbeats().len();
        assert!(
            busy_beats.contains(&during),
            "routes {routes:?}: {during} heartbeats during steady traffic"
        );
        assert!(backend.heartbeats().iter().all(|h| h.sid() == Some("busy")));
        let list = sessions(&proxy).await;
        assert_eq!(list[0]["last_activity_secs_ago"], 0, "{list:?}");
        assert!(list[0]["last_renewal_secs_ago"].is_u64(), "{list:?}");
    }
}

// ---------------------------------------------------------------------------
// Activity: in-flight requests, idle timeout
// ---------------------------------------------------------------------------

/// A client that refreshes its token mid-session: the heartbeats after its
/// next request carry the new token, not the one it registered with.
#[tokio::test]
async fn heartbeats_carry_the_token_of_the_latest_request() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    let first = [("authorization", "Bearer one"), ("x-session-id", "s-1")];
    assert_eq!(call(&proxy, "GET", "/v1/things", &first).await.0, 200);
    backend
        .wait_until("a heartbeat", 1, |b| b.heartbeats().len())
        .await;
    assert_eq!(
        backend.heartbeats()[0].header("authorization"),
        Some("Bearer one")
    );

    let refreshed = [("authorization", "Bearer two"), ("x-session-id", "s-1")];
    assert_eq!(call(&proxy, "GET", "/v1/things", &refreshed).await.0, 200);
    // A heartbeat already on its way when the token changed may still
    // carry the old one; every later one carries the new one.
    let sent = backend.hits().len();
    backend
        .wait_until("three heartbeats after the refresh", sent + 3, |b| {
            b.hits().len()
        })
        .await;
    let after: Vec<_> = backend.hits().into_iter().skip(sent).collect();
    assert!(after.iter().all(Hit::is_heartbeat), "{after:?}");
    for hb in &after[1..] {
        assert_eq!(hb.header("authorization"), Some("Bearer two"), "{hb:?}");
    }
    assert_eq!(sessions(&proxy).await.len(), 1);
}

/// A long poll (answered after 5 intervals) keeps its session past the idle
/// timeout, and heartbeats go on during it.
#[tokio::test]
async fn long_poll_keeps_its_session_alive_past_the_idle_timeout() {
    let backend = Backend::start(|hit| {
        if hit.target.ends_with("/await") {
            Reply {
                delay: Duration::from_millis(1000),
                ..status(200)
            }
        } else {
            status(200)
        }
    })
    .await;
    let routes = "GET /v1/sessions/{sid}/await session=path:sid timeout=1m retry=off\n\
                  GET /v1/sessions/{sid} session=path:sid";
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-idle-timeout", "400ms"],
            &["--routes", routes],
        ],
    )
    .await;
    assert_eq!(call(&proxy, "GET", "/v1/sessions/lp", &[]).await.0, 200);

    let poll = tokio::spawn({
        let url = proxy.url("/v1/sessions/lp/await");
        async move { client().get(url).send().await.map(|r| r.status()) }
    });
    let poll_started = Instant::now();
    // Past the idle timeout, in the middle of the poll.
    sleep_ms(700).await;
    let list = sessions(&proxy).await;
    assert_eq!(list.len(), 1, "dropped while a request is in flight");
    assert_eq!(list[0]["in_flight"], 1);

    let status = within("the long poll", poll).await.unwrap().unwrap();
    assert_eq!(status, 200);
    let poll_ended = Instant::now();
    let during = backend
        .heartbeats()
        .iter()
        .filter(|h| h.at > poll_started && h.at < poll_ended)
        .count();
    assert!(during >= 3, "{during} heartbeats during a 1 s poll");

    // Idle again: the timeout now runs from the end of the poll.
    assert_eq!(wait_sessions(&proxy, 0).await.len(), 0);
    let gone_after = poll_ended.elapsed();
    assert!(gone_after >= Duration::from_millis(350), "{gone_after:?}");
}

/// A session first seen on a streaming response stays tracked (and
/// heartbeated) while the body streams, longer than the idle timeout.
#[tokio::test]
async fn streaming_response_keeps_its_session_alive() {
    let backend = Backend::start(|hit| {
        if hit.target.ends_with("/events") {
            Response::new(slow_body(6, Duration::from_millis(200))).into()
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-idle-timeout", "400ms"],
            &["--routes", "GET /v1/sessions/{sid}/events session=path:sid"],
        ],
    )
    .await;
    let started = Instant::now();
    let mut resp = client()
        .get(proxy.url("/v1/sessions/stream/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut chunks = 0;
    while let Some(_chunk) = within("a chunk", resp.chunk()).await.unwrap() {
        chunks += 1;
        if chunks == 4 {
            // 800 ms into the stream: past the idle timeout, still tracked.
            let list = sessions(&proxy).await;
            assert_eq!(list.len(), 1, "dropped while its response streams");
            assert_eq!(list[0]["in_flight"], 1);
        }
    }
    let ended = Instant::now();
    let during = backend
        .heartbeats()
        .iter()
        .filter(|h| h.at > started && h.at < ended)
        .count();
    assert!(during >= 3, "{during} heartbeats during a 1.2 s stream");
    assert_eq!(wait_sessions(&proxy, 0).await.len(), 0);
}

/// Without client traffic, heartbeats stop at the idle timeout and the
/// session is no longer tracked (`sessions_ended_total{reason="idle"}`).
#[tokio::test]
async fn idle_timeout_stops_heartbeats() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-idle-timeout", "700ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "idle")]).await;
    let started = Instant::now();
    assert_eq!(wait_sessions(&proxy, 0).await.len(), 0);
    let dropped_after = started.elapsed();
    assert!(
        dropped_after >= Duration::from_millis(650),
        "{dropped_after:?}"
    );

    let at_drop = backend.heartbeats().len();
    assert!((2..=4).contains(&at_drop), "{at_drop} heartbeats in 700 ms");
    sleep_ms(600).await;
    assert_eq!(backend.heartbeats().len(), at_drop, "heartbeats after idle");
    assert_eq!(
        metric(&proxy, r#"idemproxy_sessions_ended_total{reason="idle"}"#).await,
        1.0
    );
}

// ---------------------------------------------------------------------------
// The end of a session
// ---------------------------------------------------------------------------

/// A `session-end` route answered 2xx stops the heartbeats; a failed one
/// (403) leaves the session tracked.
#[tokio::test]
async fn session_end_route_stops_heartbeats() {
    let refuse_delete = Arc::new(AtomicUsize::new(1));
    let refuse = refuse_delete.clone();
    let backend = Backend::start(move |hit| {
        if hit.method == Method::DELETE {
            if refuse.fetch_sub(1, Ordering::SeqCst) > 0 {
                return status(403);
            }
            return status(204);
        }
        status(200)
    })
    .await;
    let routes = "DELETE /v1/sessions/{sid} session=path:sid session-end\n\
                  * /v1/sessions/{sid}/{*rest} session=path:sid";
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--routes", routes],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/sessions/e1/entries", &[]).await;
    backend
        .wait_until("a heartbeat", 1, |b| b.heartbeats().len())
        .await;

    assert_eq!(call(&proxy, "DELETE", "/v1/sessions/e1", &[]).await.0, 403);
    assert_eq!(
        sessions(&proxy).await.len(),
        1,
        "a refused end ends nothing"
    );

    assert_eq!(call(&proxy, "DELETE", "/v1/sessions/e1", &[]).await.0, 204);
    assert!(sessions(&proxy).await.is_empty());
    let at_end = backend.heartbeats().len();
    sleep_ms(700).await;
    assert_eq!(
        backend.heartbeats().len(),
        at_end,
        "heartbeats after the end"
    );
    assert_eq!(
        metric(
            &proxy,
            r#"idemproxy_sessions_ended_total{reason="client_end"}"#
        )
        .await,
        1.0
    );
}

/// A heartbeat answered 404 forgets the session: no later heartbeat, and the
/// client's own failed call does not bring it back.
#[tokio::test]
async fn heartbeat_404_forgets_the_session_for_good() {
    let backend = Backend::start(|hit| {
        if hit.is_heartbeat() {
            json_reply(404, json!({"error": "invalid session"}))
        } else if hit.header("x-gone").is_some() {
            status(404)
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "g1")]).await;
    backend
        .wait_until("a heartbeat", 1, |b| b.heartbeats().len())
        .await;
    assert_eq!(wait_sessions(&proxy, 0).await.len(), 0);

    // The client tries again; the backend says 404 too.
    let (code, _) = call(
        &proxy,
        "GET",
        "/v1/x",
        &[("x-session-id", "g1"), ("x-gone", "1")],
    )
    .await;
    assert_eq!(code, 404);
    sleep_ms(700).await;
    assert_eq!(
        backend.heartbeats().len(),
        1,
        "a gone session was heartbeated"
    );
    assert!(sessions(&proxy).await.is_empty());
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"idemproxy_heartbeats_total{outcome="gone"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, r#"idemproxy_sessions_ended_total{reason="gone"}"#),
        Some(1.0)
    );
    assert_eq!(metric_value(&metrics, "idemproxy_sessions"), Some(0.0));
}

/// A heartbeat answered 503 is retried with a short backoff, before the next
/// interval; the session survives and its failure count stays 0.
#[tokio::test]
async fn heartbeat_5xx_is_retried() {
    let beats = Arc::new(AtomicUsize::new(0));
    let counter = beats.clone();
    let backend = Backend::start(move |hit| {
        if hit.is_heartbeat() && counter.fetch_add(1, Ordering::SeqCst) < 2 {
            return status(503);
        }
        status(200)
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "500ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "r1")]).await;
    backend
        .wait_until("two retries", 3, |b| b.heartbeats().len())
        .await;
    let hits = backend.heartbeats();
    let first_retry = hits[1].at.duration_since(hits[0].at);
    assert!(
        (Duration::from_millis(90)..Duration::from_millis(400)).contains(&first_retry),
        "first retry after {first_retry:?}"
    );
    within("ok counted", async {
        while metric(&proxy, r#"idemproxy_heartbeats_total{outcome="ok"}"#).await < 1.0 {
            sleep_ms(20).await;
        }
    })
    .await;
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"idemproxy_heartbeats_total{outcome="retried"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&metrics, r#"idemproxy_heartbeats_total{outcome="failed"}"#),
        Some(0.0)
    );
    let list = sessions(&proxy).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["consecutive_failures"], 0);
}

/// `--heartbeat-alive-field result.TTL`: a 200 `{}` means the session is gone;
/// a 200 carrying the field keeps it.
#[tokio::test]
async fn answer_without_alive_field_drops_the_session() {
    let backend = Backend::start(|hit| match hit.sid() {
        Some("dead") if hit.is_heartbeat() => json_reply(200, json!({})),
        _ if hit.is_heartbeat() => json_reply(200, json!({"result": {"TTL": 30}})),
        _ => status(200),
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--heartbeat-alive-field", "result.TTL"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "dead")]).await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "live")]).await;
    assert_eq!(wait_sessions(&proxy, 1).await.len(), 1);
    sleep_ms(700).await;
    let dead = backend.hits_to("POST", "/v1/sessions/dead/heartbeat").len();
    let live = backend.hits_to("POST", "/v1/sessions/live/heartbeat").len();
    assert_eq!(
        dead, 1,
        "a session without the alive field was heartbeated again"
    );
    assert!(live >= 3, "{live} heartbeats of the live session");
    assert_eq!(sessions(&proxy).await.len(), 1);
    assert_eq!(
        metric(&proxy, r#"idemproxy_sessions_ended_total{reason="gone"}"#).await,
        1.0
    );
}

// ---------------------------------------------------------------------------
// Where sessions come from
// ---------------------------------------------------------------------------

/// `POST /v1/sessions session=response-json:id`: the id in the created
/// session's JSON answer is heartbeated, and the client gets the body intact.
#[tokio::test]
async fn session_learned_from_a_response_json_field() {
    let created = json!({"id": "from-json", "expires_in_ms": 2000});
    let answer = created.clone();
    let backend = Backend::start(move |hit| {
        if hit.is("POST", "/v1/sessions") {
            json_reply(201, answer.clone())
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--routes", "POST /v1/sessions session=response-json:id"],
        ],
    )
    .await;
    let (code, body) = call(
        &proxy,
        "POST",
        "/v1/sessions",
        &[("authorization", "Bearer j")],
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), created);
    backend
        .wait_until("2 heartbeats", 2, |b| b.heartbeats().len())
        .await;
    for hb in backend.heartbeats() {
        assert!(hb.is("POST", "/v1/sessions/from-json/heartbeat"), "{hb:?}");
        assert_eq!(hb.header("authorization"), Some("Bearer j"));
    }
    let list = sessions(&proxy).await;
    assert_eq!(list[0]["source"], "response-json:id");
}

/// `--session-sources header:Mcp-Session-Id,response-header:Mcp-Session-Id`
/// (MCP): the id an initialize call returns in a header is heartbeated, and
/// the heartbeat carries the session's header as later requests will.
#[tokio::test]
async fn session_learned_from_a_response_header() {
    let backend = Backend::start(|hit| {
        if hit.is("POST", "/mcp") && hit.header("mcp-session-id").is_none() {
            let mut resp = response(200, "{}");
            resp.headers_mut()
                .insert("mcp-session-id", "mcp-42".parse().unwrap());
            resp.into()
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &["--heartbeat", "GET /v1/sessions/{session}/heartbeat"],
            &["--heartbeat-interval", "200ms"],
            &[
                "--session-sources",
                "header:Mcp-Session-Id,response-header:Mcp-Session-Id",
            ],
        ],
    )
    .await;
    assert_eq!(call(&proxy, "POST", "/mcp", &[]).await.0, 200);
    backend
        .wait_until("a heartbeat", 1, |b| b.heartbeats().len())
        .await;
    let hb = &backend.heartbeats()[0];
    assert!(hb.is("GET", "/v1/sessions/mcp-42/heartbeat"), "{hb:?}");
    assert_eq!(hb.header("mcp-session-id"), Some("mcp-42"));
    assert_eq!(
        sessions(&proxy).await[0]["source"],
        "response-header:Mcp-Session-Id"
    );
}

/// A create call that fails (400 with an id in its body) registers nothing:
/// `/sessions` stays empty and no heartbeat is ever sent.
#[tokio::test]
async fn failed_create_registers_nothing() {
    let backend = Backend::start(|hit| {
        if hit.is("POST", "/v1/sessions") {
            let mut reply = json_reply(400, json!({"id": "not-created", "error": "bad"}));
            reply
                .response
                .headers_mut()
                .insert("x-session-id", "not-created".parse().unwrap());
            reply
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &[
                "--routes",
                "POST /v1/sessions session=response-json:id session=response-header:x-session-id",
            ],
        ],
    )
    .await;
    assert_eq!(call(&proxy, "POST", "/v1/sessions", &[]).await.0, 400);
    sleep_ms(600).await;
    assert!(sessions(&proxy).await.is_empty());
    assert!(backend.heartbeats().is_empty());
    assert_eq!(metric(&proxy, "idemproxy_sessions").await, 0.0);
}

// ---------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------

/// `--heartbeat-body '{"ID":"{session}"}'` with the id `a"b\c`: the body is
/// valid JSON with that exact id, and the path is percent-encoded.
#[tokio::test]
async fn heartbeat_body_escapes_the_session_id_as_json() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-body", r#"{"ID":"{session}"}"#],
            &["--heartbeat-interval", "200ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    let id = r#"a"b\c"#;
    assert_eq!(
        call(&proxy, "GET", "/v1/x", &[("x-session-id", id)])
            .await
            .0,
        200
    );
    backend
        .wait_until("a heartbeat", 1, |b| b.heartbeats().len())
        .await;
    let hb = &backend.heartbeats()[0];
    assert_eq!(hb.target, "/v1/sessions/a%22b%5Cc/heartbeat");
    let body: Value = serde_json::from_slice(&hb.body)
        .unwrap_or_else(|e| panic!("{:?} is not JSON: {e}", hb.body));
    assert_eq!(body, json!({"ID": id}));
}

/// A lease (`PUT /{container}/{blob}` returning `x-lease-id`) is renewed on
/// that resource: `PUT /{container}/{blob}?comp=lease` with the lease headers.
#[tokio::test]
async fn lease_is_renewed_on_its_own_resource() {
    let backend = Backend::start(|hit| {
        if hit.is("PUT", "/box/blob-1") {
            let mut resp = response(201, "");
            resp.headers_mut()
                .insert("x-lease-id", "lease-7".parse().unwrap());
            resp.into()
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &["--heartbeat-interval", "200ms"],
            &[
                "--heartbeat-set-headers",
                "x-lease-action: renew; x-lease-id: {session}",
            ],
            &[
                "--routes",
                "PUT /{container}/{blob} session=response-header:x-lease-id \
                 heartbeat=PUT:/{container}/{blob}?comp=lease",
            ],
        ],
    )
    .await;
    let (code, _) = call(
        &proxy,
        "PUT",
        "/box/blob-1",
        &[("authorization", "SharedKey k")],
    )
    .await;
    assert_eq!(code, 201);
    backend
        .wait_until("2 renewals", 2, |b| {
            b.hits_to("PUT", "/box/blob-1?comp=lease").len()
        })
        .await;
    for renew in backend.hits_to("PUT", "/box/blob-1?comp=lease") {
        assert_eq!(renew.header("x-lease-action"), Some("renew"));
        assert_eq!(renew.header("x-lease-id"), Some("lease-7"));
        assert_eq!(renew.header("authorization"), Some("SharedKey k"));
    }
    // Only the client's PUT and the renewals reached the upstream.
    assert_eq!(backend.hits_to("PUT", "/box/blob-1").len(), 1);
}

/// Heartbeats that keep failing with a non-retried status (400) drop the
/// session after `--heartbeat-max-failures` rounds.
#[tokio::test]
async fn repeated_heartbeat_failures_drop_the_session() {
    let backend = Backend::start(|hit| {
        if hit.is_heartbeat() {
            status(400)
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "150ms"],
            &["--heartbeat-max-failures", "2"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "f1")]).await;
    backend
        .wait_until("a failed heartbeat", 1, |b| b.heartbeats().len())
        .await;
    let list = wait_sessions(&proxy, 1).await;
    assert!(list[0]["consecutive_failures"].as_u64().unwrap() <= 1);
    assert_eq!(wait_sessions(&proxy, 0).await.len(), 0);
    sleep_ms(500).await;
    assert_eq!(
        backend.heartbeats().len(),
        2,
        "one heartbeat per failed round"
    );
    assert_eq!(
        metric(
            &proxy,
            r#"idemproxy_sessions_ended_total{reason="failures"}"#
        )
        .await,
        1.0
    );
}

/// A graceful shutdown stops the heartbeats.
#[tokio::test]
async fn shutdown_stops_heartbeats() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "150ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "sd")]).await;
    backend
        .wait_until("a heartbeat", 1, |b| b.heartbeats().len())
        .await;
    proxy.stop().await;
    let at_stop = backend.heartbeats().len();
    sleep_ms(500).await;
    assert_eq!(
        backend.heartbeats().len(),
        at_stop,
        "heartbeats after shutdown"
    );
}

// ---------------------------------------------------------------------------
// The session table: cap, admin, secrecy, metrics
// ---------------------------------------------------------------------------

/// `--max-sessions 2`: a third session evicts the one with the oldest
/// activity (not the oldest registration), which is never heartbeated.
#[tokio::test]
async fn session_cap_evicts_the_oldest_idle_session() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "300ms"],
            &["--max-sessions", "2"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    for sid in ["s1", "s2", "s1", "s3"] {
        call(&proxy, "GET", "/v1/x", &[("x-session-id", sid)]).await;
        sleep_ms(30).await;
    }
    let full = Instant::now();
    let before = backend.heartbeats().len();
    assert_eq!(sessions(&proxy).await.len(), 2);
    backend
        .wait_until("heartbeats of the two kept sessions", before + 4, |b| {
            b.heartbeats().len()
        })
        .await;
    let mut seen: Vec<_> = backend
        .heartbeats()
        .iter()
        .filter(|h| h.at > full)
        .map(|h| h.sid().unwrap().to_owned())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["s1", "s3"], "s2 had the oldest activity");
    assert_eq!(
        metric(
            &proxy,
            r#"idemproxy_sessions_ended_total{reason="evicted"}"#
        )
        .await,
        1.0
    );
    assert_eq!(metric(&proxy, "idemproxy_sessions").await, 2.0);
}

/// `--max-sessions 1`: a session with a request in flight is never evicted
/// (the newcomer goes untracked); once idle, it is.
#[tokio::test]
async fn session_with_a_request_in_flight_is_never_evicted() {
    let backend = Backend::start(|hit| {
        if hit.header("x-slow").is_some() {
            Reply {
                delay: Duration::from_millis(800),
                ..status(200)
            }
        } else {
            status(200)
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--max-sessions", "1"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "busy")]).await;
    let poll = tokio::spawn({
        let url = proxy.url("/v1/poll");
        async move {
            client()
                .get(url)
                .header("x-session-id", "busy")
                .header("x-slow", "1")
                .send()
                .await
                .map(|r| r.status())
        }
    });
    eventually("the poll to reach the upstream", || {
        backend.upstream.requests.len() >= 2
    })
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-session-id", "newcomer")]).await;
    let list = sessions(&proxy).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["in_flight"], 1, "the busy session was evicted");
    assert_eq!(within("the poll", poll).await.unwrap().unwrap(), 200);

    call(&proxy, "GET", "/v1/x", &[("x-session-id", "newcomer")]).await;
    assert_eq!(sessions(&proxy).await.len(), 1);
    sleep_ms(500).await;
    let latest = backend.heartbeats().last().cloned().expect("heartbeats");
    assert_eq!(latest.sid(), Some("newcomer"));
}

/// The digest that `GET /sessions` shows for the session found at `source`.
async fn digest_of(proxy: &TestProxy, source: &str) -> String {
    let list = sessions(proxy).await;
    let session = list
        .iter()
        .find(|s| s["source"] == source)
        .unwrap_or_else(|| panic!("a session from {source} in {list:?}"));
    session["digest"].as_str().expect("a digest").to_owned()
}

/// `DELETE url` with an optional `Authorization` value; status, headers and
/// the body as JSON (`Null` when it is not JSON).
async fn admin_delete(url: &str, authorization: Option<&str>) -> (u16, HeaderMap, Value) {
    let mut req = client().delete(url);
    if let Some(value) = authorization {
        req = req.header(header::AUTHORIZATION, value);
    }
    let resp = within(&format!("DELETE {url}"), req.send()).await.unwrap();
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within("response body", resp.bytes()).await.unwrap();
    (
        code,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Waits (bounded) for one more heartbeat of `sid` than `seen`: the
/// session is still heartbeated.
async fn still_heartbeated(backend: &Backend, sid: &str, seen: usize) {
    let target = format!("/v1/sessions/{sid}/heartbeat");
    backend
        .wait_until(&format!("another heartbeat of {sid}"), seen + 1, |b| {
            b.hits_to("POST", &target).len()
        })
        .await;
}

/// `DELETE /sessions/{digest}` on the loopback control listener
/// (`--admin-control-listen`) stops that one session's heartbeats and
/// leaves the others; a second DELETE is a 404.
#[tokio::test]
async fn admin_delete_stops_one_session() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-sources", "header:x-a,header:x-b"],
            &["--admin-control-listen", "127.0.0.1:0"],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-a", "doomed")]).await;
    call(&proxy, "GET", "/v1/x", &[("x-b", "kept")]).await;
    let doomed = digest_of(&proxy, "header:x-a").await;
    // The control listener serves the read-only endpoints too.
    let listed = within(
        "GET /sessions",
        client().get(proxy.control_url("/sessions")).send(),
    )
    .await
    .unwrap();
    assert_eq!(listed.status(), 200);
    assert!(listed.text().await.unwrap().contains(&doomed));

    let url = proxy.control_url(&format!("/sessions/{doomed}"));
    let (code, _, _) = admin_delete(&url, None).await;
    assert_eq!(code, 204);
    let doomed_beats = backend
        .hits_to("POST", "/v1/sessions/doomed/heartbeat")
        .len();
    assert_eq!(admin_delete(&url, None).await.0, 404);

    let list = sessions(&proxy).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["source"], "header:x-b");
    sleep_ms(700).await;
    assert_eq!(
        backend
            .hits_to("POST", "/v1/sessions/doomed/heartbeat")
            .len(),
        doomed_beats,
        "heartbeats after the admin DELETE"
    );
    assert!(backend.hits_to("POST", "/v1/sessions/kept/heartbeat").len() >= 2);
    assert_eq!(
        metric(&proxy, r#"idemproxy_sessions_ended_total{reason="admin"}"#).await,
        1.0
    );
}

/// `DELETE /sessions/{digest}` on the admin listener (reachable from the pod
/// network) without a token is refused with 403 and a JSON body that says
/// where changes are served (the control listener when there is one, else
/// how to enable it); the session stays listed and heartbeated.
#[tokio::test]
async fn admin_delete_on_the_public_listener_is_refused() {
    for with_control in [false, true] {
        let backend = Backend::start(|_| status(200)).await;
        let control: &[&str] = if with_control {
            &["--admin-control-listen", "127.0.0.1:0"]
        } else {
            &[]
        };
        let proxy = proxy(
            &backend,
            &[
                &HEARTBEAT,
                &["--heartbeat-interval", "200ms"],
                &["--session-sources", "header:x-a"],
                control,
            ],
        )
        .await;
        call(&proxy, "GET", "/v1/x", &[("x-a", "victim")]).await;
        let digest = digest_of(&proxy, "header:x-a").await;
        let url = proxy.admin_url(&format!("/sessions/{digest}"));
        // A token is no use where none is configured.
        for authorization in [None, Some("Bearer anything-0123456789abcdef")] {
            let (code, _, body) = admin_delete(&url, authorization).await;
            assert_eq!(code, 403, "with control: {with_control}, {authorization:?}");
            assert_eq!(body["error"], "forbidden", "{body}");
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("IDEMPROXY_ADMIN_CONTROL_LISTEN"),
                "{detail}"
            );
            match proxy.control_addr {
                Some(addr) => assert_eq!(body["control_listen"], addr.to_string(), "{body}"),
                None => {
                    assert_eq!(body["control_listen"], Value::Null, "{body}");
                    assert!(detail.contains("IDEMPROXY_ADMIN_TOKEN_FILE"), "{detail}");
                }
            }
        }
        // Nothing stopped: still listed, still heartbeated, not counted.
        assert_eq!(digest_of(&proxy, "header:x-a").await, digest);
        let seen = backend
            .hits_to("POST", "/v1/sessions/victim/heartbeat")
            .len();
        still_heartbeated(&backend, "victim", seen).await;
        assert_eq!(
            metric(&proxy, r#"idemproxy_sessions_ended_total{reason="admin"}"#).await,
            0.0
        );
    }
}

/// With `--admin-token-file`, `DELETE /sessions/{digest}` on the admin
/// listener needs `Authorization: Bearer <token>`: none, another scheme or a
/// wrong token get 401 with a `WWW-Authenticate: Bearer` challenge and stop
/// nothing; the file's token (trimmed) gets 204 and stops the session.
#[tokio::test]
async fn admin_token_allows_delete_on_the_public_listener() {
    const TOKEN: &str = "tok-5f0c2a9e41d7b8366e1f0a2c";
    let dir = testkit::TempDir::new();
    let file = dir.write("admin-token", format!("  {TOKEN}\n"));
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-sources", "header:x-a"],
            &["--admin-token-file", file.to_str().unwrap()],
        ],
    )
    .await;
    call(&proxy, "GET", "/v1/x", &[("x-a", "victim")]).await;
    let digest = digest_of(&proxy, "header:x-a").await;
    let url = proxy.admin_url(&format!("/sessions/{digest}"));
    let wrong_token = format!("Bearer {TOKEN}x");
    let basic = format!("Basic {TOKEN}");
    for (authorization, invalid) in [
        (None, false),
        (Some(basic.as_str()), false),
        (Some("Bearer "), false),
        (Some(wrong_token.as_str()), true),
        (Some("Bearer tok-5f0c2a9e41d7b8366e1f0a2"), true),
    ] {
        let (code, headers, body) = admin_delete(&url, authorization).await;
        assert_eq!(code, 401, "{authorization:?}: {body}");
        assert_eq!(body["error"], "unauthorized", "{body}");
        assert_eq!(body["token_accepted"], true, "{body}");
        let challenge = headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer "),
            "{authorization:?}: {challenge:?}"
        );
        assert_eq!(challenge.contains("invalid_token"), invalid, "{challenge}");
        assert!(
            !body.to_string().contains(TOKEN),
            "the answer shows the token: {body}"
        );
    }
    assert_eq!(
        digest_of(&proxy, "header:x-a").await,
        digest,
        "stopped by a refused DELETE"
    );
    let seen = backend
        .hits_to("POST", "/v1/sessions/victim/heartbeat")
        .len();
    still_heartbeated(&backend, "victim", seen).await;

    let (code, _, _) = admin_delete(&url, Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(code, 204);
    let stopped_at = backend
        .hits_to("POST", "/v1/sessions/victim/heartbeat")
        .len();
    assert!(sessions(&proxy).await.is_empty());
    sleep_ms(600).await;
    assert_eq!(
        backend
            .hits_to("POST", "/v1/sessions/victim/heartbeat")
            .len(),
        stopped_at,
        "heartbeats after the authorised DELETE"
    );
    assert_eq!(
        metric(&proxy, r#"idemproxy_sessions_ended_total{reason="admin"}"#).await,
        1.0
    );
}

/// Collects everything a `fmt` subscriber writes.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Neither `/sessions` nor the logs (every level) ever show a session id or
/// a copied credential, through a registration, retried, failed, ok and
/// gone heartbeats; sessions appear as digests.
///
/// A current-thread runtime: the proxy's tasks all run on this test's
/// thread, so `set_default` captures their events without a global
/// subscriber that other tests of this binary would write to.
#[tokio::test(flavor = "current_thread")]
async fn credentials_never_appear_in_sessions_or_logs() {
    // With exactly one `Dispatch` in the process, tracing-core 0.1.36 computes
    // a callsite's interest from the thread that first reaches it: a sibling
    // test's thread (no subscriber) then caches `never` and this thread's
    // subscriber misses the event (tokio-rs/tracing#3611). A second live
    // dispatch makes it consult every registered dispatch instead.
    let _second_dispatch = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    const ID: &str = "sid-SECRET-0xC0FFEE";
    const TOKEN: &str = "Bearer tok-SECRET-DEADBEEF";
    let beats = Arc::new(AtomicUsize::new(0));
    let counter = beats.clone();
    let backend = Backend::start(move |hit| {
        if !hit.is_heartbeat() {
            return status(200);
        }
        // A retry, a failure, a success, then gone: every heartbeat log line.
        match counter.fetch_add(1, Ordering::SeqCst) {
            0 => status(503),
            1 => json_reply(400, json!({"error": format!("bad {ID}")})),
            2 => status(200),
            _ => json_reply(404, json!({"error": format!("no session {ID}")})),
        }
    })
    .await;
    let proxy = proxy(
        &backend,
        &[
            &[
                "--heartbeat",
                "POST /v1/sessions/{session}/heartbeat?s={session}",
            ],
            &["--heartbeat-body", r#"{"ID":"{session}"}"#],
            &["--heartbeat-set-headers", "x-renew: {session}"],
            &["--heartbeat-interval", "150ms"],
            &["--session-sources", "header:x-session-id"],
            &["--log", "trace"],
        ],
    )
    .await;
    let headers = [("x-session-id", ID), ("authorization", TOKEN)];
    assert_eq!(call(&proxy, "GET", "/v1/x", &headers).await.0, 200);

    let text = admin_text(&proxy, "/sessions").await;
    let list: Value = serde_json::from_str(&text).unwrap();
    let digest = list["sessions"][0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(digest.len(), 16);
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
    for secret in [ID, TOKEN, "SECRET", "tok-"] {
        assert!(!text.contains(secret), "/sessions shows {secret:?}: {text}");
    }

    assert_eq!(wait_sessions(&proxy, 0).await.len(), 0);
    assert!(beats.load(Ordering::SeqCst) >= 4);
    let hb = &backend.heartbeats()[0];
    assert_eq!(
        hb.header("authorization"),
        Some(TOKEN),
        "credentials copied"
    );

    let logs = logs.text();
    assert!(logs.contains("heartbeat failed"), "{logs}");
    assert!(logs.contains("no longer tracked"), "{logs}");
    assert!(
        logs.contains(&digest),
        "logs name the session by its digest"
    );
    for secret in ["SECRET", "C0FFEE", "DEADBEEF"] {
        assert!(!logs.contains(secret), "the logs show {secret:?}:\n{logs}");
    }
}

/// `/metrics` exports `idemproxy_sessions`, `idemproxy_heartbeats_total{outcome}`
/// and `idemproxy_sessions_ended_total{reason}`, with every label present
/// from the start.
#[tokio::test]
async fn session_metrics_are_exported() {
    let backend = Backend::start(|_| status(200)).await;
    let proxy = proxy(
        &backend,
        &[
            &HEARTBEAT,
            &["--heartbeat-interval", "200ms"],
            &["--session-sources", "header:x-session-id"],
        ],
    )
    .await;
    let metrics = proxy.metrics().await;
    for outcome in ["ok", "gone", "failed", "retried"] {
        let name = format!(r#"idemproxy_heartbeats_total{{outcome="{outcome}"}}"#);
        assert_eq!(metric_value(&metrics, &name), Some(0.0), "{name}");
    }
    for reason in ["idle", "client_end", "gone", "failures", "evicted", "admin"] {
        let name = format!(r#"idemproxy_sessions_ended_total{{reason="{reason}"}}"#);
        assert_eq!(metric_value(&metrics, &name), Some(0.0), "{name}");
    }
    assert_eq!(metric_value(&metrics, "idemproxy_sessions"), Some(0.0));

    call(&proxy, "GET", "/v1/x", &[("x-session-id", "m1")]).await;
    backend
        .wait_until("2 heartbeats", 2, |b| b.heartbeats().len())
        .await;
    within("ok heartbeats counted", async {
        while metric(&proxy, r#"idemproxy_heartbeats_total{outcome="ok"}"#).await < 2.0 {
            sleep_ms(20).await;
        }
    })
    .await;
    assert_eq!(metric(&proxy, "idemproxy_sessions").await, 1.0);
}

// ---------------------------------------------------------------------------
// End to end with the example session backend
// ---------------------------------------------------------------------------

/// Sessions of the example backend expire 2 s after creation or the last
/// heartbeat. Through 5 s of client silence, a session created through a
/// proxy with `--heartbeat` stays valid; one created through a proxy without
/// heartbeats has expired (404 "invalid session").
#[tokio::test]
async fn example_backend_session_survives_silence_only_with_heartbeats() {
    let opts = session_backend::Options {
        session_ttl: Duration::from_secs(2),
        ..session_backend::Options::default()
    };
    let backend = session_backend::Backend::new(&opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(backend.clone().serve(listener, async move {
        let _ = stopped.await;
    }));

    let routes = "POST /v1/sessions session=response-json:id\n\
                  * /v1/sessions/{sid}/{*rest} session=path:sid";
    let kept = TestProxy::start(
        &url,
        &[
            "--routes",
            routes,
            "--heartbeat",
            "POST /v1/sessions/{session}/heartbeat",
            "--heartbeat-interval",
            "500ms",
        ],
    )
    .await;
    let bare = TestProxy::start(&url, &["--routes", routes]).await;

    let create = |proxy: &TestProxy| {
        let url = proxy.url("/v1/sessions");
        async move {
            let resp = client().post(url).send().await.unwrap();
            assert_eq!(resp.status(), 201);
            let doc: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
            doc["id"].as_str().unwrap().to_owned()
        }
    };
    let with_hb = create(&kept).await;
    let without_hb = create(&bare).await;

    // Client silence: 2.5 TTLs.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let (code, _) = call(&kept, "GET", &format!("/v1/sessions/{with_hb}"), &[]).await;
    assert_eq!(code, 200, "the heartbeated session expired");
    let (code, body) = call(&bare, "GET", &format!("/v1/sessions/{without_hb}"), &[]).await;
    assert_eq!(code, 404, "a session without heartbeats outlived its TTL");
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["error"], "invalid session");

    let beats = backend.stats().heartbeats;
    assert!(
        (6..=12).contains(&beats),
        "{beats} heartbeats in 5 s at 500 ms"
    );
    assert!(metric(&kept, r#"idemproxy_heartbeats_total{outcome="ok"}"#).await >= 6.0);
    assert_eq!(
        metric(&bare, r#"idemproxy_heartbeats_total{outcome="ok"}"#).await,
        0.0
    );
    let _ = stop.send(());
    let _ = within("the backend to stop", server).await;
}
