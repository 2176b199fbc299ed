//! The sluice binary: read the configuration, start logging, bind, serve until a signal.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice::{AppState, Config};
use tracing_subscriber::EnvFilter;

/// mimalloc: with many streams starting and ending, glibc's allocator let RSS creep up
/// (see the soak in docs/src/measured.md); mimalloc returns freed memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc gives freed memory back to the system only after a delay, and only when some
/// thread allocates again: after a burst, an idle sluice kept it (RSS 80 → 163 MiB for
/// good after eight 8 MiB replies). With no delay it goes back at once. mimalloc reads the
/// option from the environment when the process loads, so sluice sets it and starts itself
/// again, once; an operator's own setting is kept.
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";

fn main() -> ExitCode {
    #[cfg(unix)]
    if std::env::var_os(PURGE_DELAY).is_none()
        && let Ok(me) = std::env::current_exe()
    {
        use std::os::unix::process::CommandExt as _;
        let error = std::process::Command::new(me)
            .args(std::env::args_os().skip(1))
            .env(PURGE_DELAY, "0")
            .exec();
        // Not replaced: run as we are.
        eprintln!("sluice: could not restart with {PURGE_DELAY}=0 ({error}); running as is");
    }
    sluice::server::reserve_descriptors();
    run()
}

#[tokio::main]
async fn run() -> ExitCode {
    // A missing .env is normal; a broken one is not.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("sluice: .env: {e}");
        return ExitCode::from(2);
    }
    let config = Config::parse();
    if let Err(e) = init_tracing(&config.log) {
        eprintln!("sluice: SLUICE_LOG: {e}");
        return ExitCode::from(2);
    }
    let state = match AppState::build(&config) {
        Ok(state) => state,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("sluice: SLUICE_ADDR: cannot listen on {}: {e}", config.addr);
            return ExitCode::from(2);
        }
    };
    if let Some((base, _)) = config.default_upstream() {
        let upstream = sluice::backend::openai::masked_url(base);
        tracing::info!(upstream = %upstream, "default upstream configured");
    }
    let default_model = state.routes.default_model().to_owned();
    if default_model == "mock" {
        tracing::info!(
            "no local model and no upstream (set OPENAI_BASE_URL, or fetch the local model): serving the built-in mock model"
        );
    } else {
        tracing::info!(model = %default_model, "the chat page and requests without a model use {default_model}");
    }
    // SIGHUP reloads the TOML config (`serve` listens for it); taken from here on, so one
    // sent as soon as sluice says it listens does not end the process.
    #[cfg(unix)]
    let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let bound = listener.local_addr().unwrap_or(config.addr);
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(
        "sluice listening on {scheme}://{bound} (models: {})",
        state.routes.model_names().join(", ")
    );

    let grace = Duration::from_secs(config.shutdown_grace_s);
    let metrics = state.metrics.clone();
    if let Some(endpoint) = &config.otel_endpoint {
        tracing::info!(endpoint = %endpoint, protocol = %config.otel_protocol, "OpenTelemetry: traces and metrics go to the collector");
    }
    let served = sluice::serve(listener, state, shutdown_signal(), grace).await;
    // What OpenTelemetry still holds goes out before the process ends.
    metrics.shutdown();
    if let Err(e) = served {
        eprintln!("sluice: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Logs go to stderr, coloured only when it is a terminal.
fn init_tracing(filter: &str) -> Result<(), String> {
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if filter == "json" {
        builder
            .json()
            .with_env_filter(EnvFilter::new("info"))
            .init();
    } else {
        let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        builder.with_env_filter(filter).init();
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
