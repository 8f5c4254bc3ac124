//! Property tests of the parsers that read outside input (configuration
//! values, request heads, an upstream's `Location`): none panics on any
//! input, what can be rendered back round-trips (parse → render → parse),
//! and a substituted value never leaves its path segment. Each property
//! runs a bounded number of cases ([`CASES`]) so the file runs in seconds.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Uri, Version, header};
use idemproxy::config::{Args, Config, Upstream};
use idemproxy::proxy::conformance::check_head;
use idemproxy::routes::{Captures, FieldPath, RenderContext, RouteTable, SessionSource, Template};
use idemproxy::units::{MAX_DURATION, format_duration, format_size, parse_duration, parse_size};
use idemproxy::verify::location_target;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

/// Cases per property.
const CASES: u32 = 256;

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Nothing is written next to the sources; a failure prints its input.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any text, with the characters that parsers treat specially made likely.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9{}*.:/\\\\%?#@=; ,\t\r\n-]{0,40}",
    ]
}

/// The decoded value of a percent-encoded path segment.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------
// Durations and sizes
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases())]

    /// Every duration up to the cap, in milliseconds, reads back from its
    /// formatted text.
    #[test]
    fn durations_round_trip_through_the_formatter(ms in 0..=MAX_DURATION.as_millis() as u64) {
        let d = Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }

    /// Any text: no panic, and nothing past the cap is ever accepted.
    #[test]
    fn durations_never_panic_nor_exceed_the_cap(s in text(), n in any::<u64>(), unit in "ms|s|m|h") {
        for input in [s, format!("{n}{unit}"), format!("{n}h{n}m")] {
            if let Ok(d) = parse_duration(&input) {
                prop_assert!(d <= MAX_DURATION, "{input:?} gave {d:?}");
            }
        }
    }

    /// Every size reads back from its formatted text; any text: no panic.
    #[test]
    fn sizes_round_trip_through_the_formatter(n in any::<u64>(), s in text()) {
        prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
        let _ = parse_size(&s);
    }
}

// ---------------------------------------------------------------------------
// The route table
// ---------------------------------------------------------------------------

/// A valid route line: a path template of literal and captured segments
/// (perhaps ending in `{*rest}`) and a shuffled choice of options that fit it.
fn route_line() -> impl Strategy<Value = String> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("DELETE"),
        Just("PATCH"),
        Just("*")
    ];
    let segments = prop::collection::vec(prop::option::of("[a-z0-9_~-]{1,6}"), 1..5);
    (
        method,
        segments,
        any::<bool>(),
        any::<[u8; 12]>(),
        1..=MAX_DURATION.as_millis() as u64,
    )
        .prop_flat_map(|(method, segments, rest, picks, timeout_ms)| {
            let mut path = String::new();
            let mut captures = Vec::new();
            for (i, segment) in segments.iter().enumerate() {
                match segment {
                    Some(literal) => path.push_str(&format!("/{literal}")),
                    None => {
                        path.push_str(&format!("/{{c{i}}}"));
                        captures.push(format!("c{i}"));
                    }
                }
            }
            if rest {
                path.push_str("/{*rest}");
            }
            let mut options = Vec::new();
            let pick = |i: usize, n: u8| picks[i] % n;
            match pick(0, 3) {
                1 => options.push("retry=on".to_owned()),
                2 => options.push("retry=off".to_owned()),
                _ => {}
            }
            match pick(1, 4) {
                1 => options.push("idempotency-key=on".to_owned()),
                2 => options.push("idempotency-key=off".to_owned()),
                3 => options.push("idempotency-key=honoured".to_owned()),
                _ => {}
            }
            if pick(2, 2) == 1 {
                options.push(format!(
                    "timeout={}",
                    format_duration(Duration::from_millis(timeout_ms))
                ));
            }
            let verify = match pick(3, 4) {
                1 => Some("verify=same".to_owned()),
                2 => Some("verify=location".to_owned()),
                3 => Some(match captures.first() {
                    Some(c) => format!("verify=GET:/v/{{{c}}}/{{body.items.0.id}}?{{query}}"),
                    None => "verify=GET:/v/{body.id}".to_owned(),
                }),
                _ => None,
            };
            if let Some(verify) = verify {
                options.push(verify);
                match pick(4, 4) {
                    1 => options.push("match=exists".to_owned()),
                    2 => options.push("match=json-subset".to_owned()),
                    3 => options.push("match=exact".to_owned()),
                    _ => {}
                }
                if pick(5, 2) == 1 {
                    options.push(format!(
                        "recovered-status={}",
                        200 + u16::from(pick(6, 100))
                    ));
                }
            }
            match (pick(7, 5), captures.first()) {
                (1, Some(c)) => options.push(format!("session=path:{c}")),
                (2, _) => options.push("session=header:x-sid".to_owned()),
                (3, _) => options.push("session=cookie:sid".to_owned()),
                (4, _) => options.push("session=response-json:data.id".to_owned()),
                _ => {}
            }
            if pick(8, 2) == 1 {
                options.push("session-end".to_owned());
            }
            match pick(9, 4) {
                1 => options.push("renews".to_owned()),
                2 => options.push("renews=on".to_owned()),
                3 => options.push("renews=off".to_owned()),
                _ => {}
            }
            if pick(10, 2) == 1 {
                options.push("heartbeat=POST:/hb/{session}".to_owned());
            }
            (
                Just(format!("{method} {path}")),
                Just(options).prop_shuffle(),
            )
        })
        .prop_map(|(head, options)| {
            std::iter::once(head)
                .chain(options)
                .collect::<Vec<_>>()
                .join(" ")
        })
}

proptest! {
    #![proptest_config(cases())]

    /// A valid route line parses; its canonical form (as `--check-config`
    /// prints it) parses again to the same canonical form and the same timeout.
    #[test]
    fn route_lines_round_trip_through_their_canonical_form(line in route_line()) {
        let table = RouteTable::parse(&line).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let route = table.iter().next().ok_or_else(|| TestCaseError::fail("no route"))?;
        let canonical = route.to_string();
        let again = RouteTable::parse(&canonical)
            .map_err(|e| TestCaseError::fail(format!("{canonical:?}: {e}")))?;
        let again = again.iter().next().ok_or_else(|| TestCaseError::fail("no route"))?;
        prop_assert_eq!(again.to_string(), canonical);
        prop_assert_eq!(again.timeout, route.timeout);
        prop_assert_eq!(&again.verify, &route.verify);
    }

    /// Any text as a route table: an error or a table, never a panic; a
    /// table that parses round-trips too.
    #[test]
    fn route_tables_never_panic(lines in prop::collection::vec(text(), 0..4)) {
        if let Ok(table) = RouteTable::parse(&lines.join("\n")) {
            let canonical: Vec<String> = table.iter().map(ToString::to_string).collect();
            let again = RouteTable::parse(&canonical.join("\n"))
                .map_err(|e| TestCaseError::fail(format!("{canonical:?}: {e}")))?;
            let again: Vec<String> = again.iter().map(ToString::to_string).collect();
            prop_assert_eq!(again, canonical);
        }
    }
}

// ---------------------------------------------------------------------------
// Templates, field paths, session sources, header templates
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases())]

    /// Any text as a URL, JSON or header template: no panic; a template that
    /// parses renders its source back and parses again to the same template.
    #[test]
    fn templates_never_panic_and_round_trip(s in text()) {
        for parse in [Template::parse, Template::parse_json, Template::parse_header] {
            if let Ok(template) = parse(&s) {
                prop_assert_eq!(template.to_string(), s.clone());
                prop_assert_eq!(parse(&template.to_string()), Ok(template));
            }
        }
    }

    /// Any text as a field path: no panic; one that parses round-trips,
    /// and a document built along it is found by `lookup`.
    #[test]
    fn field_paths_round_trip(s in text(), keys in prop::collection::vec("[a-zA-Z_][a-zA-Z0-9_]{0,5}", 1..5)) {
        if let Ok(path) = FieldPath::parse(&s) {
            prop_assert_eq!(path.to_string(), s);
        }
        let path = FieldPath::parse(&keys.join(".")).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let doc = keys
            .iter()
            .rev()
            .fold(serde_json::json!("leaf"), |inner, key| serde_json::json!({ key: inner }));
        prop_assert_eq!(idemproxy::routes::lookup(&doc, &path), Some(&serde_json::json!("leaf")));
    }

    /// Any text as a session source, and any header values to read an id
    /// from: no panic; a source that parses shows as given.
    #[test]
    fn session_sources_never_panic(s in text(), value in any::<Vec<u8>>()) {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            headers.insert(header::COOKIE, v.clone());
            headers.insert("x-sid", v);
        }
        let captures = Captures::new();
        let body = serde_json::json!({"a": {"b": String::from_utf8_lossy(&value)}});
        for word in [s.clone(), format!("cookie:{s}"), format!("header:{s}"), "cookie:sid".into(), "header:x-sid".into(), "json:a.b".into()] {
            if let Ok(source) = SessionSource::parse(&word) {
                prop_assert_eq!(source.to_string(), word);
                let _ = source.from_request(&captures, &headers, Some(&body));
            }
        }
        let _ = SessionSource::parse_list(&s);
    }

    /// Any text as `IDEMPROXY_HEARTBEAT_SET_HEADERS` (the header-template
    /// option): accepted or refused, never a panic, and never echoed with
    /// its values in an error.
    #[test]
    fn header_templates_never_panic(
        name in "[a-z-]{1,8}",
        secret in "[A-Za-z0-9]{12,16}",
        tail in text(),
    ) {
        let option = format!("{name}: Bearer {secret}{tail}");
        let Ok(args) = Args::try_parse_from_strings([
            "idemproxy", "--upstream", "http://127.0.0.1:1", "--heartbeat-set-headers", &option,
        ], &std::collections::HashMap::new()) else {
            return Ok(());
        };
        if let Err(e) = Config::from_args(&args) {
            let text = e.to_string();
            prop_assert!(!text.contains(&secret), "{text}");
        }
    }
}

// ---------------------------------------------------------------------------
// Percent-encoding keeps a value in its segment
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases())]

    /// Any value substituted into `/a/{x}/b` (a capture, a body field, a
    /// header, a query parameter or the session id) stays one segment: the
    /// rendered path has exactly three segments, no query or fragment, no
    /// authority, the middle segment holds only unreserved characters and
    /// escapes and decodes to the value. Only empty, `.` and `..` are refused.
    #[test]
    fn substituted_values_never_leave_their_segment(value in any::<String>(), kind in 0..4usize) {
        let placeholder = ["{x}", "{body.v}", "{query.q}", "{session}"][kind];
        let template = Template::parse(&format!("/a/{placeholder}/b"))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let captures: Captures = [("x", value.as_str())].into_iter().collect();
        let headers = HeaderMap::new();
        let body = serde_json::json!({ "v": value });
        let query = format!("q={}", percent_encode_query(&value));
        let ctx = RenderContext::new(&captures, &headers)
            .with_body(Some(&body))
            .with_query(Some(&query))
            .with_session(Some(&value));
        let rendered = template.render(&ctx);
        if value.is_empty() || value == "." || value == ".." {
            prop_assert!(rendered.is_err(), "{value:?} rendered {rendered:?}");
            return Ok(());
        }
        let rendered = rendered.map_err(|e| TestCaseError::fail(format!("{value:?}: {e}")))?;
        let middle = rendered
            .strip_prefix("/a/")
            .and_then(|r| r.strip_suffix("/b"))
            .ok_or_else(|| TestCaseError::fail(format!("{rendered:?}")))?;
        prop_assert!(
            middle.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
            "{middle:?}"
        );
        let decoded = percent_decode(middle);
        prop_assert_eq!(decoded.as_deref(), Some(value.as_str()));
        let uri: Uri = rendered.parse().map_err(|e| TestCaseError::fail(format!("{rendered:?}: {e}")))?;
        prop_assert!(uri.authority().is_none() && uri.query().is_none());
        prop_assert_eq!(uri.path(), rendered.as_str());
    }
}

/// `value` encoded for a query string, every byte but unreserved ones escaped.
fn percent_encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The Location check and the request head checks
// ---------------------------------------------------------------------------

fn upstream() -> Upstream {
    Upstream {
        scheme: http::uri::Scheme::HTTP,
        authority: http::uri::Authority::from_static("backend:8080"),
    }
}

proptest! {
    #![proptest_config(cases())]

    /// Any `Location`: no panic, and whatever is followed is a path on the
    /// upstream: no scheme, no authority, never `//` first, no backslash.
    #[test]
    fn location_check_only_ever_yields_a_path_on_the_upstream(s in text(), bytes in any::<Vec<u8>>()) {
        let up = upstream();
        for location in [s.as_bytes(), &bytes] {
            if let Some(uri) = location_target(&up, location) {
                let text = uri.to_string();
                prop_assert!(uri.scheme().is_none() && uri.authority().is_none(), "{text}");
                prop_assert!(text.starts_with('/') && !text.starts_with("//"), "{text}");
                prop_assert!(!text.contains('\\') && !text.to_ascii_lowercase().contains("%5c"), "{text}");
            }
        }
    }

    /// A path-absolute location, alone or on the upstream's own origin, is
    /// followed as that path; scheme-relative or on another origin, never.
    #[test]
    fn location_check_follows_exactly_the_upstreams_paths(
        segments in prop::collection::vec("[a-zA-Z0-9._~!$&'()*+,;=:@-]{1,8}", 1..4),
        host in "[a-z]{1,8}",
    ) {
        let up = upstream();
        let path = format!("/{}", segments.join("/"));
        let follow = |location: String| location_target(&up, location.as_bytes()).map(|u| u.to_string());
        prop_assert_eq!(follow(path.clone()), Some(path.clone()));
        prop_assert_eq!(follow(format!("http://backend:8080{path}")), Some(path.clone()));
        prop_assert_eq!(follow(format!("//{host}{path}")), None);
        prop_assert_eq!(follow(format!("/\\{host}{path}")), None);
        prop_assert_eq!(follow(format!("https://backend:8080{path}")), None);
        if host != "backend" {
            prop_assert_eq!(follow(format!("http://{host}:8080{path}")), None);
        }
    }

    /// Any `Host` and `Transfer-Encoding` values, on HTTP/1.0 or 1.1: no panic.
    #[test]
    fn request_head_checks_never_panic(
        hosts in prop::collection::vec(any::<Vec<u8>>(), 0..3),
        codings in prop::collection::vec("[a-zA-Z, ;=]{0,20}", 0..3),
        v11 in any::<bool>(),
    ) {
        let mut headers = HeaderMap::new();
        for host in &hosts {
            if let Ok(v) = HeaderValue::from_bytes(host) {
                headers.append(header::HOST, v);
            }
        }
        for coding in &codings {
            if let Ok(v) = HeaderValue::from_str(coding) {
                headers.append(header::TRANSFER_ENCODING, v);
            }
        }
        let version = if v11 { Version::HTTP_11 } else { Version::HTTP_10 };
        let _ = check_head(version, &headers);
    }
}
