//! Reading an upstream that speaks OpenAI's Responses API (`api = "responses"` in its
//! route): for a client of that same API, each event goes on as it came
//! ([`Delta::Event`]); for any other, the events become canonical ones — text, function
//! call pieces, the finish and the usage.

use serde_json::{Map, Value, json};

use super::shown;

use super::{BackendError, Delta, Finish, Raw, Signature, Text, ToolCall, Usage};

/// The chat request fields [`from_chat`] carries (or that need no carrying).
pub const CARRIED: [&str; 17] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "max_tokens",
    "max_completion_tokens",
    "reasoning_effort",
    "temperature",
    "top_p",
    "user",
    "metadata",
    "service_tier",
    "n",
];

/// A chat completions request as a Responses request: messages as input items (text and
/// image parts in the Responses API's own types), an assistant's `tool_calls` as
/// `function_call` items and tool messages as `function_call_output` items; function tools,
/// `tool_choice`, `response_format`, `max_tokens`, `reasoning_effort` and the options both
/// APIs share. Never stored upstream: storage is sluice's.
pub fn from_chat(chat: &Map<String, Value>) -> Map<String, Value> {
    let mut body = Map::new();
    let mut input = Vec::new();
    for m in chat
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match m["role"].as_str() {
            Some("tool") => input.push(json!({"type": "function_call_output",
                "call_id": m["tool_call_id"], "output": m["content"]})),
            Some(role) => {
                if let Some(content) = content(&m["content"], role == "assistant") {
                    input.push(json!({"role": role, "content": content}));
                }
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    input.push(json!({"type": "function_call", "call_id": call["id"],
                        "name": call["function"]["name"], "arguments": call["function"]["arguments"]}));
                }
            }
            None => {}
        }
    }
    body.insert("input".into(), Value::Array(input));
    let tools: Vec<Value> = chat
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let mut tool = t.get("function")?.as_object()?.clone();
            tool.insert("type".into(), json!("function"));
            Some(Value::Object(tool))
        })
        .collect();
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = chat.get("tool_choice") {
        let choice = match choice {
            Value::Object(c) => json!({"type": "function", "name": c["function"]["name"]}),
            other => other.clone(),
        };
        body.insert("tool_choice".into(), choice);
    }
    if let Some(format) = chat.get("response_format") {
        let format = match format["type"].as_str() {
            Some("json_schema") => {
                let mut f = format["json_schema"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                f.insert("type".into(), json!("json_schema"));
                Value::Object(f)
            }
            _ => format.clone(),
        };
        body.insert("text".into(), json!({"format": format}));
    }
    if let Some(n) = chat.get("max_completion_tokens").or(chat.get("max_tokens")) {
        body.insert("max_output_tokens".into(), n.clone());
    }
    if let Some(effort) = chat.get("reasoning_effort") {
        body.insert("reasoning".into(), json!({"effort": effort}));
    }
    for key in [
        "temperature",
        "top_p",
        "parallel_tool_calls",
        "user",
        "metadata",
        "service_tier",
    ] {
        if let Some(v) = chat.get(key) {
            body.insert(key.into(), v.clone());
        }
    }
    body.insert("store".into(), Value::Bool(false));
    body
}

/// Chat content as Responses content: a string as it is, parts in the Responses API's
/// types (`input_text` or, for the assistant, `output_text`; `input_image`).
fn content(content: &Value, assistant: bool) -> Option<Value> {
    match content {
        Value::Null => None,
        Value::Array(parts) => Some(Value::Array(
            parts
                .iter()
                .filter_map(|p| match p["type"].as_str() {
                    Some("text") => {
                        let kind = if assistant { "output_text" } else { "input_text" };
                        Some(json!({"type": kind, "text": p["text"]}))
                    }
                    Some("image_url") => Some(json!({"type": "input_image",
                        "image_url": p["image_url"]["url"], "detail": p["image_url"].get("detail").cloned().unwrap_or(json!("auto"))})),
                    _ => None,
                })
                .collect(),
        )),
        other => Some(other.clone()),
    }
}

/// What has been read of one response.
#[derive(Default)]
pub struct Reader {
    /// Function calls seen so far: the chat `index` of the next one.
    calls: u32,
}

/// The events after which a response has no more.
pub const ENDINGS: [&str; 4] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
    "error",
];

impl Reader {
    /// Reads one event (of type `kind`) into canonical events in `ready`.
    pub fn translate(
        &mut self,
        kind: &str,
        event: &Value,
        ready: &mut Vec<Delta>,
    ) -> Result<(), BackendError> {
        match kind {
            "response.output_text.delta" => {
                if let Some(text) = event["delta"].as_str() {
                    ready.push(Delta::Text(Text::plain(text)));
                }
            }
            "response.output_item.added" if event["item"]["type"] == "function_call" => {
                let item = &event["item"];
                ready.push(Delta::ToolCall(ToolCall {
                    index: self.calls,
                    id: item["call_id"].as_str().map(str::to_owned),
                    name: item["name"].as_str().map(str::to_owned),
                    arguments: Text::plain(""),
                }));
                self.calls += 1;
            }
            "response.reasoning_text.delta" | "response.reasoning_summary_text.delta" => {
                if let Some(text) = event["delta"].as_str() {
                    ready.push(Delta::Reasoning(Text::plain(text)));
                }
            }
            "response.output_item.done" if event["item"]["type"] == "reasoning" => {
                if let Some(encrypted) = event["item"]["encrypted_content"].as_str() {
                    ready.push(Delta::Signature(Signature::Encrypted(encrypted.to_owned())));
                }
            }
            // Built-in tools' calls (`web_search_call`…) and items to come.
            "response.output_item.done"
                if !matches!(
                    event["item"]["type"].as_str(),
                    Some("message" | "function_call")
                ) =>
            {
                let kind = event["item"]["type"].as_str();
                ready.push(Delta::Untranslated(format!("{} item", shown(kind))));
            }
            "response.output_text.annotation.added" => {
                ready.push(Delta::Annotation(Raw::of(&event["annotation"])));
            }
            "response.function_call_arguments.delta" => {
                ready.push(Delta::ToolCall(ToolCall {
                    index: self.calls.saturating_sub(1),
                    id: None,
                    name: None,
                    arguments: Text::plain(event["delta"].as_str().unwrap_or_default()),
                }));
            }
            "response.completed" | "response.incomplete" => {
                ready.push(Delta::Finish(if kind == "response.incomplete" {
                    Finish::Length
                } else if self.calls > 0 {
                    Finish::ToolUse
                } else {
                    Finish::Stop
                }));
                let usage = &event["response"]["usage"];
                if let (Some(input), Some(output)) = (
                    usage["input_tokens"].as_u64(),
                    usage["output_tokens"].as_u64(),
                ) {
                    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
                    ready.push(Delta::Usage(Usage::new(clamp(input), clamp(output))));
                }
            }
            "response.failed" | "error" => {
                let message = event["response"]["error"]["message"]
                    .as_str()
                    .or(event["message"].as_str())
                    .unwrap_or("the upstream's response failed");
                return Err(BackendError::Interrupted(message.to_owned()));
            }
            _ => {}
        }
        Ok(())
    }
}
