//! sluice: an LLM token-streaming gateway.
//!
//! The request path, one direction, each stage a module that knows only those below it:
//! `server` (connections: HTTP/1.1 and HTTP/2, limits, shutdown) → `app` (the layers, in
//! order) → `routes/` (one file per HTTP surface) → `dialect/` (one folder per wire format:
//! its request parsed into the canonical request, its pure encoder, its errors) →
//! `pipeline` (the one chat path: resolve, admit, count, reserve, start) → `dispatch/` (model
//! table, failover with typed deadlines) → `backend/` (an OpenAI-compatible upstream, the
//! mock, or the local model on its own thread: canonical events, [`backend::Delta`]) →
//! `relay/` (first-event peek, the one encode loop that runs a dialect's encoder and meters
//! it) → `streams/` (direct,
//! or a resumable stream's event log that connections attach to) → SSE to the client.
//! When the client of a direct stream leaves, the response body is dropped, and with it the
//! whole chain down to the upstream's connection (or the local model's channel); a
//! resumable stream's producer belongs to the stream registry, which drops it on cancel or
//! when nobody has come back within the grace period.
//!
//! Below them: `pivot` (the events every dialect reads a reply into and writes one from),
//! `config`, `prices` (what tokens cost), `tokens`, `prompts`, `wake` (plain data and helpers), `link` (the
//! Redis link, one server or a Cluster, that the shared parts use), `telemetry`
//! (metrics, the per-request log record), `admission` (identity and limits, no HTTP),
//! `ledger` (a record of every request in a database, written off the hot path),
//! `error` (what a client is told), `http` (extractors, rate headers, the observing
//! middleware); `state` is
//! what a request carries, and `startup` the one place that builds it from `Config`.

pub mod admission;
pub mod app;
pub mod backend;
pub mod config;
pub mod dialect;
pub mod dispatch;
pub mod error;
pub mod http;
pub mod ledger;
pub mod link;
pub mod pipeline;
pub mod pivot;
pub mod prices;
pub mod prompts;
pub mod relay;
pub mod routes;
pub mod server;
pub mod startup;
pub mod state;
pub mod streams;
pub mod telemetry;
pub mod tokens;
pub mod wake;

pub use app::app;
pub use config::Config;
pub use server::serve;
pub use state::AppState;
