//! Retries of upstream requests (step 5 of a request's life).
//!
//! [`RetryLayer`] wraps the upstream client. For every request it:
//!
//! - streams the request body upstream as it arrives, keeping a copy of up to
//!   [`RetryConfig::max_replay_body`] bytes ([`replay`]); every retry sends the
//!   byte-identical body (same length, or chunked again if it was chunked);
//! - decides on the **response head only**: a response whose status is in a
//!   configured class ([`RetryOn`]: `5xx`, `gateway-error`,
//!   `retriable-status-codes`) or an error of class `reset`,
//!   `connect-failure` or `timeout` (the per-try timeout) is retried; anything
//!   else goes back at once. Response bodies are never buffered: once a
//!   response is returned, the exchange is over;
//! - replays a request after a failure after which the upstream may have
//!   processed it (a `500`/`502`/`504`, a reset once the request was sent, a
//!   per-try timeout) only when that cannot run it twice. The route decides
//!   first ([`RequestPolicy::replay_after_send`]): `replay=safe`,
//!   `idempotency-key=honoured` or `verify=` allow it whatever the method,
//!   `replay=unsafe` refuses it whatever the method and the global opt-in.
//!   Otherwise an idempotent method or [`RetryConfig::retry_unsafe_requests`]
//!   allows it. Failures after which it cannot have (connect failure,
//!   `reset-before-request`, `refused-stream`, `503`, `429`) are always
//!   retried, whatever the route says;
//! - never retries when the client's own body failed, when the body was larger
//!   than the replay cap (or the shared replay memory was full) and part of it
//!   was already sent, when the route says `retry=off`
//!   ([`RequestPolicy::retry`]), or for a method outside
//!   [`RetryConfig::methods`];
//! - waits with exponential backoff and full jitter ([`backoff`]), or exactly
//!   `Retry-After` on a `503`/`429` when that fits the deadline (if it does
//!   not, the response goes back unchanged);
//! - keeps the whole exchange up to response headers within the deadline
//!   ([`RequestPolicy::timeout`], else [`RetryConfig::request_timeout`]): an
//!   attempt in flight at the deadline is abandoned with
//!   [`ProxyError::Timeout`] (a `504`), and a retry that could not start
//!   before it is not made;
//! - spends one token of the shared [`budget`] per retry; when it is spent,
//!   the current answer goes back and `idemproxy_retry_budget_exhausted_total`
//!   counts it;
//! - answers with the last upstream response, adding
//!   the [`Attempts`] response extension when N > 1 (the edge shows it as
//!   `x-idemproxy-attempts: N`), or, when the last attempt had no
//!   response, its error ([`ProxyError::Exhausted`] after several attempts).
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use idemproxy::{body::{self, Body}, error::ProxyError};
//! use idemproxy::retry::{RetryConfig, RetryLayer, RetryMetrics, RetryOn};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # async fn demo() -> Result<(), ProxyError> {
//! let config = RetryConfig {
//!     retry_on: RetryOn::parse("5xx,reset,connect-failure").expect("valid words"),
//!     ..RetryConfig::default()
//! };
//! let mut registry = prometheus_client::registry::Registry::default();
//! let upstream = service_fn(|_req: Request<Body>| async {
//!     Ok::<_, ProxyError>(Response::new(body::full("stored")))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(RetryLayer::new(config, RetryMetrics::new(&mut registry)))
//!     .service(upstream);
//! let rsp = client.oneshot(Request::new(body::full("{}"))).await?;
//! assert_eq!(rsp.status(), StatusCode::OK);
//! # Ok(()) }
//! ```

pub mod backoff;
pub mod budget;
mod metrics;
pub mod policy;
pub mod replay;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderName, Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::extensions::{Attempts, Deadline, RequestPolicy};
use crate::service::{HttpService, ResponseFuture, take_ready};

use self::backoff::Backoff;
use self::budget::RetryBudget;
pub use self::metrics::RetryMetrics;
pub use self::policy::{ParseRetryOnError, RetryClass, RetryOn};
use self::policy::{error_class, retry_after, status_class, status_may_have_been_processed};
use self::replay::{NotReplayable, Replay, ReplayBody, ReplayMemory};

/// The request header whose value is logged as `request_id`.
const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// How requests are retried. Built by the configuration; see [`Default`] for
/// the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// The retried classes (default `5xx,reset,connect-failure,timeout`).
    pub retry_on: RetryOn,
    /// The statuses of the `5xx` class (default 500, 502, 503, 504).
    pub statuses: Vec<StatusCode>,
    /// The statuses of the `retriable-status-codes` class (default 429).
    pub retriable_status_codes: Vec<StatusCode>,
    /// Attempts per request, the first included (default 5); 1 disables retries.
    pub max_attempts: u32,
    /// The overall deadline per request up to response headers (default 30s),
    /// unless the route sets its own.
    pub request_timeout: Duration,
    /// The deadline of one attempt up to response headers (default none).
    pub try_timeout: Option<Duration>,
    /// The longest wait before the first retry; it doubles per retry (default 25ms).
    pub backoff_base: Duration,
    /// The longest wait before any retry (default 2s).
    pub backoff_max: Duration,
    /// Retries allowed per request seen over the last 10 s (default 0.2).
    pub budget_ratio: f32,
    /// Retries allowed per second regardless of traffic (default 10).
    pub budget_min_per_sec: u32,
    /// Methods that may be retried; `None` (the default) allows all.
    pub methods: Option<Vec<Method>>,
    /// Bytes of one request body kept for replay (default 1 MiB).
    pub max_replay_body: usize,
    /// Bytes kept for replay across all requests (default 64 MiB).
    pub max_replay_memory: usize,
    /// Replay non-idempotent requests even after a failure after which the
    /// upstream may have processed them (default `false`): a lost answer can
    /// then run a call twice. `IDEMPROXY_RETRY_UNSAFE_REQUESTS`.
    pub retry_unsafe_requests: bool,
}

impl RetryConfig {
    /// The default retried classes.
    pub const DEFAULT_RETRY_ON: RetryOn = RetryOn::empty()
        .with(RetryClass::FiveXx)
        .with(RetryClass::Reset)
        .with(RetryClass::ConnectFailure)
        .with(RetryClass::Timeout);
    /// The default statuses of the `5xx` class.
    pub const DEFAULT_STATUSES: [StatusCode; 4] = [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::GATEWAY_TIMEOUT,
    ];
    /// The default statuses of the `retriable-status-codes` class.
    pub const DEFAULT_RETRIABLE_STATUS_CODES: [StatusCode; 1] = [StatusCode::TOO_MANY_REQUESTS];
    /// The default number of attempts, the first included.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    /// The default overall deadline.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default backoff base.
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
    /// The default backoff maximum.
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(2);
    /// The default budget ratio.
    pub const DEFAULT_BUDGET_RATIO: f32 = 0.2;
    /// The default budget floor per second.
    pub const DEFAULT_BUDGET_MIN_PER_SEC: u32 = 10;
    /// The default per-request replay cap.
    pub const DEFAULT_MAX_REPLAY_BODY: usize = 1 << 20;
    /// The default replay memory across requests.
    pub const DEFAULT_MAX_REPLAY_MEMORY: usize = 64 << 20;
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            retry_on: Self::DEFAULT_RETRY_ON,
            statuses: Self::DEFAULT_STATUSES.to_vec(),
            retriable_status_codes: Self::DEFAULT_RETRIABLE_STATUS_CODES.to_vec(),
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            try_timeout: None,
            backoff_base: Self::DEFAULT_BACKOFF_BASE,
            backoff_max: Self::DEFAULT_BACKOFF_MAX,
            budget_ratio: Self::DEFAULT_BUDGET_RATIO,
            budget_min_per_sec: Self::DEFAULT_BUDGET_MIN_PER_SEC,
            methods: None,
            max_replay_body: Self::DEFAULT_MAX_REPLAY_BODY,
            max_replay_memory: Self::DEFAULT_MAX_REPLAY_MEMORY,
            retry_unsafe_requests: false,
        }
    }
}

/// What every [`Retry`] made by one layer shares: config, budget, replay
/// memory and metrics.
#[derive(Debug)]
struct Shared {
    config: RetryConfig,
    backoff: Backoff,
    budget: RetryBudget,
    memory: Arc<ReplayMemory>,
    metrics: RetryMetrics,
}

/// Makes [`Retry`] services that share one budget and one replay memory.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// A layer retrying as `config` says, counting into `metrics`.
    pub fn new(config: RetryConfig, metrics: RetryMetrics) -> Self {
        let shared = Shared {
            backoff: Backoff::new(config.backoff_base, config.backoff_max),
            budget: RetryBudget::new(config.budget_ratio, config.budget_min_per_sec),
            memory: Arc::new(ReplayMemory::new(config.max_replay_memory)),
            config,
            metrics,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The replay memory shared by all requests (bytes held right now).
    pub fn replay_memory(&self) -> &ReplayMemory {
        &self.shared.memory
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The retry service; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Body>> for Retry<S>
where
    S: HttpService,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Keep the service that poll_ready made ready for the first attempt.
        Box::pin(send_with_retries(
            take_ready(&mut self.inner),
            req,
            self.shared.clone(),
        ))
    }
}

/// An attempt was in flight when the request's deadline passed.
struct DeadlinePassed;

/// The retry loop. `svc` is ready for the first call.
async fn send_with_retries<S>(
    mut svc: S,
    req: Request<Body>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, ProxyError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Send,
    S::Future: Send,
{
    let config = &shared.config;
    let policy = req.extensions().get::<RequestPolicy>();
    let Deadline {
        limit,
        at: deadline,
    } = Deadline::of(&req, config.request_timeout);
    // A replay after the upstream may have processed the request must not be
    // able to run it twice (the README's replay rules).
    // The route's own word (`replay=`, `idempotency-key=honoured`, `verify=`)
    // comes first: it is the more specific statement.
    let replay_safe = match policy.and_then(|p| p.replay_after_send) {
        Some(route_says) => route_says,
        None => config.retry_unsafe_requests || is_idempotent(req.method()),
    };
    let retriable = policy.and_then(|p| p.retry) != Some(false)
        && config.max_attempts > 1
        && !config.retry_on.is_empty()
        && config
            .methods
            .as_ref()
            .is_none_or(|m| m.contains(req.method()));
    if !retriable {
        shared.metrics.attempts(1);
        let result = attempt(&mut svc, req, false, deadline, config.try_timeout).await;
        return result.unwrap_or(Err(ProxyError::Timeout(limit)));
    }

    // A clone of the header shares its bytes: no allocation per request.
    let request_id = req.headers().get(REQUEST_ID_HEADER).cloned();
    let log = RetryLog {
        request_id: request_id.as_ref().and_then(|v| v.to_str().ok()),
        shared: &shared,
    };
    shared.budget.deposit();
    let (head, body) = req.into_parts();
    let (first, replay) = ReplayBody::new(body, config.max_replay_body, shared.memory.clone());
    // What a retry resends: the request line and headers. The extensions (the
    // layers' notes to each other) go with the first attempt only; the upstream
    // client reads none of them, and cloning them costs an allocation each.
    let resend = (
        head.method.clone(),
        head.uri.clone(),
        head.version,
        head.headers.clone(),
    );
    let mut request = Request::from_parts(head, body::boxed(first));
    let mut attempts: u32 = 0;
    // Whether any attempt so far may have been processed upstream.
    let mut processed = false;

    let outcome = loop {
        attempts += 1;
        let result = match attempt(
            &mut svc,
            request,
            attempts > 1,
            deadline,
            config.try_timeout,
        )
        .await
        {
            Ok(result) => result,
            Err(DeadlinePassed) => {
                processed = true;
                break Err(ProxyError::Timeout(limit));
            }
        };
        let this_processed = match &result {
            Ok(rsp) => status_may_have_been_processed(rsp.status()),
            Err(error) => error.may_have_been_processed(),
        };
        processed |= this_processed;
        let reason = match &result {
            Ok(rsp) => status_class(
                rsp.status(),
                config.retry_on,
                &config.statuses,
                &config.retriable_status_codes,
            ),
            Err(error) => error_class(error, config.retry_on),
        };
        let Some(reason) = reason else {
            break result;
        };
        if this_processed && !replay_safe {
            log.refused(reason, attempts);
            break result;
        }
        let Some(delay) = log.next_delay(&result, reason, attempts, &replay, deadline) else {
            break result;
        };
        // The failed response (if any) is dropped only once the retry is sure
        // to go out, so it can still be the answer.
        tokio::time::sleep(delay).await;
        if let Err(why) = replay_ready(&replay).await {
            log.body_not_replayable(reason, why);
            break result;
        }
        shared.metrics.retried(reason);
        drop(result);
        request = Request::new(body::boxed(replay.body()));
        *request.method_mut() = resend.0.clone();
        *request.uri_mut() = resend.1.clone();
        *request.version_mut() = resend.2;
        *request.headers_mut() = resend.3.clone();
    };

    // The decision is over: free the copy even if the transport still holds
    // the last attempt's body.
    drop(replay);
    shared.metrics.attempts(attempts);
    match outcome {
        Ok(mut rsp) => {
            if attempts > 1 {
                rsp.extensions_mut().insert(Attempts(attempts));
            }
            Ok(rsp)
        }
        Err(last) if attempts > 1 => Err(ProxyError::Exhausted {
            last: Box::new(last),
            attempts,
            may_have_been_processed: processed,
        }),
        Err(last) => Err(last),
    }
}

/// Whether `method` is idempotent (RFC 9110 §9.2.2): sending it twice has
/// the effect of sending it once, so a replay after it may have been
/// processed is safe.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Sends one attempt, bounded by the per-try timeout (a retriable
/// [`ProxyError::Timeout`]) and by the request's deadline.
async fn attempt<S>(
    svc: &mut S,
    req: Request<Body>,
    make_ready: bool,
    deadline: Option<Instant>,
    try_timeout: Option<Duration>,
) -> Result<Result<Response<Body>, ProxyError>, DeadlinePassed>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Send,
    S::Future: Send,
{
    let call = async move {
        if make_ready {
            std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
        }
        // Boxed outside of any `async` state: holding `S::Future` itself
        // across an await trips rustc's lifetime inference for `Send`.
        let call: Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send + '_>> =
            Box::pin(svc.call(req));
        call.await
    };
    match (try_timeout, deadline) {
        (Some(per_try), deadline)
            if deadline.is_none_or(|d| per_try < d.saturating_duration_since(Instant::now())) =>
        {
            let result = tokio::time::timeout(per_try, call).await;
            Ok(result.unwrap_or(Err(ProxyError::Timeout(per_try))))
        }
        // The deadline as it is: no clock read to turn it into a duration.
        (_, Some(deadline)) => tokio::time::timeout_at(deadline, call)
            .await
            .map_err(|_| DeadlinePassed),
        (_, None) => Ok(call.await),
    }
}

/// Whether the next attempt can take the body. The transport usually drops
/// the previous attempt's body as the attempt ends; give it one turn.
async fn replay_ready(replay: &Replay) -> Result<(), NotReplayable> {
    match replay.check() {
        Err(NotReplayable::InUse) => {
            tokio::task::yield_now().await;
            replay.check()
        }
        other => other,
    }
}

/// The decisions of one request that log (with its request id) or count.
struct RetryLog<'a> {
    request_id: Option<&'a str>,
    shared: &'a Shared,
}

impl RetryLog<'_> {
    /// The wait before the next attempt, or `None` when the current answer
    /// must go back: attempts used up, body not replayable, deadline too
    /// close, or budget spent.
    fn next_delay(
        &self,
        result: &Result<Response<Body>, ProxyError>,
        reason: RetryClass,
        attempts: u32,
        replay: &Replay,
        deadline: Option<Instant>,
    ) -> Option<Duration> {
        let request_id = self.request_id;
        if attempts >= self.shared.config.max_attempts {
            tracing::debug!(
                request_id,
                reason = reason.as_str(),
                attempts,
                "retry attempts exhausted"
            );
            return None;
        }
        if let Err(why) = replay.check_lasting() {
            self.body_not_replayable(reason, why);
            return None;
        }
        let now = Instant::now();
        let fits = |wait: Duration| {
            deadline.is_none_or(|d| now.checked_add(wait).is_some_and(|end| end < d))
        };
        let asked = match result {
            Ok(rsp) => retry_after(rsp.status(), rsp.headers(), SystemTime::now()),
            Err(_) => None,
        };
        let delay = match asked {
            Some(wait) if fits(wait) => wait,
            Some(wait) => {
                tracing::info!(
                    request_id,
                    reason = reason.as_str(),
                    retry_after_ms = millis(wait),
                    "not retrying: Retry-After ends past the request deadline"
                );
                return None;
            }
            None => self.shared.backoff.delay(attempts, &mut rand::rng()),
        };
        if !fits(delay) {
            tracing::debug!(
                request_id,
                reason = reason.as_str(),
                delay_ms = millis(delay),
                "not retrying: the backoff ends past the request deadline"
            );
            return None;
        }
        if !self.shared.budget.withdraw() {
            self.shared.metrics.budget_exhausted();
            tracing::warn!(
                request_id,
                reason = reason.as_str(),
                attempts,
                "not retrying: the retry budget is exhausted"
            );
            return None;
        }
        tracing::info!(
            request_id,
            reason = reason.as_str(),
            attempt = attempts + 1,
            delay_ms = millis(delay),
            "retrying upstream request"
        );
        Some(delay)
    }

    /// A retriable failure after which the upstream may have processed the
    /// request, on a request whose replay could run it twice.
    fn refused(&self, reason: RetryClass, attempts: u32) {
        self.shared.metrics.refused(reason);
        tracing::info!(
            request_id = self.request_id,
            reason = reason.as_str(),
            attempts,
            "not retrying: the upstream may have processed the request, and a replay of this \
             method is not safe on this route (see the README's replay rules)"
        );
    }

    fn body_not_replayable(&self, reason: RetryClass, why: NotReplayable) {
        tracing::info!(
            request_id = self.request_id,
            reason = reason.as_str(),
            why = %why,
            "not retrying: the request body cannot be sent again"
        );
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
