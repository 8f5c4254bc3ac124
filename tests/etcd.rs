//! idemproxy with `--profile etcd` in front of a real etcd 3.4 (its v3 JSON
//! gateway), started by the test on its own 127.0.0.1 ports and killed by
//! PID at the end. The proxy is set up as a user would set it up: the
//! profile and nothing else (README, "Backend profiles", `etcd`).
//!
//! etcd leases are the case where ordinary calls do not extend a session: a
//! `put` under a lease never renews it, only `lease/keepalive` does. So a
//! busy client must keep its lease as surely as a silent one, which only
//! holds if the proxy's heartbeats are paced from the last renewal, not from
//! the last request. A pass-through [`FaultProxy`] between idemproxy and etcd
//! counts the keepalives that really reach etcd (the wire tap), and in the
//! last test drops answers after etcd handled the request.
//!
//! The heartbeat interval is never set here: the profile learns it from the
//! grant's `TTL` (`lease-ttl=response-json:TTL`, a third of it). The
//! issue's 20 s runs are scaled to 12 s with a 5 s TTL: more than two TTLs,
//! so a lease that is not renewed is surely gone by the end.
//!
//! Each test prints one summary line to stderr (past libtest's capture):
//! `profile etcd: writes=N faults=F lost=L duplicated=D client_errors=E
//! heartbeats_per_session_minute=X.X workload=...`, see [`Summary`].
//!
//! Run with `tools/test` (installs etcd); plain `cargo test` skips these
//! loudly when etcd is missing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};
use testkit::fault_proxy::{DropAfter, FaultPlan, FaultProxy, Pick};
use testkit::real_servers::{Etcd, base64, json_i64, post_json, post_json_with_headers};
use testkit::{Summary, TestProxy, admin_sessions, metric_sum, within};

/// Lease TTL, seconds.
const TTL: i64 = 5;
/// The heartbeat interval the profile learns from a grant of [`TTL`]: a third of it.
const INTERVAL: Duration = Duration::from_millis(TTL as u64 * 1000 / 3);
/// How long the busy and silent clients run.
const RUN: Duration = Duration::from_secs(12);
/// The request line of the heartbeat (and of a client's own keepalive).
const KEEPALIVE: &str = "POST /v3/lease/keepalive ";

/// etcd, a wire tap (or fault proxy) in front of it, and idemproxy with
/// `--profile etcd` in front of the tap.
struct Setup {
    etcd: Etcd,
    tap: FaultProxy,
    proxy: TestProxy,
    /// When the proxy started: the start of the summary's duration.
    started: Instant,
}

impl Setup {
    async fn start(plan: FaultPlan) -> Option<Setup> {
        let etcd = Etcd::start().await?;
        let tap = FaultProxy::start(&etcd.url(), plan).await;
        let proxy = TestProxy::start(&tap.url(), &["--profile", "etcd"]).await;
        Some(Setup {
            etcd,
            tap,
            proxy,
            started: Instant::now(),
        })
    }

    /// `POST path` through the proxy.
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post_json(&self.proxy.url(path), body).await
    }

    /// Grants a lease of [`TTL`] through the proxy; returns its id (a decimal string).
    async fn grant(&self) -> String {
        self.grant_ttl(TTL).await
    }

    /// Grants a lease of `ttl` seconds through the proxy; returns its id.
    async fn grant_ttl(&self, ttl: i64) -> String {
        let (status, doc) = self.post("/v3/lease/grant", &json!({"TTL": ttl})).await;
        assert_eq!(status, 200, "lease/grant: {doc}");
        let id = doc["ID"].as_str().expect("grant answers ID as a string");
        assert_eq!(json_i64(&doc["TTL"]), Some(ttl), "{doc}");
        id.to_owned()
    }

    /// Puts `key` under lease `id` through the proxy.
    async fn put(&self, key: &str, id: &str) -> (u16, Value) {
        let body = json!({
            "key": base64(key.as_bytes()),
            "value": base64(b"v"),
            "lease": id,
        });
        self.post("/v3/kv/put", &body).await
    }

    /// Keepalives that reached etcd so far.
    fn keepalives(&self) -> usize {
        self.tap.count_lines(KEEPALIVE)
    }

    /// `idemproxy_heartbeats_total`, all outcomes.
    async fn heartbeats(&self) -> f64 {
        metric_sum(&self.proxy.metrics().await, "idemproxy_heartbeats_total")
    }

    /// etcd's current revision, asked straight from etcd.
    async fn revision(&self) -> i64 {
        let (status, doc) = self
            .etcd
            .post("/v3/kv/range", &json!({"key": base64(b"\0")}))
            .await;
        assert_eq!(status, 200, "kv/range: {doc}");
        json_i64(&doc["header"]["revision"]).unwrap_or_else(|| panic!("no revision: {doc}"))
    }

    /// The keys under `prefix` (base64, as etcd writes them) with their
    /// `version` (how often each was written), straight from etcd.
    async fn stored(&self, prefix: &str) -> Vec<(String, i64)> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let (status, doc) = self
            .etcd
            .post(
                "/v3/kv/range",
                &json!({"key": base64(prefix.as_bytes()), "range_end": base64(&end)}),
            )
            .await;
        assert_eq!(status, 200, "kv/range: {doc}");
        doc["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        let key = kv["key"].as_str().expect("key").to_owned();
                        (key, json_i64(&kv["version"]).expect("version"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A summary of this workload, to fill in and print: `writes` are puts,
    /// `faults` answers dropped after etcd handled the request, `lost` puts
    /// answered 200 whose key etcd does not hold, `duplicated` writes etcd
    /// applied more than once (a key's `version` over 1, or the revision
    /// advancing by more than the writes); heartbeats are keepalives.
    fn summary(&self, workload: &'static str) -> Summary {
        Summary::new("etcd", workload, self.started)
    }
}

/// A plan that drops the answer of the first request whose request line
/// starts with each of `prefixes` (once each), as soon as etcd starts
/// answering: etcd's gateway answers after the request was applied.
fn drop_first_of_each(prefixes: &'static [&'static str]) -> FaultPlan {
    let taken: Vec<AtomicBool> = prefixes.iter().map(|_| AtomicBool::new(false)).collect();
    FaultPlan {
        matches: Box::new(move |req| {
            prefixes.iter().zip(&taken).any(|(prefix, taken)| {
                req.request_line().starts_with(prefix) && !taken.swap(true, Ordering::SeqCst)
            })
        }),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    }
}

/// `POST url` with a JSON body: status, `x-idemproxy-attempts`, body.
async fn post_with_attempts(url: &str, body: &Value) -> (u16, Option<String>, Value) {
    let (status, headers, doc) = post_json_with_headers(url, body).await;
    let attempts = headers
        .get("x-idemproxy-attempts")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, attempts, doc)
}

/// Busy client, a put under the lease every second for 12 s (TTL 5 s): every put succeeds and the lease survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_client_keeps_its_lease() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mut summary = s.summary("busy-client");
    let id = s.grant().await;
    let started = Instant::now();
    let mut puts = 0;
    let mut first_error = None;
    let mut acked = Vec::new();
    while started.elapsed() < RUN {
        let key = format!("busy/{puts}");
        let (status, doc) = s.put(&key, &id).await;
        if status == 200 {
            acked.push(base64(key.as_bytes()));
        } else {
            summary.client_errors += 1;
            first_error.get_or_insert_with(|| {
                format!(
                    "put {puts}: {status}, {:.1} s after the grant (TTL {TTL} s), {} keepalive(s) \
                     reached etcd: {doc} (404 'requested lease not found' means the lease \
                     expired: puts do not renew it)",
                    started.elapsed().as_secs_f64(),
                    s.keepalives()
                )
            });
        }
        puts += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stored = s.stored("busy/").await;
    summary.sessions = 1;
    summary.writes = puts;
    summary.lost = acked
        .iter()
        .filter(|k| !stored.iter().any(|(key, _)| key == *k))
        .count();
    summary.duplicated = stored.iter().filter(|(_, version)| *version > 1).count();
    summary.print(s.keepalives());

    assert_eq!(first_error, None, "a put failed");
    assert!(puts >= 10, "only {puts} puts in {RUN:?}");
    assert_eq!((summary.lost, summary.duplicated), (0, 0), "{stored:?}");

    let ttl = s.etcd.lease_ttl(&id).await;
    assert!(ttl > 0, "lease gone after a busy {RUN:?}: TTL {ttl}");
    let keepalives = s.keepalives();
    assert!(
        keepalives >= 4,
        "{keepalives} keepalives reached etcd in {RUN:?} at a {INTERVAL:?} interval"
    );
    // The keys really are attached to the lease the proxy keeps alive.
    let (status, doc) = s
        .etcd
        .post("/v3/kv/range", &json!({"key": base64(b"busy/0")}))
        .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["kvs"][0]["lease"].as_str(), Some(id.as_str()), "{doc}");
    // Grant and puts name the same session: the id has one spelling.
    let sessions = admin_sessions(&s.proxy).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
}

/// Silent client, no request for 12 s after the grant (TTL 5 s): the lease survives on keepalives alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_keeps_its_lease() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mut summary = s.summary("silent-client");
    let id = s.grant().await;
    tokio::time::sleep(RUN).await;

    let ttl = s.etcd.lease_ttl(&id).await;
    let keepalives = s.keepalives();
    let (status, doc) = s.put("silent/after", &id).await;
    summary.sessions = 1;
    summary.writes = 1;
    summary.client_errors = usize::from(status != 200);
    let stored = s.stored("silent/").await;
    summary.lost = usize::from(status == 200 && stored.is_empty());
    summary.duplicated = stored.iter().filter(|(_, version)| *version > 1).count();
    summary.print(keepalives);

    assert!(
        ttl > 0,
        "lease gone after a silent {RUN:?}: TTL {ttl}, {keepalives} keepalive(s) reached etcd"
    );
    assert!(
        keepalives >= 5,
        "{keepalives} keepalives reached etcd in {RUN:?} at a {INTERVAL:?} interval"
    );
    assert!(s.heartbeats().await >= 5.0);
    assert_eq!(status, 200, "a put after the silence: {doc}");
    assert_eq!((summary.lost, summary.duplicated), (0, 0), "{stored:?}");
}

/// Revoke through the proxy: the session is no longer tracked and no keepalive follows (counted or on the wire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_through_the_proxy_stops_keepalives() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mut summary = s.summary("revoke");
    let id = s.grant().await;
    within("a first keepalive to reach etcd", async {
        while s.keepalives() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(admin_sessions(&s.proxy).await.len(), 1);

    let (status, doc) = s.post("/v3/lease/revoke", &json!({"ID": id})).await;
    assert_eq!(status, 200, "lease/revoke: {doc}");
    assert_eq!(
        s.etcd.lease_ttl(&id).await,
        -1,
        "revoked lease still exists"
    );
    // Let a heartbeat that was already on its way land before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (wire, counted) = (s.keepalives(), s.heartbeats().await);

    tokio::time::sleep(INTERVAL * 3).await;
    summary.sessions = 1;
    summary.print(s.keepalives());
    assert_eq!(
        s.keepalives(),
        wire,
        "keepalives reached etcd after the revoke"
    );
    assert_eq!(s.heartbeats().await, counted, "heartbeats after the revoke");
    let sessions = admin_sessions(&s.proxy).await;
    assert!(sessions.is_empty(), "still tracked: {sessions:?}");
    let ended = testkit::metric_value(
        &s.proxy.metrics().await,
        r#"idemproxy_sessions_ended_total{reason="client_end"}"#,
    );
    assert_eq!(ended, Some(1.0), "ended by the client's revoke");
}

/// No `--heartbeat-interval`: a lease granted with TTL 3 gets a keepalive about every second (TTL/3 ±10%), and outlives 2×TTL of client silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interval_is_learned_from_the_grant() {
    const SHORT_TTL: i64 = 3;
    /// The window the keepalives are counted in.
    const WINDOW: Duration = Duration::from_secs(5);
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mut summary = s.summary("learned-interval");
    let id = s.grant_ttl(SHORT_TTL).await;
    let granted = Instant::now();
    // When each keepalive reached the tap, polled every 10 ms.
    let mut seen = Vec::new();
    while granted.elapsed() < WINDOW {
        while seen.len() < s.keepalives() {
            seen.push(granted.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_window = s.keepalives();
    // The rest of 2×TTL (and a little) without a request of the client.
    tokio::time::sleep(
        (Duration::from_secs(2 * SHORT_TTL as u64) + Duration::from_millis(300))
            .saturating_sub(granted.elapsed()),
    )
    .await;
    let silence = granted.elapsed();
    let ttl = s.etcd.lease_ttl(&id).await;
    summary.sessions = 1;
    summary.print(s.keepalives());

    let at: Vec<String> = seen
        .iter()
        .map(|t| format!("{:.2}", t.as_secs_f64()))
        .collect();
    assert!(
        (4..=6).contains(&in_window),
        "{in_window} keepalives in the {WINDOW:?} after a grant of TTL {SHORT_TTL} s \
         (expected one about every {SHORT_TTL}/3 s), at {at:?} s"
    );
    // Each keepalive about a second after the one before (±10% jitter, the
    // poll and the round trip).
    let gaps: Vec<f64> = seen
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    assert!(
        gaps.iter().all(|gap| (0.7..=1.4).contains(gap)),
        "keepalives at {at:?} s after the grant: gaps {gaps:?}"
    );
    assert!(
        ttl > 0,
        "lease gone {silence:?} after a grant of TTL {SHORT_TTL} s: TTL {ttl}, keepalives at {at:?} s"
    );
    // Each keepalive renewed the lease to the full TTL.
    assert!(
        ttl >= SHORT_TTL - 2,
        "{ttl} s left {silence:?} after the grant, keepalives at {at:?} s"
    );
    let sessions = admin_sessions(&s.proxy).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
}

/// A put whose answer is dropped after etcd stored it is not replayed (502 `may_have_been_processed: true`, the revision advanced by one); a dropped range is replayed (200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_put_is_not_replayed_and_a_dropped_range_is() {
    const PUT: &str = "POST /v3/kv/put ";
    const RANGE: &str = "POST /v3/kv/range ";
    let Some(s) = Setup::start(drop_first_of_each(&[PUT, RANGE])).await else {
        return;
    };
    let mut summary = s.summary("dropped-answers");
    let key = base64(b"dropped/put");
    let value = base64(b"stored once");
    let before = s.revision().await;

    let (put_status, put_attempts, put_doc) = post_with_attempts(
        &s.proxy.url("/v3/kv/put"),
        &json!({"key": key, "value": value}),
    )
    .await;
    let after = s.revision().await;
    let (range_status, range_attempts, range_doc) =
        post_with_attempts(&s.proxy.url("/v3/kv/range"), &json!({"key": key})).await;
    let stored = s.stored("dropped/").await;
    let dropped = s.tap.dropped();
    summary.writes = 1;
    summary.faults = dropped.len();
    // The one write applied more than once: a second revision, or a second version of its key.
    summary.duplicated = usize::from(after - before > 1 || stored.iter().any(|(_, v)| *v > 1));
    summary.client_errors =
        usize::from(!(put_status == 502 || put_status == 200)) + usize::from(range_status != 200);
    summary.print(s.keepalives());

    assert_eq!(put_status, 502, "a put whose answer was lost: {put_doc}");
    assert_eq!(
        put_doc["may_have_been_processed"], true,
        "the 502 must say that the put may have been applied: {put_doc}"
    );
    assert_eq!(put_doc["attempts"], 1, "{put_doc}");
    assert_eq!(put_attempts, None, "one attempt");
    assert_eq!(
        after,
        before + 1,
        "etcd's revision must advance by exactly one (the put ran once)"
    );
    assert_eq!(s.tap.count_lines(PUT), 1, "the put reached etcd once");
    assert_eq!(stored, vec![(key.clone(), 1)], "stored once: {stored:?}");

    assert_eq!(
        range_status, 200,
        "a range whose answer was lost: {range_doc}"
    );
    assert_eq!(range_attempts.as_deref(), Some("2"), "{range_doc}");
    assert_eq!(range_doc["kvs"][0]["key"], key.as_str(), "{range_doc}");
    assert_eq!(range_doc["kvs"][0]["value"], value.as_str(), "{range_doc}");
    assert_eq!(s.tap.count_lines(RANGE), 2, "the range and its replay");
    assert_eq!(s.revision().await, after, "the range changed nothing");

    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(
        dropped.iter().all(|d| d.answered),
        "etcd answered both: {dropped:?}"
    );
    let refused = metric_sum(&s.proxy.metrics().await, "idemproxy_retries_refused_total");
    assert_eq!(refused, 1.0, "the put's replay refused as unsafe");
}
