//! The sluice binary: read the configuration, start logging, bind, serve until a signal.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice::{AppState, Config};
use tracing_subscriber::EnvFilter;

/// mimalloc: with many streams starting and ending, glibc's allocator let RSS creep up
/// (see the soak in the README); mimalloc returns freed memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
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
    match config.default_upstream() {
        Some((base, _)) => tracing::info!(upstream = base, "default upstream configured"),
        None => tracing::info!(
            "no upstream configured (set OPENAI_API_KEY or OPENAI_BASE_URL): serving the built-in mock model"
        ),
    }
    let bound = listener.local_addr().unwrap_or(config.addr);
    tracing::info!(
        "sluice listening on http://{bound} (models: {})",
        state.routes.model_names().join(", ")
    );

    let grace = Duration::from_secs(config.shutdown_grace_s);
    if let Err(e) = sluice::serve(listener, state, shutdown_signal(), grace).await {
        eprintln!("sluice: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn init_tracing(filter: &str) -> Result<(), String> {
    let builder = tracing_subscriber::fmt();
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
