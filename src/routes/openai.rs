//! `POST /v1/chat/completions`: OpenAI's chat completions, streamed or not, on any backend.

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use crate::admission::Principal;
use crate::backend::Message;
use crate::error::ApiError;
use crate::http::{JsonObject, typed, with_rate_headers};
use crate::pipeline;
use crate::relay::{self, Completion, Wire};
use crate::state::AppState;
use crate::telemetry::Exchange;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route(
            "/v1/chat/completions/{id}",
            get(super::streams::resume_completion),
        )
        .route(
            "/v1/chat/completions/{id}/cancel",
            post(super::streams::cancel_completion),
        )
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
                    format!(
                        "unknown role {}; expected one of {}",
                        crate::error::shown(Some(&m.role)),
                        ROLES.join(", ")
                    ),
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
    headers: HeaderMap,
    JsonObject(mut body, size): JsonObject,
) -> Result<Response, ApiError> {
    // A stream that outlives its connection, when asked for.
    let resumable = crate::http::asks_resumable(&headers);
    // Parse and validate: a client's mistake is a 400 and nothing else happens.
    let fields: Fields = typed(&mut body)?;
    if fields.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("sluice supports only n = 1", Some("n")));
    }
    let messages = messages(fields.messages)?;
    let (max_tokens, max_tokens_param) = match (fields.max_completion_tokens, fields.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let chat = pipeline::Chat {
        dropped: pipeline::Dropped::default(),
        model: fields.model,
        messages,
        max_tokens,
        max_tokens_param,
        temperature: fields.temperature,
        top_p: fields.top_p,
        seed: fields.seed,
        body,
        native: None,
        size,
    };
    let started = pipeline::start(&state, &who, &exchange, chat).await?;
    let rate = started.rate;
    let completion = Completion::new(&started.model);
    let mut guard = started.guard;
    let response = if !fields.stream {
        relay::collect(
            relay::Opened::unpeeked(started.stream),
            completion,
            guard,
            state.max_reply_bytes,
        )
        .await
        .map(|reply| Json::<Value>(reply).into_response())
    } else {
        // Peek before committing, so a failure before the first token is a real status.
        let include_usage = fields.stream_options.is_some_and(|o| o.include_usage);
        let id = completion.stream_id(Wire::OpenAi);
        match relay::open(started.stream, state.keep_alive, &mut guard).await {
            Ok(opened) => {
                let events = relay::openai_events(opened, completion, include_usage, guard);
                state
                    .streams
                    .respond(events, id, &who.name, Wire::OpenAi, resumable)
                    .await
            }
            Err(e) => Err(ApiError::from(e)),
        }
    };
    Ok(with_rate_headers(response, &rate))
}
