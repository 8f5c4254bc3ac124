//! idemproxy in front of a real etcd 3.4 (its v3 JSON gateway), started by
//! the test on its own 127.0.0.1 ports and killed by PID at the end.
//!
//! etcd leases are the case where ordinary calls do not extend a session: a
//! `put` under a lease never renews it, only `lease/keepalive` does. So a
//! busy client must keep its lease as surely as a silent one, which only
//! holds if the proxy's heartbeats are paced from the last renewal, not from
//! the last request. A pass-through [`FaultProxy`] between idemproxy and etcd
//! counts the keepalives that really reach etcd.
//!
//! The issue's 20 s runs are scaled to 12 s with a 5 s TTL: more than two
//! TTLs, so a lease that is not renewed is surely gone by the end.
//!
//! Run with `tools/test` (installs etcd); plain `cargo test` skips these
//! loudly when etcd is missing.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::fault_proxy::{FaultPlan, FaultProxy};
use testkit::real_servers::{self, Etcd, base64, post_json};
use testkit::{TestProxy, admin_sessions, metric_sum, within};

/// Lease TTL, seconds.
const TTL: i64 = 5;
/// Heartbeat interval: about a third of the TTL.
const INTERVAL: Duration = Duration::from_millis(1600);
/// How long the busy and silent clients run.
const RUN: Duration = Duration::from_secs(12);

/// The etcd route table: a grant registers the lease (its id is in the
/// answer), a revoke ends it, a put under the lease is activity on it (and
/// does not renew it).
const ROUTES: &str = "POST /v3/lease/grant session=response-json:ID\n\
                      POST /v3/lease/revoke session=json:ID session-end\n\
                      POST /v3/kv/put session=json:lease";

/// etcd, a wire tap in front of it, and idemproxy in front of the tap.
struct Setup {
    etcd: Etcd,
    tap: FaultProxy,
    proxy: TestProxy,
}

impl Setup {
    async fn start() -> Option<Setup> {
        let etcd = Etcd::start().await?;
        let tap = FaultProxy::start(&etcd.url(), FaultPlan::none()).await;
        let interval = format!("{}ms", INTERVAL.as_millis());
        let proxy = TestProxy::start(
            &tap.url(),
            &[
                "--routes",
                ROUTES,
                "--heartbeat",
                "POST /v3/lease/keepalive",
                "--heartbeat-body",
                r#"{"ID":"{session}"}"#,
                "--heartbeat-alive-field",
                "result.TTL",
                "--heartbeat-interval",
                &interval,
            ],
        )
        .await;
        Some(Setup { etcd, tap, proxy })
    }

    /// `POST path` through the proxy.
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post_json(&self.proxy.url(path), body).await
    }

    /// Grants a lease through the proxy; returns its id (a decimal string).
    async fn grant(&self) -> String {
        let (status, doc) = self.post("/v3/lease/grant", &json!({"TTL": TTL})).await;
        assert_eq!(status, 200, "lease/grant: {doc}");
        let id = doc["ID"].as_str().expect("grant answers ID as a string");
        assert_eq!(real_servers::json_i64(&doc["TTL"]), Some(TTL), "{doc}");
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
        self.tap.count_lines("POST /v3/lease/keepalive ")
    }

    /// `idemproxy_heartbeats_total`, all outcomes.
    async fn heartbeats(&self) -> f64 {
        metric_sum(&self.proxy.metrics().await, "idemproxy_heartbeats_total")
    }
}

/// Busy client, a put under the lease every second for 12 s (TTL 5 s): every put succeeds and the lease survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_client_keeps_its_lease() {
    let Some(s) = Setup::start().await else {
        return;
    };
    let id = s.grant().await;
    let started = Instant::now();
    let mut puts = 0;
    while started.elapsed() < RUN {
        let (status, doc) = s.put(&format!("busy/{puts}"), &id).await;
        assert_eq!(
            status,
            200,
            "put {puts}, {:.1} s after the grant (TTL {TTL} s), {} keepalive(s) reached etcd: {doc} \
             (404 'requested lease not found' means the lease expired: puts do not renew it)",
            started.elapsed().as_secs_f64(),
            s.keepalives()
        );
        puts += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(puts >= 10, "only {puts} puts in {RUN:?}");

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
    let Some(s) = Setup::start().await else {
        return;
    };
    let id = s.grant().await;
    tokio::time::sleep(RUN).await;

    let ttl = s.etcd.lease_ttl(&id).await;
    assert!(
        ttl > 0,
        "lease gone after a silent {RUN:?}: TTL {ttl}, {} keepalive(s) reached etcd",
        s.keepalives()
    );
    let keepalives = s.keepalives();
    assert!(
        keepalives >= 5,
        "{keepalives} keepalives reached etcd in {RUN:?} at a {INTERVAL:?} interval"
    );
    assert!(s.heartbeats().await >= 5.0);
    let (status, doc) = s.put("silent/after", &id).await;
    assert_eq!(status, 200, "a put after the silence: {doc}");
}

/// Revoke through the proxy: the session is no longer tracked and no keepalive follows (counted or on the wire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_through_the_proxy_stops_keepalives() {
    let Some(s) = Setup::start().await else {
        return;
    };
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
