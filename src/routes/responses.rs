//! `POST /v1/responses`: OpenAI's Responses API on every backend. The request's `input`
//! items, `instructions`, tools and options become a chat request (what any
//! OpenAI-compatible upstream, the mock and the local model take); the Responses encoder
//! writes the events back. A stored response (`store`, the default) is a stream log: it can
//! be read again (`GET /v1/responses/{id}`, streamed from `starting_after`), continued
//! (`previous_response_id`), cancelled and deleted. `background: true` runs to its end
//! whoever is connected.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::admission::Principal;
use crate::dialect::Wire;
use crate::dialect::completions::wire::Said;
use crate::dialect::responses::request::{Body, Request, invalid, output_messages};
use crate::dialect::responses::{self, Meta, snapshot};
use crate::error::ApiError;
use crate::http::{JsonObject, typed, with_dropped, with_rate_headers};
use crate::pipeline;
use crate::relay::{self, Completion};
use crate::state::AppState;
use crate::streams::{Detach, Reply};
use crate::telemetry::Exchange;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{id}", get(retrieve).delete(delete))
        .route("/v1/responses/{id}/cancel", post(cancel))
}

/// The conversation a stored response ends: its input and its output, as chat messages.
async fn previous(state: &AppState, who: &Principal, id: &str) -> Result<Vec<Said>, ApiError> {
    let stored = state
        .streams
        .stored(id, &who.name, Wire::Responses)
        .await
        .map_err(|e| match e {
            ApiError::StreamNotFound(_) => ApiError::PreviousResponseNotFound(id.to_owned()),
            e => e,
        })?;
    if !stored.ended {
        return Err(invalid(
            format!("the previous response {id} has not finished yet"),
            "previous_response_id",
        ));
    }
    let mut conversation = Kept::read(stored.context.as_deref()).conversation();
    let response = snapshot(stored.events.iter().map(|e| &e[..]))
        .ok_or_else(|| ApiError::PreviousResponseNotFound(id.to_owned()))?;
    if let Some(output) = response["output"].as_array() {
        conversation.extend(output_messages(output));
    }
    Ok(conversation)
}

/// What a stored response keeps beside its events: the conversation up to its reply (what
/// `previous_response_id` continues) and, for a background response, the response object
/// it was created as, answered while no event of it is logged yet.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Kept {
    Conversation(Vec<Said>),
    Background {
        conversation: Vec<Said>,
        created: Value,
    },
    Nothing,
}

impl Kept {
    fn read(context: Option<&[u8]>) -> Kept {
        context
            .and_then(|c| serde_json::from_slice(c).ok())
            .unwrap_or(Kept::Nothing)
    }

    fn conversation(self) -> Vec<Said> {
        match self {
            Kept::Conversation(conversation) | Kept::Background { conversation, .. } => {
                conversation
            }
            Kept::Nothing => Vec::new(),
        }
    }

    /// `context` (a conversation) with the response object `created`.
    fn background(context: Option<Bytes>, created: &Value) -> Option<Bytes> {
        let conversation = context.as_deref().unwrap_or(b"[]");
        let conversation = String::from_utf8_lossy(conversation);
        Some(Bytes::from(format!(
            "{{\"conversation\":{conversation},\"created\":{created}}}"
        )))
    }
}

/// What the answer depends on once the request is built.
struct Flags {
    background: bool,
    stream: bool,
}

async fn create(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    headers: HeaderMap,
    JsonObject(mut body, size): JsonObject,
) -> Result<Response, ApiError> {
    let fields: Body = typed(&mut body)?;
    let store = fields.store.unwrap_or(true);
    if fields.background && !store {
        return Err(invalid(
            "a background response must be stored (store: true)",
            "store",
        ));
    }
    let asked_resumable = crate::http::asks_resumable(&headers);
    // `store: false` is never readable back: not even by resuming it.
    let resumable = store && asked_resumable;
    if fields.input.is_none() {
        return Err(invalid("`input` is required", "input"));
    }
    exchange.set_chat(Wire::Responses.provider(), fields.stream);
    // Admitted before any stored state is loaded: a refused client costs nothing more.
    let admitted = pipeline::admit(
        &state,
        &who,
        &exchange,
        &fields.model,
        fields.max_output_tokens,
        "max_output_tokens",
    )
    .await?;
    let previous = match &fields.previous_response_id {
        Some(id) => previous(&state, &who, id).await?,
        None => Vec::new(),
    };
    let (background, streamed) = (fields.background, fields.stream);
    // A large request is translated off the async workers.
    let Request {
        chat,
        echo,
        context,
        namespaces,
    } = state
        .tokens
        .heavy(crate::tokens::lane(&who.name), size, move || {
            responses::request::request(fields, body, previous, size, store)
        })
        .await
        .unwrap_or(Err(ApiError::Internal))?;
    let fields = Flags {
        background,
        stream: streamed,
    };
    let started = admitted.start(&state, &exchange, chat).await?;
    let rate = started.rate;
    let dropped = started.dropped;
    let completion = Completion::new(&started.model);
    let id = Wire::Responses.stream_id(&completion);
    exchange.set_stream(&id);
    let meta = Meta {
        id: id.clone(),
        created_at: completion.created,
        model: completion.model,
        echo,
        background: fields.background,
        namespaces,
    };
    let mut guard = started.guard;

    let response = async {
        if fields.background && !fields.stream {
            // Answered at once; the response runs on and is read with GET.
            let queued = meta.object("queued", &[], Value::Null);
            let slot = state
                .streams
                .slot(
                    &id,
                    &who.name,
                    Wire::Responses,
                    Kept::background(context, &queued),
                    exchange.span_context(),
                )
                .await?
                .ok_or_else(no_room)?;
            let opened = relay::Opened::unpeeked(started.stream);
            let events = relay::encode(opened, responses::Encoder::new(meta), guard);
            slot.run_detached(events);
            return Ok(Json(queued).into_response());
        }
        // A failure before the first token is a real status, streamed or not.
        let opened = relay::open(started.stream, state.keep_alive, &mut guard).await?;
        let events = relay::encode(opened, responses::Encoder::new(meta), guard);
        let detach = if fields.background {
            Detach::Keep
        } else if resumable {
            Detach::Grace
        } else {
            Detach::Cancel
        };
        let slot = if store || resumable {
            state
                .streams
                .slot(
                    &id,
                    &who.name,
                    Wire::Responses,
                    context,
                    exchange.span_context(),
                )
                .await?
        } else {
            None
        };
        if fields.background && slot.is_none() {
            return Err(no_room());
        }
        if !fields.stream {
            // Read to its end here; a client that leaves cancels it (the log's reader goes).
            let logged: Vec<Bytes> = match slot {
                Some(slot) => slot.run(events, detach).collect().await,
                None => events.collect().await,
            };
            let reply = snapshot(logged.iter().map(|e| &e[..])).ok_or(ApiError::Internal)?;
            return Ok(crate::http::with_cost(
                Json(&reply).into_response(),
                cost_of(&reply),
            ));
        }
        Ok(match slot {
            Some(slot) => {
                let ping = Wire::Responses.keep_alive();
                let mut response =
                    relay::sse(slot.run(events, detach), ping, &id, state.keep_alive);
                if resumable || fields.background {
                    response
                        .headers_mut()
                        .insert("x-sluice-resumable", HeaderValue::from_static("true"));
                }
                response
            }
            None => {
                let ping = Wire::Responses.keep_alive();
                let mut response = relay::sse(events, ping, &id, state.keep_alive);
                if asked_resumable {
                    response
                        .headers_mut()
                        .insert("x-sluice-resumable", HeaderValue::from_static("false"));
                }
                response
            }
        })
    }
    .await;
    let response = response.map(|r| with_dropped(r, &dropped.names()));
    Ok(with_rate_headers(response, &rate))
}

fn no_room() -> ApiError {
    ApiError::Busy {
        message: "no room to keep a background response now; try again, or without `background`"
            .into(),
        retry_after: std::time::Duration::from_secs(1),
    }
}

/// `GET /v1/responses/{id}`: the response as it stands; with `stream=true`, its events
/// after `starting_after` (a sequence number), then live ones.
async fn retrieve(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
    query: Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(pairs) = query;
    let stream = pairs.iter().any(|(k, v)| k == "stream" && v == "true");
    if stream {
        // Event `n` has `sequence_number` n - 1: after sequence N is after event N + 1.
        let after = match pairs.iter().find(|(k, _)| k == "starting_after") {
            Some((_, v)) => {
                let sent = v.trim().parse::<u64>().map_err(|_| {
                    invalid(
                        "`starting_after` must be a sequence number",
                        "starting_after",
                    )
                })?;
                super::streams::Cursor {
                    after: sent.saturating_add(1),
                    param: "starting_after",
                    sent,
                }
            }
            None => super::streams::cursor(&headers, &Default::default())?,
        };
        return super::streams::follow(&state, &who, &exchange, &id, Wire::Responses, after).await;
    }
    let answer = as_it_stands(&state, &who, &id);
    super::streams::admitted(&state, &who, &exchange, &id, answer).await
}

/// The response object of stored response `id` as it stands now: once it has finished,
/// built once and kept.
async fn as_it_stands(state: &AppState, who: &Principal, id: &str) -> Result<Response, ApiError> {
    let finished = state
        .streams
        .reply(id, &who.name, Wire::Responses, |events| {
            let response = snapshot(events.iter().map(|e| &e[..]));
            Reply {
                ok: response.is_some(),
                body: serde_json::to_vec(&response).unwrap_or_default().into(),
            }
        })
        .await;
    match finished {
        Ok(reply) if reply.ok => {
            return Ok(super::streams::json_bytes(StatusCode::OK, reply.body));
        }
        Ok(_) => return Err(ApiError::StreamEventsGone(id.to_owned())),
        Err(ApiError::StreamRunning(_)) => {}
        Err(e) => return Err(e),
    }
    let stored = state.streams.stored(id, &who.name, Wire::Responses).await?;
    let response = snapshot(stored.events.iter().map(|e| &e[..]));
    let response = match (response, Kept::read(stored.context.as_deref())) {
        (Some(response), _) => response,
        // Created, and nothing logged of it yet: as it was created.
        (None, Kept::Background { created, .. }) if stored.events.is_empty() => created,
        (None, _) => return Err(ApiError::StreamEventsGone(id.to_owned())),
    };
    Ok(Json(response).into_response())
}

/// `POST /v1/responses/{id}/cancel`: stops it; the response object as it then stands.
async fn cancel(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let answer = async {
        state
            .streams
            .cancel(&id, &who.name, Wire::Responses)
            .await?;
        as_it_stands(&state, &who, &id).await
    };
    super::streams::admitted(&state, &who, &exchange, &id, answer).await
}

/// `DELETE /v1/responses/{id}`.
async fn delete(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let answer = async {
        state
            .streams
            .delete(&id, &who.name, Wire::Responses)
            .await?;
        Ok(Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
    };
    super::streams::admitted(&state, &who, &exchange, &id, answer).await
}

/// What a response's usage says it cost (`usage.cost`), when its model has a price.
fn cost_of(response: &Value) -> Option<f64> {
    #[derive(serde::Deserialize)]
    struct Costed {
        usage: Option<Cost>,
    }
    #[derive(serde::Deserialize)]
    struct Cost {
        cost: Option<f64>,
    }
    use serde::Deserialize as _;
    Costed::deserialize(response).ok()?.usage?.cost
}
