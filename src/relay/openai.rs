//! The OpenAI chat completions encoder: `chat.completion.chunk` events for a stream, and
//! the assembled `chat.completion` for `stream: false`.

use bytes::{Bytes, BytesMut};
use futures::Stream;
use serde_json::{Map, Value, json};

use super::{Completion, Opened, SseWriter, StreamGuard, put, queued};
use crate::backend::{BackendError, Delta, Fields, Usage};
use crate::error::ApiError;
use crate::telemetry::Outcome;

/// Writes `chat.completion.chunk` JSON around a prefix built once per stream (again only
/// when the upstream's own chunk fields change).
struct ChunkWriter {
    /// `{"id":…,"object":…,"created":…,"model":…,"system_fingerprint":…,"choices":`
    head: String,
    /// `}` or `,"usage":null}`: what closes a chunk that carries a choice.
    tail: &'static str,
    /// The upstream's `logprobs` for the next choice written.
    logprobs: Option<Fields>,
    /// The upstream's usage fields beyond the counts.
    usage_details: Option<Box<str>>,
}

impl ChunkWriter {
    fn new(c: &Completion, include_usage: bool) -> Self {
        let tail = if include_usage {
            ",\"usage\":null}"
        } else {
            "}"
        };
        ChunkWriter {
            head: Self::head(c, "\"system_fingerprint\":null"),
            tail,
            logprobs: None,
            usage_details: None,
        }
    }

    /// The chunk's own fields: sluice's identity, then the upstream's (`identity`).
    fn head(c: &Completion, identity: &str) -> String {
        let head = json!({"id": c.id, "object": "chat.completion.chunk", "created": c.created,
            "model": c.model})
        .to_string();
        // Reopen the object to append the rest.
        let fingerprint = if identity.contains("\"system_fingerprint\"") {
            ""
        } else {
            "\"system_fingerprint\":null,"
        };
        format!(
            "{},{fingerprint}{identity},\"choices\":",
            head.trim_end_matches('}')
        )
    }

    /// A chunk with one choice whose delta is the concatenation of `delta`'s parts.
    fn choice(&mut self, buf: &mut BytesMut, delta: &[&str], finish_reason: Option<&str>) {
        put(buf, &self.head);
        put(buf, "[{\"index\":0,\"delta\":");
        delta.iter().for_each(|part| put(buf, part));
        put(buf, ",\"logprobs\":");
        match self.logprobs.take() {
            Some(logprobs) => put(buf, logprobs.json()),
            None => put(buf, "null"),
        }
        put(buf, ",\"finish_reason\":");
        match finish_reason {
            Some(reason) => put(buf, &serde_json::to_string(reason).unwrap_or_default()),
            None => put(buf, "null"),
        }
        put(buf, "}]");
        put(buf, self.tail);
    }

    fn usage(&self, buf: &mut BytesMut, usage: Usage) {
        put(buf, &self.head);
        put(buf, "[],\"usage\":");
        let counts = json!(usage).to_string();
        match &self.usage_details {
            Some(details) => {
                put(buf, counts.trim_end_matches('}'));
                put(buf, ",");
                put(buf, details);
                put(buf, "}");
            }
            None => put(buf, &counts),
        }
        put(buf, "}");
    }
}

/// `POST /v1/chat/completions` with `stream: true`: OpenAI's chunks, then `[DONE]`; a failure
/// after the first byte is a `data: {"error":…}` event and the stream ends without `[DONE]`.
pub fn openai_events(
    mut opened: Opened,
    completion: Completion,
    include_usage: bool,
    mut guard: StreamGuard,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let mut writer = ChunkWriter::new(&completion, include_usage);
    async_stream::stream! {
        let mut out = SseWriter::new();
        out.retry();
        let mut role_sent = false;
        while let Some(item) = opened.next().await {
            // The role chunk goes first, with the upstream's identity when it came first.
            if !role_sent && !matches!(item, Ok(Delta::Identity(_))) {
                role_sent = true;
                // As OpenAI writes it: `content: null` before tool calls (and other fields),
                // `""` before text.
                let role = match item {
                    Ok(Delta::Fields(_)) => r#"{"role":"assistant","content":null}"#,
                    _ => r#"{"role":"assistant","content":""}"#,
                };
                yield out.event(None, |b| writer.choice(b, &[role], None));
            }
            match item {
                Ok(Delta::Text(text)) => {
                    guard.delivered();
                    // Per token: the text's JSON literal, as it came, into the one buffer.
                    yield out.event(None, |b| writer.choice(b, &["{\"content\":", text.json(), "}"], None));
                }
                Ok(Delta::Fields(fields)) => {
                    guard.times.token(guard.exchange.arrived().elapsed());
                    yield out.event(None, |b| writer.choice(b, &[fields.json()], None));
                }
                Ok(Delta::Finish(reason)) => {
                    yield out.event(None, |b| writer.choice(b, &["{}"], Some(&reason)));
                }
                Ok(Delta::Identity(identity)) => writer.head = ChunkWriter::head(&completion, &identity),
                Ok(Delta::Logprobs(logprobs)) => writer.logprobs = Some(logprobs),
                Ok(Delta::UsageDetails(details)) => writer.usage_details = Some(details),
                Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
                Ok(Delta::Queued(ahead)) => yield queued(&mut out, ahead),
                // Native events come only to the route that speaks their API.
                Ok(Delta::Event(_)) => {}
                Err(e) => {
                    guard.failed(&e);
                    let body = ApiError::from(e).body().to_string();
                    yield out.event(None, |b| put(b, &body));
                    return;
                }
            }
        }
        if include_usage {
            let usage = guard.usage();
            yield out.event(None, |b| writer.usage(b, usage));
        }
        guard.finish(Outcome::Completed);
        yield out.event(None, |b| put(b, "[DONE]"));
    }
}

/// `stream: false`: the whole reply as one `chat.completion` object. Dropping this future
/// (the client left) drops the backend stream like a streamed request would.
pub async fn collect(
    mut opened: Opened,
    completion: Completion,
    mut guard: StreamGuard,
    max_bytes: usize,
) -> Result<Value, ApiError> {
    let mut content = String::new();
    let mut fields = Map::new();
    let mut finish = None;
    let mut identity = None;
    let mut usage_details = None;
    let mut assembled_logprobs: Option<Map<String, Value>> = None;
    // What the reply holds so far, in bytes as written.
    let mut size = 0usize;
    while let Some(item) = opened.next().await {
        match &item {
            Ok(Delta::Text(text)) => size = size.saturating_add(text.len()),
            Ok(Delta::Fields(delta)) => size = size.saturating_add(delta.json().len()),
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
                text.push_to(&mut content);
            }
            Ok(Delta::Fields(delta)) => {
                if let Ok(Value::Object(delta)) = serde_json::from_str(delta.json()) {
                    merge_fields(&mut fields, delta);
                }
            }
            Ok(Delta::Finish(reason)) => finish = Some(reason),
            Ok(Delta::Identity(fields)) => identity = Some(fields),
            Ok(Delta::UsageDetails(details)) => usage_details = Some(details),
            Ok(Delta::Logprobs(logprobs)) => {
                if let Ok(Value::Object(more)) = serde_json::from_str(logprobs.json()) {
                    merge_logprobs(&mut assembled_logprobs, more);
                }
            }
            Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
            Ok(Delta::Queued(_) | Delta::Event(_)) => {}
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
    // As OpenAI writes a message: `refusal` and `annotations` always there.
    message.insert("refusal".into(), Value::Null);
    message.insert("annotations".into(), json!([]));
    message.extend(fields);
    strip_index(&mut message);
    let mut usage = json!(guard.usage());
    if let (Some(details), Value::Object(usage)) = (usage_details, &mut usage)
        && let Ok(Value::Object(details)) = serde_json::from_str(&format!("{{{details}}}"))
    {
        usage.extend(details);
    }
    let mut reply = json!({
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "message": message, "logprobs": assembled_logprobs, "finish_reason": finish}],
        "usage": usage,
    });
    if let (Some(identity), Value::Object(reply)) = (identity, &mut reply)
        && let Ok(Value::Object(fields)) = serde_json::from_str(&format!("{{{identity}}}"))
    {
        reply.extend(fields);
    }
    Ok(reply)
}

/// The `chat.completion` that a finished stream's logged events add up to (for a client
/// that resumes a stream without streaming), or the error body it ended with. The usage is
/// there when the stream asked for it (`stream_options.include_usage`), else `null`.
pub fn assemble<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Result<Value, Value> {
    let mut reply = Map::new();
    let mut message = Map::new();
    let mut content = String::new();
    let mut finish = Value::Null;
    let mut usage = Value::Null;
    for event in events {
        let Some(Value::Object(mut chunk)) = super::payload(event) else {
            continue; // `[DONE]`
        };
        if chunk.contains_key("error") {
            return Err(Value::Object(chunk));
        }
        if let Some(Value::Array(choices)) = chunk.remove("choices")
            && let Some(Value::Object(mut choice)) = choices.into_iter().next()
        {
            if let Some(Value::Object(mut delta)) = choice.remove("delta") {
                if let Some(Value::String(text)) = delta.remove("content") {
                    content.push_str(&text);
                }
                delta.remove("role");
                merge_fields(&mut message, delta);
            }
            if let Some(reason) = choice.remove("finish_reason").filter(|r| !r.is_null()) {
                finish = reason;
            }
        }
        if let Some(u) = chunk.remove("usage").filter(|u| !u.is_null()) {
            usage = u;
        }
        if reply.is_empty() {
            reply = chunk;
        }
    }
    let has_tool_calls = message.contains_key("tool_calls");
    message.insert("role".into(), json!("assistant"));
    message.insert(
        "content".into(),
        if content.is_empty() && has_tool_calls {
            Value::Null
        } else {
            Value::String(content)
        },
    );
    message.entry("refusal").or_insert(Value::Null);
    message.insert("annotations".into(), json!([]));
    strip_index(&mut message);
    reply.insert("object".into(), json!("chat.completion"));
    reply.insert(
        "choices".into(),
        json!([{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}]),
    );
    reply.insert("usage".into(), usage);
    Ok(Value::Object(reply))
}

/// Streamed `logprobs` (`{"content": [...], "refusal": [...]}` per chunk) as one: the lists
/// joined in order.
fn merge_logprobs(into: &mut Option<Map<String, Value>>, more: Map<String, Value>) {
    let into = into.get_or_insert_with(Map::new);
    for (key, value) in more {
        match (into.get_mut(&key), value) {
            (Some(Value::Array(have)), Value::Array(more)) => have.extend(more),
            (_, Value::Null) => {
                into.entry(key).or_insert(Value::Null);
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// An assembled message's `tool_calls` without the stream-only `index` keys.
fn strip_index(message: &mut Map<String, Value>) {
    if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
        for call in calls {
            if let Value::Object(call) = call {
                call.remove("index");
            }
        }
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
        let mut writer = ChunkWriter::new(&c, true);
        let text = crate::backend::Text::plain("a\n\"b");
        let mut buf = BytesMut::new();
        writer.choice(&mut buf, &["{\"content\":", text.json(), "}"], None);
        let chunk: Value = serde_json::from_slice(&buf.split()).expect("valid JSON");
        assert_eq!(chunk["model"], "m\"odel");
        assert_eq!(chunk["choices"][0]["delta"]["content"], "a\n\"b");
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        writer.usage(&mut buf, Usage::new(2, 3));
        let usage: Value = serde_json::from_slice(&buf).expect("JSON");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
    }
}
