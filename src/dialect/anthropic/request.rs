//! A Messages API request as the canonical request: `system` (top level or as messages
//! anywhere in the conversation), `messages` (text, image, `tool_use` and `tool_result`
//! blocks), `tools` and `tool_choice`, `max_tokens`, `stop_sequences` and the sampling
//! options become a chat request; what a chat upstream has no place for is left out and
//! named. The request as sent goes to an upstream that speaks the Messages API itself.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::backend::{Message, Native};
use crate::dialect::{Chat, Dropped};
use crate::error::ApiError;
use crate::http::typed;

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

/// Parses and checks a request body of `size` bytes, with the client's
/// `anthropic-version` and `anthropic-beta` headers; also whether it asked for a stream.
pub fn parse(
    mut body: Map<String, Value>,
    size: usize,
    version: Option<String>,
    beta: Option<String>,
) -> Result<(Chat, bool), ApiError> {
    let fields: Fields = typed(&mut body)?;
    if fields.max_tokens.is_none() {
        return Err(invalid("max_tokens: Field required", "max_tokens"));
    }
    let mut dropped = Dropped::default();
    let (messages, upstream) = chat(&fields, &body, &mut dropped)?;
    // As sent, for an upstream that speaks the Messages API itself.
    let native = Native::Messages {
        body,
        version,
        beta,
    };
    let chat = Chat {
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
    Ok((chat, fields.stream))
}

/// A request's input tokens as sluice counts a prompt (o200k): the messages' text, and
/// every other part that goes upstream (tools, schemas, options) but the model's name.
pub fn count(mut body: Map<String, Value>) -> Result<u32, ApiError> {
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
}
