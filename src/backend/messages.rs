//! Calling an upstream that speaks Anthropic's Messages API (`api = "anthropic"` in its
//! route): the client's own request when it spoke that API, else the chat request written
//! as one; for a client of that same API each event goes on as it came
//! ([`Delta::Event`]), for any other the events become canonical ones — text, thinking (as
//! `reasoning_content`), tool use (as chat `tool_calls`), the finish and the usage.

use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use super::shown;

use super::{
    BackendError, Delta, Finish, ModelRequest, Native, Raw, Signature, Text, ToolCall, Usage,
};

/// The `anthropic-version` sent when the client named none.
const VERSION: &str = "2023-06-01";
/// `max_tokens` is required by the Messages API: what a chat request without one asks for.
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The body of the call, its `anthropic-version`, and its `anthropic-beta` if any.
pub fn body(mut request: ModelRequest) -> (Map<String, Value>, String, Option<String>) {
    let model = request.model.clone();
    let (mut body, version, beta) = match request.native.take() {
        Some(Native::Messages {
            body,
            version,
            beta,
        }) => (body, version, beta),
        _ => (from_chat(&super::chat_body(&mut request)), None, None),
    };
    body.insert("model".into(), Value::String(model));
    body.insert("stream".into(), Value::Bool(true));
    (body, version.unwrap_or_else(|| VERSION.to_owned()), beta)
}

/// The chat request fields [`from_chat`] carries (or that need no carrying).
pub const CARRIED: [&str; 15] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "user",
    "n",
];

/// A chat completions request as a Messages request: system and developer messages as
/// `system`; text and image parts as blocks; an assistant's `tool_calls` as `tool_use`
/// blocks and tool messages as `tool_result` blocks of the user turn after them; function
/// tools, `tool_choice`, `stop`, `max_tokens` (required here), the sampling options and
/// `user`.
pub fn from_chat(chat: &Map<String, Value>) -> Map<String, Value> {
    let mut body = Map::new();
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in chat
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m["role"].as_str().unwrap_or("user");
        if matches!(role, "system" | "developer") {
            system.push(text_of(&m["content"]));
            continue;
        }
        let mut blocks = Vec::new();
        if role == "tool" {
            blocks.push(
                json!({"type": "tool_result", "tool_use_id": m["tool_call_id"],
                "content": text_of(&m["content"])}),
            );
        } else {
            blocks.extend(content_blocks(&m["content"]));
            for call in m["tool_calls"].as_array().into_iter().flatten() {
                let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
                blocks.push(json!({"type": "tool_use", "id": call["id"],
                    "name": call["function"]["name"], "input": input}));
            }
        }
        let role = if role == "assistant" {
            "assistant"
        } else {
            "user"
        };
        // Turns alternate: a tool result and the user's words after it are one user turn.
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(content) = last["content"].as_array_mut() {
                    content.extend(blocks);
                }
            }
            _ => messages.push(json!({"role": role, "content": blocks})),
        }
    }
    // A turn of text alone is a string, as clients write it.
    for m in &mut messages {
        if let Some([block]) = m["content"].as_array().map(Vec::as_slice)
            && block["type"] == "text"
        {
            m["content"] = block["text"].clone();
        }
    }
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n")));
    }
    body.insert("messages".into(), Value::Array(messages));
    let tools: Vec<Value> = chat
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let f = t.get("function")?;
            Some(json!({"name": f["name"], "description": f.get("description").cloned().unwrap_or(json!("")),
                "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"}))}))
        })
        .collect();
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match chat.get("tool_choice") {
        Some(Value::String(c)) if c == "required" => Some(json!({"type": "any"})),
        Some(Value::String(c)) if c == "none" => Some(json!({"type": "none"})),
        Some(Value::Object(c)) => Some(json!({"type": "tool", "name": c["function"]["name"]})),
        _ => None,
    };
    if chat.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = Value::Bool(true);
    }
    if let Some(choice) = choice {
        body.insert("tool_choice".into(), choice);
    }
    let max_tokens = chat
        .get("max_completion_tokens")
        .or(chat.get("max_tokens"))
        .cloned()
        .unwrap_or(json!(DEFAULT_MAX_TOKENS));
    body.insert("max_tokens".into(), max_tokens);
    match chat.get("stop") {
        Some(Value::String(stop)) => {
            body.insert("stop_sequences".into(), json!([stop]));
        }
        Some(stop @ Value::Array(_)) => {
            body.insert("stop_sequences".into(), stop.clone());
        }
        _ => {}
    }
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = chat.get(key) {
            body.insert(key.into(), v.clone());
        }
    }
    if let Some(user) = chat.get("user") {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    body
}

/// The text of chat content: a string, or its text parts joined.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// Chat content as Messages blocks: text, and images (a data URL as base64, else by URL).
fn content_blocks(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) if !s.is_empty() => vec![json!({"type": "text", "text": s})],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p["type"].as_str() {
                Some("text") => Some(json!({"type": "text", "text": p["text"]})),
                Some("image_url") => {
                    let url = p["image_url"]["url"].as_str().unwrap_or_default();
                    let source = match url
                        .strip_prefix("data:")
                        .and_then(|rest| rest.split_once(";base64,"))
                    {
                        Some((media_type, data)) => {
                            json!({"type": "base64", "media_type": media_type, "data": data})
                        }
                        None => json!({"type": "url", "url": url}),
                    };
                    Some(json!({"type": "image", "source": source}))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What has been read of one message.
#[derive(Default)]
pub struct Reader {
    /// The kind of each content block by index, and for tool use its call's `index`.
    blocks: Vec<Option<u32>>,
    calls: u32,
    input_tokens: u32,
    /// Prompt tokens read from, and written to, the upstream's cache (not in `input_tokens`).
    cache: (u32, u32),
    finish: Option<Finish>,
}

/// The prompt tokens an Anthropic usage object counts apart from `input_tokens`: those read
/// from its cache and those written to it, when it says.
pub fn cache_tokens(usage: &Value) -> Option<(u32, u32)> {
    #[derive(serde::Deserialize)]
    struct Cache {
        cache_read_input_tokens: Option<u64>,
        cache_creation_input_tokens: Option<u64>,
    }
    let cache = Cache::deserialize(usage).ok()?;
    let (read, written) = (
        cache.cache_read_input_tokens,
        cache.cache_creation_input_tokens,
    );
    (read.is_some() || written.is_some())
        .then(|| (clamp(read.unwrap_or(0)), clamp(written.unwrap_or(0))))
}

/// The usage fields that carry `cache` as chat completions say it (`cached_tokens`, and
/// `cache_write_tokens` for what was written).
pub fn cache_details((read, written): (u32, u32)) -> String {
    format!(r#""prompt_tokens_details":{{"cached_tokens":{read},"cache_write_tokens":{written}}}"#)
}

fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The events after which a message has no more.
pub const ENDINGS: [&str; 2] = ["message_stop", "error"];

impl Reader {
    /// Reads one event (of type `kind`) into canonical events in `ready`.
    pub fn translate(
        &mut self,
        kind: &str,
        event: &Value,
        ready: &mut Vec<Delta>,
    ) -> Result<(), BackendError> {
        match kind {
            "message_start" => {
                let usage = &event["message"]["usage"];
                self.input_tokens = clamp(usage["input_tokens"].as_u64().unwrap_or(0));
                self.cache = cache_tokens(usage).unwrap_or_default();
            }
            "content_block_start" => {
                let block = &event["content_block"];
                if block["type"] == "redacted_thinking" {
                    self.blocks.push(None);
                    let data = block["data"].as_str().unwrap_or_default();
                    ready.push(Delta::Redacted(data.to_owned()));
                } else if block["type"] == "tool_use" {
                    ready.push(Delta::ToolCall(ToolCall {
                        index: self.calls,
                        id: block["id"].as_str().map(str::to_owned),
                        name: block["name"].as_str().map(str::to_owned),
                        arguments: Text::plain(""),
                    }));
                    self.blocks.push(Some(self.calls));
                    self.calls += 1;
                } else {
                    self.blocks.push(None);
                    let kind = block["type"].as_str().unwrap_or_default();
                    if !matches!(kind, "text" | "thinking") {
                        ready.push(Delta::Untranslated(format!("{} block", shown(Some(kind)))));
                    }
                }
            }
            "content_block_delta" => {
                let delta = &event["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => {
                        if let Some(text) = delta["text"].as_str() {
                            ready.push(Delta::Text(Text::plain(text)));
                        }
                    }
                    Some("thinking_delta") => {
                        if let Some(thinking) = delta["thinking"].as_str() {
                            ready.push(Delta::Reasoning(Text::plain(thinking)));
                        }
                    }
                    Some("signature_delta") => {
                        let signature = delta["signature"].as_str().unwrap_or_default();
                        ready.push(Delta::Signature(Signature::Anthropic(signature.to_owned())));
                    }
                    Some("citations_delta") => {
                        ready.push(Delta::Annotation(Raw::of(&delta["citation"])));
                    }
                    Some("input_json_delta") => {
                        // A server tool's input (its block is not a tool call) has none.
                        let index = event["index"].as_u64().unwrap_or(0) as usize;
                        if let Some(call) = self.blocks.get(index).copied().flatten() {
                            let piece = delta["partial_json"].as_str().unwrap_or_default();
                            ready.push(Delta::ToolCall(ToolCall {
                                index: call,
                                id: None,
                                name: None,
                                arguments: Text::plain(piece),
                            }));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.finish = Some(match event["delta"]["stop_reason"].as_str() {
                    Some("max_tokens") => Finish::Length,
                    Some("tool_use") => Finish::ToolUse,
                    Some("refusal") => Finish::Filtered,
                    _ => Finish::Stop,
                });
                let usage = &event["usage"];
                if let Some(input) = usage["input_tokens"].as_u64() {
                    self.input_tokens = clamp(input);
                }
                if let Some(cache) = cache_tokens(usage) {
                    self.cache = cache;
                }
                if let Some(output) = usage["output_tokens"].as_u64() {
                    // The whole prompt, as chat completions count it, cached parts within.
                    let (read, written) = self.cache;
                    if read > 0 || written > 0 {
                        ready.push(Delta::UsageDetails(cache_details(self.cache).into()));
                    }
                    let prompt = self
                        .input_tokens
                        .saturating_add(read)
                        .saturating_add(written);
                    ready.push(Delta::Usage(Usage::new(prompt, clamp(output))));
                }
            }
            "message_stop" => ready.push(Delta::Finish(self.finish.take().unwrap_or(Finish::Stop))),
            "error" => {
                let message = event["error"]["message"]
                    .as_str()
                    .unwrap_or("the upstream's message failed");
                return Err(BackendError::Interrupted(message.to_owned()));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_prompt_is_counted_whole_with_its_cached_parts_named() {
        let mut reader = Reader::default();
        let mut ready = Vec::new();
        let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 9,
            "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}}});
        let delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 4}});
        for event in [start, delta] {
            let kind = event["type"].as_str().unwrap_or_default().to_owned();
            assert!(reader.translate(&kind, &event, &mut ready).is_ok());
        }
        assert_eq!(
            ready,
            [
                Delta::UsageDetails(cache_details((100, 20)).into()),
                Delta::Usage(Usage::new(129, 4)),
            ]
        );
        let details = crate::prices::Details::of_fields(&cache_details((100, 20)));
        assert_eq!((details.cached, details.cache_write), (100, 20));
    }
}
