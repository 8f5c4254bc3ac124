//! idemproxy's test kit: everything the integration tests, the examples and
//! the benchmarks share, in one crate (`publish = false`) instead of copies
//! `#[path]`-included into each test binary.
//!
//! - Scripted upstreams ([`Upstream`]: hyper, HTTP/1.1 and h2c, TLS, "store
//!   then drop", "hang") and raw-socket ones ([`raw_upstream`], exact bytes,
//!   broken peers), with the requests they received ([`Requests`]).
//! - The proxy under test, in-process ([`TestProxy`]) or as the binary
//!   ([`spawn_binary`]), and clients for it ([`client`], [`h2c_client`]).
//! - A throwaway PKI ([`TestPki`]), a [`TempDir`], memory measurement
//!   ([`PeakRss`]).
//! - [`backend`]: the example session backend as a library (the
//!   `session_backend` example is its command line).
//! - [`real_servers`]: etcd and the official MCP Python SDK, started on their
//!   own ports; [`azurite`]: the Azure Storage emulator and SAS tokens for it;
//!   [`pouchdb`]: PouchDB Server (CouchDB's HTTP API); [`fault_proxy`]: a
//!   fault-injecting proxy to put in front of them (store then drop, 503,
//!   reset).
//!
//! Everything binds `127.0.0.1:0`; everything that waits is bounded by
//! [`within`], so a broken proxy fails a test instead of hanging it. The
//! modules' items are re-exported here, except those of [`backend`],
//! [`real_servers`], [`azurite`], [`pouchdb`] and [`fault_proxy`], which keep
//! their module path.
//!
//! ```no_run
//! use testkit::*;
//!
//! # async fn example() {
//! let upstream = Upstream::start(|_req| async { response(200, "hello") }).await;
//! let proxy = TestProxy::start(&upstream.url(), &[]).await;
//! let resp = client().get(proxy.url("/x")).send().await.unwrap();
//! assert_eq!(resp.status(), 200);
//! assert_eq!(upstream.requests.last().uri, "/x");
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod azurite;
pub mod backend;
mod body;
pub mod fault_proxy;
mod memory;
mod pki;
pub mod pouchdb;
mod process;
mod proxy;
mod raw;
pub mod real_servers;
mod summary;
mod temp;
mod upstream;
mod wait;

pub use body::*;
pub use memory::*;
pub use pki::*;
pub use process::*;
pub use proxy::*;
pub use raw::*;
pub use summary::*;
pub use temp::*;
pub use upstream::*;
pub use wait::*;
