//! The proxy under test, started in-process from command-line flags, the
//! clients that talk to it, and readers of its admin port.
//!
//! ```no_run
//! use testkit::{TestProxy, client, metric_value};
//!
//! # async fn example(upstream_url: &str) {
//! let proxy = TestProxy::start(upstream_url, &[]).await;
//! let resp = client().get(proxy.url("/x")).send().await.unwrap();
//! let sessions = metric_value(&proxy.metrics().await, "idemproxy_sessions");
//! # drop((resp, sessions));
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use idemproxy::app::Running;
use idemproxy::config::{Args, Config};
use serde_json::Value;

use crate::wait::within;

/// Builds a [`Config`] as the binary would from
/// `idemproxy --upstream URL --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 EXTRA...`,
/// with no variables: the process environment (a developer's `IDEMPROXY_*`)
/// is never read.
pub fn config(upstream: &str, extra: &[&str]) -> Config {
    let mut argv = vec![
        "idemproxy",
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    let args = Args::try_parse_from_strings(&argv, &HashMap::new())
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    Config::from_args(&args).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// A proxy started in-process with [`idemproxy::app::start`]. Shut down
/// (without waiting) when dropped.
pub struct TestProxy {
    /// The traffic listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin_addr: SocketAddr,
    /// The loopback admin control listener, if configured.
    pub control_addr: Option<SocketAddr>,
    running: Option<Running>,
}

impl TestProxy {
    /// Starts a proxy in front of `upstream` with extra command-line flags.
    pub async fn start(upstream: &str, extra: &[&str]) -> TestProxy {
        Self::from_config(config(upstream, extra)).await
    }

    /// Starts a proxy from a ready configuration.
    pub async fn from_config(config: Config) -> TestProxy {
        let running = idemproxy::app::start(config)
            .await
            .expect("the proxy starts");
        TestProxy {
            addr: running.listen_addr,
            admin_addr: running.admin_addr,
            control_addr: running.control_addr,
            running: Some(running),
        }
    }

    /// `http://<listen addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<admin addr><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// `http://<control addr><path>`; panics without a control listener.
    pub fn control_url(&self, path: &str) -> String {
        let addr = self.control_addr.expect("a control listener");
        format!("http://{addr}{path}")
    }

    /// Starts a graceful shutdown (as SIGTERM does) without waiting.
    pub fn shutdown(&self) {
        if let Some(r) = &self.running {
            r.shutdown();
        }
    }

    /// Shuts down and waits until drained and stopped.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            within("the proxy to stop", r.wait()).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let resp = within(
            "GET /metrics",
            client().get(self.admin_url("/metrics")).send(),
        )
        .await
        .expect("GET /metrics");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("metrics text")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The value of the sample `name_and_labels` (e.g. `foo_total{kind="x"}`)
/// in Prometheus text, if present.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The sum of every sample of metric `name` (all label sets) in Prometheus
/// text; 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labels) => &labels[labels.find('}')? + 1..],
                None => rest,
            };
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// The `sessions` array of the proxy's `GET /sessions` (admin port).
pub async fn admin_sessions(proxy: &TestProxy) -> Vec<Value> {
    let url = proxy.admin_url("/sessions");
    let resp = within("GET /sessions", client().get(&url).send())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), 200, "GET /sessions");
    let text = within("/sessions body", resp.text())
        .await
        .expect("/sessions body");
    let doc: Value = serde_json::from_str(&text).expect("/sessions is JSON");
    doc["sessions"]
        .as_array()
        .expect("a sessions array")
        .clone()
}

/// An HTTP/1.1 client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// An h2c (HTTP/2 with prior knowledge, cleartext) client without proxy.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}
