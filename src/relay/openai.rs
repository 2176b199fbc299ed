//! The OpenAI chat completions encoder: `chat.completion.chunk` events for a stream, and
//! the assembled `chat.completion` for `stream: false`.

use std::pin::Pin;
use std::time::Duration;

use axum::response::Response;
use axum::response::sse::Event;
use futures::{Stream, StreamExt};
use serde_json::{Map, Value, json};

use super::{Completion, Opened, StreamGuard, queued, sse};
use crate::backend::{BackendError, Delta, DeltaStream, Usage};
use crate::error::ApiError;
use crate::telemetry::Outcome;

/// Writes `chat.completion.chunk` JSON around a prefix built once per stream.
struct ChunkWriter {
    /// `{"id":…,"object":…,"created":…,"model":…,"system_fingerprint":null,"choices":`
    head: String,
    /// `}` or `,"usage":null}`: what closes a chunk that carries a choice.
    tail: &'static str,
}

impl ChunkWriter {
    fn new(c: &Completion, include_usage: bool) -> Self {
        let head = json!({"id": c.id, "object": "chat.completion.chunk", "created": c.created,
            "model": c.model, "system_fingerprint": null})
        .to_string();
        // Reopen the object to append the choices.
        let head = format!("{},\"choices\":", head.trim_end_matches('}'));
        let tail = if include_usage {
            ",\"usage\":null}"
        } else {
            "}"
        };
        ChunkWriter { head, tail }
    }

    /// A chunk with one choice whose delta is `delta`, written as the concatenation of its
    /// parts into one buffer.
    fn write(&self, delta: &[&str], finish_reason: Option<&str>) -> String {
        let finish = finish_reason.map(|r| json!(r).to_string());
        let len: usize = delta.iter().map(|p| p.len()).sum();
        let mut out = String::with_capacity(self.head.len() + len + 80);
        out.push_str(&self.head);
        out.push_str("[{\"index\":0,\"delta\":");
        delta.iter().for_each(|part| out.push_str(part));
        out.push_str(",\"logprobs\":null,\"finish_reason\":");
        out.push_str(finish.as_deref().unwrap_or("null"));
        out.push_str("}]");
        out.push_str(self.tail);
        out
    }

    fn choice(&self, delta: &str, finish_reason: Option<&str>) -> String {
        self.write(&[delta], finish_reason)
    }

    /// Per token: the text is escaped once and written straight into the chunk.
    fn text(&self, text: &str) -> String {
        let escaped = serde_json::to_string(text).unwrap_or_default();
        self.write(&["{\"content\":", &escaped, "}"], None)
    }

    fn usage(&self, usage: Usage) -> String {
        format!("{}[],\"usage\":{}}}", self.head, json!(usage))
    }
}

/// `POST /v1/chat/completions` with `stream: true`: OpenAI's chunks, then `[DONE]`; a failure
/// after the first byte is a `data: {"error":…}` event and the stream ends without `[DONE]`.
pub fn openai_sse(
    opened: Opened,
    completion: Completion,
    include_usage: bool,
    mut guard: StreamGuard,
    keep_alive: Duration,
) -> Response {
    let writer = ChunkWriter::new(&completion, include_usage);
    let mut stream = opened.into_stream();
    let events = async_stream::stream! {
        yield Ok(Event::default().data(writer.choice(r#"{"role":"assistant","content":""}"#, None)));
        while let Some(item) = stream.next().await {
            match item {
                Ok(Delta::Text(text)) => {
                    guard.delivered();
                    yield Ok(Event::default().data(writer.text(&text)));
                }
                Ok(Delta::Fields(fields)) => {
                    guard.times.token(guard.exchange.arrived().elapsed());
                    yield Ok(Event::default().data(writer.choice(&Value::Object(fields).to_string(), None)));
                }
                Ok(Delta::Finish(reason)) => {
                    yield Ok(Event::default().data(writer.choice("{}", Some(&reason))));
                }
                Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
                Ok(Delta::Queued(ahead)) => yield Ok(queued(ahead)),
                Err(e) => {
                    guard.failed(&e);
                    yield Ok(Event::default().data(ApiError::from(e).body().to_string()));
                    return;
                }
            }
        }
        if include_usage {
            yield Ok(Event::default().data(writer.usage(guard.usage())));
        }
        guard.finish(Outcome::Completed);
        yield Ok(Event::default().data("[DONE]"));
    };
    sse(events, keep_alive)
}

/// `stream: false`: the whole reply as one `chat.completion` object. Dropping this future
/// (the client left) drops the backend stream like a streamed request would.
pub async fn collect(
    stream: DeltaStream,
    completion: Completion,
    mut guard: StreamGuard,
    max_bytes: usize,
) -> Result<Value, ApiError> {
    let mut stream: Pin<Box<dyn Stream<Item = _> + Send>> = stream;
    let mut content = String::new();
    let mut fields = Map::new();
    let mut finish = None;
    // What the reply holds so far, in bytes (fields counted as the upstream sent them).
    let mut size = 0usize;
    while let Some(item) = stream.next().await {
        match &item {
            Ok(Delta::Text(text)) => size = size.saturating_add(text.len()),
            Ok(Delta::Fields(delta)) => {
                size = size.saturating_add(delta.values().map(value_size).sum());
            }
            _ => {}
        }
        if size > max_bytes {
            let e = BackendError::TooLarge(max_bytes);
            guard.failed(&e);
            return Err(e.into());
        }
        match item {
            Ok(Delta::Text(text)) => {
                guard.delivered();
                content.push_str(&text);
            }
            Ok(Delta::Fields(delta)) => merge_fields(&mut fields, delta),
            Ok(Delta::Finish(reason)) => finish = Some(reason),
            Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
            Ok(Delta::Queued(_)) => {}
            Err(e) => {
                guard.failed(&e);
                return Err(e.into());
            }
        }
    }
    guard.finish(Outcome::Completed);
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    let has_tool_calls = fields.contains_key("tool_calls");
    message.insert(
        "content".into(),
        if content.is_empty() && has_tool_calls {
            Value::Null
        } else {
            Value::String(content)
        },
    );
    message.extend(fields);
    Ok(json!({
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": guard.usage(),
    }))
}

/// Roughly the bytes a JSON value takes: its strings' lengths plus a little per item.
fn value_size(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len() + 2,
        Value::Array(items) => items.iter().map(value_size).sum::<usize>() + 2,
        Value::Object(map) => {
            map.iter()
                .map(|(k, v)| k.len() + 3 + value_size(v))
                .sum::<usize>()
                + 2
        }
        _ => 8,
    }
}

/// Folds one streamed delta into the message so far, the way OpenAI's SDKs do: strings
/// append (`function.arguments`), objects merge, list items merge by their `index`.
fn merge_fields(into: &mut Map<String, Value>, delta: Map<String, Value>) {
    for (key, value) in delta {
        match (into.get_mut(&key), value) {
            (Some(Value::String(have)), Value::String(more)) if key != "index" => {
                if key == "id" || key == "type" {
                    *have = more;
                } else {
                    have.push_str(&more);
                }
            }
            (Some(Value::Object(have)), Value::Object(more)) => merge_fields(have, more),
            (Some(Value::Array(have)), Value::Array(more)) => {
                for item in more {
                    let index = item.get("index").cloned();
                    let slot = have
                        .iter_mut()
                        .find(|h| index.is_some() && h.get("index") == index.as_ref());
                    match (slot, item) {
                        (Some(Value::Object(h)), Value::Object(m)) => merge_fields(h, m),
                        (_, item) => have.push(item),
                    }
                }
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_deltas_merge_like_the_sdks() {
        let mut message = Map::new();
        let parts = [
            json!({"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}),
            json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}),
            json!({"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}),
        ];
        for part in parts {
            let Value::Object(part) = part else {
                unreachable!()
            };
            merge_fields(&mut message, part);
        }
        assert_eq!(
            Value::Object(message),
            json!({"tool_calls":[{"index":0,"id":"call_1","type":"function",
                "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]})
        );
    }

    #[test]
    fn chunks_are_valid_json_with_the_shared_identity() {
        let c = Completion::new("m\"odel");
        let writer = ChunkWriter::new(&c, true);
        let chunk: Value = serde_json::from_str(&writer.text("a\n\"b")).expect("valid JSON");
        assert_eq!(chunk["model"], "m\"odel");
        assert_eq!(chunk["choices"][0]["delta"]["content"], "a\n\"b");
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        let usage: Value = serde_json::from_str(&writer.usage(Usage::new(2, 3))).expect("JSON");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
    }
}
