//! Issue 5's scale check: 100,000 tracked sessions heartbeated every 60 s by
//! the one scheduler. How much memory do they take, and how much CPU does the
//! scheduler use?
//!
//! ```text
//! cargo run --release --example sessions_scale                     # 100k sessions, 75 s
//! cargo run --release --example sessions_scale -- 10000 60 30      # sessions, interval s, run s
//! ```
//!
//! It registers the sessions as the request path does (a session id of 36
//! bytes, a ~100-byte `Authorization` header and a heartbeat rendered for each
//! session), then runs the scheduler on one runtime worker thread against a
//! no-op upstream service (it answers `200` at once and counts calls), in real
//! time. All sessions are registered at once, so the first round falls due at
//! 0.9–1.1 × interval: the window before it shows the scheduler's idle cost,
//! the round itself its cost per heartbeat. The steady-state figure spreads
//! one round of heartbeats over one interval, as a long-running sidecar sees.
//!
//! Memory is the process's VmRSS (and VmHWM, its peak) from /proc/self/status;
//! CPU is utime + stime of the whole process from /proc/self/stat.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use idemproxy::body::{self, Body};
use idemproxy::error::ProxyError;
use idemproxy::sessions::{
    HeartbeatSpec, Registration, SessionConfig, SessionMetrics, SessionTracker,
};

/// Clock ticks per second of /proc/PID/stat (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / CLK_TCK
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A pseudo-random hex string (a session's token), without extra dependencies.
fn hex(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut s = String::with_capacity(len);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(len);
    s
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let sessions = arg(1, 100_000);
    let interval = Duration::from_secs(arg(2, 60));
    let run = Duration::from_secs(arg(3, 75));
    // One worker thread, as the benchmark's IDEMPROXY_WORKERS=1.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // On the worker thread, as in the proxy: sessions are registered by
    // request tasks and heartbeated by a spawned task, never on `main`.
    runtime
        .block_on(runtime.spawn(measure(sessions, interval, run)))
        .expect("the measurement task");
}

async fn measure(sessions: u64, interval: Duration, run: Duration) {
    let rss_start = status_kib("VmRSS");
    let config = SessionConfig {
        interval,
        max_sessions: usize::try_from(sessions).unwrap_or(usize::MAX).max(1),
        // Well above sessions / interval, so pacing never delays a heartbeat.
        max_per_sec: u32::try_from((sessions / interval.as_secs().max(1)) * 4 + 100)
            .unwrap_or(u32::MAX),
        ..SessionConfig::default()
    };
    let tracker = SessionTracker::new(config, SessionMetrics::unregistered());

    // Register, as the request path does for each new session.
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let source: Arc<str> = Arc::from("header:Mcp-Session-Id");
    for i in 0..sessions {
        let id = format!(
            "{}-{}-{}-{}-{}",
            hex(i, 8),
            hex(i + 1, 4),
            hex(i + 2, 4),
            hex(i + 3, 4),
            hex(i + 4, 12)
        );
        let mut credentials = HeaderMap::new();
        let token = format!("Bearer {}", hex(i ^ 0xdead_beef, 93));
        credentials.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&token).expect("token"),
        );
        credentials.insert("mcp-session-id", HeaderValue::from_str(&id).expect("id"));
        let spec = HeartbeatSpec::new(
            Method::POST,
            format!("/v1/sessions/{id}/heartbeat")
                .parse()
                .expect("path"),
        );
        tracker.observe(Registration {
            id: Arc::from(id),
            source: Arc::clone(&source),
            heartbeat: Some(Arc::new(spec)),
            credentials,
        });
    }
    let register_s = t0.elapsed().as_secs_f64();
    let register_cpu = cpu_seconds() - cpu0;
    let rss_registered = status_kib("VmRSS");
    println!(
        "registered {} sessions in {register_s:.2} s ({:.1} µs CPU each); RSS {:.1} MiB -> {:.1} MiB ({:.0} bytes per session)",
        tracker.len(),
        register_cpu * 1e6 / sessions.max(1) as f64,
        mib(rss_start),
        mib(rss_registered),
        (rss_registered.saturating_sub(rss_start) * 1024) as f64 / sessions.max(1) as f64,
    );

    // The no-op upstream: 200 at once, counting calls.
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    let upstream = tower::service_fn(move |_req: Request<Body>| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, ProxyError>(Response::new(body::empty())) }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tracker.spawn_scheduler(upstream, async move {
        let _ = stop_rx.await;
    });

    // Idle window: before the first heartbeats are due (0.9 × interval).
    let started = Instant::now();
    let cpu_start = cpu_seconds();
    let idle_window = interval.mul_f64(0.85).min(run);
    tokio::time::sleep(idle_window).await;
    let cpu_idle = cpu_seconds() - cpu_start;
    let beats_idle = calls.load(Ordering::Relaxed);

    // The rest of the run: the first round of heartbeats.
    let cpu_round_start = cpu_seconds();
    let round_start = Instant::now();
    let mut last_report = Instant::now();
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            println!(
                "  t={:>4.0}s heartbeats {:>7} RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                calls.load(Ordering::Relaxed),
                mib(status_kib("VmRSS"))
            );
        }
    }
    let round_wall = round_start.elapsed().as_secs_f64();
    let cpu_round = cpu_seconds() - cpu_round_start;
    let beats = calls.load(Ordering::Relaxed);
    let beats_round = beats - beats_idle;
    let total_wall = started.elapsed().as_secs_f64();
    let cpu_total = cpu_seconds() - cpu_start;
    let rss_end = status_kib("VmRSS");
    let hwm = status_kib("VmHWM");
    let _ = stop_tx.send(());
    let _ = scheduler.await;

    let idle_pct = 100.0 * cpu_idle / idle_window.as_secs_f64().max(1e-9);
    let per_beat_us = if beats_round > 0 {
        // The round's CPU less the idle cost over the same time, per heartbeat.
        (cpu_round - cpu_idle / idle_window.as_secs_f64().max(1e-9) * round_wall).max(0.0) * 1e6
            / beats_round as f64
    } else {
        0.0
    };
    let steady_rate = sessions as f64 / interval.as_secs_f64();
    let steady_pct = idle_pct + per_beat_us * steady_rate / 1e6 * 100.0;
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| sessions tracked at the end | {} |", tracker.len());
    println!("| interval | {} s (±10% jitter) |", interval.as_secs());
    println!("| run | {total_wall:.0} s real time, {beats} heartbeats sent |");
    println!("| RSS before registration | {:.1} MiB |", mib(rss_start));
    println!(
        "| RSS with all sessions registered | {:.1} MiB |",
        mib(rss_registered)
    );
    println!(
        "| RSS at the end / peak (VmHWM) | {:.1} MiB / {:.1} MiB |",
        mib(rss_end),
        mib(hwm)
    );
    println!(
        "| scheduler CPU, idle window ({:.0} s, {beats_idle} heartbeats) | {idle_pct:.3} % of one core |",
        idle_window.as_secs_f64()
    );
    println!(
        "| scheduler CPU, round window ({round_wall:.0} s, {beats_round} heartbeats) | {:.2} % of one core |",
        100.0 * cpu_round / round_wall.max(1e-9)
    );
    println!("| CPU per heartbeat (no-op upstream) | {per_beat_us:.1} µs |");
    println!("| steady state: {steady_rate:.0} heartbeats/s | {steady_pct:.2} % of one core |");
    println!(
        "| whole run average | {:.2} % of one core |",
        100.0 * cpu_total / total_wall.max(1e-9)
    );
    println!(
        "SESSIONS_SCALE {{\"sessions\":{sessions},\"interval_s\":{},\"run_s\":{total_wall:.1},\"heartbeats\":{beats},\"rss_start_mib\":{:.2},\"rss_registered_mib\":{:.2},\"rss_end_mib\":{:.2},\"hwm_mib\":{:.2},\"register_cpu_s\":{register_cpu:.2},\"idle_cpu_pct\":{idle_pct:.4},\"round_cpu_pct\":{:.3},\"cpu_per_heartbeat_us\":{per_beat_us:.2},\"steady_cpu_pct\":{steady_pct:.3}}}",
        interval.as_secs(),
        mib(rss_start),
        mib(rss_registered),
        mib(rss_end),
        mib(hwm),
        100.0 * cpu_round / round_wall.max(1e-9),
    );
}
