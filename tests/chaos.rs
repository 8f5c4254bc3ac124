//! Chaos: many concurrent appends through the proxy to the example session
//! backend while it injects 503s, store-then-drop and resets. Retries, the
//! idempotency keys and verified 409 recovery together must store every entry
//! exactly once and show the client nothing but success, within the retry
//! budget.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use testkit::backend::{Backend, Options};
use testkit::*;
use tokio::net::TcpListener;

/// Appends sent by the client.
const APPENDS: usize = 1000;
/// Appends in flight at once.
const CONCURRENCY: usize = 32;
/// `--retry-budget-ratio`.
const BUDGET_RATIO: f64 = 0.2;
/// `--retry-budget-min-per-sec`: generous, so the budget is not what fails a request.
const BUDGET_MIN_PER_SEC: f64 = 100.0;
/// The budget's window (`RetryBudget::WINDOW`).
const BUDGET_WINDOW_SECS: f64 = 10.0;

/// 1,000 appends, 32 at a time, through a backend that answers 20% of
/// writes 503, stores then drops 10% and resets 5%: every entry is stored
/// exactly once, the client sees only 2xx, and the upstream attempts stay
/// within the retry budget's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_under_faults_are_stored_exactly_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let backend = Backend::new(&Options {
        listen: backend_addr,
        fail_rate: 0.20,
        store_then_drop_rate: 0.10,
        reset_rate: 0.05,
        seed: Some(20_240_601),
        session_ttl: Duration::from_secs(600),
        ..Options::default()
    });
    let (stop_backend, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(backend.clone().serve(listener, async {
        let _ = stopped.await;
    }));

    let ratio = BUDGET_RATIO.to_string();
    let floor = BUDGET_MIN_PER_SEC.to_string();
    let proxy = TestProxy::start(
        &format!("http://{backend_addr}"),
        &[
            "--routes",
            "POST /v1/sessions/{sid}/entries verify=GET:/v1/sessions/{sid}/entries/{body.uuid}",
            "--backoff-base",
            "1ms",
            "--backoff-max",
            "5ms",
            // With 35% of write attempts faulted, 5 attempts would leave
            // 0.35^5 (about 1 in 200) requests failing; 16 leave 1 in 20 million.
            "--max-attempts",
            "16",
            "--retry-budget-ratio",
            &ratio,
            "--retry-budget-min-per-sec",
            &floor,
        ],
    )
    .await;
    let http = client();

    let created = http.post(proxy.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let sid = created.headers()["x-session-id"]
        .to_str()
        .unwrap()
        .to_owned();

    let started = Instant::now();
    let statuses: Vec<(usize, u16, bool)> = futures_util::stream::iter(0..APPENDS)
        .map(|i| {
            let (http, url) = (
                http.clone(),
                proxy.url(&format!("/v1/sessions/{sid}/entries")),
            );
            async move {
                let doc = serde_json::json!({
                    "uuid": format!("entry-{i:04}"),
                    "role": "assistant",
                    "text": format!("message number {i}"),
                    "seq": i,
                });
                let resp = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(doc.to_string())
                    .send()
                    .await
                    .unwrap();
                let recovered = resp.headers().contains_key("x-idemproxy-recovered");
                (i, resp.status().as_u16(), recovered)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let elapsed = started.elapsed();

    // The client saw only success.
    let failed: Vec<_> = statuses
        .iter()
        .filter(|(_, s, _)| !(200..300).contains(s))
        .collect();
    assert!(failed.is_empty(), "non-2xx answers: {failed:?}");
    let recovered = statuses.iter().filter(|(_, _, r)| *r).count();

    // The backend holds every entry exactly once.
    assert_eq!(backend.entry_count(&sid), APPENDS);
    let list = http
        .get(format!("http://{backend_addr}/v1/sessions/{sid}/entries"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list).unwrap();
    let uuids: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["uuid"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = uuids.iter().copied().collect();
    assert_eq!(uuids.len(), APPENDS);
    assert_eq!(unique.len(), APPENDS);
    for i in 0..APPENDS {
        assert!(
            unique.contains(format!("entry-{i:04}").as_str()),
            "entry {i}"
        );
    }

    // Every attempt the proxy counted reached the backend, and their number
    // stays within what the retry budget allows.
    let stats = backend.stats();
    let metrics = proxy.metrics().await;
    let retries = metric_sum(&metrics, "idemproxy_retries_total");
    let verified = metric_value(&metrics, "idemproxy_conflicts_recovered_total").unwrap_or(0.0);
    let passed = metric_sum(&metrics, "idemproxy_conflicts_passed_total");
    let exhausted = metric_value(&metrics, "idemproxy_retry_budget_exhausted_total").unwrap_or(0.0);
    // Requests the proxy sent on its own account: 1 session create, the
    // appends, and one verification read per 409.
    let originals = 1.0 + APPENDS as f64 + verified + passed;
    // The list read above went straight to the backend, and /stats is not counted yet.
    let upstream_requests = stats.requests as f64 - 1.0;
    eprintln!(
        "chaos: {APPENDS} appends in {elapsed:?}: backend saw {upstream_requests} requests \
         ({} fail, {} store-then-drop, {} reset injected, {} conflicts); proxy retried \
         {retries} times, recovered {verified} 409s ({recovered} seen by the client), \
         passed {passed}, budget exhausted {exhausted}",
        stats.faults.fail, stats.faults.store_then_drop, stats.faults.reset, stats.conflicts
    );
    assert_eq!(upstream_requests, originals + retries, "{metrics}");
    let windows = (elapsed.as_secs_f64() / BUDGET_WINDOW_SECS).ceil().max(1.0);
    let budget = BUDGET_RATIO * originals + BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS * windows;
    assert!(
        retries <= budget,
        "{retries} retries exceed the budget of {budget}"
    );
    assert_eq!(verified as usize, recovered);
    assert_eq!(passed, 0.0, "{metrics}");
    assert!(stats.faults.store_then_drop > 0 && recovered > 0);
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");

    let _ = stop_backend.send(());
    let _ = within("the backend to stop", server).await;
}
