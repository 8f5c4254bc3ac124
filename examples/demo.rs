//! What idemproxy is for, in one command:
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --writes 2000 --fail-rate 0.3 --seed 1
//! cargo run --release --example demo -- --retry-budget-ratio 0.2     # idemproxy's default budget
//! cargo run --release --example demo -- -- --retry-on 5xx            # extra idemproxy flags after `--`
//! cargo run --release --example demo -- --session-ttl 2s --agent-time 8s
//! ```
//!
//! It shows three failures of an unchanged client, each run directly and then through idemproxy,
//! each run on a fresh backend (the example session backend, `testkit/src/backend.rs`, in
//! this process):
//!
//! - **Part 1, lost writes**: an append workload against a backend with injected faults on
//!   writes (503s, resets, and "store-then-drop": the entry is stored, then the connection closes
//!   before the answer).
//! - **Part 2, a busy agent's session expires**: the backend's sessions expire `--session-ttl`
//!   after creation or the last heartbeat, and ordinary calls do not extend them. An agent creates
//!   a session and appends an entry every sixth of the TTL for `--agent-time`. Directly it sends no
//!   heartbeat (it is busy, not idle), and the session dies under it; through idemproxy
//!   (`--profile session-api`, a heartbeat every third of the TTL) the session stays alive. Both
//!   runs go on at the same time.
//! - **Part 3, a side effect whose answer is lost**: the agent calls `POST
//!   /v1/sessions/{sid}/actions` (say, "send the email"), which has no natural key; the backend
//!   runs it and drops the connection before answering (`--store-then-drop-rate 1 --max-faults
//!   1`). A typical retrying client runs it twice. idemproxy, with no opt-in, does not replay a
//!   non-idempotent request that may have been processed: it runs once and the client gets a 502
//!   whose JSON body says `"may_have_been_processed": true`.
//!
//! Part 1 runs the same append workload twice, each time on a fresh backend with the same seed
//! (so both runs face the same sequence of faults):
//!
//! 1. **direct**: a typical client POSTs `{"uuid", "text"}` to `/v1/sessions/{sid}/entries`,
//!    retries a connection error or a 5xx up to `--client-retries` times, and treats a `409`
//!    as a failure. That is the real-world bug: the retry of a write whose answer was lost finds
//!    the entry already stored, gets `409 Conflict`, and the client gives up on an entry that is
//!    in fact stored.
//! 2. **through idemproxy**: the same client, pointed at an in-process idemproxy, with no
//!    retries of its own. idemproxy retries, and verifies a `409` by reading the entry back.
//!
//! After each part it reads the backend's truth (the stored entries, its counters, idemproxy's
//! `/metrics`) and prints a side-by-side table and an explanation computed from the numbers. It
//! exits 1 if, through idemproxy, a write was lost or the client saw an error (part 1), the
//! session died or an append failed (part 2), or the action did not run exactly once with a 502
//! saying it may have been processed (part 3), so it doubles as a smoke check; and 2 if the demo
//! itself could not run. The backend logs every injected fault on stderr; add `2>/dev/null` to
//! see only the report.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Display};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use idemproxy::config::{Args, Config, ProcessEnv};
use idemproxy::retry::RetryConfig;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde_json::{Value, json};
use testkit::backend::{Backend, Options as BackendOptions, Stats, parse_duration};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The route table the proxied run uses: session entries are verified by reading them back.
const ROUTES: &str = "POST /v1/sessions/{sid}/entries session=path:sid verify=GET:/v1/sessions/{sid}/entries/{body.uuid}";

/// The backend profile of parts 2 and 3: the README's one line for this backend. Sessions
/// are learned from the create call's answer and from the path; the actions route matches
/// its last line, which has no `verify=`.
const PROFILE: &str = "session-api";

/// The heartbeat the profile sends (the only call that extends a session).
const HEARTBEAT: &str = "POST /v1/sessions/{session}/heartbeat";

/// What the agent of part 3 asks the backend to do.
const ACTION: &str =
    r#"{"action":"send_email","to":"user@example.com","subject":"Your report is ready"}"#;

/// Longest wait for one HTTP exchange of the demo's client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a server to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Parser, Debug)]
#[command(
    name = "demo",
    about = "Runs the same workloads against a faulty backend directly and through idemproxy, and compares what was lost: writes, a busy agent's session, a side effect run twice.",
    max_term_width = 100
)]
struct Demo {
    /// Entries appended in each run.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    writes: u32,
    /// Writes in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// Fraction of write attempts the backend answers 503 without storing.
    #[arg(long, default_value_t = 0.20, value_parser = parse_rate)]
    fail_rate: f64,
    /// Fraction of write attempts the backend stores, then drops the connection without answering.
    #[arg(long, default_value_t = 0.10, value_parser = parse_rate)]
    store_then_drop_rate: f64,
    /// Fraction of write attempts the backend resets before storing.
    #[arg(long, default_value_t = 0.05, value_parser = parse_rate)]
    reset_rate: f64,
    /// Seed of the backend's fault generator (both runs use it).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Retries of the direct client on a connection error or a 5xx (409 is fatal to it).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=20))]
    client_retries: u32,
    /// Retries of the same client when it goes through idemproxy (an unchanged client may keep
    /// its own; the point of the sidecar is that it need not).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    proxied_client_retries: u32,
    /// idemproxy --max-attempts (its default is 5; this backend faults far more writes than a
    /// real one, see the explanation printed at the end).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=50))]
    max_attempts: u32,
    /// idemproxy --backoff-base.
    #[arg(long, default_value = "10ms")]
    backoff_base: String,
    /// idemproxy --retry-budget-ratio (its default is 0.2: one retry per five requests).
    #[arg(long, default_value = "1.0")]
    retry_budget_ratio: String,
    /// idemproxy --retry-budget-min-per-sec.
    #[arg(long, default_value = "10")]
    retry_budget_min_per_sec: String,
    /// Part 2: the backend's session lifetime after creation or the last heartbeat (ordinary
    /// calls do not extend it). idemproxy heartbeats every third of it; the agent appends every
    /// sixth.
    #[arg(long, default_value = "3s", value_parser = parse_ttl)]
    session_ttl: Duration,
    /// Part 2: how long the busy agent works.
    #[arg(long, default_value = "10s", value_parser = parse_agent_time)]
    agent_time: Duration,
    /// Show idemproxy's logs with this filter (e.g. info, idemproxy=debug); off by default.
    #[arg(long)]
    log: Option<String>,
    /// The whole demo must finish within this many seconds.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=3600))]
    time_limit: u64,
    /// Extra idemproxy flags (after `--`), appended to the ones the demo sets.
    #[arg(last = true, value_name = "IDEMPROXY_FLAGS")]
    proxy_args: Vec<String>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("expected a fraction between 0 and 1, got {s:?}")),
    }
}

/// A session TTL between 300 ms and 60 s.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if (Duration::from_millis(300)..=Duration::from_secs(60)).contains(&d) {
        Ok(d)
    } else {
        Err(format!(
            "expected a duration between 300ms and 60s, got {s:?}"
        ))
    }
}

/// An agent run between 1 s and 5 min.
fn parse_agent_time(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if (Duration::from_secs(1)..=Duration::from_secs(300)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("expected a duration between 1s and 5m, got {s:?}"))
    }
}

impl Demo {
    /// Fraction of write attempts that get any fault.
    fn fault_rate(&self) -> f64 {
        self.fail_rate + self.store_then_drop_rate + self.reset_rate
    }

    /// Part 2: idemproxy's heartbeat interval, a third of the session TTL.
    fn heartbeat_interval(&self) -> Duration {
        self.session_ttl / 3
    }

    /// Part 2: the time between two appends of the busy agent, half the heartbeat interval.
    fn append_period(&self) -> Duration {
        self.heartbeat_interval() / 2
    }

    /// Part 2: the appends the busy agent makes in `--agent-time`.
    fn agent_appends(&self) -> u32 {
        let n = self.agent_time.as_millis() / self.append_period().as_millis().max(1);
        u32::try_from(n).unwrap_or(u32::MAX).max(1)
    }
}

// ---------------------------------------------------------------------------
// The client: what an agent's session writer typically does
// ---------------------------------------------------------------------------

/// Why the client gave up on a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// A `409`: the client takes it as "not persisted" and gives up.
    Conflict,
    /// Another status: a 5xx after all retries, or a 4xx.
    Status(u16),
    /// No response after all retries.
    Transport,
}

/// What the client believes about one write.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// `None`: the client got a 2xx and believes the entry is stored.
    failure: Option<Failure>,
    /// Requests the client sent for this write.
    client_attempts: u32,
    /// `x-idemproxy-attempts` of the final answer (1 when absent).
    proxy_attempts: u32,
    /// The final answer carried `x-idemproxy-recovered`.
    recovered: bool,
}

/// The final answer to a POST as a typical client sees it.
struct Answer {
    /// The status, headers and body of the final answer; `None`: no answer (connection failed).
    response: Option<(StatusCode, HeaderMap, Bytes)>,
    /// Requests the client sent.
    attempts: u32,
}

/// POSTs a JSON `body`, retrying a connection error or a 5xx up to `retries` times with a
/// short doubling pause; any other answer is final. This is what a typical client does.
async fn post_retrying(client: &reqwest::Client, url: &str, body: &str, retries: u32) -> Answer {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await;
        let response = match sent {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                // A real client reads the answer; a body cut short counts as a connection error.
                match resp.bytes().await {
                    Ok(bytes) => Some((status, headers, bytes)),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        let retriable = response
            .as_ref()
            .is_none_or(|(status, _, _)| status.is_server_error());
        if !retriable || attempts > retries {
            return Answer { response, attempts };
        }
        tokio::time::sleep(Duration::from_millis(10 << (attempts - 1).min(6))).await;
    }
}

/// Appends one entry with [`post_retrying`]; a non-2xx final answer, notably `409`, is a failure.
async fn append(client: &reqwest::Client, url: &str, body: &str, retries: u32) -> Outcome {
    let answer = post_retrying(client, url, body, retries).await;
    let mut outcome = Outcome {
        failure: Some(Failure::Transport),
        client_attempts: answer.attempts,
        proxy_attempts: 1,
        recovered: false,
    };
    if let Some((status, headers, _)) = &answer.response {
        if status.is_success() {
            outcome.failure = None;
            outcome.proxy_attempts = headers
                .get("x-idemproxy-attempts")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            outcome.recovered = headers.contains_key("x-idemproxy-recovered");
        } else if *status == StatusCode::CONFLICT {
            outcome.failure = Some(Failure::Conflict);
        } else {
            outcome.failure = Some(Failure::Status(status.as_u16()));
        }
    }
    outcome
}

/// Appends every entry of `uuids` with `concurrency` writers; the outcomes are in `uuids` order.
async fn workload(
    client: &reqwest::Client,
    url: &str,
    uuids: &Arc<Vec<String>>,
    concurrency: u32,
    retries: u32,
) -> Result<Vec<Outcome>, BoxError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut writers = JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, uuids, next) =
            (client.clone(), url.to_owned(), uuids.clone(), next.clone());
        writers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(uuid) = uuids.get(i) else { break };
                let body = json!({
                    "uuid": uuid,
                    "type": "assistant",
                    "text": format!("step {i}: the agent's transcript entry"),
                })
                .to_string();
                done.push((i, append(&client, &url, &body, retries).await));
            }
            done
        });
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; uuids.len()];
    while let Some(done) = writers.join_next().await {
        for (i, outcome) in done? {
            if let Some(slot) = outcomes.get_mut(i) {
                *slot = Some(outcome);
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| BoxError::from("a write has no outcome")))
        .collect()
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// A backend serving on a loopback port until [`RunningBackend::stop`].
struct RunningBackend {
    backend: Backend,
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Part 1's backend: faults on writes, sessions that outlive the run.
fn faulty_backend(demo: &Demo) -> BackendOptions {
    BackendOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        session_ttl: Duration::from_secs(600),
        fail_rate: demo.fail_rate,
        store_then_drop_rate: demo.store_then_drop_rate,
        reset_rate: demo.reset_rate,
        max_faults: None,
        latency: Duration::ZERO,
        seed: Some(demo.seed),
        quiet: true,
    }
}

impl RunningBackend {
    async fn start(opts: &BackendOptions) -> Result<Self, BoxError> {
        let listener = TcpListener::bind(opts.listen).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let backend = Backend::new(opts);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(backend.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            backend,
            url,
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(STOP_TIMEOUT, self.task).await;
    }
}

/// The idemproxy flags the demo sets itself (its own flags of the same names change them).
fn demo_proxy_flags(demo: &Demo) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--max-attempts",
        &demo.max_attempts.to_string(),
        "--backoff-base",
        &demo.backoff_base,
        "--retry-budget-ratio",
        &demo.retry_budget_ratio,
        "--retry-budget-min-per-sec",
        &demo.retry_budget_min_per_sec,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(filter) = &demo.log {
        flags.extend(["--log".to_owned(), filter.clone()]);
    }
    flags
}

/// The idemproxy flags of parts 2 and 3, besides [`demo_proxy_flags`].
fn session_proxy_flags(demo: &Demo) -> Vec<String> {
    vec![
        "--profile".to_owned(),
        PROFILE.to_owned(),
        "--heartbeat-interval".to_owned(),
        format!("{}ms", demo.heartbeat_interval().as_millis()),
    ]
}

/// Part 1's idemproxy configuration in front of `upstream`.
fn proxy_config(demo: &Demo, upstream: &str) -> Result<Config, BoxError> {
    proxy_config_with(demo, upstream, ROUTES, &[])
}

/// The idemproxy configuration of parts 2 and 3 in front of `upstream`.
fn session_proxy_config(demo: &Demo, upstream: &str) -> Result<Config, BoxError> {
    proxy_config_with(demo, upstream, "", &session_proxy_flags(demo))
}

/// idemproxy's validated configuration in front of `upstream`: `routes`, the demo's flags,
/// `extra`, then the flags given after `--`.
fn proxy_config_with(
    demo: &Demo,
    upstream: &str,
    routes: &str,
    extra: &[String],
) -> Result<Config, BoxError> {
    let mut argv: Vec<String> = [
        "idemproxy",
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "1s",
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.extend(["--routes".to_owned(), routes.to_owned()]);
    argv.extend(demo_proxy_flags(demo));
    argv.extend(extra.iter().cloned());
    if let Err(e) = Args::try_parse_from_strings(&argv, &ProcessEnv) {
        return Err(format!(
            "idemproxy does not accept the demo's flags: is its retry, 409 or heartbeat layer \
             missing from this build?\n{e}"
        )
        .into());
    }
    argv.extend(demo.proxy_args.iter().cloned());
    let args = Args::try_parse_from_strings(&argv, &ProcessEnv).map_err(|e| {
        format!(
            "idemproxy rejected the flags after `--` ({}); the demo itself sets --routes and {}: \
             change those with the demo's flags of the same name.\n{e}",
            demo.proxy_args.join(" "),
            demo_proxy_flags(demo)
                .iter()
                .chain(extra)
                .filter(|f| f.starts_with("--"))
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        )
    })?;
    Ok(Config::from_args(&args)?)
}

/// Starts idemproxy in this process with `config`.
async fn start_proxy(demo: &Demo, config: Config) -> Result<idemproxy::app::Running, BoxError> {
    if demo.log.is_some() {
        idemproxy::telemetry::init(config.process.log.as_deref(), config.process.log_format);
    }
    Ok(idemproxy::app::start(config).await?)
}

// ---------------------------------------------------------------------------
// Reading the truth
// ---------------------------------------------------------------------------

async fn create_session(client: &reqwest::Client, backend: &str) -> Result<String, BoxError> {
    let resp = client
        .post(format!("{backend}/v1/sessions"))
        .send()
        .await?
        .error_for_status()?;
    let doc: Value = serde_json::from_slice(&resp.bytes().await?)?;
    doc.get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("POST /v1/sessions answered without an id: {doc}").into())
}

/// How many times each uuid is stored in the session (from the backend's entries list).
async fn stored_uuids(
    client: &reqwest::Client,
    backend: &str,
    sid: &str,
) -> Result<HashMap<String, usize>, BoxError> {
    let resp = client
        .get(format!("{backend}/v1/sessions/{sid}/entries"))
        .send()
        .await?
        .error_for_status()?;
    let doc: Value = serde_json::from_slice(&resp.bytes().await?)?;
    let entries = doc
        .get("entries")
        .and_then(Value::as_array)
        .ok_or("the entries list has no \"entries\" array")?;
    let mut seen = HashMap::new();
    for entry in entries {
        let uuid = entry
            .get("uuid")
            .and_then(Value::as_str)
            .ok_or("a stored entry has no uuid")?;
        *seen.entry(uuid.to_owned()).or_insert(0) += 1;
    }
    Ok(seen)
}

/// Counters read from idemproxy's `/metrics` (Prometheus text).
#[derive(Debug, Default)]
struct Metrics {
    /// Metric families declared by `# TYPE` lines.
    declared: HashSet<String>,
    /// (sample name, labels, value).
    samples: Vec<(String, String, f64)>,
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut m = Metrics::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    m.declared.insert(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            m.samples.push((name.to_owned(), labels.to_owned(), value));
        }
        m
    }

    /// The sum of counter `family` (without `_total`) over its labels; `None` if not exported.
    fn counter(&self, family: &str) -> Option<u64> {
        let total = format!("{family}_total");
        let mut found = self.declared.contains(family);
        let mut sum = 0.0;
        for (name, _, value) in &self.samples {
            if *name == total {
                found = true;
                sum += value;
            }
        }
        found.then_some(sum.round() as u64)
    }

    /// The most attempts any request took, from histogram `family` (`None` if not exported,
    /// `Some(None)` if some request went past its largest finite bucket).
    fn histogram_max(&self, family: &str) -> Option<Option<u64>> {
        let count_name = format!("{family}_count");
        let bucket_name = format!("{family}_bucket");
        let count = self
            .samples
            .iter()
            .find(|(name, _, _)| *name == count_name)
            .map(|(_, _, v)| *v)?;
        let mut best: Option<f64> = None;
        for (name, labels, value) in &self.samples {
            let Some(le) = labels
                .strip_prefix("le=\"")
                .and_then(|l| l.strip_suffix('"'))
                .and_then(|l| l.parse::<f64>().ok())
            else {
                continue;
            };
            if *name == bucket_name && le.is_finite() && *value >= count {
                best = Some(best.map_or(le, |b: f64| b.min(le)));
            }
        }
        Some(best.map(|b| b.round() as u64))
    }

    /// `label=value` pairs of counter `family` with their values, largest first.
    fn counter_by_label(&self, family: &str) -> Vec<(String, u64)> {
        let total = format!("{family}_total");
        let mut out: Vec<(String, u64)> = self
            .samples
            .iter()
            .filter(|(name, _, v)| *name == total && *v > 0.0)
            .map(|(_, labels, v)| (labels.replace('"', ""), v.round() as u64))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

// ---------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------

/// Everything measured in one run.
struct Report {
    writes: usize,
    elapsed: Duration,
    /// Workload entries present in the backend.
    stored: usize,
    never_stored: usize,
    stored_but_failed: usize,
    /// The client got a 2xx but the entry is not there (must never happen).
    acked_missing: usize,
    /// Extra copies of an entry (the backend's uuid key makes this 0 unless it is broken).
    duplicates: usize,
    /// Stored entries that no write of the run sent.
    foreign: usize,
    errors: usize,
    errors_conflict: usize,
    errors_5xx: usize,
    errors_transport: usize,
    errors_other: usize,
    client_retries: u64,
    max_client_attempts: u32,
    max_proxy_attempts: u32,
    recovered_seen: usize,
    /// The backend's counters during the workload.
    backend: Stats,
    /// idemproxy's counters (the proxied run only).
    proxy: Option<Metrics>,
}

impl Report {
    fn lost(&self) -> usize {
        self.never_stored + self.stored_but_failed
    }
}

/// The backend's counters added between `before` and `after`.
fn stats_delta(before: &Stats, after: &Stats) -> Stats {
    let mut d = after.clone();
    d.requests -= before.requests.min(d.requests);
    d.entries_total -= before.entries_total.min(d.entries_total);
    d.docs_total -= before.docs_total.min(d.docs_total);
    d.actions_total -= before.actions_total.min(d.actions_total);
    d.conflicts -= before.conflicts.min(d.conflicts);
    d.heartbeats -= before.heartbeats.min(d.heartbeats);
    d.faults.fail -= before.faults.fail.min(d.faults.fail);
    d.faults.store_then_drop -= before.faults.store_then_drop.min(d.faults.store_then_drop);
    d.faults.reset -= before.faults.reset.min(d.faults.reset);
    d
}

/// idemproxy's `/metrics` (`None` for a direct run).
async fn proxy_metrics(
    reader: &reqwest::Client,
    proxy: Option<&idemproxy::app::Running>,
) -> Result<Option<Metrics>, BoxError> {
    let Some(p) = proxy else { return Ok(None) };
    let text = reader
        .get(format!("http://{}/metrics", p.admin_addr))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(Some(Metrics::parse(&text)))
}

/// Stops a proxy that a run started, waiting a little for it to drain.
async fn stop_proxy(proxy: Option<idemproxy::app::Running>) {
    if let Some(proxy) = proxy {
        proxy.shutdown();
        let _ = tokio::time::timeout(STOP_TIMEOUT, proxy.wait()).await;
    }
}

/// Where a run's client sends its requests, and how often it retries on its own.
fn client_target(
    demo: &Demo,
    backend: &RunningBackend,
    proxy: Option<&idemproxy::app::Running>,
) -> (String, u32) {
    match proxy {
        Some(p) => (
            format!("http://{}", p.listen_addr),
            demo.proxied_client_retries,
        ),
        None => (backend.url.clone(), demo.client_retries),
    }
}

/// Runs the workload on a fresh backend, directly (`proxied == false`) or through idemproxy.
async fn run(demo: &Demo, proxied: bool, reader: &reqwest::Client) -> Result<Report, BoxError> {
    let backend = RunningBackend::start(&faulty_backend(demo)).await?;
    let result = run_on(demo, proxied, reader, &backend).await;
    backend.stop().await;
    result
}

async fn run_on(
    demo: &Demo,
    proxied: bool,
    reader: &reqwest::Client,
    backend: &RunningBackend,
) -> Result<Report, BoxError> {
    let sid = create_session(reader, &backend.url).await?;
    let proxy = if proxied {
        Some(start_proxy(demo, proxy_config(demo, &backend.url)?).await?)
    } else {
        None
    };
    let result = measure(demo, reader, backend, &sid, proxy.as_ref()).await;
    stop_proxy(proxy).await;
    result
}

async fn measure(
    demo: &Demo,
    reader: &reqwest::Client,
    backend: &RunningBackend,
    sid: &str,
    proxy: Option<&idemproxy::app::Running>,
) -> Result<Report, BoxError> {
    let (base, retries) = client_target(demo, backend, proxy);
    let uuids: Arc<Vec<String>> = Arc::new(
        (0..demo.writes)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect(),
    );
    // The agent's client: a pool sized for the writers, no system proxy, bounded exchanges.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(CLIENT_TIMEOUT)
        .pool_max_idle_per_host(demo.concurrency as usize)
        .build()?;
    let before = backend.backend.stats();
    let started = Instant::now();
    let url = format!("{base}/v1/sessions/{sid}/entries");
    let outcomes = workload(&client, &url, &uuids, demo.concurrency, retries).await?;
    let elapsed = started.elapsed();
    let backend_stats = stats_delta(&before, &backend.backend.stats());
    let metrics = proxy_metrics(reader, proxy).await?;

    let stored = stored_uuids(reader, &backend.url, sid).await?;
    let total_entries: usize = stored.values().sum();
    let count = backend.backend.entry_count(sid);
    if count != total_entries {
        return Err(format!("the backend counts {count} entries but lists {total_entries}").into());
    }
    let sent: HashSet<&str> = uuids.iter().map(String::as_str).collect();
    let mut r = Report {
        writes: uuids.len(),
        elapsed,
        stored: 0,
        never_stored: 0,
        stored_but_failed: 0,
        acked_missing: 0,
        duplicates: stored.values().map(|n| n.saturating_sub(1)).sum(),
        foreign: stored.keys().filter(|u| !sent.contains(u.as_str())).count(),
        errors: 0,
        errors_conflict: 0,
        errors_5xx: 0,
        errors_transport: 0,
        errors_other: 0,
        client_retries: 0,
        max_client_attempts: 0,
        max_proxy_attempts: 0,
        recovered_seen: 0,
        backend: backend_stats,
        proxy: metrics,
    };
    for (uuid, outcome) in uuids.iter().zip(&outcomes) {
        let is_stored = stored.contains_key(uuid);
        r.stored += usize::from(is_stored);
        r.client_retries += u64::from(outcome.client_attempts.saturating_sub(1));
        r.max_client_attempts = r.max_client_attempts.max(outcome.client_attempts);
        r.max_proxy_attempts = r.max_proxy_attempts.max(outcome.proxy_attempts);
        r.recovered_seen += usize::from(outcome.recovered);
        match (outcome.failure, is_stored) {
            (None, true) => {}
            (None, false) => r.acked_missing += 1,
            (Some(_), true) => r.stored_but_failed += 1,
            (Some(_), false) => r.never_stored += 1,
        }
        if let Some(failure) = outcome.failure {
            r.errors += 1;
            match failure {
                Failure::Conflict => r.errors_conflict += 1,
                Failure::Status(s) if s >= 500 => r.errors_5xx += 1,
                Failure::Status(_) => r.errors_other += 1,
                Failure::Transport => r.errors_transport += 1,
            }
        }
    }
    Ok(r)
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

const LABEL: usize = 40;

fn row(label: &str, direct: impl Display, proxied: impl Display) {
    println!("{label:<LABEL$}{direct:>10}{proxied:>20}");
}

/// A value, or `n/a` when idemproxy does not export it.
struct Opt(Option<u64>);

impl Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => "n/a".fmt(f),
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn print_table(direct: &Report, proxied: &Report) {
    let m = proxied.proxy.as_ref();
    let counter = |name: &str| Opt(m.and_then(|m| m.counter(name)));
    println!("{:<LABEL$}{:>10}{:>20}", "", "direct", "through idemproxy");
    row("writes", direct.writes, proxied.writes);
    row("stored in the backend", direct.stored, proxied.stored);
    row("lost writes", direct.lost(), proxied.lost());
    row("  never stored", direct.never_stored, proxied.never_stored);
    row(
        "  stored, but the client was told failed",
        direct.stored_but_failed,
        proxied.stored_but_failed,
    );
    row("client-visible errors", direct.errors, proxied.errors);
    row(
        "  409 Conflict (the client gives up)",
        direct.errors_conflict,
        proxied.errors_conflict,
    );
    row(
        "  5xx as the final answer",
        direct.errors_5xx,
        proxied.errors_5xx,
    );
    row(
        "  no answer (connection failed)",
        direct.errors_transport,
        proxied.errors_transport,
    );
    if direct.errors_other + proxied.errors_other > 0 {
        row("  other 4xx", direct.errors_other, proxied.errors_other);
    }
    row(
        "acknowledged, but not stored",
        direct.acked_missing,
        proxied.acked_missing,
    );
    row(
        "duplicates in the backend",
        direct.duplicates,
        proxied.duplicates,
    );
    if direct.foreign + proxied.foreign > 0 {
        row(
            "stored entries nobody sent",
            direct.foreign,
            proxied.foreign,
        );
    }
    row(
        "write attempts faulted by the backend",
        faults(&direct.backend),
        faults(&proxied.backend),
    );
    row(
        "409 Conflicts (backend's count)",
        direct.backend.conflicts,
        proxied.backend.conflicts,
    );
    row(
        "409s recovered (verified by a read)",
        "-",
        counter("idemproxy_conflicts_recovered"),
    );
    row(
        "retries by the client",
        direct.client_retries,
        proxied.client_retries,
    );
    row("retries by idemproxy", "-", counter("idemproxy_retries"));
    row(
        "verification reads by idemproxy",
        "-",
        Opt(verification_reads(proxied)),
    );
    row(
        "most attempts for one write",
        direct.max_client_attempts,
        most_proxy_attempts(proxied),
    );
    row(
        "upstream requests (backend's count)",
        direct.backend.requests,
        proxied.backend.requests,
    );
    row("wall time", secs(direct.elapsed), secs(proxied.elapsed));
}

/// The most upstream attempts idemproxy made for one request: from its `idemproxy_attempts`
/// histogram (the `x-idemproxy-attempts` header is absent on recovered answers), else the header.
fn most_proxy_attempts(r: &Report) -> String {
    let header = r.max_proxy_attempts.max(r.max_client_attempts);
    match r
        .proxy
        .as_ref()
        .and_then(|m| m.histogram_max("idemproxy_attempts"))
    {
        Some(Some(n)) => n.max(u64::from(header)).to_string(),
        Some(None) => format!(">{}", header.max(10)),
        None => header.to_string(),
    }
}

/// Upstream requests that were neither a client's write nor an idemproxy retry: the
/// verification reads (the only other requests idemproxy sends on this route table).
fn verification_reads(r: &Report) -> Option<u64> {
    let retries = r.proxy.as_ref()?.counter("idemproxy_retries")?;
    let writes = r.writes as u64 + r.client_retries;
    Some(r.backend.requests.saturating_sub(writes + retries))
}

fn faults(s: &Stats) -> u64 {
    s.faults.fail + s.faults.store_then_drop + s.faults.reset
}

fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// "is" or "are" for a count.
fn is_are(n: usize) -> &'static str {
    if n == 1 { "is" } else { "are" }
}

/// The explanation, computed from the numbers.
fn explain(demo: &Demo, retry: &RetryConfig, direct: &Report, proxied: &Report) -> Vec<String> {
    let mut out = Vec::new();

    // The direct run.
    let d = &direct.backend;
    let mut s = format!(
        "Direct: the backend faulted {} of {} write attempts ({} answered 503, {} stored the \
         entry and then dropped the connection, {} reset before storing), and the client retried \
         {}.",
        faults(d),
        d.requests,
        d.faults.fail,
        d.faults.store_then_drop,
        d.faults.reset,
        plural(direct.client_retries, "time", "times"),
    );
    if direct.errors_conflict > 0 {
        s.push_str(&format!(
            " But a retry of a write whose answer was lost finds the entry already stored and \
             gets 409 Conflict, and the client, like many real ones, treats a 409 as a failure: \
             it gave up on {} that way.",
            plural(direct.errors_conflict as u64, "entry", "entries"),
        ));
    }
    if direct.stored_but_failed > 0 {
        s.push_str(&format!(
            " In all, {} the client reported as failed {} in fact stored: the client and the \
             backend now disagree, and retrying more would not help, since every retry of a \
             stored entry answers 409.",
            plural(direct.stored_but_failed as u64, "entry", "entries"),
            is_are(direct.stored_but_failed),
        ));
    }
    if direct.never_stored > 0 {
        s.push_str(&format!(
            " Besides, {} failed all {} attempts and {} never stored.",
            plural(direct.never_stored as u64, "write", "writes"),
            demo.client_retries + 1,
            if direct.never_stored == 1 {
                "was"
            } else {
                "were"
            },
        ));
    }
    if direct.lost() == 0 {
        s.push_str(" No write was lost this time: try more --writes or another --seed.");
    }
    out.push(s);

    // The proxied run.
    let p = &proxied.backend;
    let m = proxied.proxy.as_ref();
    let retries = m.and_then(|m| m.counter("idemproxy_retries"));
    let recovered = m.and_then(|m| m.counter("idemproxy_conflicts_recovered"));
    let passed = m
        .and_then(|m| m.counter("idemproxy_conflicts_passed"))
        .unwrap_or(0);
    let budget_out = m
        .and_then(|m| m.counter("idemproxy_retry_budget_exhausted"))
        .unwrap_or(0);
    let mut s = format!(
        "Through idemproxy: the same client {}. The backend faulted {} of {} write attempts.",
        if proxied.client_retries == 0 {
            "sent each write once and never retried".to_owned()
        } else {
            format!(
                "retried {}",
                plural(proxied.client_retries, "time", "times")
            )
        },
        faults(p),
        p.requests
            .saturating_sub(verification_reads(proxied).unwrap_or(0)),
    );
    match retries {
        Some(retries) => {
            let reasons = m
                .map(|m| m.counter_by_label("idemproxy_retries"))
                .unwrap_or_default()
                .into_iter()
                .map(|(label, n)| format!("{n} on {}", label.trim_start_matches("reason=")))
                .collect::<Vec<_>>()
                .join(", ");
            s.push_str(&format!(
                " idemproxy retried {}{}, each time with the same body.",
                plural(retries, "time", "times"),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({reasons})")
                },
            ));
        }
        None => s.push_str(" idemproxy exports no retry counter: is its retry layer built in?"),
    }
    match recovered {
        Some(recovered) => s.push_str(&format!(
            " When a retry met a 409, it read the entry back (GET \
             /v1/sessions/{{sid}}/entries/{{uuid}}) and answered 200 only if every field it had \
             sent was stored with the same value: {} recovered that way{}.",
            plural(recovered, "409 was", "409s were"),
            if passed > 0 {
                format!(", {passed} passed to the client unchanged")
            } else {
                String::new()
            },
        )),
        None => s.push_str(
            " idemproxy exports no 409 recovery counter: is its verification layer built in?",
        ),
    }
    if proxied.recovered_seen as u64 != recovered.unwrap_or(0) {
        s.push_str(&format!(
            " (The client saw {} answers marked x-idemproxy-recovered.)",
            proxied.recovered_seen
        ));
    }
    s.push_str(&format!(
        " Result: {} of {} entries stored, {} lost, {}, {}.",
        proxied.stored,
        proxied.writes,
        proxied.lost(),
        plural(
            proxied.errors as u64,
            "client-visible error",
            "client-visible errors"
        ),
        plural(proxied.duplicates as u64, "duplicate", "duplicates"),
    ));
    if budget_out > 0 {
        s.push_str(&format!(
            " The retry budget withheld {} so as not to flood a failing backend; a higher \
             --retry-budget-ratio allows more.",
            plural(budget_out, "retry", "retries"),
        ));
    }
    out.push(s);

    // The cost.
    let mut s = format!(
        "The price: through idemproxy the backend saw {} requests for {} writes",
        p.requests, proxied.writes,
    );
    if let (Some(retries), Some(reads)) = (retries, verification_reads(proxied)) {
        s.push_str(&format!(
            " ({} by idemproxy, {})",
            plural(retries, "retry", "retries"),
            plural(reads, "verification read", "verification reads"),
        ));
    }
    s.push_str(&format!(
        ", against {} direct ({} by the client); wall time {} against {}.",
        d.requests,
        plural(direct.client_retries, "retry", "retries"),
        secs(proxied.elapsed),
        secs(direct.elapsed),
    ));
    out.push(s);

    // What the demo exaggerates, and what it cannot show.
    let rate = demo.fault_rate();
    let n = retry.max_attempts;
    let per_write = rate.powi(i32::try_from(n).unwrap_or(i32::MAX));
    let mut changed = Vec::new();
    if n != RetryConfig::DEFAULT_MAX_ATTEMPTS {
        changed.push(format!(
            "--max-attempts to {n} (default {})",
            RetryConfig::DEFAULT_MAX_ATTEMPTS
        ));
    }
    if retry.budget_ratio != RetryConfig::DEFAULT_BUDGET_RATIO {
        changed.push(format!(
            "--retry-budget-ratio to {} (default {})",
            retry.budget_ratio,
            RetryConfig::DEFAULT_BUDGET_RATIO
        ));
    }
    let mut s = format!(
        "Caveats: this backend faults {:.0}% of write attempts, far more than a real one{}. The \
         direct client makes up to {} attempts. A write still fails through idemproxy if all {n} \
         of its attempts are faulted: {:.1e} per write here, {:.3} expected in {} writes.",
        rate * 100.0,
        if changed.is_empty() {
            String::new()
        } else {
            format!(", so the demo sets idemproxy's {}", changed.join(" and "))
        },
        demo.client_retries + 1,
        per_write,
        per_write * f64::from(demo.writes),
        demo.writes,
    );
    let unseen_direct = d.conflicts.saturating_sub(direct.errors_conflict as u64);
    let unseen_proxied = p.conflicts.saturating_sub(recovered.unwrap_or(0) + passed);
    if unseen_direct + unseen_proxied > 0 {
        s.push_str(&format!(
            " The backend's 409 count includes retries whose 409 was itself dropped by a fault \
             ({unseen_direct} direct, {unseen_proxied} through idemproxy): nobody saw those."
        ));
    }
    if direct.duplicates == 0 && proxied.duplicates == 0 {
        s.push_str(
            " There are no duplicates in either run because the backend keys entries by uuid; \
             that same key is what turns a lost answer into a 409.",
        );
    }
    s.push_str(&format!(
        " Each run had a fresh backend with seed {}, so both drew the same sequence of faults; \
         which write gets which fault depends on timing, so totals vary a little between runs.",
        demo.seed,
    ));
    out.push(s);
    out
}

/// Wraps `text` at `width` columns.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in text.split_whitespace() {
        if line > 0 && line + 1 + word.len() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out
}

// ---------------------------------------------------------------------------
// Part 2: a busy agent whose session expires
// ---------------------------------------------------------------------------

/// What part 2 measured in one run.
struct AgentReport {
    appends: u32,
    ok: u32,
    /// Appends answered 404: the session had expired.
    expired: u32,
    /// Appends that failed otherwise.
    other_failures: u32,
    /// When the first append failed, counted from the session's creation.
    first_failure: Option<Duration>,
    /// Heartbeats the backend received (idemproxy's: the direct agent sends none).
    heartbeats: u64,
    /// Time left on the session at the end; `None`: it had expired.
    left: Option<Duration>,
    /// idemproxy's counters (the proxied run only).
    proxy: Option<Metrics>,
}

impl AgentReport {
    fn failed(&self) -> u32 {
        self.expired + self.other_failures
    }
}

/// Part 2's backend: no faults, sessions that live `--session-ttl` unless heartbeated.
fn expiring_backend(demo: &Demo) -> BackendOptions {
    BackendOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        session_ttl: demo.session_ttl,
        seed: Some(demo.seed),
        quiet: true,
        ..BackendOptions::default()
    }
}

/// The agent's client: no system proxy, bounded exchanges.
fn agent_client() -> Result<reqwest::Client, BoxError> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(CLIENT_TIMEOUT)
        .build()?)
}

/// Runs part 2 on a fresh backend, directly (`proxied == false`) or through idemproxy.
async fn busy_agent(
    demo: &Demo,
    proxied: bool,
    reader: &reqwest::Client,
) -> Result<AgentReport, BoxError> {
    let backend = RunningBackend::start(&expiring_backend(demo)).await?;
    let result = busy_agent_on(demo, proxied, reader, &backend).await;
    backend.stop().await;
    result
}

async fn busy_agent_on(
    demo: &Demo,
    proxied: bool,
    reader: &reqwest::Client,
    backend: &RunningBackend,
) -> Result<AgentReport, BoxError> {
    let proxy = if proxied {
        Some(start_proxy(demo, session_proxy_config(demo, &backend.url)?).await?)
    } else {
        None
    };
    let result = agent_work(demo, reader, backend, proxy.as_ref()).await;
    stop_proxy(proxy).await;
    result
}

/// The busy agent: creates a session, appends an entry every [`Demo::append_period`] and never
/// heartbeats (it is working, not waiting); then the backend's truth about the session.
async fn agent_work(
    demo: &Demo,
    reader: &reqwest::Client,
    backend: &RunningBackend,
    proxy: Option<&idemproxy::app::Running>,
) -> Result<AgentReport, BoxError> {
    let (base, retries) = client_target(demo, backend, proxy);
    let client = agent_client()?;
    let before = backend.backend.stats();
    // Created where the agent sends everything: idemproxy learns the id from the answer.
    let sid = create_session(&client, &base).await?;
    let created = Instant::now();
    let url = format!("{base}/v1/sessions/{sid}/entries");
    let mut r = AgentReport {
        appends: 0,
        ok: 0,
        expired: 0,
        other_failures: 0,
        first_failure: None,
        heartbeats: 0,
        left: None,
        proxy: None,
    };
    let mut ticks = tokio::time::interval(demo.append_period());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..demo.agent_appends() {
        ticks.tick().await;
        let body = json!({
            "uuid": uuid::Uuid::new_v4().to_string(),
            "type": "assistant",
            "text": format!("step {i}: still working on it"),
        })
        .to_string();
        let outcome = append(&client, &url, &body, retries).await;
        r.appends += 1;
        match outcome.failure {
            None => r.ok += 1,
            Some(Failure::Status(404)) => r.expired += 1,
            Some(_) => r.other_failures += 1,
        }
        if outcome.failure.is_some() && r.first_failure.is_none() {
            r.first_failure = Some(created.elapsed());
        }
    }
    r.heartbeats = stats_delta(&before, &backend.backend.stats()).heartbeats;
    r.proxy = proxy_metrics(reader, proxy).await?;
    // The truth, from the backend itself, while idemproxy still runs.
    let resp = reader
        .get(format!("{}/v1/sessions/{sid}", backend.url))
        .send()
        .await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    r.left = match status {
        StatusCode::OK => {
            let doc: Value = serde_json::from_slice(&bytes)?;
            let ms = doc
                .get("expires_in_ms")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("GET /v1/sessions/{{sid}} has no expires_in_ms: {doc}"))?;
            Some(Duration::from_millis(ms))
        }
        StatusCode::NOT_FOUND => None,
        other => return Err(format!("GET /v1/sessions/{{sid}} answered {other}").into()),
    };
    Ok(r)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// A duration for people: `500 ms`, `3 s`, `2.4 s`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// A measured duration, to a tenth of a second.
fn secs1(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn print_agent_table(demo: &Demo, direct: &AgentReport, proxied: &AgentReport) {
    let first = |r: &AgentReport| r.first_failure.map_or_else(|| "-".to_owned(), secs1);
    let left = |r: &AgentReport| r.left.map_or_else(|| "-".to_owned(), secs1);
    println!("{:<LABEL$}{:>10}{:>20}", "", "direct", "through idemproxy");
    row(
        &format!(
            "appends (every {}, {})",
            human(demo.append_period()),
            human(demo.agent_time)
        ),
        direct.appends,
        proxied.appends,
    );
    row("  answered 2xx", direct.ok, proxied.ok);
    row("  failed", direct.failed(), proxied.failed());
    row(
        "    404: the session had expired",
        direct.expired,
        proxied.expired,
    );
    if direct.other_failures + proxied.other_failures > 0 {
        row(
            "    other failures",
            direct.other_failures,
            proxied.other_failures,
        );
    }
    row(
        "first failed append, after the create",
        first(direct),
        first(proxied),
    );
    row(
        "heartbeats (backend's count)",
        direct.heartbeats,
        proxied.heartbeats,
    );
    row(
        "session alive at the end",
        yes_no(direct.left.is_some()),
        yes_no(proxied.left.is_some()),
    );
    row("  time left on it", left(direct), left(proxied));
}

/// Part 2's explanation, computed from the numbers.
fn explain_agent(demo: &Demo, direct: &AgentReport, proxied: &AgentReport) -> Vec<String> {
    let mut out = Vec::new();
    let ttl = human(demo.session_ttl);
    let interval = human(demo.heartbeat_interval());
    let period = human(demo.append_period());
    let mut s = format!(
        "Direct: the agent created its session and appended an entry every {period} for {}. \
         This backend extends a session only on a heartbeat, not on ordinary calls, and a busy \
         agent sends none: it heartbeats while it waits, not while it works.",
        human(demo.agent_time),
    );
    match direct.first_failure {
        Some(first) => s.push_str(&format!(
            " The session expired {ttl} after its creation, under the working agent: from {} on, \
             {} of {} appends failed ({} with 404, session expired){}.",
            secs1(first),
            direct.failed(),
            direct.appends,
            direct.expired,
            if direct.left.is_none() {
                ", and the session is gone"
            } else {
                ""
            },
        )),
        None => s.push_str(&format!(
            " No append failed: the agent stopped before its session's {ttl} ran out; try a \
             longer --agent-time."
        )),
    }
    out.push(s);

    let outcomes = proxied
        .proxy
        .as_ref()
        .map(|m| m.counter_by_label("idemproxy_heartbeats"))
        .unwrap_or_default()
        .into_iter()
        .map(|(label, n)| format!("{n} {}", label.trim_start_matches("outcome=")))
        .collect::<Vec<_>>()
        .join(", ");
    let outcomes = if outcomes.is_empty() {
        String::new()
    } else {
        format!(" (idemproxy's count: {outcomes})")
    };
    let mut s = format!(
        "Through idemproxy: the same agent, unchanged. idemproxy learned the session id from the \
         create call's answer (session=response-json:id) and is configured to send {HEARTBEAT} \
         every {interval}, counted from the session's last renewal (a heartbeat answered alive). \
         The backend received {}{outcomes}.",
        plural(proxied.heartbeats, "heartbeat", "heartbeats"),
    );
    match (proxied.failed(), proxied.left) {
        (0, Some(left)) => s.push_str(&format!(
            " {} of {} appends succeeded, and the session is alive at the end with {} left: the \
             agent kept its session although its own calls never extended it.",
            proxied.ok,
            proxied.appends,
            secs1(left),
        )),
        (failed, left) => {
            s.push_str(&format!(
                " But {} of {} appends failed{}{}.",
                failed,
                proxied.appends,
                proxied
                    .first_failure
                    .map(|t| format!(", the first after {}", secs1(t)))
                    .unwrap_or_default(),
                if left.is_none() {
                    ", and the session is gone"
                } else {
                    ""
                },
            ));
            if proxied.heartbeats == 0 {
                s.push_str(&format!(
                    " idemproxy sent no heartbeat: it postponed the session's heartbeat after \
                     every call of the agent, who calls every {period}, more often than the \
                     {interval} interval; but here a call does not renew the session, so it \
                     expired."
                ));
            }
        }
    }
    out.push(s);
    out
}

// ---------------------------------------------------------------------------
// Part 3: a side effect whose answer is lost
// ---------------------------------------------------------------------------

/// What part 3 measured in one run.
struct ActionReport {
    /// Requests the client sent for its one call.
    client_requests: u32,
    /// The final answer's status; `None`: no answer at all.
    status: Option<u16>,
    /// `may_have_been_processed` of the answer's JSON body, when it has one.
    may_have_been_processed: Option<bool>,
    /// The `error` field of the answer's JSON body, when it has one.
    error: Option<String>,
    /// Times the backend ran the action.
    runs: u64,
    /// Requests the backend received for the call.
    upstream_requests: u64,
    /// idemproxy's counters (the proxied run only).
    proxy: Option<Metrics>,
}

/// Part 3's backend: the first write (the action) runs, then its connection drops.
fn dropping_backend(demo: &Demo) -> BackendOptions {
    BackendOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        session_ttl: Duration::from_secs(600),
        store_then_drop_rate: 1.0,
        max_faults: Some(1),
        seed: Some(demo.seed),
        quiet: true,
        ..BackendOptions::default()
    }
}

/// Runs part 3 on a fresh backend, directly (`proxied == false`) or through idemproxy.
async fn side_effect(
    demo: &Demo,
    proxied: bool,
    reader: &reqwest::Client,
) -> Result<ActionReport, BoxError> {
    let backend = RunningBackend::start(&dropping_backend(demo)).await?;
    let result = side_effect_on(demo, proxied, reader, &backend).await;
    backend.stop().await;
    result
}

async fn side_effect_on(
    demo: &Demo,
    proxied: bool,
    reader: &reqwest::Client,
    backend: &RunningBackend,
) -> Result<ActionReport, BoxError> {
    let proxy = if proxied {
        Some(start_proxy(demo, session_proxy_config(demo, &backend.url)?).await?)
    } else {
        None
    };
    let result = call_action(demo, reader, backend, proxy.as_ref()).await;
    stop_proxy(proxy).await;
    result
}

/// The agent creates a session and calls the action once, as a typical client does; then the
/// backend's truth about how often it ran.
async fn call_action(
    demo: &Demo,
    reader: &reqwest::Client,
    backend: &RunningBackend,
    proxy: Option<&idemproxy::app::Running>,
) -> Result<ActionReport, BoxError> {
    let (base, retries) = client_target(demo, backend, proxy);
    let client = agent_client()?;
    let sid = create_session(&client, &base).await?;
    let before = backend.backend.stats();
    let url = format!("{base}/v1/sessions/{sid}/actions");
    let answer = post_retrying(&client, &url, ACTION, retries).await;
    let delta = stats_delta(&before, &backend.backend.stats());
    let doc: Option<Value> = answer
        .response
        .as_ref()
        .and_then(|(_, _, body)| serde_json::from_slice(body).ok());
    let field = |name: &str| doc.as_ref().and_then(|d| d.get(name));
    let listed = reader
        .get(format!("{}/v1/sessions/{sid}/actions", backend.url))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let listed: Value = serde_json::from_slice(&listed)?;
    let runs = listed
        .get("runs")
        .and_then(Value::as_u64)
        .ok_or("GET /v1/sessions/{sid}/actions has no \"runs\"")?;
    if runs != delta.actions_total {
        return Err(format!(
            "the backend counts {} actions run but lists {runs}",
            delta.actions_total
        )
        .into());
    }
    Ok(ActionReport {
        client_requests: answer.attempts,
        status: answer.response.as_ref().map(|(s, _, _)| s.as_u16()),
        may_have_been_processed: field("may_have_been_processed").and_then(Value::as_bool),
        error: field("error").and_then(Value::as_str).map(str::to_owned),
        runs,
        upstream_requests: delta.requests,
        proxy: proxy_metrics(reader, proxy).await?,
    })
}

impl ActionReport {
    /// The final answer's status, or `none`.
    fn answer(&self) -> String {
        self.status
            .map_or_else(|| "none".to_owned(), |s| s.to_string())
    }

    /// What the answer's body says about `may_have_been_processed`.
    fn may_have(&self) -> &'static str {
        match (self.status, self.may_have_been_processed) {
            (_, Some(true)) => "true",
            (_, Some(false)) => "false",
            (Some(s), None) if s >= 500 => "absent",
            _ => "-",
        }
    }

    /// What part 3 must show through idemproxy: one run, a 502 saying it may have happened.
    fn proxied_ok(&self) -> bool {
        self.runs == 1 && self.status == Some(502) && self.may_have_been_processed == Some(true)
    }
}

fn print_action_table(direct: &ActionReport, proxied: &ActionReport) {
    let m = proxied.proxy.as_ref();
    let counter = |name: &str| Opt(m.and_then(|m| m.counter(name)));
    println!("{:<LABEL$}{:>10}{:>20}", "", "direct", "through idemproxy");
    row("action calls by the agent", 1, 1);
    row(
        "requests the client sent",
        direct.client_requests,
        proxied.client_requests,
    );
    row(
        "upstream requests (backend's count)",
        direct.upstream_requests,
        proxied.upstream_requests,
    );
    row(
        "times the action ran (backend's count)",
        direct.runs,
        proxied.runs,
    );
    row("answer the client got", direct.answer(), proxied.answer());
    row(
        "  \"may_have_been_processed\"",
        direct.may_have(),
        proxied.may_have(),
    );
    row("retries by idemproxy", "-", counter("idemproxy_retries"));
    row(
        "replays refused as unsafe (idemproxy)",
        "-",
        counter("idemproxy_retries_refused"),
    );
}

/// Part 3's explanation, computed from the numbers.
fn explain_action(demo: &Demo, direct: &ActionReport, proxied: &ActionReport) -> Vec<String> {
    let mut out = Vec::new();
    let mut s = "Direct: the agent asked the backend to send an email (POST \
                 /v1/sessions/{sid}/actions, a call with no natural key). The backend ran it \
                 (sent the email), then the connection dropped before the answer."
        .to_owned();
    if direct.runs > 1 {
        s.push_str(&format!(
            " The client retries a connection error (up to {}), so it sent the call again, and \
             the backend, which cannot tell a repeat from a new call, ran it again: the action \
             ran {} times (the user got {} emails), and the client got {}, so it never learns \
             that anything went wrong.",
            plural(demo.client_retries, "time", "times"),
            direct.runs,
            direct.runs,
            direct.answer(),
        ));
    } else {
        s.push_str(&format!(
            " The action ran {} and the client got {}.",
            plural(direct.runs, "time", "times"),
            direct.answer(),
        ));
    }
    out.push(s);

    let retries = proxied
        .proxy
        .as_ref()
        .and_then(|m| m.counter("idemproxy_retries"))
        .unwrap_or(0);
    let refused = proxied
        .proxy
        .as_ref()
        .and_then(|m| m.counter("idemproxy_retries_refused"));
    let mut s = format!(
        "Through idemproxy: the same call{}. The Idempotency-Key that idemproxy attaches to a \
         POST does not make a replay safe: this backend ignores it, and the call's route (* \
         /v1/sessions/{{sid}}/{{*rest}}) has no verify= rule, so a replay could run the action \
         twice.",
        if demo.proxy_args.is_empty() {
            ", and no opt-in"
        } else {
            ""
        },
    );
    if proxied.proxied_ok() {
        s.push_str(&format!(
            " The connection dropped after the request was sent, so the backend may have run it, \
             and idemproxy did not replay it{}. The action ran once, and the client got 502 with \
             \"may_have_been_processed\": true{}: it is told the truth, and can check (GET \
             /v1/sessions/{{sid}}/actions) before doing it again. A failure after which the \
             backend cannot have processed the request (a refused connection, a 503) is still \
             retried; replays after sending are allowed on a route whose backend honours the key \
             (idempotency-key=honoured), on a route with verify=, or with \
             --retry-unsafe-requests true.",
            match refused {
                Some(n) => format!(
                    " (idemproxy_retries_refused_total: {})",
                    plural(n, "replay", "replays")
                ),
                None => String::new(),
            },
            proxied
                .error
                .as_ref()
                .map(|e| format!(" (error: {e:?})"))
                .unwrap_or_default(),
        ));
    } else if proxied.runs > 1 {
        s.push_str(&format!(
            " Yet idemproxy replayed it after the connection dropped ({}), and the action ran {} \
             times; the client got {}. This build retries a non-idempotent request that may \
             have been processed (or a flag after `--` allows it).",
            plural(retries, "retry", "retries"),
            proxied.runs,
            proxied.answer(),
        ));
    } else {
        s.push_str(&format!(
            " The action ran {} and the client got {} (\"may_have_been_processed\": {}), not \
             the expected single run with a 502 saying it may have been processed.",
            plural(proxied.runs, "time", "times"),
            proxied.answer(),
            proxied.may_have(),
        ));
    }
    out.push(s);
    out
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

async fn demo_main(demo: Demo) -> Result<ExitCode, BoxError> {
    if demo.fault_rate() > 1.0 {
        return Err("--fail-rate + --store-then-drop-rate + --reset-rate must not exceed 1".into());
    }
    let reader = reqwest::Client::builder()
        .no_proxy()
        .timeout(CLIENT_TIMEOUT)
        .build()?;
    // Validate idemproxy's flags before any work (the real upstream is known only later).
    let retry = proxy_config(&demo, "http://127.0.0.1:9")?.retry;
    session_proxy_config(&demo, "http://127.0.0.1:9")?;
    println!(
        "{}\n",
        wrap(
            "idemproxy demo: three failures of an unchanged client, each shown directly and then \
             through idemproxy, each run on a fresh example backend.",
            96
        )
    );
    let deadline = Instant::now() + Duration::from_secs(demo.time_limit);
    let time_limit = demo.time_limit;
    let limit = |what: &'static str| {
        move |_| -> BoxError {
            format!("the {what} did not finish within --time-limit {time_limit} (seconds)").into()
        }
    };

    // Part 1: lost writes.
    let intro = format!(
        "Part 1. Lost writes after transient errors: {} appends per run, {} at a time, directly \
         and then through idemproxy. The backend faults {:.0}% of write attempts: {:.0}% answer \
         503, {:.0}% are stored and then the connection drops, {:.0}% are reset (seed {}).",
        demo.writes,
        demo.concurrency,
        demo.fault_rate() * 100.0,
        demo.fail_rate * 100.0,
        demo.store_then_drop_rate * 100.0,
        demo.reset_rate * 100.0,
        demo.seed,
    );
    println!("{}\n", wrap(&intro, 96));
    let mut flags = demo_proxy_flags(&demo);
    flags.extend(demo.proxy_args.iter().cloned());
    println!(
        "idemproxy flags:\n  --routes '{ROUTES}'\n  {}",
        shell_words(&flags)
    );
    println!("(the backend logs each injected fault on stderr; add 2>/dev/null to hide them)");
    let direct = tokio::time::timeout_at(deadline, run(&demo, false, &reader))
        .await
        .map_err(limit("direct run of part 1"))??;
    let proxied = tokio::time::timeout_at(deadline, run(&demo, true, &reader))
        .await
        .map_err(limit("proxied run of part 1"))??;
    println!();
    print_table(&direct, &proxied);
    println!();
    for paragraph in explain(&demo, &retry, &direct, &proxied) {
        println!("{}\n", wrap(&paragraph, 96));
    }

    // Part 2: a busy agent's session.
    let intro = format!(
        "Part 2. A busy agent's session expires: the backend's sessions expire {} after creation \
         or the last heartbeat, and ordinary calls do not extend them. The agent creates a \
         session and appends an entry every {} for {}, without a heartbeat (it is busy, not \
         idle). idemproxy heartbeats every {} with --profile session-api. Both runs go on at \
         the same time.",
        human(demo.session_ttl),
        human(demo.append_period()),
        human(demo.agent_time),
        human(demo.heartbeat_interval()),
    );
    println!("{}\n", wrap(&intro, 96));
    let mut flags = demo_proxy_flags(&demo);
    flags.extend(demo.proxy_args.iter().cloned());
    println!(
        "idemproxy flags:\n  {}\n  {}",
        shell_words(&session_proxy_flags(&demo)),
        shell_words(&flags)
    );
    let (agent_direct, agent_proxied) = tokio::time::timeout_at(deadline, async {
        tokio::join!(
            busy_agent(&demo, false, &reader),
            busy_agent(&demo, true, &reader)
        )
    })
    .await
    .map_err(limit("busy agent of part 2"))?;
    let (agent_direct, agent_proxied) = (agent_direct?, agent_proxied?);
    println!();
    print_agent_table(&demo, &agent_direct, &agent_proxied);
    println!();
    for paragraph in explain_agent(&demo, &agent_direct, &agent_proxied) {
        println!("{}\n", wrap(&paragraph, 96));
    }

    // Part 3: a side effect whose answer is lost.
    let intro = format!(
        "Part 3. A side effect whose answer is lost: the agent calls POST \
         /v1/sessions/{{sid}}/actions once (send an email; no natural key, so every call runs \
         again). The backend runs it, then drops the connection without answering. The direct \
         client retries a connection error up to {}; through idemproxy, the same client with \
         {}, the same idemproxy flags as part 2.",
        plural(demo.client_retries, "time", "times"),
        plural(demo.proxied_client_retries, "retry", "retries"),
    );
    println!("{}", wrap(&intro, 96));
    let action_direct = tokio::time::timeout_at(deadline, side_effect(&demo, false, &reader))
        .await
        .map_err(limit("direct run of part 3"))??;
    let action_proxied = tokio::time::timeout_at(deadline, side_effect(&demo, true, &reader))
        .await
        .map_err(limit("proxied run of part 3"))??;
    println!();
    print_action_table(&action_direct, &action_proxied);
    println!();
    for paragraph in explain_action(&demo, &action_direct, &action_proxied) {
        println!("{}\n", wrap(&paragraph, 96));
    }

    let mut problems = Vec::new();
    if proxied.lost() > 0 {
        problems.push(plural(proxied.lost() as u64, "lost write", "lost writes"));
    }
    if proxied.errors > 0 {
        problems.push(plural(
            proxied.errors as u64,
            "client-visible error",
            "client-visible errors",
        ));
    }
    for (n, what) in [
        (proxied.acked_missing, "acknowledged but not stored"),
        (proxied.duplicates, "duplicated"),
        (proxied.foreign, "stored but never sent"),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    let mut problems: Vec<String> = problems
        .into_iter()
        .map(|p| format!("part 1 had {p}"))
        .collect();
    if agent_proxied.failed() > 0 {
        problems.push(format!(
            "part 2 had {}",
            plural(agent_proxied.failed(), "failed append", "failed appends")
        ));
    }
    if agent_proxied.left.is_none() {
        problems.push("in part 2 the session expired".to_owned());
    }
    if !action_proxied.proxied_ok() {
        problems.push(format!(
            "in part 3 the action ran {} and the client got {}{}",
            plural(action_proxied.runs, "time", "times"),
            action_proxied.answer(),
            match action_proxied.may_have() {
                "-" => String::new(),
                v => format!(" (\"may_have_been_processed\": {v})"),
            },
        ));
    }
    if problems.is_empty() {
        println!(
            "{}",
            wrap(
                "OK: through idemproxy every write was stored exactly once and the client saw no \
                 error, the busy agent's session stayed alive with no failed append, and the \
                 side effect ran once, with a 502 that says it may have been processed.",
                96
            )
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{}",
            wrap(
                &format!(
                    "FAILED: through idemproxy, {}. See the tables above.",
                    problems.join("; ")
                ),
                96
            )
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Flags as one would type them in a shell: values with spaces or braces in single quotes.
fn shell_words(flags: &[String]) -> String {
    flags
        .iter()
        .map(|f| {
            if f.contains(|c: char| c.is_whitespace() || "{}*'\"$".contains(c)) {
                format!("'{}'", f.replace('\'', r"'\''"))
            } else {
                f.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() -> ExitCode {
    let demo = Demo::parse();
    match demo_main(demo).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::from(2)
        }
    }
}
