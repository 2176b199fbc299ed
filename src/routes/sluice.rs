//! `POST /api/chat`: sluice's simple endpoint. A prompt, an optional template and history
//! in; `meta`, `token`…, `done` or `error` SSE events out.

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};

use crate::admission::Principal;
use crate::dialect::{Wire, sluice};
use crate::error::ApiError;
use crate::http::{JsonObject, with_rate_headers};
use crate::pipeline;
use crate::relay::{self, Completion};
use crate::state::AppState;
use crate::telemetry::Exchange;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/chat", post(chat))
        .route("/api/chat/{id}", get(super::streams::resume_chat))
        .route("/api/chat/{id}/cancel", post(super::streams::cancel_chat))
}

async fn chat(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    JsonObject(body, size): JsonObject,
) -> Result<Response, ApiError> {
    let default_model = state.routes.default_model().to_owned();
    let chat = sluice::request::parse(body, size, &state.prompts, &default_model)?;
    exchange.set_chat(Wire::Sluice.provider(), true);
    let started = pipeline::start(&state, &who, &exchange, chat).await?;
    let mut guard = started.guard;
    let completion = Completion::new(&started.model);
    let id = Wire::Sluice.stream_id(&completion);
    exchange.set_stream(&id);
    let response = match relay::open(started.stream, state.keep_alive, &mut guard).await {
        Ok(opened) => {
            let events = relay::encode(opened, sluice::Encoder::new(completion), guard);
            // Every `/api/chat` stream is resumable while resumption is on.
            let resumable = state.streams.enabled();
            state
                .streams
                .respond(
                    events,
                    id,
                    &who.name,
                    Wire::Sluice,
                    resumable,
                    exchange.span_context(),
                )
                .await
        }
        Err(e) => Err(ApiError::from(e)),
    };
    Ok(with_rate_headers(response, &started.rate))
}
