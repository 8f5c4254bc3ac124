//! Where a session id is read from: `path:NAME`, `header:NAME`, `cookie:NAME`,
//! `json:FIELD.PATH`, `response-header:NAME`, `response-json:FIELD.PATH`.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, header};
use serde_json::Value;

use super::json::{FieldPath, lookup, scalar_text};
use super::path::Captures;
use super::scan::is_capture_name;

const VALID_KINDS: &str = "path:NAME, header:NAME, cookie:NAME, json:FIELD.PATH, \
                           response-header:NAME or response-json:FIELD.PATH";

/// Why a session source word did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{word:?}: {reason}; expected {VALID_KINDS}")]
pub struct SessionSourceError {
    /// The offending word.
    pub word: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// One place a session id is read from.
///
/// ```
/// use idemproxy::routes::{Captures, SessionSource};
/// let sources = SessionSource::parse_list("header:Mcp-Session-Id, cookie:sid").unwrap();
/// let mut headers = http::HeaderMap::new();
/// headers.insert("cookie", "theme=dark; sid=abc".parse().unwrap());
/// let id = sources
///     .iter()
///     .find_map(|s| s.from_request(&Captures::new(), &headers, None));
/// assert_eq!(id.as_deref(), Some("abc"));
/// assert_eq!(sources[0].label(), "header:Mcp-Session-Id");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSource {
    kind: SessionSourceKind,
    label: Arc<str>,
}

/// The kinds of session source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionSourceKind {
    /// `path:NAME`: a capture of the matched route's path template.
    Path(String),
    /// `header:NAME`: a request header.
    Header(HeaderName),
    /// `cookie:NAME`: a cookie of the request's `Cookie` header(s).
    Cookie(String),
    /// `json:FIELD.PATH`: a scalar field of the JSON request body.
    Json(FieldPath),
    /// `response-header:NAME`: a header of the response (a create call that returns the id).
    ResponseHeader(HeaderName),
    /// `response-json:FIELD.PATH`: a scalar field of the JSON response body.
    ResponseJson(FieldPath),
}

impl SessionSource {
    /// Parses one source word such as `header:Mcp-Session-Id`.
    pub fn parse(word: &str) -> Result<Self, SessionSourceError> {
        let error = |reason| SessionSourceError {
            word: word.to_owned(),
            reason,
        };
        let (kind, arg) = word.split_once(':').ok_or_else(|| error("missing KIND:"))?;
        if arg.is_empty() {
            return Err(error("the name after the kind is empty"));
        }
        let header = |arg: &str| {
            HeaderName::from_bytes(arg.as_bytes()).map_err(|_| error("invalid header name"))
        };
        let field = |arg: &str| FieldPath::parse(arg).map_err(|_| error("invalid field path"));
        let kind = match kind {
            "path" if is_capture_name(arg) => SessionSourceKind::Path(arg.to_owned()),
            "path" => return Err(error("a capture name is made of letters, digits, _ and -")),
            "header" => SessionSourceKind::Header(header(arg)?),
            "cookie" if is_cookie_name(arg) => SessionSourceKind::Cookie(arg.to_owned()),
            "cookie" => return Err(error("invalid cookie name")),
            "json" => SessionSourceKind::Json(field(arg)?),
            "response-header" => SessionSourceKind::ResponseHeader(header(arg)?),
            "response-json" => SessionSourceKind::ResponseJson(field(arg)?),
            _ => return Err(error("unknown kind")),
        };
        Ok(Self {
            kind,
            label: word.into(),
        })
    }

    /// Parses a comma-separated list (`IDEMPROXY_SESSION_SOURCES`); spaces
    /// around items and empty items are ignored.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, SessionSourceError> {
        text.split(',')
            .map(str::trim)
            .filter(|word| !word.is_empty())
            .map(Self::parse)
            .collect()
    }

    /// What kind of source this is.
    pub fn kind(&self) -> &SessionSourceKind {
        &self.kind
    }

    /// The source as configured (`header:Mcp-Session-Id`), for metrics and the admin page.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The label, shared rather than copied.
    pub fn shared_label(&self) -> Arc<str> {
        self.label.clone()
    }

    /// Whether the id comes from the response rather than the request.
    pub fn is_response(&self) -> bool {
        matches!(
            self.kind,
            SessionSourceKind::ResponseHeader(_) | SessionSourceKind::ResponseJson(_)
        )
    }

    /// Whether reading this source needs the parsed JSON request body.
    pub fn needs_request_body(&self) -> bool {
        matches!(self.kind, SessionSourceKind::Json(_))
    }

    /// Whether reading this source needs the parsed JSON response body.
    pub fn needs_response_body(&self) -> bool {
        matches!(self.kind, SessionSourceKind::ResponseJson(_))
    }

    /// The session id carried by a request, for request sources. Empty
    /// values, values that are not UTF-8, and JSON objects, arrays or `null`
    /// are `None`.
    pub fn from_request(
        &self,
        captures: &Captures,
        headers: &HeaderMap,
        body: Option<&Value>,
    ) -> Option<String> {
        let value = match &self.kind {
            SessionSourceKind::Path(name) => captures.get(name).map(str::to_owned),
            SessionSourceKind::Header(name) => header_text(headers, name),
            SessionSourceKind::Cookie(name) => cookie(headers, name),
            SessionSourceKind::Json(path) => json_text(body, path),
            SessionSourceKind::ResponseHeader(_) | SessionSourceKind::ResponseJson(_) => None,
        };
        value.filter(|v| !v.is_empty())
    }

    /// The session id carried by a response, for response sources.
    pub fn from_response(&self, headers: &HeaderMap, body: Option<&Value>) -> Option<String> {
        let value = match &self.kind {
            SessionSourceKind::ResponseHeader(name) => header_text(headers, name),
            SessionSourceKind::ResponseJson(path) => json_text(body, path),
            _ => None,
        };
        value.filter(|v| !v.is_empty())
    }
}

impl fmt::Display for SessionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// RFC 6265 cookie-name: a token (no separators, spaces or controls).
fn is_cookie_name(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn header_text(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let value = headers.get(name)?;
    std::str::from_utf8(value.as_bytes())
        .ok()
        .map(|v| v.trim().to_owned())
}

fn json_text(body: Option<&Value>, path: &FieldPath) -> Option<String> {
    body.and_then(|body| lookup(body, path))
        .and_then(scalar_text)
        .map(|text| text.into_owned())
}

/// The first cookie `name` in the request's `Cookie` header(s) (`a=b; c=d`),
/// without surrounding double quotes.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| std::str::from_utf8(value.as_bytes()).ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key.trim() == name).then(|| {
                let value = value.trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value);
                value.to_owned()
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    fn source(word: &str) -> SessionSource {
        SessionSource::parse(word).unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn every_kind_parses_and_keeps_its_label() {
        for word in [
            "path:sid",
            "header:Mcp-Session-Id",
            "cookie:sid",
            "json:params.session.id",
            "response-header:Mcp-Session-Id",
            "response-json:result.id",
        ] {
            assert_eq!(source(word).label(), word);
            assert_eq!(source(word).to_string(), word);
        }
        assert!(source("response-json:a").is_response());
        assert!(source("response-header:a").is_response());
        assert!(!source("header:a").is_response());
        assert!(source("json:a").needs_request_body());
        assert!(!source("json:a").needs_response_body());
        assert!(source("response-json:a").needs_response_body());
        assert!(!source("cookie:a").needs_request_body());
    }

    #[test]
    fn bad_words_name_the_word_and_the_valid_kinds() {
        for bad in [
            "query:x",
            "header",
            "header:",
            "header:a b",
            "path:a.b",
            "json:a..b",
            "cookie:a=b",
        ] {
            let err = SessionSource::parse(bad).unwrap_err();
            assert_eq!(err.word, bad);
            let text = err.to_string();
            assert!(text.starts_with(&format!("{bad:?}: ")), "{text}");
            assert!(
                text.contains("path:NAME, header:NAME, cookie:NAME"),
                "{text}"
            );
        }
    }

    #[test]
    fn lists_are_comma_separated() {
        let list = SessionSource::parse_list(" header:Mcp-Session-Id , cookie:sid,").unwrap();
        let labels: Vec<_> = list.iter().map(SessionSource::label).collect();
        assert_eq!(labels, ["header:Mcp-Session-Id", "cookie:sid"]);
        assert!(SessionSource::parse_list("").unwrap().is_empty());
        assert_eq!(
            SessionSource::parse_list("header:a,nope").unwrap_err().word,
            "nope"
        );
    }

    #[test]
    fn request_header_source_reads_case_insensitively() {
        let h = headers(&[("mcp-session-id", "s-1")]);
        let s = source("header:Mcp-Session-Id");
        assert_eq!(
            s.from_request(&Captures::new(), &h, None).as_deref(),
            Some("s-1")
        );
        assert_eq!(s.from_response(&h, None), None);
        let empty = headers(&[("mcp-session-id", "")]);
        assert_eq!(s.from_request(&Captures::new(), &empty, None), None);
    }

    #[test]
    fn cookie_source_reads_any_cookie_header() {
        let s = source("cookie:sid");
        let h = headers(&[
            ("cookie", "a=1; b=2"),
            ("cookie", "xsid=no;  sid=\"q1\" ; c=3"),
        ]);
        assert_eq!(
            s.from_request(&Captures::new(), &h, None).as_deref(),
            Some("q1")
        );
        let h = headers(&[("cookie", "sid=; a=1")]);
        assert_eq!(s.from_request(&Captures::new(), &h, None), None);
        let h = headers(&[("cookie", "a=1")]);
        assert_eq!(s.from_request(&Captures::new(), &h, None), None);
    }

    #[test]
    fn path_source_reads_a_capture() {
        let captures: Captures = [("sid", "a b")].into_iter().collect();
        let s = source("path:sid");
        assert_eq!(
            s.from_request(&captures, &HeaderMap::new(), None)
                .as_deref(),
            Some("a b")
        );
        assert_eq!(
            source("path:other").from_request(&captures, &HeaderMap::new(), None),
            None
        );
    }

    #[test]
    fn json_source_reads_scalar_fields_of_the_request_body() {
        let body = json!({"params": {"session": {"id": "s9"}}, "n": 42, "o": {}});
        let none = (Captures::new(), HeaderMap::new());
        let read = |word: &str| source(word).from_request(&none.0, &none.1, Some(&body));
        assert_eq!(read("json:params.session.id").as_deref(), Some("s9"));
        assert_eq!(read("json:n").as_deref(), Some("42"));
        assert_eq!(read("json:o"), None);
        assert_eq!(read("json:missing"), None);
        assert_eq!(source("json:n").from_request(&none.0, &none.1, None), None);
    }

    #[test]
    fn response_sources_read_the_response_only() {
        let h = headers(&[("mcp-session-id", "r-1")]);
        let body = json!({"result": {"id": "r-2"}});
        let s = source("response-header:Mcp-Session-Id");
        assert_eq!(s.from_response(&h, None).as_deref(), Some("r-1"));
        assert_eq!(s.from_request(&Captures::new(), &h, None), None);
        let s = source("response-json:result.id");
        assert_eq!(
            s.from_response(&HeaderMap::new(), Some(&body)).as_deref(),
            Some("r-2")
        );
        assert_eq!(s.from_response(&HeaderMap::new(), None), None);
    }
}
