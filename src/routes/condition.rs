//! Route conditions (`if-query=`, `if-header=`, `if-json=`): tests on the
//! request beyond its method and path, all of which must hold for a route to
//! match, and [`RouteRequest`], what a request is matched with.
//!
//! ```text
//! if-query=NAME          the query has parameter NAME
//! if-query=NAME=V1|V2    one of its values, percent-decoded, is V1 or V2 (`+` stays `+`)
//! if-query=!NAME         the query has no parameter NAME
//! if-header=NAME         the request has header NAME
//! if-header=NAME=V1|V2   a value, or an element of a comma list, is V1 or V2 (ASCII case ignored)
//! if-header=!NAME        the request has no header NAME
//! if-json=FIELD.PATH     the JSON body has the field (any value, `null` included)
//! if-json=FIELD.PATH=V   the field's scalar text (a string as is, a number or boolean as JSON) is V
//! if-json=!FIELD.PATH    the body has no such field, or is not JSON
//! ```
//!
//! Names and values are written as they are compared, without escapes, so
//! a value cannot hold whitespace or `|`.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName, Method};
use serde_json::Value;

use super::escape::percent_decode;
use super::json::{FieldPath, lookup, scalar_text};

/// What a request is matched with: [`RouteTable::route_match`](super::RouteTable::route_match)
/// reads its method and path; a route's conditions its query, headers and
/// JSON body. Borrows everything, allocates nothing.
///
/// ```
/// use http::{HeaderMap, Method};
/// use idemproxy::routes::RouteRequest;
/// let headers = HeaderMap::new();
/// let body = serde_json::json!({"method": "ping"});
/// let req = RouteRequest::new(&Method::POST, "/mcp?session=1")
///     .with_headers(&headers)
///     .with_body(Some(&body));
/// assert_eq!(req.path(), "/mcp");
/// assert_eq!(req.query(), Some("session=1"));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    method: &'a Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: Option<&'a HeaderMap>,
    body: Option<&'a Value>,
}

impl<'a> RouteRequest<'a> {
    /// A request with this method and path; a `?query` at the end of `path`
    /// becomes the query. No headers and no JSON body.
    pub fn new(method: &'a Method, path: &'a str) -> Self {
        let (path, query) = match path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path, None),
        };
        Self {
            method,
            path,
            query,
            headers: None,
            body: None,
        }
    }

    /// Sets the raw query string (without `?`), e.g. from `Uri::query`.
    pub fn with_query(mut self, query: Option<&'a str>) -> Self {
        self.query = query;
        self
    }

    /// Sets the request's headers.
    pub fn with_headers(mut self, headers: &'a HeaderMap) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Sets the request's body parsed as JSON; `None` (the default) means no
    /// JSON body: every `if-json` field is absent.
    pub fn with_body(mut self, body: Option<&'a Value>) -> Self {
        self.body = body;
        self
    }

    /// The method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The path, without the query.
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The raw query string, without `?`.
    pub fn query(&self) -> Option<&'a str> {
        self.query
    }
}

/// One `if-…=` condition of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// What the condition looks at.
    pub subject: ConditionSubject,
    /// What it requires of it.
    pub test: ConditionTest,
}

/// What a [`Condition`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionSubject {
    /// `if-query=NAME…`: a query parameter, by its percent-decoded name.
    Query(Box<str>),
    /// `if-header=NAME…`: a request header.
    Header(HeaderName),
    /// `if-json=FIELD.PATH…`: a field of the JSON request body.
    Json(FieldPath),
}

/// What a [`Condition`] requires of its subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionTest {
    /// `NAME`: present.
    Present,
    /// `!NAME`: absent.
    Absent,
    /// `NAME=V1|V2`: present with one of these values.
    OneOf(Vec<Box<str>>),
}

impl Condition {
    /// Parses the value of an `if-query=`, `if-header=` or `if-json=` word
    /// (`key` is the part before the first `=`). The error says what was
    /// expected; the caller names the word.
    pub(super) fn parse(key: &str, value: &str) -> Result<Self, String> {
        let what = match key {
            "if-query" => "NAME",
            "if-header" => "NAME",
            _ => "FIELD.PATH",
        };
        let expected = format!("expected {key}={what}, {key}={what}=V1|V2 or {key}=!{what}");
        let (negated, rest) = match value.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let (name, values) = match rest.split_once('=') {
            Some((name, values)) => (name, Some(values)),
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(format!("the name is empty; {expected}"));
        }
        if name.starts_with('!') {
            return Err(format!("one ! negates; {expected}"));
        }
        let test = match (negated, values) {
            (false, None) => ConditionTest::Present,
            (true, None) => ConditionTest::Absent,
            (true, Some(_)) => {
                return Err(format!(
                    "a negated condition ({key}=!{what}) takes no values; {expected}"
                ));
            }
            (false, Some(values)) => {
                let values: Vec<Box<str>> = values.split('|').map(Box::from).collect();
                if values.iter().any(|v| v.is_empty()) {
                    return Err(format!("a value is empty; {expected}"));
                }
                ConditionTest::OneOf(values)
            }
        };
        let subject = match key {
            "if-query" => {
                if name.contains(['&', '#']) {
                    return Err(format!(
                        "a query parameter name holds no & or # (one condition per \
                         parameter); {expected}"
                    ));
                }
                ConditionSubject::Query(name.into())
            }
            "if-header" => ConditionSubject::Header(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{name:?} is not a valid header name; {expected}"))?,
            ),
            _ => ConditionSubject::Json(
                FieldPath::parse(name).map_err(|e| format!("{e}; {expected}"))?,
            ),
        };
        Ok(Self { subject, test })
    }

    /// Whether the condition reads the request body (`if-json=`), which must
    /// then be read ahead before the route can be told to match.
    pub fn reads_body(&self) -> bool {
        matches!(self.subject, ConditionSubject::Json(_))
    }

    /// Whether the condition holds for `req`.
    pub fn holds(&self, req: &RouteRequest<'_>) -> bool {
        match &self.subject {
            ConditionSubject::Query(name) => {
                let mut values = req.query.into_iter().flat_map(|q| query_values(q, name));
                match &self.test {
                    ConditionTest::Present => values.next().is_some(),
                    ConditionTest::Absent => values.next().is_none(),
                    ConditionTest::OneOf(wanted) => {
                        values.any(|v| v.is_some_and(|v| wanted.iter().any(|w| **w == *v)))
                    }
                }
            }
            ConditionSubject::Header(name) => {
                let present = req.headers.is_some_and(|h| h.contains_key(name));
                match &self.test {
                    ConditionTest::Present => present,
                    ConditionTest::Absent => !present,
                    ConditionTest::OneOf(wanted) => req.headers.is_some_and(|h| {
                        h.get_all(name)
                            .iter()
                            .any(|v| header_value_is(v.as_bytes(), wanted))
                    }),
                }
            }
            ConditionSubject::Json(path) => {
                let found = req.body.and_then(|doc| lookup(doc, path));
                match &self.test {
                    ConditionTest::Present => found.is_some(),
                    ConditionTest::Absent => found.is_none(),
                    ConditionTest::OneOf(wanted) => found
                        .and_then(scalar_text)
                        .is_some_and(|text| wanted.iter().any(|w| **w == *text)),
                }
            }
        }
    }
}

/// The values of every occurrence of parameter `name` in `query`, in order,
/// percent-decoded (`+` kept as it is); an occurrence without `=` has the
/// value `""`, and one whose value does not decode to UTF-8 `None`.
fn query_values<'q>(
    query: &'q str,
    name: &'q str,
) -> impl Iterator<Item = Option<Cow<'q, str>>> + 'q {
    query.split('&').filter_map(move |pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        percent_decode(key, false)
            .is_some_and(|key| key == name)
            .then(|| percent_decode(value, false))
    })
}

/// Whether a header value, or one element of it read as a comma list, is
/// one of `wanted` once trimmed, ignoring ASCII case.
fn header_value_is(value: &[u8], wanted: &[Box<str>]) -> bool {
    let is = |text: &[u8]| {
        let text = text.trim_ascii();
        wanted
            .iter()
            .any(|w| text.eq_ignore_ascii_case(w.as_bytes()))
    };
    is(value) || (value.contains(&b',') && value.split(|&b| b == b',').any(is))
}

/// The word as written in a route line, in canonical form.
impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let not = if self.test == ConditionTest::Absent {
            "!"
        } else {
            ""
        };
        match &self.subject {
            ConditionSubject::Query(name) => write!(f, "if-query={not}{name}")?,
            ConditionSubject::Header(name) => write!(f, "if-header={not}{name}")?,
            ConditionSubject::Json(path) => write!(f, "if-json={not}{path}")?,
        }
        if let ConditionTest::OneOf(values) = &self.test {
            for (i, value) in values.iter().enumerate() {
                f.write_str(if i == 0 { "=" } else { "|" })?;
                f.write_str(value)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cond(word: &str) -> Condition {
        let (key, value) = word.split_once('=').unwrap();
        Condition::parse(key, value).unwrap()
    }

    fn query_holds(word: &str, path: &str) -> bool {
        cond(word).holds(&RouteRequest::new(&Method::GET, path))
    }

    #[test]
    fn query_conditions_decode_values_and_keep_plus() {
        assert!(query_holds("if-query=comp", "/c?comp=lease"));
        assert!(query_holds("if-query=comp", "/c?restype=container&comp"));
        assert!(query_holds("if-query=comp", "/c?comp="));
        assert!(!query_holds("if-query=comp", "/c?compx=lease&xcomp=1"));
        assert!(!query_holds("if-query=comp", "/c"));
        assert!(!query_holds("if-query=comp", "/c?"));
        assert!(query_holds("if-query=!comp", "/c?restype=container"));
        assert!(query_holds("if-query=!comp", "/c"));
        assert!(!query_holds("if-query=!comp", "/c?comp=lease"));

        assert!(query_holds("if-query=comp=lease|block", "/c?comp=block"));
        assert!(!query_holds("if-query=comp=lease", "/c?comp=Lease"));
        assert!(!query_holds("if-query=comp=lease", "/c?comp"));
        // Names and values are percent-decoded; `+` is not a space.
        assert!(query_holds("if-query=a b=x/y", "/c?a%20b=x%2Fy"));
        assert!(query_holds("if-query=q=a+b", "/c?q=a+b"));
        assert!(!query_holds("if-query=q=a+b", "/c?q=a%20b"));
        assert!(query_holds("if-query=q=a+b", "/c?q=a%2Bb"));
        // A value that is not UTF-8 once decoded matches nothing, yet is present.
        assert!(!query_holds("if-query=q=x", "/c?q=%FF"));
        assert!(query_holds("if-query=q", "/c?q=%FF"));
        // Repeated parameters: any occurrence counts.
        assert!(query_holds("if-query=id=2", "/c?id=1&id=2&id=3"));
        assert!(!query_holds("if-query=id=4", "/c?id=1&id=2&id=3"));
    }

    #[test]
    fn header_conditions_ignore_case_and_read_comma_lists() {
        let mut headers = HeaderMap::new();
        headers.insert("x-ms-lease-action", HeaderValue::from_static(" Renew "));
        headers.append(
            "prefer",
            HeaderValue::from_static("return-no-content, odata.maxpagesize=10"),
        );
        headers.append("prefer", HeaderValue::from_static("respond-async"));
        let holds = |word: &str| {
            cond(word).holds(&RouteRequest::new(&Method::PUT, "/c/b").with_headers(&headers))
        };
        assert!(holds("if-header=x-ms-lease-action"));
        assert!(holds("if-header=X-MS-Lease-Action=renew"));
        assert!(holds("if-header=x-ms-lease-action=acquire|RENEW"));
        assert!(!holds("if-header=x-ms-lease-action=acquire|release"));
        assert!(!holds("if-header=!x-ms-lease-action"));
        assert!(holds("if-header=!x-ms-lease-id"));
        assert!(!holds("if-header=x-ms-lease-id"));
        // Each element of a comma list, and each of several values.
        assert!(holds("if-header=prefer=return-no-content"));
        assert!(holds("if-header=prefer=odata.maxpagesize=10"));
        assert!(holds("if-header=prefer=respond-async"));
        assert!(!holds("if-header=prefer=return-representation"));
        // Without headers, nothing is present.
        let bare = RouteRequest::new(&Method::PUT, "/c/b");
        assert!(!cond("if-header=prefer").holds(&bare));
        assert!(cond("if-header=!prefer").holds(&bare));
        assert!(!cond("if-header=prefer=x").holds(&bare));
    }

    #[test]
    fn json_conditions_read_scalars_and_treat_no_json_as_absent() {
        let body = serde_json::json!({
            "jsonrpc": "2.0", "id": 7, "method": "tools/list",
            "params": {"flag": true, "nothing": null, "list": [1]}
        });
        let holds = |word: &str, body: Option<&Value>| {
            cond(word).holds(&RouteRequest::new(&Method::POST, "/mcp").with_body(body))
        };
        let b = Some(&body);
        assert!(holds("if-json=method=tools/list|resources/read", b));
        assert!(!holds("if-json=method=tools/call", b));
        assert!(!holds("if-json=method=Tools/List", b));
        assert!(holds("if-json=id=7", b));
        assert!(holds("if-json=params.flag=true", b));
        assert!(holds("if-json=params.list.0=1", b));
        assert!(holds("if-json=id", b));
        assert!(holds("if-json=params.nothing", b));
        assert!(!holds("if-json=params.nothing=null", b));
        assert!(!holds("if-json=params.list=[1]", b));
        assert!(holds("if-json=!params.other", b));
        assert!(!holds("if-json=!id", b));
        // No JSON body: every field is absent.
        assert!(!holds("if-json=id", None));
        assert!(holds("if-json=!id", None));
        assert!(!holds("if-json=method=tools/list", None));
    }

    #[test]
    fn malformed_words_are_refused_with_a_reason() {
        for (word, wanted) in [
            ("if-query=", "the name is empty"),
            ("if-query=!", "the name is empty"),
            ("if-query==x", "the name is empty"),
            ("if-query=!!a", "one ! negates"),
            ("if-query=a=", "a value is empty"),
            ("if-query=a=x||y", "a value is empty"),
            ("if-query=a=x|", "a value is empty"),
            ("if-query=!a=x", "takes no values"),
            ("if-query=a&b=c", "holds no & or #"),
            ("if-header=a b", "not a valid header name"),
            ("if-header=x(y)=1", "not a valid header name"),
            ("if-header=!=1", "the name is empty"),
            ("if-json=a..b", "not a field path"),
            ("if-json=.a=1", "not a field path"),
            ("if-json=!a=1", "takes no values"),
        ] {
            let (key, value) = word.split_once('=').unwrap();
            let err = Condition::parse(key, value).unwrap_err();
            assert!(err.contains(wanted), "{word}: {err}");
            assert!(err.contains(&format!("expected {key}=")), "{word}: {err}");
        }
    }

    #[test]
    fn display_is_the_canonical_word() {
        for (word, shown) in [
            ("if-query=comp=lease|block", "if-query=comp=lease|block"),
            ("if-query=!comp", "if-query=!comp"),
            (
                "if-header=X-Ms-Lease-Action=renew",
                "if-header=x-ms-lease-action=renew",
            ),
            ("if-header=!If-Match", "if-header=!if-match"),
            ("if-json=params.name=a/b", "if-json=params.name=a/b"),
            ("if-json=!id", "if-json=!id"),
        ] {
            let c = cond(word);
            assert_eq!(c.to_string(), shown);
            assert_eq!(cond(shown), c);
        }
    }
}
