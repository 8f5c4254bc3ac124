//! Real servers that nobody on the team wrote (etcd, the official MCP Python
//! SDK), started by the tests on their own 127.0.0.1 ports and stopped by PID
//! when their guard drops, plus a fault-injecting TCP proxy
//! ([`FaultProxy`](crate::fault_proxy::FaultProxy)) to put between idemproxy and them.
//!
//! `tools/test` installs the servers (Debian's `etcd-server`, a venv at
//! `target/real-servers/venv` with the MCP SDK) and runs the tests with
//! `TEST_REAL_SERVERS=required`: then a missing server fails the test.
//! Without that variable, a test whose server is missing prints a loud
//! `SKIPPED` line to stderr and returns.
//!
//! Overrides: `TEST_ETCD_BIN` (path of the etcd binary),
//! `TEST_MCP_PYTHON` (a python that can `import mcp, uvicorn`).
//!
//! ```no_run
//! use testkit::TestProxy;
//! use testkit::real_servers::Etcd;
//!
//! # async fn example() {
//! let Some(etcd) = Etcd::start().await else { return };
//! let proxy = TestProxy::start(&etcd.url(), &[]).await;
//! # drop(proxy);
//! # }
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::Value;

use crate::{TempDir, client, within};

/// How long a server may take to start answering.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `TEST_REAL_SERVERS=required` (set by `tools/test`): then a
/// missing server is a failure, not a skip.
pub fn required() -> bool {
    std::env::var("TEST_REAL_SERVERS").is_ok_and(|v| v.trim() == "required")
}

/// Reports a missing server: panics when [`required`], otherwise prints a
/// loud skip line to stderr. Returns `None` for `let ... else { return }`.
pub(crate) fn missing<T>(what: &str, why: &str) -> Option<T> {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if required() {
        panic!(
            "{what} is required (TEST_REAL_SERVERS=required) but not available: {why}. \
             Run tools/test, which installs it."
        );
    }
    // Straight to the process's stderr, past libtest's capture, so that the
    // skip shows in a passing run too.
    let stars = "*".repeat(76);
    let _ = writeln!(
        std::io::stderr(),
        "\n{stars}\nSKIPPED {test}: {what} not available ({why}); run tools/test\n{stars}\n"
    );
    None
}

/// The test kit's directory (`testkit/`, where `mcp_server.py` is).
fn kit_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The repository root (the workspace's `Cargo.toml`, and `target/`).
pub fn repo_root() -> PathBuf {
    kit_dir()
        .parent()
        .expect("testkit/ is a directory of the repository")
        .to_path_buf()
}

/// A unique name for this process and call (`prefix-PID-N`).
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// A port on 127.0.0.1 on which nothing listens right now (bound, then
/// released: a small race, which the starters below survive by retrying).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// The first executable named `name` on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The last `max` bytes of a log file, for failure messages.
fn log_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

// ---------------------------------------------------------------------------
// A child process stopped by PID when dropped
// ---------------------------------------------------------------------------

/// A server process. Dropping it kills the process (SIGKILL to its PID) and
/// reaps it, so a failing test never leaves a server behind.
pub struct ServerProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `cmd` with stderr (and, unless `cmd` already set it, stdout)
    /// appended to `log`.
    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        log: PathBuf,
        pipe_stdout: bool,
    ) -> ServerProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        cmd.stderr(file.try_clone().unwrap());
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(file);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        ServerProcess {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process already exited (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The end of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 4000)
    }

    /// Kills the process by PID and waits for it (bounded).
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.child.kill(); // SIGKILL to self.child.id()
        let started = Instant::now();
        while self.exited().is_none() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.exited().is_none() {
            eprintln!(
                "warning: {} (pid {}) still running 5 s after SIGKILL",
                self.name,
                self.pid()
            );
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------

/// The etcd binary: `TEST_ETCD_BIN`, else `etcd` on `PATH`, else Debian's
/// `/usr/bin/etcd`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TEST_ETCD_BIN") {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "TEST_ETCD_BIN={} is not executable",
                path.display()
            ))
        };
    }
    on_path("etcd")
        .or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| is_executable(p)))
        .ok_or_else(|| "no etcd on PATH nor /usr/bin/etcd (Debian package etcd-server)".into())
}

/// A single-member etcd with its own data directory and ports, killed when dropped.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`, the client URL (gRPC and the v3 JSON gateway).
    pub url: String,
    process: ServerProcess,
    _data: TempDir,
}

impl Etcd {
    /// Starts etcd, or returns `None` after a loud skip (panics instead when
    /// [`required`]). Waits until `GET /health` answers healthy.
    pub async fn start() -> Option<Etcd> {
        let binary = match etcd_binary() {
            Ok(b) => b,
            Err(why) => return missing("etcd", &why),
        };
        let mut last_error = String::new();
        // A port taken between `free_port` and etcd's bind makes etcd exit: try again.
        for _ in 0..3 {
            match Self::try_start(&binary).await {
                Ok(etcd) => return Some(etcd),
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    async fn try_start(binary: &Path) -> Result<Etcd, String> {
        let data = TempDir::new();
        let name = unique("idemproxy-etcd");
        let (client_port, peer_port) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(binary);
        cmd.arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{name}={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &name])
            .args(["--log-level", "warn"])
            .env_remove("ETCDCTL_API")
            .stdin(Stdio::null());
        // etcd reads ETCD_* variables as flags; none from the environment applies.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let log = data.path().join("etcd.log");
        let mut process = ServerProcess::spawn("etcd", cmd, log, false);
        let started = Instant::now();
        let http = client();
        loop {
            if let Some(status) = process.exited() {
                return Err(format!("etcd exited ({status}):\n{}", process.log_tail()));
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "etcd not healthy after {START_TIMEOUT:?}:\n{}",
                    process.log_tail()
                ));
            }
            let health = http
                .get(format!("{url}/health"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if let Ok(resp) = health {
                let body = resp.text().await.unwrap_or_default();
                if body.contains("\"true\"") {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Etcd {
            url,
            process,
            _data: data,
        })
    }

    /// The client URL, for `--upstream`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The etcd process.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `POST path` with a JSON body straight to etcd (not through the proxy).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post_json(&format!("{}{path}", self.url), body).await
    }

    /// The remaining TTL of a lease, asked straight from etcd; -1 when the
    /// lease does not exist (any more).
    pub async fn lease_ttl(&self, id: &str) -> i64 {
        let (status, doc) = self
            .post("/v3/lease/timetolive", &serde_json::json!({"ID": id}))
            .await;
        assert_eq!(status, 200, "timetolive: {doc}");
        json_i64(&doc["TTL"]).unwrap_or_else(|| panic!("timetolive without TTL: {doc}"))
    }
}

/// `POST url` with a JSON body; returns the status and the body as JSON
/// (`Value::Null` for an empty body, a string for a body that is not JSON).
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let (status, _, doc) = post_json_with_headers(url, body).await;
    (status, doc)
}

/// [`post_json`], with the answer's headers too.
pub async fn post_json_with_headers(url: &str, body: &Value) -> (u16, http::HeaderMap, Value) {
    let resp = within(
        &format!("POST {url}"),
        client()
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send(),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = within("response body", resp.text())
        .await
        .unwrap_or_default();
    (status, headers, parse_lenient(&text))
}

/// The text as JSON; `Null` when blank, a JSON string when not JSON.
pub fn parse_lenient(text: &str) -> Value {
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// An int64 as etcd's JSON gateway writes it: a string of digits (or a number).
pub fn json_i64(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The official MCP Python SDK
// ---------------------------------------------------------------------------

/// The venv that `tools/test` creates.
pub fn venv_python() -> PathBuf {
    repo_root().join("target/real-servers/venv/bin/python")
}

/// A python that can import the MCP SDK and uvicorn: `TEST_MCP_PYTHON`,
/// else the venv of `tools/test`. Checked once per test binary.
pub fn mcp_python() -> Result<PathBuf, String> {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let python = std::env::var_os("TEST_MCP_PYTHON")
                .map(PathBuf::from)
                .unwrap_or_else(venv_python);
            if !python.exists() {
                return Err(format!("no python at {}", python.display()));
            }
            let out = Command::new(&python)
                .args([
                    "-c",
                    "import importlib.metadata as m, mcp, uvicorn, starlette; print(m.version('mcp'))",
                ])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run {}: {e}", python.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} cannot import mcp/uvicorn/starlette: {}",
                    python.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(python)
        })
        .clone()
}

/// The MCP server script, `testkit/mcp_server.py`.
pub fn mcp_server_script() -> PathBuf {
    kit_dir().join("mcp_server.py")
}

/// `testkit/mcp_server.py` (the official SDK's
/// `StreamableHTTPSessionManager` under uvicorn) on its own port, killed
/// when dropped.
pub struct McpServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The SDK's `session_idle_timeout`.
    pub idle_timeout: Duration,
    process: ServerProcess,
    _dir: TempDir,
}

/// What `GET /stats` of the MCP server says.
#[derive(Debug, Clone)]
pub struct McpStats {
    /// Executions of the `record` tool per call_id.
    pub runs: std::collections::BTreeMap<String, u64>,
    /// `ping` requests the server answered.
    pub pings: u64,
    /// Sessions the SDK still holds.
    pub sessions: u64,
}

impl McpServer {
    /// Starts the server with the given idle timeout, or returns `None` after
    /// a loud skip (panics instead when [`required`]).
    pub async fn start(idle_timeout: Duration) -> Option<McpServer> {
        let python = match mcp_python() {
            Ok(p) => p,
            Err(why) => return missing("the MCP Python SDK", &why),
        };
        let dir = TempDir::new();
        let mut cmd = Command::new(&python);
        cmd.arg(mcp_server_script())
            .arg("0")
            .arg(format!("{}", idle_timeout.as_secs_f64()))
            .arg("--watch-stdin")
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // The server exits when this pipe closes, should the test process die.
            .stdin(Stdio::piped());
        let log = dir.path().join("mcp_server.log");
        let mut process = ServerProcess::spawn("mcp_server.py", cmd, log, true);

        // The script prints `LISTENING <port>` once uvicorn serves; a thread
        // reads stdout (and keeps draining it).
        let port = Arc::new(Mutex::new(None::<u16>));
        let stdout = process.child.stdout.take().expect("piped stdout");
        let seen = port.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Some(p) = line.trim().strip_prefix("LISTENING ") {
                    *seen.lock().unwrap() = p.parse().ok();
                }
                line.clear();
            }
            let _ = reader.read_to_end(&mut Vec::new());
        });
        let started = Instant::now();
        let port = loop {
            if let Some(p) = *port.lock().unwrap() {
                break p;
            }
            if let Some(status) = process.exited() {
                panic!("mcp_server.py exited ({status}):\n{}", process.log_tail());
            }
            if started.elapsed() > START_TIMEOUT {
                panic!(
                    "mcp_server.py not listening after {START_TIMEOUT:?}:\n{}",
                    process.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let server = McpServer {
            url: format!("http://127.0.0.1:{port}"),
            idle_timeout,
            process,
            _dir: dir,
        };
        server.stats().await; // answers
        Some(server)
    }

    /// The base URL, for `--upstream` (the MCP endpoint is `/mcp`).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The server process.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `GET /stats`, straight from the server.
    pub async fn stats(&self) -> McpStats {
        let url = format!("{}/stats", self.url);
        let resp = within("GET /stats", client().get(&url).send())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status(), 200, "GET /stats");
        let text = within("stats body", resp.text()).await.expect("stats body");
        let doc: Value = serde_json::from_str(&text).expect("stats JSON");
        McpStats {
            runs: doc["runs"]
                .as_object()
                .expect("runs")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
                .collect(),
            pings: doc["pings"].as_u64().expect("pings"),
            sessions: doc["sessions"].as_u64().expect("sessions"),
        }
    }
}

// ---------------------------------------------------------------------------
// Small encoders
// ---------------------------------------------------------------------------

/// Standard base64 with padding (etcd's JSON gateway carries keys and values so).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
