//! The one task that serves every session: a timer queue, a paced queue of
//! due heartbeats, and the heartbeats on their way.
//!
//! Each registration has exactly one token, which lives in one place at a
//! time: the timer queue (waiting for its next look), the pending queue (due,
//! waiting for the pacer), or a heartbeat on its way. Activity never touches
//! the timer queue: when a timer fires, the session's state decides whether a
//! heartbeat is due, the session is idle, or the token goes back to sleep
//! until the (later) due time. A token whose registration is gone (ended,
//! evicted, re-registered) is dropped when it next surfaces.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::Request;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, sleep_until};
use tokio_util::time::DelayQueue;

use super::EndReason;
use super::heartbeat::{self, Judgement, Verdict};
use super::metrics::HeartbeatOutcome;
use super::table::{Shared, Token, draw_jitter};
use crate::body::Body;
use crate::service::HttpService;

/// Retries of a failed attempt within one heartbeat round.
const MAX_RETRIES: u8 = 2;
/// Backoff before the first retry; doubled for the next.
const RETRY_BASE: Duration = Duration::from_millis(200);
/// The furthest a timer is set (the timer wheel has a horizon); a session
/// further away is simply looked at again.
const MAX_WAKE: Duration = Duration::from_secs(24 * 3600);
/// The most heartbeats on their way at once: an upstream that hangs holds
/// at most this many connections (each waits up to the heartbeat timeout).
pub(super) const MAX_IN_FLIGHT: usize = 256;
/// Below this spacing (above 100 heartbeats/s) the pacer lets slots that
/// passed within this window go at once, since timers tick in milliseconds.
const BURST_WINDOW: Duration = Duration::from_millis(10);

/// A finished attempt.
struct Report {
    token: Token,
    judgement: Judgement,
    request_id: String,
}

enum Event {
    New(Token),
    Timer(Token),
    Done(Result<Report, JoinError>),
    Pace,
}

/// Runs the scheduler until `shutdown` completes.
pub(super) async fn run<S, F>(
    shared: Arc<Shared>,
    client: S,
    mut wake_rx: mpsc::UnboundedReceiver<Token>,
    shutdown: F,
) where
    S: HttpService,
    F: Future<Output = ()>,
{
    let mut scheduler = Scheduler {
        pacer: Pacer::new(shared.settings.max_per_sec),
        shared,
        timers: DelayQueue::new(),
        pending: VecDeque::new(),
    };
    let mut sends = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    scheduler.adopt_existing();
    loop {
        scheduler.dispatch(&client, &mut sends);
        // At the in-flight cap, the next dispatch waits for a heartbeat to end.
        let pace_at = (!scheduler.pending.is_empty() && sends.len() < MAX_IN_FLIGHT)
            .then_some(scheduler.pacer.next);
        let timers = &mut scheduler.timers;
        // Unbiased: a burst of one kind of event never starves the others.
        let event = tokio::select! {
            () = &mut shutdown => break,
            Some(token) = wake_rx.recv() => Event::New(token),
            Some(done) = sends.join_next(), if !sends.is_empty() => Event::Done(done),
            Some(expired) = poll_fn(|cx| timers.poll_expired(cx)), if !timers.is_empty() => {
                Event::Timer(expired.into_inner())
            }
            () = sleep_until(pace_at.unwrap_or_else(Instant::now)), if pace_at.is_some() => Event::Pace,
        };
        match event {
            Event::New(token) => scheduler.adopt(token),
            Event::Timer(token) => scheduler.on_timer(token),
            Event::Done(done) => scheduler.on_joined(done),
            Event::Pace => {}
        }
        // Finished heartbeats are collected all at once: bursts of dispatches
        // must not leave finished tasks (and their memory) piling up.
        while let Some(done) = sends.try_join_next() {
            scheduler.on_joined(done);
        }
    }
    tracing::debug!(
        in_flight = sends.len(),
        "session scheduler stopping; abandoning heartbeats on their way"
    );
    sends.shutdown().await;
}

struct Scheduler {
    shared: Arc<Shared>,
    timers: DelayQueue<Token>,
    pending: VecDeque<Token>,
    pacer: Pacer,
}

impl Scheduler {
    /// Puts a token to sleep until `when` (never past the timer horizon).
    fn sleep(&mut self, token: Token, when: Instant) {
        let now = Instant::now();
        self.timers
            .insert_at(token, when.clamp(now, now + MAX_WAKE));
    }

    /// Takes charge of every session registered before the scheduler started.
    fn adopt_existing(&mut self) {
        let now = Instant::now();
        let shared = &*self.shared;
        for mut session in shared.sessions.iter_mut() {
            if !session.scheduled {
                session.scheduled = true;
                let when = session.wake_at(&shared.settings);
                let token = Token::new(Arc::clone(session.key()), session.generation);
                self.timers
                    .insert_at(token, when.clamp(now, now + MAX_WAKE));
            }
        }
    }

    /// Takes charge of a new registration (once, however often it is announced).
    fn adopt(&mut self, token: Token) {
        let Some(mut session) = self.shared.sessions.get_mut(&*token.id) else {
            return;
        };
        if session.generation != token.generation || session.scheduled {
            return;
        }
        session.scheduled = true;
        let when = session.wake_at(&self.shared.settings);
        drop(session);
        self.sleep(token, when);
    }

    /// A token's timer fired: retry, heartbeat, expire or sleep again.
    fn on_timer(&mut self, token: Token) {
        let now = Instant::now();
        let shared = Arc::clone(&self.shared);
        let settings = &shared.settings;
        let Some(mut session) = shared.sessions.get_mut(&*token.id) else {
            return;
        };
        if session.generation != token.generation {
            return;
        }
        if session.retries > 0 {
            drop(session);
            // A retry's backoff is over: it goes before routine heartbeats.
            self.pending.push_front(token);
        } else if session.is_idle(settings, now) {
            drop(session);
            self.expire_idle(token, now);
        } else if session.due(settings) <= now {
            if session.heartbeat.is_some() {
                drop(session);
                self.pending.push_back(token);
            } else {
                // Nothing to send: just look again in an interval.
                session.last_round = settings.stamp(now);
                let when = session.wake_at(settings);
                drop(session);
                self.sleep(token, when);
            }
        } else {
            // A renewal moved the due time since the timer was set.
            let when = session.wake_at(settings);
            drop(session);
            self.sleep(token, when);
        }
    }

    /// Drops an idle session, or puts it back to sleep if it just got busy.
    fn expire_idle(&mut self, token: Token, now: Instant) {
        let shared = Arc::clone(&self.shared);
        let settings = &shared.settings;
        if shared.remove_if(&token.id, token.generation, EndReason::Idle, |s| {
            s.is_idle(settings, now)
        }) {
            return;
        }
        let when = match shared.sessions.get(&*token.id) {
            Some(s) if s.generation == token.generation => s.wake_at(settings),
            _ => return,
        };
        self.sleep(token, when);
    }

    /// Sends pending heartbeats as far as the pacer allows.
    fn dispatch<S>(&mut self, client: &S, sends: &mut JoinSet<Report>)
    where
        S: HttpService,
    {
        let now = Instant::now();
        while self.pacer.ready(now) && sends.len() < MAX_IN_FLIGHT {
            let Some(token) = self.pending.pop_front() else {
                return;
            };
            let Some((req, request_id)) = self.prepare(&token, now) else {
                continue;
            };
            self.pacer.take(now);
            let attempt = heartbeat::send(
                client.clone(),
                req,
                self.shared.settings.request_timeout,
                self.shared.settings.alive_field.clone(),
            );
            sends.spawn(async move {
                // A panicking service must not lose the token (and with it the session).
                let judgement =
                    AssertUnwindSafe(attempt)
                        .catch_unwind()
                        .await
                        .unwrap_or(Judgement {
                            verdict: Verdict::Retry,
                            status: None,
                            why: "upstream service panicked",
                        });
                Report {
                    token,
                    judgement,
                    request_id,
                }
            });
        }
    }

    /// Builds the heartbeat of a pending token, or (if it is no longer due)
    /// expires it or puts it back to sleep; `None` then.
    fn prepare(&mut self, token: &Token, now: Instant) -> Option<(Request<Body>, String)> {
        let shared = Arc::clone(&self.shared);
        let settings = &shared.settings;
        let session = shared.sessions.get(&*token.id)?;
        if session.generation != token.generation {
            return None;
        }
        let again = || Token::new(Arc::clone(&token.id), token.generation);
        if session.retries == 0 {
            // Waiting for the pacer took time: a renewal or the idle
            // timeout may have come meanwhile.
            if session.is_idle(settings, now) {
                drop(session);
                self.expire_idle(again(), now);
                return None;
            }
            if session.due(settings) > now || session.heartbeat.is_none() {
                let when = session.wake_at(settings);
                drop(session);
                self.sleep(again(), when);
                return None;
            }
        }
        let heartbeat = session.heartbeat.as_ref()?;
        Some(heartbeat::build_request(heartbeat, &session.credentials))
    }

    /// A heartbeat task was joined.
    fn on_joined(&mut self, done: Result<Report, JoinError>) {
        match done {
            Ok(report) => self.on_done(report),
            Err(error) => tracing::debug!(%error, "heartbeat task ended abnormally"),
        }
    }

    /// An attempt finished: count it, then keep, retry, fail or forget the session.
    fn on_done(&mut self, report: Report) {
        let Report {
            token,
            judgement,
            request_id,
        } = report;
        let now = Instant::now();
        let shared = Arc::clone(&self.shared);
        let settings = &shared.settings;
        let metrics = &shared.metrics;
        tracing::debug!(
            session = %shared.digest(&token.id),
            request_id,
            status = judgement.status.map(|s| s.as_u16()),
            outcome = judgement.why,
            "heartbeat answered"
        );
        let Some(mut session) = shared.sessions.get_mut(&*token.id) else {
            // Ended while the heartbeat was on its way: count it, nothing more.
            metrics.heartbeat(match judgement.verdict {
                Verdict::Alive => HeartbeatOutcome::Ok,
                Verdict::Gone => HeartbeatOutcome::Gone,
                Verdict::Retry | Verdict::Fail => HeartbeatOutcome::Failed,
            });
            return;
        };
        if session.generation != token.generation {
            return;
        }
        match judgement.verdict {
            Verdict::Alive => {
                metrics.heartbeat(HeartbeatOutcome::Ok);
                session.failures = 0;
                session.retries = 0;
                session.last_renewal = settings.stamp(now);
                session.last_round = settings.stamp(now);
                session.jitter = draw_jitter();
                let when = session.wake_at(settings);
                drop(session);
                self.sleep(token, when);
            }
            Verdict::Gone => {
                metrics.heartbeat(HeartbeatOutcome::Gone);
                drop(session);
                if shared.remove_if(&token.id, token.generation, EndReason::Gone, |_| true) {
                    tracing::warn!(
                        session = %shared.digest(&token.id),
                        request_id,
                        status = judgement.status.map(|s| s.as_u16()),
                        outcome = judgement.why,
                        "heartbeat says the session is gone; no longer tracked"
                    );
                }
            }
            Verdict::Retry if session.retries < MAX_RETRIES => {
                metrics.heartbeat(HeartbeatOutcome::Retried);
                session.retries += 1;
                let when = now + backoff(session.retries);
                drop(session);
                self.sleep(token, when);
            }
            Verdict::Retry | Verdict::Fail => {
                metrics.heartbeat(HeartbeatOutcome::Failed);
                session.failures = session.failures.saturating_add(1);
                session.retries = 0;
                // Not a renewal: the session's expiry did not move.
                session.last_round = settings.stamp(now);
                session.jitter = draw_jitter();
                let failures = session.failures;
                let when = session.wake_at(settings);
                drop(session);
                let digest = shared.digest(&token.id);
                let status = judgement.status.map(|s| s.as_u16());
                if failures < settings.max_failures {
                    tracing::warn!(
                        session = %digest,
                        request_id,
                        status,
                        outcome = judgement.why,
                        failures,
                        max_failures = settings.max_failures,
                        "heartbeat failed"
                    );
                    self.sleep(token, when);
                } else if shared
                    .remove_if(&token.id, token.generation, EndReason::Failures, |_| true)
                {
                    tracing::warn!(
                        session = %digest,
                        request_id,
                        status,
                        outcome = judgement.why,
                        failures,
                        "heartbeat failed too often; session no longer tracked"
                    );
                }
            }
        }
    }
}

/// The wait before retry number `retry` (1-based): half fixed, half random,
/// doubling from [`RETRY_BASE`].
fn backoff(retry: u8) -> Duration {
    let full = RETRY_BASE * (1_u32 << u32::from(retry.saturating_sub(1)).min(8));
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Spaces heartbeats to at most `max_per_sec`.
#[derive(Debug)]
struct Pacer {
    /// `None`: no limit.
    spacing: Option<Duration>,
    /// The earliest time of the next heartbeat.
    next: Instant,
}

impl Pacer {
    fn new(max_per_sec: u32) -> Self {
        Self {
            spacing: (max_per_sec > 0).then(|| Duration::from_secs(1) / max_per_sec),
            next: Instant::now(),
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.spacing.is_none() || self.next <= now
    }

    fn take(&mut self, now: Instant) {
        let Some(spacing) = self.spacing else {
            return;
        };
        // An idle pacer does not save up slots, except for the short window
        // that millisecond timers need at high rates.
        let window = if spacing < BURST_WINDOW {
            BURST_WINDOW
        } else {
            Duration::ZERO
        };
        let floor = now.checked_sub(window).unwrap_or(now);
        self.next = self.next.max(floor) + spacing;
    }
}
