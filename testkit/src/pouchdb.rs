//! PouchDB Server (npm `pouchdb-server`, CouchDB's HTTP API over PouchDB),
//! started by the tests on its own 127.0.0.1 port and stopped by PID when
//! its guard drops, plus a few direct calls to it (not through the proxy)
//! for checking what it stored.
//!
//! It runs `--in-memory` (no database files) in a fresh temporary directory
//! as its working directory, since it always writes `log.txt` (and later
//! `config.json`) there. `tools/test` installs it (pinned by
//! `tools/real-servers/package-lock.json`) into `target/real-servers/node`.
//!
//! Override: `TEST_POUCHDB_BIN` (path of the `pouchdb-server` executable).
//! `TEST_REAL_SERVERS=required` makes a missing server a failure; otherwise
//! the test is skipped with a loud `SKIPPED` line.
//!
//! What to know about its answers: the `Content-Type` is `text/plain` unless
//! the request has `Accept: application/json` (the body is JSON either way);
//! a GET's `ETag` is Express's weak hash, not the `_rev`; revisions are
//! deterministic (id, content and parent rev), so a create of the same
//! content under the same id gets the same `rev` in any database.
//!
//! ```no_run
//! use testkit::TestProxy;
//! use testkit::pouchdb::PouchDb;
//!
//! # async fn example() {
//! let Some(couch) = PouchDb::start().await else { return };
//! couch.create_db("db").await;
//! let proxy = TestProxy::start(&couch.url(), &["--profile", "couchdb"]).await;
//! // ... PUT proxy.url("/db/doc1"), then:
//! let (status, doc) = couch.get("/db/doc1").await;
//! # drop((proxy, status, doc));
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::Value;

use crate::real_servers::{
    START_TIMEOUT, ServerProcess, free_port, is_executable, missing, parse_lenient, repo_root,
};
use crate::{TempDir, client, within};

/// The `pouchdb-server` executable: `TEST_POUCHDB_BIN`, else
/// `target/real-servers/node/node_modules/.bin/pouchdb-server` (where
/// `tools/test` installs it).
pub fn pouchdb_binary() -> Result<PathBuf, String> {
    let (path, origin) = match std::env::var_os("TEST_POUCHDB_BIN") {
        Some(path) => (PathBuf::from(path), "TEST_POUCHDB_BIN="),
        None => (
            repo_root().join("target/real-servers/node/node_modules/.bin/pouchdb-server"),
            "",
        ),
    };
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(format!(
            "{origin}{} is not an executable (set TEST_POUCHDB_BIN to a pouchdb-server)",
            path.display()
        ))
    }
}

/// A `pouchdb-server --in-memory` on its own port, killed (by PID) when dropped.
pub struct PouchDb {
    /// `http://127.0.0.1:PORT`, for `--upstream`.
    pub url: String,
    process: ServerProcess,
    _dir: TempDir,
}

impl PouchDb {
    /// Starts the server, or returns `None` after a loud skip (panics
    /// instead when [`required`](crate::real_servers::required)). Waits
    /// until `GET /` answers its welcome.
    pub async fn start() -> Option<PouchDb> {
        let binary = match pouchdb_binary() {
            Ok(b) => b,
            Err(why) => return missing("pouchdb-server", &why),
        };
        let mut last_error = String::new();
        // A port taken between `free_port` and its bind makes it exit: try again.
        for _ in 0..3 {
            match Self::try_start(&binary).await {
                Ok(server) => return Some(server),
                Err(e) => last_error = e,
            }
        }
        panic!("pouchdb-server did not start: {last_error}");
    }

    async fn try_start(binary: &Path) -> Result<PouchDb, String> {
        let dir = TempDir::new();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(binary);
        cmd.args(["--in-memory", "--host", "127.0.0.1", "--no-color"])
            .args(["--port", &port.to_string()])
            // log.txt and config.json go here.
            .current_dir(dir.path())
            // Its default port would come from PORT; --port wins anyway.
            .env_remove("PORT")
            .stdin(Stdio::null());
        let log = dir.path().join("pouchdb-server.log");
        let mut process = ServerProcess::spawn("pouchdb-server", cmd, log, false);
        let started = Instant::now();
        let http = client();
        loop {
            if let Some(status) = process.exited() {
                return Err(format!(
                    "pouchdb-server exited ({status}):\n{}",
                    process.log_tail()
                ));
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "pouchdb-server not answering after {START_TIMEOUT:?}:\n{}",
                    process.log_tail()
                ));
            }
            let welcome = http
                .get(format!("{url}/"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if let Ok(resp) = welcome {
                let body = resp.text().await.unwrap_or_default();
                if body.contains("express-pouchdb") {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Ok(PouchDb {
            url,
            process,
            _dir: dir,
        })
    }

    /// The base URL, for `--upstream`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The server process.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `METHOD path` straight to the server, with `Accept: application/json`
    /// and, when given, a JSON body; returns the status and the body as JSON.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut req = client()
            .request(method.clone(), &url)
            .header("accept", "application/json");
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let resp = within(&format!("{method} {url}"), req.send())
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = within("response body", resp.text())
            .await
            .unwrap_or_default();
        (status, parse_lenient(&text))
    }

    /// `GET path` straight to the server.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    /// Creates database `name` (panics unless the server answers 201).
    pub async fn create_db(&self, name: &str) {
        let (status, doc) = self.call("PUT", &format!("/{name}"), None).await;
        assert_eq!(status, 201, "PUT /{name}: {doc}");
    }

    /// Every document of database `db` (`_all_docs?include_docs=true`), in id order.
    pub async fn all_docs(&self, db: &str) -> Vec<Value> {
        let (status, doc) = self
            .get(&format!("/{db}/_all_docs?include_docs=true"))
            .await;
        assert_eq!(status, 200, "GET /{db}/_all_docs: {doc}");
        doc["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("_all_docs without rows: {doc}"))
            .iter()
            .map(|row| row["doc"].clone())
            .collect()
    }
}
