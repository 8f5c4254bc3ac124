//! Micro-benchmarks of the per-request hot path: route matching, header
//! rewriting, the replay copy of a request body, idempotency keys (random and
//! fingerprint), and a new answer stored in the idempotency cache when it is
//! empty and when it is at its cap of 50,000 entries.
//!
//! ```text
//! cargo bench --bench hot_path                  # all
//! cargo bench --bench hot_path -- route         # one group (a filter)
//! cargo bench --bench hot_path -- --quick       # shorter, rougher
//! ```
//!
//! Each benchmark builds its inputs once (a realistic route table, a client
//! request head of 10 headers, a 1 KiB JSON body) and measures only the step
//! itself. Bodies are polled with `now_or_never`: a full body is always ready,
//! so no runtime is involved.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};
use http_body_util::BodyExt;
use idemproxy::body::{self, Body};
use idemproxy::buffered::BufferedBody;
use idemproxy::extensions::SessionId;
use idemproxy::idempotency::{
    CacheConfig, CacheMetrics, IdempotencyCacheLayer, IdempotencyKeyLayer, KeyConfig, KeyMode,
};
use idemproxy::proxy::headers::{add_forwarded, ip_value, strip_hop_by_hop};
use idemproxy::retry::replay::{ReplayBody, ReplayMemory};
use idemproxy::routes::{RouteRequest, RouteTable};
use tower::{Layer, Service};

/// A route table like a real deployment's: the DESIGN example plus a few more,
/// so a request that matches the last route walks all of them.
const ROUTES: &str = "\
PUT    /db/{doc}                          verify=same match=json-subset
GET    /v1/sessions/{sid}/await           session=path:sid timeout=10m retry=off
DELETE /v1/sessions/{sid}                 session=path:sid session-end
GET    /v1/sessions/{sid}/entries/{eid}   session=path:sid
PATCH  /v1/sessions/{sid}/entries/{eid}   session=path:sid verify=same
POST   /v1/sessions                       session=response-json:id
GET    /v1/sessions/{sid}/state           session=path:sid
POST   /v1/sessions/{sid}/entries         session=path:sid verify=GET:/v1/sessions/{sid}/entries/{body.uuid}
";

/// A 1 KiB JSON document, as the load benchmark's POST sends.
fn json_1k() -> Bytes {
    let mut text = String::from(r#"{"uuid":"2f1c8a54-5d0e-4b7e-9a51-6f0f0c4b1d2e","text":""#);
    while text.len() < 1024 - 2 {
        text.push('x');
    }
    text.push_str("\"}");
    Bytes::from(text)
}

/// The head of a typical client request, as it arrives at the edge.
fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7480"));
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static("agent-sdk/1.4.2 python/3.12"),
    );
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1024"));
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl"),
    );
    h.insert(
        "mcp-session-id",
        HeaderValue::from_static("bench-session-1"),
    );
    h.insert(
        "x-request-id",
        HeaderValue::from_static("5b1e0e8c-3f7c-4a4e-8d2a-0c9d1f2e3a4b"),
    );
    h.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
    h
}

fn route_matching(c: &mut Criterion) {
    let table = RouteTable::parse(ROUTES).expect("the bench route table parses");
    let mut g = c.benchmark_group("route");
    g.bench_function("classify/last_of_8", |b| {
        b.iter(|| {
            table
                .route_match(&RouteRequest::new(
                    black_box(&Method::POST),
                    black_box("/v1/sessions/bench-1/entries"),
                ))
                .map(|m| m.index)
        })
    });
    g.bench_function("classify/first_of_8", |b| {
        b.iter(|| {
            table
                .route_match(&RouteRequest::new(
                    black_box(&Method::PUT),
                    black_box("/db/doc-42"),
                ))
                .map(|m| m.index)
        })
    });
    g.bench_function("classify/miss", |b| {
        b.iter(|| {
            table
                .route_match(&RouteRequest::new(
                    black_box(&Method::GET),
                    black_box("/healthz/other/path"),
                ))
                .map(|m| m.index)
        })
    });
    let empty = RouteTable::default();
    g.bench_function("classify/empty_table", |b| {
        b.iter(|| {
            empty
                .route_match(&RouteRequest::new(
                    black_box(&Method::GET),
                    black_box("/v1/sessions/bench-1/state"),
                ))
                .is_some()
        })
    });
    g.finish();
}

fn header_rewriting(c: &mut Criterion) {
    let headers = client_headers();
    let client = &ip_value(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let host = HeaderValue::from_static("127.0.0.1:7480");
    let mut g = c.benchmark_group("headers");
    g.bench_function("clone_only (baseline)", |b| {
        b.iter_batched(|| headers.clone(), black_box, BatchSize::SmallInput)
    });
    g.bench_function("strip_hop_by_hop", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h, false);
                h
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("add_forwarded", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                add_forwarded(&mut h, client, Some(host.clone()));
                h
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("strip_hop_by_hop+add_forwarded", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h, false);
                add_forwarded(&mut h, client, Some(host.clone()));
                h
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Reads a body that is always ready to the end; returns its length.
fn drain(
    mut body: impl http_body::Body<Data = Bytes, Error = idemproxy::BoxError> + Unpin,
) -> usize {
    let mut n = 0;
    while let Some(Some(frame)) = body.frame().now_or_never() {
        let frame = frame.expect("a full body does not fail");
        if let Some(data) = frame.data_ref() {
            n += data.len();
        }
    }
    n
}

fn replay_copy(c: &mut Criterion) {
    let payload = json_1k();
    let memory = Arc::new(ReplayMemory::new(64 << 20));
    let mut g = c.benchmark_group("replay");
    g.bench_function("stream_only_1KiB (baseline)", |b| {
        b.iter(|| drain(body::full(payload.clone())))
    });
    g.bench_function("first_attempt_with_copy_1KiB", |b| {
        b.iter(|| {
            let (first, replay) =
                ReplayBody::new(body::full(payload.clone()), 1 << 20, memory.clone());
            let n = drain(first);
            // The retry layer drops the handle once the response head is decided.
            drop(replay);
            n
        })
    });
    g.bench_function("first_attempt_boxed+check_1KiB", |b| {
        b.iter(|| {
            let (first, replay) =
                ReplayBody::new(body::full(payload.clone()), 1 << 20, memory.clone());
            let boxed: Body = body::boxed(first);
            let n = drain(boxed);
            let ok = replay.check().is_ok();
            (n, ok)
        })
    });
    g.bench_function("first+retry_1KiB", |b| {
        b.iter(|| {
            let (first, replay) =
                ReplayBody::new(body::full(payload.clone()), 1 << 20, memory.clone());
            let n = drain(first);
            n + drain(replay.body())
        })
    });
    g.finish();
}

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("key");
    g.bench_function("uuid_v4_hyphenated", |b| {
        b.iter(|| {
            let mut buf = uuid::Uuid::encode_buffer();
            let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(text).map(|v| v.len()).unwrap_or(0)
        })
    });

    let passthrough =
        tower::service_fn(
            |req: Request<()>| async move { Ok::<_, Infallible>(req.headers().len()) },
        );
    let mut random = IdempotencyKeyLayer::new(KeyConfig::default()).layer(passthrough);
    g.bench_function("layer/random_post", |b| {
        b.iter_batched(
            || {
                Request::post("/v1/sessions/bench-1/entries")
                    .body(())
                    .expect("request")
            },
            |req| random.call(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("layer/get_no_key", |b| {
        b.iter_batched(
            || {
                Request::get("/v1/sessions/bench-1/state")
                    .body(())
                    .expect("request")
            },
            |req| random.call(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("layer/client_key_kept", |b| {
        b.iter_batched(
            || {
                Request::post("/v1/sessions/bench-1/entries")
                    .header("idempotency-key", "client-key-1")
                    .body(())
                    .expect("request")
            },
            |req| random.call(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });

    let mut fingerprint = IdempotencyKeyLayer::new(KeyConfig {
        mode: KeyMode::Fingerprint,
        ..KeyConfig::default()
    })
    .layer(passthrough);
    let buffered = BufferedBody::new(json_1k());
    let session = SessionId(Arc::from("bench-session-1"));
    g.bench_function("layer/fingerprint_post_1KiB", |b| {
        b.iter_batched(
            || {
                let mut req = Request::post("/v1/sessions/bench-1/entries")
                    .body(())
                    .expect("request");
                req.extensions_mut().insert(buffered.clone());
                req.extensions_mut().insert(session.clone());
                req
            },
            |req| fingerprint.call(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// One client-keyed request through the cache layer over an upstream that
/// answers at once, the answer drained so that it is stored.
fn cached_exchange<S>(svc: &mut S, n: u64) -> usize
where
    S: Service<Request<Body>, Response = http::Response<Body>>,
{
    let mut req = Request::post("/v1/sessions/bench-1/entries")
        .header("idempotency-key", n.to_string())
        .header(header::AUTHORIZATION, "Bearer bench")
        .body(body::full("{}"))
        .expect("request");
    req.extensions_mut()
        .insert(BufferedBody::new(Bytes::from_static(b"{}")));
    let Some(Ok(resp)) = svc.call(req).now_or_never() else {
        return 0;
    };
    drain(resp.into_body())
}

fn idempotency_cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("idempotency_cache");
    let upstream = tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, idemproxy::error::ProxyError>(http::Response::new(body::full("stored")))
    });
    for (name, prefill, max_entries) in [("insert_empty", 0, 1), ("insert_at_50k", 50_000, 50_000)]
    {
        let config = CacheConfig {
            max_entries,
            ..CacheConfig::default()
        };
        let mut svc = IdempotencyCacheLayer::new(config, CacheMetrics::default()).layer(upstream);
        let mut n = 0;
        for _ in 0..prefill {
            n += 1;
            cached_exchange(&mut svc, n);
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                cached_exchange(&mut svc, n)
            })
        });
    }
    g.finish();
}

criterion_group!(
    hot_path,
    route_matching,
    header_rewriting,
    replay_copy,
    keys,
    idempotency_cache
);
criterion_main!(hot_path);
