//! Resuming and cancelling resumable streams, for `/api/chat` and `/v1/chat/completions`
//! alike: `GET …/{id}` reads on from a cursor (`Last-Event-ID`, or `?last_event_id=` /
//! `?starting_after=` for a client that cannot set headers), `POST …/{id}/cancel` stops it.
//! Each is a request of its client's: admitted and counted before anything stored is read.

use std::future::Future;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde_json::json;

use crate::admission::Principal;
use crate::dialect::Wire;
use crate::error::ApiError;
use crate::http::with_rate_headers;
use crate::relay;
use crate::state::AppState;
use crate::streams::{Attached, Cancelled, Reply};
use crate::telemetry::Exchange;

/// The query of a resume: read as plain pairs, so nothing in it is a rejection of its own.
#[derive(Default)]
pub struct Resume {
    last_event_id: Option<String>,
    starting_after: Option<String>,
    stream: bool,
}

impl Resume {
    fn of(Query(pairs): Query<Vec<(String, String)>>) -> Self {
        let mut query = Resume::default();
        for (key, value) in pairs {
            match key.as_str() {
                "last_event_id" => query.last_event_id = Some(value),
                "starting_after" => query.starting_after = Some(value),
                "stream" => query.stream = value == "true",
                _ => {}
            }
        }
        query
    }
}

/// A reader's cursor: the last event it has (0: none), and the parameter it came in.
#[derive(Clone, Copy)]
pub(super) struct Cursor {
    pub(super) after: u64,
    pub(super) param: &'static str,
    /// As the client sent it (a Responses `starting_after` is one below `after`).
    pub(super) sent: u64,
}

pub(super) fn cursor(headers: &HeaderMap, query: &Resume) -> Result<Cursor, ApiError> {
    let (param, value) = match headers.get("last-event-id") {
        Some(v) => ("Last-Event-ID", v.to_str().unwrap_or("-").to_owned()),
        None => match (&query.last_event_id, &query.starting_after) {
            (Some(v), _) => ("last_event_id", v.clone()),
            (None, Some(v)) => ("starting_after", v.clone()),
            (None, None) => ("Last-Event-ID", String::new()),
        },
    };
    let value = value.trim();
    let after = if value.is_empty() {
        0
    } else {
        value.parse().map_err(|_| {
            ApiError::invalid(
                format!("`{param}` must be the number of an event of the stream"),
                Some(param),
            )
        })?
    };
    Ok(Cursor {
        after,
        param,
        sent: after,
    })
}

/// The events after the cursor, then live ones, then the stream's ending. A read is a
/// request like any other (admitted, counted against the client's rate) and holds one of
/// the client's reader slots while its connection lasts.
pub(super) async fn follow(
    state: &AppState,
    who: &Principal,
    exchange: &Exchange,
    id: &str,
    wire: Wire,
    at: Cursor,
) -> Result<Response, ApiError> {
    let reader = state.admission.admit_read(who).await?;
    let quota = reader.quota().clone();
    let (attached, producer) = match state.streams.attach(id, &who.name, wire, at.after).await {
        Ok((attached, producer)) => (Ok(attached), producer),
        Err(e) => (Err(e), None),
    };
    let response = match attached {
        Err(e) => Err(e.cursor_beyond(at.param, at.sent)),
        // Nothing left: 204 tells an `EventSource` to stop reconnecting.
        Ok(Attached::Complete) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Attached::Events(events)) => {
            // The reader's slot is held by the stream, and freed with its connection.
            let events = events.map(move |event| {
                let _slot = &reader;
                event
            });
            // No `retry:` of its own: a lone field block is an empty event to some SDKs,
            // and the client has the pace from the stream's first event.
            let mut response = relay::sse(events, wire.keep_alive(), id, state.keep_alive);
            response
                .headers_mut()
                .insert("x-sluice-resumable", HeaderValue::from_static("true"));
            Ok(response)
        }
    };
    if response.is_ok() {
        exchange.set_stream(id);
        // The reader's span links to the span of the request that started the stream.
        exchange.resumed(producer);
    }
    Ok(with_rate_headers(response, &quota))
}

/// A read or cancel of a stored stream that holds no connection: admitted and counted as a
/// request; the stream's id is logged once it is known to be the client's.
pub(super) async fn admitted(
    state: &AppState,
    who: &Principal,
    exchange: &Exchange,
    id: &str,
    answer: impl Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let quota = state.admission.admit_request(who).await?;
    let response = answer.await;
    if response.is_ok() {
        exchange.set_stream(id);
    }
    Ok(with_rate_headers(response, &quota))
}

/// `GET /api/chat/{id}`: EventSource-compatible resume.
pub async fn resume_chat(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
    query: Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = Resume::of(query);
    let after = cursor(&headers, &query)?;
    follow(&state, &who, &exchange, &id, Wire::Sluice, after).await
}

/// `GET /v1/chat/completions/{id}`: with `stream=true` the chunks after the cursor; without,
/// the assembled `chat.completion` once the stream has finished (409 while it runs), built
/// once and kept.
pub async fn resume_completion(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
    query: Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = Resume::of(query);
    if query.stream {
        let after = cursor(&headers, &query)?;
        return follow(&state, &who, &exchange, &id, Wire::Completions, after).await;
    }
    let answer = async {
        let reply = state
            .streams
            .reply(&id, &who.name, Wire::Completions, |events| {
                let (ok, body) =
                    match crate::dialect::completions::assemble(events.iter().map(|e| &e[..])) {
                        Ok(reply) => (true, reply),
                        // It ended in an error: that error, as the stream said it.
                        Err(body) => (false, body),
                    };
                Reply {
                    ok,
                    body: serde_json::to_vec(&body).unwrap_or_default().into(),
                }
            })
            .await?;
        let status = if reply.ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        };
        Ok(json_bytes(status, reply.body))
    };
    admitted(&state, &who, &exchange, &id, answer).await
}

/// A JSON body that is bytes already.
pub(super) fn json_bytes(status: StatusCode, body: bytes::Bytes) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn cancel(
    state: &AppState,
    who: &Principal,
    exchange: &Exchange,
    id: &str,
    wire: Wire,
) -> Result<Response, ApiError> {
    let answer = async {
        let status = match state.streams.cancel(id, &who.name, wire).await? {
            Cancelled::Now => "cancelled",
            Cancelled::Ended => "ended",
        };
        Ok(Json(json!({"id": id, "object": "stream", "status": status})).into_response())
    };
    admitted(state, who, exchange, id, answer).await
}

/// `GET /v1/messages/{id}`: a resumable Messages stream after `Last-Event-ID`.
pub async fn resume_message(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
    query: Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = cursor(&headers, &Resume::of(query))?;
    follow(&state, &who, &exchange, &id, Wire::Anthropic, after).await
}

/// `POST /v1/messages/{id}/cancel`.
pub async fn cancel_message(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    cancel(&state, &who, &exchange, &id, Wire::Anthropic).await
}

/// `POST /api/chat/{id}/cancel`.
pub async fn cancel_chat(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    cancel(&state, &who, &exchange, &id, Wire::Sluice).await
}

/// `POST /v1/chat/completions/{id}/cancel`.
pub async fn cancel_completion(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    cancel(&state, &who, &exchange, &id, Wire::Completions).await
}
