//! The `IDEMPROXY_ROUTES` line parser and its error.

use http::{Method, StatusCode};

use super::condition::Condition;
use super::path::{CaptureKind, PathTemplate};
use super::session_source::{SessionSource, SessionSourceKind};
use super::template::{Placeholder, Template, TemplateError};
use super::{HeartbeatTemplate, MatchMode, RecoveredBody, Route, VerifyRule, VerifyTarget};
use crate::units::{DURATION_EXPECTED, parse_duration};

/// A route line that does not parse. Its `Display` names the 1-based line
/// number, the line's text and the offending word, in one line:
///
/// `IDEMPROXY_ROUTES line 3 ("POST /x verify=GOT:/y"): "verify=GOT:/y": expected verify=same, verify=location or verify=METHOD:/path/template`
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("IDEMPROXY_ROUTES line {line} ({text:?}): {word:?}: {reason}")]
pub struct RouteError {
    /// 1-based line number in `IDEMPROXY_ROUTES`.
    pub line: usize,
    /// The line's text, trimmed.
    pub text: String,
    /// The offending word.
    pub word: String,
    /// What was expected.
    pub reason: String,
}

const VERIFY_EXPECTED: &str =
    "expected verify=same, verify=location or verify=METHOD:/path/template";
const OPTIONS_EXPECTED: &str = "unknown option: expected if-query=, if-header=, if-json=, \
     retry=, idempotency-key=, replay=, timeout=, \
     verify=, match=, recovered-status=, recovered-body=, session=, session-end, renews, \
     heartbeat= or lease-ttl=";

/// The condition options (`if-…=`), which a route may repeat.
const CONDITION_KEYS: &[&str] = &["if-query", "if-header", "if-json"];

/// Methods a route, a verification or a heartbeat may name.
const METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "QUERY",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    "PURGE",
];

/// Reads a method word: the standard methods plus a few well-known
/// extension methods (WebDAV, `QUERY`, `PURGE`), upper case only, so that a
/// typo does not make a route that never matches.
pub(crate) fn parse_method(word: &str) -> Option<Method> {
    if METHODS.contains(&word) {
        Method::from_bytes(word.as_bytes()).ok()
    } else {
        None
    }
}

/// Parses the whole table: one route a line, blank lines and `#` comments skipped.
pub(super) fn parse_routes(text: &str) -> Result<Vec<Route>, RouteError> {
    let mut routes = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        routes.push(parse_line(i + 1, line)?);
    }
    Ok(routes)
}

/// The words of the line, up to a word that starts a `#` comment.
fn words(line: &str) -> impl Iterator<Item = &str> {
    line.split_whitespace().take_while(|w| !w.starts_with('#'))
}

fn parse_line(number: usize, line: &str) -> Result<Route, RouteError> {
    let error = |word: &str, reason: String| RouteError {
        line: number,
        text: line.to_owned(),
        word: word.to_owned(),
        reason,
    };
    let mut words = words(line);
    let method_word = words.next().unwrap_or_default();
    let method = match method_word {
        "*" => None,
        word => Some(parse_method(word).ok_or_else(|| {
            error(
                word,
                "expected an HTTP method such as GET or POST, or *".into(),
            )
        })?),
    };
    let path_word = words.next().ok_or_else(|| {
        error(
            method_word,
            "expected a path template after the method".into(),
        )
    })?;
    let path = PathTemplate::parse(path_word).map_err(|e| error(path_word, e.to_string()))?;

    let mut route = Route {
        method,
        path,
        conditions: Vec::new(),
        retry: None,
        idempotency_key: None,
        key_honoured: false,
        replay: None,
        timeout: None,
        verify: None,
        session: Vec::new(),
        session_end: false,
        renews: None,
        heartbeat: None,
        lease_ttl: None,
        line: line.to_owned(),
        line_number: number,
    };
    let mut verify: Option<(&str, VerifyTarget)> = None;
    let mut match_mode: Option<(&str, MatchMode)> = None;
    let mut recovered: Option<(&str, StatusCode)> = None;
    let mut recovered_body: Option<(&str, RecoveredBody)> = None;
    let mut match_ignore: Option<(&str, Vec<String>)> = None;
    let mut seen: Vec<&str> = Vec::new();

    for word in words {
        let (key, value) = match word.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (word, None),
        };
        // `session=` and the conditions are repeatable.
        if key != "session" && !CONDITION_KEYS.contains(&key) {
            if seen.contains(&key) {
                return Err(error(word, format!("{key} is given twice")));
            }
            seen.push(key);
        }
        let value = match (key, value) {
            ("session-end", None) => {
                route.session_end = true;
                continue;
            }
            ("session-end", Some(_)) => {
                return Err(error(
                    word,
                    "session-end is a flag and takes no value".into(),
                ));
            }
            ("renews", None) => {
                route.renews = Some(true);
                continue;
            }
            (_, Some(value)) => value,
            (_, None) => {
                return Err(error(
                    word,
                    format!("expected option=value; {OPTIONS_EXPECTED}"),
                ));
            }
        };
        match key {
            "if-query" | "if-header" | "if-json" => route
                .conditions
                .push(Condition::parse(key, value).map_err(|r| error(word, r))?),
            "replay" => {
                route.replay = Some(match value {
                    "safe" => true,
                    "unsafe" => false,
                    _ => {
                        return Err(error(word, "expected replay=safe or replay=unsafe".into()));
                    }
                });
            }
            "retry" => {
                route.retry = Some(
                    on_off(value)
                        .ok_or_else(|| error(word, "expected retry=on or retry=off".into()))?,
                )
            }
            "idempotency-key" => {
                // `honoured`: the backend deduplicates by the key, so every
                // attempt carries one and a replay after sending is safe.
                route.key_honoured = value == "honoured";
                let on = if route.key_honoured {
                    Some(true)
                } else {
                    on_off(value)
                };
                route.idempotency_key = Some(on.ok_or_else(|| {
                    error(
                        word,
                        "expected idempotency-key=on, idempotency-key=off or \
                         idempotency-key=honoured"
                            .into(),
                    )
                })?);
            }
            "renews" => {
                route.renews = Some(on_off(value).ok_or_else(|| {
                    error(word, "expected renews, renews=on or renews=off".into())
                })?);
            }
            "timeout" => {
                let timeout = parse_duration(value)
                    .map_err(|_| error(word, format!("expected {DURATION_EXPECTED}")))?;
                if timeout.is_zero() {
                    return Err(error(word, "the timeout must be more than 0".into()));
                }
                route.timeout = Some(timeout);
            }
            "verify" => verify = Some((word, parse_verify(value).map_err(|r| error(word, r))?)),
            "match" => {
                let mode = match value {
                    "exists" => MatchMode::Exists,
                    "json-subset" => MatchMode::JsonSubset,
                    "exact" => MatchMode::Exact,
                    _ => {
                        return Err(error(
                            word,
                            "expected match=exists, match=json-subset or match=exact".into(),
                        ));
                    }
                };
                match_mode = Some((word, mode));
            }
            "recovered-status" => {
                let status = value
                    .parse::<u16>()
                    .ok()
                    .filter(|code| (200..300).contains(code))
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or_else(|| error(word, "expected a 2xx status code such as 200".into()))?;
                recovered = Some((word, status));
            }
            "recovered-body" => {
                let body = parse_recovered_body(value).map_err(|r| error(word, r))?;
                recovered_body = Some((word, body));
            }
            "match-ignore" => {
                let patterns: Vec<String> = value.split('|').map(str::to_owned).collect();
                if patterns
                    .iter()
                    .any(|p| p.is_empty() || p == "*" || p.chars().skip(1).any(|c| c == '*'))
                {
                    return Err(error(
                        word,
                        "expected match-ignore=NAME|*SUFFIX, such as match-ignore=*@odata.type \
                         (top-level fields of the sent document left out of the comparison)"
                            .into(),
                    ));
                }
                match_ignore = Some((word, patterns));
            }
            "lease-ttl" => {
                let source = SessionSource::parse(value)
                    .ok()
                    .filter(|s| {
                        matches!(
                            s.kind(),
                            SessionSourceKind::Header(_)
                                | SessionSourceKind::Json(_)
                                | SessionSourceKind::ResponseHeader(_)
                                | SessionSourceKind::ResponseJson(_)
                        )
                    })
                    .ok_or_else(|| error(word, LEASE_TTL_EXPECTED.into()))?;
                route.lease_ttl = Some(source);
            }
            "session" => {
                let source = SessionSource::parse(value).map_err(|e| error(word, e.to_string()))?;
                if let SessionSourceKind::Path(name) = source.kind() {
                    if route.path.capture_kind(name).is_none() {
                        return Err(error(
                            word,
                            format!("the path template {path_word} captures no {{{name}}}"),
                        ));
                    }
                }
                route.session.push(source);
            }
            "heartbeat" => {
                let heartbeat = HeartbeatTemplate::parse(value)
                    .and_then(|mut hb| {
                        check_route_template(&mut hb.template, &route.path)?;
                        Ok(hb)
                    })
                    .map_err(|e| {
                        error(
                            word,
                            format!("{e}; expected heartbeat=METHOD:/path/template"),
                        )
                    })?;
                route.heartbeat = Some(heartbeat);
            }
            _ => return Err(error(word, OPTIONS_EXPECTED.into())),
        }
    }

    match verify {
        Some((verify_word, mut target)) => {
            if let VerifyTarget::Template { template, .. } = &mut target {
                check_route_template(template, &route.path)
                    .map_err(|e| error(verify_word, format!("{e}; {VERIFY_EXPECTED}")))?;
            }
            if let Some((word, RecoveredBody::Template(template))) = &mut recovered_body {
                check_route_template(template, &route.path)
                    .map_err(|e| error(word, e.to_string()))?;
            }
            let mode = match_mode.map_or(MatchMode::JsonSubset, |(_, mode)| mode);
            if let (Some((word, _)), true) = (&match_ignore, mode != MatchMode::JsonSubset) {
                return Err(error(
                    word,
                    "match-ignore= only applies with match=json-subset".into(),
                ));
            }
            let head =
                matches!(&target, VerifyTarget::Template { method, .. } if *method == Method::HEAD);
            if head && mode != MatchMode::Exists {
                let word = match_mode.map_or(verify_word, |(word, _)| word);
                return Err(error(
                    word,
                    "a HEAD answer has no body to compare: use match=exists".into(),
                ));
            }
            route.verify = Some(VerifyRule {
                target,
                match_mode: mode,
                recovered_status: recovered.map_or(StatusCode::OK, |(_, status)| status),
                recovered_body: recovered_body.map_or(RecoveredBody::Stored, |(_, body)| body),
                match_ignore: match_ignore.map(|(_, p)| p).unwrap_or_default(),
            });
        }
        None => {
            if let Some((word, _)) = match_mode {
                return Err(error(word, "match= only applies with verify=".into()));
            }
            if let Some((word, _)) = recovered {
                return Err(error(
                    word,
                    "recovered-status= only applies with verify=".into(),
                ));
            }
            if let Some((word, _)) = match_ignore {
                return Err(error(
                    word,
                    "match-ignore= only applies with verify=".into(),
                ));
            }
            if let Some((word, _)) = recovered_body {
                return Err(error(
                    word,
                    "recovered-body= only applies with verify=".into(),
                ));
            }
        }
    }
    Ok(route)
}

fn on_off(value: &str) -> Option<bool> {
    match value {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

const LEASE_TTL_EXPECTED: &str = "expected lease-ttl=header:NAME, lease-ttl=json:FIELD.PATH, \
     lease-ttl=response-header:NAME or lease-ttl=response-json:FIELD.PATH (where the lease's \
     length in seconds is)";

/// `recovered-body=stored|empty|JSON-TEMPLATE`.
fn parse_recovered_body(value: &str) -> Result<RecoveredBody, String> {
    const EXPECTED: &str = "expected recovered-body=stored, recovered-body=empty or a JSON \
         template without spaces such as {\"ok\":true,\"rev\":\"{stored._rev}\"}";
    match value {
        "stored" => Ok(RecoveredBody::Stored),
        "empty" => Ok(RecoveredBody::Empty),
        _ => {
            let template = Template::parse_json(value).map_err(|e| format!("{e}; {EXPECTED}"))?;
            Ok(RecoveredBody::Template(template))
        }
    }
}

fn parse_verify(value: &str) -> Result<VerifyTarget, String> {
    match value {
        "same" => return Ok(VerifyTarget::Same),
        "location" => return Ok(VerifyTarget::Location),
        _ => {}
    }
    let (method, template) = value
        .split_once(':')
        .ok_or_else(|| VERIFY_EXPECTED.to_owned())?;
    let method = parse_method(method).ok_or_else(|| VERIFY_EXPECTED.to_owned())?;
    if method != Method::GET && method != Method::HEAD {
        return Err(format!(
            "a verification must only read: use GET or HEAD, not {method}"
        ));
    }
    let template = Template::parse(template).map_err(|e| format!("{e}; {VERIFY_EXPECTED}"))?;
    if let Some(p) = template.stored_placeholder() {
        return Err(format!(
            "{p} names the stored document, which the verification is about to read: \
             use it in recovered-body= only"
        ));
    }
    Ok(VerifyTarget::Template { method, template })
}

/// Checks a verify or heartbeat template against the route's path template:
/// every `{name}` / `{*name}` it uses is captured, with the same kind. A
/// `{session}` means the capture when the path captures `session`.
fn check_route_template(template: &mut Template, path: &PathTemplate) -> Result<(), TemplateError> {
    if path.capture_kind("session").is_some() {
        template.prefer_capture_for_session();
    }
    for placeholder in template.placeholders() {
        let (name, wanted) = match placeholder {
            Placeholder::Capture(name) => (name, CaptureKind::Segment),
            Placeholder::CaptureRest(name) => (name, CaptureKind::Rest),
            _ => continue,
        };
        let context = match path.capture_kind(name) {
            Some(kind) if kind == wanted => continue,
            Some(CaptureKind::Rest) => "here: the path captures it as {*name}, write it so",
            Some(CaptureKind::Segment) => "here: the path captures it as {name}, write it so",
            None => "here: the route's path template does not capture it",
        };
        return Err(TemplateError::NotAllowed {
            placeholder: placeholder.to_string().trim_matches(['{', '}']).to_owned(),
            context,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The example table of DESIGN.md.
    const DESIGN_TABLE: &str = "\
PUT  /db/{doc}                     verify=same match=json-subset
POST /v1/sessions/{sid}/entries    session=path:sid verify=GET:/v1/sessions/{sid}/entries/{body.uuid}
GET  /v1/sessions/{sid}/await      session=path:sid timeout=10m retry=off
DELETE /v1/sessions/{sid}          session=path:sid session-end
";

    fn parse_one(line: &str) -> Route {
        let mut routes = parse_routes(line).unwrap();
        assert_eq!(routes.len(), 1);
        routes.remove(0)
    }

    fn parse_err(text: &str) -> RouteError {
        parse_routes(text).unwrap_err()
    }

    #[test]
    fn design_example_table_parses() {
        let routes = parse_routes(DESIGN_TABLE).unwrap();
        assert_eq!(routes.len(), 4);

        let put = &routes[0];
        assert_eq!(put.method, Some(Method::PUT));
        let verify = put.verify.as_ref().unwrap();
        assert_eq!(verify.target, VerifyTarget::Same);
        assert_eq!(verify.match_mode, MatchMode::JsonSubset);
        assert_eq!(verify.recovered_status, StatusCode::OK);

        let post = &routes[1];
        assert_eq!(post.session[0].label(), "path:sid");
        match &post.verify.as_ref().unwrap().target {
            VerifyTarget::Template { method, template } => {
                assert_eq!(*method, Method::GET);
                assert_eq!(template.as_str(), "/v1/sessions/{sid}/entries/{body.uuid}");
                assert!(template.needs_body());
            }
            other => panic!("unexpected {other:?}"),
        }

        let await_route = &routes[2];
        assert_eq!(await_route.timeout, Some(Duration::from_secs(600)));
        assert_eq!(await_route.retry, Some(false));
        assert_eq!(await_route.line_number, 3);

        let delete = &routes[3];
        assert!(delete.session_end);
        assert_eq!(
            delete.line,
            "DELETE /v1/sessions/{sid}          session=path:sid session-end"
        );
    }

    #[test]
    fn blank_lines_and_comments_are_skipped() {
        let routes =
            parse_routes("\n# a comment\n   \n  GET /x retry=off # trailing note\n").unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].line_number, 4);
        assert_eq!(routes[0].retry, Some(false));
    }

    #[test]
    fn error_display_names_line_text_and_word() {
        let err = parse_err("GET /a\n\nPOST /x verify=GOT:/y");
        assert_eq!(
            err.to_string(),
            "IDEMPROXY_ROUTES line 3 (\"POST /x verify=GOT:/y\"): \"verify=GOT:/y\": \
             expected verify=same, verify=location or verify=METHOD:/path/template"
        );
        assert_eq!(err.line, 3);
        assert_eq!(err.word, "verify=GOT:/y");
    }

    #[test]
    fn every_bad_line_names_its_offending_word() {
        let cases = [
            ("GOT /x", "GOT"),
            ("get /x", "get"),
            ("GET", "GET"),
            ("GET x", "x"),
            ("GET /{a", "/{a"),
            ("GET /a}", "/a}"),
            ("GET /{body.x}", "/{body.x}"),
            ("GET /{*rest}/x", "/{*rest}/x"),
            ("GET /x colour=red", "colour=red"),
            ("GET /x retry", "retry"),
            ("GET /x retry=yes", "retry=yes"),
            ("GET /x retry=on retry=off", "retry=off"),
            ("GET /x idempotency-key=maybe", "idempotency-key=maybe"),
            ("GET /x timeout=10", "timeout=10"),
            ("GET /x timeout=0", "timeout=0"),
            ("GET /x timeout=1s timeout=2s", "timeout=2s"),
            ("GET /x verify=nope", "verify=nope"),
            ("GET /x verify=POST:/y", "verify=POST:/y"),
            ("GET /x verify=GET:y", "verify=GET:y"),
            ("GET /x verify=GET://evil/y", "verify=GET://evil/y"),
            ("GET /x verify=GET:/y/{x", "verify=GET:/y/{x"),
            ("GET /x verify=GET:/y/{foo.bar}", "verify=GET:/y/{foo.bar}"),
            ("GET /x verify=same verify=location", "verify=location"),
            ("GET /x verify=HEAD:/y", "verify=HEAD:/y"),
            ("GET /x verify=HEAD:/y match=exact", "match=exact"),
            ("GET /x verify=same match=similar", "match=similar"),
            ("GET /x match=exists", "match=exists"),
            ("GET /x recovered-status=200", "recovered-status=200"),
            (
                "GET /x verify=same recovered-status=409",
                "recovered-status=409",
            ),
            (
                "GET /x verify=same recovered-status=abc",
                "recovered-status=abc",
            ),
            ("GET /x session=query:q", "session=query:q"),
            ("GET /x session=path:sid", "session=path:sid"),
            ("GET /x session-end=yes", "session-end=yes"),
            ("GET /x session-end session-end", "session-end"),
            ("GET /x heartbeat=POST/y", "heartbeat=POST/y"),
            ("GET /x heartbeat=FOO:/y", "heartbeat=FOO:/y"),
            (
                "GET /x heartbeat=POST:/y/{body.id}",
                "heartbeat=POST:/y/{body.id}",
            ),
        ];
        for (line, word) in cases {
            let err = parse_err(&format!("# header\n{line}"));
            assert_eq!(err.line, 2, "{line}");
            assert_eq!(err.text, line);
            assert_eq!(err.word, word, "{line}: {err}");
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("IDEMPROXY_ROUTES line 2 ({line:?}): {word:?}: ")),
                "{shown}"
            );
        }
    }

    #[test]
    fn template_captures_must_exist_in_the_path() {
        let err = parse_err("POST /v1/{sid}/entries verify=GET:/v1/{sess}/entries");
        assert_eq!(err.word, "verify=GET:/v1/{sess}/entries");
        assert!(err.reason.contains("{sess}"), "{}", err.reason);
        let err = parse_err("POST /v1/{sid} heartbeat=POST:/v1/{other}/hb");
        assert_eq!(err.word, "heartbeat=POST:/v1/{other}/hb");
        let err = parse_err("GET /f/{*rest} verify=GET:/g/{rest}");
        assert!(err.reason.contains("{*name}"), "{}", err.reason);
        assert!(parse_routes("GET /f/{*rest} verify=GET:/g/{*rest}").is_ok());
    }

    #[test]
    fn all_options_parse_into_typed_fields() {
        let route = parse_one(
            "* /v1/{sid}/items/{*rest} retry=on idempotency-key=off timeout=1m30s \
             verify=HEAD:/v1/{sid}/items/{*rest}?{query} match=exists recovered-status=201 \
             session=header:Mcp-Session-Id session=cookie:sid session=response-json:result.id \
             session-end heartbeat=PUT:/v1/{sid}/lease?{query}",
        );
        assert_eq!(route.method, None);
        assert_eq!(route.retry, Some(true));
        assert_eq!(route.idempotency_key, Some(false));
        assert_eq!(route.timeout, Some(Duration::from_secs(90)));
        let verify = route.verify.as_ref().unwrap();
        assert_eq!(verify.match_mode, MatchMode::Exists);
        assert_eq!(verify.recovered_status, StatusCode::CREATED);
        assert_eq!(route.session.len(), 3);
        assert!(route.session_end);
        let heartbeat = route.heartbeat.as_ref().unwrap();
        assert_eq!(heartbeat.method, Method::PUT);
        assert_eq!(heartbeat.template.as_str(), "/v1/{sid}/lease?{query}");
    }

    #[test]
    fn recovered_answers_lease_lengths_and_ignored_fields_parse_and_print_back() {
        let line = r#"PUT /{db}/{doc} verify=same match=json-subset recovered-status=201 match-ignore=*@odata.type|Timestamp recovered-body={"ok":true,"id":"{doc}","rev":"{stored._rev}"} lease-ttl=response-json:TTL"#;
        let route = parse_one(line);
        let verify = route.verify.as_ref().unwrap();
        assert!(verify.recovered_body.reads_stored());
        assert!(verify.ignores("Age@odata.type"));
        assert!(verify.ignores("Timestamp"));
        assert!(!verify.ignores("Age"));
        assert_eq!(
            route.lease_ttl.as_ref().map(ToString::to_string).as_deref(),
            Some("response-json:TTL")
        );
        assert_eq!(route.to_string(), line);
        assert_eq!(parse_one(&route.to_string()).to_string(), line);
        let empty = parse_one("POST /t verify=same match=exists recovered-body=empty");
        assert_eq!(
            empty.verify.as_ref().map(|v| &v.recovered_body),
            Some(&RecoveredBody::Empty)
        );
        // A request-side lease length needs the body when it is a JSON field.
        assert!(parse_one("POST /v3/lease/grant lease-ttl=json:TTL").needs_body());
        assert!(!parse_one("PUT /c/b lease-ttl=header:x-ms-lease-duration").needs_body());
        assert!(
            parse_one(r#"POST /t verify=same match=exists recovered-body={"a":"{body.x}"}"#)
                .needs_body()
        );
    }

    #[test]
    fn recovered_bodies_lease_lengths_and_ignored_fields_refuse_bad_words() {
        for (line, word, says) in [
            (
                "POST /t recovered-body=empty",
                "recovered-body=empty",
                "only applies with verify=",
            ),
            (
                "POST /t match-ignore=x",
                "match-ignore=x",
                "only applies with verify=",
            ),
            (
                "POST /t verify=same match=exact match-ignore=x",
                "match-ignore=x",
                "match=json-subset",
            ),
            (
                "POST /t verify=same match-ignore=a||b",
                "match-ignore=a||b",
                "match-ignore=NAME",
            ),
            (
                "POST /t verify=same match-ignore=a*b",
                "match-ignore=a*b",
                "match-ignore=NAME",
            ),
            // A name that starts with a multi-byte character is read by
            // characters, never cut inside one.
            (
                "POST /t verify=same match-ignore=é*",
                "match-ignore=é*",
                "match-ignore=NAME",
            ),
            (
                "POST /t verify=same recovered-body={\"a\":\"{nope}\"}",
                "recovered-body={\"a\":\"{nope}\"}",
                "does not capture",
            ),
            (
                "POST /t verify=GET:/x/{stored.id}",
                "verify=GET:/x/{stored.id}",
                "recovered-body= only",
            ),
            (
                "POST /t lease-ttl=path:x",
                "lease-ttl=path:x",
                "lease-ttl=header:NAME",
            ),
            (
                "POST /t lease-ttl=cookie:x",
                "lease-ttl=cookie:x",
                "lease-ttl=header:NAME",
            ),
        ] {
            let e = parse_err(line);
            assert_eq!(e.word, word, "{line}: {e}");
            assert!(e.reason.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn session_placeholder_means_the_capture_when_the_path_has_one() {
        let route = parse_one(
            "POST /v1/sessions/{session}/entries verify=GET:/v1/sessions/{session}/entries/{body.id}",
        );
        let Some(VerifyTarget::Template { template, .. }) = route.verify.map(|v| v.target) else {
            panic!("expected a template");
        };
        assert_eq!(template.capture_names().collect::<Vec<_>>(), ["session"]);
        let route = parse_one("POST /v1/{sid} heartbeat=POST:/hb/{session}");
        let placeholders: Vec<_> = route
            .heartbeat
            .unwrap()
            .template
            .placeholders()
            .cloned()
            .collect();
        assert_eq!(placeholders, [Placeholder::Session]);
    }

    #[test]
    fn condition_and_replay_words_parse_or_name_the_word() {
        let route = parse_one(
            "PUT /{c}/{b} if-query=comp=lease if-header=x-ms-lease-action=acquire \
             if-header=!x-ms-proposed-lease-id if-json=method=tools/list|resources/read \
             if-query=!restype replay=unsafe",
        );
        assert_eq!(route.conditions.len(), 5);
        assert_eq!(route.replay, Some(false));
        assert_eq!(
            route.conditions[3].to_string(),
            "if-json=method=tools/list|resources/read"
        );
        assert!(route.conditions[3].reads_body());
        assert!(!route.conditions[0].reads_body());
        assert_eq!(parse_one("POST /mcp replay=safe").replay, Some(true));
        assert_eq!(parse_one("POST /mcp").replay, None);

        let cases = [
            ("GET /x if-query", "if-query", "expected option=value"),
            ("GET /x if-query=", "if-query=", "the name is empty"),
            (
                "GET /x if-query=a=x||y",
                "if-query=a=x||y",
                "a value is empty",
            ),
            ("GET /x if-query=a=", "if-query=a=", "a value is empty"),
            ("GET /x if-query=!a=x", "if-query=!a=x", "takes no values"),
            (
                "GET /x if-header=a(b)",
                "if-header=a(b)",
                "not a valid header name",
            ),
            ("GET /x if-header=!", "if-header=!", "the name is empty"),
            ("GET /x if-json=a..b", "if-json=a..b", "not a field path"),
            ("GET /x if-json==1", "if-json==1", "the name is empty"),
            ("GET /x if-cookie=a", "if-cookie=a", "unknown option"),
            (
                "GET /x replay=maybe",
                "replay=maybe",
                "expected replay=safe or replay=unsafe",
            ),
            ("GET /x replay", "replay", "expected option=value"),
            (
                "GET /x replay=safe replay=unsafe",
                "replay=unsafe",
                "given twice",
            ),
        ];
        for (line, word, reason) in cases {
            let err = parse_err(line);
            assert_eq!(err.word, word, "{line}: {err}");
            assert!(err.reason.contains(reason), "{line}: {err}");
        }
    }

    #[test]
    fn method_words_are_checked() {
        assert_eq!(parse_method("PATCH"), Some(Method::PATCH));
        assert_eq!(
            parse_method("PROPFIND").map(|m| m.to_string()).as_deref(),
            Some("PROPFIND")
        );
        assert_eq!(parse_method("Get"), None);
        assert_eq!(parse_method("GOT"), None);
    }
}
