//! The `idemproxy` binary: reads the configuration, starts the proxy, and
//! drains gracefully on SIGTERM or SIGINT.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::process::ExitCode;

use idemproxy::config::{Args, Config};

/// mimalloc: a request allocates and frees many small blocks (headers, bodies,
/// futures); see the commit that added it for the measured difference.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::from_env();
    if args.env_reference {
        print!("{}", idemproxy::config::reference::markdown());
        return ExitCode::SUCCESS;
    }
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
    let mut builder = if config.process.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.process.workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idemproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    idemproxy::telemetry::init(config.process.log.as_deref(), config.process.log_format);
    runtime.block_on(async move {
        // Listened to before the listeners are bound: a SIGTERM that arrives
        // while they are (a pod deleted as it starts) is kept, and the proxy
        // drains as soon as it has started, instead of dying at once.
        let shutdown = match shutdown_signal() {
            Ok(signal) => signal,
            Err(e) => {
                tracing::error!(error = %e, "idemproxy cannot listen for SIGTERM");
                eprintln!(
                    "idemproxy: cannot install the SIGTERM/SIGINT handler, so it could not drain on shutdown: {e}"
                );
                return ExitCode::FAILURE;
            }
        };
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
        shutdown.await;
        running.shutdown();
        running.wait().await;
        ExitCode::SUCCESS
    })
}

/// Starts listening for SIGTERM and SIGINT at once (not when first polled);
/// the future resolves on the first of them, including one that arrived
/// before it was polled.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
