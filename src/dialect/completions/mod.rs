//! OpenAI chat completions: the request (`request.rs`), the encoder (`chat.completion.chunk`
//! events, then `[DONE]`; a failure after the first byte is a `data: {"error":…}` event
//! and no `[DONE]`), and the `chat.completion` a stream's events add up to (for
//! `stream: false`, and for a finished stream read back whole).

pub mod request;
pub mod upstream;
pub mod wire;

use bytes::BytesMut;
use serde_json::{Map, Value, json};

use crate::backend::{Delta, Raw, ToolCall, Usage};
use crate::error::ApiError;
use crate::relay::{Completion, End, Out, put};

/// What a chat completion's id begins with.
pub const ID_PREFIX: &str = "chatcmpl-";

/// Writes `chat.completion.chunk` JSON around a prefix built once per stream (again only
/// when the upstream's own chunk fields change).
struct ChunkWriter {
    /// `{"id":…,"object":…,"created":…,"model":…,"system_fingerprint":…,"choices":`
    head: String,
    /// `}` or `,"usage":null}`: what closes a chunk that carries a choice.
    tail: &'static str,
    /// The upstream's `logprobs` for the next choice written.
    logprobs: Option<Raw>,
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
        let id = format!("{ID_PREFIX}{}", c.token);
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": c.created,
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

    /// The usage chunk: the counts, the upstream's details, and `cost` (USD) when the model
    /// has a price (the field OpenRouter's clients read).
    fn usage(&self, buf: &mut BytesMut, usage: Usage, cost: Option<f64>) {
        put(buf, &self.head);
        put(buf, "[],\"usage\":");
        let counts = json!(usage).to_string();
        put(buf, counts.trim_end_matches('}'));
        if let Some(details) = &self.usage_details {
            put(buf, ",");
            put(buf, details);
        }
        if let Some(cost) = cost {
            put(buf, ",\"cost\":");
            put(buf, &json!(cost).to_string());
        }
        put(buf, "}}");
    }
}

/// The chat completions encoder for one reply.
pub struct Encoder {
    writer: ChunkWriter,
    completion: Completion,
    include_usage: bool,
    role_sent: bool,
}

impl Encoder {
    /// `include_usage`: the client asked for the usage chunk (`stream_options`); a reply
    /// answered whole always has it.
    pub fn new(completion: Completion, include_usage: bool) -> Self {
        Encoder {
            writer: ChunkWriter::new(&completion, include_usage),
            completion,
            include_usage,
            role_sent: false,
        }
    }
}

impl crate::relay::Encoder for Encoder {
    fn event(&mut self, delta: Delta, out: &mut Out) {
        let writer = &mut self.writer;
        // The role chunk goes first, with the upstream's identity when it came first.
        if !self.role_sent && !matches!(delta, Delta::Identity(_)) {
            self.role_sent = true;
            // As OpenAI writes it: `content: null` before tool calls (and other fields),
            // `""` before text.
            let role = match delta {
                Delta::ChatFields(_) | Delta::Reasoning(_) | Delta::ToolCall(_) => {
                    r#"{"role":"assistant","content":null}"#
                }
                _ => r#"{"role":"assistant","content":""}"#,
            };
            out.event(None, |b| writer.choice(b, &[role], None));
        }
        match delta {
            // Per token: the text's JSON literal, as it came, into the one buffer.
            Delta::Text(text) => out.event(None, |b| {
                writer.choice(b, &["{\"content\":", text.json(), "}"], None)
            }),
            Delta::Reasoning(text) => out.event(None, |b| {
                writer.choice(b, &["{\"reasoning_content\":", text.json(), "}"], None)
            }),
            Delta::ToolCall(call) => {
                let head = tool_call_head(&call);
                out.event(None, |b| {
                    writer.choice(b, &[&head, call.arguments.json(), "}}]}"], None)
                })
            }
            Delta::ChatFields(fields) => {
                out.event(None, |b| writer.choice(b, &[fields.json()], None))
            }
            Delta::Finish(reason) => {
                out.event(None, |b| writer.choice(b, &["{}"], Some(reason.chat())))
            }
            Delta::Identity(identity) => {
                writer.head = ChunkWriter::head(&self.completion, &identity)
            }
            Delta::Logprobs(logprobs) => writer.logprobs = Some(logprobs),
            Delta::UsageDetails(details) => writer.usage_details = Some(details),
            // As OpenAI writes its own (`url_citation`): in the delta's `annotations`.
            Delta::Annotation(annotation) => out.event(None, |b| {
                writer.choice(b, &["{\"annotations\":[", annotation.json(), "]}"], None)
            }),
            // Another API's proof of reasoning: chat completions have no place for it.
            Delta::Signature(_) | Delta::Redacted(_) => out.left_out("signed reasoning"),
            Delta::Untranslated(what) => out.left_out(&what),
            // Metered by the loop; written at the end.
            Delta::Usage(_) | Delta::Queued(_) | Delta::Event(_) => {}
        }
    }

    fn end(&mut self, end: &End, out: &mut Out) {
        if self.include_usage {
            let writer = &self.writer;
            out.event(None, |b| writer.usage(b, end.usage, end.cost));
        }
        out.json(None, "[DONE]");
    }

    fn fail(&mut self, error: &ApiError, out: &mut Out) {
        self::error(error, out);
    }
}

/// A tool call piece's delta up to its arguments: `{"tool_calls":[{"index":0,"id":…,
/// "type":"function","function":{"name":…,"arguments":`, as OpenAI writes it (the id,
/// type and name in the first piece only).
fn tool_call_head(call: &ToolCall) -> String {
    let mut head = format!("{{\"tool_calls\":[{{\"index\":{}", call.index);
    if let Some(id) = &call.id {
        head.push_str(",\"id\":");
        head.push_str(&json!(id).to_string());
        head.push_str(",\"type\":\"function\"");
    }
    head.push_str(",\"function\":{");
    if let Some(name) = &call.name {
        head.push_str("\"name\":");
        head.push_str(&json!(name).to_string());
        head.push(',');
    }
    head.push_str("\"arguments\":");
    head
}

/// The event that ends a stream with `error`: OpenAI's error body, no `[DONE]`.
pub fn error(error: &ApiError, out: &mut Out) {
    out.json(None, &error.body().to_string());
}

/// The `chat.completion` that a finished stream's logged events add up to (for a client
/// that resumes a stream without streaming), or the error body it ended with. The usage is
/// there when the stream asked for it (`stream_options.include_usage`), else `null`.
pub fn assemble<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Result<Value, Value> {
    let mut assembler = Assembler::default();
    for event in events {
        assembler.push(event);
    }
    assembler.finish()
}

/// A `chat.completion` assembled event by event, so that a reply read whole holds only
/// what it adds up to, never its events.
#[derive(Default)]
pub struct Assembler {
    reply: Map<String, Value>,
    message: Map<String, Value>,
    content: String,
    finish: Value,
    usage: Value,
    logprobs: Option<Map<String, Value>>,
    /// The error body the stream ended with.
    error: Option<Value>,
}

impl Assembler {
    /// Folds in one event as written.
    pub fn push(&mut self, event: &[u8]) {
        let Some(Value::Object(mut chunk)) = crate::relay::payload(event) else {
            return; // `[DONE]`
        };
        if chunk.contains_key("error") {
            self.error.get_or_insert(Value::Object(chunk));
            return;
        }
        if let Some(Value::Array(choices)) = chunk.remove("choices")
            && let Some(Value::Object(mut choice)) = choices.into_iter().next()
        {
            if let Some(Value::Object(mut delta)) = choice.remove("delta") {
                if let Some(Value::String(text)) = delta.remove("content") {
                    self.content.push_str(&text);
                }
                delta.remove("role");
                merge_fields(&mut self.message, delta);
            }
            if let Some(reason) = choice.remove("finish_reason").filter(|r| !r.is_null()) {
                self.finish = reason;
            }
            if let Some(Value::Object(more)) = choice.remove("logprobs") {
                merge_logprobs(&mut self.logprobs, more);
            }
        }
        if let Some(u) = chunk.remove("usage").filter(|u| !u.is_null()) {
            self.usage = u;
        }
        if self.reply.is_empty() {
            self.reply = chunk;
        }
    }

    /// The `chat.completion`, or the error body the stream ended with.
    pub fn finish(self) -> Result<Value, Value> {
        let Assembler {
            mut reply,
            mut message,
            content,
            finish,
            usage,
            logprobs,
            error,
        } = self;
        if let Some(error) = error {
            return Err(error);
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
        message.entry("annotations").or_insert(json!([]));
        strip_index(&mut message);
        reply.insert("object".into(), json!("chat.completion"));
        reply.insert(
            "choices".into(),
            json!([{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}]),
        );
        reply.insert("usage".into(), usage);
        Ok(Value::Object(reply))
    }
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
    use crate::backend::{Finish, Text};
    use crate::relay::Must;
    use crate::relay::{CANNED_END, Encoder as _, canned, payloads};

    #[test]
    fn text_streams_as_chunks_then_usage_then_done() -> Result<(), String> {
        let mut encoder = Encoder::new(Completion::new("m"), true);
        let deltas = vec![
            Delta::Text(Text::plain("Hel")),
            Delta::Text(Text::plain("lo")),
            Delta::Finish(Finish::Stop),
        ];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let data = payloads(&events);
        assert_eq!(
            data[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(data[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(data[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(data[4]["usage"]["total_tokens"], 5);
        assert_eq!(data[4]["choices"], json!([]));
        assert!(events[5].ends_with("data: [DONE]\n\n"), "{}", events[5]);
        // Every chunk shares one identity and is numbered.
        assert!(data[..5].iter().all(|c| c["id"] == data[0]["id"]));
        assert!(events[0].starts_with("retry: 1000\nid: 1\n"));
        assert!(events[5].starts_with("id: 6\n"));
        let reply = assemble(events.iter().map(|e| e.as_bytes())).must("a reply")?;
        assert_eq!(reply["choices"][0]["message"]["content"], "Hello");
        assert_eq!(reply["usage"]["completion_tokens"], 2);
        Ok(())
    }

    #[test]
    fn tool_calls_open_with_content_null_and_assemble_whole() -> Result<(), String> {
        let mut encoder = Encoder::new(Completion::new("m"), false);
        let deltas = vec![
            ToolCall::start(0, "c1", "f"),
            ToolCall::more(0, "{\"a\":1}"),
            Delta::Finish(Finish::ToolUse),
        ];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let data = payloads(&events);
        assert_eq!(
            data[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": null})
        );
        // No usage chunk unless asked for.
        assert_eq!(events.len(), 5);
        let reply = assemble(events.iter().map(|e| e.as_bytes())).must("a reply")?;
        let message = &reply["choices"][0]["message"];
        assert!(message["content"].is_null());
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert!(message["tool_calls"][0].get("index").is_none());
        Ok(())
    }

    #[test]
    fn a_failure_is_the_openai_error_body_and_no_done() {
        let mut encoder = Encoder::new(Completion::new("m"), false);
        let mut events = canned(&mut encoder, vec![Delta::Text(Text::plain("a"))], None);
        let mut out = Out::numbered_from(2);
        encoder.fail(&ApiError::StreamCancelled, &mut out);
        events.extend(out.take().map(|e| String::from_utf8_lossy(&e).into_owned()));
        assert_eq!(payloads(&events)[2]["error"]["code"], "stream_cancelled");
        let ended = assemble(events.iter().map(|e| e.as_bytes()));
        assert!(ended.is_err());
    }

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
    fn chunks_are_valid_json_with_the_shared_identity() -> Result<(), String> {
        let c = Completion::new("m\"odel");
        let mut writer = ChunkWriter::new(&c, true);
        let text = crate::backend::Text::plain("a\n\"b");
        let mut buf = BytesMut::new();
        writer.choice(&mut buf, &["{\"content\":", text.json(), "}"], None);
        let chunk: Value = serde_json::from_slice(&buf.split()).must("valid JSON")?;
        assert_eq!(chunk["model"], "m\"odel");
        assert_eq!(chunk["choices"][0]["delta"]["content"], "a\n\"b");
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        writer.usage(&mut buf, Usage::new(2, 3), Some(0.25));
        let usage: Value = serde_json::from_slice(&buf).must("JSON")?;
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
        assert_eq!(usage["usage"]["cost"], 0.25);
        Ok(())
    }
}
