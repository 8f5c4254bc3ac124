//! Behaviour of the tracker and its scheduler, on a paused clock against a
//! scripted fake upstream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use super::heartbeat::has_field;
use super::*;
use crate::body::{self, Body};
use crate::error::ProxyError;

/// One request the fake upstream received.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the fake upstream answers one request.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Status(u16),
    Json(u16, &'static str),
    Hang,
    ConnectError,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A running scheduler against a fake upstream that records every request.
struct Harness {
    log: Log,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Harness {
    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Requests whose path mentions `id`.
    fn seen_for(&self, id: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.uri.contains(id))
            .collect()
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

/// Starts `tracker`'s scheduler against an upstream answering by `script`
/// (given the request and how many came before it).
fn start<F>(tracker: &SessionTracker, script: F) -> Harness
where
    F: Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
{
    let log = Log::default();
    let script = Arc::new(script);
    let upstream = {
        let log = Arc::clone(&log);
        tower::service_fn(move |req: Request<Body>| {
            let log = Arc::clone(&log);
            let script = Arc::clone(&script);
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let seen = Seen {
                    at: Instant::now(),
                    method: parts.method,
                    uri: parts.uri.to_string(),
                    headers: parts.headers,
                    body,
                };
                let reply = {
                    let mut log = log.lock().unwrap();
                    let reply = script(&seen, log.len());
                    log.push(seen);
                    reply
                };
                let (status, text) = match reply {
                    Reply::Status(code) => (code, ""),
                    Reply::Json(code, text) => (code, text),
                    Reply::Hang => std::future::pending().await,
                    Reply::ConnectError => {
                        return Err(ProxyError::Connect("connection refused".into()));
                    }
                };
                let mut resp = Response::new(body::full(text));
                *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok::<_, ProxyError>(resp)
            }
        })
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tracker.spawn_scheduler(upstream, async move {
        let _ = stopped.await;
    });
    Harness {
        log,
        stop: Some(stop),
        task,
    }
}

fn ok(_: &Seen, _: usize) -> Reply {
    Reply::Status(200)
}

/// A tracker with `interval` and `idle` in seconds, and a pace that never
/// gets in the way.
fn tracker(interval: u64, idle: u64) -> SessionTracker {
    tracker_with(SessionConfig {
        interval: Duration::from_secs(interval),
        idle_timeout: Duration::from_secs(idle),
        max_per_sec: 1000,
        ..SessionConfig::default()
    })
}

fn tracker_with(config: SessionConfig) -> SessionTracker {
    SessionTracker::new(config, SessionMetrics::unregistered())
}

fn heartbeat_for(id: &str) -> Arc<HeartbeatSpec> {
    let path = format!("/v1/sessions/{id}/heartbeat");
    Arc::new(
        HeartbeatSpec::new(Method::POST, path.parse().unwrap())
            .with_json_body(format!(r#"{{"ID":"{id}"}}"#)),
    )
}

/// A sighting of session `id` with bearer `token`, a cookie, and a header
/// that must not be copied.
fn reg(id: &str, token: &str) -> Registration {
    let mut credentials = HeaderMap::new();
    credentials.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    credentials.insert(header::COOKIE, "sid=abc".parse().unwrap());
    credentials.insert(header::CONTENT_LENGTH, "999".parse().unwrap());
    Registration {
        id: id.into(),
        source: "header:Mcp-Session-Id".into(),
        heartbeat: Some(heartbeat_for(id)),
        credentials,
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// An idle session gets one heartbeat per interval (±10%), carrying the
/// rendered path and body, the copied credentials and its own request id.
#[tokio::test(start_paused = true)]
async fn idle_session_gets_heartbeats_every_interval() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, ok);
    let t0 = Instant::now();
    assert_eq!(tracker.observe(reg("s-1", "tok-1")), Observed::New);

    sleep(secs(35.0)).await;
    let seen = up.seen();
    assert_eq!(seen.len(), 3, "beats at ~10s, ~20s, ~30s");
    let first = seen[0].at - t0;
    assert!(first >= secs(9.0) && first <= secs(11.0), "{first:?}");
    for beat in &seen {
        assert_eq!(beat.method, Method::POST);
        assert_eq!(beat.uri, "/v1/sessions/s-1/heartbeat");
        assert_eq!(beat.body, r#"{"ID":"s-1"}"#);
        assert_eq!(beat.header("authorization"), Some("Bearer tok-1"));
        assert_eq!(beat.header("cookie"), Some("sid=abc"));
        assert_eq!(beat.header("content-type"), Some("application/json"));
        assert_eq!(beat.header("content-length"), None, "not copied");
        assert!(beat.headers.get("authorization").unwrap().is_sensitive());
    }
    let ids: Vec<_> = seen.iter().map(|s| s.header("x-request-id")).collect();
    assert!(ids.iter().all(Option::is_some));
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2],
        "one request id per heartbeat"
    );
    assert_eq!(tracker.metrics().heartbeats(HeartbeatOutcome::Ok), 3);
    up.shutdown().await;
}

/// A busy client (a request every 2 s, interval 10 s) on a backend whose
/// calls do not renew the session: its heartbeats still go every interval,
/// and its activity keeps it in use past the idle timeout.
#[tokio::test(start_paused = true)]
async fn busy_traffic_never_postpones_heartbeats() {
    let tracker = tracker(10, 15);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));
    for _ in 0..30 {
        sleep(secs(2.0)).await;
        assert_eq!(tracker.observe(reg("s-1", "tok")), Observed::Refreshed);
        let guard = tracker.begin_request("s-1").unwrap();
        drop(guard);
    }
    // t = 60s: a heartbeat every 9-11 s since registration, traffic or not.
    let beats = up.seen_for("s-1");
    assert!((5..=6).contains(&beats.len()), "{} heartbeats", beats.len());
    assert!(beats[0].at.elapsed() >= secs(49.0), "first beat by 11s");
    assert_eq!(
        tracker.len(),
        1,
        "busy: never idle, though idle timeout is 15s"
    );
    let view = &tracker.snapshot()[0];
    assert_eq!(view.last_activity_secs_ago, 0);
    assert!(view.last_renewal_secs_ago <= 11, "{view:?}");

    // Abandoned: the idle timeout still ends it, and its heartbeats stop.
    sleep(secs(16.0)).await;
    assert_eq!(tracker.len(), 0, "idle for 16s > 15s");
    let after = up.count();
    sleep(secs(60.0)).await;
    assert_eq!(up.count(), after);
    up.shutdown().await;
}

/// A renewal (a request the backend counts as one) moves the next heartbeat
/// to an interval after it; plain activity does not.
#[tokio::test(start_paused = true)]
async fn renewals_push_the_next_heartbeat_back() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));
    sleep(secs(8.0)).await;
    assert!(tracker.renew("s-1"));
    assert!(!tracker.renew("unknown"));

    sleep(secs(8.5)).await; // t = 16.5s: due no earlier than 8s + 9s
    assert_eq!(up.count(), 0, "the renewal at 8s postponed the heartbeat");
    assert_eq!(tracker.snapshot()[0].last_renewal_secs_ago, 8);
    sleep(secs(3.0)).await; // t = 19.5s: due no later than 8s + 11s
    assert_eq!(up.count(), 1);

    // A request in flight and its end are activity, not renewal.
    let guard = tracker.begin_request("s-1").unwrap();
    sleep(secs(5.0)).await;
    drop(guard); // t = 24.5s
    sleep(secs(6.0)).await; // t = 30.5s: due by 19.5s + 11s at the latest
    assert_eq!(up.count(), 2, "activity postponed the heartbeat");
    up.shutdown().await;
}

/// A session with a long request in flight outlives the idle timeout and
/// keeps getting heartbeats; once the request ends, idle time counts again.
#[tokio::test(start_paused = true)]
async fn request_in_flight_keeps_session_alive_past_idle_timeout() {
    let tracker = tracker(10, 30);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));
    let long_poll = tracker.begin_request("s-1").unwrap();

    sleep(secs(100.0)).await;
    assert_eq!(tracker.len(), 1, "in flight: never idle");
    assert!(up.count() >= 9, "heartbeats go on: {}", up.count());
    assert_eq!(tracker.snapshot()[0].in_flight, 1);

    drop(long_poll); // t = 100s
    sleep(secs(25.0)).await;
    assert_eq!(
        tracker.len(),
        1,
        "idle time counts from the end of the request"
    );
    sleep(secs(10.0)).await;
    assert_eq!(tracker.len(), 0);
    assert_eq!(tracker.metrics().ended(EndReason::Idle), 1);
    up.shutdown().await;
}

/// After the idle timeout, a session is dropped and gets no more heartbeats.
#[tokio::test(start_paused = true)]
async fn idle_timeout_stops_heartbeats() {
    let tracker = tracker(10, 35);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));

    sleep(secs(36.0)).await;
    assert!(tracker.is_empty());
    let beats = up.count();
    assert!((3..=4).contains(&beats), "{beats}");
    sleep(secs(300.0)).await;
    assert_eq!(up.count(), beats);
    assert_eq!(tracker.metrics().ended(EndReason::Idle), 1);
    assert_eq!(tracker.metrics().sessions(), 0);
    up.shutdown().await;
}

/// A session the client ended gets no more heartbeats.
#[tokio::test(start_paused = true)]
async fn end_stops_heartbeats() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));
    sleep(secs(12.0)).await;
    assert_eq!(up.count(), 1);

    assert!(tracker.end("s-1", EndReason::ClientEnd));
    assert!(!tracker.end("s-1", EndReason::ClientEnd), "already ended");
    sleep(secs(120.0)).await;
    assert_eq!(up.count(), 1);
    assert_eq!(tracker.metrics().ended(EndReason::ClientEnd), 1);
    assert!(tracker.begin_request("s-1").is_none());
    up.shutdown().await;
}

/// A heartbeat answered 401, 403, 404 or 410 forgets the session: no later
/// heartbeat ever comes for it. Only the client can register it anew.
#[tokio::test(start_paused = true)]
async fn gone_answer_stops_heartbeats_for_good() {
    for code in [401, 403, 404, 410] {
        let tracker = tracker(10, 3600);
        let up = start(&tracker, move |_, _| Reply::Status(code));
        tracker.observe(reg("s-1", "tok"));
        sleep(secs(12.0)).await;
        assert_eq!(up.count(), 1, "{code}: no retry of a gone answer");
        assert!(tracker.is_empty(), "{code}");

        sleep(secs(600.0)).await;
        assert_eq!(up.count(), 1, "{code}: never resurrected");
        assert_eq!(tracker.metrics().ended(EndReason::Gone), 1);
        assert_eq!(tracker.metrics().heartbeats(HeartbeatOutcome::Gone), 1);

        assert_eq!(tracker.observe(reg("s-1", "tok")), Observed::New);
        sleep(secs(12.0)).await;
        assert_eq!(up.count(), 2, "{code}: a new registration is a new session");
        up.shutdown().await;
    }
}

/// A 5xx or a connection error is retried with a short backoff; a success
/// then keeps the session with no failure counted.
#[tokio::test(start_paused = true)]
async fn server_error_is_retried_then_succeeds() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, |_, n| match n {
        0 => Reply::Status(503),
        1 => Reply::ConnectError,
        _ => Reply::Status(200),
    });
    tracker.observe(reg("s-1", "tok"));
    sleep(secs(12.0)).await;

    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    let first_wait = seen[1].at - seen[0].at;
    let second_wait = seen[2].at - seen[1].at;
    assert!(
        first_wait >= secs(0.1) && first_wait <= secs(0.2),
        "{first_wait:?}"
    );
    assert!(
        second_wait >= secs(0.2) && second_wait <= secs(0.4),
        "{second_wait:?}"
    );
    let m = tracker.metrics();
    assert_eq!(m.heartbeats(HeartbeatOutcome::Retried), 2);
    assert_eq!(m.heartbeats(HeartbeatOutcome::Ok), 1);
    assert_eq!(m.heartbeats(HeartbeatOutcome::Failed), 0);
    assert_eq!(tracker.snapshot()[0].consecutive_failures, 0);

    sleep(secs(11.0)).await; // t = 23s: round two due 9..11s after round one ended
    assert_eq!(up.count(), 4, "the next round comes an interval later");
    up.shutdown().await;
}

/// A heartbeat that keeps failing (each round retried twice) drops the
/// session after `max_failures` rounds.
#[tokio::test(start_paused = true)]
async fn repeated_failures_drop_the_session() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, |_, _| Reply::Status(500));
    tracker.observe(reg("s-1", "tok"));

    sleep(secs(25.0)).await;
    assert_eq!(tracker.snapshot()[0].consecutive_failures, 2);
    sleep(secs(35.0)).await;
    assert!(tracker.is_empty());
    assert_eq!(up.count(), 9, "3 rounds of 3 attempts");
    let m = tracker.metrics();
    assert_eq!(m.ended(EndReason::Failures), 1);
    assert_eq!(m.heartbeats(HeartbeatOutcome::Failed), 3);
    assert_eq!(m.heartbeats(HeartbeatOutcome::Retried), 6);
    sleep(secs(120.0)).await;
    assert_eq!(up.count(), 9);
    up.shutdown().await;
}

/// A 4xx other than the gone ones counts as a failure at once, without retry;
/// a later success resets the count.
#[tokio::test(start_paused = true)]
async fn other_client_error_is_one_failure_without_retry() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, |_, n| {
        if n == 0 {
            Reply::Status(429)
        } else {
            Reply::Status(204)
        }
    });
    tracker.observe(reg("s-1", "tok"));
    sleep(secs(12.0)).await;
    assert_eq!(up.count(), 1);
    assert_eq!(tracker.snapshot()[0].consecutive_failures, 1);
    sleep(secs(12.0)).await;
    assert_eq!(up.count(), 2);
    assert_eq!(tracker.snapshot()[0].consecutive_failures, 0);
    up.shutdown().await;
}

/// With an alive field configured, a 2xx whose JSON lacks it means the
/// session is gone; one that has it keeps the session.
#[tokio::test(start_paused = true)]
async fn missing_alive_field_means_gone() {
    let tracker = tracker_with(SessionConfig {
        interval: Duration::from_secs(10),
        alive_field: Some(vec!["result".into(), "TTL".into()]),
        ..SessionConfig::default()
    });
    let up = start(&tracker, |seen, _| {
        if seen.uri.contains("live") {
            Reply::Json(200, r#"{"result":{"TTL":"30s"}}"#)
        } else {
            Reply::Json(200, r#"{"result":{}}"#)
        }
    });
    tracker.observe(reg("live", "tok"));
    tracker.observe(reg("dead", "tok"));
    sleep(secs(12.0)).await;
    assert!(tracker.contains("live"));
    assert!(!tracker.contains("dead"));
    assert_eq!(tracker.metrics().ended(EndReason::Gone), 1);

    sleep(secs(60.0)).await;
    assert_eq!(up.seen_for("dead").len(), 1);
    assert!(up.seen_for("live").len() >= 6);
    up.shutdown().await;
}

/// The alive field is a path of object keys and array indexes; null is missing.
#[test]
fn alive_field_path_reads_keys_and_indexes() {
    let doc: serde_json::Value =
        serde_json::from_str(r#"{"result":{"TTL":"30s","items":[{"id":1}],"gone":null}}"#).unwrap();
    let path = |p: &str| p.split('.').map(String::from).collect::<Vec<_>>();
    assert!(has_field(&doc, &path("result.TTL")));
    assert!(has_field(&doc, &path("result.items.0.id")));
    assert!(!has_field(&doc, &path("result.items.1.id")));
    assert!(!has_field(&doc, &path("result.gone")));
    assert!(!has_field(&doc, &path("result.TTL.x")));
    assert!(has_field(&doc, &[]));
}

/// A full table evicts the session with the oldest activity that has no
/// request in flight; with every session in flight, a new one is not tracked.
#[tokio::test(start_paused = true)]
async fn full_table_evicts_the_oldest_idle_session() {
    let tracker = tracker_with(SessionConfig {
        max_sessions: 2,
        ..SessionConfig::default()
    });
    tracker.observe(reg("a", "tok"));
    let a_in_flight = tracker.begin_request("a").unwrap();
    sleep(secs(1.0)).await;
    tracker.observe(reg("b", "tok"));
    sleep(secs(1.0)).await;
    assert_eq!(tracker.observe(reg("c", "tok")), Observed::New);
    assert!(tracker.contains("a"), "oldest, but in flight");
    assert!(!tracker.contains("b"));
    assert!(tracker.contains("c"));
    assert_eq!(tracker.metrics().ended(EndReason::Evicted), 1);

    sleep(secs(1.0)).await;
    drop(a_in_flight); // a's activity is now newer than c's
    sleep(secs(1.0)).await;
    tracker.observe(reg("d", "tok"));
    assert!(tracker.contains("a") && tracker.contains("d") && !tracker.contains("c"));
    assert_eq!(tracker.len(), 2);
    assert_eq!(tracker.metrics().sessions(), 2);

    let _a = tracker.begin_request("a").unwrap();
    let _d = tracker.begin_request("d").unwrap();
    assert_eq!(tracker.observe(reg("e", "tok")), Observed::Full);
    assert!(!tracker.contains("e"));
    assert_eq!(tracker.len(), 2);
}

/// Many sessions due at once get their heartbeats spaced to `max_per_sec`.
#[tokio::test(start_paused = true)]
async fn heartbeats_of_many_sessions_are_paced() {
    let tracker = tracker_with(SessionConfig {
        interval: Duration::from_secs(10),
        max_per_sec: 10,
        ..SessionConfig::default()
    });
    let up = start(&tracker, ok);
    for i in 0..50 {
        tracker.observe(reg(&format!("s-{i}"), "tok"));
    }
    sleep(secs(8.0)).await;
    assert_eq!(up.count(), 0);
    sleep(secs(10.0)).await;

    let seen = up.seen();
    assert_eq!(seen.len(), 50, "every session got its heartbeat");
    for pair in seen.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= secs(0.1), "heartbeats only {gap:?} apart");
    }
    assert!(seen[49].at - seen[0].at >= secs(4.9));
    up.shutdown().await;
}

/// Neither the snapshot nor any `Debug` output shows the raw session id or a
/// copied header value; sessions are named by their digest.
#[tokio::test(start_paused = true)]
async fn snapshot_never_shows_the_raw_id_or_credentials() {
    let tracker = tracker(10, 3600);
    let id = "sess-7d1c0ffee";
    let registration = reg(id, "t0p-s3cret");
    assert!(!format!("{registration:?}").contains(id));
    assert!(!format!("{registration:?}").contains("t0p-s3cret"));
    tracker.observe(registration);
    sleep(secs(3.0)).await;

    let views = tracker.snapshot();
    let json = serde_json::to_string(&views).unwrap();
    assert!(!json.contains(id), "{json}");
    assert!(
        !json.contains("t0p-s3cret") && !json.contains("sid=abc"),
        "{json}"
    );
    let digest = tracker.digest(id);
    assert_eq!(digest.len(), 16);
    assert!(digest.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        views,
        vec![SessionView {
            digest,
            source: "header:Mcp-Session-Id".into(),
            last_activity_secs_ago: 3,
            last_renewal_secs_ago: 3,
            next_heartbeat_in_secs: views[0].next_heartbeat_in_secs,
            consecutive_failures: 0,
            in_flight: 0,
        }]
    );
    let next = views[0].next_heartbeat_in_secs.unwrap();
    assert!((5..=8).contains(&next), "{next}");

    let guard = tracker.begin_request(id).unwrap();
    for shown in [format!("{tracker:?}"), format!("{guard:?}")] {
        assert!(
            !shown.contains(id) && !shown.contains("t0p-s3cret"),
            "{shown}"
        );
    }
}

/// A later request's credentials replace the earlier ones on heartbeats.
#[tokio::test(start_paused = true)]
async fn later_credentials_replace_earlier_ones() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "old-token"));
    sleep(secs(5.0)).await;
    tracker.observe(reg("s-1", "refreshed-token"));
    sleep(secs(12.0)).await;
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer refreshed-token")
    );
    up.shutdown().await;
}

/// The heartbeat's own headers replace copied headers of the same name.
#[tokio::test(start_paused = true)]
async fn heartbeat_headers_replace_copied_ones() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, ok);
    let mut spec = HeartbeatSpec::new(Method::PUT, "/c/b?comp=lease".parse().unwrap());
    spec.set_headers
        .insert("x-lease-action", "renew".parse().unwrap());
    spec.set_headers
        .insert(header::AUTHORIZATION, "SharedKey lease".parse().unwrap());
    let mut registration = reg("lease-1", "tok");
    registration.heartbeat = Some(Arc::new(spec));
    tracker.observe(registration);
    sleep(secs(12.0)).await;

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let beat = &seen[0];
    assert_eq!(beat.method, Method::PUT);
    assert_eq!(beat.uri, "/c/b?comp=lease");
    assert!(beat.body.is_empty());
    assert_eq!(
        beat.header("content-type"),
        None,
        "no body, no content type"
    );
    assert_eq!(beat.header("x-lease-action"), Some("renew"));
    let auth: Vec<_> = beat.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, ["SharedKey lease"]);
    assert_eq!(beat.header("cookie"), Some("sid=abc"));
    up.shutdown().await;
}

/// Operators remove a session on the admin port by its digest.
#[tokio::test(start_paused = true)]
async fn admin_removes_a_session_by_digest() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));
    tracker.observe(reg("s-2", "tok"));
    let digest = tracker.digest("s-1");
    assert!(!tracker.remove_by_digest("0000000000000000"));
    assert!(tracker.remove_by_digest(&digest));
    assert!(!tracker.remove_by_digest(&digest));
    assert_eq!(tracker.len(), 1);
    assert_eq!(tracker.metrics().ended(EndReason::Admin), 1);
    sleep(secs(12.0)).await;
    assert!(up.seen_for("s-1").is_empty());
    assert_eq!(up.seen_for("s-2").len(), 1);
    up.shutdown().await;
}

/// An upstream that never answers one session's heartbeat times out without
/// delaying the heartbeats of other sessions.
#[tokio::test(start_paused = true)]
async fn hanging_heartbeat_does_not_delay_other_sessions() {
    let tracker = tracker_with(SessionConfig {
        interval: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    });
    let up = start(&tracker, |seen, _| {
        if seen.uri.contains("slow") {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    });
    tracker.observe(reg("slow", "tok"));
    tracker.observe(reg("fast", "tok"));
    sleep(secs(35.0)).await;
    assert_eq!(up.seen_for("fast").len(), 3);
    // Round one: attempts at t, t+5.2s and t+10.6s (t in 9..11s), each timing
    // out after 5s; round two an interval after the last timeout.
    let slow = up.seen_for("slow").len();
    assert!((3..=4).contains(&slow), "{slow}");
    assert_eq!(tracker.metrics().heartbeats(HeartbeatOutcome::Retried), 2);
    assert_eq!(tracker.metrics().heartbeats(HeartbeatOutcome::Failed), 1);
    up.shutdown().await;
}

/// After shutdown, no more heartbeats are sent.
#[tokio::test(start_paused = true)]
async fn shutdown_stops_heartbeats() {
    let tracker = tracker(10, 3600);
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));
    sleep(secs(12.0)).await;
    let log = Arc::clone(&up.log);
    up.shutdown().await;
    sleep(secs(120.0)).await;
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(
        tracker.len(),
        1,
        "sessions stay listed; only heartbeats stop"
    );
}

/// Sessions registered before the scheduler started get heartbeats too, and
/// a second scheduler is refused.
#[tokio::test(start_paused = true)]
async fn scheduler_adopts_sessions_registered_before_it_started() {
    let tracker = tracker(10, 3600);
    tracker.observe(reg("s-1", "tok"));
    let up = start(&tracker, ok);
    let second = start(&tracker, ok);
    second.task.await.unwrap();
    tracker.observe(reg("s-2", "tok"));
    sleep(secs(12.0)).await;
    assert_eq!(up.seen_for("s-1").len(), 1);
    assert_eq!(up.seen_for("s-2").len(), 1);
    assert_eq!(second.log.lock().unwrap().len(), 0);
    up.shutdown().await;
}

/// A session registered without a heartbeat is tracked and idle-expired; a
/// heartbeat given by a later request starts within an interval.
#[tokio::test(start_paused = true)]
async fn session_without_heartbeat_is_tracked_until_one_is_given() {
    let tracker = tracker(10, 60);
    let up = start(&tracker, ok);
    let mut quiet = reg("s-1", "tok");
    quiet.heartbeat = None;
    tracker.observe(quiet.clone());
    sleep(secs(30.0)).await;
    assert_eq!(up.count(), 0);
    assert_eq!(tracker.snapshot()[0].next_heartbeat_in_secs, None);

    tracker.observe(quiet); // None keeps "no heartbeat"
    sleep(secs(12.0)).await;
    assert_eq!(up.count(), 0);
    tracker.observe(reg("s-1", "tok")); // t = 42s
    sleep(secs(23.0)).await;
    let beats = up.count();
    assert!(beats >= 1, "heartbeats started");
    sleep(secs(60.0)).await;
    assert!(tracker.is_empty(), "idle after 60s");
    assert_eq!(tracker.metrics().ended(EndReason::Idle), 1);
}

/// The metrics appear under their documented names.
#[tokio::test(start_paused = true)]
async fn metrics_are_exported_under_their_names() {
    let mut registry = prometheus_client::registry::Registry::default();
    let tracker = SessionTracker::new(
        SessionConfig {
            interval: Duration::from_secs(10),
            ..SessionConfig::default()
        },
        SessionMetrics::new(&mut registry),
    );
    let up = start(&tracker, ok);
    tracker.observe(reg("s-1", "tok"));
    tracker.observe(reg("s-2", "tok"));
    sleep(secs(12.0)).await;
    tracker.end("s-2", EndReason::ClientEnd);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "idemproxy_sessions 1",
        r#"idemproxy_heartbeats_total{outcome="ok"} 2"#,
        r#"idemproxy_heartbeats_total{outcome="retried"} 0"#,
        r#"idemproxy_sessions_ended_total{reason="client_end"} 1"#,
        r#"idemproxy_sessions_ended_total{reason="idle"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
    up.shutdown().await;
}

/// The interval's jitter stays within ±10%.
#[test]
fn jitter_stays_within_ten_percent() {
    use super::table::{draw_jitter, jittered};
    let interval = Duration::from_secs(10);
    assert_eq!(jittered(interval, 100), Duration::from_secs(11));
    assert_eq!(jittered(interval, -100), Duration::from_secs(9));
    assert_eq!(jittered(interval, 0), interval);
    for _ in 0..1000 {
        let d = jittered(interval, draw_jitter());
        assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11));
    }
}

/// Each metric label indexes its own counter.
#[test]
fn metric_labels_index_their_own_counters() {
    for (i, outcome) in HeartbeatOutcome::ALL.into_iter().enumerate() {
        assert_eq!(outcome as usize, i);
    }
    for (i, reason) in EndReason::ALL.into_iter().enumerate() {
        assert_eq!(reason as usize, i);
    }
}

/// A session's table entry stays small (there may be 100 000 of them):
/// 112 bytes with its key pointer, plus the key, credentials and timer entry.
#[test]
fn session_entry_stays_small() {
    use super::table::Session;
    assert!(std::mem::size_of::<(Arc<str>, Session)>() <= 112);
}

/// A registration whose id and `Authorization` have the given lengths.
fn reg_sized(i: usize, id_len: usize, token_len: usize) -> Registration {
    let id = format!("{i:0>id_len$}");
    let mut registration = reg(&id, &"t".repeat(token_len));
    registration.heartbeat = Some(heartbeat_for(&i.to_string()));
    registration
}

/// An id over 1 KiB or credentials over 16 KiB are not tracked (counted by
/// reason); a session at both limits is.
#[test]
fn oversized_ids_and_credentials_are_not_tracked() {
    let tracker = tracker(10, 3600);
    assert_eq!(
        tracker.observe(reg_sized(1, MAX_SESSION_ID_LEN + 1, 10)),
        Observed::TooLarge
    );
    assert_eq!(
        tracker.observe(reg_sized(2, 10, 20_000)),
        Observed::TooLarge
    );
    assert!(tracker.is_empty());
    let metrics = tracker.metrics();
    assert_eq!(metrics.untracked(Untracked::IdTooLong), 1);
    assert_eq!(metrics.untracked(Untracked::CredentialsTooLarge), 1);
    // "Bearer " and the cookie come on top of the token.
    let token = MAX_CREDENTIALS_LEN - 100;
    assert_eq!(
        tracker.observe(reg_sized(3, MAX_SESSION_ID_LEN, token)),
        Observed::New
    );
    // A known session's oversized new credentials are ignored, not copied.
    let before = metrics.table_bytes();
    let mut bigger = reg_sized(3, MAX_SESSION_ID_LEN, 40_000);
    bigger.heartbeat = None;
    assert_eq!(tracker.observe(bigger), Observed::Refreshed);
    assert_eq!(metrics.table_bytes(), before);
}

/// 10,000 sessions with 1 KiB ids and 15 KiB credentials (160 MB if all
/// were kept) stay within a 4 MiB table: the oldest idle ones are evicted,
/// and the table's bytes go back to 0 when every session has ended.
#[test]
fn the_table_is_bounded_in_bytes() {
    let tracker = tracker_with(SessionConfig {
        max_bytes: 4 << 20,
        ..SessionConfig::default()
    });
    for i in 0..10_000 {
        assert_eq!(tracker.observe(reg_sized(i, 1024, 15_000)), Observed::New);
        let bytes = tracker.metrics().table_bytes();
        assert!(bytes <= 4 << 20, "{bytes} after {i}");
    }
    let kept = tracker.len();
    assert!((200..300).contains(&kept), "{kept} sessions kept");
    assert_eq!(
        tracker.metrics().ended(EndReason::Evicted),
        (10_000 - kept) as u64
    );
    // The newest are kept.
    assert!(tracker.contains(&format!("{:0>1024}", 9_999)));
    assert!(!tracker.contains(&format!("{:0>1024}", 0)));
    for i in 10_000 - kept..10_000 {
        assert!(tracker.end(&format!("{i:0>1024}"), EndReason::ClientEnd));
    }
    assert!(tracker.is_empty());
    assert_eq!(tracker.metrics().table_bytes(), 0);
}

/// An upstream that hangs holds at most 256 heartbeats at once, whatever
/// the number of due sessions; each hung one fails at the heartbeat timeout
/// and the rest go out as slots free up.
#[tokio::test(start_paused = true)]
async fn hanging_heartbeats_are_capped_in_flight() {
    let tracker = tracker_with(SessionConfig {
        interval: Duration::from_secs(10),
        max_per_sec: 0,
        request_timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    });
    let up = start(&tracker, |_, _| Reply::Hang);
    for i in 0..1_000 {
        tracker.observe(reg(&format!("s-{i}"), "tok"));
    }
    sleep(secs(11.5)).await; // every session is due, none has timed out yet
    assert_eq!(up.count(), super::scheduler::MAX_IN_FLIGHT);
    sleep(secs(5.0)).await; // the first ones timed out: others take their slots
    let later = up.count();
    assert!(later > super::scheduler::MAX_IN_FLIGHT, "{later}");
    assert!(later <= 2 * super::scheduler::MAX_IN_FLIGHT, "{later}");
    up.shutdown().await;
}
