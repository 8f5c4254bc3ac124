//! The `idemproxy` binary: reads the configuration, starts the proxy, and
//! drains gracefully on SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use idemproxy::config::{Args, Config};

/// mimalloc: a request allocates and frees many small blocks (headers, bodies,
/// futures); see the commit that added it for the measured difference.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.render());
        return ExitCode::SUCCESS;
    }
    // One worker: a current-thread runtime runs the client and upstream
    // connection tasks of a request on one thread without cross-thread wakeups.
    let mut builder = if config.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idemproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    idemproxy::telemetry::init(config.log.as_deref(), config.log_format);
    runtime.block_on(async move {
        let running = match idemproxy::app::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "idemproxy cannot start");
                eprintln!("idemproxy: {e}");
                // Unusable TLS material is a configuration error, like a bad value.
                return match e {
                    idemproxy::app::StartError::Client(_) => ExitCode::from(2),
                    _ => ExitCode::FAILURE,
                };
            }
        };
        shutdown_signal().await;
        running.shutdown();
        running.wait().await;
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
