//! The closing numbers of one real-server workload, printed as one line so
//! that they can be quoted: `profile etcd: writes=12 faults=0 lost=0 ...`.

use std::io::Write;

use tokio::time::Instant;

/// One workload's closing numbers. What each count means for its backend
/// is said by the test that fills it in; in general:
///
/// - `writes`: the writes (or calls) the client sent;
/// - `faults`: the faults injected (answers dropped after the server ran the
///   request, 503s, resets);
/// - `lost`: writes answered 2xx that the server does not hold;
/// - `duplicated`: writes the server applied more than once;
/// - `client_errors`: non-2xx answers other than the ones the test promises
///   for its faults;
/// - heartbeats per session-minute: heartbeats on the wire tap, per session
///   tracked and minute since `started`.
#[derive(Debug)]
pub struct Summary {
    /// The profile, e.g. `etcd`.
    pub profile: &'static str,
    /// The workload, e.g. `busy-client`.
    pub workload: &'static str,
    /// When the workload's proxy started.
    pub started: Instant,
    /// Sessions tracked.
    pub sessions: usize,
    /// Writes sent.
    pub writes: usize,
    /// Faults injected.
    pub faults: usize,
    /// Writes acknowledged but not stored.
    pub lost: usize,
    /// Writes applied more than once.
    pub duplicated: usize,
    /// Unexpected non-2xx answers.
    pub client_errors: usize,
}

impl Summary {
    /// A summary with every count at zero.
    pub fn new(profile: &'static str, workload: &'static str, started: Instant) -> Summary {
        Summary {
            profile,
            workload,
            started,
            sessions: 0,
            writes: 0,
            faults: 0,
            lost: 0,
            duplicated: 0,
            client_errors: 0,
        }
    }

    /// Prints the line to the process's stderr (past libtest's capture, so
    /// that it shows in a passing run too).
    pub fn print(&self, heartbeats_on_the_wire: usize) {
        let seconds = self.started.elapsed().as_secs_f64();
        let per_session_minute =
            heartbeats_on_the_wire as f64 * 60.0 / (self.sessions.max(1) as f64 * seconds);
        let _ = writeln!(
            std::io::stderr(),
            "profile {}: writes={} faults={} lost={} duplicated={} client_errors={} \
             heartbeats_per_session_minute={per_session_minute:.1} \
             workload={} sessions={} heartbeats={heartbeats_on_the_wire} seconds={seconds:.1}",
            self.profile,
            self.writes,
            self.faults,
            self.lost,
            self.duplicated,
            self.client_errors,
            self.workload,
            self.sessions,
        );
    }
}
