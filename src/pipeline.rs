//! The one chat path every surface shares, whatever its wire format: check the request's
//! size, resolve the model, admit the client (the checks that cost nothing first), count
//! the prompt, reserve its tokens, then start the backend stream with its meter.

use serde_json::{Map, Value};

use crate::admission::{DEFAULT_REPLY_TOKENS, Principal, Quota};
use crate::backend::{ChatRequest, DeltaStream, MAX_MODEL_NAME, Message};
use crate::dispatch;
use crate::error::ApiError;
use crate::relay::StreamGuard;
use crate::state::AppState;
use crate::telemetry::Exchange;

/// The most tokens a request may ask for: far beyond any model's context, well within
/// sluice's arithmetic.
pub const MAX_TOKENS: u32 = 1_000_000;

/// A chat request as a route parsed it from its wire format.
pub struct Chat {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    /// The field `max_tokens` came from, to name in errors.
    pub max_tokens_param: &'static str,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    /// The body an OpenAI-compatible upstream receives (unknown fields pass through).
    pub body: Map<String, Value>,
    /// A Responses API request as sent, for an upstream that speaks that API.
    pub native: Option<crate::backend::Native>,
}

/// An admitted request with its backend stream started (lazily: nothing runs until the
/// stream is polled) and its meter.
pub struct Started {
    pub stream: DeltaStream,
    pub guard: StreamGuard,
    /// `x-ratelimit-*` for the answer.
    pub rate: Quota,
    pub model: String,
    /// The prompt's size as sluice counted it.
    pub prompt_tokens: u32,
}

pub async fn start(
    state: &AppState,
    who: &Principal,
    exchange: &Exchange,
    chat: Chat,
) -> Result<Started, ApiError> {
    if chat.model.len() > MAX_MODEL_NAME {
        return Err(ApiError::invalid(
            format!("`model` is longer than {MAX_MODEL_NAME} bytes"),
            Some("model"),
        ));
    }
    if chat.max_tokens.is_some_and(|n| n > MAX_TOKENS) {
        return Err(ApiError::invalid(
            format!("`{}` must be at most {MAX_TOKENS}", chat.max_tokens_param),
            Some(chat.max_tokens_param),
        ));
    }
    let route = state
        .routes
        .resolve(&chat.model)
        .ok_or_else(|| ApiError::ModelNotFound(chat.model.clone()))?;
    exchange.set_model(&chat.model);

    let mut permit = state.admission.admit(who, &chat.model).await?;
    let (messages, prompt_tokens) = state.tokens.prompt(chat.messages).await;
    let reply_tokens = chat.max_tokens.unwrap_or(DEFAULT_REPLY_TOKENS);
    permit
        .reserve(prompt_tokens.saturating_add(reply_tokens))
        .await?;
    let rate = permit.quota().clone();
    // Metric labels only for admitted requests, and only from a bounded set of names.
    let label = state.routes.label(&chat.model);
    exchange.set_label(label.clone());

    let request = ChatRequest {
        // Each target of the route has its own name for the model: dispatch sets it.
        model: chat.model.clone(),
        messages,
        prompt_tokens,
        max_tokens: chat.max_tokens,
        temperature: chat.temperature,
        top_p: chat.top_p,
        seed: chat.seed,
        body: chat.body,
        request_id: exchange.request_id().to_owned(),
        native: chat.native,
    };
    let guard = StreamGuard::new(
        state.metrics.clone(),
        permit,
        exchange.clone(),
        label.clone(),
        prompt_tokens,
    );
    let stream = dispatch::upstream(&state.dispatcher, exchange, route, &label, request);
    Ok(Started {
        stream,
        guard,
        rate,
        model: chat.model,
        prompt_tokens,
    })
}
