//! `POST /v1/messages`: Anthropic's Messages API on every backend. `system`, `messages`
//! (text, image, `tool_use` and `tool_result` blocks), `tools` and `tool_choice`,
//! `max_tokens`, `stop_sequences` and the sampling options become a chat request; the
//! Anthropic encoder writes the events back. `POST /v1/messages/count_tokens` counts a
//! request's input. Every error on these routes is in Anthropic's shape.

use axum::body::Body;
use axum::extract::{FromRequest, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::admission::Principal;
use crate::backend::Message;
use crate::error::ApiError;
use crate::http::{JsonObject, typed, with_dropped, with_rate_headers};
use crate::pipeline::{self, Dropped};
use crate::relay::anthropic::{Meta, anthropic_events, assemble, error_type};
use crate::relay::{self, Completion, Wire};
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
        Some("model_not_found") => match message.split('`').nth(1) {
            Some(model) => format!("model: {model}"),
            None => message,
        },
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

/// The fields sluice reads.
#[derive(Deserialize)]
struct Fields {
    model: String,
    max_tokens: Option<u32>,
    messages: Vec<Value>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    metadata: Option<Value>,
    #[serde(default)]
    tools: Vec<Value>,
    tool_choice: Option<Value>,
    #[serde(default)]
    stream: bool,
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// The text of a `tool_result`'s content (a string, or text blocks).
fn result_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The text of a `system` value: a string, or text blocks joined by line breaks.
fn system_text(system: &Value, at: &str) -> Result<String, ApiError> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => Ok(blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Err(invalid(
            format!("{at}: Input should be a valid string or a list of text blocks"),
            at,
        )),
    }
}

/// Anthropic's messages as chat messages: a user's `tool_result` blocks become tool
/// messages (ahead of the rest of its content), an assistant's `tool_use` blocks its
/// `tool_calls`, a `system` message (mid-conversation, as Claude Code sends them) a chat
/// system message where it stands. Blocks a chat upstream has no place for are left out
/// and named in `dropped`.
fn translate(
    system: Option<&Value>,
    messages: &[Value],
    dropped: &mut Dropped,
) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system.filter(|s| !s.is_null()) {
        out.push(json!({"role": "system", "content": system_text(system, "system")?}));
    }
    if messages.is_empty() {
        return Err(invalid(
            "messages: at least one message is required",
            "messages",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        if role == "system" {
            let at = format!("messages.{i}.content");
            out.push(json!({"role": "system", "content": system_text(&m["content"], &at)?}));
            continue;
        }
        if !matches!(role, "user" | "assistant") {
            return Err(invalid(
                format!("messages.{i}.role: Input should be 'user', 'assistant' or 'system'"),
                &format!("messages.{i}.role"),
            ));
        }
        let blocks = match &m["content"] {
            Value::String(s) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            Value::Array(blocks) => blocks,
            _ => {
                return Err(invalid(
                    format!(
                        "messages.{i}.content: Input should be a valid string or a list of content blocks"
                    ),
                    &format!("messages.{i}.content"),
                ));
            }
        };
        let mut parts = Vec::new();
        let mut calls = Vec::new();
        for (j, block) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            if block.get("cache_control").is_some() {
                dropped.add("cache_control");
            }
            match block["type"].as_str() {
                Some("text") => {
                    parts.push(json!({"type": "text", "text": block["text"].as_str().unwrap_or_default()}));
                }
                Some("image") => {
                    let source = &block["source"];
                    let url = match source["type"].as_str() {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            source["media_type"].as_str().unwrap_or("image/png"),
                            source["data"].as_str().unwrap_or_default()
                        ),
                        Some("url") => source["url"].as_str().unwrap_or_default().to_owned(),
                        _ => return Err(invalid(format!("{at}.source: an image source is base64 or url"), &at)),
                    };
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                Some("tool_use") if role == "assistant" => calls.push(json!({
                    "id": block["id"], "type": "function",
                    "function": {"name": block["name"], "arguments": block["input"].to_string()}})),
                Some("tool_result") if role == "user" => out.push(json!({"role": "tool",
                    "tool_call_id": block["tool_use_id"], "content": result_text(&block["content"])})),
                // Signed reasoning, documents, server tools' calls and results, and any block
                // to come: nothing a chat upstream takes. Named, never silently lost.
                Some(kind) => dropped.add(kind),
                None => {
                    return Err(invalid(format!("{at}.type: Field required"), &format!("{at}.type")));
                }
            }
        }
        if parts.is_empty() && calls.is_empty() {
            continue;
        }
        let only_text = parts.iter().all(|p| p["type"] == "text");
        let content = if parts.is_empty() {
            Value::Null
        } else if only_text {
            let text: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
            Value::String(text.join(""))
        } else {
            Value::Array(parts)
        };
        let mut message = json!({"role": role, "content": content});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        out.push(message);
    }
    Ok(out)
}

/// What the models sluice runs itself read of chat messages: each one's text.
fn canonical(messages: &[Value]) -> Vec<Message> {
    messages
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap_or("user").to_owned(),
            content: match &m["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
                _ => String::new(),
            },
        })
        .collect()
}

/// Anthropic's tools as chat tools. Server tools (`web_search_20250305`, code execution…,
/// any `type` but `custom`) have no chat counterpart: left out and named in `dropped`,
/// unless `tool_choice` forces one, which a chat upstream could not honour.
fn tools(
    tools: &[Value],
    choice: Option<&Value>,
    dropped: &mut Dropped,
) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let Some(name) = tool["name"].as_str() else {
            return Err(invalid(
                format!("tools.{i}.name: Field required"),
                &format!("tools.{i}.name"),
            ));
        };
        if let Some(kind) = tool["type"].as_str().filter(|t| *t != "custom") {
            if choice.is_some_and(|c| c["type"] == "tool" && c["name"] == name) {
                return Err(invalid(
                    format!(
                        "tool_choice: the server tool {name} ({kind}) cannot be run by this model's upstream"
                    ),
                    "tool_choice",
                ));
            }
            dropped.add(kind);
            continue;
        }
        let mut function = Map::new();
        function.insert("name".into(), json!(name));
        if let Some(d) = tool.get("description") {
            function.insert("description".into(), d.clone());
        }
        function.insert(
            "parameters".into(),
            tool.get("input_schema")
                .cloned()
                .unwrap_or(json!({"type": "object"})),
        );
        if tool.get("cache_control").is_some() {
            dropped.add("cache_control");
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(out)
}

/// Messages API fields with no chat counterpart: accepted, left out for a chat upstream
/// and named (an Anthropic upstream gets them as sent).
const NOT_FOR_CHAT: [&str; 5] = [
    "thinking",
    "context_management",
    "output_config",
    "container",
    "mcp_servers",
];

/// The chat request an OpenAI-compatible upstream receives.
fn chat(
    fields: &Fields,
    sent: &Map<String, Value>,
    dropped: &mut Dropped,
) -> Result<(Vec<Value>, Map<String, Value>), ApiError> {
    let messages = translate(fields.system.as_ref(), &fields.messages, dropped)?;
    for field in NOT_FOR_CHAT {
        if sent.get(field).is_some_and(|v| !v.is_null()) {
            dropped.add(field);
        }
    }
    let mut body = Map::new();
    body.insert("messages".into(), Value::Array(messages.clone()));
    let chat_tools = tools(&fields.tools, fields.tool_choice.as_ref(), dropped)?;
    if !chat_tools.is_empty() {
        body.insert("tools".into(), Value::Array(chat_tools));
    }
    if let Some(choice) = &fields.tool_choice {
        let chosen = match choice["type"].as_str() {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            _ => {
                return Err(invalid(
                    "tool_choice: auto, any, tool or none",
                    "tool_choice",
                ));
            }
        };
        body.insert("tool_choice".into(), chosen);
        if choice["disable_parallel_tool_use"] == json!(true) {
            body.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    if let Some(stop) = &fields.stop_sequences {
        body.insert("stop".into(), json!(stop));
    }
    let decimal = crate::backend::decimal;
    if let Some(t) = fields.temperature {
        body.insert("temperature".into(), decimal(t));
    }
    if let Some(p) = fields.top_p {
        body.insert("top_p".into(), decimal(p));
    }
    if let Some(k) = fields.top_k {
        body.insert("top_k".into(), json!(k));
    }
    if let Some(n) = fields.max_tokens {
        body.insert("max_tokens".into(), json!(n));
    }
    if let Some(user) = fields.metadata.as_ref().and_then(|m| m["user_id"].as_str()) {
        body.insert("user".into(), json!(user));
    }
    Ok((messages, body))
}

async fn messages(
    State(state): State<AppState>,
    who: Principal,
    Extension(exchange): Extension<Exchange>,
    headers: HeaderMap,
    JsonObject(mut body, size): JsonObject,
) -> Result<Response, ApiError> {
    let fields: Fields = typed(&mut body)?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // As sent, for an upstream that speaks the Messages API itself.
    let native = crate::backend::Native::Messages {
        body: body.clone(),
        version: header("anthropic-version"),
        beta: header("anthropic-beta"),
    };
    if fields.max_tokens.is_none() {
        return Err(invalid("max_tokens: Field required", "max_tokens"));
    }
    let resumable = crate::http::asks_resumable(&headers);
    let mut dropped = Dropped::default();
    let (messages, upstream) = chat(&fields, &body, &mut dropped)?;
    let request = pipeline::Chat {
        model: fields.model,
        messages: canonical(&messages),
        max_tokens: fields.max_tokens,
        max_tokens_param: "max_tokens",
        temperature: fields.temperature,
        top_p: fields.top_p,
        seed: None,
        body: upstream,
        native: Some(native),
        size,
        dropped,
    };
    let started = pipeline::start(&state, &who, &exchange, request).await?;
    let rate = started.rate;
    let completion = Completion::new(&started.model);
    let id = completion.stream_id(Wire::Anthropic);
    let meta = Meta {
        id: id.clone(),
        model: completion.model,
    };
    let mut guard = started.guard;
    let response = async {
        // A failure before the first token is a real status, streamed or not.
        let opened = relay::open(started.stream, state.keep_alive, &mut guard).await?;
        let events = anthropic_events(opened, meta, guard, started.prompt_tokens);
        if fields.stream {
            return state
                .streams
                .respond(events, id, &who.name, Wire::Anthropic, resumable)
                .await;
        }
        let events: Vec<_> = events.collect().await;
        match assemble(events.iter().map(|e| &e[..])) {
            Ok(message) => Ok(Json(message).into_response()),
            Err(error) => Ok((axum::http::StatusCode::BAD_GATEWAY, Json(error)).into_response()),
        }
    }
    .await;
    let response = response.map(|r| with_dropped(r, &started.dropped));
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
    let JsonObject(mut body, size) = JsonObject::from_request(request, &state).await?;
    let counted = state
        .tokens
        .heavy(size, move || -> Result<u32, ApiError> {
            let fields: Fields = typed(&mut body)?;
            let (messages, upstream) = chat(&fields, &body, &mut Dropped::default())?;
            let mut count = crate::tokens::prompt(&canonical(&messages));
            for (field, value) in &upstream {
                // The messages are counted above; the model's name is not input.
                if !matches!(field.as_str(), "messages" | "model") {
                    count = count.saturating_add(crate::tokens::text(&value.to_string()));
                }
            }
            Ok(count)
        })
        .await
        .unwrap_or(Err(ApiError::Internal));
    let response = counted.map(|count| Json(json!({"input_tokens": count})).into_response());
    Ok(with_rate_headers(response, &quota))
}
