//! Process-level tests of the `idemproxy` binary: configuration errors,
//! `--check-config`, `--help`, and draining on SIGTERM.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

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
    ("IDEMPROXY_ROUTES", "FETCH", &[]),
    ("IDEMPROXY_IDEMPOTENCY_HEADER", "bad header", &[]),
    ("IDEMPROXY_IDEMPOTENCY_METHODS", "NOT A METHOD", &[]),
    ("IDEMPROXY_IDEMPOTENCY_KEY_MODE", "sometimes", &[]),
    ("IDEMPROXY_IDEMPOTENCY_TTL", "5x", &[]),
    ("IDEMPROXY_IDEMPOTENCY_CACHE_ENTRIES", "many", &[]),
    ("IDEMPROXY_IDEMPOTENCY_CACHE_BYTES", "big", &[]),
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
    ("IDEMPROXY_SESSION_SOURCES", "nowhere:x", &[]),
];

/// Options that have no default (they are unset unless given).
const WITHOUT_DEFAULT: &[&str] = &[
    "IDEMPROXY_UPSTREAM",
    "IDEMPROXY_UPSTREAM_CA_FILE",
    "IDEMPROXY_UPSTREAM_CLIENT_CERT",
    "IDEMPROXY_UPSTREAM_CLIENT_KEY",
    "IDEMPROXY_LOG",
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

/// One option of `--help`: its flag and, if shown, its default.
#[derive(Debug)]
struct HelpOption {
    flag: String,
    default: Option<String>,
}

/// Reads `idemproxy --help` into variable -> option.
fn help_options() -> BTreeMap<String, HelpOption> {
    let out = run_bounded(idemproxy_command().arg("--help"));
    assert!(out.status.success(), "--help failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // An option's block starts at a line whose first word is a flag; joining
    // the block's lines undoes any wrapping of `[env: ..]` and `[default: ..]`.
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") || trimmed.starts_with("-h,") || trimmed.starts_with("-V,") {
            blocks.push(trimmed.to_owned());
        } else if let Some(block) = blocks.last_mut() {
            block.push(' ');
            block.push_str(line.trim());
        }
    }
    let mut options = BTreeMap::new();
    for block in blocks {
        let Some(env_start) = block.find("[env: ") else {
            continue;
        };
        let var = block[env_start + 6..]
            .split(['=', ']'])
            .next()
            .unwrap()
            .to_owned();
        let flag = block.split_whitespace().next().unwrap().to_owned();
        let default = block.find("[default: ").map(|i| {
            let rest = &block[i + 10..];
            rest[..rest.find(']').unwrap()].to_owned()
        });
        options.insert(var, HelpOption { flag, default });
    }
    assert!(!options.is_empty(), "no [env: ..] found in --help:\n{text}");
    options
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
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_LOG_FORMAT", "json")
        .env("IDEMPROXY_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();

    // The binary does not print its port: read it from the start-up log line.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listen: SocketAddr = within("the 'idemproxy started' log line", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("stdout closed");
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["message"] == "idemproxy started" {
                return event["listen"].as_str().unwrap().parse().unwrap();
            }
        }
    })
    .await;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

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
