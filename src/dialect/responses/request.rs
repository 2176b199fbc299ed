//! A Responses API request as the canonical request: its `input` items, `instructions`,
//! tools and options become a chat request (what any OpenAI-compatible upstream, the mock
//! and the local model take), a stored conversation it continues included; what a chat
//! upstream has no place for is left out and named. The request as sent goes to an
//! upstream that speaks the Responses API itself.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::backend::Message;
use crate::dialect::completions::wire::{Said, SaidCall};
use crate::dialect::{ClientRequest, Dropped};
use crate::error::{ApiError, shown};
use crate::http::BODY_LIMIT;

/// The fields sluice reads; the others are accepted and ignored (`include`, `truncation`…).
#[derive(Deserialize)]
pub struct Body {
    pub model: String,
    pub input: Option<Input>,
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub text: Option<Value>,
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub background: bool,
    pub store: Option<bool>,
    pub previous_response_id: Option<String>,
    pub parallel_tool_calls: Option<bool>,
    pub user: Option<String>,
    pub reasoning: Option<Value>,
}

/// The Responses API's own fields: translated, kept in the response object, or (the last
/// ones) with no chat counterpart. Any other field goes to the upstream as it came.
const RESPONSES_FIELDS: [&str; 27] = [
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "metadata",
    "stream",
    "background",
    "store",
    "previous_response_id",
    "parallel_tool_calls",
    "user",
    "reasoning",
    "include",
    "truncation",
    "stream_options",
    "conversation",
    "prompt",
    "prompt_cache_key",
    "max_tool_calls",
    "client_metadata",
    "prompt_cache_retention",
    "safety_identifier",
];

/// Of [`RESPONSES_FIELDS`], those a chat upstream gets nothing of: named as left out when
/// a request sets them.
const NOT_FOR_CHAT: [&str; 5] = [
    "conversation",
    "prompt",
    "max_tool_calls",
    "client_metadata",
    "include",
];

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

pub fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// An input item, as far as a chat upstream can take it (read leniently: what is missing or
/// of another shape is refused below by the path of the field, or left out and named).
#[derive(Deserialize, Default)]
struct Item {
    #[serde(rename = "type")]
    kind: Option<Value>,
    role: Option<Value>,
    #[serde(default)]
    content: Value,
    call_id: Option<Value>,
    name: Option<Value>,
    namespace: Option<Value>,
    arguments: Option<Value>,
    #[serde(default)]
    output: Value,
    encrypted_content: Option<Value>,
}

/// A content part of a message item.
#[derive(Deserialize, Default)]
struct Part {
    #[serde(rename = "type")]
    kind: Option<Value>,
    text: Option<Value>,
    image_url: Option<Value>,
    detail: Option<Value>,
}

fn str_of(value: &Option<Value>) -> Option<&str> {
    value.as_ref().and_then(Value::as_str)
}

/// The text of a message's content parts, and the chat content they become.
fn content(content: &Value, at: &str, dropped: &mut Dropped) -> Result<Value, ApiError> {
    let parts = match content {
        Value::String(_) => return Ok(content.clone()),
        Value::Array(parts) => parts,
        _ => return Err(invalid("content must be a string or a list of parts", at)),
    };
    let mut out = Vec::with_capacity(parts.len());
    let mut text = String::new();
    let mut only_text = true;
    for (i, part) in parts.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let part = Part::deserialize(part).unwrap_or_default();
        match str_of(&part.kind) {
            Some("input_text" | "output_text" | "text") => {
                let t =
                    str_of(&part.text).ok_or_else(|| invalid("a text part needs `text`", &at))?;
                text.push_str(t);
                out.push(json!({"type": "text", "text": t}));
            }
            Some("input_image") => {
                only_text = false;
                let url = str_of(&part.image_url)
                    .ok_or_else(|| invalid("sluice passes images on by `image_url` only", &at))?;
                let image = match &part.detail {
                    Some(detail) => json!({"url": url, "detail": detail}),
                    None => json!({"url": url}),
                };
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            Some("refusal") => {}
            // Files, audio, and parts to come: left out for a chat upstream, and named.
            Some(other) => dropped.add(other),
            None => {
                return Err(invalid(
                    "a content part needs a `type`",
                    &format!("{at}.type"),
                ));
            }
        }
    }
    if only_text {
        return Ok(Value::String(text));
    }
    Ok(Value::Array(out))
}

const ROLES: [&str; 4] = ["user", "system", "developer", "assistant"];

/// `input` as chat messages: messages, `function_call` items (merged into the assistant
/// message before them, as parallel calls are) and `function_call_output` items.
fn translate(input: Input, dropped: &mut Dropped) -> Result<Vec<Said>, ApiError> {
    let items = match input {
        Input::Text(text) => return Ok(vec![Said::new("user", json!(text))]),
        Input::Items(items) => items,
    };
    let mut messages: Vec<Said> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("input[{i}]");
        let item = Item::deserialize(&item).unwrap_or_default();
        let kind = str_of(&item.kind).unwrap_or(if item.role.is_some() { "message" } else { "" });
        match kind {
            "message" => {
                let role = str_of(&item.role).unwrap_or_default();
                if !ROLES.contains(&role) {
                    return Err(invalid(
                        format!(
                            "unknown role `{role}`; expected one of {}",
                            ROLES.join(", ")
                        ),
                        &format!("{at}.role"),
                    ));
                }
                let content = content(&item.content, &format!("{at}.content"), dropped)?;
                messages.push(Said::new(role, content));
            }
            "function_call" => {
                let (Some(call_id), Some(name)) = (str_of(&item.call_id), str_of(&item.name))
                else {
                    return Err(invalid("a function_call needs `call_id` and `name`", &at));
                };
                let name = match str_of(&item.namespace) {
                    Some(namespace) => flat_name(namespace, name),
                    None => name.to_owned(),
                };
                let arguments = str_of(&item.arguments).unwrap_or("{}");
                push_call(
                    &mut messages,
                    SaidCall::new(json!(call_id), json!(name), json!(arguments)),
                );
            }
            "function_call_output" => {
                let call_id = str_of(&item.call_id)
                    .ok_or_else(|| invalid("a function_call_output needs `call_id`", &at))?;
                let output = match &item.output {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                messages.push(Said::tool(json!(call_id), output));
            }
            // Reasoning the model did before: a chat upstream takes none back. Encrypted
            // reasoning is named as left out, never lost silently.
            "reasoning" => {
                if item.encrypted_content.is_some() {
                    dropped.add("reasoning.encrypted_content");
                }
            }
            "" => {
                return Err(invalid(
                    "an input item needs a `type` or a `role`",
                    &format!("{at}.type"),
                ));
            }
            // Built-in tools' calls and outputs (`web_search_call`…), and items to come.
            other => dropped.add(other),
        }
    }
    Ok(messages)
}

/// A tool call joins the assistant message before it (parallel calls are one message), or
/// opens one.
fn push_call(messages: &mut Vec<Said>, call: SaidCall) {
    match messages.last_mut() {
        Some(last) if last.role == "assistant" => last.tool_calls.push(call),
        _ => {
            let mut said = Said::new("assistant", Value::Null);
            said.tool_calls.push(call);
            messages.push(said);
        }
    }
}

/// Chat messages as Responses input items (for an upstream that speaks that API).
fn items(messages: &[Said]) -> Vec<Value> {
    let mut items = Vec::with_capacity(messages.len());
    for m in messages {
        if m.role == "tool" {
            items.push(json!({"type": "function_call_output",
                "call_id": m.tool_call_id, "output": m.content}));
            continue;
        }
        if !m.content.is_null() {
            items.push(json!({"role": m.role, "content": m.content}));
        }
        for call in &m.tool_calls {
            items.push(json!({"type": "function_call", "call_id": call.id,
                "name": call.function.name, "arguments": call.function.arguments}));
        }
    }
    items
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

/// An output item of a stored response, as far as its continuation reads it.
#[derive(Deserialize, Default)]
struct Output {
    #[serde(rename = "type")]
    kind: Option<Value>,
    #[serde(default)]
    content: Vec<Part>,
    call_id: Option<Value>,
    name: Option<Value>,
    namespace: Option<Value>,
    arguments: Option<Value>,
}

/// A response's output items as the chat messages that continue from it.
pub fn output_messages(output: &[Value]) -> Vec<Said> {
    let mut messages: Vec<Said> = Vec::new();
    for item in output {
        let item = Output::deserialize(item).unwrap_or_default();
        match str_of(&item.kind) {
            Some("message") => {
                let text: String = item
                    .content
                    .iter()
                    .filter_map(|p| str_of(&p.text))
                    .collect();
                messages.push(Said::new("assistant", json!(text)));
            }
            Some("function_call") => {
                let name = match (str_of(&item.namespace), str_of(&item.name)) {
                    (Some(namespace), Some(name)) => json!(flat_name(namespace, name)),
                    _ => item.name.clone().unwrap_or_default(),
                };
                let call = SaidCall::new(
                    item.call_id.unwrap_or_default(),
                    name,
                    item.arguments.unwrap_or_default(),
                );
                push_call(&mut messages, call);
            }
            _ => {}
        }
    }
    messages
}

/// A function tool (`{type: "function", name, parameters…}`) as a chat tool, named `name`.
fn function_tool(tool: &Value, name: &str) -> Value {
    let mut function = Map::new();
    function.insert("name".into(), json!(name));
    for key in ["description", "parameters", "strict"] {
        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
            function.insert(key.into(), v.clone());
        }
    }
    json!({"type": "function", "function": function})
}

/// The chat name of function `name` in namespace `namespace`: chat tools have no
/// namespaces, so the two are joined (and split again on the way back, see [`Meta`]).
pub fn flat_name(namespace: &str, name: &str) -> String {
    format!("{namespace}__{name}")
}

/// Responses tools as chat tools: function tools as they are, a `namespace` of functions
/// flattened into its functions (`namespace__name`, with the namespace's description
/// before each one's); built-in tools (`web_search`, `file_search`, …) have no chat
/// counterpart and are left out, named in `dropped`.
fn tools(
    tools: &[Value],
    namespaces: &mut Vec<(String, String, String)>,
    dropped: &mut Dropped,
) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        match tool["type"].as_str() {
            Some("function") => {
                let name = tool["name"].as_str().ok_or_else(|| {
                    invalid(
                        "a function tool needs a `name`",
                        &format!("tools[{i}].name"),
                    )
                })?;
                out.push(function_tool(tool, name));
            }
            Some("namespace") => {
                let namespace = tool["name"].as_str().ok_or_else(|| {
                    invalid(
                        "a namespace tool needs a `name`",
                        &format!("tools[{i}].name"),
                    )
                })?;
                for (j, inner) in tool["tools"].as_array().into_iter().flatten().enumerate() {
                    let at = format!("tools[{i}].tools[{j}]");
                    let name = match (inner["type"].as_str(), inner["name"].as_str()) {
                        (Some("function") | None, Some(name)) => name,
                        (Some(kind), _) if kind != "function" => {
                            dropped.add(kind);
                            continue;
                        }
                        _ => {
                            return Err(invalid(
                                "a function tool needs a `name`",
                                &format!("{at}.name"),
                            ));
                        }
                    };
                    let flat = flat_name(namespace, name);
                    let mut chat = function_tool(inner, &flat);
                    if let Some(about) = tool["description"].as_str() {
                        let own = inner["description"].as_str().unwrap_or_default();
                        chat["function"]["description"] =
                            json!(format!("{about}\n{own}").trim_end());
                    }
                    out.push(chat);
                    namespaces.push((flat, namespace.to_owned(), name.to_owned()));
                }
            }
            Some(kind) => dropped.add(kind),
            None => {
                return Err(invalid(
                    "a tool needs a `type`",
                    &format!("tools[{i}].type"),
                ));
            }
        }
    }
    // Joined names can meet (`a` + `b__c`, `a__b` + `c`, a plain `a__b__c`): the model
    // would see one tool where the client offered several, and its call could not be
    // told apart.
    let mut seen = std::collections::HashSet::new();
    for tool in &out {
        let name = chat_tool_name(tool).unwrap_or_default();
        if !seen.insert(name) {
            return Err(invalid(
                format!(
                    "two tools reach the model as `{name}` (a namespace's functions are named \
                     `namespace__function`): rename one"
                ),
                "tools",
            ));
        }
    }
    Ok(out)
}

/// The name of a chat tool this translation wrote.
fn chat_tool_name(tool: &Value) -> Option<&str> {
    tool["function"]["name"].as_str()
}

/// A tool an `allowed_tools` choice names: a function, perhaps of a namespace.
#[derive(Deserialize)]
struct AllowedTool {
    name: String,
    /// Not a string: no namespace, as before.
    #[serde(default)]
    namespace: Value,
}

/// `tool_choice` in chat terms, with the chat `tools` it may narrow (`allowed_tools`).
/// Forcing a tool that was left out (a built-in or custom one), or requiring a call when
/// every tool offered was left out, is refused: a chat upstream would answer without it,
/// and the client could not tell.
fn tool_choice(choice: &Value, offered: usize, tools: &mut Vec<Value>) -> Result<Value, ApiError> {
    let none_left = || {
        invalid(
            "tool_choice requires a tool call, but every tool offered is one this model's \
             upstream cannot run",
            "tool_choice",
        )
    };
    match choice {
        Value::String(s) if s == "required" && offered > 0 && tools.is_empty() => Err(none_left()),
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o.get("name").ok_or_else(|| {
                invalid("a function tool_choice needs a `name`", "tool_choice.name")
            })?;
            let name = match o.get("namespace").and_then(Value::as_str) {
                Some(namespace) => json!(flat_name(namespace, name.as_str().unwrap_or_default())),
                None => name.clone(),
            };
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        // Only the tools allowed go upstream: a chat upstream has no other way to say it.
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("allowed_tools") => {
            let allowed: std::collections::HashSet<String> = o
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| AllowedTool::deserialize(t).ok())
                .map(|t| match t.namespace.as_str() {
                    Some(namespace) => flat_name(namespace, &t.name),
                    None => t.name,
                })
                .collect();
            tools.retain(|t| chat_tool_name(t).is_some_and(|name| allowed.contains(name)));
            match o.get("mode").and_then(Value::as_str) {
                Some("required") if tools.is_empty() => Err(none_left()),
                Some("required") => Ok(json!("required")),
                _ => Ok(json!("auto")),
            }
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("custom") => {
            Err(invalid(
                format!(
                    "tool_choice forces the custom tool {}, which this model's upstream cannot carry",
                    shown(o.get("name").and_then(Value::as_str))
                ),
                "tool_choice",
            ))
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str).is_some() => Err(invalid(
            format!(
                "tool_choice forces the built-in tool {}, which this model's upstream cannot run",
                shown(o.get("type").and_then(Value::as_str))
            ),
            "tool_choice",
        )),
        _ => Err(invalid(
            "tool_choice must be auto, none, required or {\"type\": \"function\", \"name\": …}",
            "tool_choice",
        )),
    }
}

/// `text.format` as chat's `response_format`.
fn response_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let format = &text["format"];
    match format["type"].as_str() {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(other) => Err(invalid(
            format!(
                "text.format of type {} is not supported",
                shown(Some(other))
            ),
            "text.format.type",
        )),
    }
}

/// A Responses request as the pipeline takes it, and what the response object repeats.
pub struct Request {
    pub chat: ClientRequest,
    pub echo: Map<String, Value>,
    /// The conversation so far, kept beside a stored response to continue it.
    pub context: Option<Bytes>,
    /// Functions of a namespace tool: their chat name, the namespace, their own name.
    pub namespaces: Vec<(String, String, String)>,
}

/// Translates a Responses request (after the conversation `previous` it continues) into the
/// chat request an OpenAI-compatible upstream takes, every field sluice does not know kept.
/// What goes upstream is capped like a request body, whatever `previous` held.
pub fn request(
    fields: Body,
    mut body: Map<String, Value>,
    mut conversation: Vec<Said>,
    size: usize,
    store: bool,
) -> Result<Request, ApiError> {
    // As sent, for an upstream that speaks the Responses API itself.
    let mut native = body.clone();
    let Some(input) = fields.input else {
        return Err(invalid("`input` is required", "input"));
    };
    // What the conversation continued adds to what goes upstream.
    let earlier = if conversation.is_empty() {
        0
    } else {
        serde_json::to_vec(&conversation).map_or(0, |v| v.len())
    };
    let mut dropped = Dropped::default();
    conversation.extend(translate(input, &mut dropped)?);
    let kept = serde_json::to_vec(&conversation).map_err(|_| ApiError::Internal)?;
    let mut size = size;
    if fields.previous_response_id.is_some() {
        // What goes upstream is held to the body limit, however long the chain behind it.
        size = size.saturating_add(earlier);
        if size > BODY_LIMIT {
            return Err(invalid(
                format!(
                    "continuing this response would send {size} bytes upstream, more than the {BODY_LIMIT} a request may have; start a new conversation or send less"
                ),
                "previous_response_id",
            ));
        }
        // The upstream does not know sluice's ids: it gets the whole conversation.
        native.remove("previous_response_id");
        native.insert("input".into(), Value::Array(items(&conversation)));
    }
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(instructions) = &fields.instructions {
        messages.push(Said::new("system", json!(instructions)));
    }
    messages.extend(conversation.iter().cloned());

    // The chat request an OpenAI-compatible upstream receives: what the Responses fields
    // translate to, and every field sluice does not know, untouched (`seed`, `top_k`…).
    for field in NOT_FOR_CHAT {
        if body.get(field).is_some_and(|v| !v.is_null()) {
            dropped.add(field);
        }
    }
    for known in RESPONSES_FIELDS {
        body.remove(known);
    }
    let mut upstream = body;
    let canonical_messages = canonical(&messages);
    upstream.insert(
        "messages".into(),
        serde_json::to_value(&messages).map_err(|_| ApiError::Internal)?,
    );
    let mut namespaces = Vec::new();
    let mut chat_tools = tools(&fields.tools, &mut namespaces, &mut dropped)?;
    if let Some(choice) = &fields.tool_choice {
        let choice = tool_choice(choice, fields.tools.len(), &mut chat_tools)?;
        // A chat upstream refuses a tool_choice with no tools.
        if !chat_tools.is_empty() {
            upstream.insert("tool_choice".into(), choice);
        }
    }
    if !chat_tools.is_empty() {
        upstream.insert("tools".into(), Value::Array(chat_tools));
    }
    if let Some(format) = fields
        .text
        .as_ref()
        .map(response_format)
        .transpose()?
        .flatten()
    {
        upstream.insert("response_format".into(), format);
    }
    let decimal = crate::backend::decimal;
    if let Some(t) = fields.temperature {
        upstream.insert("temperature".into(), decimal(t));
    }
    if let Some(p) = fields.top_p {
        upstream.insert("top_p".into(), decimal(p));
    }
    if let Some(n) = fields.max_output_tokens {
        upstream.insert("max_tokens".into(), json!(n));
    }
    if let Some(p) = fields.parallel_tool_calls {
        upstream.insert("parallel_tool_calls".into(), json!(p));
    }
    if let Some(user) = &fields.user {
        upstream.insert("user".into(), json!(user));
    }
    if let Some(effort) = fields
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .filter(|e| !e.is_null())
    {
        upstream.insert("reasoning_effort".into(), effort.clone());
    }

    // What the response object repeats of the request.
    let decimal_or = |v: Option<f32>| v.map_or(json!(1.0), decimal);
    let mut echo = Map::new();
    echo.insert("instructions".into(), json!(fields.instructions));
    echo.insert("max_output_tokens".into(), json!(fields.max_output_tokens));
    echo.insert("temperature".into(), decimal_or(fields.temperature));
    echo.insert("top_p".into(), decimal_or(fields.top_p));
    echo.insert("tools".into(), Value::Array(fields.tools.clone()));
    echo.insert(
        "tool_choice".into(),
        fields.tool_choice.clone().unwrap_or(json!("auto")),
    );
    echo.insert(
        "text".into(),
        fields
            .text
            .clone()
            .unwrap_or(json!({"format": {"type": "text"}})),
    );
    echo.insert(
        "metadata".into(),
        Value::Object(fields.metadata.clone().unwrap_or_default()),
    );
    echo.insert(
        "parallel_tool_calls".into(),
        json!(fields.parallel_tool_calls.unwrap_or(true)),
    );
    echo.insert(
        "previous_response_id".into(),
        json!(fields.previous_response_id),
    );
    echo.insert("store".into(), json!(store));
    echo.insert(
        "reasoning".into(),
        fields
            .reasoning
            .clone()
            .unwrap_or(json!({"effort": null, "summary": null})),
    );
    echo.insert("truncation".into(), json!("disabled"));
    echo.insert("user".into(), json!(fields.user));

    let context = store.then(|| Bytes::from(kept));
    let chat = ClientRequest {
        model: fields.model,
        messages: canonical_messages,
        max_tokens: fields.max_output_tokens,
        max_tokens_param: "max_output_tokens",
        temperature: fields.temperature,
        top_p: fields.top_p,
        seed: None,
        body: upstream,
        native: Some(crate::backend::Native::Responses(native)),
        size,
        dropped,
    };
    Ok(Request {
        chat,
        echo,
        context,
        namespaces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chat body a Responses request becomes, or its refusal.
    fn translated(body: Value) -> Result<Map<String, Value>, ApiError> {
        let Value::Object(map) = body.clone() else {
            unreachable!("an object")
        };
        let fields: Body = serde_json::from_value(body).expect("fields");
        request(fields, map, Vec::new(), 0, false).map(|r| r.chat.body)
    }

    fn function(name: &str) -> Value {
        json!({"type": "function", "name": name, "parameters": {"type": "object"}})
    }

    #[test]
    fn namespaced_tools_whose_joined_names_meet_are_refused() {
        let namespace = |name: &str, inner: &str| json!({"type": "namespace", "name": name, "tools": [function(inner)]});
        for tools in [
            json!([namespace("a", "b__c"), namespace("a__b", "c")]),
            json!([namespace("a", "b__c"), function("a__b__c")]),
        ] {
            let error = translated(json!({"model": "m", "input": "x", "tools": tools}))
                .expect_err("refused");
            assert!(error.to_string().contains("a__b__c"), "{error}");
        }
        let fine = translated(json!({"model": "m", "input": "x",
            "tools": [namespace("a", "b"), function("a_b")]}));
        assert!(fine.is_ok());
    }

    #[test]
    fn allowed_tools_narrow_what_goes_upstream() {
        let body = translated(json!({"model": "m", "input": "x",
            "tools": [function("read"), function("write"), function("delete")],
            "tool_choice": {"type": "allowed_tools", "mode": "required",
                "tools": [{"type": "function", "name": "read"}, {"type": "function", "name": "write"}]}}))
        .expect("translated");
        let names: Vec<&str> = body["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(|t| t["function"]["name"].as_str())
            .collect();
        assert_eq!(names, ["read", "write"]);
        assert_eq!(body["tool_choice"], "required");
    }

    #[test]
    fn a_required_call_with_every_tool_left_out_is_refused() {
        let error = translated(json!({"model": "m", "input": "x",
            "tools": [{"type": "web_search"}], "tool_choice": "required"}))
        .expect_err("refused");
        assert!(error.to_string().contains("tool_choice"), "{error}");
    }

    #[test]
    fn forcing_a_custom_tool_is_refused_by_its_name() {
        let error = translated(json!({"model": "m", "input": "x",
            "tools": [{"type": "custom", "name": "apply_patch"}],
            "tool_choice": {"type": "custom", "name": "apply_patch"}}))
        .expect_err("refused");
        let message = error.to_string();
        assert!(
            message.contains("custom tool") && message.contains("apply_patch"),
            "{message}"
        );
    }
}
