//! The route table: `IDEMPROXY_ROUTES` parsed once into typed routes,
//! matched against each request, and the safe templates that verification
//! and heartbeat requests are built from.
//!
//! One route a line, first match wins; blank lines and `#` comments are skipped:
//!
//! ```text
//! METHOD PATH-TEMPLATE [option=value ...]
//! ```
//!
//! `METHOD` is an HTTP method or `*`. In `PATH-TEMPLATE`, `{name}` matches one
//! non-empty segment and `{*name}` the rest of the path; literal text may sit
//! next to captures in a segment. Options: `retry=on|off`,
//! `idempotency-key=on|off`, `timeout=DURATION`,
//! `verify=same|location|METHOD:TEMPLATE` with `match=exists|json-subset|exact`
//! and `recovered-status=CODE` and `recovered-body=stored|empty|JSON-TEMPLATE`,
//! `session=SOURCE` (repeatable), `session-end`,
//! `renews` (`renews=on|off`), `heartbeat=METHOD:TEMPLATE`, `lease-ttl=SOURCE`;
//! `idempotency-key=honoured` declares that the backend deduplicates by the key;
//! `replay=safe|unsafe` is the route's word on a replay after the request may
//! have been processed (see [`Route::replay`]).
//!
//! Conditions (repeatable; all must hold, else the route is skipped and
//! matching goes on with the next line) look beyond the method and path:
//! `if-query=NAME` (the query has the parameter), `if-query=NAME=V1|V2` (one
//! of its values, percent-decoded, is `V1` or `V2`; `+` is a literal `+`,
//! not a space), `if-header=NAME`, `if-header=NAME=V1|V2` (a value, or an
//! element of a comma list such as `Prefer: return-no-content, odata.maxpagesize=10`,
//! equals one once trimmed, ignoring ASCII case), `if-json=FIELD.PATH`
//! (the JSON request body has the field) and `if-json=FIELD.PATH=V1|V2` (its
//! scalar text: a string as is, a number or boolean as JSON). `!NAME` means
//! absent: `if-query=!NAME`, `if-header=!NAME`, `if-json=!FIELD.PATH`. Names
//! and values are written without escapes (no whitespace, no `|` in a
//! value). An `if-json` condition makes idemproxy read the body ahead (up to
//! `IDEMPROXY_MAX_REPLAY_BODY`) when its route could otherwise match; a
//! larger body, or one that is not JSON, has no fields. `--check-config`
//! writes conditions right after the path template.
//!
//! ```
//! use http::Method;
//! use idemproxy::routes::{RenderContext, RouteRequest, RouteTable, VerifyTarget};
//!
//! let table = RouteTable::parse(
//!     "# sessions API\n\
//!      POST /v1/sessions/{sid}/entries session=path:sid verify=GET:/v1/sessions/{sid}/entries/{body.uuid}\n\
//!      GET  /v1/sessions/{sid}/await   session=path:sid timeout=10m retry=off\n",
//! )
//! .unwrap();
//!
//! let m = table.route_match(&RouteRequest::new(&Method::POST, "/v1/sessions/a%20b/entries")).unwrap();
//! assert_eq!(m.captures.get("sid"), Some("a b"));
//!
//! // Build the verification URL for a 409: values are percent-encoded.
//! let Some(VerifyTarget::Template { method, template }) = m.route.verify.as_ref().map(|v| &v.target)
//! else { unreachable!() };
//! let body = serde_json::json!({"uuid": "../admin"});
//! let headers = http::HeaderMap::new();
//! let ctx = RenderContext::new(&m.captures, &headers).with_body(Some(&body));
//! assert_eq!(*method, Method::GET);
//! assert_eq!(template.render(&ctx).unwrap(), "/v1/sessions/a%20b/entries/..%2Fadmin");
//!
//! let get = |path| table.route_match(&RouteRequest::new(&Method::GET, path));
//! assert_eq!(get("/v1/sessions/s/await").unwrap().route.retry, Some(false));
//! assert!(get("/v1/sessions//await").is_none());
//!
//! // Conditions: the same path, other options.
//! let table = RouteTable::parse(
//!     "PUT /{container}/{blob} if-query=comp=lease if-header=x-ms-lease-action=acquire replay=unsafe\n\
//!      PUT /{container}/{blob} if-query=comp=lease retry=off\n\
//!      POST /mcp if-json=method=ping|tools/list replay=safe\n",
//! )
//! .unwrap();
//! let mut headers = http::HeaderMap::new();
//! headers.insert("x-ms-lease-action", http::HeaderValue::from_static("renew"));
//! let renew = RouteRequest::new(&Method::PUT, "/c/b?comp=lease").with_headers(&headers);
//! assert_eq!(table.route_match(&renew).unwrap().index, 1);
//! let ping = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
//! let call = RouteRequest::new(&Method::POST, "/mcp").with_body(Some(&ping));
//! assert_eq!(table.route_match(&call).unwrap().route.replay_after_send(), Some(true));
//! ```
#![warn(missing_docs)]

mod condition;
mod escape;
mod json;
mod parse;
mod path;
mod scan;
mod session_source;
mod template;

use std::fmt;
use std::time::Duration;

use http::{Method, StatusCode};

pub use condition::{Condition, ConditionSubject, ConditionTest, RouteRequest};
pub use json::{FieldPath, FieldPathError, json_subset, lookup};
pub use parse::RouteError;
pub use path::{CaptureKind, Captures, PathTemplate};
pub use session_source::{SessionSource, SessionSourceError, SessionSourceKind};
pub use template::{Placeholder, RenderContext, RenderError, Template, TemplateError};

use crate::units::format_duration;

/// The parsed `IDEMPROXY_ROUTES`: routes in order, first match wins.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Parses the whole variable. The first line that does not parse is
    /// reported with its number, its text and the offending word.
    pub fn parse(text: &str) -> Result<Self, RouteError> {
        parse::parse_routes(text).map(|routes| Self { routes })
    }

    /// The first route whose method (or `*`) and path template match and
    /// whose conditions all hold, with its percent-decoded captures. The
    /// request's JSON body is what [`RouteRequest::with_body`] gave: without
    /// one, every `if-json` field is absent.
    pub fn route_match(&self, req: &RouteRequest<'_>) -> Option<RouteMatch<'_>> {
        self.find(req, true).ok().flatten()
    }

    /// [`route_match`](Self::route_match) for a request whose body has not
    /// been read: [`NeedsBody`] when the body decides, i.e. when the first
    /// route that matches on everything but the body has an `if-json`
    /// condition (read the body ahead and match again with it). A table
    /// without `if-json` conditions never needs the body.
    pub fn route_match_before_body(
        &self,
        req: &RouteRequest<'_>,
    ) -> Result<Option<RouteMatch<'_>>, NeedsBody> {
        self.find(req, false)
    }

    fn find(
        &self,
        req: &RouteRequest<'_>,
        body_known: bool,
    ) -> Result<Option<RouteMatch<'_>>, NeedsBody> {
        for (index, route) in self.routes.iter().enumerate() {
            if route.method.as_ref().is_some_and(|m| m != req.method()) {
                continue;
            }
            // Conditions on the query and headers first: they cost no
            // allocation, while a path match copies its captures.
            let mut reads_body = false;
            let holds = route.conditions.iter().all(|c| {
                reads_body |= c.reads_body();
                c.reads_body() || c.holds(req)
            });
            if !holds {
                continue;
            }
            let Some(captures) = route.path.matches_path(req.path()) else {
                continue;
            };
            if reads_body {
                if !body_known {
                    return Err(NeedsBody);
                }
                let body_holds = route
                    .conditions
                    .iter()
                    .filter(|c| c.reads_body())
                    .all(|c| c.holds(req));
                if !body_holds {
                    continue;
                }
            }
            return Ok(Some(RouteMatch {
                route,
                index,
                captures,
            }));
        }
        Ok(None)
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// How many routes there are.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// The routes, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Route> {
        self.routes.iter()
    }

    /// The route at `index` (as in [`RouteMatch::index`]).
    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }
}

impl<'a> IntoIterator for &'a RouteTable {
    type Item = &'a Route;
    type IntoIter = std::slice::Iter<'a, Route>;

    fn into_iter(self) -> Self::IntoIter {
        self.routes.iter()
    }
}

/// One line per route, in canonical form (for `--check-config`).
impl fmt::Display for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for route in &self.routes {
            writeln!(f, "{route}")?;
        }
        Ok(())
    }
}

/// [`RouteTable::route_match_before_body`]: which route matches depends on
/// the request's JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedsBody;

/// The outcome of [`RouteTable::route_match`].
#[derive(Clone, Debug)]
pub struct RouteMatch<'a> {
    /// The matched route.
    pub route: &'a Route,
    /// Its position in the table (0-based), e.g. for metrics labels.
    pub index: usize,
    /// The values its path template captured, percent-decoded.
    pub captures: Captures,
}

/// One route line, parsed.
#[derive(Clone, Debug)]
pub struct Route {
    /// The method to match; `None` for `*`.
    pub method: Option<Method>,
    /// The path template to match.
    pub path: PathTemplate,
    /// `if-query=`, `if-header=`, `if-json=`: all must hold for the route
    /// to match, in the order written.
    pub conditions: Vec<Condition>,
    /// `retry=on|off`; `None` keeps the global behaviour.
    pub retry: Option<bool>,
    /// `idempotency-key=on|off|honoured`; `None` keeps the global method list.
    pub idempotency_key: Option<bool>,
    /// `idempotency-key=honoured`: the backend deduplicates requests by the
    /// key, so a replay after sending cannot run a call twice.
    pub key_honoured: bool,
    /// `replay=safe|unsafe`: whether a replay after the request may have
    /// been processed upstream is allowed whatever the method (`safe`,
    /// `Some(true)`), or never (`unsafe`, `Some(false)`: over
    /// `idempotency-key=honoured`, `verify=` and
    /// `IDEMPROXY_RETRY_UNSAFE_REQUESTS`). `None` keeps the default rule.
    pub replay: Option<bool>,
    /// `timeout=`: the overall deadline for this route's requests.
    pub timeout: Option<Duration>,
    /// `verify=` with `match=` and `recovered-status=`: how a `409` is verified.
    pub verify: Option<VerifyRule>,
    /// `session=`: where this route's requests (or responses) carry the session id, in order.
    pub session: Vec<SessionSource>,
    /// `session-end`: a request on this route ends its session.
    pub session_end: bool,
    /// `renews` / `renews=on|off`: whether a `2xx` answer to this route's
    /// request renews its session (the backend extends the session on it);
    /// `None` keeps the global `IDEMPROXY_REQUESTS_RENEW`.
    pub renews: Option<bool>,
    /// `heartbeat=`: overrides the global heartbeat for sessions this route registers.
    pub heartbeat: Option<HeartbeatTemplate>,
    /// `lease-ttl=SOURCE`: where the backend states the length of the lease
    /// (the session) this route registers, in seconds; its heartbeats then
    /// come every third of it, unless `IDEMPROXY_HEARTBEAT_INTERVAL` is set.
    pub lease_ttl: Option<SessionSource>,
    /// The line as written (trimmed), for logs.
    pub line: String,
    /// The line's 1-based number in `IDEMPROXY_ROUTES`.
    pub line_number: usize,
}

impl Route {
    /// Whether the route reads the request's body: its verification (to
    /// compare it, or to fill a template), its session source or its
    /// `lease-ttl=`.
    pub fn needs_body(&self) -> bool {
        let verify_reads_body = self.verify.as_ref().is_some_and(|v| {
            v.match_mode != MatchMode::Exists
                || matches!(&v.target, VerifyTarget::Template { template, .. } if template.needs_body())
                || matches!(&v.recovered_body, RecoveredBody::Template(t) if t.needs_body())
        });
        verify_reads_body
            || self.session.iter().any(SessionSource::needs_request_body)
            || self
                .lease_ttl
                .as_ref()
                .is_some_and(SessionSource::needs_request_body)
    }

    /// The route's word on replaying a request after the upstream may have
    /// processed it: `replay=`, else `Some(true)` when it says
    /// `idempotency-key=honoured` or has `verify=` (a replay that meets the
    /// stored write gets a 409, which is verified), else `None`.
    pub fn replay_after_send(&self) -> Option<bool> {
        self.replay
            .or((self.key_honoured || self.verify.is_some()).then_some(true))
    }

    /// Whether one of the route's conditions reads the JSON request body.
    pub fn conditions_read_body(&self) -> bool {
        self.conditions.iter().any(Condition::reads_body)
    }
}

/// The canonical form of the route: `METHOD PATH`, its conditions as
/// written, then the options in a fixed order, with `match=` and
/// `recovered-status=` spelled out.
impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on_off = |b: bool| if b { "on" } else { "off" };
        match &self.method {
            Some(method) => write!(f, "{method} {}", self.path)?,
            None => write!(f, "* {}", self.path)?,
        }
        for condition in &self.conditions {
            write!(f, " {condition}")?;
        }
        if let Some(retry) = self.retry {
            write!(f, " retry={}", on_off(retry))?;
        }
        match self.idempotency_key {
            Some(_) if self.key_honoured => f.write_str(" idempotency-key=honoured")?,
            Some(key) => write!(f, " idempotency-key={}", on_off(key))?,
            None => {}
        }
        if let Some(safe) = self.replay {
            f.write_str(if safe {
                " replay=safe"
            } else {
                " replay=unsafe"
            })?;
        }
        if let Some(timeout) = self.timeout {
            write!(f, " timeout={}", format_duration(timeout))?;
        }
        if let Some(verify) = &self.verify {
            write!(f, " {verify}")?;
        }
        for source in &self.session {
            write!(f, " session={source}")?;
        }
        if self.session_end {
            f.write_str(" session-end")?;
        }
        if let Some(renews) = self.renews {
            write!(f, " renews={}", on_off(renews))?;
        }
        if let Some(heartbeat) = &self.heartbeat {
            write!(f, " heartbeat={}:{}", heartbeat.method, heartbeat.template)?;
        }
        if let Some(source) = &self.lease_ttl {
            write!(f, " lease-ttl={source}")?;
        }
        Ok(())
    }
}

/// How a `409` on a route is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyRule {
    /// What to read.
    pub target: VerifyTarget,
    /// How the stored representation is compared with the request (`match=`, default `json-subset`).
    pub match_mode: MatchMode,
    /// The status answered when verified (`recovered-status=`, default `200`, always 2xx).
    pub recovered_status: StatusCode,
    /// The body answered when verified (`recovered-body=`, default `stored`).
    pub recovered_body: RecoveredBody,
    /// `match-ignore=NAME|*SUFFIX`: top-level fields of the sent document
    /// that `json-subset` leaves out (Azure Table's `…@odata.type`
    /// annotations, which the backend does not echo on a read).
    pub match_ignore: Vec<String>,
}

impl VerifyRule {
    /// Whether the sent document's top-level field `name` is left out of
    /// the comparison (`match-ignore=`).
    pub fn ignores(&self, name: &str) -> bool {
        self.match_ignore.iter().any(|p| match p.strip_prefix('*') {
            Some(suffix) => name.ends_with(suffix),
            None => name == p,
        })
    }
}

/// What a recovered `409` is answered with (`recovered-body=`): so that it
/// looks like the backend's own first-time success.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RecoveredBody {
    /// `stored`: the stored representation the verification read.
    #[default]
    Stored,
    /// `empty`: no body.
    Empty,
    /// A JSON template (`application/json`) over the request (captures,
    /// `{body.…}`, `{header.…}`, `{query.…}`) and the stored document
    /// (`{stored.…}`), e.g. CouchDB's `{"ok":true,"id":"{stored._id}","rev":"{stored._rev}"}`.
    Template(Template),
}

impl RecoveredBody {
    /// Whether the stored document must be read to build the answer.
    pub fn reads_stored(&self) -> bool {
        matches!(self, Self::Template(t) if t.stored_placeholder().is_some())
    }
}

/// Writes `verify=… match=… recovered-status=…`.
impl fmt::Display for VerifyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            VerifyTarget::Same => f.write_str("verify=same")?,
            VerifyTarget::Location => f.write_str("verify=location")?,
            VerifyTarget::Template { method, template } => {
                write!(f, "verify={method}:{template}")?;
            }
        }
        write!(
            f,
            " match={} recovered-status={}",
            self.match_mode,
            self.recovered_status.as_u16()
        )?;
        if !self.match_ignore.is_empty() {
            write!(f, " match-ignore={}", self.match_ignore.join("|"))?;
        }
        match &self.recovered_body {
            RecoveredBody::Stored => Ok(()),
            RecoveredBody::Empty => f.write_str(" recovered-body=empty"),
            RecoveredBody::Template(t) => write!(f, " recovered-body={t}"),
        }
    }
}

/// What a verification request reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyTarget {
    /// `verify=same`: `GET` the request's own path and query.
    Same,
    /// `verify=location`: `GET` the `Location` of the `409`.
    Location,
    /// `verify=METHOD:TEMPLATE`: a request built from a URL template
    /// ([`Template::render`]). The method is `GET` or `HEAD`.
    Template {
        /// `GET`, or `HEAD` (only with `match=exists`).
        method: Method,
        /// The URL path template, checked against the route's captures.
        template: Template,
    },
}

/// How a verification answer proves the write was stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatchMode {
    /// `exists`: a 2xx answer means stored.
    Exists,
    /// `json-subset`: every field of the sent JSON document is in the stored one ([`json_subset`]).
    #[default]
    JsonSubset,
    /// `exact`: the stored bytes equal the sent bytes.
    Exact,
}

impl fmt::Display for MatchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exists => "exists",
            Self::JsonSubset => "json-subset",
            Self::Exact => "exact",
        })
    }
}

/// A heartbeat request: a method and a URL template that may use `{session}`,
/// the registering request's captures, `{query}` and `{query.q}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatTemplate {
    /// The heartbeat's method.
    pub method: Method,
    /// Its URL path template.
    pub template: Template,
}

impl HeartbeatTemplate {
    /// Parses `METHOD TEMPLATE` (as in `IDEMPROXY_HEARTBEAT`) or
    /// `METHOD:TEMPLATE` (as in a route's `heartbeat=`). Request-body and
    /// header placeholders are refused: a heartbeat has neither.
    ///
    /// ```
    /// use idemproxy::routes::HeartbeatTemplate;
    /// let hb = HeartbeatTemplate::parse("POST /v1/sessions/{session}/heartbeat").unwrap();
    /// assert_eq!(hb.method, http::Method::POST);
    /// assert!(HeartbeatTemplate::parse("POST /x/{body.id}").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let text = text.trim();
        let (method_word, template) = text
            .split_once(|c: char| c == ':' || c.is_whitespace())
            .ok_or_else(|| TemplateError::BadMethod {
                method: text.to_owned(),
            })?;
        let method = parse::parse_method(method_word).ok_or_else(|| TemplateError::BadMethod {
            method: method_word.to_owned(),
        })?;
        let template = Template::parse(template.trim_start())?;
        if let Some(p) = template.placeholders().find(|p| {
            matches!(
                p,
                Placeholder::Body(_) | Placeholder::Header(_) | Placeholder::Stored(_)
            )
        }) {
            return Err(TemplateError::NotAllowed {
                placeholder: p.to_string().trim_matches(['{', '}']).to_owned(),
                context: "in a heartbeat template (use captures, {query}, {query.q} or {session})",
            });
        }
        Ok(Self { method, template })
    }
}

impl fmt::Display for HeartbeatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> RouteTable {
        RouteTable::parse(text).unwrap()
    }

    #[test]
    fn first_matching_route_wins() {
        let t = table("GET /v1/{a}/x retry=off\nGET /v1/special/x\n* /v1/{*rest} timeout=5s\n");
        let m = t
            .route_match(&RouteRequest::new(&Method::GET, "/v1/special/x"))
            .unwrap();
        assert_eq!(m.index, 0);
        assert_eq!(m.captures.get("a"), Some("special"));
        let m = t
            .route_match(&RouteRequest::new(&Method::POST, "/v1/special/x"))
            .unwrap();
        assert_eq!(m.index, 2);
        assert_eq!(m.captures.get("rest"), Some("special/x"));
        let r = m.route;
        assert_eq!(
            (r.retry, r.timeout, r.idempotency_key, r.replay_after_send()),
            (None, Some(Duration::from_secs(5)), None, None)
        );
        assert!(
            t.route_match(&RouteRequest::new(&Method::GET, "/v2/x"))
                .is_none()
        );
    }

    #[test]
    fn star_matches_any_method_and_others_match_exactly() {
        let t = table("DELETE /s/{sid} session-end\n* /s/{sid}\n");
        assert_eq!(
            t.route_match(&RouteRequest::new(&Method::DELETE, "/s/1"))
                .unwrap()
                .index,
            0
        );
        assert_eq!(
            t.route_match(&RouteRequest::new(&Method::GET, "/s/1"))
                .unwrap()
                .index,
            1
        );
        assert_eq!(
            t.route_match(&RouteRequest::new(
                &Method::from_bytes(b"PURGE").unwrap(),
                "/s/1"
            ))
            .unwrap()
            .index,
            1
        );
    }

    #[test]
    fn matching_ignores_the_query_and_refuses_empty_segments() {
        let t = table("GET /v1/sessions/{sid}/await retry=off");
        let m = t
            .route_match(&RouteRequest::new(
                &Method::GET,
                "/v1/sessions/s%201/await?wait=30",
            ))
            .unwrap();
        assert_eq!(m.captures.get("sid"), Some("s 1"));
        assert!(
            t.route_match(&RouteRequest::new(&Method::GET, "/v1/sessions//await"))
                .is_none()
        );
        assert!(
            t.route_match(&RouteRequest::new(&Method::GET, "/v1/sessions/a/b/await"))
                .is_none()
        );
    }

    #[test]
    fn in_segment_literals_match() {
        let t = table("PUT /{table}(PartitionKey='{pk}') verify=same");
        let m = t
            .route_match(&RouteRequest::new(
                &Method::PUT,
                "/Orders(PartitionKey='k%201')",
            ))
            .unwrap();
        assert_eq!(m.captures.get("table"), Some("Orders"));
        assert_eq!(m.captures.get("pk"), Some("k 1"));
        assert!(
            t.route_match(&RouteRequest::new(&Method::PUT, "/Orders(PartitionKey='')"))
                .is_none()
        );
    }

    #[test]
    fn table_accessors_report_routes() {
        let t = table("# only comments\n\nGET /a\nPOST /b\n");
        assert_eq!(t.len(), 2);
        assert!(!t.is_empty());
        assert_eq!(
            t.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["/a", "/b"]
        );
        assert_eq!(t.get(1).map(|r| r.line_number), Some(4));
        assert_eq!((&t).into_iter().count(), 2);
        assert!(table("").is_empty());
        assert!(
            table("# nothing\n")
                .route_match(&RouteRequest::new(&Method::GET, "/"))
                .is_none()
        );
    }

    #[test]
    fn display_gives_a_canonical_line_that_parses_back() {
        let text = "PUT   /db/{doc}   verify=same\n\
                    * /v1/{sid}/x retry=on idempotency-key=off timeout=90s verify=GET:/v1/{sid}/x?{query} \
                    match=exact recovered-status=201 session=path:sid session=header:Mcp-Session-Id \
                    session-end heartbeat=POST:/v1/{sid}/hb\n\
                    PUT /{c}/{b} replay=unsafe retry=on if-query=comp=lease if-header=X-Ms-Lease-Action=acquire|break \
                    if-header=!X-Ms-Proposed-Lease-Id idempotency-key=honoured if-json=a.0.b=1|x/y if-query=!restype \
                    if-json=!id\n";
        let t = table(text);
        let shown = t.to_string();
        assert_eq!(
            shown,
            "PUT /db/{doc} verify=same match=json-subset recovered-status=200\n\
             * /v1/{sid}/x retry=on idempotency-key=off timeout=1m30s verify=GET:/v1/{sid}/x?{query} \
             match=exact recovered-status=201 session=path:sid session=header:Mcp-Session-Id \
             session-end heartbeat=POST:/v1/{sid}/hb\n\
             PUT /{c}/{b} if-query=comp=lease if-header=x-ms-lease-action=acquire|break \
             if-header=!x-ms-proposed-lease-id if-json=a.0.b=1|x/y if-query=!restype if-json=!id \
             retry=on idempotency-key=honoured replay=unsafe\n"
        );
        let again = table(&shown);
        assert_eq!(again.to_string(), shown);
        for (a, b) in t.iter().zip(again.iter()) {
            assert_eq!(a.conditions, b.conditions);
            assert_eq!(a.replay, b.replay);
            assert_eq!(
                (a.retry, a.timeout, a.idempotency_key, a.replay_after_send()),
                (b.retry, b.timeout, b.idempotency_key, b.replay_after_send())
            );
        }
        assert_eq!(again.get(2).map(|r| r.conditions.len()), Some(6));
    }

    #[test]
    fn heartbeat_templates_parse_in_both_spellings() {
        let a = HeartbeatTemplate::parse("POST /v1/sessions/{session}/heartbeat").unwrap();
        let b = HeartbeatTemplate::parse("POST:/v1/sessions/{session}/heartbeat").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "POST /v1/sessions/{session}/heartbeat");
        assert!(matches!(
            HeartbeatTemplate::parse("/x"),
            Err(TemplateError::BadMethod { .. })
        ));
        assert!(matches!(
            HeartbeatTemplate::parse("POST"),
            Err(TemplateError::BadMethod { .. })
        ));
        assert!(HeartbeatTemplate::parse("POST /x/{header.authorization}").is_err());
    }

    #[test]
    fn verify_templates_render_safely_from_a_match() {
        let t = table(
            "POST /v1/sessions/{sid}/entries verify=GET:/v1/sessions/{sid}/entries/{body.uuid}",
        );
        let m = t
            .route_match(&RouteRequest::new(
                &Method::POST,
                "/v1/sessions/s%2F1/entries",
            ))
            .unwrap();
        let Some(VerifyTarget::Template { template, .. }) =
            m.route.verify.as_ref().map(|v| &v.target)
        else {
            panic!("expected a template");
        };
        let headers = http::HeaderMap::new();
        for (uuid, expected) in [
            ("u1", Ok("/v1/sessions/s%2F1/entries/u1".to_owned())),
            (
                "../../admin",
                Ok("/v1/sessions/s%2F1/entries/..%2F..%2Fadmin".to_owned()),
            ),
            (
                "..",
                Err(RenderError::DotOrEmpty {
                    placeholder: "{body.uuid}".into(),
                }),
            ),
        ] {
            let body = serde_json::json!({ "uuid": uuid });
            let ctx = RenderContext::new(&m.captures, &headers).with_body(Some(&body));
            assert_eq!(template.render(&ctx), expected);
        }
        let ctx = RenderContext::new(&m.captures, &headers);
        assert_eq!(
            template.render(&ctx),
            Err(RenderError::Missing {
                placeholder: "{body.uuid}".into()
            })
        );
    }

    /// The Azure blob lease case: one path, told apart by query and headers.
    #[test]
    fn conditions_select_among_routes_on_the_same_path() {
        let t = table(
            "PUT /{c}/{b} if-query=comp=lease if-header=x-ms-lease-action=renew renews\n\
             PUT /{c}/{b} if-query=comp=lease if-header=x-ms-lease-action=acquire \
             if-header=!x-ms-proposed-lease-id replay=unsafe\n\
             PUT /{c}/{b} if-query=comp=lease\n\
             PUT /{c}/{b}\n",
        );
        let index = |path: &str, headers: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in headers {
                map.append(*name, http::HeaderValue::from_static(value));
            }
            let req = RouteRequest::new(&Method::PUT, path).with_headers(&map);
            let m = t.route_match(&req).unwrap();
            assert_eq!(m.captures.get("b"), Some("blob"), "{path}");
            m.index
        };
        let renew = [("x-ms-lease-action", "renew")];
        let acquire = [("x-ms-lease-action", "Acquire")];
        assert_eq!(index("/c/blob?comp=lease", &renew), 0);
        assert_eq!(index("/c/blob?comp=lease", &acquire), 1);
        let proposed = [acquire[0], ("x-ms-proposed-lease-id", "id-1")];
        assert_eq!(index("/c/blob?comp=lease", &proposed), 2);
        assert_eq!(index("/c/blob?comp=lease", &[]), 2);
        assert_eq!(index("/c/blob", &renew), 3);
        assert_eq!(index("/c/blob?comp=block", &renew), 3);
        // A repeated parameter: any occurrence; values are percent-decoded.
        assert_eq!(index("/c/blob?comp=block&comp=lease", &renew), 0);
        assert_eq!(index("/c/blob?comp=%6Cease", &renew), 0);
        assert_eq!(index("/c/blob?comp=lease+", &renew), 3);
        // A query given apart from the path is read the same.
        let req = RouteRequest::new(&Method::PUT, "/c/blob").with_query(Some("comp=lease"));
        assert_eq!(t.route_match(&req).map(|m| m.index), Some(2));
        // Conditions never make another method or path match.
        assert!(
            t.route_match(&RouteRequest::new(&Method::GET, "/c/blob?comp=lease"))
                .is_none()
        );
        assert_eq!(t.get(1).map(|r| r.replay_after_send()), Some(Some(false)));
    }

    /// The MCP case: one path, told apart by the JSON body's `method`.
    #[test]
    fn json_conditions_need_the_body_only_when_they_decide() {
        let t = table(
            "POST /mcp if-header=x-skip if-json=method=never\n\
             POST /mcp if-json=method=ping replay=safe\n\
             POST /mcp if-json=method=tools/call|resources/read retry=off\n\
             POST /mcp\n\
             GET /other\n",
        );
        let before = |method: &Method, path: &str| {
            t.route_match_before_body(&RouteRequest::new(method, path))
                .map(|m| m.map(|m| m.index))
        };
        assert_eq!(before(&Method::POST, "/mcp"), Err(NeedsBody));
        assert_eq!(before(&Method::GET, "/other"), Ok(Some(4)));
        assert_eq!(before(&Method::GET, "/mcp"), Ok(None));
        let with_body = |body: Option<serde_json::Value>| {
            let req = RouteRequest::new(&Method::POST, "/mcp").with_body(body.as_ref());
            t.route_match(&req).map(|m| m.index)
        };
        let call =
            |method: &str| Some(serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method}));
        assert_eq!(with_body(call("ping")), Some(1));
        assert_eq!(with_body(call("tools/call")), Some(2));
        assert_eq!(with_body(call("resources/read")), Some(2));
        assert_eq!(with_body(call("tools/list")), Some(3));
        assert_eq!(with_body(Some(serde_json::json!([1, 2]))), Some(3));
        // No JSON body (not read, too large or not JSON): the fields are absent.
        assert_eq!(with_body(None), Some(3));
        // Without `if-json` routes before it, a route needs no body.
        let t = table(
            "POST /mcp if-header=mcp-session-id\n\
             POST /mcp if-json=method=initialize\n",
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("mcp-session-id", http::HeaderValue::from_static("s1"));
        let req = RouteRequest::new(&Method::POST, "/mcp").with_headers(&headers);
        assert_eq!(
            t.route_match_before_body(&req).map(|m| m.map(|m| m.index)),
            Ok(Some(0))
        );
        let req = RouteRequest::new(&Method::POST, "/mcp");
        assert!(t.route_match_before_body(&req).is_err());
        assert!(t.get(1).is_some_and(Route::conditions_read_body));
        assert!(t.get(0).is_some_and(|r| !r.conditions_read_body()));
    }

    #[test]
    fn replay_option_is_the_route_s_word_on_replays() {
        let t = table(
            "POST /a replay=safe\n\
             PUT /b replay=unsafe verify=same idempotency-key=honoured\n\
             POST /c verify=same\n\
             POST /d idempotency-key=honoured\n\
             POST /e\n",
        );
        let replay: Vec<_> = t.iter().map(|r| r.replay_after_send()).collect();
        assert_eq!(
            replay,
            [Some(true), Some(false), Some(true), Some(true), None]
        );
    }

    /// Pseudo-random route lines, paths and values never panic the parser,
    /// the matcher or the renderers, and rendered URLs stay on the host.
    #[test]
    fn arbitrary_input_never_panics() {
        const ALPHABET: &[&str] = &[
            "/",
            "{",
            "}",
            "*",
            ".",
            "..",
            "%",
            "%2F",
            "%FF",
            "%e",
            "a",
            "b",
            "é",
            "?",
            "#",
            "=",
            ":",
            " ",
            "\r\n",
            "'",
            "(",
            ")",
            "body.",
            "header.",
            "query",
            "session",
            "x",
            "0",
            "|",
            "!",
            "stored.",
            "\"",
            "-1",
            "header:",
            "response-json:",
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let headers = http::HeaderMap::new();
        let mut rendered = 0;
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..next(12) {
                text.push_str(ALPHABET[next(ALPHABET.len())]);
            }
            let line = format!("* /{text} verify=GET:/{text}");
            let _ = RouteTable::parse(&line).map(|t| t.to_string());
            for option in [
                "match-ignore",
                "recovered-body",
                "lease-ttl",
                "replay",
                "session",
                "heartbeat",
            ] {
                let line = format!("* /{{*p}} verify=same {option}={text}");
                if let Ok(t) = RouteTable::parse(&line) {
                    // What parses prints back to a line that parses the same.
                    let shown = t.to_string();
                    assert_eq!(RouteTable::parse(&shown).map(|t| t.to_string()), Ok(shown));
                }
            }
            let line = format!("* /{{*p}} if-query={text} if-header={text} if-json={text}");
            if let Ok(t) = RouteTable::parse(&line) {
                let shown = t.to_string();
                assert_eq!(table(&shown).to_string(), shown);
                let body = serde_json::json!({ "x": text, "a": [text] });
                let path = format!("/{text}?{text}");
                let req = RouteRequest::new(&Method::GET, &path)
                    .with_headers(&headers)
                    .with_body(Some(&body));
                let _ = t.route_match(&req);
            }
            let _ = Template::parse_json(&text);
            let _ = Template::parse_header(&text);
            if let Ok(t) = PathTemplate::parse(&format!("/{text}")) {
                let _ = t.matches(&format!("/{text}"));
                let _ = t.matches(&text);
            }
            if let Ok(t) = Template::parse(&format!("/{{v}}/{{*r}}{text}")) {
                let captures: Captures = [("v", text.as_str()), ("r", text.as_str())]
                    .into_iter()
                    .collect();
                let ctx = RenderContext::new(&captures, &headers)
                    .with_query(Some(&text))
                    .with_session(Some(&text));
                if let Ok(url) = t.render(&ctx) {
                    assert!(url.starts_with('/') && !url.starts_with("//"), "{url:?}");
                    assert!(!url.contains(['#', ' ', '\r', '\n']), "{url:?}");
                    rendered += 1;
                }
                let _ = t.render_json_string(&ctx);
                let _ = t.render_header_value(&ctx);
            }
        }
        assert!(rendered > 100, "only {rendered} URLs rendered");
    }
}
