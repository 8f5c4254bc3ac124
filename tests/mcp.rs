//! idemproxy with `--profile mcp` in front of a real MCP server:
//! `testkit/mcp_server.py`, the official Python SDK's
//! `StreamableHTTPSessionManager` (Streamable HTTP, stateful sessions) under
//! uvicorn, started by the test on its own 127.0.0.1 port and killed by PID
//! at the end. The proxy is set up as a user would set it up: the profile,
//! plus a heartbeat interval short enough for the short idle timeout below
//! (README, "Backend profiles", `mcp`).
//!
//! The SDK closes a session that had no HTTP request in flight for its
//! `session_idle_timeout` (here 2.5 s) and answers its id with 404 from then
//! on. Every MCP request extends the session: the profile has every request
//! answered 2xx renew it, and heartbeats with a JSON-RPC `ping`.
//!
//! The client is plain HTTP from Rust, as an MCP client sends it:
//! `initialize`, `notifications/initialized`, then requests carrying
//! `Mcp-Session-Id` and `MCP-Protocol-Version`; answers come as server-sent
//! events (`data:` lines). A [`FaultProxy`] sits between idemproxy and the
//! server: a wire tap, and in some tests a "store then drop" fault.
//!
//! Each test prints one summary line to stderr (past libtest's capture):
//! `profile mcp: writes=N faults=F lost=L duplicated=D client_errors=E
//! heartbeats_per_session_minute=X.X workload=...`, see [`Summary`].
//!
//! Run with `tools/test` (installs the SDK in a venv); plain `cargo test`
//! skips these loudly when the venv is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};
use testkit::fault_proxy::{DropAfter, FaultPlan, FaultProxy, FramedRequest, Pick};
use testkit::real_servers::{McpServer, McpStats, parse_lenient};
use testkit::{Summary, TestProxy, admin_sessions, client, metric_sum, within};

/// The SDK's `session_idle_timeout`.
const IDLE: Duration = Duration::from_millis(2500);
/// The proxy's heartbeat interval: about a third of the idle timeout.
const INTERVAL: Duration = Duration::from_millis(800);
/// The protocol revision the client negotiates (the SDK's latest with an
/// `initialize` handshake; newer ones are stateless).
const PROTOCOL: &str = "2025-11-25";
/// The id of the profile's heartbeat request, to recognise it on the wire.
const PING_ID: &str = "idemproxy-ping";
/// The `Accept` the profile sets on its pings (Streamable HTTP requires both).
const PING_ACCEPT: &str = "application/json, text/event-stream";

/// Starts idemproxy with `--profile mcp` in front of `upstream`.
async fn start_proxy(upstream: &str) -> TestProxy {
    let interval = format!("{}ms", INTERVAL.as_millis());
    TestProxy::start(
        upstream,
        &["--profile", "mcp", "--heartbeat-interval", &interval],
    )
    .await
}

/// The MCP server, a tap (or fault proxy) in front of it, idemproxy in front of that.
struct Setup {
    server: McpServer,
    tap: FaultProxy,
    proxy: TestProxy,
    /// When the proxy started: the start of the summary's duration.
    started: Instant,
}

impl Setup {
    async fn start(plan: FaultPlan) -> Option<Setup> {
        let server = McpServer::start(IDLE).await?;
        let tap = FaultProxy::start(&server.url(), plan).await;
        let proxy = start_proxy(&tap.url()).await;
        Some(Setup {
            server,
            tap,
            proxy,
            started: Instant::now(),
        })
    }

    /// An initialized MCP session through the proxy.
    async fn session(&self) -> Mcp {
        Mcp::initialize(&self.proxy.url("/mcp"), PROTOCOL).await
    }

    /// Heartbeat pings that reached the server's HTTP port (answered or not).
    fn pings_on_the_wire(&self) -> usize {
        self.tap.count_containing(PING_ID)
    }

    /// `idemproxy_heartbeats_total`, all outcomes.
    async fn heartbeats(&self) -> f64 {
        metric_sum(&self.proxy.metrics().await, "idemproxy_heartbeats_total")
    }

    /// A summary of this workload, to fill in and print: `writes` are tool
    /// calls, `faults` answers dropped after the server ran the request
    /// ([`count_runs`] fills in `lost` and `duplicated`); heartbeats are pings.
    fn summary(&self, workload: &'static str) -> Summary {
        Summary::new("mcp", workload, self.started)
    }
}

/// Fills in `lost` (tool calls answered 200 that the server never ran) and
/// `duplicated` (calls it ran more than once) from the server's counts:
/// `acked` are the calls answered 200.
fn count_runs(summary: &mut Summary, stats: &McpStats, acked: &[String]) {
    summary.lost = acked
        .iter()
        .filter(|id| !stats.runs.contains_key(*id))
        .count();
    summary.duplicated = stats.runs.values().filter(|n| **n > 1).count();
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
    /// `x-idemproxy-attempts` (set when the proxy sent more than one attempt).
    attempts: Option<String>,
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

/// An MCP session: an endpoint URL, the session id the server assigned and
/// the protocol revision negotiated.
struct Mcp {
    endpoint: String,
    session: String,
    protocol: &'static str,
    next_id: u64,
}

impl Mcp {
    /// `POST` of one JSON-RPC message, with the session headers (id,
    /// protocol revision) once known.
    async fn post(endpoint: &str, session: Option<(&str, &str)>, message: &Value) -> Reply {
        let mut req = client()
            .post(endpoint)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(message.to_string());
        if let Some((id, protocol)) = session {
            req = req
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", protocol);
        }
        send(req).await
    }

    /// `initialize` (offering `protocol`) and `notifications/initialized`.
    async fn initialize(endpoint: &str, protocol: &'static str) -> Mcp {
        let init = json!({
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": protocol,
                "capabilities": {},
                "clientInfo": {"name": "idemproxy-tests", "version": "1"},
            },
        });
        let reply = Mcp::post(endpoint, None, &init).await;
        assert_eq!(reply.status, 200, "initialize: {reply:?}");
        let message = reply.message().expect("an initialize result");
        assert_eq!(message["result"]["protocolVersion"], protocol, "{message}");
        let session = reply.session.clone().expect("Mcp-Session-Id on initialize");
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let reply = Mcp::post(endpoint, Some((&session, protocol)), &initialized).await;
        assert_eq!(reply.status, 202, "notifications/initialized: {reply:?}");
        Mcp {
            endpoint: endpoint.to_owned(),
            session,
            protocol,
            next_id: 1,
        }
    }

    /// The same session, its requests sent to `endpoint` (another proxy).
    fn via(&self, endpoint: &str) -> Mcp {
        Mcp {
            endpoint: endpoint.to_owned(),
            session: self.session.clone(),
            protocol: self.protocol,
            next_id: self.next_id + 1000,
        }
    }

    /// Sends the JSON-RPC request `method` with `params`.
    async fn request(&mut self, method: &str, params: Value) -> Reply {
        self.next_id += 1;
        let message = json!({
            "jsonrpc": "2.0",
            "id": self.next_id,
            "method": method,
            "params": params,
        });
        Mcp::post(
            &self.endpoint,
            Some((&self.session, self.protocol)),
            &message,
        )
        .await
    }

    /// Calls the `record` tool with `call_id`.
    async fn record(&mut self, call_id: &str) -> Reply {
        let params = json!({"name": "record", "arguments": {"call_id": call_id}});
        self.request("tools/call", params).await
    }

    /// Calls `record` and asserts that it succeeded.
    async fn record_ok(&mut self, call_id: &str) {
        let reply = self.record(call_id).await;
        if let Err(e) = recorded(&reply, call_id) {
            panic!("{e}");
        }
    }

    /// `tools/list`.
    async fn list_tools(&mut self) -> Reply {
        self.request("tools/list", json!({})).await
    }

    /// `DELETE` of the session.
    async fn delete(&self) -> Reply {
        let req = client()
            .delete(&self.endpoint)
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", self.protocol);
        send(req).await
    }
}

/// Whether `reply` is the successful answer of `record(call_id)`.
fn recorded(reply: &Reply, call_id: &str) -> Result<(), String> {
    if reply.status != 200 {
        return Err(format!("tools/call {call_id}: {reply:?}"));
    }
    let message = reply
        .message()
        .ok_or_else(|| format!("tools/call {call_id}: no result: {reply:?}"))?;
    let text = message["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or("");
    if message["result"]["isError"] != false || !text.contains(call_id) {
        return Err(format!("tools/call {call_id}: {message}"));
    }
    Ok(())
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
    let attempts = header("x-idemproxy-attempts");
    let body = within("an MCP answer", resp.text())
        .await
        .unwrap_or_else(|e| panic!("MCP answer body: {e}"));
    Reply {
        status,
        content_type,
        session,
        attempts,
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

/// Every value of header `name` in a request head (case-insensitive).
fn header_values<'a>(req: &'a FramedRequest, name: &str) -> Vec<&'a str> {
    req.head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// Whether `req` is one of the proxy's pings for `session`.
fn is_ping_of(req: &FramedRequest, session: &str) -> bool {
    req.contains(PING_ID) && req.header("mcp-session-id") == Some(session)
}

/// Asserts that `ping` is the profile's heartbeat for `mcp`: `POST` to the
/// session's endpoint, the session's id and protocol revision, the `Accept`
/// Streamable HTTP requires, the ping body.
fn assert_ping_of(ping: &FramedRequest, mcp: &Mcp) {
    let head = &ping.head;
    assert!(
        ping.request_line().starts_with("POST /mcp "),
        "a ping to the session's endpoint: {head}"
    );
    assert_eq!(
        header_values(ping, "mcp-session-id"),
        [mcp.session.as_str()],
        "{head}"
    );
    assert_eq!(
        header_values(ping, "mcp-protocol-version"),
        [mcp.protocol],
        "a ping carries the session's MCP-Protocol-Version: {head}"
    );
    assert_eq!(header_values(ping, "accept"), [PING_ACCEPT], "{head}");
    let content_type = header_values(ping, "content-type");
    assert!(
        content_type.len() == 1 && content_type[0].starts_with("application/json"),
        "{head}"
    );
    assert_eq!(
        ping.json(),
        Some(json!({"jsonrpc": "2.0", "id": PING_ID, "method": "ping"})),
        "{head}"
    );
}

/// A plan that drops the answer to the first request of each JSON-RPC
/// method of `methods` (once each), once the server's answer carries its
/// `"result"` (the answer is an event stream whose headers may go out
/// before the work is done).
fn drop_first_of_each(methods: &'static [&'static str]) -> FaultPlan {
    let taken: Vec<AtomicBool> = methods.iter().map(|_| AtomicBool::new(false)).collect();
    FaultPlan {
        matches: Box::new(move |req| {
            let method = req
                .json()
                .and_then(|doc| doc["method"].as_str().map(str::to_owned));
            methods.iter().zip(&taken).any(|(m, taken)| {
                method.as_deref() == Some(*m) && !taken.swap(true, Ordering::SeqCst)
            })
        }),
        pick: Pick::Always,
        drop_after: DropAfter::Contains(b"\"result\"".to_vec()),
    }
}

/// Waits (bounded) until the server has answered `n` pings.
async fn server_answered_pings(server: &McpServer, n: u64) -> McpStats {
    within("the server to answer the pings", async {
        loop {
            let stats = server.stats().await;
            if stats.pings >= n {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
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
    let mut summary = s.summary("busy-client");
    let mut mcp = s.session().await;
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut acked = Vec::new();
    let mut first_error = None;
    while started.elapsed() < IDLE * 3 {
        let id = format!("busy-{}", ids.len());
        let reply = mcp.record(&id).await;
        match recorded(&reply, &id) {
            Ok(()) => acked.push(id.clone()),
            Err(e) => {
                summary.client_errors += 1;
                first_error.get_or_insert(e);
            }
        }
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stats = s.server.stats().await;
    let pings = s.pings_on_the_wire();
    summary.sessions = 1;
    summary.writes = ids.len();
    count_runs(&mut summary, &stats, &acked);
    summary.print(pings);

    assert_eq!(first_error, None, "a tool call failed");
    assert!(ids.len() >= 12, "only {} calls", ids.len());
    assert_ran_once(&stats.runs, &ids);
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
    let mut summary = s.summary("silent-client");
    let mut mcp = s.session().await;
    mcp.record_ok("silent-before").await;
    let mut control = Mcp::initialize(&format!("{}/mcp", s.server.url()), PROTOCOL).await;

    tokio::time::sleep(IDLE * 3).await;

    let reply = control.record("control").await;
    assert_eq!(
        reply.status, 404,
        "the SDK keeps an idle session past its idle timeout?! {reply:?}"
    );
    let pings = s.pings_on_the_wire();
    assert!(pings >= 5, "{pings} pings in {:?}", IDLE * 3);
    let after = mcp.record("silent-after").await;
    let stats = s.server.stats().await;
    summary.sessions = 1;
    summary.writes = 2;
    let mut acked = vec!["silent-before".to_owned()];
    match recorded(&after, "silent-after") {
        Ok(()) => acked.push("silent-after".to_owned()),
        Err(_) => summary.client_errors += 1,
    }
    count_runs(&mut summary, &stats, &acked);
    summary.print(s.pings_on_the_wire());

    if let Err(e) = recorded(&after, "silent-after") {
        panic!("{e}");
    }
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
    let mut summary = s.summary("delete");
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
    summary.sessions = 1;
    summary.print(s.pings_on_the_wire());
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
    let mut summary = s.summary("dropped-tool-calls");
    let mut mcp = s.session().await;
    let ids: Vec<String> = (0..CALLS).map(|i| format!("call-{i:02}")).collect();
    let mut failed = BTreeSet::new();
    let mut acked = Vec::new();
    for id in &ids {
        let reply = mcp.record(id).await;
        match reply.status {
            200 => {
                let message = reply.message().unwrap_or_else(|| panic!("{id}: {reply:?}"));
                assert_eq!(message["result"]["isError"], false, "{id}: {message}");
                acked.push(id.clone());
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
    let dropped = s.tap.dropped();
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
    summary.sessions = 1;
    summary.writes = CALLS;
    summary.faults = dropped.len();
    summary.client_errors = failed.difference(&dropped_ids).count();
    count_runs(&mut summary, &stats, &acked);
    summary.print(s.pings_on_the_wire());

    assert_ran_once(&stats.runs, &ids);
    assert!(
        dropped.iter().all(|d| d.answered),
        "a dropped call that the server did not answer: {dropped:?}"
    );
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

/// A `tools/call` whose answer is dropped after the tool ran is not replayed (it ran once, the client gets a 502 `may_have_been_processed: true`); a dropped `tools/list` is replayed and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tool_call_is_not_replayed_and_a_dropped_tools_list_is() {
    let Some(s) = Setup::start(drop_first_of_each(&["tools/call", "tools/list"])).await else {
        return;
    };
    let mut summary = s.summary("dropped-call-and-list");
    let mut mcp = s.session().await;

    let call = mcp.record("dropped-call").await;
    let list = mcp.list_tools().await;
    let after = mcp.record("after-the-faults").await;
    let stats = s.server.stats().await;
    let dropped = s.tap.dropped();
    let on_the_wire = |method: &str| {
        s.tap
            .requests()
            .iter()
            .filter(|r| r.json().is_some_and(|doc| doc["method"] == method))
            .count()
    };
    summary.sessions = 1;
    summary.writes = 2;
    summary.faults = dropped.len();
    summary.client_errors = usize::from(!matches!(call.status, 200 | 502))
        + usize::from(list.status != 200)
        + usize::from(recorded(&after, "after-the-faults").is_err());
    let mut acked = Vec::new();
    if call.status == 200 {
        acked.push("dropped-call".to_owned());
    }
    if recorded(&after, "after-the-faults").is_ok() {
        acked.push("after-the-faults".to_owned());
    }
    count_runs(&mut summary, &stats, &acked);
    summary.print(s.pings_on_the_wire());

    // The tool call: run once, not replayed, reported as maybe processed.
    assert_eq!(
        call.status, 502,
        "a tools/call whose answer was lost: {call:?}"
    );
    let doc = call.json();
    assert_eq!(
        doc["may_have_been_processed"], true,
        "the 502 must say that the call may have run: {doc}"
    );
    assert_eq!(doc["attempts"], 1, "{doc}");
    assert_eq!(call.attempts, None, "one attempt: {call:?}");
    assert_eq!(
        stats.runs.get("dropped-call"),
        Some(&1),
        "the tool ran exactly once: {:?}",
        stats.runs
    );
    assert_eq!(
        on_the_wire("tools/call"),
        2,
        "the dropped call once, then the next call"
    );

    // The listing: replayed, answered.
    assert_eq!(
        list.status, 200,
        "a tools/list whose answer was lost: {list:?}"
    );
    assert_eq!(
        list.attempts.as_deref(),
        Some("2"),
        "replayed once: {list:?}"
    );
    let message = list
        .message()
        .unwrap_or_else(|| panic!("no result: {list:?}"));
    assert_eq!(message["result"]["tools"][0]["name"], "record", "{message}");
    assert_eq!(on_the_wire("tools/list"), 2, "the listing and its replay");

    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(
        dropped.iter().all(|d| d.answered),
        "the server answered both: {dropped:?}"
    );
    // The session survived both dropped connections.
    if let Err(e) = recorded(&after, "after-the-faults") {
        panic!("{e}");
    }
    assert_ran_once(
        &stats.runs,
        &["dropped-call".to_owned(), "after-the-faults".to_owned()],
    );
    let refused = metric_sum(&s.proxy.metrics().await, "idemproxy_retries_refused_total");
    assert_eq!(refused, 1.0, "the tool call's replay refused as unsafe");
}

/// Pings carry the `MCP-Protocol-Version` of their own session (two sessions, two revisions) once the client sent it, and `Accept: application/json, text/event-stream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_carry_the_sessions_protocol_version_and_accept() {
    const OLDER: &str = "2025-06-18";
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let mut summary = s.summary("ping-headers");
    let sessions = [
        Mcp::initialize(&s.proxy.url("/mcp"), PROTOCOL).await,
        Mcp::initialize(&s.proxy.url("/mcp"), OLDER).await,
    ];
    within("two pings of each session", async {
        while !sessions.iter().all(|mcp| {
            s.tap
                .requests()
                .iter()
                .filter(|r| is_ping_of(r, &mcp.session))
                .count()
                >= 2
        }) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let stats = server_answered_pings(&s.server, 4).await;
    summary.sessions = sessions.len();
    summary.print(s.pings_on_the_wire());

    let requests = s.tap.requests();
    for mcp in &sessions {
        // The client's first request that told the session's revision
        // (`notifications/initialized`, right after `initialize`).
        let told = requests
            .iter()
            .position(|r| {
                r.header("mcp-session-id") == Some(mcp.session.as_str())
                    && !r.contains(PING_ID)
                    && r.header("mcp-protocol-version").is_some()
            })
            .expect("a request of the session with MCP-Protocol-Version");
        let pings: Vec<&FramedRequest> = requests[told..]
            .iter()
            .filter(|r| is_ping_of(r, &mcp.session))
            .collect();
        assert!(
            pings.len() >= 2,
            "{} pings of the {} session",
            pings.len(),
            mcp.protocol
        );
        for ping in pings {
            assert_ping_of(ping, mcp);
        }
    }
    // The server took them (it refuses an unsupported MCP-Protocol-Version).
    assert!(stats.pings >= 4, "{} pings answered", stats.pings);
    assert_eq!(admin_sessions(&s.proxy).await.len(), 2);
}

/// A session first seen mid-life (the sidecar restarted): one request of it through a fresh proxy (same profile) is enough for its pings, which keep it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_first_seen_mid_life_gets_pings() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let first = s.session().await;
    let Setup {
        server, tap, proxy, ..
    } = s;
    // The sidecar goes away (its heartbeats stop on shutdown) ...
    proxy.stop().await;
    // ... and a new one, which never saw the `initialize`, takes its place.
    let second = start_proxy(&tap.url()).await;
    let restarted = Instant::now();
    let seen_before = tap.requests().len();
    let mut mcp = first.via(&second.url("/mcp"));
    let one = mcp.record("first-through-the-new-proxy").await;
    // Silent for two idle timeouts: only the new proxy's pings keep the session.
    tokio::time::sleep(IDLE * 2).await;
    let last = mcp.record("after-the-silence").await;
    let stats = server.stats().await;
    let requests = tap.requests();
    let pings: Vec<&FramedRequest> = requests[seen_before..]
        .iter()
        .filter(|r| is_ping_of(r, &mcp.session))
        .collect();
    let mut summary = Summary::new("mcp", "first-seen-mid-life", restarted);
    summary.sessions = 1;
    summary.writes = 2;
    let mut acked = Vec::new();
    for (reply, id) in [
        (&one, "first-through-the-new-proxy"),
        (&last, "after-the-silence"),
    ] {
        match recorded(reply, id) {
            Ok(()) => acked.push(id.to_owned()),
            Err(_) => summary.client_errors += 1,
        }
    }
    count_runs(&mut summary, &stats, &acked);
    summary.print(pings.len());

    if let Err(e) = recorded(&one, "first-through-the-new-proxy") {
        panic!("the first request through the new proxy: {e}");
    }
    assert!(
        pings.len() >= 3,
        "{} pings of the session from the new proxy in {:?} (interval {INTERVAL:?})",
        pings.len(),
        IDLE * 2
    );
    for ping in &pings {
        assert_ping_of(ping, &mcp);
    }
    if let Err(e) = recorded(&last, "after-the-silence") {
        panic!("the session did not survive {:?} of silence: {e}", IDLE * 2);
    }
    assert_ran_once(
        &stats.runs,
        &[
            "first-through-the-new-proxy".to_owned(),
            "after-the-silence".to_owned(),
        ],
    );
    let sessions = admin_sessions(&second).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
}

/// The stateless protocol revision (no `initialize`, no session).
const STATELESS: &str = "2026-07-28";

/// `POST` of one 2026-07-28 request: `MCP-Protocol-Version` and `Mcp-Method`
/// (and `Mcp-Name`, when given) headers, no `Mcp-Session-Id`.
async fn post_stateless(endpoint: &str, message: &Value, name: Option<&str>) -> Reply {
    let method = message["method"].as_str().expect("a method");
    let mut req = client()
        .post(endpoint)
        .header("content-type", "application/json")
        .header("accept", PING_ACCEPT)
        .header("mcp-protocol-version", STATELESS)
        .header("mcp-method", method);
    if let Some(name) = name {
        req = req.header("mcp-name", name);
    }
    send(req.body(message.to_string())).await
}

/// A 2026-07-28 request: `params` with the per-request `_meta` envelope
/// (protocol revision, client capabilities) that the revision requires.
fn stateless_request(id: u64, method: &str, mut params: Value) -> Value {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": STATELESS,
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// Requests of the stateless 2026-07-28 revision (`MCP-Protocol-Version: 2026-07-28`, no `Mcp-Session-Id`) get the server's answer unchanged, successes and errors alike; no session is tracked and no ping follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stateless_revision_passes_through_untracked() {
    let Some(s) = Setup::start(FaultPlan::none()).await else {
        return;
    };
    let (proxied, direct) = (s.proxy.url("/mcp"), format!("{}/mcp", s.server.url()));
    // Each request through the proxy and straight to the server: the same answer.
    let same_answer = |what: &str, via: &Reply, straight: &Reply| {
        assert_eq!(
            (via.status, &via.content_type, &via.body),
            (straight.status, &straight.content_type, &straight.body),
            "{what}: through the proxy (left) and straight from the server (right)"
        );
        assert_eq!(via.session, None, "{what}: a session id? {via:?}");
        assert_eq!(via.attempts, None, "{what}: {via:?}");
    };

    let list = stateless_request(1, "tools/list", json!({}));
    let via = post_stateless(&proxied, &list, None).await;
    let straight = post_stateless(&direct, &list, None).await;
    assert_eq!(via.status, 200, "tools/list: {via:?}");
    assert!(via.content_type.starts_with("application/json"), "{via:?}");
    let message = via.message().unwrap_or_else(|| panic!("{via:?}"));
    assert_eq!(message["result"]["tools"][0]["name"], "record", "{message}");
    same_answer("tools/list", &via, &straight);

    // A tool call: the answers differ only in the call id the tool echoes.
    let call = |call_id: &str| {
        let params = json!({"name": "record", "arguments": {"call_id": call_id}});
        stateless_request(2, "tools/call", params)
    };
    let via = post_stateless(&proxied, &call("stateless-call"), Some("record")).await;
    let straight = post_stateless(&direct, &call("stateless-direct"), Some("record")).await;
    if let Err(e) = recorded(&via, "stateless-call") {
        panic!("{e}");
    }
    let straight = Reply {
        body: straight.body.replace("stateless-direct", "stateless-call"),
        ..straight
    };
    same_answer("tools/call", &via, &straight);

    // Without the `_meta` envelope the SDK answers 400 with a JSON-RPC
    // error (-32602): passed through as it is.
    let bare = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}});
    let via = post_stateless(&proxied, &bare, None).await;
    let straight = post_stateless(&direct, &bare, None).await;
    assert_eq!(via.status, 400, "{via:?}");
    assert_eq!(
        via.message().map(|m| m["error"]["code"].clone()),
        Some(json!(-32602)),
        "{via:?}"
    );
    same_answer("tools/list without _meta", &via, &straight);

    // The tap saw the three proxied requests as sent: no session id added.
    let requests = s.tap.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!(
            r.header("mcp-protocol-version"),
            Some(STATELESS),
            "{}",
            r.head
        );
        assert_eq!(r.header("mcp-session-id"), None, "{}", r.head);
    }

    // Two heartbeat intervals and more: nothing tracked, no ping sent.
    tokio::time::sleep(INTERVAL * 5 / 2).await;
    let stats = s.server.stats().await;
    let mut summary = s.summary("stateless-revision");
    summary.writes = 1;
    count_runs(&mut summary, &stats, &["stateless-call".to_owned()]);
    summary.print(s.pings_on_the_wire());
    let sessions = admin_sessions(&s.proxy).await;
    assert!(sessions.is_empty(), "tracked: {sessions:?}");
    let metrics = s.proxy.metrics().await;
    assert_eq!(
        testkit::metric_value(&metrics, "idemproxy_sessions"),
        Some(0.0),
        "sessions tracked (gauge)"
    );
    assert_eq!(s.heartbeats().await, 0.0, "heartbeats counted");
    assert_eq!(
        s.tap.count_containing(r#""method":"ping""#),
        0,
        "pings on the wire: {:?}",
        s.tap.request_lines()
    );
    assert_eq!(s.tap.requests().len(), 3, "{:?}", s.tap.request_lines());
    assert_eq!(stats.sessions, 0, "the SDK holds a session");
    assert_eq!(
        stats.runs.get("stateless-call"),
        Some(&1),
        "{:?}",
        stats.runs
    );
}
