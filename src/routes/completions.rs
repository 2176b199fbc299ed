//! `POST /v1/chat/completions`: OpenAI's chat completions, streamed or not, on any backend.

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::admission::Principal;
use crate::dialect::{Wire, completions};
use crate::error::ApiError;
use crate::http::{JsonObject, with_dropped, with_rate_headers};
use crate::pipeline;
use crate::relay::{self, Completion};
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

async fn chat_completions(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    headers: HeaderMap,
    JsonObject(body, size): JsonObject,
) -> Result<Response, ApiError> {
    // A stream that outlives its connection, when asked for.
    let resumable = crate::http::asks_resumable(&headers);
    let (request, asked) = completions::request::parse(body, size)?;
    exchange.set_chat(Wire::Completions.provider(), asked.stream);
    let started = pipeline::start(&state, &who, &exchange, request).await?;
    let rate = started.rate;
    let dropped = started.dropped;
    let completion = Completion::new(&started.model);
    let mut guard = started.guard;
    let response = if !asked.stream {
        // Read whole (the usage always there), then assembled as one `chat.completion`.
        let encoder = completions::Encoder::new(completion, true);
        let opened = relay::Opened::unpeeked(started.stream);
        let mut reply = completions::Assembler::default();
        let max = state.max_reply_bytes;
        match relay::collect(opened, encoder, guard, max, |e| reply.push(&e)).await {
            Ok(cost) => reply
                .finish()
                .map(|reply| crate::http::with_cost(Json(reply).into_response(), cost))
                .map_err(|_| ApiError::Internal),
            Err(e) => Err(e),
        }
    } else {
        // Peek before committing, so a failure before the first token is a real status.
        let id = Wire::Completions.stream_id(&completion);
        exchange.set_stream(&id);
        match relay::open(started.stream, state.keep_alive, &mut guard).await {
            Ok(opened) => {
                let encoder = completions::Encoder::new(completion, asked.include_usage);
                let events = relay::encode(opened, encoder, guard);
                state
                    .streams
                    .respond(
                        events,
                        id,
                        &who.name,
                        Wire::Completions,
                        resumable,
                        exchange.span_context(),
                    )
                    .await
            }
            Err(e) => Err(ApiError::from(e)),
        }
    };
    let response = response.map(|r| with_dropped(r, &dropped.names()));
    Ok(with_rate_headers(response, &rate))
}
