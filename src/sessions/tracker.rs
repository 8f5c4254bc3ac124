//! The session table: what the request path and the admin port see.

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::compact::{Beat, Commons, Credentials};
use super::metrics::{SessionMetrics, Untracked};
use super::scheduler::{self, Token};
use super::{EndReason, HeartbeatSpec, Registration, SessionConfig};
use crate::body::Body;
use crate::error::UpstreamError;
// Durations are capped so that `Instant + duration` never overflows (the
// configuration refuses longer ones; a library caller may pass anything).
use crate::units::MAX_DURATION;

/// The shortest heartbeat interval, so a zero never spins the scheduler.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Jitter of the interval, in permille each way (±10%).
const JITTER_PERMILLE: i16 = 100;
/// The longest session id tracked, in bytes; a session with a longer id is
/// proxied but not tracked.
pub const MAX_SESSION_ID_LEN: usize = 1024;
/// The most bytes of credentials headers copied for one session; a session
/// whose credentials are larger is proxied but not tracked.
pub const MAX_CREDENTIALS_LEN: usize = 16 * 1024;
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
    fn new(config: SessionConfig) -> Self {
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
    fn instant(&self, stamp: u64) -> Instant {
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
        anchor + jittered(settings.interval, self.jitter)
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
    bytes: AtomicUsize,
    pub(super) metrics: SessionMetrics,
    /// The heartbeat part sessions share.
    commons: Commons,
    digest_key: RandomState,
    next_generation: AtomicU64,
    /// New registrations for the scheduler, sent only while it runs.
    wake_tx: mpsc::UnboundedSender<Token>,
    wake_rx: Mutex<Option<mpsc::UnboundedReceiver<Token>>>,
    scheduler_running: AtomicBool,
}

impl Shared {
    /// Adds `added` and takes `removed` from the table's bytes.
    fn add_bytes(&self, added: usize, removed: usize) {
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
    fn ended(&self, id: &str, session: &Session, reason: EndReason) {
        self.add_bytes(0, session.bytes(id.len()));
        self.metrics.session_ended(reason);
        tracing::debug!(session = %self.digest(id), %reason, "session no longer tracked");
    }
}

/// Tracks sessions and schedules their heartbeats. Cheap to clone: every
/// clone shares one table.
#[derive(Clone)]
pub struct SessionTracker {
    shared: Arc<Shared>,
}

impl fmt::Debug for SessionTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTracker")
            .field("sessions", &self.len())
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

/// What [`SessionTracker::observe`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// A new session is tracked.
    New,
    /// A known session's activity and credentials were refreshed.
    Refreshed,
    /// The table is full and every session has a request in flight: the new
    /// session is not tracked (its requests are still proxied).
    Full,
    /// The session's id or copied credentials are larger than the tracker
    /// keeps ([`MAX_SESSION_ID_LEN`], [`MAX_CREDENTIALS_LEN`]): it is not
    /// tracked (its requests are still proxied).
    TooLarge,
}

/// One tracked session as `GET /sessions` shows it. Never contains the raw
/// session id nor any copied header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionView {
    /// A keyed digest of the session id (16 hex chars), stable for the
    /// process's lifetime; see [`SessionTracker::digest`].
    pub digest: String,
    /// Where the id was found, e.g. `header:Mcp-Session-Id`.
    pub source: String,
    /// Seconds since the last client activity (what the idle timeout counts from).
    pub last_activity_secs_ago: u64,
    /// Seconds since the last renewal: a heartbeat answered alive, or a
    /// request on a renewing route answered 2xx (what the next heartbeat counts from).
    pub last_renewal_secs_ago: u64,
    /// Seconds until the next heartbeat is due (0 when due or being sent);
    /// `None` for a session without heartbeat.
    pub next_heartbeat_in_secs: Option<u64>,
    /// Heartbeats failed in a row.
    pub consecutive_failures: u32,
    /// Requests of this session being proxied now.
    pub in_flight: u32,
}

impl SessionTracker {
    /// An empty tracker. Heartbeats start with [`SessionTracker::spawn_scheduler`].
    pub fn new(config: SessionConfig, metrics: SessionMetrics) -> Self {
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Self {
            shared: Arc::new(Shared {
                settings: Settings::new(config),
                sessions: DashMap::new(),
                bytes: AtomicUsize::new(0),
                metrics,
                commons: Commons::default(),
                digest_key: RandomState::new(),
                next_generation: AtomicU64::new(1),
                wake_tx,
                wake_rx: Mutex::new(Some(wake_rx)),
                scheduler_running: AtomicBool::new(false),
            }),
        }
    }

    /// Records a sighting of a session: registers a new session, or refreshes
    /// a known one's last activity and replaces its credentials with these
    /// (see [`Registration::heartbeat`] for when its heartbeat is replaced).
    ///
    /// When the table is full, the session with the oldest activity and no
    /// request in flight is evicted first.
    pub fn observe(&self, reg: Registration) -> Observed {
        let Registration {
            id,
            source,
            heartbeat,
            credentials,
        } = reg;
        self.observe_with(
            id,
            source,
            heartbeat,
            NewCredentials::Headers(&credentials),
            false,
        )
    }

    /// Records that the backend renewed session `id` (a request it counts as
    /// renewal was answered `2xx`): its next heartbeat is due one interval
    /// from now. `false` for an unknown session.
    pub fn renew(&self, id: &str) -> bool {
        let Some(mut session) = self.shared.sessions.get_mut(id) else {
            return false;
        };
        renewed(&mut session, self.shared.settings.stamp(Instant::now()));
        true
    }

    /// The stored credentials of session `id` if they are exactly those
    /// `pairs` would give (the usual case: nothing changed since its last
    /// request), to pass to [`SessionTracker::observe_with`]; allocates nothing.
    pub(super) fn same_credentials<'a>(
        &self,
        id: &str,
        pairs: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    ) -> Option<Credentials> {
        let session = self.shared.sessions.get(id)?;
        session
            .credentials
            .matches(pairs)
            .then(|| session.credentials.clone())
    }

    /// [`SessionTracker::observe`] with the credentials given either as
    /// headers or as ones found by [`SessionTracker::same_credentials`];
    /// `renews`: the sighting is also a renewal ([`SessionTracker::renew`]).
    pub(super) fn observe_with(
        &self,
        id: Arc<str>,
        source: Arc<str>,
        heartbeat: Option<Arc<HeartbeatSpec>>,
        credentials: NewCredentials<'_>,
        renews: bool,
    ) -> Observed {
        let now = Instant::now();
        let shared = &self.shared;
        if id.len() > MAX_SESSION_ID_LEN {
            return self.untracked(&id, Untracked::IdTooLong);
        }
        let heartbeat = heartbeat.and_then(|spec| Beat::new(&spec, &shared.commons));
        if let Some(mut session) = shared.sessions.get_mut(&*id) {
            let before = session.bytes(id.len());
            refresh(
                &mut session,
                shared.settings.stamp(now),
                source,
                heartbeat,
                credentials,
                renews,
            );
            let after = session.bytes(id.len());
            if after != before {
                shared.add_bytes(after, before);
            }
            return Observed::Refreshed;
        }
        let credentials = credentials.into_credentials();
        if credentials.len() > MAX_CREDENTIALS_LEN {
            return self.untracked(&id, Untracked::CredentialsTooLarge);
        }
        let key = id;
        let generation = shared.next_generation.fetch_add(1, Ordering::Relaxed);
        let stamp = shared.settings.stamp(now);
        let session = Session {
            generation,
            source,
            heartbeat,
            credentials,
            last_activity: stamp,
            last_renewal: stamp,
            last_round: stamp,
            in_flight: 0,
            failures: 0,
            jitter: draw_jitter(),
            retries: 0,
            scheduled: false,
        };
        let size = session.bytes(key.len());
        if size > shared.settings.max_bytes {
            return self.untracked(&key, Untracked::CredentialsTooLarge);
        }
        if !self.make_room(size) {
            tracing::warn!(
                session = %shared.digest(&key),
                max_sessions = shared.settings.max_sessions,
                max_bytes = shared.settings.max_bytes,
                "session table full of sessions with requests in flight; not tracking a new session"
            );
            shared.metrics.session_untracked(Untracked::Full);
            return Observed::Full;
        }
        match shared.sessions.entry(Arc::clone(&key)) {
            Entry::Occupied(mut occupied) => {
                // Registered by a concurrent request in the meantime.
                let Session {
                    source,
                    heartbeat,
                    credentials,
                    ..
                } = session;
                let existing = occupied.get_mut();
                let before = existing.bytes(key.len());
                refresh(
                    existing,
                    stamp,
                    source,
                    heartbeat,
                    NewCredentials::Known(credentials),
                    renews,
                );
                let after = existing.bytes(key.len());
                if after != before {
                    shared.add_bytes(after, before);
                }
                return Observed::Refreshed;
            }
            Entry::Vacant(vacant) => {
                vacant.insert(session);
                shared.add_bytes(size, 0);
            }
        }
        shared.metrics.session_added();
        tracing::debug!(session = %shared.digest(&key), "new session tracked");
        // After the insert: a scheduler that starts concurrently either sees
        // this flag set by us or finds the session in its initial scan.
        if shared.scheduler_running.load(Ordering::SeqCst) {
            let _ = shared.wake_tx.send(Token::new(key, generation));
        }
        Observed::New
    }

    /// Counts (and logs at debug level: a hostile client could send many)
    /// a session that is not tracked.
    fn untracked(&self, id: &str, reason: Untracked) -> Observed {
        self.shared.metrics.session_untracked(reason);
        tracing::debug!(
            session = %self.shared.digest(id),
            reason = reason.as_str(),
            id_len = id.len(),
            "session not tracked: larger than the session table keeps"
        );
        Observed::TooLarge
    }

    /// Evicts sessions until there is room for one more of `size` bytes;
    /// `false` if every session has a request in flight.
    fn make_room(&self, size: usize) -> bool {
        let shared = &self.shared;
        let settings = &shared.settings;
        while shared.sessions.len() >= settings.max_sessions
            || shared.bytes.load(Ordering::Relaxed).saturating_add(size) > settings.max_bytes
        {
            // O(n) scan, only when the table is full. No guard is held when removing.
            let oldest = shared
                .sessions
                .iter()
                .filter(|s| s.in_flight == 0)
                .min_by_key(|s| s.last_activity)
                .map(|s| (Arc::clone(s.key()), s.generation));
            let Some((key, generation)) = oldest else {
                return false;
            };
            shared.remove_if(&key, generation, EndReason::Evicted, |s| s.in_flight == 0);
        }
        true
    }

    /// Whether the session `id` is tracked.
    pub fn contains(&self, id: &str) -> bool {
        self.shared.sessions.contains_key(id)
    }

    /// Marks a request of session `id` as in flight until the returned guard
    /// drops; the drop also counts as activity. While in flight, the session
    /// is never idle-expired and its heartbeats go on (a long poll survives).
    /// `None` for an unknown session.
    pub fn begin_request(&self, id: &str) -> Option<InFlight> {
        let mut session = self.shared.sessions.get_mut(id)?;
        session.in_flight = session.in_flight.saturating_add(1);
        session.last_activity = self.shared.settings.stamp(Instant::now());
        Some(InFlight {
            shared: Arc::clone(&self.shared),
            key: Arc::clone(session.key()),
            generation: session.generation,
        })
    }

    /// Stops tracking session `id` (the client ended it, or an operator did);
    /// `false` if it was not tracked. A heartbeat already on its way is
    /// ignored when it answers.
    pub fn end(&self, id: &str, reason: EndReason) -> bool {
        match self.shared.sessions.remove(id) {
            Some((key, session)) => {
                self.shared.ended(&key, &session, reason);
                true
            }
            None => false,
        }
    }

    /// Stops tracking the session whose [`SessionTracker::digest`] is
    /// `digest` (`DELETE /sessions/{digest}` on the admin control listener,
    /// or with the admin token); `false` if none matches.
    pub fn remove_by_digest(&self, digest: &str) -> bool {
        let shared = &self.shared;
        let Some(wanted) = parse_digest(digest) else {
            return false;
        };
        let found = shared
            .sessions
            .iter()
            .find(|s| shared.digest_key.hash_one(&**s.key()) == wanted)
            .map(|s| (Arc::clone(s.key()), s.generation));
        match found {
            Some((key, generation)) => {
                shared.remove_if(&key, generation, EndReason::Admin, |_| true)
            }
            None => false,
        }
    }

    /// The tracked sessions, for `GET /sessions`.
    pub fn snapshot(&self) -> Vec<SessionView> {
        let shared = &self.shared;
        let now = Instant::now();
        shared
            .sessions
            .iter()
            .map(|s| SessionView {
                digest: shared.digest(s.key()),
                source: s.source.to_string(),
                last_activity_secs_ago: now
                    .saturating_duration_since(s.last_active(&shared.settings))
                    .as_secs(),
                last_renewal_secs_ago: now
                    .saturating_duration_since(s.last_renewed(&shared.settings))
                    .as_secs(),
                next_heartbeat_in_secs: s.heartbeat.as_ref().map(|_| {
                    s.due(&shared.settings)
                        .saturating_duration_since(now)
                        .as_secs()
                }),
                consecutive_failures: s.failures,
                in_flight: s.in_flight,
            })
            .collect()
    }

    /// The number of tracked sessions.
    pub fn len(&self) -> usize {
        self.shared.sessions.len()
    }

    /// Whether no session is tracked.
    pub fn is_empty(&self) -> bool {
        self.shared.sessions.is_empty()
    }

    /// The digest under which session `id` is shown and logged: 16 hex chars
    /// of a SipHash keyed randomly per tracker (so digests differ between
    /// processes and cannot be precomputed from guessed ids).
    pub fn digest(&self, id: &str) -> String {
        self.shared.digest(id)
    }

    /// The tracker's metrics.
    pub fn metrics(&self) -> &SessionMetrics {
        &self.shared.metrics
    }

    /// Starts the one task that sends every session's heartbeats through
    /// `client` (the proxy's upstream service, which fills in scheme and
    /// authority; requests carry only a path and query) and drops idle
    /// sessions. It runs until `shutdown` completes; heartbeats on their way
    /// are then abandoned.
    ///
    /// Only one scheduler runs per tracker: a second call logs a warning and
    /// returns a task that ends at once.
    pub fn spawn_scheduler<S, F>(&self, client: S, shutdown: F) -> JoinHandle<()>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = UpstreamError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let rx = match self.shared.wake_rx.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(rx) = rx else {
            tracing::warn!("the session heartbeat scheduler is already running");
            return tokio::spawn(async {});
        };
        self.shared.scheduler_running.store(true, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(scheduler::run(shared, client, rx, shutdown))
    }
}

/// Reads a digest as shown by [`SessionTracker::digest`].
fn parse_digest(digest: &str) -> Option<u64> {
    if digest.len() != 16 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digest, 16).ok()
}

/// A sighting's credentials headers.
pub(super) enum NewCredentials<'a> {
    /// The request's headers (those not to copy are left out).
    Headers(&'a HeaderMap),
    /// Already copied, e.g. by [`SessionTracker::same_credentials`].
    Known(Credentials),
}

impl NewCredentials<'_> {
    fn into_credentials(self) -> Credentials {
        match self {
            Self::Headers(headers) => Credentials::copy(headers.iter()),
            Self::Known(credentials) => credentials,
        }
    }
}

/// A renewal at `now`: the next heartbeat is due an interval later, with a
/// fresh jitter.
fn renewed(session: &mut Session, now: u64) {
    session.last_renewal = now;
    session.jitter = draw_jitter();
}

/// Refreshes a known session with a new sighting (and renews it if
/// `renews`). Its credentials are replaced only if they differ (then copied
/// into a fresh allocation: a parsed header value shares the connection's
/// read buffer) and fit [`MAX_CREDENTIALS_LEN`]; oversized ones are ignored.
fn refresh(
    session: &mut Session,
    now: u64,
    source: Arc<str>,
    heartbeat: Option<Box<Beat>>,
    credentials: NewCredentials<'_>,
    renews: bool,
) {
    session.last_activity = now;
    if renews {
        renewed(session, now);
    }
    match credentials {
        NewCredentials::Headers(headers) => {
            if !session.credentials.matches(headers.iter()) {
                let copy = Credentials::copy(headers.iter());
                if copy.len() <= MAX_CREDENTIALS_LEN {
                    session.credentials = copy;
                }
            }
        }
        NewCredentials::Known(credentials) => {
            if !session.credentials.same(&credentials) && credentials.len() <= MAX_CREDENTIALS_LEN {
                session.credentials = credentials;
            }
        }
    }
    session.source = source;
    if let Some(heartbeat) = heartbeat {
        session.heartbeat = Some(heartbeat);
    }
}

/// A request of a session in flight; dropping it ends the request and counts
/// as the session's activity. See [`SessionTracker::begin_request`].
pub struct InFlight {
    shared: Arc<Shared>,
    key: Arc<str>,
    generation: u64,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("session", &self.shared.digest(&self.key))
            .finish()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let session = self.shared.sessions.get_mut(&*self.key);
        if let Some(mut session) = session.filter(|s| s.generation == self.generation) {
            session.in_flight = session.in_flight.saturating_sub(1);
            session.last_activity = self.shared.settings.stamp(Instant::now());
        }
    }
}
