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
//! and `recovered-status=CODE`, `session=SOURCE` (repeatable), `session-end`,
//! `renews` (`renews=on|off`), `heartbeat=METHOD:TEMPLATE`;
//! `idempotency-key=honoured` declares that the backend deduplicates by the key.
//!
//! ```
//! use http::Method;
//! use idemproxy::routes::{RenderContext, RouteTable, VerifyTarget};
//!
//! let table = RouteTable::parse(
//!     "# sessions API\n\
//!      POST /v1/sessions/{sid}/entries session=path:sid verify=GET:/v1/sessions/{sid}/entries/{body.uuid}\n\
//!      GET  /v1/sessions/{sid}/await   session=path:sid timeout=10m retry=off\n",
//! )
//! .unwrap();
//!
//! let m = table.route_match(&Method::POST, "/v1/sessions/a%20b/entries").unwrap();
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
//! assert_eq!(table.route_match(&Method::GET, "/v1/sessions/s/await").unwrap().route.policy().retry, Some(false));
//! assert!(table.route_match(&Method::GET, "/v1/sessions//await").is_none());
//! ```
#![warn(missing_docs)]

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

pub use json::{FieldPath, FieldPathError, json_subset, lookup};
pub use parse::RouteError;
pub use path::{CaptureKind, Captures, PathTemplate};
pub use session_source::{SessionSource, SessionSourceError, SessionSourceKind};
pub use template::{Placeholder, RenderContext, RenderError, Template, TemplateError};

use crate::extensions::RequestPolicy;
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

    /// The first route whose method (or `*`) and path template match, with
    /// its percent-decoded captures. The path's query, if any, is ignored.
    pub fn route_match(&self, method: &Method, path: &str) -> Option<RouteMatch<'_>> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, route)| route.method.as_ref().is_none_or(|m| m == method))
            .find_map(|(index, route)| {
                route.path.matches(path).map(|captures| RouteMatch {
                    route,
                    index,
                    captures,
                })
            })
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
    /// `retry=on|off`; `None` keeps the global behaviour.
    pub retry: Option<bool>,
    /// `idempotency-key=on|off|honoured`; `None` keeps the global method list.
    pub idempotency_key: Option<bool>,
    /// `idempotency-key=honoured`: the backend deduplicates requests by the
    /// key, so a replay after sending cannot run a call twice.
    pub key_honoured: bool,
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
    /// The line as written (trimmed), for logs.
    pub line: String,
    /// The line's 1-based number in `IDEMPROXY_ROUTES`.
    pub line_number: usize,
}

impl Route {
    /// What the layers below classification read from the request's extensions.
    pub fn policy(&self) -> RequestPolicy {
        RequestPolicy {
            retry: self.retry,
            timeout: self.timeout,
            idempotency_key: self.idempotency_key,
            replay_after_send: self.key_honoured || self.verify.is_some(),
        }
    }
}

/// The canonical form of the route: `METHOD PATH` then the options in a
/// fixed order, with `match=` and `recovered-status=` spelled out.
impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on_off = |b: bool| if b { "on" } else { "off" };
        match &self.method {
            Some(method) => write!(f, "{method} {}", self.path)?,
            None => write!(f, "* {}", self.path)?,
        }
        if let Some(retry) = self.retry {
            write!(f, " retry={}", on_off(retry))?;
        }
        match self.idempotency_key {
            Some(_) if self.key_honoured => f.write_str(" idempotency-key=honoured")?,
            Some(key) => write!(f, " idempotency-key={}", on_off(key))?,
            None => {}
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
        )
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
        if let Some(p) = template
            .placeholders()
            .find(|p| matches!(p, Placeholder::Body(_) | Placeholder::Header(_)))
        {
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
        let m = t.route_match(&Method::GET, "/v1/special/x").unwrap();
        assert_eq!(m.index, 0);
        assert_eq!(m.captures.get("a"), Some("special"));
        let m = t.route_match(&Method::POST, "/v1/special/x").unwrap();
        assert_eq!(m.index, 2);
        assert_eq!(m.captures.get("rest"), Some("special/x"));
        assert_eq!(
            m.route.policy(),
            RequestPolicy {
                retry: None,
                timeout: Some(Duration::from_secs(5)),
                idempotency_key: None,
                replay_after_send: false,
            }
        );
        assert!(t.route_match(&Method::GET, "/v2/x").is_none());
    }

    #[test]
    fn star_matches_any_method_and_others_match_exactly() {
        let t = table("DELETE /s/{sid} session-end\n* /s/{sid}\n");
        assert_eq!(t.route_match(&Method::DELETE, "/s/1").unwrap().index, 0);
        assert_eq!(t.route_match(&Method::GET, "/s/1").unwrap().index, 1);
        assert_eq!(
            t.route_match(&Method::from_bytes(b"PURGE").unwrap(), "/s/1")
                .unwrap()
                .index,
            1
        );
    }

    #[test]
    fn matching_ignores_the_query_and_refuses_empty_segments() {
        let t = table("GET /v1/sessions/{sid}/await retry=off");
        let m = t
            .route_match(&Method::GET, "/v1/sessions/s%201/await?wait=30")
            .unwrap();
        assert_eq!(m.captures.get("sid"), Some("s 1"));
        assert!(t.route_match(&Method::GET, "/v1/sessions//await").is_none());
        assert!(
            t.route_match(&Method::GET, "/v1/sessions/a/b/await")
                .is_none()
        );
    }

    #[test]
    fn in_segment_literals_match() {
        let t = table("PUT /{table}(PartitionKey='{pk}') verify=same");
        let m = t
            .route_match(&Method::PUT, "/Orders(PartitionKey='k%201')")
            .unwrap();
        assert_eq!(m.captures.get("table"), Some("Orders"));
        assert_eq!(m.captures.get("pk"), Some("k 1"));
        assert!(
            t.route_match(&Method::PUT, "/Orders(PartitionKey='')")
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
                .route_match(&Method::GET, "/")
                .is_none()
        );
    }

    #[test]
    fn display_gives_a_canonical_line_that_parses_back() {
        let text = "PUT   /db/{doc}   verify=same\n\
                    * /v1/{sid}/x retry=on idempotency-key=off timeout=90s verify=GET:/v1/{sid}/x?{query} \
                    match=exact recovered-status=201 session=path:sid session=header:Mcp-Session-Id \
                    session-end heartbeat=POST:/v1/{sid}/hb\n";
        let t = table(text);
        let shown = t.to_string();
        assert_eq!(
            shown,
            "PUT /db/{doc} verify=same match=json-subset recovered-status=200\n\
             * /v1/{sid}/x retry=on idempotency-key=off timeout=1m30s verify=GET:/v1/{sid}/x?{query} \
             match=exact recovered-status=201 session=path:sid session=header:Mcp-Session-Id \
             session-end heartbeat=POST:/v1/{sid}/hb\n"
        );
        assert_eq!(table(&shown).to_string(), shown);
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
            .route_match(&Method::POST, "/v1/sessions/s%2F1/entries")
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

    /// Pseudo-random route lines, paths and values never panic the parser,
    /// the matcher or the renderers, and rendered URLs stay on the host.
    #[test]
    fn arbitrary_input_never_panics() {
        const ALPHABET: &[&str] = &[
            "/", "{", "}", "*", ".", "..", "%", "%2F", "%FF", "%e", "a", "b", "é", "?", "#", "=",
            ":", " ", "\r\n", "'", "(", ")", "body.", "header.", "query", "session", "x", "0",
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
