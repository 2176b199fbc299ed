//! Anthropic's Messages API encoder: canonical events to Anthropic's stream —
//! `message_start`, a `ping`, then per content block `content_block_start`, its deltas
//! (`text_delta`, `input_json_delta` for tool input, `thinking_delta` for reasoning),
//! `content_block_stop`; a new block whenever the kind changes, opened before the delta
//! that changed it; then `message_delta` (stop reason, usage) and `message_stop`. A failure
//! after the first event is an `error` event with Anthropic's body. Also the message a
//! stream's events add up to, and Anthropic's error body for any [`ApiError`].

pub mod request;
pub mod upstream;

use std::fmt::Write as _;

use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use super::completions::wire::lenient;
use crate::backend::{Delta, Finish, Signature, ToolCall, Usage};
use crate::error::ApiError;
use crate::relay::{End, Out, Relayed, payload, put};

/// What a message's id begins with.
pub const ID_PREFIX: &str = "msg_";

/// What Anthropic's clients are sent to keep a quiet stream open.
pub const PING: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

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

/// The stop reason of a finish.
fn stop_reason(finish: Option<&Finish>) -> &'static str {
    match finish.map(Finish::kind) {
        Some(Finish::Length) => "max_tokens",
        Some(Finish::ToolUse) => "tool_use",
        Some(Finish::Filtered) => "refusal",
        _ => "end_turn",
    }
}

#[derive(PartialEq)]
enum Block {
    Text,
    Thinking,
    /// A tool call: the `index` its later pieces name.
    Tool(u32),
}

/// The Messages encoder for one message.
pub struct Encoder {
    meta: Meta,
    /// The prompt's size as sluice counted it, for `message_start`.
    input_tokens: u32,
    /// The block open now, and its index.
    open: Option<(Block, usize)>,
    next: usize,
    finish: Option<Finish>,
    /// A relayed message's input tokens, from its `message_start`.
    relayed_input: Option<u32>,
    /// A relayed message's prompt tokens read from and written to the cache (counted apart
    /// from its input tokens).
    relayed_cache: Option<(u32, u32)>,
}

/// Writes event `name` with `data`.
fn event(out: &mut Out, name: &str, data: &Value) {
    out.json(Some(name), &data.to_string());
}

impl Encoder {
    pub fn new(meta: Meta, input_tokens: u32) -> Self {
        Encoder {
            meta,
            input_tokens,
            open: None,
            next: 0,
            finish: None,
            relayed_input: None,
            relayed_cache: None,
        }
    }

    /// A relayed message's whole prompt: its input tokens and those of its cache.
    fn whole_prompt(&self, input: u32) -> u32 {
        let (read, written) = self.relayed_cache.unwrap_or_default();
        input.saturating_add(read).saturating_add(written)
    }

    /// The cached parts of a relayed message's prompt, priced apart.
    fn relayed_details(&self) -> Option<crate::prices::Details> {
        self.relayed_cache
            .map(|(cached, cache_write)| crate::prices::Details {
                cached,
                cache_write,
                reasoning: 0,
            })
    }

    fn stop(&mut self, out: &mut Out) {
        if let Some((_, index)) = self.open.take() {
            event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Opens a block of `kind` (closing the one before) unless one is open already.
    /// (`block` is written only when one opens: not once per token.)
    fn start(&mut self, kind: Block, block: impl FnOnce() -> Value, out: &mut Out) -> usize {
        if let Some((open, index)) = &self.open
            && *open == kind
        {
            return *index;
        }
        self.stop(out);
        let index = self.next;
        self.next += 1;
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block()}),
        );
        self.open = Some((kind, index));
        index
    }

    /// Reasoning, in a thinking block.
    fn reasoning(&mut self, text: &crate::backend::Text, out: &mut Out) {
        if text.is_empty() {
            return;
        }
        let index = self.start(
            Block::Thinking,
            || json!({"type": "thinking", "thinking": "", "signature": ""}),
            out,
        );
        out.event(Some("content_block_delta"), |b| {
            put(b, "{\"type\":\"content_block_delta\",\"index\":");
            let _ = write!(b, "{index}");
            put(b, ",\"delta\":{\"type\":\"thinking_delta\",\"thinking\":");
            put(b, text.json());
            put(b, "}}");
        });
    }

    /// A piece of a tool call: its `tool_use` block (opened by its first piece) and the
    /// arguments as `input_json_delta`.
    fn tool_call(&mut self, call: ToolCall, out: &mut Out) {
        let (id, name) = (call.id, call.name);
        let block = || {
            let id = id.unwrap_or_else(|| format!("toolu_{}", uuid::Uuid::new_v4().simple()));
            json!({"type": "tool_use", "id": id, "name": name.unwrap_or_default(), "input": {}})
        };
        let index = self.start(Block::Tool(call.index), block, out);
        if !call.arguments.is_empty() {
            out.event(Some("content_block_delta"), |b| {
                put(b, "{\"type\":\"content_block_delta\",\"index\":");
                let _ = write!(b, "{index}");
                put(
                    b,
                    ",\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":",
                );
                put(b, call.arguments.json());
                put(b, "}}");
            });
        }
    }
}

impl crate::relay::Encoder for Encoder {
    fn open(&mut self, out: &mut Out) {
        let start = json!({"type": "message_start", "message": {"id": self.meta.id, "type": "message",
            "role": "assistant", "model": self.meta.model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": self.input_tokens, "output_tokens": 1,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}});
        event(out, "message_start", &start);
        event(out, "ping", &json!({"type": "ping"}));
    }

    fn event(&mut self, delta: Delta, out: &mut Out) {
        match delta {
            Delta::Text(text) => {
                let index = self.start(Block::Text, || json!({"type": "text", "text": ""}), out);
                // Per token: the text's JSON literal, as it came.
                out.event(Some("content_block_delta"), |b| {
                    put(b, "{\"type\":\"content_block_delta\",\"index\":");
                    let _ = write!(b, "{index}");
                    put(b, ",\"delta\":{\"type\":\"text_delta\",\"text\":");
                    put(b, text.json());
                    put(b, "}}");
                });
            }
            Delta::Reasoning(text) => self.reasoning(&text, out),
            Delta::ToolCall(call) => self.tool_call(call, out),
            Delta::Signature(Signature::Anthropic(signature)) => {
                let index = self.start(
                    Block::Thinking,
                    || json!({"type": "thinking", "thinking": "", "signature": ""}),
                    out,
                );
                event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "signature_delta", "signature": signature}}),
                );
            }
            Delta::Redacted(data) => {
                self.stop(out);
                let index = self.next;
                self.next += 1;
                event(
                    out,
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "redacted_thinking", "data": data}}),
                );
                event(
                    out,
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": index}),
                );
            }
            Delta::Annotation(citation) => {
                if let Some((Block::Text, index)) = &self.open {
                    let citation: Value = serde_json::from_str(citation.json()).unwrap_or_default();
                    event(
                        out,
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "citations_delta", "citation": citation}}),
                    );
                }
            }
            // Another API's proof of reasoning: no Anthropic client can send it back.
            Delta::Signature(Signature::Encrypted(_)) => out.left_out("encrypted reasoning"),
            Delta::Untranslated(what) => out.left_out(&what),
            Delta::Finish(reason) => self.finish = Some(reason),
            _ => {}
        }
    }

    fn end(&mut self, end: &End, out: &mut Out) {
        self.stop(out);
        let usage = end.usage;
        event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(self.finish.as_ref()), "stop_sequence": null, "stop_details": null},
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}),
        );
        event(out, "message_stop", &json!({"type": "message_stop"}));
    }

    fn fail(&mut self, error: &ApiError, out: &mut Out) {
        self::error(error, out);
    }

    /// One event of an upstream that speaks the Messages API, relayed as it came but for the
    /// message's `id` (sluice's, so the stream can be resumed under it).
    fn relay(&mut self, raw: &str, out: &mut Out) -> Relayed {
        let mut seen = Relayed::default();
        let Ok(event) = serde_json::from_str::<Head>(raw) else {
            out.json(None, raw);
            return seen;
        };
        let clamp = |n: Option<u64>| n.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        // Where the event holds the upstream's id for the message, to write as sluice's.
        let mut swap = None;
        match &*event.kind {
            "message_start" => {
                let message = event.message.unwrap_or_default();
                swap = Some(("/message/id", message.id.as_deref()));
                let usage = message.usage.unwrap_or_default();
                self.relayed_cache = usage.cache();
                if let Some(input) = clamp(usage.input_tokens) {
                    self.relayed_input = Some(input);
                    seen.usage = Some(Usage::new(self.whole_prompt(input), 0));
                    seen.details = self.relayed_details();
                }
                out.relayed(raw, &event.kind, swap, &self.meta.id);
                return seen;
            }
            "content_block_delta" => {
                seen.text = event.delta.and_then(|d| d.kind).as_deref() == Some("text_delta");
            }
            "message_delta" => {
                let usage = event.usage.unwrap_or_default();
                let input = clamp(usage.input_tokens)
                    .or(self.relayed_input)
                    .unwrap_or(0);
                if let Some(cache) = usage.cache() {
                    self.relayed_cache = Some(cache);
                }
                if let Some(output) = clamp(usage.output_tokens) {
                    seen.usage = Some(Usage::new(self.whole_prompt(input), output));
                    seen.details = self.relayed_details();
                }
            }
            "message_stop" => seen.ended = Some(Ok(())),
            "error" => {
                let message = event
                    .error
                    .and_then(|e| e.message)
                    .unwrap_or_else(|| "the upstream's message failed".to_owned());
                seen.ended = Some(Err(message));
            }
            _ => {}
        }
        out.relayed(raw, &event.kind, swap, &self.meta.id);
        seen
    }
}

/// What the relay reads of an event of an upstream that speaks the Messages API.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, deserialize_with = "lenient")]
    message: Option<MessageHead>,
    #[serde(default, borrow)]
    delta: Option<DeltaHead<'a>>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<upstream::Counts>,
    #[serde(default, deserialize_with = "lenient")]
    error: Option<upstream::Failure>,
}

#[derive(serde::Deserialize, Default)]
struct MessageHead {
    #[serde(default, deserialize_with = "lenient")]
    id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<upstream::Counts>,
}

#[derive(serde::Deserialize)]
struct DeltaHead<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// The `error` event that ends a stream, in Anthropic's shape.
pub fn error(error: &ApiError, out: &mut Out) {
    event(out, "error", &error_body(error));
}

/// The message a stream's events add up to (for `stream: false`), or the error body it
/// ended with.
pub fn assemble<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Result<Value, Value> {
    let mut message: Option<Map<String, Value>> = None;
    // Each block as it started, and what its deltas added: text, thinking, tool input.
    let mut blocks: Vec<(Value, String, String, String)> = Vec::new();
    for event in events {
        let Some(payload) = payload(event) else {
            continue;
        };
        let Ok(event) = Logged::deserialize(&payload) else {
            continue;
        };
        match (event.kind.as_str(), message.as_mut()) {
            ("message_start", _) => {
                message = match event.message {
                    Value::Object(m) => Some(m),
                    _ => None,
                };
                blocks.clear();
            }
            ("content_block_start", Some(_)) => {
                blocks.push((
                    event.content_block,
                    String::new(),
                    String::new(),
                    String::new(),
                ));
            }
            ("content_block_delta", Some(_)) => {
                // An index no block has (an upstream's mistake) is skipped, not a panic.
                let Some((_, text, thinking, input)) = blocks.get_mut(event.index) else {
                    continue;
                };
                let delta = event.delta.unwrap_or_default();
                match delta.kind.as_deref() {
                    Some("text_delta") => text.push_str(&delta.text),
                    Some("thinking_delta") => thinking.push_str(&delta.thinking),
                    Some("input_json_delta") => input.push_str(&delta.partial_json),
                    _ => {}
                }
            }
            ("message_delta", Some(message)) => {
                let delta = event.delta.unwrap_or_default();
                message.insert("stop_reason".into(), delta.stop_reason);
                message.insert("stop_sequence".into(), delta.stop_sequence);
                if let Some(Value::Object(have)) = message.get_mut("usage") {
                    have.extend(event.usage.unwrap_or_default());
                }
            }
            ("error", _) => return Err(payload),
            _ => {}
        }
    }
    let Some(mut message) = message else {
        return Ok(Value::Null);
    };
    let content: Vec<Value> = blocks
        .into_iter()
        .map(|(mut block, text, thinking, input)| {
            if let Value::Object(block) = &mut block {
                let kind = block
                    .get_mut("type")
                    .and_then(|t| t.as_str().map(str::to_owned));
                for (key, more) in [("text", text), ("thinking", thinking)] {
                    if let Some(Value::String(have)) = block.get_mut(key) {
                        have.push_str(&more);
                    } else if !more.is_empty() {
                        block.insert(key.into(), Value::String(more));
                    }
                }
                if kind.as_deref() == Some("tool_use") && !input.is_empty() {
                    let input = serde_json::from_str(&input).unwrap_or(Value::Object(Map::new()));
                    block.insert("input".into(), input);
                }
            }
            block
        })
        .collect();
    if let Some(Value::Array(have)) = message.get_mut("content") {
        have.extend(content);
    }
    Ok(Value::Object(message))
}

/// What the fold reads of a logged event.
#[derive(serde::Deserialize)]
struct Logged {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: Value,
    #[serde(default)]
    content_block: Value,
    #[serde(default)]
    index: usize,
    #[serde(default, deserialize_with = "lenient")]
    delta: Option<LoggedDelta>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<Map<String, Value>>,
}

#[derive(serde::Deserialize, Default)]
struct LoggedDelta {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    text: String,
    #[serde(default)]
    thinking: String,
    #[serde(default)]
    partial_json: String,
    #[serde(default)]
    stop_reason: Value,
    #[serde(default)]
    stop_sequence: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Raw, Signature, Text};
    use crate::relay::Must;
    use crate::relay::{CANNED_END, Encoder as _, canned};

    fn encoder() -> Encoder {
        let meta = Meta {
            id: "msg_1".into(),
            model: "m".into(),
        };
        Encoder::new(meta, 3)
    }

    #[test]
    fn text_then_a_tool_call_are_two_blocks_and_a_tool_use_stop() -> Result<(), String> {
        let mut encoder = encoder();
        let deltas = vec![
            Delta::Text(Text::plain("Let me.")),
            ToolCall::start(0, "toolu_1", "Bash"),
            ToolCall::more(0, "{\"c\":"),
            ToolCall::more(0, "1}"),
            Delta::Finish(Finish::ToolUse),
        ];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let data: Vec<Value> = events
            .iter()
            .filter_map(|e| payload(e.as_bytes()))
            .collect();
        let types: Vec<&str> = data.iter().filter_map(|d| d["type"].as_str()).collect();
        assert_eq!(
            types,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(data[0]["message"]["usage"]["input_tokens"], 3);
        assert_eq!(data[9]["delta"]["stop_reason"], "tool_use");
        let message = assemble(events.iter().map(|e| e.as_bytes())).must("a message")?;
        assert_eq!(message["content"][0]["text"], "Let me.");
        assert_eq!(message["content"][1]["input"], json!({"c": 1}));
        assert_eq!(message["usage"]["output_tokens"], 2);
        Ok(())
    }

    #[test]
    fn signed_and_redacted_reasoning_and_citations_keep_their_place() -> Result<(), String> {
        let mut encoder = encoder();
        let thinking = Delta::Reasoning(Text::plain("hm"));
        let citation = Raw::of(&json!({"type": "char_location", "cited_text": "x"}));
        let deltas = vec![
            thinking,
            Delta::Signature(Signature::Anthropic("sig".into())),
            Delta::Redacted("data".into()),
            Delta::Text(Text::plain("a")),
            Delta::Annotation(citation),
            Delta::Signature(Signature::Encrypted("gAAA".into())),
            Delta::Text(Text::plain("b")),
        ];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let message = assemble(events.iter().map(|e| e.as_bytes())).must("a message")?;
        assert_eq!(message["content"][0]["thinking"], "hm");
        assert_eq!(
            message["content"][1],
            json!({"type": "redacted_thinking", "data": "data"})
        );
        assert_eq!(message["content"][2]["text"], "ab");
        let all = events.concat();
        assert!(
            all.contains(r#""delta":{"signature":"sig","type":"signature_delta"}"#),
            "{all}"
        );
        assert!(all.contains(r#""type":"citations_delta""#));
        // Another API's encrypted reasoning: said to be left out, in the stream.
        assert!(all.contains(": sluice: left out the upstream's encrypted reasoning"));
        Ok(())
    }

    #[test]
    fn a_failure_is_anthropic_s_error_event() -> Result<(), String> {
        let mut out = Out::numbered_from(7);
        error(&ApiError::ProducerLost, &mut out);
        let event = out.take().next().must("an event")?;
        assert!(event.starts_with(b"id: 8\nevent: error\n"));
        let body = payload(&event).must("JSON")?;
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "api_error");
        Ok(())
    }

    #[test]
    fn a_relayed_stream_keeps_every_event_and_reports_its_usage() -> Result<(), String> {
        let mut encoder = encoder();
        let mut out = Out::new();
        let start = r#"{"type":"message_start","message":{"id":"msg_up","usage":{"input_tokens":9,"output_tokens":1}}}"#;
        assert_eq!(encoder.relay(start, &mut out).usage, Some(Usage::new(9, 0)));
        let signature = r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQB"}}"#;
        assert_eq!(encoder.relay(signature, &mut out), Relayed::default());
        let delta = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}}"#;
        assert_eq!(encoder.relay(delta, &mut out).usage, Some(Usage::new(9, 4)));
        let overloaded =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            encoder.relay(overloaded, &mut out).ended,
            Some(Err("Overloaded".into()))
        );
        let events: Vec<_> = out.take().collect();
        assert_eq!(payload(&events[0]).must("JSON")?["message"]["id"], "msg_1");
        assert!(events[1].ends_with(format!("data: {signature}\n\n").as_bytes()));
        assert!(events[3].starts_with(b"id: 4\nevent: error\n"));
        Ok(())
    }

    #[test]
    fn a_relayed_prompt_counts_its_cached_tokens_and_prices_them_apart() {
        let mut encoder = encoder();
        let mut out = Out::new();
        let start = r#"{"type":"message_start","message":{"id":"msg_up","usage":{"input_tokens":9,"cache_read_input_tokens":100,"cache_creation_input_tokens":20,"output_tokens":1}}}"#;
        let seen = encoder.relay(start, &mut out);
        assert_eq!(seen.usage, Some(Usage::new(129, 0)));
        let delta = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}}"#;
        let seen = encoder.relay(delta, &mut out);
        assert_eq!(seen.usage, Some(Usage::new(129, 4)));
        assert_eq!(
            seen.details,
            Some(crate::prices::Details {
                cached: 100,
                cache_write: 20,
                reasoning: 0
            })
        );
    }
}
