//! Anthropic's Messages API encoder: canonical events to Anthropic's stream —
//! `message_start`, a `ping`, then per content block `content_block_start`, its deltas
//! (`text_delta`, `input_json_delta` for tool input, `thinking_delta` for reasoning),
//! `content_block_stop`; a new block whenever the kind changes, opened before the delta
//! that changed it; then `message_delta` (stop reason, usage) and `message_stop`. A failure
//! after the first event is an `error` event with Anthropic's body. Also the message a
//! stream's events add up to, and Anthropic's error body for any [`ApiError`].

use std::fmt::Write as _;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Map, Value, json};

use super::{Opened, SseWriter, StreamGuard, payload, put, queued};
use crate::backend::{BackendError, Delta, Usage};
use crate::error::ApiError;
use crate::telemetry::Outcome;

/// A message's identity.
pub struct Meta {
    /// `msg_…`.
    pub id: String,
    pub model: String,
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type","message"}}` for `error`.
pub fn error_body(error: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": error_type(error.status().as_u16()),
        "message": error.to_string()}})
}

/// The stop reason of a chat finish reason.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

#[derive(PartialEq)]
enum Block {
    Text,
    Thinking,
    /// A tool call: the chat `index` its later deltas name.
    Tool(u64),
}

struct Writer {
    out: SseWriter,
    /// The block open now, and its index.
    open: Option<(Block, usize)>,
    next: usize,
}

impl Writer {
    fn event(&mut self, name: &str, data: &Value) -> Bytes {
        let body = data.to_string();
        self.out.event(Some(name), |b| put(b, &body))
    }

    fn stop(&mut self, events: &mut Vec<Bytes>) {
        if let Some((_, index)) = self.open.take() {
            events.push(self.event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// Opens a block of `kind` (closing the one before) unless one is open already.
    fn start(&mut self, kind: Block, block: Value, events: &mut Vec<Bytes>) -> usize {
        if let Some((open, index)) = &self.open
            && *open == kind
        {
            return *index;
        }
        self.stop(events);
        let index = self.next;
        self.next += 1;
        events.push(self.event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        self.open = Some((kind, index));
        index
    }

    /// Upstream fields beyond text: reasoning, tool call deltas.
    fn fields(&mut self, delta: &Map<String, Value>, events: &mut Vec<Bytes>) {
        let reasoning = ["reasoning_content", "reasoning"]
            .iter()
            .find_map(|k| delta.get(*k).and_then(Value::as_str))
            .filter(|r| !r.is_empty());
        if let Some(reasoning) = reasoning {
            let index = self.start(
                Block::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                events,
            );
            events.push(self.event(
                "content_block_delta",
                &json!({"type": "content_block_delta",
                "index": index, "delta": {"type": "thinking_delta", "thinking": reasoning}}),
            ));
        }
        let Some(Value::Array(calls)) = delta.get("tool_calls") else {
            return;
        };
        for call in calls {
            let tool = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let block = json!({"type": "tool_use",
                "id": call.get("id").and_then(Value::as_str).map_or_else(
                    || format!("toolu_{}", uuid::Uuid::new_v4().simple()), str::to_owned),
                "name": call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default(),
                "input": {}});
            let index = self.start(Block::Tool(tool), block, events);
            let arguments = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !arguments.is_empty() {
                events.push(self.event("content_block_delta", &json!({"type": "content_block_delta",
                    "index": index, "delta": {"type": "input_json_delta", "partial_json": arguments}})));
            }
        }
    }
}

/// `POST /v1/messages` with `stream: true`: Anthropic's events for one message.
pub fn anthropic_events(
    mut opened: Opened,
    meta: Meta,
    mut guard: StreamGuard,
    input_tokens: u32,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let first = opened.next().await;
        if matches!(first, Some(Ok(Delta::Event(_)))) {
            // An upstream that speaks the Messages API: its events as they came.
            let relayed = super::relay_native(
                first,
                opened,
                guard,
                move |out, guard, raw, ended| native(out, &meta, guard, raw, ended),
                |out, error| {
                    let body = error_body(error).to_string();
                    out.event(Some("error"), |b| put(b, &body))
                },
            );
            for await event in relayed {
                yield event;
            }
            return;
        }
        let mut pending = Some(first);
        let mut w = Writer { out: SseWriter::new(), open: None, next: 0 };
        w.out.retry();
        let start = json!({"type": "message_start", "message": {"id": meta.id, "type": "message",
            "role": "assistant", "model": meta.model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}});
        yield w.event("message_start", &start);
        yield w.event("ping", &json!({"type": "ping"}));
        let mut finish = None;
        let mut events = Vec::new();
        loop {
            let item = match pending.take() {
                Some(first) => first,
                None => opened.next().await,
            };
            let Some(item) = item else { break };
            match item {
                Ok(Delta::Text(text)) => {
                    guard.delivered();
                    let index = w.start(Block::Text, json!({"type": "text", "text": ""}), &mut events);
                    for event in events.drain(..) {
                        yield event;
                    }
                    // Per token: the text's JSON literal, as it came.
                    yield w.out.event(Some("content_block_delta"), |b| {
                        put(b, "{\"type\":\"content_block_delta\",\"index\":");
                        let _ = write!(b, "{index}");
                        put(b, ",\"delta\":{\"type\":\"text_delta\",\"text\":");
                        put(b, text.json());
                        put(b, "}}");
                    });
                }
                Ok(Delta::Fields(fields)) => {
                    guard.times.token(guard.exchange.arrived().elapsed());
                    if let Ok(Value::Object(delta)) = serde_json::from_str(fields.json()) {
                        w.fields(&delta, &mut events);
                        for event in events.drain(..) {
                            yield event;
                        }
                    }
                }
                Ok(Delta::Finish(reason)) => finish = Some(reason),
                Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
                Ok(Delta::Queued(ahead)) => yield queued(&mut w.out, ahead),
                Ok(Delta::Identity(_) | Delta::Logprobs(_) | Delta::UsageDetails(_) | Delta::Event(_)) => {}
                Err(e) => {
                    guard.failed(&e);
                    let body = error_body(&ApiError::from(e));
                    yield w.event("error", &body);
                    return;
                }
            }
        }
        w.stop(&mut events);
        for event in events.drain(..) {
            yield event;
        }
        let usage = guard.usage();
        guard.finish(Outcome::Completed);
        yield w.event("message_delta", &json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(finish.as_deref()), "stop_sequence": null, "stop_details": null},
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}));
        yield w.event("message_stop", &json!({"type": "message_stop"}));
    }
}

/// One event of an upstream that speaks the Messages API, relayed as it came but for the
/// message's `id` (sluice's, so the stream can be resumed under it); metered as it goes.
fn native(
    out: &mut SseWriter,
    meta: &Meta,
    guard: &mut StreamGuard,
    raw: &str,
    ended: &mut bool,
) -> Bytes {
    let Ok(mut event) = serde_json::from_str::<Value>(raw) else {
        return out.event(None, |b| put(b, raw));
    };
    let kind = event["type"].as_str().unwrap_or_default().to_owned();
    let clamp = |n: &Value| n.as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let mut changed = false;
    match kind.as_str() {
        "message_start" => {
            if let Some(message) = event.get_mut("message").and_then(Value::as_object_mut) {
                message.insert("id".into(), json!(meta.id));
                changed = true;
            }
            if let Some(input) = clamp(&event["message"]["usage"]["input_tokens"]) {
                guard.reported = Some(Usage::new(input, 0));
            }
        }
        "content_block_delta" if event["delta"]["type"] == "text_delta" => guard.delivered(),
        "message_delta" => {
            let input = clamp(&event["usage"]["input_tokens"])
                .or(guard.reported.map(|u| u.prompt_tokens))
                .unwrap_or(0);
            if let Some(output) = clamp(&event["usage"]["output_tokens"]) {
                guard.reported = Some(Usage::new(input, output));
            }
        }
        "message_stop" => {
            guard.finish(Outcome::Completed);
            *ended = true;
        }
        "error" => {
            let message = event["error"]["message"]
                .as_str()
                .unwrap_or("the upstream's message failed")
                .to_owned();
            guard.failed(&BackendError::Interrupted(message));
            *ended = true;
        }
        _ => {}
    }
    let name = if kind.is_empty() {
        None
    } else {
        Some(kind.as_str())
    };
    if changed {
        let body = event.to_string();
        out.event(name, |b| put(b, &body))
    } else {
        out.event(name, |b| put(b, raw))
    }
}

/// The message a stream's events add up to (for `stream: false`), or the error body it
/// ended with.
pub fn assemble<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Result<Value, Value> {
    let mut message = Value::Null;
    let mut inputs: Vec<String> = Vec::new();
    for event in events {
        let Some(mut event) = payload(event) else {
            continue;
        };
        match event["type"].as_str().unwrap_or_default() {
            "message_start" => message = event["message"].take(),
            _ if !message.is_object() => {}
            "content_block_start" => {
                if let Some(content) = message["content"].as_array_mut() {
                    content.push(event["content_block"].take());
                    inputs.push(String::new());
                }
            }
            "content_block_delta" => {
                let index = event["index"].as_u64().unwrap_or(0) as usize;
                let delta = &event["delta"];
                // An index no block has (an upstream's mistake) is skipped, not a panic.
                let Some(block) = message
                    .get_mut("content")
                    .and_then(Value::as_array_mut)
                    .and_then(|content| content.get_mut(index))
                    .filter(|block| block.is_object())
                else {
                    continue;
                };
                match delta["type"].as_str() {
                    Some("text_delta") => {
                        let text = format!(
                            "{}{}",
                            block["text"].as_str().unwrap_or_default(),
                            delta["text"].as_str().unwrap_or_default()
                        );
                        block["text"] = Value::String(text);
                    }
                    Some("thinking_delta") => {
                        let text = format!(
                            "{}{}",
                            block["thinking"].as_str().unwrap_or_default(),
                            delta["thinking"].as_str().unwrap_or_default()
                        );
                        block["thinking"] = Value::String(text);
                    }
                    Some("input_json_delta") => {
                        if let Some(input) = inputs.get_mut(index) {
                            input.push_str(delta["partial_json"].as_str().unwrap_or_default());
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                let Some(message) = message.as_object_mut() else {
                    continue;
                };
                message.insert("stop_reason".into(), event["delta"]["stop_reason"].take());
                message.insert(
                    "stop_sequence".into(),
                    event["delta"]["stop_sequence"].take(),
                );
                if let (Some(Value::Object(have)), Some(usage)) =
                    (message.get_mut("usage"), event["usage"].as_object())
                {
                    for (key, value) in usage {
                        have.insert(key.clone(), value.clone());
                    }
                }
            }
            "error" => return Err(event),
            _ => {}
        }
    }
    if let Some(content) = message.get_mut("content").and_then(Value::as_array_mut) {
        for (block, input) in content.iter_mut().zip(inputs) {
            if let Some(block) = block.as_object_mut()
                && block.get("type").is_some_and(|t| t == "tool_use")
                && !input.is_empty()
            {
                let input = serde_json::from_str(&input).unwrap_or(Value::Object(Map::new()));
                block.insert("input".into(), input);
            }
        }
    }
    Ok(message)
}
