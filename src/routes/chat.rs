//! `POST /api/chat`: sluice's simple endpoint. A prompt, an optional template and history
//! in; `meta`, `token`…, `done` or `error` SSE events out.

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::admission::Principal;
use crate::backend::Message;
use crate::error::ApiError;
use crate::http::{JsonObject, typed, with_rate_headers};
use crate::pipeline;
use crate::prompts::RenderError;
use crate::relay::{self, Completion, Wire};
use crate::state::AppState;
use crate::telemetry::Exchange;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/chat", post(chat))
        .route("/api/chat/{id}", get(super::streams::resume_chat))
        .route("/api/chat/{id}/cancel", post(super::streams::cancel_chat))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    prompt: String,
    model: Option<String>,
    template: Option<String>,
    #[serde(default)]
    vars: Map<String, Value>,
    #[serde(default)]
    history: Vec<Turn>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    /// A system prompt of the client's own, after the template's.
    system: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Turn {
    role: String,
    content: String,
}

async fn chat(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    JsonObject(mut body, size): JsonObject,
) -> Result<Response, ApiError> {
    let req: ChatBody = typed(&mut body)?;
    if req.prompt.trim().is_empty() {
        return Err(ApiError::invalid(
            "`prompt` must not be empty",
            Some("prompt"),
        ));
    }
    let mut messages = Vec::with_capacity(req.history.len() + 2);
    if let Some(name) = &req.template {
        let system = state.prompts.render(name, &req.vars).map_err(|e| {
            let param = match e {
                RenderError::Unknown(_) => "template",
                _ => "vars",
            };
            ApiError::invalid(e.to_string(), Some(param))
        })?;
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    if let Some(system) = req.system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    for (i, turn) in req.history.into_iter().enumerate() {
        if !matches!(turn.role.as_str(), "user" | "assistant") {
            return Err(ApiError::invalid(
                "history turns are `user` or `assistant`",
                Some(&format!("history[{i}].role")),
            ));
        }
        messages.push(Message {
            role: turn.role,
            content: turn.content,
        });
    }
    messages.push(Message {
        role: "user".into(),
        content: req.prompt,
    });

    let model = req
        .model
        .unwrap_or_else(|| state.routes.default_model().to_owned());

    let chat = pipeline::Chat {
        dropped: pipeline::Dropped::default(),
        model,
        messages,
        max_tokens: req.max_tokens,
        max_tokens_param: "max_tokens",
        temperature: req.temperature,
        top_p: None,
        seed: None,
        // Nothing beyond the chat itself: an upstream's body is built from it.
        body: Map::new(),
        native: None,
        size,
    };
    let started = pipeline::start(&state, &who, &exchange, chat).await?;
    let mut guard = started.guard;
    let completion = Completion::new(&started.model);
    let id = completion.stream_id(Wire::Chat);
    let response = match relay::open(started.stream, state.keep_alive, &mut guard).await {
        Ok(opened) => {
            let events = relay::chat_events(opened, completion, guard);
            // Every `/api/chat` stream is resumable while resumption is on.
            let resumable = state.streams.enabled();
            state
                .streams
                .respond(events, id, &who.name, Wire::Chat, resumable)
                .await
        }
        Err(e) => Err(ApiError::from(e)),
    };
    Ok(with_rate_headers(response, &started.rate))
}
