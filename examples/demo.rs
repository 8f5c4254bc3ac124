//! What idemproxy is for, in one command:
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --writes 2000 --fail-rate 0.3 --seed 1
//! cargo run --release --example demo -- --retry-budget-ratio 0.2     # idemproxy's default budget
//! cargo run --release --example demo -- -- --retry-on 5xx            # extra idemproxy flags after `--`
//! ```
//!
//! It starts the example session backend (`examples/session_backend.rs`) in this process with
//! injected faults on writes (503s, resets, and "store-then-drop": the entry is stored, then the
//! connection closes before the answer), and runs the same append workload twice, each time on a
//! fresh backend with the same seed (so both runs face the same sequence of faults):
//!
//! 1. **direct**: a typical client POSTs `{"uuid", "text"}` to `/v1/sessions/{sid}/entries`,
//!    retries a connection error or a 5xx up to `--client-retries` times, and treats a `409`
//!    as a failure. That is the real-world bug: the retry of a write whose answer was lost finds
//!    the entry already stored, gets `409 Conflict`, and the client gives up on an entry that is
//!    in fact stored.
//! 2. **through idemproxy**: the same client, pointed at an in-process idemproxy, with no
//!    retries of its own. idemproxy retries, and verifies a `409` by reading the entry back.
//!
//! Then it reads the backend's truth (the stored entries, its counters, idemproxy's `/metrics`)
//! and prints a side-by-side table and an explanation computed from the numbers. It exits 1 if
//! the proxied run lost a write or showed the client an error, so it doubles as a smoke check,
//! and 2 if the demo itself could not run. The backend logs every injected fault on stderr;
//! add `2>/dev/null` to see only the report.

#[path = "session_backend.rs"]
mod session_backend;

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Display};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use idemproxy::config::{Args, Config};
use idemproxy::retry::RetryConfig;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use session_backend::{Backend, Options as BackendOptions, Stats};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The route table the proxied run uses: session entries are verified by reading them back.
const ROUTES: &str = "POST /v1/sessions/{sid}/entries session=path:sid verify=GET:/v1/sessions/{sid}/entries/{body.uuid}";

/// Longest wait for one HTTP exchange of the demo's client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a server to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Parser, Debug)]
#[command(
    name = "demo",
    about = "Runs the same append workload against a faulty backend directly and through idemproxy, and compares what was lost.",
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
    /// Show idemproxy's logs with this filter (e.g. info, idemproxy=debug); off by default.
    #[arg(long)]
    log: Option<String>,
    /// The whole demo must finish within this many seconds.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=3600))]
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

impl Demo {
    /// Fraction of write attempts that get any fault.
    fn fault_rate(&self) -> f64 {
        self.fail_rate + self.store_then_drop_rate + self.reset_rate
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

/// Appends one entry: POST, retrying a connection error or a 5xx up to `retries` times with a
/// short doubling pause; any other non-2xx, notably `409`, is final.
async fn append(client: &reqwest::Client, url: &str, body: &str, retries: u32) -> Outcome {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await;
        let failure = match sent {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                // A real client reads the answer; a body cut short counts as a connection error.
                match resp.bytes().await {
                    Ok(_) if status.is_success() => {
                        return Outcome {
                            failure: None,
                            client_attempts: attempts,
                            proxy_attempts: headers
                                .get("x-idemproxy-attempts")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(1),
                            recovered: headers.contains_key("x-idemproxy-recovered"),
                        };
                    }
                    Ok(_) if status.is_server_error() => Failure::Status(status.as_u16()),
                    Ok(_) => {
                        let failure = if status == reqwest::StatusCode::CONFLICT {
                            Failure::Conflict
                        } else {
                            Failure::Status(status.as_u16())
                        };
                        return Outcome {
                            failure: Some(failure),
                            client_attempts: attempts,
                            proxy_attempts: 1,
                            recovered: false,
                        };
                    }
                    Err(_) => Failure::Transport,
                }
            }
            Err(_) => Failure::Transport,
        };
        if attempts > retries {
            return Outcome {
                failure: Some(failure),
                client_attempts: attempts,
                proxy_attempts: 1,
                recovered: false,
            };
        }
        tokio::time::sleep(Duration::from_millis(10 << (attempts - 1).min(6))).await;
    }
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

impl RunningBackend {
    async fn start(demo: &Demo) -> Result<Self, BoxError> {
        let opts = BackendOptions {
            listen: ([127, 0, 0, 1], 0).into(),
            session_ttl: Duration::from_secs(600),
            fail_rate: demo.fail_rate,
            store_then_drop_rate: demo.store_then_drop_rate,
            reset_rate: demo.reset_rate,
            latency: Duration::ZERO,
            seed: Some(demo.seed),
            quiet: true,
        };
        let listener = TcpListener::bind(opts.listen).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let backend = Backend::new(&opts);
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

/// idemproxy's validated configuration in front of `upstream`: the demo's flags, then the
/// extra ones given after `--`.
fn proxy_config(demo: &Demo, upstream: &str) -> Result<Config, BoxError> {
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
    argv.extend(["--routes".to_owned(), ROUTES.to_owned()]);
    argv.extend(demo_proxy_flags(demo));
    if let Err(e) = Args::try_parse_from(&argv) {
        return Err(format!(
            "idemproxy does not accept the demo's flags: is its retry or 409 layer missing from \
             this build?\n{e}"
        )
        .into());
    }
    argv.extend(demo.proxy_args.iter().cloned());
    let args = Args::try_parse_from(&argv).map_err(|e| {
        format!(
            "idemproxy rejected the flags after `--` ({}); the demo itself sets --routes and {}: \
             change those with the demo's flags of the same name.\n{e}",
            demo.proxy_args.join(" "),
            demo_proxy_flags(demo)
                .iter()
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
        idemproxy::telemetry::init(config.log.as_deref(), config.log_format);
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
    d.conflicts -= before.conflicts.min(d.conflicts);
    d.heartbeats -= before.heartbeats.min(d.heartbeats);
    d.faults.fail -= before.faults.fail.min(d.faults.fail);
    d.faults.store_then_drop -= before.faults.store_then_drop.min(d.faults.store_then_drop);
    d.faults.reset -= before.faults.reset.min(d.faults.reset);
    d
}

/// Runs the workload on a fresh backend, directly (`proxied == false`) or through idemproxy.
async fn run(demo: &Demo, proxied: bool, reader: &reqwest::Client) -> Result<Report, BoxError> {
    let backend = RunningBackend::start(demo).await?;
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
    if let Some(proxy) = proxy {
        proxy.shutdown();
        let _ = tokio::time::timeout(STOP_TIMEOUT, proxy.wait()).await;
    }
    result
}

async fn measure(
    demo: &Demo,
    reader: &reqwest::Client,
    backend: &RunningBackend,
    sid: &str,
    proxy: Option<&idemproxy::app::Running>,
) -> Result<Report, BoxError> {
    let (base, retries) = match proxy {
        Some(p) => (
            format!("http://{}", p.listen_addr),
            demo.proxied_client_retries,
        ),
        None => (backend.url.clone(), demo.client_retries),
    };
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
    let metrics = match proxy {
        Some(p) => {
            let text = reader
                .get(format!("http://{}/metrics", p.admin_addr))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            Some(Metrics::parse(&text))
        }
        None => None,
    };

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
    let intro = format!(
        "idemproxy demo: {} appends per run, {} at a time, directly and then through idemproxy. \
         The backend faults {:.0}% of write attempts: {:.0}% answer 503, {:.0}% are stored and \
         then the connection drops, {:.0}% are reset (seed {}).",
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
        flags.join(" ")
    );
    println!("(the backend logs each injected fault on stderr; add 2>/dev/null to hide them)");
    let deadline = Instant::now() + Duration::from_secs(demo.time_limit);
    let time_limit = demo.time_limit;
    let limit = |what: &'static str| {
        move |_| -> BoxError {
            format!("the {what} run did not finish within --time-limit {time_limit} (seconds)")
                .into()
        }
    };
    let direct = tokio::time::timeout_at(deadline, run(&demo, false, &reader))
        .await
        .map_err(limit("direct"))??;
    let proxied = tokio::time::timeout_at(deadline, run(&demo, true, &reader))
        .await
        .map_err(limit("proxied"))??;

    println!();
    print_table(&direct, &proxied);
    println!();
    for paragraph in explain(&demo, &retry, &direct, &proxied) {
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
    if problems.is_empty() {
        println!(
            "OK: through idemproxy every write was stored exactly once and the client saw no error."
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FAILED: the proxied run had {}. See the table above.",
            problems.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
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
