//! sluice: an LLM token-streaming gateway. A request goes
//! route (`routes/`) → admission → backend (`backend/`: an OpenAI-compatible upstream or the
//! mock model) → relay (`relay.rs`: deltas to SSE), and back to the client chunk by chunk.
//! When the client leaves, the response body is dropped, and with it the whole chain down
//! to the upstream's connection.

pub mod admission;
pub mod app;
pub mod backend;
pub mod config;
pub mod error;
pub mod metrics;
pub mod prompts;
pub mod relay;
pub mod routes;
pub mod state;
pub mod tokens;

use std::future::Future;
use std::net::SocketAddr;

pub use app::app;
pub use config::Config;
pub use state::AppState;

/// Serves `app(state)` on `listener` until `shutdown` completes; open streams may finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    #[expect(
        clippy::disallowed_methods,
        reason = "the one background task: admission's upkeep, ends with serve"
    )]
    tokio::spawn(state.admission.clone().maintain(stop.clone()));
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    stop.cancel();
    served
}
