//! `POST /v1/chat/completions`: OpenAI's chat completions, streamed or not, on any backend.

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use super::{JsonObject, typed, with_rate_headers};
use crate::admission::{DEFAULT_REPLY_TOKENS, Principal};
use crate::backend::{ChatRequest, Message};
use crate::error::ApiError;
use crate::metrics::Exchange;
use crate::relay::{self, Completion, StreamGuard};
use crate::state::AppState;
use crate::tokens;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/chat/completions", post(chat_completions))
}

/// The fields sluice reads; every other field stays in the body and goes to the upstream.
#[derive(Deserialize)]
struct Fields {
    model: String,
    messages: Vec<MessageIn>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part: text is kept for the models sluice runs itself and for counting; other
/// parts (images, audio) pass through to the upstream.
#[derive(Deserialize)]
struct Part {
    text: Option<String>,
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn messages(raw: Vec<MessageIn>) -> Result<Vec<Message>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("unknown role {:?}; expected one of {ROLES:?}", m.role),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => parts.into_iter().filter_map(|p| p.text).collect(),
            };
            Ok(Message {
                role: m.role,
                content,
            })
        })
        .collect()
}

async fn chat_completions(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    JsonObject(mut body): JsonObject,
) -> Result<Response, ApiError> {
    // Parse and validate: a client's mistake is a 400 and nothing else happens.
    let fields: Fields = typed(&mut body)?;
    if fields.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("sluice supports only n = 1", Some("n")));
    }
    let messages = messages(fields.messages)?;

    // Route: model name → backend and the name the backend knows.
    let route = state
        .routes
        .resolve(&fields.model)
        .ok_or_else(|| ApiError::ModelNotFound(fields.model.clone()))?;
    exchange.set_model(&fields.model);

    // Admission: this client's request, token and stream limits.
    let max_tokens = fields.max_completion_tokens.or(fields.max_tokens);
    let prompt_tokens = tokens::prompt(&messages);
    let permit = state
        .admission
        .admit(
            &who,
            &fields.model,
            prompt_tokens + max_tokens.unwrap_or(DEFAULT_REPLY_TOKENS),
        )
        .await?;
    let rate = permit.headers().clone();

    let request = ChatRequest {
        model: String::new(),
        messages,
        max_tokens,
        temperature: fields.temperature,
        top_p: fields.top_p,
        seed: fields.seed,
        body,
        request_id: exchange.request_id().to_owned(),
    };
    let mut guard = StreamGuard::new(
        state.metrics.clone(),
        permit,
        exchange.clone(),
        fields.model.clone(),
        prompt_tokens,
    );
    let stream = relay::upstream(&state, &exchange, route, request);
    let completion = Completion::new(&fields.model);

    let response = if !fields.stream {
        relay::collect(stream, completion, guard)
            .await
            .map(|reply| Json::<Value>(reply).into_response())
    } else {
        // Peek before committing, so a failure before the first token is a real status.
        let include_usage = fields.stream_options.is_some_and(|o| o.include_usage);
        relay::open(stream, state.keep_alive, &mut guard)
            .await
            .map(|opened| {
                relay::openai_sse(opened, completion, include_usage, guard, state.keep_alive)
            })
    };
    Ok(with_rate_headers(response, &rate))
}
