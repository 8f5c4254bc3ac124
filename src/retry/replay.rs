//! A request body that streams upstream as it arrives while keeping a copy,
//! so that a retry can send the byte-identical body again.
//!
//! [`ReplayBody::new`] wraps the client's body and returns the body for the
//! first attempt together with a [`Replay`] handle. The handle makes the body
//! of every further attempt ([`Replay::body`]) and says whether one is still
//! possible ([`Replay::check`]). One shared state holds the copy and the
//! client's body; the attempt whose body is being polled owns it and gives it
//! back when dropped. If attempt 1 failed after reading only part of the
//! client's body, attempt 2 replays that part and then continues reading the
//! client's body.
//!
//! The copy is bounded twice: per request (`max_bytes`) and across requests
//! ([`ReplayMemory`]). Once a bound is hit the copy is dropped; the current
//! attempt still streams the whole body, but a retry is then possible only if
//! no byte of the body was read yet (for example a connect failure).
//!
//! Size hints and end-of-stream are those of the client's body on every
//! attempt, so a body with a known length is sent with that length each time
//! and a chunked one stays chunked.
//!
//! ```
//! # async fn demo() -> Result<(), idemproxy::BoxError> {
//! use std::sync::Arc;
//! use http_body_util::BodyExt;
//! use idemproxy::{body, retry::replay::{ReplayBody, ReplayMemory}};
//!
//! let memory = Arc::new(ReplayMemory::new(64 << 20));
//! let (first, replay) = ReplayBody::new(body::full("hello"), 1 << 20, memory);
//! assert_eq!(first.collect().await?.to_bytes(), "hello");
//! replay.check()?;
//! assert_eq!(replay.body().collect().await?.to_bytes(), "hello");
//! # Ok(()) }
//! ```

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::BoxError;
use crate::body::Body;

/// The bytes held by replay copies across all requests, with a limit.
#[derive(Debug)]
pub struct ReplayMemory {
    used: AtomicUsize,
    limit: usize,
}

impl ReplayMemory {
    /// A pool allowing `limit` bytes of replay copies in total.
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// The bytes currently held.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// Why a request can no longer be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReplayable {
    /// The body is larger than the per-request cap and part of it was sent.
    #[error(
        "the request body exceeds the replay limit of {limit} bytes and part of it was already sent"
    )]
    TooLarge {
        /// The per-request cap in bytes.
        limit: usize,
    },
    /// The shared replay memory was full and part of the body was sent.
    #[error(
        "the replay memory ({limit} bytes across requests) was full and part of the body was already sent"
    )]
    MemoryFull {
        /// The shared limit in bytes.
        limit: usize,
    },
    /// The client's body failed; sending it again would not help.
    #[error("the client's request body failed")]
    BodyFailed,
    /// A previous attempt still holds the body (it is still being sent).
    #[error("the previous attempt still holds the request body")]
    InUse,
    /// The copy was released because the retry decision is over.
    #[error("the replay copy was released")]
    Released,
}

/// The body of one attempt; see the [module docs](self).
pub struct ReplayBody {
    /// The shared state, while this attempt owns it (taken on first poll).
    state: Option<State>,
    shared: Arc<Shared>,
    /// The next buffered chunk this attempt must replay.
    next_chunk: usize,
    /// Whether this attempt must replay stored trailers.
    replay_trailers: bool,
    /// This attempt reached the end and gave the state back.
    done: bool,
}

/// Makes and vets the bodies of retries; dropping it ends the request's
/// retries and frees its copy.
pub struct Replay {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<Option<State>>,
    /// The client's body was empty from the start.
    was_empty: bool,
    /// The client's size hint, reported by every attempt until it reads.
    orig_hint: SizeHint,
    /// The retry decision is over: keep no copy.
    released: AtomicBool,
}

struct State {
    /// The copy of the data read so far (empty once `capped`).
    chunks: Vec<Bytes>,
    /// Bytes in `chunks`, all reserved from `memory`.
    buffered: usize,
    trailers: Option<HeaderMap>,
    /// The client's body, until it ended or failed.
    rest: Option<Body>,
    /// The client's body ended (all data and trailers read).
    ended: bool,
    failed: bool,
    /// A frame was read from the client's body.
    read_any: bool,
    /// Why the copy was dropped, if it was.
    capped: Option<NotReplayable>,
    max_bytes: usize,
    memory: Arc<ReplayMemory>,
}

impl ReplayBody {
    /// Wraps the client's `body`, keeping up to `max_bytes` of it (and its
    /// trailers) in `memory` for retries. Returns the first attempt's body and
    /// the handle for the others.
    pub fn new(body: Body, max_bytes: usize, memory: Arc<ReplayMemory>) -> (Self, Replay) {
        let orig_hint = body.size_hint();
        let was_empty = body.is_end_stream();
        let too_large = orig_hint.lower() > u64::try_from(max_bytes).unwrap_or(u64::MAX);
        let state = State {
            chunks: Vec::new(),
            buffered: 0,
            trailers: None,
            rest: Some(body),
            ended: false,
            failed: false,
            read_any: false,
            capped: too_large.then_some(NotReplayable::TooLarge { limit: max_bytes }),
            max_bytes,
            memory,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(None),
            was_empty,
            orig_hint,
            released: AtomicBool::new(false),
        });
        let first = Self {
            state: Some(state),
            shared: shared.clone(),
            next_chunk: 0,
            replay_trailers: false,
            done: false,
        };
        (first, Replay { shared })
    }

    /// Hands the state back once this attempt has sent everything, so the
    /// next attempt can start even if the transport keeps this body around.
    fn finish(&mut self) {
        self.done = true;
        if let Some(state) = self.state.take() {
            self.shared.put_back(state);
        }
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done || this.shared.was_empty {
            return Poll::Ready(None);
        }
        if this.state.is_none() {
            // A retry's body: take the state the previous attempt gave back.
            let taken = this.shared.lock().take();
            match taken {
                Some(state) => match state.check() {
                    Ok(()) => this.state = Some(state),
                    Err(why) => {
                        this.shared.put_back(state);
                        return Poll::Ready(Some(Err(why.into())));
                    }
                },
                None => return Poll::Ready(Some(Err(NotReplayable::InUse.into()))),
            }
        }
        let Some(state) = this.state.as_mut() else {
            return Poll::Ready(Some(Err(NotReplayable::InUse.into())));
        };

        // First the part an earlier attempt already read.
        if let Some(chunk) = state.chunks.get(this.next_chunk) {
            this.next_chunk += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if this.shared.released.load(Ordering::Acquire) {
            state.drop_copy(NotReplayable::Released);
        }
        if state.ended {
            let trailers = if this.replay_trailers {
                this.replay_trailers = false;
                state.trailers.clone()
            } else {
                None
            };
            return match trailers {
                Some(trailers) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                None => {
                    this.finish();
                    Poll::Ready(None)
                }
            };
        }

        // Then the client's body, keeping a copy of what it yields.
        let Some(rest) = state.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(rest).poll_frame(cx)) {
            None => {
                state.ended = true;
                state.rest = None;
                this.finish();
                Poll::Ready(None)
            }
            Some(Err(error)) => {
                state.failed = true;
                state.rest = None;
                Poll::Ready(Some(Err(error)))
            }
            Some(Ok(frame)) => {
                state.read_any = true;
                if let Some(data) = frame.data_ref() {
                    state.keep(data);
                    this.next_chunk = state.chunks.len();
                    if state.rest.as_ref().is_some_and(HttpBody::is_end_stream) {
                        // The transport may not poll again; note the end now.
                        state.ended = true;
                        state.rest = None;
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    // Trailers end the body; this attempt sends them now.
                    state.trailers = Some(trailers.clone());
                    state.ended = true;
                    state.rest = None;
                    this.replay_trailers = false;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done || self.shared.was_empty {
            return true;
        }
        let Some(state) = self.state.as_ref() else {
            return false;
        };
        let replay_left = self.next_chunk < state.chunks.len()
            || (self.replay_trailers && state.trailers.is_some());
        !replay_left && (state.ended || state.rest.as_ref().is_none_or(HttpBody::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        if self.done || self.shared.was_empty {
            return SizeHint::with_exact(0);
        }
        let Some(state) = self.state.as_ref() else {
            // Not started: what the client's body said, so every attempt
            // announces the same length (or none).
            return self.shared.orig_hint;
        };
        let replay_left: u64 = state
            .chunks
            .get(self.next_chunk..)
            .unwrap_or_default()
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        let mut hint = SizeHint::new();
        match state.rest.as_ref() {
            Some(rest) => {
                let rest = rest.size_hint();
                hint.set_lower(replay_left.saturating_add(rest.lower()));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(replay_left));
                }
            }
            // Everything is buffered; stay inexact if the client's body was.
            None if self.shared.orig_hint.exact().is_some() => hint.set_exact(replay_left),
            None => hint.set_lower(replay_left),
        }
        hint
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            self.shared.put_back(state);
        }
    }
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("owns_state", &self.state.is_some())
            .field("next_chunk", &self.next_chunk)
            .field("done", &self.done)
            .finish()
    }
}

impl Replay {
    /// The body of the next attempt: replays the copy from the start, then
    /// continues with whatever the client has not sent yet.
    pub fn body(&self) -> ReplayBody {
        ReplayBody {
            state: None,
            shared: self.shared.clone(),
            next_chunk: 0,
            replay_trailers: true,
            done: false,
        }
    }

    /// Whether another attempt can send the same body.
    pub fn check(&self) -> Result<(), NotReplayable> {
        match self.shared.lock().as_ref() {
            Some(state) => state.check(),
            None => Err(NotReplayable::InUse),
        }
    }

    /// Like [`Replay::check`], but a body still held by the previous attempt
    /// counts as replayable: it is the transport's to drop, which it usually
    /// does right after the attempt ends.
    pub fn check_lasting(&self) -> Result<(), NotReplayable> {
        match self.check() {
            Err(NotReplayable::InUse) => Ok(()),
            other => other,
        }
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        self.shared.released.store(true, Ordering::Release);
        // Free the copy now; an attempt still streaming drops its copy on its
        // next poll and does not give the state back.
        let state = self.shared.lock().take();
        drop(state);
    }
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("check", &self.check())
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives the state back for the next attempt, unless retries are over.
    fn put_back(&self, state: State) {
        let mut slot = self.lock();
        if !self.released.load(Ordering::Acquire) {
            *slot = Some(state);
        }
        drop(slot);
    }
}

impl State {
    fn check(&self) -> Result<(), NotReplayable> {
        if self.failed {
            return Err(NotReplayable::BodyFailed);
        }
        match self.capped {
            // Nothing was read yet: the client's body itself is still whole.
            Some(why) if self.read_any => Err(why),
            _ => Ok(()),
        }
    }

    /// Keeps a copy of `data` if both caps allow, otherwise drops the copy.
    fn keep(&mut self, data: &Bytes) {
        if self.capped.is_some() {
            return;
        }
        let len = data.len();
        if self.buffered.saturating_add(len) > self.max_bytes {
            self.drop_copy(NotReplayable::TooLarge {
                limit: self.max_bytes,
            });
        } else if !self.memory.try_reserve(len) {
            self.drop_copy(NotReplayable::MemoryFull {
                limit: self.memory.limit(),
            });
        } else {
            self.buffered += len;
            self.chunks.push(data.clone());
        }
    }

    fn drop_copy(&mut self, why: NotReplayable) {
        if self.capped.is_none() {
            self.capped = Some(why);
        }
        // Trailers stay: they are small, and an attempt may still owe them.
        self.chunks = Vec::new();
        self.memory.release(std::mem::take(&mut self.buffered));
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.memory.release(self.buffered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use http_body_util::{BodyExt, StreamBody};

    fn memory(limit: usize) -> Arc<ReplayMemory> {
        Arc::new(ReplayMemory::new(limit))
    }

    fn chunks(parts: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    /// A retry cannot start while the previous attempt still holds the body.
    #[tokio::test]
    async fn retry_waits_until_previous_attempt_lets_go() {
        let (mut first, replay) = ReplayBody::new(chunks(&[b"ab", b"cd"]), 64, memory(64));
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        assert_eq!(replay.check(), Err(NotReplayable::InUse));
        assert_eq!(replay.check_lasting(), Ok(()));
        let mut early = replay.body();
        assert!(
            early.frame().await.unwrap().is_err(),
            "held elsewhere: an error, no panic"
        );
        drop(first);
        assert_eq!(replay.check(), Ok(()));
        assert_eq!(replay.body().collect().await.unwrap().to_bytes(), "abcd");
    }

    /// A retry announces the client's size hint before it is polled.
    #[tokio::test]
    async fn retry_announces_the_original_size() {
        let (first, replay) = ReplayBody::new(body::full("hello"), 64, memory(64));
        assert_eq!(first.size_hint().exact(), Some(5));
        assert_eq!(first.collect().await.unwrap().to_bytes(), "hello");
        let second = replay.body();
        assert_eq!(second.size_hint().exact(), Some(5));
        assert!(!second.is_end_stream());
        assert_eq!(second.collect().await.unwrap().to_bytes(), "hello");
    }

    /// The copy counts against the shared memory and is freed when retries end,
    /// even while the last attempt is still streaming.
    #[tokio::test]
    async fn copy_is_freed_when_retries_end() {
        let pool = memory(64);
        let (first, replay) = ReplayBody::new(chunks(&[b"abc", b"de"]), 64, pool.clone());
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcde");
        assert_eq!(pool.used(), 5);
        let mut last = replay.body();
        let _ = last.frame().await.unwrap().unwrap();
        drop(replay);
        let rest = last.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "de", "the attempt in flight still completes");
        assert_eq!(pool.used(), 0);
    }

    /// A second request that cannot reserve memory streams but is not replayable.
    #[tokio::test]
    async fn full_memory_makes_body_not_replayable() {
        let pool = memory(10);
        let (a, _keep_a) = ReplayBody::new(chunks(&[b"12345678"]), 64, pool.clone());
        assert_eq!(a.collect().await.unwrap().to_bytes(), "12345678");
        let (b, replay_b) = ReplayBody::new(chunks(&[b"xyz"]), 64, pool.clone());
        assert_eq!(b.collect().await.unwrap().to_bytes(), "xyz");
        assert_eq!(
            replay_b.check(),
            Err(NotReplayable::MemoryFull { limit: 10 })
        );
        assert_eq!(pool.used(), 8);
    }

    /// Over the per-request cap: not replayable once read, replayable before.
    #[tokio::test]
    async fn over_cap_body_is_replayable_only_before_any_byte() {
        let (first, replay) = ReplayBody::new(body::full("0123456789"), 4, memory(64));
        drop(first);
        assert_eq!(replay.check(), Ok(()));
        let second = replay.body();
        assert_eq!(second.collect().await.unwrap().to_bytes(), "0123456789");
        assert_eq!(replay.check(), Err(NotReplayable::TooLarge { limit: 4 }));
    }
}
