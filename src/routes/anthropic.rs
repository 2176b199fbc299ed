//! `POST /v1/messages`: Anthropic's Messages API on every backend. The dialect
//! (`crate::dialect::anthropic`) makes the request canonical and writes the events back. `POST /v1/messages/count_tokens` counts a
//! request's input. Every error on these routes is in Anthropic's shape.

use axum::body::Body;
use axum::extract::{FromRequest, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde_json::{Value, json};

use crate::admission::Principal;
use crate::dialect::Wire;
use crate::dialect::anthropic::{self, Meta, error_type};
use crate::error::ApiError;
use crate::http::{JsonObject, with_dropped, with_rate_headers};
use crate::pipeline;
use crate::relay::{self, Completion};
use crate::state::AppState;
use crate::telemetry::Exchange;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route(
            "/v1/messages/{id}",
            axum::routing::get(super::streams::resume_message),
        )
        .route(
            "/v1/messages/{id}/cancel",
            post(super::streams::cancel_message),
        )
        .layer(middleware::map_response(anthropic_errors))
}

/// Any error answer of these routes (a handler's, an extractor's) in Anthropic's shape,
/// `{"type":"error","error":{"type","message"}}`, status and headers kept.
async fn anthropic_errors(response: Response) -> Response {
    let status = response.status();
    if status.is_success() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let error = serde_json::from_slice::<Value>(&bytes).unwrap_or_default();
    let message = error["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    // Anthropic's own words where its clients match on them.
    let message = match error["error"]["code"].as_str() {
        Some("invalid_api_key") => "invalid x-api-key".to_owned(),
        Some("model_not_found") if message.contains("does not exist") => {
            match message.split('`').nth(1) {
                Some(model) => format!("model: {model}"),
                None => message,
            }
        }
        _ => message,
    };
    let body = json!({"type": "error", "error": {"type": error_type(status.as_u16()), "message": message}});
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body.to_string()))
}

async fn messages(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    headers: HeaderMap,
    JsonObject(body, size): JsonObject,
) -> Result<Response, ApiError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (request, stream) = anthropic::request::parse(
        body,
        size,
        header("anthropic-version"),
        header("anthropic-beta"),
    )?;
    let resumable = crate::http::asks_resumable(&headers);
    exchange.set_chat(Wire::Anthropic.provider(), stream);
    let started = pipeline::start(&state, &who, &exchange, request).await?;
    let rate = started.rate;
    let completion = Completion::new(&started.model);
    let id = Wire::Anthropic.stream_id(&completion);
    if stream {
        exchange.set_stream(&id);
    }
    let meta = Meta {
        id: id.clone(),
        model: completion.model,
    };
    let encoder = anthropic::Encoder::new(meta, started.prompt_tokens);
    let mut guard = started.guard;
    let response = async {
        // A failure before the first token is a real status, streamed or not.
        let opened = relay::open(started.stream, state.keep_alive, &mut guard).await?;
        if stream {
            let events = relay::encode(opened, encoder, guard);
            return state
                .streams
                .respond(
                    events,
                    id,
                    &who.name,
                    Wire::Anthropic,
                    resumable,
                    exchange.span_context(),
                )
                .await;
        }
        let mut events = Vec::new();
        let max = state.max_reply_bytes;
        let cost = relay::collect(opened, encoder, guard, max, |e| events.push(e)).await?;
        let message =
            anthropic::assemble(events.iter().map(|e| &e[..])).map_err(|_| ApiError::Internal)?;
        Ok(crate::http::with_cost(Json(message).into_response(), cost))
    }
    .await;
    let response = response.map(|r| with_dropped(r, &started.dropped.names()));
    Ok(with_rate_headers(response, &rate))
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": n}`, counted as sluice counts a
/// prompt (o200k), tool definitions and every other part included. It is a request like any
/// other (admitted, counted against the request rate), and a large body is read and counted
/// off the async workers.
async fn count_tokens(
    State(state): State<AppState>,
    who: Principal,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // Admitted before its body is even read: a client over its rate costs nothing more.
    let quota = state.admission.admit_request(&who).await?;
    let JsonObject(body, size) = JsonObject::from_request(request, &state).await?;
    let counted = state
        .tokens
        .heavy(
            crate::tokens::lane(&who.name),
            size,
            move || -> Result<u32, ApiError> { anthropic::request::count(body) },
        )
        .await
        .unwrap_or(Err(ApiError::Internal));
    let response = counted.map(|count| Json(json!({"input_tokens": count})).into_response());
    Ok(with_rate_headers(response, &quota))
}
