//! Integration tests of the proxy core: what passes through unchanged, what
//! streams, which headers are rewritten, the limits, the error answers and
//! the admin endpoints. Each test starts its own upstream and proxy on
//! `127.0.0.1:0`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{Method, Version};
use http_body_util::BodyExt;
use testkit::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};

/// An upstream answering `200 ok` to everything.
async fn ok_upstream() -> Upstream {
    Upstream::start(|_req| async { response(200, "ok") }).await
}

/// A client-side request body fed by the returned sender, one chunk per send.
fn client_channel_body() -> (mpsc::Sender<Bytes>, reqwest::Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    (tx, reqwest::Body::wrap_stream(stream))
}

// ---------------------------------------------------------------------------
// What passes through unchanged
// ---------------------------------------------------------------------------

/// Standard and custom methods reach the upstream as sent and its answer comes back.
#[tokio::test]
async fn methods_are_forwarded_unchanged() {
    let upstream =
        Upstream::start(|req| async move { response(200, format!("saw {}", req.method())) }).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    for m in [
        "GET",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "OPTIONS",
        "FROBNICATE",
    ] {
        let method = Method::from_bytes(m.as_bytes()).unwrap();
        let resp = client()
            .request(method, proxy.url("/things/1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{m}");
        assert_eq!(upstream.requests.last().method.as_str(), m);
        assert_eq!(upstream.requests.last().uri, "/things/1");
        assert_eq!(resp.text().await.unwrap(), format!("saw {m}"));
    }
}

/// The path and query string reach the upstream byte for byte, encodings included.
#[tokio::test]
async fn query_string_is_forwarded_unchanged() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let target = "/search/a%2Fb?q=caf%C3%A9%20au+lait&x=1&x=2&empty=&flag&enc=%2F%3F%26";
    let resp = client().get(proxy.url(target)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.requests.last().uri.to_string(), target);
}

/// Two `x-multi` request headers reach the upstream in order, and two
/// `set-cookie` response headers reach the client.
#[tokio::test]
async fn repeated_headers_pass_both_ways() {
    let upstream = Upstream::start(|_req| async {
        let mut resp = response(200, "ok");
        let h = resp.headers_mut();
        h.append("set-cookie", "a=1; Path=/".parse().unwrap());
        h.append("set-cookie", "b=2; HttpOnly".parse().unwrap());
        resp
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = client()
        .get(proxy.url("/"))
        .header("x-multi", "one")
        .header("x-multi", "two")
        .send()
        .await
        .unwrap();
    assert_eq!(
        upstream.requests.last().header_all("x-multi"),
        ["one", "two"]
    );
    let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; HttpOnly"]);
}

/// A body holding all 256 byte values arrives intact upstream, and the
/// upstream's binary answer arrives intact at the client.
#[tokio::test]
async fn binary_bodies_pass_both_ways() {
    let all: Vec<u8> = (0..=255u8).collect();
    let upstream = Upstream::buffered(|req| async move {
        let mut reversed = req.body().to_vec();
        reversed.reverse();
        response(200, reversed)
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = client()
        .post(proxy.url("/bin"))
        .header("content-type", "application/octet-stream")
        .body(all.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(upstream.requests.last().body.unwrap(), all);
    let mut expected = all.clone();
    expected.reverse();
    assert_eq!(resp.bytes().await.unwrap(), expected);
}

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

/// A chunked request body reaches the upstream chunk by chunk: the upstream
/// reads the first chunk before the client has sent the second.
#[tokio::test]
async fn chunked_request_body_is_streamed() {
    let (seen_tx, mut seen_rx) = mpsc::channel::<Bytes>(4);
    let upstream = Upstream::start(move |req| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut all = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    all.extend_from_slice(&data);
                    let _ = seen_tx.send(data).await;
                }
            }
            response(200, all)
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let (chunks, body) = client_channel_body();
    let request = tokio::spawn(client().post(proxy.url("/upload")).body(body).send());

    chunks.send(Bytes::from_static(b"first;")).await.unwrap();
    let got = within("the first chunk upstream", seen_rx.recv()).await;
    assert_eq!(got.unwrap(), "first;");
    chunks.send(Bytes::from_static(b"second")).await.unwrap();
    drop(chunks);

    let resp = within("the response", request).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "first;second");
    let seen = upstream.requests.last();
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.header("content-length"), None);
}

/// A chunked response reaches the client chunk by chunk: the client reads
/// the first chunk before the upstream has produced the second.
#[tokio::test]
async fn chunked_response_body_is_streamed() {
    let (chunks, body) = channel_body();
    let body = Once::new(body);
    let upstream = Upstream::start(move |_req| {
        let body = body.take();
        async move { http::Response::new(body) }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let mut resp = client().get(proxy.url("/download")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");

    chunks.send(Bytes::from_static(b"one;")).await.unwrap();
    let first = within("the first chunk at the client", resp.chunk()).await;
    assert_eq!(first.unwrap().unwrap(), "one;");
    chunks.send(Bytes::from_static(b"two")).await.unwrap();
    let second = within("the second chunk at the client", resp.chunk()).await;
    assert_eq!(second.unwrap().unwrap(), "two");
    drop(chunks);
    let end = within("the end of the body", resp.chunk()).await;
    assert_eq!(end.unwrap(), None);
}

/// Server-sent events arrive one at a time while the stream is open: the
/// upstream sends event N+1 only after the client has read event N.
#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let (next_tx, next_rx) = mpsc::channel::<()>(1);
    let next_rx = Once::new(next_rx);
    let upstream = Upstream::start(move |_req| {
        let mut next = next_rx.take();
        let (events, body) = channel_body();
        tokio::spawn(async move {
            for n in 1..=3 {
                let event = format!("id: {n}\nevent: tick\ndata: {{\"n\":{n}}}\n\n");
                if events.send(event.into()).await.is_err() || next.recv().await.is_none() {
                    return;
                }
            }
        });
        async move {
            let mut resp = http::Response::new(body);
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            resp.headers_mut()
                .insert("cache-control", "no-cache".parse().unwrap());
            resp
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let mut resp = client()
        .get(proxy.url("/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");

    let mut received = String::new();
    for n in 1..=3 {
        // Read until event n is complete; the upstream has not sent n+1 yet.
        while !received.contains(&format!("data: {{\"n\":{n}}}\n\n")) {
            let chunk = within(&format!("event {n}"), resp.chunk()).await;
            let chunk = chunk.unwrap().expect("stream ended early");
            received.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert!(
            !received.contains(&format!("id: {}", n + 1)),
            "event {} arrived before the client read event {n}",
            n + 1
        );
        next_tx.send(()).await.unwrap();
    }
    let end = within("the end of the stream", resp.chunk()).await;
    assert_eq!(end.unwrap(), None);
}

/// Size of the large bodies: 100 MiB.
const LARGE: u64 = 100 * 1024 * 1024;
/// Allowed growth of this process's resident memory while 100 MiB go
/// through: well under the body size, so neither the proxy nor the test
/// helpers can have buffered it.
const MAX_RSS_GROWTH: u64 = 48 * 1024 * 1024;

/// A 100 MiB upload, generated on the fly, streams through the proxy with
/// bounded memory and arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_upload_streams_with_bounded_memory() {
    let _serial = memory_lock().await;
    let upstream = Upstream::start(|req| async move {
        let mut body = req.into_body();
        let (mut received, mut intact) = (0u64, true);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                intact &= is_generated(received, &data);
                received += data.len() as u64;
            }
        }
        response(200, format!("{received} {intact}"))
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let before = rss_bytes();
    let peak = PeakRss::start();
    let chunks = generated_chunks(LARGE).map(Ok::<_, std::io::Error>);
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = within(
        "a 100 MiB upload",
        client().post(proxy.url("/big")).body(body).send(),
    )
    .await
    .unwrap();
    let answer = resp.text().await.unwrap();
    let peak = peak.finish();
    assert_eq!(answer, format!("{LARGE} true"));
    // The whole exchange (client, proxy and upstream live in this process)
    // must not grow the resident set by anything near the body size.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < MAX_RSS_GROWTH,
        "RSS grew by {} MiB while uploading 100 MiB",
        growth / (1024 * 1024)
    );
}

/// A 100 MiB download, generated on the fly by the upstream, streams through
/// the proxy with bounded memory and arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_download_streams_with_bounded_memory() {
    let _serial = memory_lock().await;
    let upstream =
        Upstream::start(|_req| async { http::Response::new(generated_body(LARGE)) }).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let before = rss_bytes();
    let peak = PeakRss::start();
    let mut resp = client().get(proxy.url("/big")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (mut received, mut intact) = (0u64, true);
    within("a 100 MiB download", async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            intact &= is_generated(received, &chunk);
            received += chunk.len() as u64;
        }
    })
    .await;
    let peak = peak.finish();
    assert_eq!(received, LARGE);
    assert!(
        intact,
        "the downloaded bytes differ from what the upstream sent"
    );
    // Client, proxy and upstream share this process: growth near 100 MiB
    // would mean someone buffered the body.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < MAX_RSS_GROWTH,
        "RSS grew by {} MiB while downloading 100 MiB",
        growth / (1024 * 1024)
    );
}

// ---------------------------------------------------------------------------
// Protocols
// ---------------------------------------------------------------------------

/// An h2c client (HTTP/2 with prior knowledge) is answered in HTTP/2, while
/// the plain-HTTP upstream is spoken to in HTTP/1.1.
#[tokio::test]
async fn h2c_client_is_served() {
    let upstream = Upstream::buffered(|req| async move {
        response(200, format!("got {}", String::from_utf8_lossy(req.body())))
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = h2c_client()
        .post(proxy.url("/h2?x=1"))
        .header("x-multi", "one")
        .header("x-multi", "two")
        .body("hello over h2c")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "got hello over h2c");
    let seen = upstream.requests.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.uri, "/h2?x=1");
    assert_eq!(seen.header_all("x-multi"), ["one", "two"]);
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
}

/// `Connection: Upgrade` + `Upgrade: echo` is tunnelled: the upstream's 101
/// reaches the client and bytes then flow both ways.
#[tokio::test]
async fn upgrade_is_tunnelled_both_ways() {
    let (head_tx, mut head_rx) = mpsc::unbounded_channel::<String>();
    let upstream = raw_upstream(move |mut s| {
        let head_tx = head_tx.clone();
        async move {
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            let _ = head_tx.send(head);
            write_all(
                &mut s,
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    write_all(
        &mut client,
        b"GET /echo HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await;
    let resp = within("the 101", read_response(&mut client)).await.unwrap();
    assert_eq!(resp.status, 101, "{}", resp.head);
    assert_eq!(resp.header("upgrade"), Some("echo"));
    let head = head_rx.recv().await.unwrap();
    assert_eq!(head_header(&head, "upgrade"), Some("echo"));
    assert!(
        head_header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );

    for message in [&b"ping"[..], b"hello through the tunnel"] {
        write_all(&mut client, message).await;
        let mut echoed = vec![0u8; message.len()];
        within("the echo", client.read_exact(&mut echoed))
            .await
            .unwrap();
        assert_eq!(echoed, message);
    }
}

/// `Expect: 100-continue`: the client gets `100 Continue` before sending its
/// body, then the upstream's answer to that body.
#[tokio::test]
async fn expect_100_continue_is_honoured() {
    let upstream = Upstream::buffered(|req| async move { response(201, req.body().clone()) }).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    write_all(
        &mut client,
        b"PUT /doc HTTP/1.1\r\nHost: proxy\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let interim = within("100 Continue", read_response(&mut client))
        .await
        .unwrap();
    assert_eq!(interim.status, 100, "{}", interim.head);
    write_all(&mut client, b"hello world").await;
    let resp = within("the final response", read_response(&mut client))
        .await
        .unwrap();
    assert_eq!(resp.status, 201, "{}", resp.head);
    assert_eq!(resp.body, b"hello world");
    assert_eq!(upstream.requests.last().body.unwrap(), "hello world");
}

/// `CONNECT` is refused with 405: idemproxy opens no raw tunnels.
#[tokio::test]
async fn connect_method_is_refused() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = raw_exchange(
        proxy.addr,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 405, "{}", resp.head);
    assert!(resp.json()["error"].is_string());
    assert!(upstream.requests.is_empty());
}

/// A request whose `Transfer-Encoding` holds any coding besides one final
/// `chunked` (`gzip, chunked`, `chunked, gzip`, `x-custom`, ...) gets 501
/// JSON (RFC 9112 §6.1), one whose last coding is not `chunked` gets 400,
/// and nothing reaches the upstream; a plain `chunked` body still passes.
#[tokio::test]
async fn unknown_transfer_coding_gets_501_and_is_not_forwarded() {
    let upstream = Upstream::buffered(|_req| async { response(200, "ok") }).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    for coding in [
        "gzip, chunked",
        "GZIP,chunked",
        "deflate, chunked",
        "x-custom, chunked",
        "identity, chunked",
    ] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: {coding}\r\n\r\n{body}"
        );
        let resp = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(resp.status, 501, "{coding}: {}", resp.head);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(
            resp.json()["error"],
            "unsupported_transfer_coding",
            "{coding}"
        );
        assert!(resp.json()["detail"].is_string());
    }
    // The same coding split over two header lines.
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
    );
    let resp = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!(resp.status, 501, "{}", resp.head);
    // A body whose last coding is not chunked has no knowable end, and
    // chunked twice is a framing error: 400 (hyper answers the first itself,
    // RFC 9112 §6.3).
    for coding in ["chunked, gzip", "gzip", "chunked, chunked"] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: {coding}\r\n\r\n{body}"
        );
        let resp = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(resp.status, 400, "{coding}: {}", resp.head);
    }
    assert!(
        upstream.requests.is_empty(),
        "a request with an unknown transfer coding was forwarded: {:?}",
        upstream.requests.lines()
    );
    let request =
        format!("POST /upload HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: Chunked\r\n\r\n{body}");
    let resp = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(upstream.requests.last().body.unwrap(), "hello");
}

/// An HTTP/1.1 request without `Host`, with two `Host` lines, or with a
/// `Host` that is no `host[:port]`, gets 400 JSON (RFC 9112 §3.2) and
/// nothing reaches the upstream; HTTP/1.0 without `Host` and HTTP/1.1 with an
/// empty `Host` are valid and pass.
#[tokio::test]
async fn missing_or_duplicate_host_gets_400_and_is_not_forwarded() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    for request in [
        &b"GET /a HTTP/1.1\r\n\r\n"[..],
        b"GET /b HTTP/1.1\r\nHost: proxy\r\nHost: proxy\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: proxy\r\nHost: other.example\r\n\r\n",
        b"GET /d HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /e HTTP/1.1\r\nHost: bad host\r\n\r\n",
        b"GET /f HTTP/1.1\r\nHost: user@proxy\r\n\r\n",
    ] {
        let resp = raw_exchange(proxy.addr, request).await;
        let text = String::from_utf8_lossy(request);
        assert_eq!(resp.status, 400, "{text:?}: {}", resp.head);
        assert_eq!(
            resp.header("content-type"),
            Some("application/json"),
            "{text:?}"
        );
        assert_eq!(resp.json()["error"], "bad_host", "{text:?}");
    }
    assert!(
        upstream.requests.is_empty(),
        "a request with a missing or duplicate Host was forwarded: {:?}",
        upstream.requests.lines()
    );
    for request in [
        &b"GET /ok10 HTTP/1.0\r\n\r\n"[..],
        b"GET /ok11 HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET /ok11 HTTP/1.1\r\nHost: [::1]:7480\r\n\r\n",
    ] {
        let resp = raw_exchange(proxy.addr, request).await;
        assert_eq!(
            resp.status,
            200,
            "{:?}: {}",
            String::from_utf8_lossy(request),
            resp.head
        );
    }
    assert_eq!(upstream.requests.len(), 3);
}

// ---------------------------------------------------------------------------
// Header rewriting
// ---------------------------------------------------------------------------

/// Hop-by-hop request headers (`Connection` and what it names, `Keep-Alive`,
/// `TE`, `Trailer`, `Proxy-Authorization`, `Upgrade` without an upgrade) do
/// not reach the upstream; end-to-end headers do.
#[tokio::test]
async fn hop_by_hop_request_headers_are_stripped() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = raw_exchange(
        proxy.addr,
        b"GET /hop HTTP/1.1\r\n\
          Host: proxy\r\n\
          Connection: x-foo, keep-alive\r\n\
          X-Foo: connection-scoped\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Trailer: x-checksum\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
          Upgrade: websocket\r\n\
          X-End-To-End: kept\r\n\
          \r\n",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let seen = upstream.requests.last();
    for name in [
        "connection",
        "x-foo",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the upstream");
    }
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
}

/// Hop-by-hop response headers (`Connection` and what it names,
/// `Keep-Alive`, `Trailer`, `Proxy-Authenticate`, `Upgrade` on a non-101) do
/// not reach the client; end-to-end headers do.
#[tokio::test]
async fn hop_by_hop_response_headers_are_stripped() {
    let upstream = raw_upstream(|mut s| async move {
        while read_head(&mut s).await.is_some() {
            write_all(
                &mut s,
                b"HTTP/1.1 200 OK\r\n\
                  Content-Length: 2\r\n\
                  Connection: x-bar, keep-alive\r\n\
                  X-Bar: connection-scoped\r\n\
                  Keep-Alive: timeout=5\r\n\
                  Trailer: x-checksum\r\n\
                  Proxy-Authenticate: Basic realm=\"up\"\r\n\
                  Upgrade: h2c\r\n\
                  X-End-To-End: kept\r\n\
                  \r\n\
                  ok",
            )
            .await;
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n").await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body, b"ok");
    for name in [
        "x-bar",
        "keep-alive",
        "trailer",
        "proxy-authenticate",
        "upgrade",
    ] {
        assert_eq!(resp.header(name), None, "{name} reached the client");
    }
    assert!(
        !resp
            .header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("x-bar")),
        "{}",
        resp.head
    );
    assert_eq!(resp.header("x-end-to-end"), Some("kept"));
}

/// By default the upstream sees `Host` set to its own authority, not the client's.
#[tokio::test]
async fn host_is_rewritten_to_the_upstream_authority() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    let seen = upstream.requests.last();
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
}

/// With `--preserve-host on` the upstream sees the client's `Host`.
#[tokio::test]
async fn host_is_preserved_with_preserve_host() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &["--preserve-host", "on"]).await;
    raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    assert_eq!(
        upstream.requests.last().header("host"),
        Some("api.example.test")
    );
}

/// The upstream sees `X-Forwarded-For` (the client's address),
/// `X-Forwarded-Proto: http` and `X-Forwarded-Host` (the client's Host).
#[tokio::test]
async fn forwarded_headers_are_added() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    let seen = upstream.requests.last();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("api.example.test"));
}

/// With `--forwarded-headers off` no `X-Forwarded-*` header is added.
#[tokio::test]
async fn forwarded_headers_can_be_turned_off() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &["--forwarded-headers", "off"]).await;
    raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    let seen = upstream.requests.last();
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert_eq!(seen.header(name), None, "{name} was added");
    }
}

/// An existing `X-Forwarded-For` chain, in one header line or several, is
/// kept whole and the client's address is appended to it.
#[tokio::test]
async fn forwarded_for_is_appended_to_an_existing_chain() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
    )
    .await;
    assert_eq!(
        upstream.requests.last().header_all("x-forwarded-for"),
        ["10.0.0.1, 127.0.0.1"]
    );
    raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2, 10.0.0.3\r\n\r\n",
    )
    .await;
    assert_eq!(
        upstream.requests.last().header_all("x-forwarded-for"),
        ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
    );
}

/// A request without `x-request-id` gets a fresh UUID, which the upstream
/// sees and the client gets back.
#[tokio::test]
async fn request_id_is_added_when_absent() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let first = client().get(proxy.url("/")).send().await.unwrap();
    let first_id = upstream
        .requests
        .last()
        .header("x-request-id")
        .unwrap()
        .to_owned();
    assert_eq!(first_id.len(), 36, "not a UUID: {first_id}");
    assert_eq!(first.headers()["x-request-id"], first_id.as_str());
    client().get(proxy.url("/")).send().await.unwrap();
    let second_id = upstream
        .requests
        .last()
        .header("x-request-id")
        .unwrap()
        .to_owned();
    assert_ne!(first_id, second_id, "request ids must be unique");
}

/// A client's own `x-request-id` reaches the upstream and comes back unchanged.
#[tokio::test]
async fn request_id_is_kept_when_present() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = client()
        .get(proxy.url("/"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(
        upstream.requests.last().header_all("x-request-id"),
        ["client-chosen-42"]
    );
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-42");
}

// ---------------------------------------------------------------------------
// Absolute-form (clients using HTTP_PROXY)
// ---------------------------------------------------------------------------

/// An absolute-form request for another host (or another port of the
/// upstream's host) is refused with 403 JSON and never forwarded.
#[tokio::test]
async fn absolute_form_for_a_foreign_host_is_refused() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let other_port = format!(
        "GET http://127.0.0.1:{}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        upstream.addr.port().wrapping_add(1).max(1)
    );
    for request in [
        &b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"[..],
        b"GET http://evil.example/steal?x=1 HTTP/1.1\r\nHost: proxy\r\n\r\n",
        other_port.as_bytes(),
    ] {
        let resp = raw_exchange(proxy.addr, request).await;
        assert_eq!(resp.status, 403, "{}", String::from_utf8_lossy(request));
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let json = resp.json();
        assert_eq!(json["error"], "foreign_target");
        assert!(json["detail"].is_string());
    }
    assert!(
        upstream.requests.is_empty(),
        "a foreign request was forwarded"
    );
}

/// An absolute-form request for the upstream's own authority is forwarded
/// in origin-form.
#[tokio::test]
async fn absolute_form_for_the_upstream_is_forwarded() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let request = format!(
        "GET http://{0}/abs/path?x=1 HTTP/1.1\r\nHost: {0}\r\n\r\n",
        upstream.addr
    );
    let resp = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body, b"ok");
    assert_eq!(upstream.requests.last().uri, "/abs/path?x=1");
}

// ---------------------------------------------------------------------------
// Upstream failures
// ---------------------------------------------------------------------------

/// An upstream with nothing listening gives 502 with a JSON
/// `{"error","detail"}` body and a request id, counted as a connect error.
#[tokio::test]
async fn upstream_down_gives_502_json() {
    let proxy = TestProxy::start(&format!("http://{}", unused_addr()), &[]).await;
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert!(resp.headers().contains_key("x-request-id"));
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["error"], "upstream_unavailable");
    assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()));
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"idemproxy_upstream_errors_total{kind="connect"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// An upstream that accepts the request and never answers gives 504 JSON
/// once `--request-timeout 300ms` has passed, not before and not much later.
#[tokio::test]
async fn hanging_upstream_gives_504_after_the_request_timeout() {
    let upstream = raw_upstream(hang).await;
    let proxy = TestProxy::start(&upstream.url(), &["--request-timeout", "300ms"]).await;
    let started = Instant::now();
    let resp = client().get(proxy.url("/slow")).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["error"], "upstream_timeout");
    assert!(json["detail"].is_string());
}

/// An upstream that closes the connection before sending response headers
/// gives 502 JSON.
#[tokio::test]
async fn upstream_closing_before_headers_gives_502() {
    let upstream = raw_upstream(close_after_head).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["error"], "upstream_unavailable");
    assert!(json["detail"].is_string());
}

// ---------------------------------------------------------------------------
// Client limits
// ---------------------------------------------------------------------------

/// A 20 KiB header with `--max-header-size 8KiB` gets 431 and is not
/// forwarded; the proxy keeps serving.
#[tokio::test]
async fn oversized_request_head_gets_431() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &["--max-header-size", "8KiB"]).await;
    let big = "x".repeat(20 * 1024);
    let resp = client()
        .get(proxy.url("/"))
        .header("x-big", big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    assert!(upstream.requests.is_empty());
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Every duration the proxy adds to the current time at run time, at the
/// one-year cap (`8760h`): the header read timeout, the request deadline and
/// a route's `timeout=`, the idempotency cache's TTL, the pool's idle
/// timeout, the session timers. Plain, keyed (then replayed) and verified
/// requests are all answered as usual: no overflow at the cap.
#[tokio::test]
async fn durations_at_the_one_year_cap_run() {
    let upstream = Upstream::start(|req| async move {
        match (req.method().as_str(), req.uri().path()) {
            ("POST", "/things") => {
                let mut resp = response(409, "conflict");
                resp.headers_mut()
                    .insert("location", "/things/1".parse().unwrap());
                resp
            }
            ("POST", _) => response(201, "stored"),
            _ => response(200, "ok"),
        }
    })
    .await;
    let year = "8760h";
    let proxy = TestProxy::start(
        &upstream.url(),
        &[
            "--header-read-timeout",
            year,
            "--request-timeout",
            year,
            "--try-timeout",
            year,
            "--connect-timeout",
            year,
            "--idempotency-ttl",
            year,
            "--upstream-idle-timeout",
            year,
            "--drain-timeout",
            year,
            "--session-sources",
            "header:x-sid",
            "--heartbeat",
            "POST /sessions/{session}/heartbeat",
            "--heartbeat-interval",
            year,
            "--session-idle-timeout",
            year,
            "--heartbeat-timeout",
            year,
            "--routes",
            "POST /things verify=location match=exists timeout=8760h\nGET /poll timeout=8760h",
        ],
    )
    .await;
    let resp = client()
        .get(proxy.url("/poll"))
        .header("x-sid", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for replayed in [false, true] {
        let resp = client()
            .post(proxy.url("/entries"))
            .header("idempotency-key", "k-1")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.headers().contains_key("idempotent-replayed"), replayed);
    }
    let resp = client()
        .post(proxy.url("/things"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-idemproxy-recovered"], "409");
    let resp = client().get(proxy.url("/again")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream.requests.lines().len(),
        5,
        "{:?}",
        upstream.requests.lines()
    );
}

/// A client that starts a request head and never finishes it is
/// disconnected after `--header-read-timeout 200ms`.
#[tokio::test]
async fn slow_client_head_is_cut_off_after_the_header_read_timeout() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &["--header-read-timeout", "200ms"]).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    write_all(
        &mut client,
        b"GET /slow HTTP/1.1\r\nHost: proxy\r\nX-Partial: ",
    )
    .await;
    let got = read_until_closed(&mut client).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}"
    );
    assert!(!String::from_utf8_lossy(&got).contains(" 200 "), "{got:?}");
    assert!(upstream.requests.is_empty());
}

/// A client that connects and sends nothing at all is disconnected after
/// `--header-read-timeout 200ms` (it must not hold a connection slot forever).
#[tokio::test]
async fn silent_client_is_cut_off_after_the_header_read_timeout() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &["--header-read-timeout", "200ms"]).await;
    for opening in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let started = Instant::now();
        write_all(&mut client, opening).await;
        read_until_closed(&mut client).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(3),
            "after {opening:?}: closed after {elapsed:?}"
        );
    }
}

/// A keep-alive connection idle for longer than the idle grace (its
/// buffers given back) answers its next request, and one whose next head
/// was half sent before the pause is answered once the rest arrives.
#[tokio::test]
async fn connections_idle_past_the_grace_keep_answering() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let get = b"GET /idle HTTP/1.1\r\nHost: proxy\r\n\r\n";
    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    let mut split = TcpStream::connect(proxy.addr).await.unwrap();
    write_all(&mut plain, get).await;
    write_all(
        &mut split,
        b"GET /first HTTP/1.1\r\nHost: proxy\r\n\r\nGET /sec",
    )
    .await;
    for conn in [&mut plain, &mut split] {
        let resp = within("the first answer", read_response(conn))
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
    }
    // Two grace periods: both connections are parked.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    write_all(&mut plain, get).await;
    write_all(&mut split, b"ond HTTP/1.1\r\nHost: proxy\r\n\r\n").await;
    for conn in [&mut plain, &mut split] {
        let resp = within("the answer after the pause", read_response(conn))
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.head);
    }
    let targets: Vec<String> = upstream
        .requests
        .lines()
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
        .collect();
    assert!(targets.contains(&"/second".to_string()), "{targets:?}");
    assert_eq!(targets.len(), 4, "{targets:?}");
}

/// On shutdown, a keep-alive connection idle past the grace is closed at
/// once: the drain does not wait for it.
#[tokio::test]
async fn shutdown_closes_parked_idle_connections_at_once() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    write_all(&mut conn, b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n").await;
    let resp = within("the answer", read_response(&mut conn))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let started = Instant::now();
    proxy.stop().await;
    let closed = within("the idle connection to close", read_until_closed(&mut conn)).await;
    assert!(closed.is_empty(), "{closed:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stopping took {:?}",
        started.elapsed()
    );
}

/// With `--max-connections 1`, a second concurrent connection gets 503 JSON
/// and is closed, the first keeps working, and once it closes a new one is served.
#[tokio::test]
async fn connection_limit_refuses_extra_connections_with_503() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &["--max-connections", "1"]).await;
    let get = b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n";

    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    write_all(&mut first, get).await;
    let resp = within("first response", read_response(&mut first))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);

    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    write_all(&mut second, get).await;
    let refused = within("the 503", read_response(&mut second)).await.unwrap();
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert_eq!(refused.json()["error"], "too_many_connections");
    assert!(refused.json()["detail"].is_string());
    read_until_closed(&mut second).await;

    write_all(&mut first, get).await;
    let resp = within("first connection again", read_response(&mut first))
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "the first connection stopped working");
    drop(first);

    within("a new connection to be served", async {
        loop {
            let resp = raw_exchange(proxy.addr, get).await;
            if resp.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let metrics = proxy.metrics().await;
    assert!(
        metric_value(&metrics, "idemproxy_connections_rejected_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// Admin endpoints
// ---------------------------------------------------------------------------

/// `/healthz` and `/readyz` answer 200 while the proxy runs; unknown paths 404.
#[tokio::test]
async fn admin_health_and_readiness() {
    let upstream = ok_upstream().await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let get = |path: &str| client().get(proxy.admin_url(path)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    assert_eq!(get("/nope").await.unwrap().status(), 404);
    assert!(
        upstream.requests.is_empty(),
        "admin requests reached the upstream"
    );
}

/// After `shutdown()`, `/readyz` turns 503 and new connections are refused
/// while an in-flight request still completes with 200.
#[tokio::test]
async fn shutdown_turns_readiness_off_and_drains_in_flight_requests() {
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let upstream = Upstream::start(move |_req| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            response(200, "finished")
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let in_flight = tokio::spawn(client().get(proxy.url("/slow")).send());
    upstream.requests.wait_for(1).await;

    proxy.shutdown();
    within("/readyz to turn 503", async {
        loop {
            let resp = client()
                .get(proxy.admin_url("/readyz"))
                .send()
                .await
                .unwrap();
            if resp.status() == 503 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let healthz = client()
        .get(proxy.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200, "still alive while draining");
    within("the listener to close", async {
        while TcpStream::connect(proxy.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    release.notify_one();
    let resp = within("the in-flight request", in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "finished");
    proxy.stop().await;
}

/// `/metrics` counts answered requests by class, the duration histogram and
/// upstream errors by kind.
#[tokio::test]
async fn metrics_count_requests_durations_and_upstream_errors() {
    // Answers 200 except for /broken, where it closes the connection.
    let upstream = raw_upstream(|mut s| async move {
        while let Some(head) = read_head(&mut s).await {
            if request_target(&head) == "/broken" {
                return;
            }
            write_all(&mut s, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    for _ in 0..2 {
        let resp = client().get(proxy.url("/fine")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = client().get(proxy.url("/broken")).send().await.unwrap();
    assert_eq!(resp.status(), 502);

    let m = proxy.metrics().await;
    let value = |sample: &str| metric_value(&m, sample);
    assert_eq!(
        value(r#"idemproxy_requests_total{code_class="2xx"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        value(r#"idemproxy_requests_total{code_class="5xx"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value("idemproxy_request_duration_seconds_count"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(r#"idemproxy_request_duration_seconds_bucket{le="+Inf"}"#),
        Some(3.0),
        "{m}"
    );
    assert!(
        m.contains("# TYPE idemproxy_request_duration_seconds histogram"),
        "{m}"
    );
    assert_eq!(
        value(r#"idemproxy_upstream_errors_total{kind="reset"}"#),
        Some(1.0),
        "{m}"
    );
}

/// The in-flight and open-connection gauges show a request while it is
/// served and fall back to zero once it is answered and the client leaves.
#[tokio::test]
async fn in_flight_and_open_connection_gauges_follow_requests() {
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let upstream = Upstream::start(move |_req| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            response(200, "done")
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let idle = proxy.metrics().await;
    assert_eq!(
        metric_value(&idle, "idemproxy_requests_in_flight"),
        Some(0.0),
        "{idle}"
    );
    assert_eq!(
        metric_value(&idle, "idemproxy_connections_open"),
        Some(0.0),
        "{idle}"
    );

    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    write_all(&mut conn, b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n").await;
    upstream.requests.wait_for(1).await;
    let busy = proxy.metrics().await;
    assert_eq!(
        metric_value(&busy, "idemproxy_requests_in_flight"),
        Some(1.0),
        "{busy}"
    );
    assert_eq!(
        metric_value(&busy, "idemproxy_connections_open"),
        Some(1.0),
        "{busy}"
    );

    release.notify_one();
    let resp = within("the response", read_response(&mut conn))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    drop(conn);
    within("the gauges to return to zero", async {
        loop {
            let m = proxy.metrics().await;
            if metric_value(&m, "idemproxy_requests_in_flight") == Some(0.0)
                && metric_value(&m, "idemproxy_connections_open") == Some(0.0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
