//! Integration tests of TLS to the upstream: a CA generated per test
//! (`--upstream-ca-file`), a wrong CA, mTLS, and HTTP/2 negotiated by ALPN.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Method, Version};
use testkit::*;

/// An HTTPS upstream offering `alpn`, answering `200 secure <path>`; with
/// `client_ca`, it requires a client certificate issued by that CA.
async fn tls_upstream(pki: &TestPki, alpn: &[&str], client_ca: Option<&TestPki>) -> Upstream {
    Upstream::start_tls(pki.server_config(alpn, client_ca), |req| async move {
        response(
            200,
            format!("secure {}", req.uri().path_and_query().unwrap()),
        )
    })
    .await
}

/// Reads a 502 answer and checks its JSON `{"error", "detail"}` body; returns the detail.
async fn expect_502_json(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["error"], "upstream_unavailable", "{json}");
    json["detail"].as_str().expect("a detail string").to_owned()
}

/// An HTTPS upstream whose certificate comes from the CA in
/// `--upstream-ca-file` is reached; Host is its authority.
#[tokio::test]
async fn https_upstream_is_trusted_through_the_ca_file() {
    let pki = TestPki::new("idemproxy test CA");
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let upstream = tls_upstream(&pki, &["http/1.1"], None).await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &["--upstream-ca-file", ca.to_str().unwrap()],
    )
    .await;
    let resp = client().get(proxy.url("/s?x=1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "secure /s?x=1");
    let seen = upstream.requests.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
}

/// An HTTPS upstream whose certificate comes from a CA the proxy does not
/// trust gives 502 JSON, and nothing reaches the upstream's handler.
#[tokio::test]
async fn https_upstream_with_an_unknown_ca_gives_502() {
    let server_pki = TestPki::new("the upstream's CA");
    let other_pki = TestPki::new("some other CA");
    let dir = TempDir::new();
    let wrong_ca = dir.write("other-ca.pem", &other_pki.ca_pem);
    let upstream = tls_upstream(&server_pki, &["h2", "http/1.1"], None).await;
    for extra in [&[][..], &["--upstream-ca-only", "on"]] {
        let mut flags = vec!["--upstream-ca-file", wrong_ca.to_str().unwrap()];
        flags.extend_from_slice(extra);
        let proxy = TestProxy::start(&upstream.url(), &flags).await;
        let resp = client().get(proxy.url("/")).send().await.unwrap();
        let detail = expect_502_json(resp).await;
        assert!(
            detail.to_ascii_lowercase().contains("certificate"),
            "the detail should say the certificate was refused: {detail}"
        );
    }
    assert!(upstream.requests.is_empty());
}

/// With `--upstream-client-cert/--upstream-client-key`, an upstream that
/// requires a client certificate accepts the proxy.
#[tokio::test]
async fn mtls_client_certificate_is_presented() {
    let pki = TestPki::new("idemproxy test CA");
    let client_leaf = pki.client_leaf();
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let cert = dir.write("client.pem", &client_leaf.cert_pem);
    let key = dir.write("client.key", &client_leaf.key_pem);
    let upstream = tls_upstream(&pki, &["h2", "http/1.1"], Some(&pki)).await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &[
            "--upstream-ca-file",
            ca.to_str().unwrap(),
            "--upstream-client-cert",
            cert.to_str().unwrap(),
            "--upstream-client-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let resp = client()
        .post(proxy.url("/mtls"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "secure /mtls");
    assert_eq!(upstream.requests.last().method, Method::POST);
}

/// Without a client certificate, the same mTLS upstream refuses the proxy: 502 JSON.
#[tokio::test]
async fn mtls_upstream_refuses_a_proxy_without_client_certificate() {
    let pki = TestPki::new("idemproxy test CA");
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let upstream = tls_upstream(&pki, &["h2", "http/1.1"], Some(&pki)).await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &["--upstream-ca-file", ca.to_str().unwrap()],
    )
    .await;
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    expect_502_json(resp).await;
    assert!(upstream.requests.is_empty());
}

/// A TLS upstream offering `h2` by ALPN is spoken to in HTTP/2, whether the
/// client uses HTTP/1.1 or h2c; bodies, queries and repeated headers survive.
#[tokio::test]
async fn http2_to_the_tls_upstream_is_negotiated_by_alpn() {
    let pki = TestPki::new("idemproxy test CA");
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let upstream = Upstream::start_tls(
        pki.server_config(&["h2", "http/1.1"], None),
        |req| async move {
            let (parts, body) = req.into_parts();
            let body = body_bytes(body).await;
            response(
                200,
                format!(
                    "{} {} {}",
                    parts.method,
                    parts.uri.path_and_query().unwrap(),
                    String::from_utf8_lossy(&body)
                ),
            )
        },
    )
    .await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &["--upstream-ca-file", ca.to_str().unwrap()],
    )
    .await;
    for (client, client_version) in [
        (client(), Version::HTTP_11),
        (h2c_client(), Version::HTTP_2),
    ] {
        let resp = client
            .put(proxy.url("/doc/1?rev=2"))
            .header("x-multi", "one")
            .header("x-multi", "two")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), client_version);
        assert_eq!(resp.text().await.unwrap(), "PUT /doc/1?rev=2 payload");
        let seen = upstream.requests.last();
        assert_eq!(
            seen.version,
            Version::HTTP_2,
            "the upstream did not get HTTP/2"
        );
        assert_eq!(seen.uri.path_and_query().unwrap(), "/doc/1?rev=2");
        assert_eq!(seen.header_all("x-multi"), ["one", "two"]);
        assert!(seen.header("x-request-id").is_some());
    }
}

/// A TLS upstream offering `h2`: eight requests sent at once before any
/// connection exists, then eight more one after another, all travel over one
/// shared HTTP/2 connection.
#[tokio::test]
async fn http2_requests_share_one_tls_connection() {
    let pki = TestPki::new("idemproxy test CA");
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let upstream = tls_upstream(&pki, &["h2", "http/1.1"], None).await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &["--upstream-ca-file", ca.to_str().unwrap()],
    )
    .await;
    let burst = (0..8).map(|n| {
        let url = proxy.url(&format!("/burst/{n}"));
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    let answers = within(
        "eight requests at once",
        futures_util::future::join_all(burst),
    )
    .await;
    for (n, answer) in answers.iter().enumerate() {
        assert_eq!(answer, &format!("secure /burst/{n}"));
    }
    let client = client();
    for n in 0..8 {
        let resp = client
            .get(proxy.url(&format!("/seq/{n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), format!("secure /seq/{n}"));
    }
    assert!(
        upstream
            .requests
            .all()
            .iter()
            .all(|r| r.version == Version::HTTP_2)
    );
    assert_eq!(upstream.connections(), 1);
}

/// An https upstream that takes 300 ms to fail each TLS handshake: eight
/// requests sent at once wait for the one connect in progress and all get
/// its 502 (nothing was sent), instead of connecting one after another.
#[tokio::test]
async fn requests_waiting_for_a_failing_connect_share_its_error() {
    let upstream = raw_upstream(|stream| async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(stream);
    })
    .await;
    let url = format!("https://{}", upstream.addr);
    let proxy = TestProxy::start(&url, &["--max-attempts", "1"]).await;
    let burst = (0..8).map(|_| {
        let url = proxy.url("/");
        async move { client().get(url).send().await.unwrap() }
    });
    let answers = within(
        "eight failing requests",
        futures_util::future::join_all(burst),
    )
    .await;
    for resp in answers {
        assert_eq!(resp.status(), 502);
        let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(json["may_have_been_processed"], false, "{json}");
    }
    assert_eq!(upstream.connections(), 1);
}

/// A TLS upstream offering only `http/1.1` is spoken to in HTTP/1.1.
#[tokio::test]
async fn http1_only_tls_upstream_gets_http1() {
    let pki = TestPki::new("idemproxy test CA");
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let upstream = tls_upstream(&pki, &["http/1.1"], None).await;
    let proxy = TestProxy::start(
        &upstream.url(),
        &["--upstream-ca-file", ca.to_str().unwrap()],
    )
    .await;
    let resp = h2c_client().get(proxy.url("/one")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.requests.last().version, Version::HTTP_11);
}

/// An HTTP/2 upstream (ALPN `h2`) that refuses the first stream with
/// `RST_STREAM(REFUSED_STREAM)` and answers every later one; returns its
/// address and how many requests its handler ran.
async fn refusing_h2_upstream(pki: &TestPki) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&["h2"], None));
    let streams = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&ran);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (streams, ran) = (Arc::clone(&streams), Arc::clone(&handled));
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tls).await.unwrap();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if streams.fetch_add(1, Ordering::SeqCst) == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    ran.fetch_add(1, Ordering::SeqCst);
                    let head = http::Response::builder().status(200).body(()).unwrap();
                    let mut body = respond.send_response(head, false).unwrap();
                    body.send_data(bytes::Bytes::from_static(b"ran once"), true)
                        .unwrap();
                }
            });
        }
    });
    (addr, ran)
}

/// A POST (not idempotent, no opt-in) whose HTTP/2 stream the upstream
/// refuses is retried: a refused stream was never processed. The handler
/// runs once, and the retry is counted as `refused-stream`.
#[tokio::test]
async fn refused_h2_stream_is_retried_even_for_a_post() {
    let pki = TestPki::new("idemproxy test CA");
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let (addr, ran) = refusing_h2_upstream(&pki).await;
    let proxy = TestProxy::start(
        &format!("https://{addr}"),
        &["--upstream-ca-file", ca.to_str().unwrap()],
    )
    .await;
    let resp = client()
        .post(proxy.url("/mcp"))
        .body(r#"{"method":"tools/call"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-idemproxy-attempts"], "2");
    assert_eq!(resp.text().await.unwrap(), "ran once");
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "idemproxy_retries_total{reason=\"refused-stream\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}
