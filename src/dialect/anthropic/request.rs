//! A Messages API request as the canonical request: `system` (top level or as messages
//! anywhere in the conversation), `messages` (text, image, `tool_use` and `tool_result`
//! blocks), `tools` and `tool_choice`, `max_tokens`, `stop_sequences` and the sampling
//! options become a chat request; what a chat upstream has no place for is left out and
//! named. The request as sent goes to an upstream that speaks the Messages API itself.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::backend::{Message, Native};
use crate::dialect::completions::wire::{Said, SaidCall};
use crate::dialect::{ClientRequest, Dropped};
use crate::error::ApiError;
use crate::http::typed;

/// The fields sluice reads.
#[derive(Deserialize)]
struct Body {
    model: String,
    max_tokens: Option<u32>,
    messages: Vec<Value>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    metadata: Option<Metadata>,
    #[serde(default)]
    tools: Vec<Tool>,
    tool_choice: Option<ToolChoice>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct Metadata {
    user_id: Option<Value>,
}

/// A tool offered: a client tool (`custom`, or no type) or a server tool.
#[derive(Deserialize)]
struct Tool {
    name: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    description: Option<Value>,
    input_schema: Option<Value>,
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
struct ToolChoice {
    #[serde(rename = "type")]
    kind: Option<Value>,
    name: Option<Value>,
    disable_parallel_tool_use: Option<Value>,
}

/// One message of the conversation, its role and content checked as it is read.
#[derive(Deserialize, Default)]
struct Turn {
    role: Option<Value>,
    #[serde(default)]
    content: Value,
}

/// A content block, as far as a chat upstream can take it.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        #[serde(default)]
        text: Value,
    },
    Image {
        #[serde(default)]
        source: Source,
    },
    ToolUse {
        #[serde(default)]
        id: Value,
        #[serde(default)]
        name: Value,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        #[serde(default)]
        tool_use_id: Value,
        #[serde(default)]
        content: Value,
        #[serde(default)]
        is_error: Value,
    },
    /// Signed reasoning, documents, server tools' calls and results, and any block to
    /// come.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct Source {
    #[serde(rename = "type")]
    kind: Option<Value>,
    media_type: Option<Value>,
    data: Option<Value>,
    url: Option<Value>,
}

/// What every block may carry.
#[derive(Deserialize, Default)]
struct Marks {
    cache_control: Option<Value>,
    /// A text block's text, for the places that take text blocks only.
    text: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<Value>,
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

fn str_of(value: &Value) -> Option<&str> {
    value.as_str()
}

/// The marks of a block (any shape: a block that is not an object has none).
fn marks(block: &Value) -> Marks {
    Marks::deserialize(block).unwrap_or_default()
}

/// The text of a `tool_result`'s content (a string, or text blocks).
fn result_text(content: &Value, dropped: &mut Dropped) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(marks)
            .filter_map(|b| match b.text.as_ref().and_then(str_of) {
                Some(text) => Some(text.to_owned()),
                // A chat tool message carries text only: an image (or any other block) in
                // a result is named, never silently lost.
                None => {
                    let kind = b.kind.as_ref().and_then(str_of).unwrap_or("block");
                    dropped.add(&format!("tool_result.{kind}"));
                    None
                }
            })
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
            .filter_map(|b| marks(b).text.and_then(|t| t.as_str().map(str::to_owned)))
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
) -> Result<Vec<Said>, ApiError> {
    let mut out: Vec<Said> = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system.filter(|s| !s.is_null()) {
        out.push(Said::new("system", json!(system_text(system, "system")?)));
    }
    if messages.is_empty() {
        return Err(invalid(
            "messages: at least one message is required",
            "messages",
        ));
    }
    // System messages that came between an assistant's tool calls and their results: a
    // chat API refuses anything between the two, so they follow the results.
    let mut deferred: Vec<Said> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let turn = Turn::deserialize(m).unwrap_or_default();
        let role = match turn.role.as_ref().and_then(str_of) {
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some("system") => {
                let at = format!("messages.{i}.content");
                let system = Said::new("system", json!(system_text(&turn.content, &at)?));
                let calls_open = out
                    .last()
                    .is_some_and(|last| last.role == "assistant" && !last.tool_calls.is_empty());
                if calls_open || !deferred.is_empty() {
                    deferred.push(system);
                } else {
                    out.push(system);
                }
                continue;
            }
            _ => {
                return Err(invalid(
                    format!("messages.{i}.role: Input should be 'user', 'assistant' or 'system'"),
                    &format!("messages.{i}.role"),
                ));
            }
        };
        if role == "assistant" {
            out.append(&mut deferred);
        }
        let blocks = match &turn.content {
            Value::String(s) => {
                out.append(&mut deferred);
                out.push(Said::new(role, json!(s)));
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
        let mut parts: Vec<Value> = Vec::new();
        let mut text = String::new();
        let mut only_text = true;
        let mut calls = Vec::new();
        for (j, block) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            if marks(block).cache_control.is_some() {
                dropped.add("cache_control");
            }
            let typed = Block::deserialize(block).unwrap_or(Block::Other);
            match typed {
                Block::Text { text: t } => {
                    let t = t.as_str().unwrap_or_default();
                    text.push_str(t);
                    parts.push(json!({"type": "text", "text": t}));
                }
                Block::Image { source } => {
                    let field = |v: &Option<Value>| v.as_ref().and_then(str_of).map(str::to_owned);
                    let url = match source.kind.as_ref().and_then(str_of) {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            field(&source.media_type).unwrap_or_else(|| "image/png".into()),
                            field(&source.data).unwrap_or_default()
                        ),
                        Some("url") => field(&source.url).unwrap_or_default(),
                        _ => {
                            return Err(invalid(
                                format!("{at}.source: an image source is base64 or url"),
                                &at,
                            ));
                        }
                    };
                    only_text = false;
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                Block::ToolUse { id, name, input } if role == "assistant" => {
                    calls.push(SaidCall::new(id, name, json!(input.to_string())));
                }
                Block::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                } if role == "user" => {
                    // A chat tool message has no error flag: named, not silently lost.
                    if is_error == json!(true) {
                        dropped.add("tool_result.is_error");
                    }
                    out.push(Said::tool(tool_use_id, result_text(&content, dropped)));
                }
                // Signed reasoning, documents, server tools' calls and results, and any
                // block to come: nothing a chat upstream takes. Named, never silently lost.
                _ => match marks(block).kind.as_ref().and_then(str_of) {
                    Some(kind) => dropped.add(kind),
                    None => {
                        return Err(invalid(
                            format!("{at}.type: Field required"),
                            &format!("{at}.type"),
                        ));
                    }
                },
            }
        }
        // The results are in: what waited for them follows.
        out.append(&mut deferred);
        if parts.is_empty() && calls.is_empty() {
            continue;
        }
        let content = if parts.is_empty() {
            Value::Null
        } else if only_text {
            Value::String(text)
        } else {
            Value::Array(parts)
        };
        let mut said = Said::new(role, content);
        said.tool_calls = calls;
        out.push(said);
    }
    out.append(&mut deferred);
    Ok(out)
}

/// What the models sluice runs itself read of chat messages: each one's text.
fn canonical(messages: &[Said]) -> Vec<Message> {
    messages
        .iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.text(),
        })
        .collect()
}

/// Anthropic's tools as chat tools. Server tools (`web_search_20250305`, code execution…,
/// any `type` but `custom`) have no chat counterpart: left out and named in `dropped`,
/// unless `tool_choice` forces one, which a chat upstream could not honour.
fn tools(
    tools: &[Tool],
    choice: Option<&ToolChoice>,
    dropped: &mut Dropped,
) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let Some(name) = tool.name.as_ref().and_then(str_of) else {
            return Err(invalid(
                format!("tools.{i}.name: Field required"),
                &format!("tools.{i}.name"),
            ));
        };
        if let Some(kind) = tool
            .kind
            .as_ref()
            .and_then(str_of)
            .filter(|t| *t != "custom")
        {
            let forced = choice.is_some_and(|c| {
                c.kind.as_ref().and_then(str_of) == Some("tool")
                    && c.name.as_ref().and_then(str_of) == Some(name)
            });
            if forced {
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
        if let Some(d) = &tool.description {
            function.insert("description".into(), d.clone());
        }
        function.insert(
            "parameters".into(),
            tool.input_schema
                .clone()
                .unwrap_or(json!({"type": "object"})),
        );
        if tool.cache_control.is_some() {
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
    fields: &Body,
    sent: &Map<String, Value>,
    dropped: &mut Dropped,
) -> Result<(Vec<Said>, Map<String, Value>), ApiError> {
    let messages = translate(fields.system.as_ref(), &fields.messages, dropped)?;
    for field in NOT_FOR_CHAT {
        if sent.get(field).is_some_and(|v| !v.is_null()) {
            dropped.add(field);
        }
    }
    let mut body = Map::new();
    body.insert(
        "messages".into(),
        serde_json::to_value(&messages).unwrap_or_default(),
    );
    let chat_tools = tools(&fields.tools, fields.tool_choice.as_ref(), dropped)?;
    if let Some(choice) = &fields.tool_choice {
        let chosen = match choice.kind.as_ref().and_then(str_of) {
            // Every tool offered was a server tool, left out: a call cannot be required.
            Some("any") if chat_tools.is_empty() && !fields.tools.is_empty() => {
                return Err(invalid(
                    "tool_choice: any requires a tool call, but every tool offered is a server \
                     tool this model's upstream cannot run",
                    "tool_choice",
                ));
            }
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice.name}}),
            _ => {
                return Err(invalid(
                    "tool_choice: auto, any, tool or none",
                    "tool_choice",
                ));
            }
        };
        // A chat upstream refuses a tool_choice with no tools.
        if !chat_tools.is_empty() {
            body.insert("tool_choice".into(), chosen);
        }
        if choice.disable_parallel_tool_use == Some(json!(true)) {
            body.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    if !chat_tools.is_empty() {
        body.insert("tools".into(), Value::Array(chat_tools));
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
    if let Some(user) = fields
        .metadata
        .as_ref()
        .and_then(|m| m.user_id.as_ref())
        .and_then(str_of)
    {
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
) -> Result<(ClientRequest, bool), ApiError> {
    let fields: Body = typed(&mut body)?;
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
    let chat = ClientRequest {
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
    let fields: Body = typed(&mut body)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(messages: &[Said]) -> Vec<&str> {
        messages.iter().map(|m| m.role.as_str()).collect()
    }

    #[test]
    fn a_system_message_between_a_call_and_its_result_follows_the_result() {
        let messages = [
            json!({"role": "user", "content": "list files"}),
            json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]}),
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"},
                {"type": "text", "text": "and now?"}]}),
        ];
        let mut dropped = Dropped::default();
        let out = translate(None, &messages, &mut dropped).expect("translated");
        assert_eq!(roles(&out), ["user", "assistant", "tool", "system", "user"]);
        assert!(dropped.into_names().is_empty());
    }

    #[test]
    fn what_a_tool_message_cannot_carry_is_named() {
        let messages = [
            json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]}),
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                "is_error": true, "content": [
                    {"type": "text", "text": "failed"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}),
        ];
        let mut dropped = Dropped::default();
        let out = translate(None, &messages, &mut dropped).expect("translated");
        assert_eq!(out[1].content, "failed");
        assert_eq!(
            dropped.into_names(),
            ["tool_result.is_error", "tool_result.image"]
        );
    }

    #[test]
    fn any_with_every_tool_left_out_is_refused_not_sent_without_tools() {
        let fields: Body = serde_json::from_value(json!({
            "model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": "search"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "any"},
        }))
        .expect("fields");
        let error = chat(&fields, &Map::new(), &mut Dropped::default()).expect_err("refused");
        assert!(error.to_string().contains("tool_choice"), "{error}");
    }
}
