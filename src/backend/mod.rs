//! Backends behind one trait: what a backend is asked ([`ModelRequest`]), what it answers
//! (a stream of [`Delta`]s, the canonical events of a reply), and how it fails
//! ([`BackendError`], with typed waits and fallback reasons).
//!
//! A backend turns a [`ModelRequest`] into a stream of [`Delta`]s. It knows nothing of HTTP
//! or SSE; dropping its stream must stop its work (an upstream request closes its
//! connection, a generator stops at its next token).

mod h1;
#[cfg(feature = "local")]
pub mod local;
pub mod mock;
pub mod openai;
pub mod speaker;
pub mod sse;

pub use crate::pivot::{Delta, Finish, Raw, Signature, Text, ToolCall, Usage};

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use serde_json::{Map, Value};

/// A `type` a client sent, as a message names it: `` `tool_use` ``, or "no type" when it
/// sent none (never Rust's `Some("…")`).
pub fn shown(kind: Option<&str>) -> String {
    match kind {
        Some(kind) => format!("`{}`", kind.chars().take(64).collect::<String>()),
        None => "no type".to_owned(),
    }
}

/// The longest model name sluice takes from a client or an upstream's list.
pub const MAX_MODEL_NAME: usize = 256;

/// One chat message as sluice needs it: the role and the text of its content.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// An f32 option (0.7) as the decimal a client wrote, not the f64 it widens to
/// (0.699999988).
pub fn decimal(v: f32) -> serde_json::Value {
    serde_json::Value::from((f64::from(v) * 1e6).round() / 1e6)
}

/// A validated chat request, routed: `model` is the name the backend knows.
#[derive(Debug, Clone, Default)]
pub struct ModelRequest {
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
    /// `traceparent` (and `tracestate`) of the attempt's span, sent upstream as they are.
    pub trace: Vec<(&'static str, String)>,
    /// The request as the client sent it, in an API other than chat completions: what an
    /// upstream that speaks that API itself receives (and relays back event by event, as
    /// [`Delta::Event`]s).
    pub native: Option<Native>,
    /// Whether the target called speaks the client's own API, so that `native` is sent and
    /// its events relayed as they come: decided once, by dispatch, for the target chosen.
    pub relayed: bool,
    /// What translating the client's request left out (for a target that does not relay
    /// it), beyond the fields the target's API cannot carry.
    pub dropped: crate::pivot::Dropped,
}

/// A request in the client's own API, for an upstream that speaks it.
#[derive(Debug, Clone)]
pub enum Native {
    /// OpenAI's Responses API.
    Responses(Map<String, Value>),
    /// Anthropic's Messages API, with the client's `anthropic-version` and
    /// `anthropic-beta` headers.
    Messages {
        body: Map<String, Value>,
        version: Option<String>,
        beta: Option<String>,
    },
}

impl Native {
    /// Whether an upstream called with `api` takes this request as the client sent it.
    pub fn spoken_by(&self, api: openai::Api) -> bool {
        matches!(
            (self, api),
            (Native::Responses(_), openai::Api::Responses)
                | (Native::Messages { .. }, openai::Api::Messages)
        )
    }
}

/// The request as chat completions take it: the body as the client's dialect wrote it
/// (taken out of `request`), or, when it wrote none (`/api/chat`), written from the
/// canonical messages and options.
pub fn chat_body(request: &mut ModelRequest) -> Map<String, Value> {
    let mut body = std::mem::take(&mut request.body);
    if !body.contains_key("messages") {
        let messages = request
            .messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        body.insert("messages".into(), Value::Array(messages));
        let options = [
            ("max_tokens", request.max_tokens.map(Value::from)),
            ("temperature", request.temperature.map(decimal)),
            ("top_p", request.top_p.map(decimal)),
            ("seed", request.seed.map(Value::from)),
        ];
        for (name, value) in options {
            if let Some(value) = value {
                body.entry(name).or_insert(value);
            }
        }
    }
    body
}

impl ModelRequest {
    /// The text of the last user message: what the mock model answers to.
    pub fn last_user_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str())
    }
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
    /// Connected, but the upstream closed the connection or failed before any answer.
    #[error("upstream gave no answer: {0}")]
    Unanswered(String),
    /// The stream broke off: connection lost, an in-band error object, no finish.
    #[error("upstream stream interrupted: {0}")]
    Interrupted(String),
    /// The upstream sent something that is not a chat completion chunk.
    #[error("upstream sent malformed data: {0}")]
    Protocol(String),
    /// Nothing came within a limit.
    #[error("no {0} within the limit")]
    Timeout(Wait),
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
    /// The stream's budget (its key's or its team's) ran out under it: sluice's own end,
    /// with what the client is told and when the budget resets.
    #[error("{message}")]
    BudgetSpent {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The stream's key was revoked with its streams ended: sluice's own end.
    #[error("the API key was revoked; its streams were ended")]
    KeyRevoked,
}

/// What a stream was waiting for when a limit ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A connection to the upstream.
    Connect,
    /// The reply's first token.
    FirstToken,
    /// The next chunk, after the first.
    Chunk,
    /// The end of the whole reply.
    End,
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wait::Connect => "connection",
            Wait::FirstToken => "first token",
            Wait::Chunk => "chunk",
            Wait::End => "end of the reply",
        })
    }
}

/// Why a route moved on to its next upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    Unreachable,
    ConnectTimeout,
    FirstTokenTimeout,
    ServerError,
    RateLimited,
    Overloaded,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::Unreachable => "unreachable",
            FallbackReason::ConnectTimeout => "connect_timeout",
            FallbackReason::FirstTokenTimeout => "first_token_timeout",
            FallbackReason::ServerError => "server_error",
            FallbackReason::RateLimited => "rate_limited",
            FallbackReason::Overloaded => "overloaded",
        }
    }
}

impl BackendError {
    /// Why another upstream might do better, when one might: the upstream could not be
    /// reached, failed (5xx), was at its limit (429, a full queue), or sent no first token.
    pub fn fallback_reason(&self) -> Option<FallbackReason> {
        match self {
            BackendError::Unreachable(_) | BackendError::Unanswered(_) => {
                Some(FallbackReason::Unreachable)
            }
            BackendError::Timeout(Wait::Connect) => Some(FallbackReason::ConnectTimeout),
            BackendError::Timeout(Wait::FirstToken) => Some(FallbackReason::FirstTokenTimeout),
            BackendError::Rejected { status, .. } if *status >= 500 => {
                Some(FallbackReason::ServerError)
            }
            // One that names the request's own size fails the same way everywhere.
            BackendError::RateLimited { message, .. } if names_request_size(message) => None,
            BackendError::RateLimited { .. } => Some(FallbackReason::RateLimited),
            BackendError::Overloaded { .. } => Some(FallbackReason::Overloaded),
            _ => None,
        }
    }
}

/// Whether a 429's message says the request is larger than the limit it met (OpenAI's
/// and Azure's "Request too large … Requested N", a prompt over a tokens-per-minute limit):
/// the request's doing, not the upstream's state.
pub fn names_request_size(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "request too large",
        "too large for",
        "requested ",
        "reduce the length",
        "maximum context",
    ]
    .iter()
    .any(|words| message.contains(words))
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
    fn stream(&self, request: ModelRequest) -> DeltaStream;

    /// The base URL of the upstream this backend calls, if it calls one, with any
    /// credentials in it masked.
    fn upstream(&self) -> Option<&str> {
        None
    }

    /// Whether the upstream answers at all, for a backend that calls one.
    fn probe(&self) -> Option<futures::future::BoxFuture<'static, Probe>> {
        None
    }

    /// The API this backend is called with: a client of that same API has its request
    /// relayed as it sent it; any other client's is translated.
    fn speaks(&self) -> openai::Api {
        openai::Api::Completions
    }

    /// The chat request fields a call to it carries: every one (an empty list) unless it
    /// speaks another API.
    fn carried(&self) -> &'static [&'static str] {
        &[]
    }

    /// `gen_ai.provider.name` (OpenTelemetry) of what it calls: the maker of the API an
    /// upstream is called with, or `sluice` for a model sluice runs itself.
    fn provider(&self) -> &'static str {
        match (self.upstream(), self.speaks()) {
            (None, _) => "sluice",
            (Some(_), openai::Api::Messages) => "anthropic",
            (Some(_), _) => "openai",
        }
    }

    /// The upstream's own model list, for a backend that has one to ask.
    fn models(&self) -> Option<futures::future::BoxFuture<'_, Result<Vec<String>, String>>> {
        None
    }
}
