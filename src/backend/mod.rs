//! Backends behind one trait, and the routing table from model name to backend.
//!
//! A backend turns a [`ChatRequest`] into a stream of [`Delta`]s. It knows nothing of HTTP
//! or SSE; dropping its stream must stop its work (an upstream request closes its
//! connection, a generator stops at its next token).

#[cfg(feature = "local")]
pub mod local;
pub mod mock;
pub mod openai;
pub mod sse;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::Stream;
use serde::Serialize;
use serde_json::{Map, Value};

/// The longest model name sluice takes from a client or an upstream's list.
pub const MAX_MODEL_NAME: usize = 256;

/// One chat message as sluice needs it: the role and the text of its content.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A validated chat request, routed: `model` is the name the backend knows.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// The prompt's size in o200k tokens, counted once by the pipeline.
    pub prompt_tokens: u32,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    /// The client's request body, for backends that forward it (unknown fields, tools,
    /// structured content parts pass through unchanged).
    pub body: Map<String, Value>,
    /// sluice's id for the request, sent upstream as `x-request-id`.
    pub request_id: String,
}

impl ChatRequest {
    /// The text of the last user message: what the mock model answers to.
    pub fn last_user_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// One step of a generated reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Generated text.
    Text(String),
    /// Delta fields other than `role` and `content` (`tool_calls`, `refusal`, reasoning),
    /// relayed to OpenAI clients unchanged.
    Fields(Map<String, Value>),
    /// The reply is complete: `stop`, `length`, `tool_calls`, `content_filter`.
    Finish(String),
    /// Token counts as the backend reports them.
    Usage(Usage),
    /// Waiting for the model, with this many requests ahead: shown to the client as a
    /// keep-alive comment.
    Queued(usize),
}

/// Why a backend could not produce (the rest of) a reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The upstream answered the request with an error status.
    #[error("upstream answered {status}: {message}")]
    Rejected {
        status: u16,
        message: String,
        param: Option<String>,
        code: Option<String>,
    },
    #[error("upstream rate limited: {message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    /// No connection could be made.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The stream broke off: connection lost, an in-band error object, no finish.
    #[error("upstream stream interrupted: {0}")]
    Interrupted(String),
    /// The upstream sent something that is not a chat completion chunk.
    #[error("upstream sent malformed data: {0}")]
    Protocol(String),
    /// Nothing came within a limit: "first token", "chunk".
    #[error("no {0} within the limit")]
    Timeout(&'static str),
    /// The backend's queue is full.
    #[error("the model is busy: {message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    /// A non-streamed reply grew past `SLUICE_MAX_REPLY_BYTES`.
    #[error(
        "the reply is larger than the limit of {0} bytes for a non-streamed reply; stream it instead"
    )]
    TooLarge(usize),
    /// sluice is shutting down and its grace period is over.
    #[error("the server is restarting")]
    ShuttingDown,
}

impl BackendError {
    /// Why another upstream might do better, when one might: the upstream could not be
    /// reached, failed (5xx), was at its limit (429, a full queue), or sent no first token.
    pub fn fallback_reason(&self) -> Option<&'static str> {
        match self {
            BackendError::Unreachable(_) => Some("unreachable"),
            BackendError::Timeout("connection") => Some("connect_timeout"),
            BackendError::Timeout("first token") => Some("first_token_timeout"),
            BackendError::Rejected { status, .. } if *status >= 500 => Some("server_error"),
            BackendError::RateLimited { .. } => Some("rate_limited"),
            BackendError::Overloaded { .. } => Some("overloaded"),
            _ => None,
        }
    }
}

/// What a readiness probe found of one upstream.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// The base URL, credentials masked.
    pub url: String,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<Delta, BackendError>> + Send>>;

pub trait Backend: Send + Sync {
    /// Starts generating. The stream is lazy: no work happens until it is first polled.
    fn stream(&self, request: ChatRequest) -> DeltaStream;

    /// The base URL of the upstream this backend calls, if it calls one, with any
    /// credentials in it masked.
    fn upstream(&self) -> Option<&str> {
        None
    }

    /// Whether the upstream answers at all, for a backend that calls one.
    fn probe(&self) -> Option<futures::future::BoxFuture<'static, Probe>> {
        None
    }

    /// The upstream's own model list, for a backend that has one to ask.
    fn models(&self) -> Option<futures::future::BoxFuture<'_, Result<Vec<String>, String>>> {
        None
    }
}

/// A backend and the name it knows the model by.
#[derive(Clone)]
pub struct Target {
    pub backend: Arc<dyn Backend>,
    pub model: String,
    /// From the configuration: its model name is a fit metric label. Otherwise the name is
    /// the client's, and the route's label stands for it.
    pub configured: bool,
}

/// Where a model name goes: a first target, then its fallbacks, tried in order while
/// nothing has been sent to the client.
#[derive(Clone)]
pub struct Route {
    pub targets: Arc<[Target]>,
}

impl Route {
    pub fn to(backend: Arc<dyn Backend>, model: &str) -> Self {
        Route {
            targets: Arc::new([Target {
                backend,
                model: model.to_owned(),
                configured: false,
            }]),
        }
    }
}

/// How often the default upstream's model list is fetched again.
const CATALOGUE_EVERY: Duration = Duration::from_secs(300);

/// The routing table: configured names first, then the built-in mock models, then anything
/// else to the default upstream when one is configured.
#[derive(Clone)]
pub struct Routes {
    named: Arc<HashMap<String, Route>>,
    mock: Arc<dyn Backend>,
    default_upstream: Option<Arc<dyn Backend>>,
    default_model: Arc<str>,
    /// The default upstream's own model list, as last fetched.
    catalogue: Arc<RwLock<Arc<HashSet<String>>>>,
    /// The last readiness probe of every upstream: one probe at a time, shared by every
    /// caller, reused for a few seconds.
    probes: Arc<Mutex<Option<(Instant, SharedProbes)>>>,
}

type SharedProbes = futures::future::Shared<futures::future::BoxFuture<'static, Arc<Vec<Probe>>>>;

/// How long one readiness probe of the upstreams serves.
const PROBES_SERVE: Duration = Duration::from_secs(5);

impl Routes {
    pub fn new(
        named: HashMap<String, Route>,
        mock: Arc<dyn Backend>,
        default_upstream: Option<Arc<dyn Backend>>,
        default_model: String,
    ) -> Self {
        Routes {
            named: Arc::new(named),
            mock,
            default_upstream,
            default_model: default_model.into(),
            catalogue: Arc::default(),
            probes: Arc::default(),
        }
    }

    /// Every upstream's readiness, probed at most once every few seconds however often
    /// it is asked for.
    pub async fn probe(&self) -> Arc<Vec<Probe>> {
        let shared = {
            let mut cached = self.probes.lock().unwrap_or_else(|e| e.into_inner());
            match &*cached {
                Some((at, probes)) if at.elapsed() < PROBES_SERVE => probes.clone(),
                _ => {
                    let mut seen = HashSet::new();
                    let probes: Vec<_> = self
                        .backends()
                        .filter(|b| b.upstream().is_some_and(|url| seen.insert(url.to_owned())))
                        .filter_map(|b| b.probe())
                        .collect();
                    let all: futures::future::BoxFuture<'static, Arc<Vec<Probe>>> =
                        Box::pin(async move { Arc::new(futures::future::join_all(probes).await) });
                    let shared = futures::FutureExt::shared(all);
                    *cached = Some((Instant::now(), shared.clone()));
                    shared
                }
            }
        };
        shared.await
    }

    fn backends(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.named
            .values()
            .flat_map(|r| r.targets.iter().map(|t| &t.backend))
            .chain(self.default_upstream.iter())
    }

    /// Fetches the default upstream's model list; a failure keeps the last good one.
    pub async fn refresh_catalogue(&self) {
        let Some(fetch) = self.default_upstream.as_ref().and_then(|b| b.models()) else {
            return;
        };
        match fetch.await {
            Ok(names) => {
                let names: HashSet<String> = names.into_iter().collect();
                tracing::debug!(models = names.len(), "the default upstream's model list");
                *self.catalogue.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the default upstream's models; keeping the last list")
            }
        }
    }

    /// The default upstream's models, as last fetched.
    pub fn catalogue(&self) -> Arc<HashSet<String>> {
        self.catalogue
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keeps the catalogue fresh until `stop`.
    pub async fn maintain(self, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(CATALOGUE_EVERY);
        every.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => self.refresh_catalogue().await,
            }
        }
    }

    pub fn resolve(&self, model: &str) -> Option<Route> {
        if let Some(route) = self.named.get(model) {
            return Some(route.clone());
        }
        if mock::Mode::from_model(model).is_some() {
            return Some(Route::to(self.mock.clone(), model));
        }
        self.default_upstream
            .as_ref()
            .map(|backend| Route::to(backend.clone(), model))
    }

    /// Every name sluice routes by itself, the default first, then sorted (the default
    /// upstream takes any other name).
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.named.keys().cloned().collect();
        names.extend(mock::Mode::MODEL_NAMES.iter().map(|s| (*s).to_owned()));
        names.sort();
        names.dedup();
        names.sort_by_key(|name| **name != *self.default_model);
        names
    }

    /// The model of a request that names none: the local model when it is loaded.
    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    pub fn has_default_upstream(&self) -> bool {
        self.default_upstream.is_some()
    }

    /// The name a model's metrics are labelled with: its own when sluice routes it by
    /// itself, else `other` (the default upstream takes any name; labels must stay few).
    pub fn label(&self, model: &str) -> String {
        let known = self.named.contains_key(model)
            || mock::Mode::from_model(model).is_some()
            || model == &*self.default_model
            || self.catalogue().contains(model);
        if known { model } else { "other" }.to_owned()
    }

    /// Every upstream base URL sluice may call (credentials masked), each once, sorted.
    pub fn upstreams(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .backends()
            .filter_map(|b| b.upstream().map(str::to_owned))
            .collect();
        urls.sort();
        urls.dedup();
        urls
    }
}
