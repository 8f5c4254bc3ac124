//! The tracker: the handle on the session table that the request path and
//! the admin port use (registrations, activity, renewals, ends, snapshots).

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::compact::{Beat, Commons, Credentials};
use super::metrics::{SessionMetrics, Untracked};
use super::scheduler;
use super::table::{Session, Settings, Shared, Token, draw_jitter};
use super::{EndReason, HeartbeatSpec, Registration, SessionConfig};
use crate::service::HttpService;

/// The longest session id tracked, in bytes; a session with a longer id is
/// proxied but not tracked.
pub const MAX_SESSION_ID_LEN: usize = 1024;
/// The most bytes of credentials headers copied for one session; a session
/// whose credentials are larger is proxied but not tracked.
pub const MAX_CREDENTIALS_LEN: usize = 16 * 1024;
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

    /// [`SessionTracker::begin_request`] for a request that starts, and in
    /// the same lookup of the table the session's stored credentials if they
    /// are exactly those `pairs` would give (the usual case: nothing changed
    /// since its last request), to pass to [`SessionTracker::observe_with`];
    /// allocates nothing.
    pub(super) fn begin_with_credentials<'a>(
        &self,
        id: &str,
        pairs: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    ) -> (Option<Credentials>, Option<InFlight>) {
        let Some(mut entry) = self.shared.sessions.get_mut(id) else {
            return (None, None);
        };
        let (key, session) = entry.pair_mut();
        let guard = self.start_request(key, session);
        let known = session
            .credentials
            .matches(pairs)
            .then(|| session.credentials.clone());
        (known, Some(guard))
    }

    /// Counts a request of `session` in flight, as activity, until the
    /// returned guard drops.
    fn start_request(&self, key: &Arc<str>, session: &mut Session) -> InFlight {
        session.in_flight = session.in_flight.saturating_add(1);
        session.last_activity = self.shared.settings.stamp(Instant::now());
        InFlight {
            shared: Arc::clone(&self.shared),
            key: Arc::clone(key),
            generation: session.generation,
        }
    }

    /// [`SessionTracker::observe`] with the credentials given either as
    /// headers or as ones found by [`SessionTracker::begin_with_credentials`];
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
        let mut entry = self.shared.sessions.get_mut(id)?;
        let (key, session) = entry.pair_mut();
        Some(self.start_request(key, session))
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
        S: HttpService,
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
    /// Already copied, e.g. by [`SessionTracker::begin_with_credentials`].
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
