//! End-to-end tests of the local idempotency cache for keys the client sends
//! itself (DESIGN.md, "Client-supplied keys"): through a real proxy in front
//! of a real upstream on `127.0.0.1:0`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use testkit::*;

/// An upstream that answers every request `201 stored <n>` after `delay`,
/// counting them.
async fn counting_upstream(delay: Duration) -> (Upstream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = Upstream::start(move |_req| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(delay).await;
            let mut resp = response(201, format!("stored {n}"));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            resp
        }
    })
    .await;
    (upstream, calls)
}

async fn post(proxy: &TestProxy, key: &str, body: &'static str) -> reqwest::Response {
    client()
        .post(proxy.url("/v1/sessions/s1/entries"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Eight concurrent duplicates of a client-keyed write reach the upstream once
/// and all get the first answer; a later repeat is replayed with
/// `Idempotent-Replayed: true`.
#[tokio::test]
async fn concurrent_duplicates_cause_one_upstream_request_and_repeats_replay() {
    let (upstream, calls) = counting_upstream(Duration::from_millis(150)).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;

    let answers = futures_util::future::join_all(
        (0..8).map(|_| post(&proxy, "client-key-1", r#"{"uuid":"a"}"#)),
    )
    .await;
    for resp in answers {
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.text().await.unwrap(), "stored 1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one upstream request");

    let again = post(&proxy, "client-key-1", r#"{"uuid":"a"}"#).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), "stored 1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"idemproxy_idempotency_cache_total{result="miss"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"idemproxy_idempotency_cache_total{result="hit"}"#),
        "{metrics}"
    );
}

/// The same client key with a different body is refused with 422 and a JSON
/// error, and nothing more goes upstream.
#[tokio::test]
async fn a_reused_key_with_a_different_body_gets_422() {
    let (upstream, calls) = counting_upstream(Duration::ZERO).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;

    assert_eq!(
        post(&proxy, "client-key-2", r#"{"uuid":"a"}"#)
            .await
            .status(),
        201
    );
    let reused = post(&proxy, "client-key-2", r#"{"uuid":"b"}"#).await;
    assert_eq!(reused.status(), 422);
    assert_eq!(reused.headers()["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&reused.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "idempotency_key_reused");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// With `IDEMPROXY_IDEMPOTENCY_TTL=0` the cache is off: every duplicate goes
/// upstream (carrying the client's key, for the backend to decide).
#[tokio::test]
async fn the_cache_can_be_turned_off() {
    let (upstream, calls) = counting_upstream(Duration::ZERO).await;
    let proxy = TestProxy::start(&upstream.url(), &["--idempotency-ttl", "0"]).await;

    for _ in 0..2 {
        let resp = post(&proxy, "client-key-3", r#"{"uuid":"a"}"#).await;
        assert!(!resp.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let seen = upstream.requests.all();
    assert!(
        seen.iter()
            .all(|r| r.headers["idempotency-key"] == "client-key-3")
    );
}

/// Client B sends client A's key and body with other credentials (or none):
/// B gets the upstream's own answer, never A's body or A's `Set-Cookie`,
/// and no `422`; A's own repeat is still replayed.
#[tokio::test]
async fn another_clients_request_with_the_same_key_gets_its_own_answer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = Upstream::start(move |req| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let who = req
            .headers()
            .get("authorization")
            .map_or("anonymous".to_owned(), |v| v.to_str().unwrap().to_owned());
        async move {
            let mut resp = response(201, format!("stored {n} for {who}"));
            resp.headers_mut()
                .insert("set-cookie", format!("sid=cookie-{n}").parse().unwrap());
            resp
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    let send = |auth: Option<&'static str>, body: &'static str| {
        let mut req = client()
            .post(proxy.url("/v1/sessions/s1/entries"))
            .header("idempotency-key", "shared-key")
            .body(body);
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.send()
    };
    let a = send(Some("Bearer alice"), "{}").await.unwrap();
    assert_eq!(a.headers()["set-cookie"], "sid=cookie-1");
    assert_eq!(a.text().await.unwrap(), "stored 1 for Bearer alice");
    for (auth, n) in [(Some("Bearer bob"), 2), (None, 3)] {
        let b = send(auth, "{}").await.unwrap();
        assert_eq!(b.status(), 201);
        assert!(b.headers().get("idempotent-replayed").is_none());
        assert_eq!(
            b.headers()["set-cookie"],
            format!("sid=cookie-{n}").as_str()
        );
        let who = auth.unwrap_or("anonymous");
        assert_eq!(b.text().await.unwrap(), format!("stored {n} for {who}"));
    }
    let other_body = send(Some("Bearer carol"), r#"{"x":1}"#).await.unwrap();
    assert_eq!(other_body.status(), 201, "no 422 across clients");
    let again = send(Some("Bearer alice"), "{}").await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert!(again.headers().get("set-cookie").is_none());
    assert_eq!(again.text().await.unwrap(), "stored 1 for Bearer alice");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}
