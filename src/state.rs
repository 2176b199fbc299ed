//! `AppState`: everything a request needs, built once at start-up (`startup.rs`) and
//! cloned per request: `Arc`s and `Copy` values only.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::dispatch::{Dispatcher, Routes};
use crate::http::BodyTimeout;
use crate::prompts::Prompts;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub admission: Arc<Admission>,
    /// Model name → backends.
    pub routes: Routes,
    /// Failover and its limits.
    pub dispatcher: Dispatcher,
    pub prompts: Prompts,
    pub metrics: Metrics,
    /// Counts prompts' tokens without letting a large one hold an async worker.
    pub tokens: crate::tokens::Counter,
    /// Between keep-alive comments, and how long the first event is waited for before 200.
    pub keep_alive: Duration,
    /// Limit on reading a request's body once its headers are in.
    pub body_timeout: Duration,
    /// Cap on a non-streamed reply.
    pub max_reply_bytes: usize,
    /// Origins whose browsers may call the API; none: same origin only.
    pub cors_origins: Arc<[String]>,
    /// Bearer token `/metrics` and `/readyz` require, when set.
    pub metrics_token: Option<Arc<str>>,
    /// How connections are served: limits, TLS.
    pub server: ServerSettings,
    /// Resumable streams: their logs, readers and producers.
    pub streams: crate::streams::Streams,
    /// Cancelled when the shutdown grace period is over: open streams end, saying so.
    pub closing: CancellationToken,
    /// What the state was built from: a reload reads the TOML file again with it.
    pub config: Arc<crate::config::Config>,
    /// The TOML file read at start, when there was one: what a reload reads.
    pub config_file: Option<std::path::PathBuf>,
    /// The file's stamp when it was read at start.
    pub config_stamp: Option<crate::config::Stamp>,
    /// The record of every request, when `SLUICE_DATABASE_URL` is not `off`.
    pub ledger: Option<crate::ledger::Ledger>,
    /// `SLUICE_ADMIN_KEY`: the `/admin` routes exist only with it.
    pub admin_key: Option<Arc<str>>,
    /// What each model's tokens cost.
    pub prices: crate::prices::PriceTable,
    /// The built-in mock model, which configured routes may name.
    pub mock: Arc<dyn crate::backend::Backend>,
    /// Held while the database's keys are applied: one view at a time, in order.
    pub keys_applied: Arc<tokio::sync::Mutex<()>>,
}

/// How connections are served, from the configuration.
#[derive(Clone)]
pub struct ServerSettings {
    /// Limit on a request's head, and on an idle connection between requests.
    pub header_timeout: Duration,
    /// A client that takes nothing of its stream for this long is dropped.
    pub slow_client_timeout: Duration,
    /// Open client connections at most.
    pub max_connections: usize,
    /// Open client connections from one address (an IPv6 /64) at most.
    pub max_connections_per_ip: usize,
    /// Addresses exempt from the per-address cap.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// The longest a response may stream, whether or not its client lets bytes out.
    pub total_timeout: Duration,
    /// HTTPS with ALPN (`h2`, `http/1.1`) when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl FromRef<AppState> for Arc<Admission> {
    fn from_ref(state: &AppState) -> Self {
        state.admission.clone()
    }
}

impl FromRef<AppState> for BodyTimeout {
    fn from_ref(state: &AppState) -> Self {
        BodyTimeout(state.body_timeout)
    }
}

impl FromRef<AppState> for crate::tokens::Counter {
    fn from_ref(state: &AppState) -> Self {
        state.tokens.clone()
    }
}
