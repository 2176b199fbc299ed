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
pub mod pipeline;
pub mod prompts;
pub mod relay;
pub mod routes;
pub mod serve;
pub mod state;
pub mod tokens;

pub use app::app;
pub use config::Config;
pub use serve::serve;
pub use state::AppState;
