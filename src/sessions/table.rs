//! The session table's records, shared by the tracker (the request path and
//! the admin port) and the scheduler: settings, one session, the shared
//! state, and the scheduler's token for one registration.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::compact::{Beat, Commons, Credentials};
use super::metrics::SessionMetrics;
use super::{EndReason, SessionConfig};
// Durations are capped so that `Instant + duration` never overflows (the
// configuration refuses longer ones; a library caller may pass anything).
use crate::units::MAX_DURATION;

/// The shortest heartbeat interval, so a zero never spins the scheduler.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Jitter of the interval, in permille each way (±10%).
const JITTER_PERMILLE: i16 = 100;
/// What a session costs besides its id, credentials and heartbeat: the map
/// entry, the session record, its allocations' headers, rounded up (the
/// scale run measures about 550 bytes a session in all).
const SESSION_OVERHEAD: usize = 384;

/// The configuration as the tracker uses it: clamped, and the alive field shared.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) interval: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) max_failures: u32,
    pub(super) max_sessions: usize,
    pub(super) max_bytes: usize,
    pub(super) max_per_sec: u32,
    pub(super) alive_field: Option<Arc<[String]>>,
    pub(super) request_timeout: Duration,
    /// Session timestamps count nanoseconds from here (8 bytes, not 16).
    epoch: Instant,
}

impl Settings {
    pub(super) fn new(config: SessionConfig) -> Self {
        Self {
            interval: config.interval.clamp(MIN_INTERVAL, MAX_DURATION),
            idle_timeout: config.idle_timeout.min(MAX_DURATION),
            max_failures: config.max_failures.max(1),
            max_sessions: config.max_sessions.max(1),
            max_bytes: config.max_bytes,
            max_per_sec: config.max_per_sec,
            alive_field: config.alive_field.map(Arc::from),
            request_timeout: config.request_timeout.min(MAX_DURATION),
            epoch: Instant::now(),
        }
    }

    /// `at` as a session timestamp.
    pub(super) fn stamp(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// A session timestamp as an instant.
    pub(super) fn instant(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_nanos(stamp)
    }
}

/// One tracked session. Kept small: there may be 100 000 of them.
pub(super) struct Session {
    /// Registration number: tells this registration from an earlier or later
    /// one of the same id (timer entries and in-flight guards carry it).
    pub(super) generation: u64,
    pub(super) source: Arc<str>,
    pub(super) heartbeat: Option<Box<Beat>>,
    /// Copied credentials headers.
    pub(super) credentials: Credentials,
    /// Last client activity ([`Settings::stamp`]): what the idle timeout counts from.
    pub(super) last_activity: u64,
    /// Last renewal: a heartbeat answered alive, a renewing request answered
    /// `2xx`, or the registration. What the next heartbeat counts from.
    pub(super) last_renewal: u64,
    /// End of the last heartbeat round, alive or failed (or the
    /// registration): a failed round is tried again an interval later, not at once.
    pub(super) last_round: u64,
    pub(super) in_flight: u32,
    pub(super) failures: u32,
    /// This round's jitter of the interval, in permille.
    pub(super) jitter: i16,
    /// Retries of the current heartbeat round so far (0: not retrying).
    pub(super) retries: u8,
    /// The scheduler holds this registration's timer token.
    pub(super) scheduled: bool,
}

impl Session {
    /// The bytes this session holds in the table, its id (`id_len`) included.
    pub(super) fn bytes(&self, id_len: usize) -> usize {
        SESSION_OVERHEAD
            + id_len
            + self.credentials.len()
            + self.heartbeat.as_ref().map_or(0, |b| b.len())
    }

    /// When the next heartbeat is due: the interval (with this round's
    /// jitter) after the later of the last renewal and the last heartbeat
    /// round. Client activity does not move it: on most backends an ordinary
    /// call does not extend the session, so a busy session needs its
    /// heartbeats as much as a silent one.
    pub(super) fn due(&self, settings: &Settings) -> Instant {
        let anchor = settings.instant(self.last_renewal.max(self.last_round));
        let interval = self
            .heartbeat
            .as_ref()
            .and_then(|b| b.interval())
            .map_or(settings.interval, |i| i.clamp(MIN_INTERVAL, MAX_DURATION));
        anchor + jittered(interval, self.jitter)
    }

    /// The last renewal.
    pub(super) fn last_renewed(&self, settings: &Settings) -> Instant {
        settings.instant(self.last_renewal)
    }

    /// The last client activity.
    pub(super) fn last_active(&self, settings: &Settings) -> Instant {
        settings.instant(self.last_activity)
    }

    /// No activity for the idle timeout and nothing in flight.
    pub(super) fn is_idle(&self, settings: &Settings, now: Instant) -> bool {
        self.in_flight == 0 && now >= self.last_active(settings) + settings.idle_timeout
    }

    /// When the scheduler should look at this session next.
    pub(super) fn wake_at(&self, settings: &Settings) -> Instant {
        let due = self.due(settings);
        if self.in_flight == 0 {
            due.min(self.last_active(settings) + settings.idle_timeout)
        } else {
            due
        }
    }
}

/// `interval` scaled by `(1000 + permille) / 1000`.
pub(super) fn jittered(interval: Duration, permille: i16) -> Duration {
    let scale = u128::from(1000_i16.saturating_add(permille).max(0).unsigned_abs());
    let nanos = interval.as_nanos().saturating_mul(scale) / 1000;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// A fresh jitter in `[-10%, +10%]`.
pub(super) fn draw_jitter() -> i16 {
    rand::random_range(-JITTER_PERMILLE..=JITTER_PERMILLE)
}

/// State shared by the tracker handles, the in-flight guards and the scheduler.
pub(super) struct Shared {
    pub(super) settings: Settings,
    pub(super) sessions: DashMap<Arc<str>, Session>,
    /// The bytes the sessions hold ([`Session::bytes`]), kept within `max_bytes`.
    pub(super) bytes: AtomicUsize,
    pub(super) metrics: SessionMetrics,
    /// The heartbeat part sessions share.
    pub(super) commons: Commons,
    pub(super) digest_key: RandomState,
    pub(super) next_generation: AtomicU64,
    /// New registrations for the scheduler, sent only while it runs.
    pub(super) wake_tx: mpsc::UnboundedSender<Token>,
    pub(super) wake_rx: Mutex<Option<mpsc::UnboundedReceiver<Token>>>,
    pub(super) scheduler_running: AtomicBool,
}

impl Shared {
    /// Adds `added` and takes `removed` from the table's bytes.
    pub(super) fn add_bytes(&self, added: usize, removed: usize) {
        let update = |bytes: usize| Some(bytes.saturating_add(added).saturating_sub(removed));
        let before = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, update)
            .unwrap_or_default();
        self.metrics
            .set_table_bytes(before.saturating_add(added).saturating_sub(removed));
    }

    pub(super) fn digest(&self, id: &str) -> String {
        format!("{:016x}", self.digest_key.hash_one(id))
    }

    /// Removes the session `id` if it is still registration `generation` and
    /// `condition` holds; counts and logs the end. Never call it while holding
    /// a guard into the map.
    pub(super) fn remove_if(
        &self,
        id: &str,
        generation: u64,
        reason: EndReason,
        condition: impl FnOnce(&Session) -> bool,
    ) -> bool {
        let removed = self
            .sessions
            .remove_if(id, |_, s| s.generation == generation && condition(s));
        match removed {
            Some((key, session)) => {
                self.ended(&key, &session, reason);
                true
            }
            None => false,
        }
    }

    /// Accounts for a removed session.
    pub(super) fn ended(&self, id: &str, session: &Session, reason: EndReason) {
        self.add_bytes(0, session.bytes(id.len()));
        self.metrics.session_ended(reason);
        tracing::debug!(session = %self.digest(id), %reason, "session no longer tracked");
    }
}

/// The scheduler's handle on one registration of a session.
#[derive(Debug)]
pub(super) struct Token {
    pub(super) id: Arc<str>,
    pub(super) generation: u64,
}

impl Token {
    pub(super) fn new(id: Arc<str>, generation: u64) -> Self {
        Self { id, generation }
    }
}
