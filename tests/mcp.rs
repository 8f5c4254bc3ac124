//! idemproxy in front of a real MCP server: `testkit/mcp_server.py`,
//! the official Python SDK's `StreamableHTTPSessionManager` (Streamable
//! HTTP, stateful sessions) under uvicorn, started by the test on its own
//! 127.0.0.1 port and killed by PID at the end.
//!
//! The SDK closes a session that had no HTTP request in flight for its
//! `session_idle_timeout` (here 2.5 s) and answers its id with 404 from then
//! on. Every MCP request extends the session, so the proxy runs with
//! `--requests-renew true` and heartbeats with a JSON-RPC `ping`.
//!
//! The client is plain HTTP from Rust, as an MCP client sends it:
//! `initialize`, `notifications/initialized`, then requests carrying
//! `Mcp-Session-Id` and `MCP-Protocol-Version`; answers come as server-sent
//! events (`data:` lines). A [`FaultProxy`] sits between idemproxy and the
//! server: a wire tap, and in the last test a "store then drop" fault.
//!
//! Run with `tools/test` (installs the SDK in a venv); plain `cargo test`
//! skips these loudly when the venv is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::fault_proxy::{DropAfter, FaultPlan, FaultProxy, Pick};
use testkit::real_servers::{McpServer, parse_lenient};
use testkit::{TestProxy, admin_sessions, client, metric_sum, within};

/// The SDK's `session_idle_timeout`.
const IDLE: Duration = Duration::from_millis(2500);
/// The proxy's heartbeat interval: about a third of the idle timeout.
const INTERVAL: Duration = Duration::from_millis(800);
/// The protocol revision the client negotiates (the SDK's latest with an
/// `initialize` handshake; newer ones are stateless).
const PROTOCOL: &str = "2025-11-25";
/// The id of the proxy's heartbeat request, to recognise it on the wire.
const PING_ID: &str = "idemproxy-ping";

/// The MCP server, a tap (or fault proxy) in front of it, idemproxy in front of that.
struct Setup {
    server: McpServer,
    tap: FaultProxy,
    proxy: TestProxy,
}

impl Setup {
    async fn start(plan: FaultPlan) -> Option<Setup> {
        let server = McpServer::start(IDLE).await?;
        let tap = FaultProxy::start(&server.url(), plan).await;
        let interval = format!("{}ms", INTERVAL.as_millis());
        let ping = json!({"jsonrpc": "2.0", "id": PING_ID, "method": "ping"}).to_string();
        let proxy = TestProxy::start(
            &tap.url(),
            &[
                "--session-sources",
                "header:Mcp-Session-Id,response-header:Mcp-Session-Id",
                "--requests-renew",
                "true",
                "--heartbeat",
                "POST /mcp",
                "--heartbeat-body",
                &ping,
                "--heartbeat-set-headers",
                "accept: application/json, text/event-stream",
                "--heartbeat-headers",
                "authorization,cookie,mcp-protocol-version",
                "--heartbeat-interval",
                &interval,
                "--routes",
                "DELETE /mcp session-end",
            ],
        )
        .await;
        Some(Setup { server, tap, proxy })
    }

    /// An initialized MCP session through the proxy.
    async fn session(&self) -> Mcp {
        Mcp::initialize(&self.proxy.url("/mcp")).await
    }

    /// Heartbeat pings that reached the server's HTTP port (answered or not).
    fn pings_on_the_wire(&self) -> usize {
        self.tap.count_containing(PING_ID)
    }

    /// `idemproxy_heartbeats_total`, all outcomes.
    async fn heartbeats(&self) -> f64 {
        metric_sum(&self.proxy.metrics().await, "idemproxy_heartbeats_total")
    }
}

// ---------------------------------------------------------------------------
// A minimal MCP client (Streamable HTTP)
// ---------------------------------------------------------------------------

/// One HTTP answer of the MCP endpoint.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    session: Option<String>,
    body: String,
}

impl Reply {
    /// The JSON-RPC response in the body: the `data:` event that carries a
    /// `result` or `error` when it is an event stream, else the JSON body.
    fn message(&self) -> Option<Value> {
        if self.content_type.starts_with("text/event-stream") {
            self.body
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
                .find(|m| m.get("result").is_some() || m.get("error").is_some())
        } else {
            serde_json::from_str(&self.body).ok()
        }
    }

    /// The body as JSON (for the proxy's own 502 answers).
    fn json(&self) -> Value {
        parse_lenient(&self.body)
    }
}

/// An MCP session: an endpoint URL and the session id the server assigned.
struct Mcp {
    endpoint: String,
    session: String,
    next_id: u64,
}

impl Mcp {
    /// `POST` of one JSON-RPC message, with the session headers once known.
    async fn post(endpoint: &str, session: Option<&str>, message: &Value) -> Reply {
        let mut req = client()
            .post(endpoint)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(message.to_string());
        if let Some(id) = session {
            req = req
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", PROTOCOL);
        }
        send(req).await
    }

    /// `initialize` and `notifications/initialized`.
    async fn initialize(endpoint: &str) -> Mcp {
        let init = json!({
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "idemproxy-tests", "version": "1"},
            },
        });
        let reply = Mcp::post(endpoint, None, &init).await;
        assert_eq!(reply.status, 200, "initialize: {reply:?}");
        let message = reply.message().expect("an initialize result");
        assert_eq!(message["result"]["protocolVersion"], PROTOCOL, "{message}");
        let session = reply.session.clone().expect("Mcp-Session-Id on initialize");
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let reply = Mcp::post(endpoint, Some(&session), &initialized).await;
        assert_eq!(reply.status, 202, "notifications/initialized: {reply:?}");
        Mcp {
            endpoint: endpoint.to_owned(),
            session,
            next_id: 1,
        }
    }

    /// Calls the `record` tool with `call_id`.
    async fn record(&mut self, call_id: &str) -> Reply {
        self.next_id += 1;
        let call = json!({
            "jsonrpc": "2.0",
            "id": self.next_id,
            "method": "tools/call",
            "params": {"name": "record", "arguments": {"call_id": call_id}},
        });
        Mcp::post(&self.endpoint, Some(&self.session), &call).await
    }

    /// Calls `record` and asserts that it succeeded.
    async fn record_ok(&mut self, call_id: &str) {
        let reply = self.record(call_id).await;
        assert_eq!(reply.status, 200, "tools/call {call_id}: {reply:?}");
        let message = reply
            .message()
            .unwrap_or_else(|| panic!("no result: {reply:?}"));
        assert_eq!(message["result"]["isError"], false, "{message}");
        let text = message["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or("");
        assert!(text.contains(call_id), "{message}");
    }

    /// `DELETE` of the session.
    async fn delete(&self) -> Reply {
        let req = client()
            .delete(&self.endpoint)
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", PROTOCOL);
        send(req).await
    }
}

/// Sends `req` (bounded) and reads the whole answer.
async fn send(req: reqwest::RequestBuilder) -> Reply {
    let resp = within("an MCP request", req.send())
        .await
        .unwrap_or_else(|e| panic!("MCP request: {e}"));
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = resp.status().as_u16();
    let content_type = header("content-type").unwrap_or_default();
    let session = header("mcp-session-id");
    let body = within("an MCP answer", resp.text())
        .await
        .unwrap_or_else(|e| panic!("MCP answer body: {e}"));
    Reply {
        status,
        content_type,
        session,
        body,
    }
}

/// Asserts that every call id ran exactly once on the server.
fn assert_ran_once(runs: &BTreeMap<String, u64>, ids: &[String]) {
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "calls that ran more than once: {twice:?}");
    let missing: Vec<_> = ids.iter().filter(|id| !runs.contains_key(*id)).collect();
    assert!(missing.is_empty(), "calls that never ran: {missing:?}");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Busy client, a tool call every 0.5 s for three idle timeouts: all succeed once, and renewing calls leave pings unneeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_client_keeps_its_session() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mut mcp = s.session().await;
    let started = Instant::now();
    let mut ids = Vec::new();
    while started.elapsed() < IDLE * 3 {
        let id = format!("busy-{}", ids.len());
        mcp.record_ok(&id).await;
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ids.len() >= 12, "only {} calls", ids.len());
    assert_ran_once(&s.server.stats().await.runs, &ids);
    let pings = s.pings_on_the_wire();
    assert!(
        pings <= 2,
        "{pings} pings while requests every 0.5 s renewed the session (interval {INTERVAL:?})"
    );
    assert_eq!(admin_sessions(&s.proxy).await.len(), 1);
}

/// Silent client, no request for three idle timeouts: a call still works (a session without the proxy got 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_keeps_its_session() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mut mcp = s.session().await;
    mcp.record_ok("silent-before").await;
    let mut control = Mcp::initialize(&format!("{}/mcp", s.server.url())).await;

    tokio::time::sleep(IDLE * 3).await;

    let reply = control.record("control").await;
    assert_eq!(
        reply.status, 404,
        "the SDK keeps an idle session past its idle timeout?! {reply:?}"
    );
    let pings = s.pings_on_the_wire();
    assert!(pings >= 5, "{pings} pings in {:?}", IDLE * 3);
    mcp.record_ok("silent-after").await;
    let stats = s.server.stats().await;
    assert_ran_once(
        &stats.runs,
        &["silent-before".to_owned(), "silent-after".to_owned()],
    );
    assert!(!stats.runs.contains_key("control"));
    assert!(stats.pings >= 5, "{} pings answered", stats.pings);
}

/// DELETE through the proxy: the session ends on both sides and no ping follows (counted or on the wire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_through_the_proxy_stops_the_pings() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mcp = s.session().await;
    within("a first ping to reach the server", async {
        while s.pings_on_the_wire() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(admin_sessions(&s.proxy).await.len(), 1);

    let reply = mcp.delete().await;
    assert_eq!(reply.status, 200, "DELETE: {reply:?}");
    // Let a ping that was already on its way land before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (wire, counted) = (s.pings_on_the_wire(), s.heartbeats().await);

    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(s.pings_on_the_wire(), wire, "pings after the DELETE");
    assert_eq!(s.heartbeats().await, counted, "heartbeats after the DELETE");
    let sessions = admin_sessions(&s.proxy).await;
    assert!(sessions.is_empty(), "still tracked: {sessions:?}");
    let ended = testkit::metric_value(
        &s.proxy.metrics().await,
        r#"idemproxy_sessions_ended_total{reason="client_end"}"#,
    );
    assert_eq!(ended, Some(1.0), "ended by the client's DELETE");
    assert_eq!(s.server.stats().await.sessions, 0);
}

/// A fifth of 50 tool-call answers dropped after the server ran them: none runs twice, each dropped one is a 502 `may_have_been_processed: true`, the rest succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_answers_are_never_replayed() {
    const CALLS: usize = 50;
    let plan = FaultPlan {
        matches: Box::new(|req| req.contains("\"tools/call\"")),
        // This seed drops 12 of the first 50 calls, two of them twice in a row.
        pick: Pick::Chance {
            probability: 0.2,
            seed: 5,
        },
        // The answer is an event stream: wait for the result itself.
        drop_after: DropAfter::Contains(b"\"result\"".to_vec()),
    };
    let Some(s) = Setup::start(plan).await else {
        return;
    };
    let mut mcp = s.session().await;
    let ids: Vec<String> = (0..CALLS).map(|i| format!("call-{i:02}")).collect();
    let mut failed = BTreeSet::new();
    for id in &ids {
        let reply = mcp.record(id).await;
        match reply.status {
            200 => {
                let message = reply.message().unwrap_or_else(|| panic!("{id}: {reply:?}"));
                assert_eq!(message["result"]["isError"], false, "{id}: {message}");
            }
            502 => {
                let doc = reply.json();
                assert_eq!(
                    doc["may_have_been_processed"], true,
                    "{id}: a 502 must say that the call may have run: {doc}"
                );
                failed.insert(id.clone());
            }
            other => panic!("{id}: unexpected {other}: {reply:?}"),
        }
    }

    let stats = s.server.stats().await;
    assert_ran_once(&stats.runs, &ids);
    let dropped = s.tap.dropped();
    assert!(
        dropped.iter().all(|d| d.answered),
        "a dropped call that the server did not answer: {dropped:?}"
    );
    let dropped_ids: BTreeSet<String> = dropped
        .iter()
        .map(|d| {
            let doc = d.request.json().expect("a JSON-RPC request");
            doc["params"]["arguments"]["call_id"]
                .as_str()
                .expect("call_id")
                .to_owned()
        })
        .collect();
    assert_eq!(dropped.len(), dropped_ids.len(), "a call was sent twice");
    assert!(
        (5..=20).contains(&dropped.len()),
        "{} of {CALLS} answers dropped",
        dropped.len()
    );
    assert_eq!(
        failed, dropped_ids,
        "the calls the client saw fail are exactly those whose answers were dropped"
    );
    let refused = metric_sum(&s.proxy.metrics().await, "idemproxy_retries_refused_total");
    assert!(
        refused >= 1.0,
        "replays refused as unsafe: {refused} (dropped {})",
        dropped.len()
    );
    // The session survived the dropped connections.
    s.tap.set_enabled(false);
    mcp.record_ok("after-faults").await;
}
