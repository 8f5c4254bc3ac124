//! Path templates that requests are matched against
//! (`/v1/sessions/{sid}/entries`, `/files/{*rest}`, `/{table}(PartitionKey='{pk}')`),
//! compiled once at parse time, and the captures a match yields.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use super::escape::percent_decode;
use super::scan::{Braces, TemplateError, Token, check_url_literal, is_capture_name, scan};

/// The named values a matched path template captured, percent-decoded.
///
/// Small and cheap to clone (names are shared with the route table), so a
/// session can keep the captures of the request that registered it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captures {
    entries: Vec<(Arc<str>, String)>,
}

impl Captures {
    /// No captures.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: Vec::with_capacity(capacity),
        }
    }

    /// The value captured as `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing an earlier value of that name.
    pub fn insert(&mut self, name: impl Into<Arc<str>>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name, value)),
        }
    }

    /// `(name, value)` pairs in the order of the path template.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (&**n, v.as_str()))
    }

    /// How many values were captured.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Into<Arc<str>>, V: Into<String>> FromIterator<(K, V)> for Captures {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut captures = Self::new();
        for (name, value) in iter {
            captures.insert(name, value);
        }
        captures
    }
}

/// A compiled path template to match request paths against.
///
/// `{name}` matches one non-empty segment, `{*name}` (only as the whole last
/// segment) the non-empty rest of the path. Literal text may sit next to
/// captures inside a segment. Matching compares percent-decoded segments, so
/// `%27` matches a literal `'` and `a%20b` is captured as `a b`; a `%2F`
/// never splits a segment. A trailing slash is significant.
///
/// ```
/// use idemproxy::routes::PathTemplate;
/// let t = PathTemplate::parse("/{table}(PartitionKey='{pk}')").unwrap();
/// let captures = t.matches("/Orders(PartitionKey='a%20b')").unwrap();
/// assert_eq!(captures.get("table"), Some("Orders"));
/// assert_eq!(captures.get("pk"), Some("a b"));
/// ```
#[derive(Clone, Debug)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
    names: Vec<(Arc<str>, CaptureKind)>,
}

/// Whether a capture is one segment or the rest of the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureKind {
    /// `{name}`: one segment.
    Segment,
    /// `{*name}`: the rest of the path, `/` separators included.
    Rest,
}

#[derive(Clone, Debug)]
enum Segment {
    /// A whole literal segment, percent-decoded.
    Literal(String),
    /// `{name}` as the whole segment.
    Capture(Arc<str>),
    /// `{*name}`: the rest of the path.
    Rest(Arc<str>),
    /// Literal text and captures, no two captures side by side.
    Mixed(Vec<Part>),
}

#[derive(Clone, Debug)]
enum Part {
    Literal(String),
    Capture(Arc<str>),
}

impl PathTemplate {
    /// Compiles a path template. It must start with `/`; only `{name}` and
    /// `{*name}` placeholders are allowed, names are unique, `query` is
    /// reserved, and no `?` or `#` may appear.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let body = text.strip_prefix('/').ok_or(TemplateError::NotAPath)?;
        let mut segments = Vec::new();
        let mut names: Vec<(Arc<str>, CaptureKind)> = Vec::new();
        let mut parts: Vec<Token<'_>> = Vec::new();
        let mut after_rest: Option<Arc<str>> = None;
        let tokens = scan(body, Braces::Strict).map_err(|e| match e {
            TemplateError::Unbalanced { at } => TemplateError::Unbalanced { at: at + 1 },
            other => other,
        })?;
        for token in tokens {
            if let Some(name) = &after_rest {
                return Err(TemplateError::RestNotLast {
                    name: name.to_string(),
                });
            }
            match token {
                Token::Literal(literal) => {
                    check_url_literal(literal)?;
                    if let Some(ch) = literal.chars().find(|c| *c == '?') {
                        return Err(TemplateError::InvalidCharacter {
                            ch,
                            hint: " (the query is not matched)",
                        });
                    }
                    for (i, chunk) in literal.split('/').enumerate() {
                        if i > 0 {
                            segments.push(compile_segment(std::mem::take(&mut parts))?);
                        }
                        if !chunk.is_empty() {
                            parts.push(Token::Literal(chunk));
                        }
                    }
                }
                Token::Placeholder(content) => {
                    let (name, kind) = match content.strip_prefix('*') {
                        Some(name) => (name, CaptureKind::Rest),
                        None => (content, CaptureKind::Segment),
                    };
                    if !is_capture_name(name) {
                        return Err(TemplateError::NotAllowed {
                            placeholder: content.to_owned(),
                            context: "in a path to match: use {name} or {*name}",
                        });
                    }
                    if name == "query" {
                        return Err(TemplateError::NotAllowed {
                            placeholder: content.to_owned(),
                            context: "as a capture name (reserved for the query string)",
                        });
                    }
                    if names.iter().any(|(n, _)| &**n == name) {
                        return Err(TemplateError::DuplicateCapture {
                            name: name.to_owned(),
                        });
                    }
                    let name: Arc<str> = name.into();
                    names.push((name.clone(), kind));
                    if kind == CaptureKind::Rest {
                        if !parts.is_empty() {
                            return Err(TemplateError::RestNotLast {
                                name: name.to_string(),
                            });
                        }
                        after_rest = Some(name);
                    }
                    parts.push(Token::Placeholder(content));
                }
            }
        }
        segments.push(compile_segment(parts)?);
        // Resolve the shared names into the compiled segments.
        let shared = |name: &str| {
            names
                .iter()
                .find(|(n, _)| &**n == name)
                .map(|(n, _)| n.clone())
        };
        for segment in &mut segments {
            match segment {
                Segment::Capture(name) | Segment::Rest(name) => {
                    if let Some(n) = shared(name) {
                        *name = n;
                    }
                }
                Segment::Mixed(parts) => {
                    for part in parts {
                        if let Part::Capture(name) = part {
                            if let Some(n) = shared(name) {
                                *name = n;
                            }
                        }
                    }
                }
                Segment::Literal(_) => {}
            }
        }
        Ok(Self {
            source: text.to_owned(),
            segments,
            names,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The capture names, in order, with their kind.
    pub fn captures(&self) -> impl Iterator<Item = (&str, CaptureKind)> {
        self.names.iter().map(|(n, k)| (&**n, *k))
    }

    /// The kind of capture `name`, when this template captures it.
    pub fn capture_kind(&self, name: &str) -> Option<CaptureKind> {
        self.captures().find(|(n, _)| *n == name).map(|(_, k)| k)
    }

    /// Matches a request path (a query after `?` is ignored) and returns the
    /// percent-decoded captures. No match when a segment would be empty, when
    /// a captured value is not UTF-8 once decoded, or when a `{*name}`
    /// segment holds an encoded `/` (its segments could not be told apart).
    pub fn matches(&self, path: &str) -> Option<Captures> {
        let path = path
            .as_bytes()
            .iter()
            .position(|&b| b == b'?')
            .map_or(path, |end| &path[..end]);
        self.matches_path(path)
    }

    /// [`PathTemplate::matches`] for a path known to hold no query (a route
    /// table tries many templates on one request's path: the query is cut
    /// off once, by [`super::RouteRequest`]).
    pub(crate) fn matches_path(&self, path: &str) -> Option<Captures> {
        if !self.could_match(path) {
            return None;
        }
        let mut rest = path.strip_prefix('/')?;
        let mut captures = Captures::with_capacity(self.names.len());
        let last = self.segments.len().saturating_sub(1);
        for (i, segment) in self.segments.iter().enumerate() {
            if let Segment::Rest(name) = segment {
                let value = decode_rest(rest)?;
                captures.entries.push((name.clone(), value));
                return Some(captures);
            }
            let (raw, next) = split_segment(rest);
            match_segment(segment, raw, &mut captures)?;
            match next {
                Some(next) if i < last => rest = next,
                None if i == last => {}
                _ => return None,
            }
        }
        Some(captures)
    }

    /// A check without allocation that turns away most paths that cannot
    /// match (a literal segment that differs, a segment too many or too few,
    /// an empty capture), so that a route table with many routes decodes and
    /// copies captures only for the route that matches. `true` means "maybe":
    /// [`PathTemplate::matches`] decides.
    fn could_match(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let last = self.segments.len().saturating_sub(1);
        for (i, segment) in self.segments.iter().enumerate() {
            let (raw, next) = split_segment(rest);
            let plausible = match segment {
                Segment::Rest(_) => return true,
                // An encoded segment is compared once decoded, by `matches`.
                Segment::Literal(literal) => raw.contains('%') || raw == literal,
                Segment::Capture(_) => !raw.is_empty(),
                Segment::Mixed(_) => true,
            };
            if !plausible {
                return false;
            }
            match next {
                Some(next) if i < last => rest = next,
                None if i == last => {}
                _ => return false,
            }
        }
        true
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn compile_segment(parts: Vec<Token<'_>>) -> Result<Segment, TemplateError> {
    let decode = |literal: &str| {
        percent_decode(literal, false)
            .map(Cow::into_owned)
            .ok_or(TemplateError::InvalidCharacter {
                ch: '%',
                hint: " where the decoded text is not UTF-8",
            })
    };
    match parts.as_slice() {
        [] => Ok(Segment::Literal(String::new())),
        [Token::Literal(literal)] => decode(literal).map(Segment::Literal),
        [Token::Placeholder(content)] => Ok(match content.strip_prefix('*') {
            Some(name) => Segment::Rest(name.into()),
            None => Segment::Capture((*content).into()),
        }),
        _ => {
            let mut compiled = Vec::with_capacity(parts.len());
            let mut previous_was_capture = false;
            for part in &parts {
                match part {
                    Token::Literal(literal) => {
                        compiled.push(Part::Literal(decode(literal)?));
                        previous_was_capture = false;
                    }
                    Token::Placeholder(content) => {
                        if let Some(name) = content.strip_prefix('*') {
                            return Err(TemplateError::RestNotLast {
                                name: name.to_owned(),
                            });
                        }
                        if previous_was_capture {
                            return Err(TemplateError::AdjacentCaptures);
                        }
                        compiled.push(Part::Capture((*content).into()));
                        previous_was_capture = true;
                    }
                }
            }
            Ok(Segment::Mixed(compiled))
        }
    }
}

/// The first segment of `rest` and what follows its `/`, if any. A plain
/// byte loop: path segments are short, and `str::split_once` costs more
/// than the scan itself here (measured with callgrind).
fn split_segment(rest: &str) -> (&str, Option<&str>) {
    match rest.as_bytes().iter().position(|&b| b == b'/') {
        Some(slash) => (&rest[..slash], Some(&rest[slash + 1..])),
        None => (rest, None),
    }
}

/// Matches one raw path segment, pushing its captures.
fn match_segment(segment: &Segment, raw: &str, captures: &mut Captures) -> Option<()> {
    match segment {
        Segment::Literal(literal) => (*percent_decode(raw, false)? == **literal).then_some(()),
        Segment::Capture(name) => {
            let value = percent_decode(raw, false)?;
            if value.is_empty() {
                return None;
            }
            captures.entries.push((name.clone(), value.into_owned()));
            Some(())
        }
        Segment::Mixed(parts) => match_parts(parts, &percent_decode(raw, false)?, captures),
        Segment::Rest(_) => None,
    }
}

/// Matches a decoded segment against literal parts and non-empty captures.
/// A capture ends at the first occurrence of the literal after it, or, when
/// that literal ends the segment, just before the segment's suffix.
fn match_parts(parts: &[Part], segment: &str, captures: &mut Captures) -> Option<()> {
    let mut s = segment;
    for (i, part) in parts.iter().enumerate() {
        match part {
            Part::Literal(literal) => s = s.strip_prefix(literal.as_str())?,
            Part::Capture(name) => {
                let end = match parts.get(i + 1) {
                    None => s.len(),
                    Some(Part::Literal(next)) if i + 2 == parts.len() => {
                        if !s.ends_with(next.as_str()) {
                            return None;
                        }
                        s.len().checked_sub(next.len())?
                    }
                    Some(Part::Literal(next)) => {
                        let first = s.chars().next()?.len_utf8();
                        first + s.get(first..)?.find(next.as_str())?
                    }
                    Some(Part::Capture(_)) => return None,
                };
                let value = s.get(..end).filter(|v| !v.is_empty())?;
                captures.entries.push((name.clone(), value.to_owned()));
                s = s.get(end..)?;
            }
        }
    }
    s.is_empty().then_some(())
}

/// Decodes the rest of a path segment by segment.
fn decode_rest(rest: &str) -> Option<String> {
    if rest.is_empty() {
        return None;
    }
    if !rest.contains('%') {
        return Some(rest.to_owned());
    }
    let mut out = String::with_capacity(rest.len());
    for (i, segment) in rest.split('/').enumerate() {
        let decoded = percent_decode(segment, false)?;
        if decoded.contains('/') {
            return None;
        }
        if i > 0 {
            out.push('/');
        }
        out.push_str(&decoded);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(template)
            .unwrap()
            .matches(path)
            .map(|c| c.iter().map(|(n, v)| (n.into(), v.into())).collect())
    }

    fn pairs(list: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            list.iter()
                .map(|(n, v)| ((*n).into(), (*v).into()))
                .collect(),
        )
    }

    #[test]
    fn literal_paths_match_exactly() {
        assert_eq!(matches("/healthz", "/healthz"), pairs(&[]));
        assert_eq!(matches("/healthz", "/healthz?x=1"), pairs(&[]));
        assert_eq!(matches("/healthz", "/healthz/"), None);
        assert_eq!(matches("/healthz", "/health"), None);
        assert_eq!(matches("/", "/"), pairs(&[]));
        assert_eq!(matches("/", "/x"), None);
        assert_eq!(matches("/a", "a"), None);
    }

    #[test]
    fn segment_captures_take_one_non_empty_segment() {
        let t = "/v1/sessions/{sid}/entries";
        assert_eq!(
            matches(t, "/v1/sessions/s1/entries"),
            pairs(&[("sid", "s1")])
        );
        assert_eq!(matches(t, "/v1/sessions//entries"), None);
        assert_eq!(matches(t, "/v1/sessions/a/b/entries"), None);
        assert_eq!(matches(t, "/v1/sessions/s1"), None);
        assert_eq!(matches(t, "/v1/sessions/s1/entries/x"), None);
    }

    #[test]
    fn captures_are_percent_decoded() {
        let t = "/db/{doc}";
        assert_eq!(matches(t, "/db/a%20b"), pairs(&[("doc", "a b")]));
        assert_eq!(matches(t, "/db/a%2Fb"), pairs(&[("doc", "a/b")]));
        assert_eq!(matches(t, "/db/%2e%2e"), pairs(&[("doc", "..")]));
        assert_eq!(matches(t, "/db/%FF"), None);
        assert_eq!(matches("/v1/sessions", "/v1/%73essions"), pairs(&[]));
    }

    #[test]
    fn rest_captures_take_the_rest_of_the_path() {
        let t = "/files/{*rest}";
        assert_eq!(
            matches(t, "/files/a/b%20c/d"),
            pairs(&[("rest", "a/b c/d")])
        );
        assert_eq!(matches(t, "/files/a"), pairs(&[("rest", "a")]));
        assert_eq!(matches(t, "/files/"), None);
        assert_eq!(matches(t, "/files"), None);
        assert_eq!(matches(t, "/files/a%2Fb/c"), None);
        assert_eq!(matches("/{*all}", "/x/y?q"), pairs(&[("all", "x/y")]));
    }

    #[test]
    fn literals_next_to_captures_match_inside_a_segment() {
        let t = "/{table}(PartitionKey='{pk}',RowKey='{rk}')";
        assert_eq!(
            matches(t, "/Orders(PartitionKey='p1',RowKey='r%201')"),
            pairs(&[("table", "Orders"), ("pk", "p1"), ("rk", "r 1")])
        );
        assert_eq!(
            matches(t, "/Orders(PartitionKey=%27p1%27,RowKey='r1')"),
            pairs(&[("table", "Orders"), ("pk", "p1"), ("rk", "r1")])
        );
        assert_eq!(matches(t, "/Orders(PartitionKey='',RowKey='r1')"), None);
        assert_eq!(matches(t, "/(PartitionKey='p',RowKey='r')"), None);
        assert_eq!(matches(t, "/Orders(PartitionKey='p',RowKey='r')x"), None);
        assert_eq!(
            matches("/f/{name}.json", "/f/a.b.json"),
            pairs(&[("name", "a.b")])
        );
        assert_eq!(matches("/f/{name}.json", "/f/.json"), None);
        assert_eq!(matches("/f/v{n}", "/f/v2"), pairs(&[("n", "2")]));
        assert_eq!(matches("/f/v{n}", "/f/v"), None);
        assert_eq!(
            matches("/f/{a}-{b}", "/f/é-x-y"),
            pairs(&[("a", "é"), ("b", "x-y")])
        );
    }

    #[test]
    fn bad_path_templates_are_refused() {
        let cases = [
            ("x/{a}", TemplateError::NotAPath),
            ("/{a}{b}", TemplateError::AdjacentCaptures),
            ("/{*a}/b", TemplateError::RestNotLast { name: "a".into() }),
            ("/x{*a}", TemplateError::RestNotLast { name: "a".into() }),
            (
                "/{a}/{a}",
                TemplateError::DuplicateCapture { name: "a".into() },
            ),
            ("/{a", TemplateError::Unbalanced { at: 1 }),
        ];
        for (text, expected) in cases {
            assert_eq!(PathTemplate::parse(text).unwrap_err(), expected, "{text:?}");
        }
        for text in ["/a?b", "/a#b", "/{body.x}", "/{query}", "/a b", "/{*}"] {
            assert!(PathTemplate::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn capture_kinds_are_reported() {
        let t = PathTemplate::parse("/{a}/x{b}/{*c}").unwrap();
        assert_eq!(
            t.captures().collect::<Vec<_>>(),
            [
                ("a", CaptureKind::Segment),
                ("b", CaptureKind::Segment),
                ("c", CaptureKind::Rest)
            ]
        );
        assert_eq!(t.capture_kind("z"), None);
    }

    #[test]
    fn captures_insert_replaces_and_collects() {
        let mut c: Captures = [("a", "1")].into_iter().collect();
        c.insert("a", "2");
        c.insert("b", "3");
        assert_eq!(c.get("a"), Some("2"));
        assert_eq!(c.len(), 2);
        assert!(!c.is_empty());
    }
}
