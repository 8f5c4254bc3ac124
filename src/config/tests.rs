//! Unit tests of the configuration.

use super::parse::{redact_header_values, redact_userinfo};
use super::*;

fn args(extra: &[&str]) -> Args {
    let mut v = vec!["idemproxy", "--upstream", "http://127.0.0.1:8080"];
    v.extend_from_slice(extra);
    Args::try_parse_from_strings(v, &std::collections::HashMap::new()).unwrap()
}

/// A variable of the source applies to its option, and the command line
/// wins over it, as with clap's own `env`.
#[test]
fn variables_come_from_the_source_and_the_command_line_wins() {
    let env = std::collections::BTreeMap::from([
        (
            "IDEMPROXY_UPSTREAM".to_owned(),
            "http://backend:8080".to_owned(),
        ),
        ("IDEMPROXY_CONNECT_TIMEOUT".to_owned(), "7s".to_owned()),
        ("IDEMPROXY_REQUEST_TIMEOUT".to_owned(), "1m".to_owned()),
        ("IDEMPROXY_ROUTES".to_owned(), "-x".to_owned()),
    ]);
    let args =
        Args::try_parse_from_strings(["idemproxy", "--request-timeout", "9s"], &env).unwrap();
    assert_eq!(args.get(&UPSTREAM), Some("http://backend:8080"));
    assert_eq!(args.get(&CONNECT_TIMEOUT), Some("7s"));
    assert_eq!(args.get(&REQUEST_TIMEOUT), Some("9s"));
    // A value that looks like a flag is still a value.
    assert_eq!(args.get(&ROUTES), Some("-x"));
    assert_eq!(args.get(&LISTEN), Some(DEFAULT_LISTEN));
    assert_eq!(args.get(&UPSTREAM_CA_FILE), None);
}

/// An `IDEMPROXY_*` variable of the source that names no option is
/// reported with the option it is probably a typo of, without its value.
#[test]
fn unknown_variables_are_reported_with_the_closest_option() {
    let env = std::collections::BTreeMap::from([
        (
            "IDEMPROXY_HEARTBEAT_INTERVALL".to_owned(),
            "s3cret".to_owned(),
        ),
        ("IDEMPROXY_ZZZ".to_owned(), "1".to_owned()),
        ("IDEMPROXY_CONNECT_TIMEOUT".to_owned(), "5s".to_owned()),
        ("OTHER_HEARTBEAT_INTERVALL".to_owned(), "1".to_owned()),
    ]);
    let args =
        Args::try_parse_from_strings(["idemproxy", "--upstream", "http://x:1"], &env).unwrap();
    assert_eq!(
        args.unknown_variables,
        ["IDEMPROXY_HEARTBEAT_INTERVALL", "IDEMPROXY_ZZZ"]
    );
    let text = Config::from_args(&args).unwrap_err().to_string();
    assert_eq!(
        text,
        "idemproxy: unknown variable IDEMPROXY_HEARTBEAT_INTERVALL; did you mean IDEMPROXY_HEARTBEAT_INTERVAL?\n\
         idemproxy: unknown variable IDEMPROXY_ZZZ: no option has this name (idemproxy --env-reference lists them)"
    );
    for (typo, meant) in [
        ("IDEMPROXY_UPSTREM", Some("IDEMPROXY_UPSTREAM")),
        ("IDEMPROXY_max_attempts", Some("IDEMPROXY_MAX_ATTEMPTS")),
        (
            "IDEMPROXY_RETRY_BUDGET_RATIO_",
            Some("IDEMPROXY_RETRY_BUDGET_RATIO"),
        ),
        (
            "IDEMPROXY_SESSION_SOURCE",
            Some("IDEMPROXY_SESSION_SOURCES"),
        ),
        ("IDEMPROXY_HEARTBEATS_PER_SECOND", None),
        ("IDEMPROXY_LOGS", Some("IDEMPROXY_LOG")),
    ] {
        assert_eq!(checker::closest_variable(typo), meant, "{typo}");
    }
}

#[test]
fn defaults_validate() {
    let c = Config::from_args(&args(&[])).unwrap();
    assert_eq!(c.upstream.request_timeout, Duration::from_secs(30));
    assert_eq!(c.server.limits.max_header_size, 64 * 1024);
    assert!(c.process.workers >= 1);
}

#[test]
fn every_bad_value_is_reported_with_its_variable() {
    let err = Config::from_args(&args(&[
        "--connect-timeout",
        "5x",
        "--max-header-size",
        "1KiB",
        "--preserve-host",
        "maybe",
    ]))
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.0.len(), 3, "{text}");
    assert!(text.contains("IDEMPROXY_CONNECT_TIMEOUT"), "{text}");
    assert!(text.contains("\"5x\""), "{text}");
    assert!(text.contains("IDEMPROXY_MAX_HEADER_SIZE"), "{text}");
    assert!(text.contains("IDEMPROXY_PRESERVE_HOST"), "{text}");
}

#[test]
fn secrets_are_redacted_in_errors() {
    assert_eq!(
        redact_userinfo("http://user:pw@x:1/a@b"),
        "http://<redacted>@x:1/a@b"
    );
    assert_eq!(redact_userinfo("user:pw@x"), "<redacted>@x");
    assert_eq!(redact_userinfo("http://x/a@b"), "http://x/a@b");
    assert_eq!(
        redact_header_values("authorization: Bearer s3cret; x-a: {session}\nbad"),
        "authorization: <redacted>; x-a: <redacted>; bad"
    );
    let err = Config::from_args(&args(&[
        "--heartbeat-set-headers",
        "authorization: Bearer s3cret; oops",
    ]))
    .unwrap_err()
    .to_string();
    assert!(!err.contains("s3cret"), "{err}");
    assert!(err.contains("IDEMPROXY_HEARTBEAT_SET_HEADERS"), "{err}");
    assert!(err.contains("oops"), "{err}");
}

#[test]
fn upstream_must_be_http_or_https_without_path() {
    for bad in [
        "ftp://x",
        "127.0.0.1:8080",
        "http://x/api",
        "http://user:pw@x",
    ] {
        assert!(parse_upstream(bad).is_err(), "{bad}");
    }
    let u = parse_upstream("https://backend.example:8443").unwrap();
    assert!(u.is_same_authority(&"BACKEND.example:8443".parse().unwrap()));
    let u = parse_upstream("http://backend").unwrap();
    assert!(u.is_same_authority(&"backend:80".parse().unwrap()));
    assert!(!u.is_same_authority(&"evil:80".parse().unwrap()));
}

/// Every option is declared once, `--check-config` prints every option
/// exactly once, and help lines read as `--help` shows them.
#[test]
fn the_declarations_are_consistent() {
    let mut names: Vec<&str> = ALL.iter().map(|o| o.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), ALL.len(), "an option is declared twice");
    let config = Config::from_args(&args(&[])).unwrap();
    let text = config.render();
    let mut rendered: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("  "))
        .map(|l| l.split_once('=').unwrap().0)
        .collect();
    rendered.sort_unstable();
    assert_eq!(
        rendered, names,
        "--check-config and the declarations differ"
    );
    for option in ALL {
        assert!(option.name().starts_with(PREFIX), "{}", option.name());
        assert!(!option.help().ends_with('.'), "{}", option.name());
    }
}
