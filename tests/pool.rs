//! Integration tests of the upstream connection pool: keep-alive reuse, an
//! upstream that closes idle connections, the idle timeout, the idle bound,
//! and `connection: close`. Each test counts the upstream's TCP accepts (and,
//! with a raw upstream, the connections the proxy closed).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use testkit::*;
use tokio::net::TcpStream;
use tokio::sync::Barrier;

/// The `x-idemproxy-attempts` header of a response, if any (set only when
/// the retry layer sent more than one attempt).
fn retried(resp: &reqwest::Response) -> Option<&str> {
    resp.headers()
        .get("x-idemproxy-attempts")
        .and_then(|v| v.to_str().ok())
        .filter(|n| *n != "1")
}

/// A raw HTTP/1.1 upstream that answers every request on a connection with
/// `200 ok` and keeps it open; `closed` counts connections the proxy closed.
/// The first `wait_for` requests are answered only when all of them arrived.
struct KeepAlive {
    raw: RawUpstream,
    closed: Arc<AtomicUsize>,
}

impl KeepAlive {
    async fn start(wait_for: usize) -> KeepAlive {
        let closed = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(wait_for.max(1)));
        let counter = closed.clone();
        let raw = raw_upstream(move |mut s: TcpStream| {
            let (closed, requests, barrier) = (counter.clone(), requests.clone(), barrier.clone());
            async move {
                while read_head(&mut s).await.is_some() {
                    if requests.fetch_add(1, Ordering::SeqCst) < wait_for {
                        barrier.wait().await;
                    }
                    write_all(&mut s, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                }
                closed.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await;
        KeepAlive { raw, closed }
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Sends `GET path` through `proxy` and expects `200 ok`.
async fn get_ok(proxy: &TestProxy, path: &str) {
    let resp = within(
        "GET through the proxy",
        client().get(proxy.url(path)).send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

/// Sequential requests (GET, POST with a body, HEAD, an empty 204) to a
/// keep-alive upstream all travel over one upstream TCP connection.
#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = Upstream::start(|req| async move {
        match req.uri().path() {
            "/empty" => response(204, ""),
            _ => response(200, "ok"),
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let client = client();
    for n in 0..3 {
        let resp = client.get(proxy.url("/a")).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "ok");
        let resp = client
            .post(proxy.url("/b"))
            .body(format!("body {n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), "ok");
        let resp = client.head(proxy.url("/c")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let resp = client.get(proxy.url("/empty")).send().await.unwrap();
        assert_eq!(resp.status(), 204);
    }
    assert_eq!(upstream.requests.len(), 12);
    assert_eq!(
        upstream.connections(),
        1,
        "the proxy opened a new connection"
    );
}

/// An upstream that closes each keep-alive connection right after answering
/// on it (as one whose idle timeout is shorter than the proxy's does): ten
/// POSTs in a row all get 200, none needs a retry, and each goes over a new
/// connection.
#[tokio::test]
async fn upstream_closing_idle_connections_does_not_fail_the_next_request() {
    let upstream = raw_upstream(|mut s: TcpStream| async move {
        if read_head(&mut s).await.is_some() {
            write_all(&mut s, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &["--max-attempts", "1"]).await;
    let client = client();
    for n in 0..10 {
        let resp = within(
            "POST through the proxy",
            client.post(proxy.url("/w")).send(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 200, "request {n}: {:?}", resp.text().await);
        assert_eq!(retried(&resp), None);
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
    assert_eq!(upstream.connections(), 10);
}

/// With `--upstream-idle-timeout 200ms`, an idle upstream connection is
/// closed by the proxy without any traffic, and the next request opens a
/// new one.
#[tokio::test]
async fn idle_connection_past_the_idle_timeout_is_closed_and_not_reused() {
    let upstream = KeepAlive::start(0).await;
    let proxy = TestProxy::start(&upstream.raw.url(), &["--upstream-idle-timeout", "200ms"]).await;
    get_ok(&proxy, "/one").await;
    assert_eq!(upstream.closed(), 0, "closed before the idle timeout");
    eventually("the proxy to close the idle connection", || {
        upstream.closed() == 1
    })
    .await;
    get_ok(&proxy, "/two").await;
    assert_eq!(upstream.raw.connections(), 2);
}

/// Within the idle timeout, a connection idle for a while is reused.
#[tokio::test]
async fn idle_connection_within_the_idle_timeout_is_reused() {
    let upstream = KeepAlive::start(0).await;
    let proxy = TestProxy::start(&upstream.raw.url(), &["--upstream-idle-timeout", "5s"]).await;
    get_ok(&proxy, "/one").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    get_ok(&proxy, "/two").await;
    assert_eq!(upstream.raw.connections(), 1);
    assert_eq!(upstream.closed(), 0);
}

/// With `--upstream-max-idle 1`, three requests in flight at once use three
/// connections; afterwards the proxy keeps one idle and closes the other
/// two, and the next request reuses the one it kept.
#[tokio::test]
async fn idle_connections_beyond_max_idle_are_closed() {
    let upstream = KeepAlive::start(3).await;
    let proxy = TestProxy::start(&upstream.raw.url(), &["--upstream-max-idle", "1"]).await;
    let (a, b, c) = tokio::join!(
        get_ok(&proxy, "/a"),
        get_ok(&proxy, "/b"),
        get_ok(&proxy, "/c")
    );
    let _ = (a, b, c);
    assert_eq!(upstream.raw.connections(), 3);
    eventually("two connections closed", || upstream.closed() == 2).await;
    get_ok(&proxy, "/d").await;
    assert_eq!(
        upstream.raw.connections(),
        3,
        "the kept connection was not reused"
    );
    assert_eq!(upstream.closed(), 2);
}

/// With `--upstream-max-idle 0`, no connection is kept: each request opens
/// its own, and the proxy closes it after the response.
#[tokio::test]
async fn max_idle_zero_keeps_no_connection() {
    let upstream = KeepAlive::start(0).await;
    let proxy = TestProxy::start(&upstream.raw.url(), &["--upstream-max-idle", "0"]).await;
    get_ok(&proxy, "/a").await;
    get_ok(&proxy, "/b").await;
    assert_eq!(upstream.raw.connections(), 2);
    eventually("both connections closed", || upstream.closed() == 2).await;
}

/// A response that says `connection: close` ends its connection: the next
/// request opens a new one and succeeds.
#[tokio::test]
async fn connection_close_response_is_not_reused() {
    let upstream = Upstream::start(|_req| async move {
        let mut resp = response(200, "ok");
        resp.headers_mut()
            .insert("connection", http::HeaderValue::from_static("close"));
        resp
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &["--max-attempts", "1"]).await;
    get_ok(&proxy, "/a").await;
    get_ok(&proxy, "/b").await;
    assert_eq!(upstream.connections(), 2);
}

/// A response body the client abandons half-way does not leave a broken
/// connection in the pool: the next request gets a whole answer.
#[tokio::test]
async fn abandoned_response_body_does_not_poison_the_pool() {
    let upstream = Upstream::start(|req| async move {
        match req.uri().path() {
            "/big" => response(200, vec![b'x'; 4 << 20]),
            _ => response(200, "ok"),
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &["--max-attempts", "1"]).await;
    let mut resp = client().get(proxy.url("/big")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap();
    assert!(first.is_some_and(|c| !c.is_empty()));
    drop(resp);
    for _ in 0..3 {
        get_ok(&proxy, "/small").await;
    }
}
