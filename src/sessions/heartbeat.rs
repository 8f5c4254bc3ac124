//! One heartbeat attempt: build the request, send it, judge the answer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::time::{Instant, timeout_at};
use tower::ServiceExt;

use super::compact::{Beat, Credentials};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::service::ResponseFuture;

/// The most bytes of a heartbeat answer that are read (to find the alive
/// field) or drained (so an HTTP/1.1 connection can go back to the pool).
pub(super) const BODY_CAP: usize = 64 * 1024;

/// The header that carries the heartbeat's own request id.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What an attempt says about the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Alive: the round is done.
    Alive,
    /// Gone: forget the session.
    Gone,
    /// A transient failure (5xx, timeout, connection error): retry soon.
    Retry,
    /// A failure not worth retrying at once (other 4xx, a bad answer).
    Fail,
}

/// An attempt's verdict with what led to it, for logs.
#[derive(Clone, Copy, Debug)]
pub(super) struct Judgement {
    pub(super) verdict: Verdict,
    pub(super) status: Option<StatusCode>,
    /// A short, fixed description (never upstream text, which may echo the id).
    pub(super) why: &'static str,
}

impl Judgement {
    fn new(verdict: Verdict, status: Option<StatusCode>, why: &'static str) -> Self {
        Self {
            verdict,
            status,
            why,
        }
    }
}

/// Builds the heartbeat request: path-and-query URI, copied credentials, the
/// spec's headers (replacing credentials of the same name), a JSON content
/// type when there is a body, and a fresh `x-request-id` (also returned).
pub(super) fn build_request(beat: &Beat, credentials: &Credentials) -> (Request<Body>, String) {
    let spec_body = beat.body();
    let body = match &spec_body {
        Some(bytes) => body::full(bytes.clone()),
        None => body::empty(),
    };
    let common = &*beat.common;
    let mut req = Request::new(body);
    *req.method_mut() = common.method.clone();
    *req.uri_mut() = Uri::from(beat.path_and_query());
    let headers = req.headers_mut();
    for (name, value) in credentials.headers() {
        headers.append(name, value);
    }
    for name in common.set_headers.keys() {
        headers.remove(name);
    }
    for (name, value) in &common.set_headers {
        let mut value = value.clone();
        value.set_sensitive(true);
        headers.append(name.clone(), value);
    }
    if spec_body.is_some() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID, value);
    }
    (req, request_id)
}

/// Sends one attempt and judges it, all within `limit`.
///
/// The service's future is boxed here, outside any `async` block: inside
/// one, the compiler would have to prove it `Send` for every lifetime of the
/// body's boxed error, which it cannot.
pub(super) fn send<S>(
    client: S,
    req: Request<Body>,
    limit: Duration,
    alive_field: Option<Arc<[String]>>,
) -> impl Future<Output = Judgement> + Send + 'static
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let answer: ResponseFuture = Box::pin(client.oneshot(req));
    judge(answer, limit, alive_field)
}

async fn judge(
    answer: ResponseFuture,
    limit: Duration,
    alive_field: Option<Arc<[String]>>,
) -> Judgement {
    let deadline = Instant::now() + limit;
    let response = match timeout_at(deadline, answer).await {
        Err(_) => return Judgement::new(Verdict::Retry, None, "timeout"),
        Ok(Err(error)) => return Judgement::new(Verdict::Retry, None, error.kind()),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    let body = response.into_body();
    let judge = |verdict, why| Judgement::new(verdict, Some(status), why);
    if !status.is_success() {
        let _ = timeout_at(deadline, drain(body)).await;
        return match status.as_u16() {
            401 | 403 | 404 | 410 => judge(Verdict::Gone, "session gone"),
            500..=599 => judge(Verdict::Retry, "server error"),
            _ => judge(Verdict::Fail, "unexpected status"),
        };
    }
    let Some(path) = alive_field else {
        let _ = timeout_at(deadline, drain(body)).await;
        return judge(Verdict::Alive, "alive");
    };
    let bytes = match timeout_at(deadline, read_capped(body)).await {
        Err(_) => return judge(Verdict::Retry, "timeout reading answer"),
        Ok(Err(judgement)) => return judge(judgement.0, judgement.1),
        Ok(Ok(bytes)) => bytes,
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(doc) if has_field(&doc, &path) => judge(Verdict::Alive, "alive"),
        Ok(_) => judge(Verdict::Gone, "alive field missing"),
        Err(_) => judge(Verdict::Fail, "answer is not JSON"),
    }
}

/// Reads at most [`BODY_CAP`] bytes of an answer.
///
/// A plain frame loop rather than `http_body_util::Limited`, whose error
/// conversion would make this future's `Send` unprovable (see [`send`]).
async fn read_capped(mut body: Body) -> Result<Bytes, (Verdict, &'static str)> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err((Verdict::Retry, "answer body failed"));
        };
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > BODY_CAP {
                return Err((Verdict::Fail, "answer too large"));
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}

/// Reads and discards up to [`BODY_CAP`] bytes, so a short answer ends
/// cleanly and its connection can be reused. Nothing is kept.
async fn drain(mut body: Body) {
    let mut seen = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            seen += data.len();
            if seen > BODY_CAP {
                return;
            }
        }
    }
}

/// Whether `doc` has a non-null value at `path` (object keys, or array
/// indexes as numeric segments).
pub(super) fn has_field(doc: &Value, path: &[String]) -> bool {
    let mut value = doc;
    for segment in path {
        let next = match value {
            Value::Object(map) => map.get(segment.as_str()),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(next) => value = next,
            None => return false,
        }
    }
    !value.is_null()
}
