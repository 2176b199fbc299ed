//! Calling an upstream that speaks Anthropic's Messages API (`api = "anthropic"` in its
//! route): the client's own request when it spoke that API, else the chat request written
//! as one; for a client of that same API each event goes on as it came
//! ([`Delta::Event`]), for any other the events become canonical ones — text, thinking (as
//! `reasoning_content`), tool use (as chat `tool_calls`), the finish and the usage.

use serde_json::{Map, Value, json};

use super::shown;

use super::{BackendError, ChatRequest, Delta, Fields, Native, Signature, Text, Usage};

/// The `anthropic-version` sent when the client named none.
const VERSION: &str = "2023-06-01";
/// `max_tokens` is required by the Messages API: what a chat request without one asks for.
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The body of the call, its `anthropic-version`, and its `anthropic-beta` if any.
pub fn body(request: ChatRequest) -> (Map<String, Value>, String, Option<String>) {
    let (mut body, version, beta) = match request.native {
        Some(Native::Messages {
            body,
            version,
            beta,
        }) => (body, version, beta),
        _ => {
            let mut body = Map::new();
            let system: Vec<&str> = request
                .messages
                .iter()
                .filter(|m| matches!(m.role.as_str(), "system" | "developer"))
                .map(|m| m.content.as_str())
                .collect();
            if !system.is_empty() {
                body.insert("system".into(), json!(system.join("\n")));
            }
            let messages: Vec<Value> = request
                .messages
                .iter()
                .filter(|m| matches!(m.role.as_str(), "user" | "assistant"))
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            body.insert("messages".into(), Value::Array(messages));
            body.insert(
                "max_tokens".into(),
                json!(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
            );
            if let Some(t) = request.temperature {
                body.insert("temperature".into(), super::decimal(t));
            }
            if let Some(p) = request.top_p {
                body.insert("top_p".into(), super::decimal(p));
            }
            (body, None, None)
        }
    };
    body.insert("model".into(), Value::String(request.model));
    body.insert("stream".into(), Value::Bool(true));
    (body, version.unwrap_or_else(|| VERSION.to_owned()), beta)
}

/// What has been read of one message.
#[derive(Default)]
pub struct Reader {
    /// The kind of each content block by index, and for tool use its chat `index`.
    blocks: Vec<Option<u64>>,
    calls: u64,
    input_tokens: u32,
    finish: Option<&'static str>,
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
            }
            "content_block_start" => {
                let block = &event["content_block"];
                if block["type"] == "redacted_thinking" {
                    self.blocks.push(None);
                    let data = block["data"].as_str().unwrap_or_default();
                    ready.push(Delta::Redacted(data.to_owned()));
                } else if block["type"] == "tool_use" {
                    let call = json!({"tool_calls": [{"index": self.calls, "id": block["id"],
                        "type": "function", "function": {"name": block["name"], "arguments": ""}}]});
                    self.blocks.push(Some(self.calls));
                    self.calls += 1;
                    ready.push(Fields::delta(&call)?);
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
                        ready.push(Fields::delta(
                            &json!({"reasoning_content": delta["thinking"]}),
                        )?);
                    }
                    Some("signature_delta") => {
                        let signature = delta["signature"].as_str().unwrap_or_default();
                        ready.push(Delta::Signature(Signature::Anthropic(signature.to_owned())));
                    }
                    Some("citations_delta") => {
                        ready.push(Delta::Annotation(Fields::raw(&delta["citation"])?));
                    }
                    Some("input_json_delta") => {
                        // A server tool's input (its block is not a tool call) has none.
                        let index = event["index"].as_u64().unwrap_or(0) as usize;
                        if let Some(call) = self.blocks.get(index).copied().flatten() {
                            ready.push(Fields::delta(&json!({"tool_calls": [{"index": call,
                                "function": {"arguments": delta["partial_json"]}}]}))?);
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.finish = Some(match event["delta"]["stop_reason"].as_str() {
                    Some("max_tokens") => "length",
                    Some("tool_use") => "tool_calls",
                    Some("refusal") => "content_filter",
                    _ => "stop",
                });
                let usage = &event["usage"];
                if let Some(input) = usage["input_tokens"].as_u64() {
                    self.input_tokens = clamp(input);
                }
                if let Some(output) = usage["output_tokens"].as_u64() {
                    ready.push(Delta::Usage(Usage::new(self.input_tokens, clamp(output))));
                }
            }
            "message_stop" => ready.push(Delta::Finish(self.finish.unwrap_or("stop").into())),
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
