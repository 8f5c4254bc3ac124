//! idemproxy: a sidecar reverse proxy between AI agents and the backend that
//! stores their sessions. It makes writes idempotent, retries transient
//! failures, verifies `409 Conflict` answers, and keeps sessions alive, for
//! clients that change nothing but their backend URL.
//!
//! The crate is a library of tower layers plus the `idemproxy` binary. The
//! request path: [`server`] accepts connections, [`proxy`] is the edge that
//! rewrites requests and turns errors into responses, and the [`proxy::Stack`]
//! built by [`app::build_stack`] ends in [`upstream::UpstreamService`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let env = std::collections::HashMap::new(); // or idemproxy::config::ProcessEnv
//! let args = idemproxy::config::Args::try_parse_from_strings(["idemproxy", "--upstream", "http://127.0.0.1:8080"], &env)?;
//! let config = idemproxy::config::Config::from_args(&args)?;
//! let running = idemproxy::app::start(config).await?;
//! println!("listening on {}", running.listen_addr);
//! running.shutdown();
//! running.wait().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

/// The boxed error type used by bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod admin;
pub mod app;
pub mod body;
pub mod buffered;
pub mod classify;
pub mod config;
pub mod error;
pub mod extensions;
pub mod idempotency;
pub mod metrics;
pub mod proxy;
pub mod request_id;
pub mod retry;
pub mod routes;
pub mod server;
pub mod service;
pub mod sessions;
pub mod telemetry;
pub mod units;
pub mod upstream;
pub mod verify;
