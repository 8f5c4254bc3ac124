//! Placeholder templates (`/v1/sessions/{sid}/entries/{body.uuid}`) and their
//! safe rendering.
//!
//! One placeholder parser serves three kinds of template:
//! - URL templates ([`Template::parse`], rendered with [`Template::render`]):
//!   every substituted value except `{query}` is percent-encoded with a strict
//!   set, so it can never add a path segment, a query, a fragment or a header;
//! - JSON body templates ([`Template::parse_json`], rendered with
//!   [`Template::render_json_string`]): values are JSON-string-escaped;
//! - header value templates ([`Template::parse_header`], rendered with
//!   [`Template::render_header_value`]): values with control characters are refused.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::escape::{HEX, percent_decode, push_encoded};
use super::json::{FieldPath, lookup, scalar_text};
use super::path::Captures;
pub use super::scan::TemplateError;
use super::scan::{Braces, Token, check_url_literal, is_capture_name, scan};

/// Why a template could not be rendered for one request. The caller skips
/// what it was building (a verification, a heartbeat) with a warning; it never
/// sends a malformed request. Values are never included: they may be credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The request has no value for this placeholder.
    #[error("no value for {placeholder}")]
    Missing {
        /// The placeholder, with its braces (`{body.uuid}`).
        placeholder: String,
    },
    /// The value is empty, `.` or `..` (or, for `{*name}`, has such a
    /// segment): substituted into a path it would change the path's meaning.
    #[error("the value of {placeholder} is empty, \".\" or \"..\", which would change the path")]
    DotOrEmpty {
        /// The placeholder, with its braces.
        placeholder: String,
    },
    /// The value holds a control character (CR, LF, ...) and cannot go into a header.
    #[error("the value of {placeholder} holds a control character")]
    ControlCharacter {
        /// The placeholder, with its braces.
        placeholder: String,
    },
    /// The raw query string holds characters that may not appear in a URL.
    #[error("the query string holds characters that are not allowed in a URL")]
    InvalidQuery,
    /// The rendered header value is not a valid HTTP header value.
    #[error("the rendered header value is not a valid HTTP header value")]
    InvalidHeaderValue,
}

impl RenderError {
    /// The placeholder concerned, when there is one.
    pub fn placeholder(&self) -> Option<&str> {
        match self {
            Self::Missing { placeholder }
            | Self::DotOrEmpty { placeholder }
            | Self::ControlCharacter { placeholder } => Some(placeholder),
            Self::InvalidQuery | Self::InvalidHeaderValue => None,
        }
    }
}

/// One placeholder of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placeholder {
    /// `{name}`: a path capture.
    Capture(Arc<str>),
    /// `{*name}`: a capture whose `/` separators are kept; each segment is encoded.
    CaptureRest(Arc<str>),
    /// `{body.a.b}`: a scalar field of the JSON request body.
    Body(FieldPath),
    /// `{header.X-Name}`: a request header (case-insensitive), its first value.
    Header(HeaderName),
    /// `{query.q}`: one query parameter, percent-decoded, first occurrence.
    QueryParam(String),
    /// `{query}`: the whole original query string, verbatim (not re-encoded).
    Query,
    /// `{session}`: the session id.
    Session,
    /// `{stored.a.b}`: a scalar field of the stored document that a
    /// verification read (only in a route's `recovered-body=`).
    Stored(FieldPath),
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Capture(name) => write!(f, "{{{name}}}"),
            Self::CaptureRest(name) => write!(f, "{{*{name}}}"),
            Self::Body(path) => write!(f, "{{body.{path}}}"),
            Self::Header(name) => write!(f, "{{header.{name}}}"),
            Self::QueryParam(name) => write!(f, "{{query.{name}}}"),
            Self::Query => f.write_str("{query}"),
            Self::Session => f.write_str("{session}"),
            Self::Stored(path) => write!(f, "{{stored.{path}}}"),
        }
    }
}

/// Reads the text between braces as a placeholder.
pub(crate) fn read_placeholder(content: &str) -> Result<Placeholder, TemplateError> {
    let invalid = |reason| TemplateError::InvalidPlaceholder {
        placeholder: content.to_owned(),
        reason,
    };
    if let Some(name) = content.strip_prefix('*') {
        return if is_capture_name(name) {
            Ok(Placeholder::CaptureRest(name.into()))
        } else {
            Err(invalid(
                "a capture name is made of letters, digits, _ and -",
            ))
        };
    }
    match content {
        "session" => return Ok(Placeholder::Session),
        "query" => return Ok(Placeholder::Query),
        _ => {}
    }
    match content.split_once('.') {
        Some(("query", name)) => {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(invalid("expected {query.NAME}"))
            } else {
                Ok(Placeholder::QueryParam(name.to_owned()))
            }
        }
        Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
            .map(Placeholder::Header)
            .map_err(|_| invalid("expected {header.NAME} with a valid header name")),
        Some(("body", path)) => FieldPath::parse(path)
            .map(Placeholder::Body)
            .map_err(|_| invalid("expected {body.FIELD.PATH}, such as {body.items.0.id}")),
        Some(("stored", path)) => FieldPath::parse(path)
            .map(Placeholder::Stored)
            .map_err(|_| invalid("expected {stored.FIELD.PATH}, such as {stored._rev}")),
        Some(_) => Err(TemplateError::UnknownPlaceholder {
            placeholder: content.to_owned(),
        }),
        None if is_capture_name(content) => Ok(Placeholder::Capture(content.into())),
        None => Err(TemplateError::UnknownPlaceholder {
            placeholder: content.to_owned(),
        }),
    }
}

/// A template with placeholders, parsed once at start-up.
///
/// ```
/// use idemproxy::routes::{Captures, RenderContext, Template};
/// let template = Template::parse("/v1/sessions/{sid}/entries/{body.uuid}").unwrap();
/// let captures: Captures = [("sid", "s 1")].into_iter().collect();
/// let body = serde_json::json!({"uuid": "../admin"});
/// let headers = http::HeaderMap::new();
/// let ctx = RenderContext::new(&captures, &headers).with_body(Some(&body));
/// assert_eq!(template.render(&ctx).unwrap(), "/v1/sessions/s%201/entries/..%2Fadmin");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Placeholder(Placeholder),
}

impl Template {
    /// Parses a URL path template (verification, heartbeat). It must start
    /// with a single `/`, its literal text may only hold URL characters (no
    /// `#`), and `{query}` may only follow a literal `?`. Rendered with
    /// [`Template::render`], its output always starts with `/` and stays on
    /// the upstream's host.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        if !text.starts_with('/') {
            return Err(TemplateError::NotAPath);
        }
        if text.starts_with("//") || text.starts_with("/\\") {
            return Err(TemplateError::AbsoluteUrl);
        }
        let tokens = scan(text, Braces::Strict)?;
        let mut in_query = false;
        let mut pieces = Vec::with_capacity(tokens.len());
        for token in tokens {
            match token {
                Token::Literal(literal) => {
                    check_url_literal(literal)?;
                    in_query |= literal.contains('?');
                    pieces.push(Piece::Literal(literal.to_owned()));
                }
                Token::Placeholder(content) => {
                    let placeholder = read_placeholder(content)?;
                    if placeholder == Placeholder::Query && !in_query {
                        return Err(TemplateError::QueryOutsideQueryPart);
                    }
                    pieces.push(Piece::Placeholder(placeholder));
                }
            }
        }
        Ok(Self {
            source: text.to_owned(),
            pieces,
        })
    }

    /// Parses a JSON body template such as `{"ID":"{session}"}`. A brace that
    /// does not open a well-formed placeholder (`{"`, `{}`) is literal text.
    pub fn parse_json(text: &str) -> Result<Self, TemplateError> {
        Self::from_tokens(text, scan(text, Braces::Lenient)?)
    }

    /// Parses a header value template such as `{session}` or `Bearer {header.x-token}`.
    /// Its literal text must be a valid header value.
    pub fn parse_header(text: &str) -> Result<Self, TemplateError> {
        let tokens = scan(text, Braces::Strict)?;
        let control = tokens.iter().find_map(|token| match token {
            Token::Literal(literal) => literal.chars().find(|c| c.is_control()),
            Token::Placeholder(_) => None,
        });
        if let Some(ch) = control {
            return Err(TemplateError::InvalidCharacter {
                ch,
                hint: " in a header value",
            });
        }
        Self::from_tokens(text, tokens)
    }

    fn from_tokens(text: &str, tokens: Vec<Token<'_>>) -> Result<Self, TemplateError> {
        let pieces = tokens
            .into_iter()
            .map(|token| match token {
                Token::Literal(literal) => Ok(Piece::Literal(literal.to_owned())),
                Token::Placeholder(content) => read_placeholder(content).map(Piece::Placeholder),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source: text.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The placeholders, in order.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.pieces.iter().filter_map(|piece| match piece {
            Piece::Placeholder(p) => Some(p),
            Piece::Literal(_) => None,
        })
    }

    /// Whether rendering needs the parsed JSON request body (a `{body.…}` placeholder).
    pub fn needs_body(&self) -> bool {
        self.placeholders()
            .any(|p| matches!(p, Placeholder::Body(_)))
    }

    /// The first `{stored.…}` placeholder, which only a route's
    /// `recovered-body=` can fill (no other template has a stored document).
    pub fn stored_placeholder(&self) -> Option<&Placeholder> {
        self.placeholders()
            .find(|p| matches!(p, Placeholder::Stored(_)))
    }

    /// The names of the path captures used (`{name}` and `{*name}`).
    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        self.placeholders().filter_map(|p| match p {
            Placeholder::Capture(name) | Placeholder::CaptureRest(name) => Some(&**name),
            _ => None,
        })
    }

    /// In a route whose path template captures `session`, `{session}` means
    /// that capture (which then also is the session id when `session=path:session`).
    pub(crate) fn prefer_capture_for_session(&mut self) {
        for piece in &mut self.pieces {
            if let Piece::Placeholder(p @ Placeholder::Session) = piece {
                *p = Placeholder::Capture("session".into());
            }
        }
    }

    /// Renders a URL: literal text as written; every value percent-encoded
    /// (only ALPHA, DIGIT, `-`, `.`, `_`, `~` are kept) except `{query}`,
    /// which is the client's query string verbatim (empty when it sent none).
    /// Values that are empty, `.` or `..` are refused; a `{*name}` value keeps
    /// its `/` and each of its segments follows the same rules.
    pub fn render(&self, ctx: &RenderContext<'_>) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len() + 32);
        for piece in &self.pieces {
            let placeholder = match piece {
                Piece::Literal(literal) => {
                    out.push_str(literal);
                    continue;
                }
                Piece::Placeholder(p) => p,
            };
            match placeholder {
                Placeholder::Query => {
                    let query = ctx.query.unwrap_or("");
                    if !query.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
                        return Err(RenderError::InvalidQuery);
                    }
                    out.push_str(query);
                }
                Placeholder::CaptureRest(_) => {
                    let value = resolve(placeholder, ctx)?;
                    for (i, segment) in value.split('/').enumerate() {
                        if i > 0 {
                            out.push('/');
                        }
                        push_path_value(&mut out, segment, placeholder)?;
                    }
                }
                _ => push_path_value(&mut out, &resolve(placeholder, ctx)?, placeholder)?,
            }
        }
        Ok(out)
    }

    /// Renders a JSON body template: values (including `{query}`) are
    /// escaped as the inside of a JSON string and never percent-encoded.
    /// Empty values are allowed.
    ///
    /// ```
    /// use idemproxy::routes::{Captures, RenderContext, Template};
    /// let template = Template::parse_json(r#"{"ID":"{session}"}"#).unwrap();
    /// let (captures, headers) = (Captures::new(), http::HeaderMap::new());
    /// let ctx = RenderContext::new(&captures, &headers).with_session(Some(r#"a"b"#));
    /// assert_eq!(template.render_json_string(&ctx).unwrap(), r#"{"ID":"a\"b"}"#);
    /// ```
    pub fn render_json_string(&self, ctx: &RenderContext<'_>) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len() + 32);
        for piece in &self.pieces {
            match piece {
                Piece::Literal(literal) => out.push_str(literal),
                Piece::Placeholder(p) => push_json_escaped(&mut out, &resolve(p, ctx)?),
            }
        }
        Ok(out)
    }

    /// Renders a header value: values are substituted as they are, and a
    /// value holding any control character (CR, LF, TAB, NUL, ...) is refused.
    pub fn render_header_value(&self, ctx: &RenderContext<'_>) -> Result<HeaderValue, RenderError> {
        let mut out = String::with_capacity(self.source.len() + 32);
        for piece in &self.pieces {
            match piece {
                Piece::Literal(literal) => out.push_str(literal),
                Piece::Placeholder(p) => {
                    let value = resolve(p, ctx)?;
                    if value.chars().any(char::is_control) {
                        return Err(RenderError::ControlCharacter {
                            placeholder: p.to_string(),
                        });
                    }
                    out.push_str(&value);
                }
            }
        }
        HeaderValue::from_bytes(out.as_bytes()).map_err(|_| RenderError::InvalidHeaderValue)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// What a template is rendered from, for one request. Everything is borrowed.
#[derive(Clone, Copy, Debug)]
pub struct RenderContext<'a> {
    /// Path captures of the matched route (or of the request that registered a session).
    pub captures: &'a Captures,
    /// The parsed JSON request body, when there is one and it was parsed.
    pub body: Option<&'a Value>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The raw query string of the request (without `?`), as the client sent it.
    pub query: Option<&'a str>,
    /// The session id, when known.
    pub session: Option<&'a str>,
    /// The stored document a verification read, when one was.
    pub stored: Option<&'a Value>,
}

impl<'a> RenderContext<'a> {
    /// A context with captures and headers, and no body, query or session.
    pub fn new(captures: &'a Captures, headers: &'a HeaderMap) -> Self {
        Self {
            captures,
            body: None,
            headers,
            query: None,
            session: None,
            stored: None,
        }
    }

    /// Sets the parsed JSON request body.
    #[must_use]
    pub fn with_body(mut self, body: Option<&'a Value>) -> Self {
        self.body = body;
        self
    }

    /// Sets the raw query string (without `?`).
    #[must_use]
    pub fn with_query(mut self, query: Option<&'a str>) -> Self {
        self.query = query;
        self
    }

    /// Sets the session id.
    #[must_use]
    pub fn with_session(mut self, session: Option<&'a str>) -> Self {
        self.session = session;
        self
    }

    /// Sets the stored document that a verification read.
    #[must_use]
    pub fn with_stored(mut self, stored: Option<&'a Value>) -> Self {
        self.stored = stored;
        self
    }
}

/// The unencoded value of a placeholder, or [`RenderError::Missing`].
fn resolve<'c>(
    placeholder: &Placeholder,
    ctx: &RenderContext<'c>,
) -> Result<Cow<'c, str>, RenderError> {
    let value = match placeholder {
        Placeholder::Capture(name) | Placeholder::CaptureRest(name) => {
            ctx.captures.get(name).map(Cow::Borrowed)
        }
        Placeholder::Body(path) => ctx
            .body
            .and_then(|body| lookup(body, path))
            .and_then(scalar_text),
        Placeholder::Header(name) => ctx
            .headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .map(Cow::Borrowed),
        Placeholder::QueryParam(name) => ctx.query.and_then(|q| query_param(q, name)),
        Placeholder::Query => Some(Cow::Borrowed(ctx.query.unwrap_or(""))),
        Placeholder::Session => ctx.session.map(Cow::Borrowed),
        Placeholder::Stored(path) => ctx
            .stored
            .and_then(|doc| lookup(doc, path))
            .and_then(scalar_text),
    };
    value.ok_or_else(|| RenderError::Missing {
        placeholder: placeholder.to_string(),
    })
}

/// The first value of query parameter `name` (form-decoded: `+` is a space),
/// or `None` when absent or not UTF-8.
pub(crate) fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key, true).is_some_and(|key| key == name) {
            return percent_decode(value, true);
        }
    }
    None
}

/// Appends one value to a URL, refusing values that would change the path.
fn push_path_value(
    out: &mut String,
    value: &str,
    placeholder: &Placeholder,
) -> Result<(), RenderError> {
    if matches!(value, "" | "." | "..") {
        return Err(RenderError::DotOrEmpty {
            placeholder: placeholder.to_string(),
        });
    }
    push_encoded(out, value);
    Ok(())
}

/// Escapes `value` as the inside of a JSON string.
fn push_json_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let b = u32::from(c);
                out.push_str("\\u00");
                out.push(char::from(HEX[(b >> 4) as usize]));
                out.push(char::from(HEX[(b & 0x0f) as usize]));
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn captures(pairs: &[(&str, &str)]) -> Captures {
        pairs.iter().copied().collect()
    }

    /// Renders a URL template with one capture `v` set to `value`.
    fn render_capture(template: &str, value: &str) -> Result<String, RenderError> {
        let captures = captures(&[("v", value)]);
        let headers = HeaderMap::new();
        Template::parse(template)
            .unwrap()
            .render(&RenderContext::new(&captures, &headers))
    }

    #[test]
    fn scanner_splits_literals_and_placeholders() {
        assert_eq!(
            scan("/a/{b}x{c}", Braces::Strict).unwrap(),
            vec![
                Token::Literal("/a/"),
                Token::Placeholder("b"),
                Token::Literal("x"),
                Token::Placeholder("c"),
            ]
        );
    }

    #[test]
    fn strict_scanner_refuses_unbalanced_braces() {
        for bad in ["/a/{b", "/a/b}", "/a/{b{c}}", "/{}x}"] {
            assert!(
                matches!(
                    scan(bad, Braces::Strict),
                    Err(TemplateError::Unbalanced { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn json_templates_keep_literal_braces() {
        let t = Template::parse_json(r#"{"ID":"{session}","x":{}}"#).unwrap();
        assert_eq!(
            t.placeholders().collect::<Vec<_>>(),
            [&Placeholder::Session]
        );
    }

    #[test]
    fn placeholders_are_classified_by_kind() {
        let t = Template::parse(
            "/{a}/{*b}/{body.items.0.id}/{header.X-Name}/{session}?q={query.q}&{query}",
        )
        .unwrap();
        let kinds: Vec<String> = t.placeholders().map(ToString::to_string).collect();
        assert_eq!(
            kinds,
            [
                "{a}",
                "{*b}",
                "{body.items.0.id}",
                "{header.x-name}",
                "{session}",
                "{query.q}",
                "{query}"
            ]
        );
        assert!(t.needs_body());
        assert_eq!(t.capture_names().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn unknown_placeholder_kinds_are_refused() {
        for bad in [
            "/{foo.bar}",
            "/{a b}",
            "/{*}",
            "/{}",
            "/{body.}",
            "/{header.a b}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!(
            Template::parse("/{path.x}"),
            Err(TemplateError::UnknownPlaceholder { .. })
        ));
    }

    #[test]
    fn path_templates_must_stay_on_the_host() {
        assert_eq!(Template::parse("v1/x"), Err(TemplateError::NotAPath));
        assert_eq!(Template::parse("{a}/x"), Err(TemplateError::NotAPath));
        assert_eq!(
            Template::parse("http://evil/x"),
            Err(TemplateError::NotAPath)
        );
        assert_eq!(Template::parse("//evil/x"), Err(TemplateError::AbsoluteUrl));
        assert_eq!(
            Template::parse("/\\evil/x"),
            Err(TemplateError::AbsoluteUrl)
        );
        assert!(Template::parse("/x#frag").is_err());
        assert!(Template::parse("/x y").is_err());
        assert!(Template::parse("/x%zz").is_err());
        assert!(Template::parse("/x%2F").is_ok());
    }

    #[test]
    fn whole_query_only_goes_in_the_query_part() {
        assert_eq!(
            Template::parse("/x/{query}"),
            Err(TemplateError::QueryOutsideQueryPart)
        );
        assert!(Template::parse("/x?{query}").is_ok());
    }

    #[test]
    fn captures_render_percent_encoded() {
        assert_eq!(render_capture("/a/{v}", "a b").unwrap(), "/a/a%20b");
        assert_eq!(render_capture("/a/{v}", "é").unwrap(), "/a/%C3%A9");
        assert_eq!(
            render_capture("/a/{v}.json", "x-1_~.").unwrap(),
            "/a/x-1_~..json"
        );
    }

    #[test]
    fn injection_values_never_leave_their_segment() {
        let cases = [
            ("../admin", "/a/..%2Fadmin/b"),
            ("a/b", "/a/a%2Fb/b"),
            ("x?y=1", "/a/x%3Fy%3D1/b"),
            ("%2e%2e", "/a/%252e%252e/b"),
            ("a\r\nX-Evil: 1", "/a/a%0D%0AX-Evil%3A%201/b"),
            ("x#y&z+w", "/a/x%23y%26z%2Bw/b"),
            ("http://evil", "/a/http%3A%2F%2Fevil/b"),
        ];
        for (value, expected) in cases {
            assert_eq!(render_capture("/a/{v}/b", value).unwrap(), expected);
        }
    }

    #[test]
    fn dot_and_empty_values_are_refused() {
        for value in ["..", ".", ""] {
            assert_eq!(
                render_capture("/a/{v}", value),
                Err(RenderError::DotOrEmpty {
                    placeholder: "{v}".into()
                }),
                "{value:?}"
            );
        }
        assert_eq!(render_capture("/a/{v}", "...").unwrap(), "/a/...");
    }

    #[test]
    fn rest_captures_keep_slashes_and_encode_each_segment() {
        assert_eq!(
            render_capture("/f/{*v}", "a b/c?d").unwrap(),
            "/f/a%20b/c%3Fd"
        );
        for bad in ["a/../b", "./a", "a//b", "/a", "a/", ".."] {
            assert!(
                matches!(
                    render_capture("/f/{*v}", bad),
                    Err(RenderError::DotOrEmpty { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn body_fields_render_as_scalar_text() {
        let t = Template::parse("/e/{body.items.0.id}/{body.n}/{body.ok}").unwrap();
        let body = json!({"items": [{"id": "i/1"}], "n": 12, "ok": true});
        let (caps, headers) = (Captures::new(), HeaderMap::new());
        let ctx = RenderContext::new(&caps, &headers).with_body(Some(&body));
        assert_eq!(t.render(&ctx).unwrap(), "/e/i%2F1/12/true");
    }

    #[test]
    fn body_objects_arrays_and_null_are_missing() {
        let t = Template::parse("/e/{body.x}").unwrap();
        let (caps, headers) = (Captures::new(), HeaderMap::new());
        for value in [
            json!({"x": null}),
            json!({"x": [1]}),
            json!({"x": {"a": 1}}),
            json!({}),
        ] {
            let ctx = RenderContext::new(&caps, &headers).with_body(Some(&value));
            assert_eq!(
                t.render(&ctx),
                Err(RenderError::Missing {
                    placeholder: "{body.x}".into()
                })
            );
        }
        let ctx = RenderContext::new(&caps, &headers);
        assert!(matches!(t.render(&ctx), Err(RenderError::Missing { .. })));
    }

    #[test]
    fn headers_are_looked_up_case_insensitively() {
        let t = Template::parse("/h/{header.X-Tenant}").unwrap();
        let caps = Captures::new();
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", HeaderValue::from_static("t/1"));
        let ctx = RenderContext::new(&caps, &headers);
        assert_eq!(t.render(&ctx).unwrap(), "/h/t%2F1");
        let empty = HeaderMap::new();
        assert!(matches!(
            t.render(&RenderContext::new(&caps, &empty)),
            Err(RenderError::Missing { .. })
        ));
    }

    #[test]
    fn query_parameters_are_decoded_then_reencoded() {
        let t = Template::parse("/q/{query.id}").unwrap();
        let (caps, headers) = (Captures::new(), HeaderMap::new());
        let render = |q| t.render(&RenderContext::new(&caps, &headers).with_query(Some(q)));
        assert_eq!(render("a=1&id=x%2Fy+z&id=2").unwrap(), "/q/x%2Fy%20z");
        assert_eq!(
            render("id=%2e%2e").unwrap_err().placeholder(),
            Some("{query.id}")
        );
        assert!(matches!(render("a=1"), Err(RenderError::Missing { .. })));
        assert!(matches!(render("id=%FF"), Err(RenderError::Missing { .. })));
    }

    #[test]
    fn whole_query_is_passed_verbatim() {
        let t = Template::parse("/q?{query}").unwrap();
        let (caps, headers) = (Captures::new(), HeaderMap::new());
        let render = |q| t.render(&RenderContext::new(&caps, &headers).with_query(q));
        assert_eq!(render(Some("a=1&b=%2F+x")).unwrap(), "/q?a=1&b=%2F+x");
        assert_eq!(render(None).unwrap(), "/q?");
        assert_eq!(render(Some("a=1#x")), Err(RenderError::InvalidQuery));
        assert_eq!(render(Some("a=1\r\nX: y")), Err(RenderError::InvalidQuery));
    }

    #[test]
    fn session_renders_encoded_or_missing() {
        let t = Template::parse("/s/{session}/hb").unwrap();
        let (caps, headers) = (Captures::new(), HeaderMap::new());
        let ctx = RenderContext::new(&caps, &headers);
        assert!(matches!(t.render(&ctx), Err(RenderError::Missing { .. })));
        let ctx = ctx.with_session(Some("a/b c"));
        assert_eq!(t.render(&ctx).unwrap(), "/s/a%2Fb%20c/hb");
    }

    #[test]
    fn json_templates_escape_quotes_and_backslashes() {
        let t = Template::parse_json(r#"{"ID":"{session}","n":"{body.n}"}"#).unwrap();
        let (caps, headers) = (Captures::new(), HeaderMap::new());
        let body = json!({"n": 5});
        let ctx = RenderContext::new(&caps, &headers)
            .with_session(Some("a\"b\\c\n/d%20"))
            .with_body(Some(&body));
        let rendered = t.render_json_string(&ctx).unwrap();
        assert_eq!(rendered, r#"{"ID":"a\"b\\c\n/d%20","n":"5"}"#);
        let parsed: Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(parsed["ID"], "a\"b\\c\n/d%20");
    }

    #[test]
    fn json_templates_escape_control_characters() {
        let mut out = String::new();
        push_json_escaped(&mut out, "\u{1}\t");
        assert_eq!(out, "\\u0001\\t");
    }

    #[test]
    fn header_templates_refuse_control_characters() {
        let t = Template::parse_header("lease {session}").unwrap();
        let (caps, headers) = (Captures::new(), HeaderMap::new());
        let ctx = RenderContext::new(&caps, &headers);
        assert_eq!(
            t.render_header_value(&ctx.with_session(Some("a/b c")))
                .unwrap(),
            "lease a/b c"
        );
        for bad in ["a\r\nX-Evil: 1", "a\nb", "a\0", "a\tb"] {
            assert_eq!(
                t.render_header_value(&ctx.with_session(Some(bad))),
                Err(RenderError::ControlCharacter {
                    placeholder: "{session}".into()
                })
            );
        }
        assert!(Template::parse_header("a\r\nb").is_err());
        assert!(Template::parse_header("{a").is_err());
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes_and_refuses_invalid_utf8() {
        assert_eq!(percent_decode("a%20b%2F", false).unwrap(), "a b/");
        assert_eq!(percent_decode("100%", false).unwrap(), "100%");
        assert_eq!(percent_decode("%zz%4", false).unwrap(), "%zz%4");
        assert_eq!(percent_decode("a+b", false).unwrap(), "a+b");
        assert_eq!(percent_decode("a+b", true).unwrap(), "a b");
        assert_eq!(percent_decode("%C3%A9", false).unwrap(), "é");
        assert!(percent_decode("%FF", false).is_none());
        assert!(matches!(
            percent_decode("plain", false),
            Some(Cow::Borrowed(_))
        ));
    }
}
