//! The `idemproxy` binary as a child process: a clean command for it, a
//! started proxy whose ports are read from its log, and a bounded run.
//!
//! ```no_run
//! use testkit::{idemproxy_command, run_bounded, spawn_binary};
//!
//! # async fn example() {
//! let out = run_bounded(idemproxy_command().arg("--help"));
//! assert!(out.status.success());
//! let mut cmd = idemproxy_command();
//! cmd.env("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")
//!     .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
//!     .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0");
//! let proxy = spawn_binary(cmd).await;
//! # drop(proxy);
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wait::{WAIT, within};

/// The `idemproxy` binary started by [`spawn_binary`], killed when dropped.
pub struct SpawnedBinary {
    /// The child process.
    pub child: tokio::process::Child,
    /// Its process id.
    pub pid: u32,
    /// Where its traffic listener is bound.
    pub listen: SocketAddr,
    /// Where its admin listener is bound.
    pub admin: SocketAddr,
}

/// Starts `cmd` (from [`idemproxy_command`], with `IDEMPROXY_LISTEN` and
/// `IDEMPROXY_ADMIN_LISTEN` on port 0) with JSON logs on a pipe, reads the
/// bound addresses from its "idemproxy started" log line (the binary prints
/// no port otherwise), and keeps draining its stdout so it never blocks.
pub async fn spawn_binary(mut cmd: std::process::Command) -> SpawnedBinary {
    use tokio::io::{AsyncBufReadExt, BufReader};
    cmd.env("IDEMPROXY_LOG_FORMAT", "json")
        .env("IDEMPROXY_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .expect("the idemproxy binary starts");
    let pid = child.id().expect("a pid");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (listen, admin) = within("the 'idemproxy started' log line", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("stdout closed");
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["message"] == "idemproxy started" {
                let addr = |key: &str| -> SocketAddr {
                    event[key].as_str().expect(key).parse().expect(key)
                };
                return (addr("listen"), addr("admin"));
            }
        }
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    SpawnedBinary {
        child,
        pid,
        listen,
        admin,
    }
}

/// The `idemproxy` binary that cargo built for the running test:
/// `CARGO_BIN_EXE_idemproxy`, which cargo sets when it runs an integration
/// test (at run time since cargo 1.94; this crate is compiled without it),
/// else `idemproxy` next to the test binary's `deps/` directory, where cargo
/// puts it.
pub fn idemproxy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_idemproxy") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    let path = profile_dir.join(format!("idemproxy{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "no idemproxy binary at {} (run the tests with cargo test)",
        path.display()
    );
    path
}

/// A command running [`idemproxy_binary`], with every inherited `IDEMPROXY_*`
/// (and `RUST_LOG`) variable removed so that only what the test sets applies.
pub fn idemproxy_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(idemproxy_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IDEMPROXY_") || name == "RUST_LOG" {
            cmd.env_remove(name);
        }
    }
    cmd.stdin(std::process::Stdio::null());
    cmd
}

/// Runs `cmd` to completion with captured output; kills it and panics if it
/// is still running after [`WAIT`] (e.g. a bad value was accepted and the
/// proxy started).
pub fn run_bounded(cmd: &mut std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idemproxy");
    let started = tokio::time::Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "{cmd:?} still running after {WAIT:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("collect output")
}
