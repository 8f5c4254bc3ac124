//! The example session backend as a program: a small, real HTTP/1.1 server
//! with sessions, entries keyed by uuid, actions and switchable fault
//! injection, standing for the service idemproxy sits in front of. Its code,
//! API and flags are in `testkit/src/backend.rs` ([`testkit::backend`]).
//!
//! ```text
//! cargo run --example session_backend -- --listen 127.0.0.1:8080 --session-ttl 30s
//! cargo run --example session_backend -- --listen 127.0.0.1:0 --store-then-drop-rate 0.3 --seed 7
//! cargo run --example session_backend -- --help
//! ```

use std::process::ExitCode;

use clap::Parser as _;
use testkit::backend::{Options, run};

#[tokio::main]
async fn main() -> ExitCode {
    run(Options::parse()).await
}
