//! Process-level tests of the `idemproxy` binary: configuration errors,
//! `--check-config`, `--help`, and draining on SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use testkit::*;

/// (variable, bad value, other variables set with it).
type BadValue = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// A bad value for every option of `idemproxy --help`: (variable, bad value,
/// other variables it needs so that it is the only problem; `{cert}` and
/// `{key}` stand for a valid client certificate and key).
/// A new option must get a line here (`every_option_has_a_bad_value_case`
/// fails otherwise).
const BAD_VALUES: &[BadValue] = &[
    ("IDEMPROXY_UPSTREAM", "ftp://backend", &[]),
    ("IDEMPROXY_UPSTREAM", "http://backend/api", &[]),
    ("IDEMPROXY_LISTEN", "localhost", &[]),
    ("IDEMPROXY_ADMIN_LISTEN", "0.0.0.0", &[]),
    ("IDEMPROXY_ADMIN_CONTROL_LISTEN", "0.0.0.0:7482", &[]),
    ("IDEMPROXY_ADMIN_TOKEN_FILE", "/nonexistent/token", &[]),
    ("IDEMPROXY_CONNECT_TIMEOUT", "5x", &[]),
    ("IDEMPROXY_REQUEST_TIMEOUT", "0", &[]),
    ("IDEMPROXY_UPSTREAM_IDLE_TIMEOUT", "soon", &[]),
    ("IDEMPROXY_UPSTREAM_MAX_IDLE", "-1", &[]),
    ("IDEMPROXY_UPSTREAM_CA_FILE", "/nonexistent/ca.pem", &[]),
    (
        "IDEMPROXY_UPSTREAM_CLIENT_CERT",
        "/nonexistent/client.pem",
        &[("IDEMPROXY_UPSTREAM_CLIENT_KEY", "{key}")],
    ),
    (
        "IDEMPROXY_UPSTREAM_CLIENT_KEY",
        "/nonexistent/client.key",
        &[("IDEMPROXY_UPSTREAM_CLIENT_CERT", "{cert}")],
    ),
    ("IDEMPROXY_UPSTREAM_CA_ONLY", "maybe", &[]),
    ("IDEMPROXY_UPSTREAM_CA_ONLY", "on", &[]),
    ("IDEMPROXY_PRESERVE_HOST", "maybe", &[]),
    ("IDEMPROXY_FORWARDED_HEADERS", "2", &[]),
    ("IDEMPROXY_MAX_HEADER_SIZE", "1KiB", &[]),
    ("IDEMPROXY_HEADER_READ_TIMEOUT", "10", &[]),
    ("IDEMPROXY_MAX_CONNECTIONS", "0", &[]),
    ("IDEMPROXY_DRAIN_TIMEOUT", "soon", &[]),
    ("IDEMPROXY_WORKERS", "many", &[]),
    ("IDEMPROXY_LOG", "[[[", &[]),
    ("IDEMPROXY_LOG_FORMAT", "xml", &[]),
    ("IDEMPROXY_RETRY_ON", "sometimes", &[]),
    ("IDEMPROXY_RETRY_STATUSES", "abc", &[]),
    ("IDEMPROXY_RETRIABLE_STATUS_CODES", "999x", &[]),
    ("IDEMPROXY_MAX_ATTEMPTS", "0", &[]),
    ("IDEMPROXY_TRY_TIMEOUT", "5x", &[]),
    ("IDEMPROXY_BACKOFF_BASE", "5x", &[]),
    ("IDEMPROXY_BACKOFF_MAX", "5x", &[]),
    ("IDEMPROXY_RETRY_BUDGET_RATIO", "lots", &[]),
    ("IDEMPROXY_RETRY_BUDGET_MIN_PER_SEC", "lots", &[]),
    ("IDEMPROXY_RETRY_METHODS", "NOT A METHOD", &[]),
    ("IDEMPROXY_RETRY_UNSAFE_REQUESTS", "sometimes", &[]),
    ("IDEMPROXY_MAX_REPLAY_BODY", "big", &[]),
    ("IDEMPROXY_MAX_REPLAY_MEMORY", "big", &[]),
    ("IDEMPROXY_PROFILE", "cosmos", &[]),
    ("IDEMPROXY_PROFILE", "mcp,etcd", &[]),
    ("IDEMPROXY_ROUTES", "FETCH", &[]),
    ("IDEMPROXY_IDEMPOTENCY_HEADER", "bad header", &[]),
    ("IDEMPROXY_IDEMPOTENCY_METHODS", "NOT A METHOD", &[]),
    ("IDEMPROXY_IDEMPOTENCY_KEY_MODE", "sometimes", &[]),
    ("IDEMPROXY_IDEMPOTENCY_TTL", "5x", &[]),
    ("IDEMPROXY_IDEMPOTENCY_CACHE_ENTRIES", "many", &[]),
    ("IDEMPROXY_IDEMPOTENCY_CACHE_BYTES", "big", &[]),
    ("IDEMPROXY_IDEMPOTENCY_SCOPE_HEADERS", "bad header", &[]),
    ("IDEMPROXY_HEARTBEAT", "PING", &[]),
    ("IDEMPROXY_HEARTBEAT_BODY", r#"{"id":"{header.}"}"#, &[]),
    ("IDEMPROXY_HEARTBEAT_INTERVAL", "5x", &[]),
    ("IDEMPROXY_REQUESTS_RENEW", "yes please", &[]),
    ("IDEMPROXY_SESSION_IDLE_TIMEOUT", "5x", &[]),
    ("IDEMPROXY_HEARTBEAT_HEADERS", "bad header", &[]),
    ("IDEMPROXY_HEARTBEAT_SET_HEADERS", "no-colon", &[]),
    ("IDEMPROXY_HEARTBEAT_ALIVE_FIELD", "..", &[]),
    ("IDEMPROXY_HEARTBEAT_MAX_FAILURES", "many", &[]),
    ("IDEMPROXY_HEARTBEAT_MAX_PER_SEC", "many", &[]),
    ("IDEMPROXY_HEARTBEAT_TIMEOUT", "5x", &[]),
    ("IDEMPROXY_MAX_SESSIONS", "many", &[]),
    ("IDEMPROXY_MAX_SESSION_BYTES", "big", &[]),
    ("IDEMPROXY_SESSION_SOURCES", "nowhere:x", &[]),
];

/// Options that have no default (they are unset unless given).
const WITHOUT_DEFAULT: &[&str] = &[
    "IDEMPROXY_UPSTREAM",
    "IDEMPROXY_UPSTREAM_CA_FILE",
    "IDEMPROXY_UPSTREAM_CLIENT_CERT",
    "IDEMPROXY_UPSTREAM_CLIENT_KEY",
    "IDEMPROXY_LOG",
    "IDEMPROXY_ADMIN_TOKEN_FILE",
];

/// Defaults the design documents (ports chosen to avoid other sidecars).
const DOCUMENTED_DEFAULTS: &[(&str, &str)] = &[
    ("IDEMPROXY_LISTEN", "127.0.0.1:7480"),
    ("IDEMPROXY_ADMIN_LISTEN", "0.0.0.0:7481"),
    ("IDEMPROXY_CONNECT_TIMEOUT", "3s"),
    ("IDEMPROXY_REQUEST_TIMEOUT", "30s"),
    ("IDEMPROXY_MAX_HEADER_SIZE", "64KiB"),
    ("IDEMPROXY_HEADER_READ_TIMEOUT", "10s"),
    ("IDEMPROXY_FORWARDED_HEADERS", "on"),
    ("IDEMPROXY_PRESERVE_HOST", "off"),
    ("IDEMPROXY_DRAIN_TIMEOUT", "20s"),
];

/// One option of the binary: its flag, its value's name (`DURATION`, `N`,
/// ...) and, if it has one, its default.
#[derive(Debug)]
struct HelpOption {
    flag: String,
    value_name: String,
    default: Option<String>,
}

/// The binary's options with a variable, variable -> option, read from clap's
/// introspection of the real `Args` (what `--help` and `--env-reference` show).
fn help_options() -> BTreeMap<String, HelpOption> {
    let options: BTreeMap<String, HelpOption> = idemproxy::config::reference::options()
        .into_iter()
        .filter_map(|o| {
            let var = o.variable?;
            Some((
                var,
                HelpOption {
                    flag: format!("--{}", o.flag),
                    value_name: o.value_name.unwrap_or_default(),
                    default: o.default,
                },
            ))
        })
        .collect();
    assert!(!options.is_empty(), "no option with a variable");
    options
}

/// `idemproxy --help` shows every option of the reference on its flag, with
/// its value's name, its variable and its default.
#[test]
fn help_shows_every_option_with_its_variable_and_default() {
    let out = run_bounded(idemproxy_command().arg("--help"));
    assert!(out.status.success(), "--help failed: {out:?}");
    // One line: wrapping may split `[env: ..]` and `[default: ..]`.
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut missing = Vec::new();
    for (var, option) in help_options() {
        let mut shown = vec![
            format!("{} <{}>", option.flag, option.value_name),
            format!("[env: {var}=]"),
        ];
        match option.default.as_deref() {
            // clap quotes an empty default, or one with spaces.
            Some(d) if d.is_empty() || d.contains(' ') => shown.push(format!("[default: {d:?}]")),
            Some(d) => shown.push(format!("[default: {d}]")),
            None => {}
        }
        missing.extend(shown.into_iter().filter(|s| !text.contains(s.as_str())));
    }
    assert!(
        missing.is_empty(),
        "--help does not show {missing:?}:\n{text}"
    );
}

/// Every option in `--help` has a line in [`BAD_VALUES`], so that the
/// bad-value test really covers every option.
#[test]
fn every_option_has_a_bad_value_case() {
    let covered: BTreeSet<&str> = BAD_VALUES.iter().map(|(var, _, _)| *var).collect();
    let missing: Vec<String> = help_options()
        .into_keys()
        .filter(|var| !covered.contains(var.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "add a bad value for {missing:?} to BAD_VALUES in tests/cli.rs"
    );
}

/// Each bad value (set as its environment variable) makes the binary exit 2
/// with exactly one line that names the variable and the value.
#[test]
fn every_bad_value_exits_2_naming_its_variable() {
    let dir = TempDir::new();
    let leaf = TestPki::new("cli test CA").client_leaf();
    let cert = dir.write("client.pem", &leaf.cert_pem);
    let key = dir.write("client.key", &leaf.key_pem);
    let mut failures = Vec::new();
    for (var, bad, others) in BAD_VALUES {
        let mut cmd = idemproxy_command();
        cmd.env("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")
            .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
            .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0");
        for (other, value) in *others {
            let value = value
                .replace("{cert}", cert.to_str().unwrap())
                .replace("{key}", key.to_str().unwrap());
            cmd.env(other, value);
        }
        cmd.env(var, bad);
        let out = run_bounded(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let ok = out.status.code() == Some(2)
            && lines.len() == 1
            && lines[0].contains(var)
            && lines[0].contains(&format!("{bad:?}"));
        if !ok {
            failures.push(format!(
                "{var}={bad:?}: exit {:?}, stderr: {stderr:?}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Runs the binary with a valid base configuration plus `env`, and
/// `--check-config` if asked.
fn run_with(env: &[(&str, &str)], check_config: bool) -> std::process::Output {
    let mut cmd = idemproxy_command();
    cmd.env("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")
        .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0");
    for (var, value) in env {
        cmd.env(var, value);
    }
    if check_config {
        cmd.arg("--check-config");
    }
    run_bounded(&mut cmd)
}

/// `None` if `var=value` is refused both by `--check-config` and at
/// start-up with exit 2 and one line naming `name` and `value`; else what
/// happened.
fn refused_once(var: &str, value: &str, name: &str) -> Option<String> {
    let mut failures = Vec::new();
    for check_config in [true, false] {
        let out = run_with(&[(var, value)], check_config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let ok = out.status.code() == Some(2)
            && lines.len() == 1
            && lines[0].contains(name)
            && lines[0].contains(value);
        if !ok {
            failures.push(format!(
                "{var}={value:?} (check-config: {check_config}): exit {:?}, stderr: {stderr:?}",
                out.status.code()
            ));
        }
    }
    (!failures.is_empty()).then(|| failures.join("\n"))
}

/// The duration that used to pass `--check-config` and then panic at run
/// time (`overflow when adding duration to instant`).
const OVERFLOWING: &str = "3000000000000000h";

/// Every DURATION option of `--help`, and a route's `timeout=`, refuse a
/// duration past the one-year cap (`3000000000000000h`, `8760h1ms`) with
/// exit 2 and one line, both under `--check-config` and at start-up.
#[test]
fn durations_past_one_year_exit_2() {
    let durations: Vec<String> = help_options()
        .into_iter()
        .filter(|(_, o)| o.value_name == "DURATION")
        .map(|(var, _)| var)
        .collect();
    assert!(durations.len() >= 10, "{durations:?}");
    let mut failures = Vec::new();
    for var in &durations {
        for value in [OVERFLOWING, "8760h1ms"] {
            failures.extend(refused_once(var, value, var));
        }
    }
    for value in [OVERFLOWING, "8761h"] {
        let route = format!("GET /poll timeout={value}");
        failures.extend(refused_once("IDEMPROXY_ROUTES", &route, "timeout="));
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Every count option (`N`) refuses a value past its documented maximum
/// with exit 2 and one line: 1024 workers, 100 attempts, 1 000 000 for the
/// others (`IDEMPROXY_WORKERS=100000` used to start 100 000 threads, and
/// `IDEMPROXY_MAX_CONNECTIONS=18446744073709551615` to panic at start-up).
#[test]
fn counts_past_their_maximum_exit_2() {
    let counts: Vec<String> = help_options()
        .into_iter()
        .filter(|(_, o)| o.value_name == "N")
        .map(|(var, _)| var)
        .collect();
    assert!(counts.len() >= 8, "{counts:?}");
    let mut failures = Vec::new();
    for var in &counts {
        failures.extend(refused_once(var, "1000001", var));
    }
    for (var, value) in [
        ("IDEMPROXY_WORKERS", "100000"),
        ("IDEMPROXY_WORKERS", "1025"),
        ("IDEMPROXY_MAX_ATTEMPTS", "101"),
        ("IDEMPROXY_MAX_CONNECTIONS", "18446744073709551615"),
    ] {
        failures.extend(refused_once(var, value, var));
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Values at the caps are accepted: every DURATION option and a route's
/// `timeout=` at `8760h` (one year), 1024 workers, 100 attempts and every
/// other count at 1 000 000 pass `--check-config` (exit 0) and are shown as given.
#[test]
fn values_at_the_caps_are_accepted() {
    let options = help_options();
    let mut env: Vec<(String, String)> = Vec::new();
    for (var, option) in &options {
        let value = match option.value_name.as_str() {
            "DURATION" => "8760h",
            "N" if var == "IDEMPROXY_WORKERS" => "1024",
            "N" if var == "IDEMPROXY_MAX_ATTEMPTS" => "100",
            "N" => "1000000",
            _ => continue,
        };
        env.push((var.clone(), value.to_owned()));
    }
    env.push(("IDEMPROXY_ROUTES".into(), "GET /poll timeout=8760h".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run_with(&env_refs, true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (var, value) in &env {
        if var == "IDEMPROXY_ROUTES" {
            assert!(stdout.contains("timeout=8760h"), "{stdout}");
            continue;
        }
        assert!(
            stdout.lines().any(|l| l == format!("{var}={value}")),
            "{var}={value} not shown as given:\n{stdout}"
        );
    }
}

/// TLS files that exist but hold no usable PEM are bad values too: exit 2
/// naming the variable, not a start-up failure.
#[test]
fn unusable_tls_files_exit_2_naming_their_variable() {
    let dir = TempDir::new();
    let garbage = dir.write("garbage.pem", "this is not PEM\n");
    let garbage = garbage.to_str().unwrap();
    for (var, others) in [
        ("IDEMPROXY_UPSTREAM_CA_FILE", &[][..]),
        (
            "IDEMPROXY_UPSTREAM_CLIENT_CERT",
            &[("IDEMPROXY_UPSTREAM_CLIENT_KEY", garbage)][..],
        ),
    ] {
        let mut cmd = idemproxy_command();
        cmd.env("IDEMPROXY_UPSTREAM", "https://127.0.0.1:9")
            .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
            .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
            .env(var, garbage);
        for (other, value) in others {
            cmd.env(other, value);
        }
        let out = run_bounded(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(var), "{var} not named: {stderr}");
    }
}

/// The admin control listener serves changes, so an address reachable from
/// outside the pod (`0.0.0.0`, a pod IP, `[::]`, IPv4-mapped, link-local)
/// exits 2 with one line naming the variable and the value and saying it
/// must be loopback, under `--check-config` and at start-up; so does a port
/// that another listener already takes. Loopback addresses pass.
#[test]
fn non_loopback_admin_control_listen_exits_2() {
    const VAR: &str = "IDEMPROXY_ADMIN_CONTROL_LISTEN";
    let mut failures = Vec::new();
    let mut refused = |env: &[(&str, &str)], value: &str, words: &[&str]| {
        for check_config in [true, false] {
            let out = run_with(env, check_config);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            let ok = out.status.code() == Some(2)
                && lines.len() == 1
                && lines[0].contains(VAR)
                && lines[0].contains(value)
                && words.iter().all(|w| lines[0].contains(w));
            if !ok {
                failures.push(format!(
                    "{env:?} (check-config: {check_config}): exit {:?}, stderr: {stderr:?}",
                    out.status.code()
                ));
            }
        }
    };
    for value in [
        "0.0.0.0:7482",
        "10.1.2.3:7482",
        "[::]:7482",
        "[::ffff:10.1.2.3]:7482",
        "[fe80::1]:7482",
    ] {
        refused(
            &[(VAR, value)],
            value,
            &["loopback", "IDEMPROXY_ADMIN_TOKEN_FILE"],
        );
    }
    refused(
        &[
            ("IDEMPROXY_ADMIN_LISTEN", "0.0.0.0:7481"),
            (VAR, "127.0.0.1:7481"),
        ],
        "127.0.0.1:7481",
        &["0.0.0.0:7481"],
    );
    for value in [
        "127.0.0.1:7482",
        "127.0.0.2:7482",
        "[::1]:7482",
        "[::ffff:127.0.0.1]:7482",
    ] {
        let out = run_with(&[(VAR, value)], true);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.code() != Some(0) || !stdout.lines().any(|l| l == format!("{VAR}={value}")) {
            failures.push(format!(
                "{VAR}={value}: exit {:?}, stdout: {stdout}, stderr: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// `IDEMPROXY_ADMIN_TOKEN_FILE`: a missing or empty file, or one holding a
/// blank, short or multi-word token, exits 2 with one line naming the
/// variable and the path but never the content (under `--check-config` and
/// at start-up); a good file passes, and `--check-config` shows its path,
/// never the token.
#[test]
fn admin_token_file_is_checked_and_never_shown() {
    const VAR: &str = "IDEMPROXY_ADMIN_TOKEN_FILE";
    let dir = TempDir::new();
    let mut failures = Vec::new();
    for (name, content) in [
        ("empty", ""),
        ("blank", " \n\t\n"),
        ("short", "zq9-short\n"),
        ("words", "zq9 zq9 zq9 zq9 zq9 zq9\n"),
    ] {
        let path = dir.write(name, content);
        let path = path.to_str().unwrap();
        failures.extend(refused_once(VAR, path, VAR));
        let out = run_with(&[(VAR, path)], false);
        if String::from_utf8_lossy(&out.stderr).contains("zq9") {
            failures.push(format!("{name}: the error shows the file's content"));
        }
    }
    failures.extend(refused_once(VAR, dir.path().to_str().unwrap(), VAR));
    const TOKEN: &str = "tok-9b1e27c4d05f3a68";
    let good = dir.write("good", format!("{TOKEN}\n"));
    let good = good.to_str().unwrap();
    let out = run_with(&[(VAR, good)], true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.lines().any(|l| l == format!("{VAR}={good}")),
        "{stdout}"
    );
    assert!(
        !stdout.contains(TOKEN),
        "--check-config shows the token:\n{stdout}"
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A misspelt `IDEMPROXY_*` variable, which would otherwise change nothing,
/// exits 2 with one line naming it and the option it is probably a typo of,
/// never its value, under `--check-config` and at start-up; a name near no
/// option is named alone.
#[test]
fn unknown_variables_exit_2_naming_the_closest_option() {
    let mut failures = Vec::new();
    for check_config in [true, false] {
        for (var, line) in [
            (
                "IDEMPROXY_HEARTBEAT_INTERVALL",
                "idemproxy: unknown variable IDEMPROXY_HEARTBEAT_INTERVALL; did you mean IDEMPROXY_HEARTBEAT_INTERVAL?",
            ),
            (
                "IDEMPROXY_NO_SUCH_THING",
                "idemproxy: unknown variable IDEMPROXY_NO_SUCH_THING: no option has this name (idemproxy --env-reference lists them)",
            ),
        ] {
            let out = run_with(&[(var, "zq9-value")], check_config);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.code() != Some(2) || stderr.lines().collect::<Vec<_>>() != [line] {
                failures.push(format!(
                    "{var} (check-config: {check_config}): exit {:?}, stderr: {stderr:?}",
                    out.status.code()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Without `IDEMPROXY_UPSTREAM` the binary exits 2 with one line naming it.
#[test]
fn missing_upstream_exits_2_naming_it() {
    let out = run_bounded(&mut idemproxy_command());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("IDEMPROXY_UPSTREAM"), "{stderr}");
}

/// `--check-config` prints one `IDEMPROXY_*=value` line per option, with the
/// values given, and exits 0 without starting.
#[test]
fn check_config_prints_the_effective_configuration() {
    let out = run_bounded(
        idemproxy_command()
            .env("IDEMPROXY_UPSTREAM", "http://backend.internal:8080")
            .env("IDEMPROXY_REQUEST_TIMEOUT", "1m30s")
            .args(["--max-header-size", "16KiB", "--check-config"]),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let printed: BTreeMap<&str, &str> = stdout
        .lines()
        .map(|line| {
            assert!(line.starts_with("IDEMPROXY_"), "unexpected line {line:?}");
            line.split_once('=').unwrap()
        })
        .collect();
    assert_eq!(
        printed["IDEMPROXY_UPSTREAM"],
        "http://backend.internal:8080"
    );
    assert_eq!(printed["IDEMPROXY_REQUEST_TIMEOUT"], "1m30s");
    assert_eq!(printed["IDEMPROXY_MAX_HEADER_SIZE"], "16KiB");
    assert_eq!(printed["IDEMPROXY_LISTEN"], "127.0.0.1:7480");
    let help: BTreeSet<String> = help_options().into_keys().collect();
    let printed: BTreeSet<String> = printed.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        printed, help,
        "--check-config and --help list different variables"
    );
}

/// `--help` lists every `IDEMPROXY_` variable on its matching `--flag`, with
/// its default (except the few options that have none).
#[test]
fn help_lists_every_variable_with_its_default() {
    let options = help_options();
    for (var, option) in &options {
        let expected_flag = format!(
            "--{}",
            var.trim_start_matches("IDEMPROXY_")
                .to_ascii_lowercase()
                .replace('_', "-")
        );
        assert_eq!(option.flag, expected_flag, "{var}");
        if !WITHOUT_DEFAULT.contains(&var.as_str()) {
            assert!(option.default.is_some(), "{var} shows no default in --help");
        }
    }
    for var in WITHOUT_DEFAULT {
        assert!(options.contains_key(*var), "{var} missing from --help");
    }
    for (var, default) in DOCUMENTED_DEFAULTS {
        let shown = options.get(*var).and_then(|o| o.default.as_deref());
        assert_eq!(shown, Some(*default), "{var}");
    }
}

/// SIGTERM while a slow request is in flight: the listener closes at once
/// (a new connection is refused), the request still completes with 200, and
/// the process exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let upstream = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        response(200, "slow but complete")
    })
    .await;
    let mut cmd = idemproxy_command();
    cmd.env("IDEMPROXY_UPSTREAM", upstream.url())
        .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0");
    let SpawnedBinary {
        mut child,
        pid,
        listen,
        ..
    } = spawn_binary(cmd).await;

    let request = tokio::spawn(client().get(format!("http://{listen}/slow")).send());
    upstream.requests.wait_for(1).await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    within("the listener to close after SIGTERM", async {
        while tokio::net::TcpStream::connect(listen).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        !request.is_finished(),
        "the request finished before the listener closed; the test proves nothing"
    );

    let resp = within("the in-flight request", request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow but complete");
    let status = within("the process to exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A SIGTERM that arrives during start-up, once the listeners are bound but
/// before the proxy has finished starting, is not lost and does not kill the
/// process: the proxy finishes starting, drains, and exits 0. The start-up
/// is held at that point by a full stdout pipe: the "idemproxy started" log
/// line, written after the listeners are bound, blocks until the test reads.
#[tokio::test]
async fn sigterm_during_start_up_drains_and_exits_0() {
    use std::io::ErrorKind;
    use tokio::io::AsyncReadExt;

    let listen = unused_addr();
    let (stdout_tx, mut stdout_rx) = tokio::net::unix::pipe::pipe().unwrap();
    // Fill the pipe, so that the child's first write blocks: write until
    // the pipe stays unwritable (a `WouldBlock` alone may only mean that
    // readiness is not known yet).
    for chunk in [&[b'\n'; 4096][..], b"\n"] {
        while tokio::time::timeout(Duration::from_millis(100), stdout_tx.writable())
            .await
            .is_ok()
        {
            match stdout_tx.try_write(chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("filling the pipe: {e}"),
            }
        }
    }
    let mut cmd = idemproxy_command();
    cmd.env("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")
        .env("IDEMPROXY_LISTEN", listen.to_string())
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_LOG_FORMAT", "json")
        .env("IDEMPROXY_LOG", "info")
        .stdout(std::process::Stdio::from(
            stdout_tx.into_blocking_fd().unwrap(),
        ))
        .stderr(std::process::Stdio::inherit());
    let mut cmd = tokio::process::Command::from(cmd);
    let mut child = cmd.kill_on_drop(true).spawn().unwrap();
    // Close this process's copy of the pipe's write end.
    drop(cmd);
    let pid = child.id().unwrap();

    within("the traffic listener to be bound", async {
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the proxy exited during start-up"
    );
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Let the signal land while the start-up is still held.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let drain = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = stdout_rx.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = within("the process to exit", child.wait()).await.unwrap();
    let stdout = within("stdout to close", drain).await.unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}: the SIGTERM killed the process instead of draining it"
    );
    assert!(stdout.contains("idemproxy stopped"), "{stdout}");
}

/// `--check-config` shows the names of `IDEMPROXY_HEARTBEAT_SET_HEADERS`
/// but none of the header values given on the command line (they may be
/// credentials), and a bad value's error line, or a URL's password, does
/// not echo them either.
#[test]
fn check_config_and_errors_show_no_header_value() {
    let secrets = ["s3cr3t-t0ken", "lease-9f2c"];
    let set_headers = format!(
        "authorization: Bearer {}; x-lease-id: {}-{{session}}",
        secrets[0], secrets[1]
    );
    let out = run_bounded(
        idemproxy_command()
            .env("IDEMPROXY_UPSTREAM", "http://backend.internal:8080")
            .env("IDEMPROXY_SESSION_SOURCES", "header:x-session-id")
            .env(
                "IDEMPROXY_HEARTBEAT",
                "POST /v1/sessions/{session}/heartbeat",
            )
            .args(["--heartbeat-set-headers", &set_headers, "--check-config"]),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for secret in secrets.iter().chain(&["Bearer"]) {
        assert!(!stdout.contains(secret), "{secret} shown:\n{stdout}");
    }
    assert!(
        stdout.lines().any(|l| l
            == "IDEMPROXY_HEARTBEAT_SET_HEADERS=authorization: <redacted>; x-lease-id: <redacted>"),
        "{stdout}"
    );

    let bad = format!("{set_headers}; no-colon");
    let out = run_with(&[("IDEMPROXY_HEARTBEAT_SET_HEADERS", &bad)], true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no-colon"), "{stderr}");
    for secret in secrets {
        assert!(!stderr.contains(secret), "{secret} shown: {stderr}");
    }

    let out = run_with(
        &[("IDEMPROXY_UPSTREAM", "http://agent:pa55w0rd@backend:8080")],
        true,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("IDEMPROXY_UPSTREAM"), "{stderr}");
    assert!(!stderr.contains("pa55w0rd"), "{stderr}");
}
