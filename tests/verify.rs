//! End-to-end tests of idempotency keys and verified `409` recovery (issue 4):
//! a real proxy in front of a real TCP upstream that stores documents and can
//! drop the connection after storing, so the retried write meets a `409`.
//! Each test starts its own upstream and proxy on `127.0.0.1:0`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use testkit::*;

/// Flags that make retries fast: 1 ms backoff base, 5 ms max.
const FAST: [&str; 4] = ["--backoff-base", "1ms", "--backoff-max", "5ms"];

const PUT_SAME: &str = "PUT /db/{doc} verify=same";
const POST_ENTRIES: &str =
    "POST /v1/sessions/{sid}/entries verify=GET:/v1/sessions/{sid}/entries/{body.uuid}";

// ---------------------------------------------------------------------------
// A document store behind the scripted upstream
// ---------------------------------------------------------------------------

/// The body of every 409 the store answers, byte for byte.
const CONFLICT_BODY: &str = r#"{"error":"conflict","detail":"already exists"}"#;

/// A tiny backend: `PUT /db/{doc}` and `POST /v1/sessions/{sid}/entries`
/// (keyed by the body's `uuid`) store a document at its read path, or answer
/// 409 when one is already there; `GET` of a read path returns it. The next
/// `drop_writes` writes are stored and then answered by dropping the
/// connection.
#[derive(Clone, Default)]
struct Store {
    docs: Arc<Mutex<HashMap<String, Bytes>>>,
    drop_writes: Arc<AtomicUsize>,
}

impl Store {
    /// A store whose first write is stored and then dropped.
    fn dropping_first_write() -> Store {
        let store = Store::default();
        store.drop_writes.store(1, Ordering::SeqCst);
        store
    }

    /// Puts a document in place, as if stored earlier.
    fn insert(&self, path: &str, doc: &str) {
        self.docs
            .lock()
            .unwrap()
            .insert(path.into(), Bytes::from(doc.to_owned()));
    }

    fn len(&self) -> usize {
        self.docs.lock().unwrap().len()
    }

    fn get(&self, path: &str) -> Option<Bytes> {
        self.docs.lock().unwrap().get(path).cloned()
    }

    /// Where a write's document is read back, if the request is a write.
    fn write_path(req: &Request<Bytes>) -> Option<String> {
        let path = req.uri().path();
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        match (req.method(), segs.as_slice()) {
            (&Method::PUT, ["db", _]) => Some(path.to_owned()),
            (&Method::POST, ["v1", "sessions", _, "entries"]) => {
                let doc: serde_json::Value = serde_json::from_slice(req.body()).ok()?;
                let uuid = doc.get("uuid")?.as_str()?;
                // As a backend would: the id is one path segment, encoded.
                let mut encoded = String::new();
                for b in uuid.bytes() {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        encoded.push(char::from(b));
                    } else {
                        encoded.push_str(&format!("%{b:02X}"));
                    }
                }
                Some(format!("{path}/{encoded}"))
            }
            _ => None,
        }
    }

    fn handle(&self, req: &Request<Bytes>) -> Act {
        if req.method() == Method::GET {
            return Act::Reply(match self.get(req.uri().path()) {
                Some(doc) => json_response(200, doc),
                None => json_response(404, r#"{"error":"not found"}"#),
            });
        }
        let Some(path) = Store::write_path(req) else {
            return Act::Reply(json_response(400, r#"{"error":"bad write"}"#));
        };
        let mut docs = self.docs.lock().unwrap();
        if docs.contains_key(&path) {
            let mut resp = json_response(409, CONFLICT_BODY);
            let h = resp.headers_mut();
            h.insert("location", HeaderValue::from_str(&path).unwrap());
            h.insert("x-backend-reason", HeaderValue::from_static("duplicate"));
            h.insert("etag", HeaderValue::from_static("\"v1\""));
            return Act::Reply(resp);
        }
        docs.insert(path.clone(), req.body().clone());
        let dropping = self
            .drop_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if dropping {
            return Act::Drop;
        }
        let mut resp = json_response(201, req.body().clone());
        resp.headers_mut()
            .insert("location", HeaderValue::from_str(&path).unwrap());
        Act::Reply(resp)
    }

    /// A scripted upstream serving this store.
    async fn serve(&self) -> Upstream {
        let store = self.clone();
        Upstream::scripted(move |req, _n| {
            let act = store.handle(&req);
            async move { act }
        })
        .await
    }
}

fn json_response(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = response(status, body);
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

/// Starts a proxy in front of `upstream` with the route table `routes` and
/// fast backoffs, plus `extra` flags.
async fn proxy_with(upstream: &Upstream, routes: &str, extra: &[&str]) -> TestProxy {
    let mut argv: Vec<&str> = FAST.to_vec();
    argv.extend_from_slice(&["--routes", routes]);
    argv.extend_from_slice(extra);
    TestProxy::start(&upstream.url(), &argv).await
}

fn recovered(resp: &reqwest::Response) -> Option<&str> {
    resp.headers()
        .get("x-idemproxy-recovered")
        .map(|v| v.to_str().unwrap())
}

async fn post_entry(proxy: &TestProxy, sid: &str, doc: &str) -> reqwest::Response {
    client()
        .post(proxy.url(&format!("/v1/sessions/{sid}/entries")))
        .header("content-type", "application/json")
        .body(doc.to_owned())
        .send()
        .await
        .unwrap()
}

async fn put_doc(proxy: &TestProxy, doc: &str, body: &str) -> reqwest::Response {
    client()
        .put(proxy.url(&format!("/db/{doc}")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// Asserts that `resp` is the store's 409, unchanged: status, headers, body.
async fn assert_original_409(resp: reqwest::Response, location: &str) {
    assert_eq!(resp.status(), 409);
    assert_eq!(recovered(&resp), None);
    let h = resp.headers();
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["location"], location);
    assert_eq!(h["x-backend-reason"], "duplicate");
    assert_eq!(h["etag"], "\"v1\"");
    assert_eq!(
        h["content-length"],
        CONFLICT_BODY.len().to_string().as_str()
    );
    assert_eq!(resp.bytes().await.unwrap(), CONFLICT_BODY.as_bytes());
}

// ---------------------------------------------------------------------------
// Recovery of a write whose answer was lost
// ---------------------------------------------------------------------------

/// `PUT /db/{doc} verify=same`: the first PUT is stored and its connection
/// dropped, the retry gets 409, the verification GET finds the document: the
/// client gets 200 with the stored document and `x-idemproxy-recovered: 409`,
/// and the upstream holds one copy.
#[tokio::test]
async fn put_stored_then_dropped_is_recovered_with_the_stored_document() {
    let store = Store::dropping_first_write();
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, PUT_SAME, &[]).await;
    let doc = r#"{"title":"notes","n":1}"#;
    let resp = put_doc(&proxy, "d1", doc).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    // The write's own attempts: the dropped one and the one that met the 409.
    assert_eq!(resp.headers()["x-idemproxy-attempts"], "2");
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.bytes().await.unwrap(), doc.as_bytes());
    assert_eq!(store.len(), 1);
    assert_eq!(store.get("/db/d1").unwrap(), doc.as_bytes());
    assert_eq!(
        upstream.requests.lines(),
        ["PUT /db/d1", "PUT /db/d1", "GET /db/d1"]
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, "idemproxy_conflicts_recovered_total"),
        Some(1.0),
        "{metrics}"
    );
}

/// `POST .../entries verify=GET:.../entries/{body.uuid}`: an append stored
/// and then dropped is recovered through the template built from the body's
/// `uuid`; the session holds exactly one copy of the entry.
#[tokio::test]
async fn post_stored_then_dropped_is_recovered_through_the_body_template() {
    let store = Store::dropping_first_write();
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, POST_ENTRIES, &[]).await;
    let entry = r#"{"uuid":"e-42","role":"user","text":"hello"}"#;
    let resp = post_entry(&proxy, "s1", entry).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    assert_eq!(resp.bytes().await.unwrap(), entry.as_bytes());
    assert_eq!(store.len(), 1);
    assert_eq!(
        upstream.requests.lines(),
        [
            "POST /v1/sessions/s1/entries",
            "POST /v1/sessions/s1/entries",
            "GET /v1/sessions/s1/entries/e-42"
        ]
    );
}

/// `recovered-status=201` answers a verified recovery with 201 instead of 200.
#[tokio::test]
async fn recovered_status_is_configurable() {
    let store = Store::dropping_first_write();
    let upstream = store.serve().await;
    let proxy = proxy_with(
        &upstream,
        &format!("{POST_ENTRIES} recovered-status=201"),
        &[],
    )
    .await;
    let entry = r#"{"uuid":"e-1","text":"x"}"#;
    let resp = post_entry(&proxy, "s1", entry).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(recovered(&resp), Some("409"));
    assert_eq!(resp.bytes().await.unwrap(), entry.as_bytes());
}

// ---------------------------------------------------------------------------
// Real conflicts pass through
// ---------------------------------------------------------------------------

/// A document already stored with different content: the 409 reaches the
/// client unchanged (status, headers, body byte for byte), counted as a mismatch.
#[tokio::test]
async fn real_conflict_passes_through_unchanged() {
    let store = Store::default();
    store.insert("/db/d1", r#"{"title":"theirs","n":1}"#);
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, PUT_SAME, &[]).await;
    let resp = put_doc(&proxy, "d1", r#"{"title":"mine","n":1}"#).await;
    assert_original_409(resp, "/db/d1").await;
    assert_eq!(upstream.requests.lines(), ["PUT /db/d1", "GET /db/d1"]);
    assert_eq!(store.get("/db/d1").unwrap(), r#"{"title":"theirs","n":1}"#);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"idemproxy_conflicts_passed_total{reason="mismatch"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// A stored entry with the same uuid that differs in one field is not proof:
/// the client gets the original 409.
#[tokio::test]
async fn stored_entry_differing_in_one_field_is_not_recovered() {
    let store = Store::default();
    store.insert(
        "/v1/sessions/s1/entries/e-1",
        r#"{"uuid":"e-1","role":"user","text":"hello","seq":1}"#,
    );
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, POST_ENTRIES, &[]).await;
    let resp = post_entry(
        &proxy,
        "s1",
        r#"{"uuid":"e-1","role":"user","text":"hello","seq":2}"#,
    )
    .await;
    assert_original_409(resp, "/v1/sessions/s1/entries/e-1").await;
    // The same entry with the same fields (in another order) is recovered.
    let resp = post_entry(
        &proxy,
        "s1",
        r#"{"seq":1,"text":"hello","uuid":"e-1","role":"user"}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
}

// ---------------------------------------------------------------------------
// Targets and match modes
// ---------------------------------------------------------------------------

/// `verify=location` reads the 409's `Location` (relative, or absolute on
/// the upstream's own authority); a `Location` on another host is never
/// followed and the 409 passes.
#[tokio::test]
async fn verify_location_follows_only_the_upstreams_own_location() {
    let doc = r#"{"name":"t"}"#;
    let location = Arc::new(Mutex::new(String::from("/v1/things/t-9")));
    let target = location.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let location = target.lock().unwrap().clone();
        async move {
            Act::Reply(if req.method() == Method::POST {
                let mut resp = json_response(409, CONFLICT_BODY);
                resp.headers_mut()
                    .insert("location", HeaderValue::from_str(&location).unwrap());
                resp
            } else if req.uri().path() == "/v1/things/t-9" {
                json_response(200, doc)
            } else {
                json_response(404, "{}")
            })
        }
    })
    .await;
    let proxy = proxy_with(&upstream, "POST /v1/things verify=location", &[]).await;
    let post = || {
        client()
            .post(proxy.url("/v1/things"))
            .header("content-type", "application/json")
            .body(doc)
            .send()
    };
    let resp = post().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    assert_eq!(resp.bytes().await.unwrap(), doc.as_bytes());

    *location.lock().unwrap() = format!("http://{}/v1/things/t-9", upstream.addr);
    let resp = post().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));

    *location.lock().unwrap() = "http://evil.example/v1/things/t-9".into();
    let resp = post().await.unwrap();
    assert_eq!(resp.status(), 409);
    assert_eq!(resp.bytes().await.unwrap(), CONFLICT_BODY.as_bytes());
    assert_eq!(
        upstream.requests.lines(),
        [
            "POST /v1/things",
            "GET /v1/things/t-9",
            "POST /v1/things",
            "GET /v1/things/t-9",
            "POST /v1/things"
        ]
    );
}

/// `verify=location` with `match=exists`, in front of an upstream that
/// answers 200 to every GET: a 409 whose `Location` is scheme-relative
/// (`//other-host:1/x`), `/\other-host/x`, holds a backslash, or is an
/// absolute URL on another scheme or port, passes through byte for byte and
/// no verification request is made; `/x` and `http://<upstream>/x` still
/// verify and recover.
#[tokio::test]
async fn verify_location_refuses_scheme_relative_and_backslash_locations() {
    let location = Arc::new(Mutex::new(String::new()));
    let target = location.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let location = target.lock().unwrap().clone();
        async move {
            Act::Reply(if req.method() == Method::POST {
                let mut resp = json_response(409, CONFLICT_BODY);
                let h = resp.headers_mut();
                h.insert("location", HeaderValue::from_str(&location).unwrap());
                h.insert("x-backend-reason", HeaderValue::from_static("duplicate"));
                h.insert("etag", HeaderValue::from_static("\"v1\""));
                resp
            } else {
                json_response(200, r#"{"any":"thing"}"#)
            })
        }
    })
    .await;
    let proxy = proxy_with(
        &upstream,
        "POST /v1/things verify=location match=exists",
        &[],
    )
    .await;
    let post = || {
        client()
            .post(proxy.url("/v1/things"))
            .header("content-type", "application/json")
            .body(r#"{"name":"t"}"#)
            .send()
    };
    let authority = upstream.addr.to_string();
    let refused = [
        "//other-host:1/x".to_owned(),
        "/\\other-host/x".to_owned(),
        "/x\\..\\admin".to_owned(),
        "/%5Cother-host/x".to_owned(),
        format!("//{authority}/x"),
        format!("https://{authority}/x"),
        format!(
            "http://{}:{}/x",
            upstream.addr.ip(),
            upstream.addr.port().wrapping_add(1).max(1)
        ),
        format!("http://{authority}//other-host/x"),
    ];
    for bad in &refused {
        *location.lock().unwrap() = bad.clone();
        assert_original_409(post().await.unwrap(), bad).await;
    }
    assert!(
        upstream.requests.with_method(Method::GET).is_empty(),
        "a verification request was made: {:?}",
        upstream.requests.lines()
    );
    for good in ["/x".to_owned(), format!("http://{authority}/x")] {
        *location.lock().unwrap() = good.clone();
        let resp = post().await.unwrap();
        assert_eq!(resp.status(), 200, "{good}");
        assert_eq!(recovered(&resp), Some("409"), "{good}");
    }
    let gets: Vec<String> = upstream
        .requests
        .with_method(Method::GET)
        .iter()
        .map(|r| r.uri.to_string())
        .collect();
    assert_eq!(gets, ["/x", "/x"]);
}

/// `match=exists`: any 2xx of the verification read is proof, whatever the
/// request body (here not even JSON); the client gets the stored representation.
#[tokio::test]
async fn match_exists_recovers_on_any_stored_document() {
    let store = Store::default();
    store.insert("/db/d1", r#"{"stored":"earlier"}"#);
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, "PUT /db/{doc} verify=same match=exists", &[]).await;
    let resp = client()
        .put(proxy.url("/db/d1"))
        .body(vec![0u8, 159, 146, 150])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    assert_eq!(
        resp.bytes().await.unwrap(),
        r#"{"stored":"earlier"}"#.as_bytes()
    );
    // Nothing stored there: the 404 of the read is no proof.
    let resp = put_doc(&proxy, "d2", "{}").await;
    assert_eq!(resp.status(), 201);
    let store2 = Store::default();
    let upstream2 = Upstream::scripted(move |req, _n| {
        let act = if req.method() == Method::GET {
            Act::Reply(json_response(404, "{}"))
        } else {
            store2.handle(&req)
        };
        async move { act }
    })
    .await;
    let proxy2 = proxy_with(&upstream2, "PUT /db/{doc} verify=same match=exists", &[]).await;
    put_doc(&proxy2, "d3", "{}").await;
    let resp = put_doc(&proxy2, "d3", "{}").await;
    assert_original_409(resp, "/db/d3").await;
}

/// `match=exact`: the same JSON with other spacing is not proof; the exact
/// bytes are.
#[tokio::test]
async fn match_exact_needs_byte_equal_documents() {
    let store = Store::default();
    store.insert("/db/d1", r#"{"a":1,"b":[true]}"#);
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, "PUT /db/{doc} verify=same match=exact", &[]).await;
    let resp = put_doc(&proxy, "d1", r#"{ "a": 1, "b": [true] }"#).await;
    assert_original_409(resp, "/db/d1").await;
    let resp = put_doc(&proxy, "d1", r#"{"a":1,"b":[true]}"#).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    assert_eq!(
        resp.bytes().await.unwrap(),
        r#"{"a":1,"b":[true]}"#.as_bytes()
    );
}

// ---------------------------------------------------------------------------
// The verification request itself
// ---------------------------------------------------------------------------

/// A verification read answered 503 is retried like any request; its
/// second answer proves the write and the client gets 200, without an
/// attempts header (the write itself was sent once).
#[tokio::test]
async fn verification_answered_503_is_retried_then_recovers() {
    // Stored earlier (its answer lost): this write meets the 409 at once.
    let store = Store::default();
    store.insert(
        "/v1/sessions/s1/entries/e-7",
        r#"{"uuid":"e-7","text":"hi"}"#,
    );
    let gets = Arc::new(AtomicUsize::new(0));
    let backend = store.clone();
    let counter = gets.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let act = if req.method() == Method::GET && counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Act::Reply(json_response(503, r#"{"error":"busy"}"#))
        } else {
            backend.handle(&req)
        };
        async move { act }
    })
    .await;
    let proxy = proxy_with(&upstream, POST_ENTRIES, &[]).await;
    let entry = r#"{"uuid":"e-7","text":"hi"}"#;
    let resp = post_entry(&proxy, "s1", entry).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    let resp_attempts = resp.headers().get("x-idemproxy-attempts").cloned();
    assert_eq!(resp.bytes().await.unwrap(), entry.as_bytes());
    // The write was sent once: the read's two attempts are not the client's.
    assert_eq!(resp_attempts, None);
    assert_eq!(upstream.requests.with_method(Method::GET).len(), 2);
    assert_eq!(store.len(), 1);
}

/// When the verification cannot prove anything, the original 409 goes back
/// unchanged: the read answers 404; the read hangs past the deadline (the
/// 409 still comes back within it); the template's `{body.uuid}` is missing
/// (no read is sent at all).
#[tokio::test]
async fn impossible_verification_passes_the_original_409() {
    // 404.
    let store = Store::default();
    let backend = store.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let act = if req.method() == Method::GET {
            Act::Reply(json_response(404, r#"{"error":"not found"}"#))
        } else {
            backend.handle(&req)
        };
        async move { act }
    })
    .await;
    store.insert("/db/d1", "{}");
    let proxy = proxy_with(&upstream, PUT_SAME, &[]).await;
    assert_original_409(put_doc(&proxy, "d1", "{}").await, "/db/d1").await;
    assert_eq!(upstream.requests.lines(), ["PUT /db/d1", "GET /db/d1"]);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"idemproxy_conflicts_passed_total{reason="not_found"}"#
        ),
        Some(1.0),
        "{metrics}"
    );

    // A read that hangs past --request-timeout.
    let store = Store::default();
    store.insert("/db/d1", "{}");
    let backend = store.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let act = if req.method() == Method::GET {
            Act::Hang
        } else {
            backend.handle(&req)
        };
        async move { act }
    })
    .await;
    let proxy = proxy_with(&upstream, PUT_SAME, &["--request-timeout", "500ms"]).await;
    let started = Instant::now();
    let resp = put_doc(&proxy, "d1", "{}").await;
    let elapsed = started.elapsed();
    assert_original_409(resp, "/db/d1").await;
    assert!(
        elapsed < Duration::from_millis(800),
        "answered after {elapsed:?}"
    );
    assert_eq!(upstream.requests.with_method(Method::GET).len(), 1);

    // No `uuid` in the body: the template cannot be filled.
    let store = Store::default();
    let backend = store.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let act = if req.method() == Method::POST {
            Act::Reply(json_response(409, CONFLICT_BODY))
        } else {
            backend.handle(&req)
        };
        async move { act }
    })
    .await;
    let proxy = proxy_with(&upstream, POST_ENTRIES, &[]).await;
    let resp = post_entry(&proxy, "s1", r#"{"id":"e-1"}"#).await;
    assert_eq!(resp.status(), 409);
    assert_eq!(resp.bytes().await.unwrap(), CONFLICT_BODY.as_bytes());
    assert_eq!(upstream.requests.lines(), ["POST /v1/sessions/s1/entries"]);
}

/// Hostile `{body.uuid}` values and session ids stay inside one path
/// segment of the template: the exact verification path the upstream saw
/// is checked, and a value that cannot be one segment (`..`) sends no read.
#[tokio::test]
async fn injected_values_never_leave_the_template_path() {
    let upstream = Upstream::scripted(|req, _n| async move {
        Act::Reply(if req.method() == Method::POST {
            json_response(409, CONFLICT_BODY)
        } else {
            json_response(404, "{}")
        })
    })
    .await;
    let proxy = proxy_with(&upstream, POST_ENTRIES, &[]).await;
    let cases: [(&str, &str, Option<&str>); 9] = [
        ("s1", "../admin", Some("/v1/sessions/s1/entries/..%2Fadmin")),
        ("s1", "a/b", Some("/v1/sessions/s1/entries/a%2Fb")),
        ("s1", "x?y=1", Some("/v1/sessions/s1/entries/x%3Fy%3D1")),
        ("s1", "x#frag", Some("/v1/sessions/s1/entries/x%23frag")),
        ("s1", "%2e%2e", Some("/v1/sessions/s1/entries/%252e%252e")),
        (
            "s1",
            "a\r\nHost: evil",
            Some("/v1/sessions/s1/entries/a%0D%0AHost%3A%20evil"),
        ),
        ("s1", "..", None),
        ("s1", "", None),
        (
            "s%2F..%2Fadmin",
            "e-1",
            Some("/v1/sessions/s%2F..%2Fadmin/entries/e-1"),
        ),
    ];
    for (sid, uuid, expected) in cases {
        let before = upstream.requests.len();
        let doc = serde_json::json!({ "uuid": uuid }).to_string();
        let resp = post_entry(&proxy, sid, &doc).await;
        assert_eq!(resp.status(), 409, "{uuid:?}");
        assert_eq!(resp.bytes().await.unwrap(), CONFLICT_BODY.as_bytes());
        let seen = upstream.requests.all();
        let reads: Vec<String> = seen[before..]
            .iter()
            .filter(|r| r.method == Method::GET)
            .map(|r| r.uri.to_string())
            .collect();
        match expected {
            Some(path) => assert_eq!(reads, [path], "{uuid:?}"),
            None => assert!(reads.is_empty(), "{uuid:?}: {reads:?}"),
        }
    }
}

/// The verification read carries the client's credentials, `Accept` and
/// API-version header, but nothing that describes the write's body or makes
/// the read conditional, and no idempotency key (the client's or a made one).
#[tokio::test]
async fn verification_carries_credentials_but_not_body_headers() {
    let store = Store::default();
    store.insert("/db/d1", r#"{"a":1}"#);
    store.insert("/v1/sessions/s1/entries/e-1", r#"{"uuid":"e-1"}"#);
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, &format!("{PUT_SAME}\n{POST_ENTRIES}"), &[]).await;
    let resp = client()
        .put(proxy.url("/db/d1"))
        .header("authorization", "Bearer secret-token")
        .header("accept", "application/json")
        .header("x-api-version", "2024-01-01")
        .header("content-type", "application/json")
        .header("if-none-match", "*")
        .header("idempotency-key", "client-key-1")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .post(proxy.url("/v1/sessions/s1/entries"))
        .header("authorization", "Bearer other-token")
        .header("content-type", "application/json")
        .body(r#"{"uuid":"e-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let gets = upstream.requests.with_method(Method::GET);
    assert_eq!(gets.len(), 2);
    let (put_read, post_read) = (&gets[0], &gets[1]);
    assert_eq!(
        put_read.header("authorization"),
        Some("Bearer secret-token")
    );
    assert_eq!(put_read.header("accept"), Some("application/json"));
    assert_eq!(put_read.header("x-api-version"), Some("2024-01-01"));
    assert_eq!(
        post_read.header("authorization"),
        Some("Bearer other-token")
    );
    for read in [put_read, post_read] {
        for absent in [
            "content-type",
            "content-length",
            "transfer-encoding",
            "if-none-match",
            "idempotency-key",
        ] {
            assert_eq!(read.header(absent), None, "{absent} on {}", read.uri);
        }
        assert_eq!(read.body.as_deref(), Some(&b""[..]));
    }
    // The writes themselves did carry their keys.
    let posts = upstream.requests.with_method(Method::POST);
    assert!(posts[0].header("idempotency-key").is_some());
    let puts = upstream.requests.with_method(Method::PUT);
    assert_eq!(puts[0].header("idempotency-key"), Some("client-key-1"));
}

/// A minimal gzip encoder (one stored deflate block), enough for a backend
/// that compresses what it serves.
fn gzip(data: &[u8]) -> Vec<u8> {
    assert!(data.len() < 65_536);
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let len = data.len() as u16;
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&(!crc).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// A client that accepts gzip (as Python requests and Node fetch do by
/// default) in front of a backend that compresses its reads: the stored
/// document is still compared as JSON and the write is recovered.
#[tokio::test]
async fn verification_compares_the_document_even_when_the_client_accepts_gzip() {
    let store = Store::dropping_first_write();
    let backend = store.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let gzip_ok = req
            .headers()
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
        let act = match (req.method(), backend.get(req.uri().path())) {
            (&Method::GET, Some(doc)) if gzip_ok => {
                let mut resp = json_response(200, gzip(&doc));
                resp.headers_mut()
                    .insert("content-encoding", HeaderValue::from_static("gzip"));
                Act::Reply(resp)
            }
            _ => backend.handle(&req),
        };
        async move { act }
    })
    .await;
    let proxy = proxy_with(&upstream, POST_ENTRIES, &[]).await;
    let entry = r#"{"uuid":"e-9","text":"compressed elsewhere"}"#;
    let resp = client()
        .post(proxy.url("/v1/sessions/s1/entries"))
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, deflate")
        .body(entry)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    assert_eq!(resp.headers().get("content-encoding"), None);
    assert_eq!(resp.bytes().await.unwrap(), entry.as_bytes());
    assert_eq!(store.len(), 1);
    // The write itself still carried what the client accepts.
    let posts = upstream.requests.with_method(Method::POST);
    assert_eq!(posts[0].header("accept-encoding"), Some("gzip, deflate"));
}

// ---------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------

/// A POST without a key reaches the upstream with a fresh UUID key; a GET
/// gets none; two POSTs get different keys.
#[tokio::test]
async fn post_gets_an_idempotency_key_and_get_does_not() {
    let upstream = Upstream::scripted(|_req, _n| async { Act::Reply(response(201, "ok")) }).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    for _ in 0..2 {
        let resp = client()
            .post(proxy.url("/v1/things"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    client().get(proxy.url("/v1/things")).send().await.unwrap();
    let seen = upstream.requests.all();
    let keys: Vec<&str> = seen[..2]
        .iter()
        .map(|r| r.header("idempotency-key").expect("a key on POST"))
        .collect();
    for key in &keys {
        assert!(uuid::Uuid::parse_str(key).is_ok(), "{key}");
    }
    assert_ne!(keys[0], keys[1]);
    assert_eq!(seen[2].method, Method::GET);
    assert_eq!(seen[2].header("idempotency-key"), None);
}

/// A key the client sent reaches the upstream unchanged, and only once.
#[tokio::test]
async fn client_idempotency_key_is_preserved() {
    let upstream = Upstream::scripted(|_req, _n| async { Act::Reply(response(201, "ok")) }).await;
    let proxy = TestProxy::start(&upstream.url(), &[]).await;
    client()
        .post(proxy.url("/v1/things"))
        .header("Idempotency-Key", "my-own key/1")
        .body("{}")
        .send()
        .await
        .unwrap();
    let seen = upstream.requests.all();
    assert_eq!(seen[0].header_all("idempotency-key"), ["my-own key/1"]);
}

/// On a 503, 503, 201 script every attempt carries the same made key.
#[tokio::test]
async fn idempotency_key_is_identical_across_attempts() {
    let n = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::scripted(move |_req, _n| {
        let status = if n.fetch_add(1, Ordering::SeqCst) < 2 {
            503
        } else {
            201
        };
        async move { Act::Reply(response(status, "")) }
    })
    .await;
    let proxy = TestProxy::start(&upstream.url(), &FAST).await;
    let resp = client()
        .post(proxy.url("/v1/things"))
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-idemproxy-attempts"], "3");
    let seen = upstream.requests.all();
    assert_eq!(seen.len(), 3);
    let keys: Vec<Vec<&str>> = seen
        .iter()
        .map(|r| r.header_all("idempotency-key"))
        .collect();
    assert_eq!(keys[0].len(), 1);
    assert_eq!(keys[0], keys[1]);
    assert_eq!(keys[0], keys[2]);
}

/// With `--idempotency-key-mode fingerprint`, two identical client requests
/// carry the same key; another body or path carries another.
#[tokio::test]
async fn fingerprint_keys_are_stable_across_identical_requests() {
    let upstream = Upstream::scripted(|_req, _n| async { Act::Reply(response(201, "ok")) }).await;
    let proxy = TestProxy::start(&upstream.url(), &["--idempotency-key-mode", "fingerprint"]).await;
    for (path, body) in [
        ("/v1/sessions/s1/entries", r#"{"uuid":"a"}"#),
        ("/v1/sessions/s1/entries", r#"{"uuid":"a"}"#),
        ("/v1/sessions/s1/entries", r#"{"uuid":"b"}"#),
        ("/v1/sessions/s2/entries", r#"{"uuid":"a"}"#),
    ] {
        let resp = client()
            .post(proxy.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let seen = upstream.requests.all();
    let keys: Vec<&str> = seen
        .iter()
        .map(|r| r.header("idempotency-key").expect("a key"))
        .collect();
    assert_eq!(keys[0], keys[1]);
    assert_ne!(keys[0], keys[2]);
    assert_ne!(keys[0], keys[3]);
    assert_ne!(keys[2], keys[3]);
    // The body still arrives unchanged.
    assert_eq!(seen[0].body.as_deref(), Some(&br#"{"uuid":"a"}"#[..]));
}

/// `--idempotency-header X-Idem-Key` names the header; `idempotency-key=off`
/// and `=on` on a route override the methods; the verification read of a
/// keyed PUT does not carry the custom header either.
#[tokio::test]
async fn key_header_name_and_route_options_are_honoured() {
    let store = Store::default();
    store.insert("/db/d1", r#"{"a":1}"#);
    let backend = store.clone();
    let upstream = Upstream::scripted(move |req, _n| {
        let act = match req.uri().path() {
            "/v1/raw" | "/v1/other" => Act::Reply(response(201, "ok")),
            _ => backend.handle(&req),
        };
        async move { act }
    })
    .await;
    let proxy = proxy_with(
        &upstream,
        "POST /v1/raw idempotency-key=off\nPUT /db/{doc} idempotency-key=on verify=same",
        &["--idempotency-header", "X-Idem-Key"],
    )
    .await;
    for path in ["/v1/raw", "/v1/other"] {
        let resp = client()
            .post(proxy.url(path))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let resp = put_doc(&proxy, "d1", r#"{"a":1}"#).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    let seen = upstream.requests.all();
    let keyed: Vec<(String, bool)> = seen
        .iter()
        .map(|r| {
            (
                format!("{} {}", r.method, r.uri),
                r.header("x-idem-key").is_some(),
            )
        })
        .collect();
    assert_eq!(
        keyed,
        [
            ("POST /v1/raw".to_owned(), false),
            ("POST /v1/other".to_owned(), true),
            ("PUT /db/d1".to_owned(), true),
            ("GET /db/d1".to_owned(), false),
        ]
    );
    assert!(seen.iter().all(|r| r.header("idempotency-key").is_none()));
}

/// An h2c client's write stored then dropped is recovered like an HTTP/1.1 one.
#[tokio::test]
async fn h2c_client_write_is_recovered() {
    let store = Store::dropping_first_write();
    let upstream = store.serve().await;
    let proxy = proxy_with(&upstream, POST_ENTRIES, &[]).await;
    let entry = r#"{"uuid":"e-h2","text":"over h2c"}"#;
    let resp = h2c_client()
        .post(proxy.url("/v1/sessions/s1/entries"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer h2")
        .body(entry)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(recovered(&resp), Some("409"));
    assert_eq!(resp.bytes().await.unwrap(), entry.as_bytes());
    assert_eq!(store.len(), 1);
    let gets = upstream.requests.with_method(Method::GET);
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].uri, "/v1/sessions/s1/entries/e-h2");
    assert_eq!(gets[0].header("authorization"), Some("Bearer h2"));
}
