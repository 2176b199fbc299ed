//! OpenAI's Responses API as an upstream speaks it (`api = "responses"` in its route): the
//! client's own request when it spoke that API, else the chat request written as one; for
//! a client of that same API, each event goes on as it came ([`Delta::Event`]); for any
//! other, the events become the pivot's — text, reasoning, encrypted reasoning, function
//! call pieces, annotations, the finish and the usage.

use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use crate::backend::shown;
use crate::backend::speaker::{self, Api, Headers, Speaker};
use crate::backend::{
    BackendError, Delta, Finish, ModelRequest, Native, Raw, Signature, Text, ToolCall, Usage,
};
use crate::dialect::completions::wire::{Body, Content, Part, ToolChoice};

/// An upstream that speaks the Responses API.
pub struct Upstream;

impl Speaker for Upstream {
    fn api(&self) -> Api {
        Api::Responses
    }

    fn path(&self) -> &'static str {
        "/responses"
    }

    /// The client's own body when it spoke this API (with the upstream's model name), else
    /// the chat request written as one.
    fn body(&self, mut request: ModelRequest, _: &mut Headers) -> String {
        let mut body = match request.native.take() {
            Some(Native::Responses(native)) => native,
            _ => from_chat(&crate::backend::chat_body(&mut request)),
        };
        body.insert("model".into(), Value::String(request.model));
        body.insert("stream".into(), Value::Bool(true));
        // A response runs where the client is: its background and storage are sluice's.
        body.remove("background");
        Value::Object(body).to_string()
    }

    fn reader(&self, native: bool) -> Box<dyn speaker::Reader> {
        speaker::Typed::<Reader>::reader(native)
    }

    fn carried(&self) -> &'static [&'static str] {
        &CARRIED
    }
}

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
    let chat = Body::of(chat);
    let mut body = Map::new();
    let mut input = Vec::new();
    for m in &chat.messages {
        match m.role.as_deref() {
            Some("tool") => input.push(json!({"type": "function_call_output",
                "call_id": m.tool_call_id, "output": m.content.as_ref().map(Content::text)})),
            Some(role) => {
                if let Some(content) = m.content.as_ref().map(|c| content(c, role == "assistant")) {
                    input.push(json!({"role": role, "content": content}));
                }
                for call in &m.tool_calls {
                    input.push(json!({"type": "function_call", "call_id": call.id,
                        "name": call.function.name, "arguments": call.function.arguments}));
                }
            }
            None => {}
        }
    }
    body.insert("input".into(), Value::Array(input));
    let tools: Vec<Value> = chat
        .tools
        .iter()
        .filter_map(|t| {
            let mut tool = t.function.clone()?;
            tool.insert("type".into(), json!("function"));
            Some(Value::Object(tool))
        })
        .collect();
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = &chat.tool_choice {
        let choice = match choice {
            ToolChoice::Named { function } => json!({"type": "function", "name": function.name}),
            ToolChoice::Mode(mode) => json!(mode),
            ToolChoice::Other(other) => other.clone(),
        };
        body.insert("tool_choice".into(), choice);
    }
    if let Some(format) = &chat.response_format {
        body.insert("text".into(), json!({"format": text_format(format)}));
    }
    if let Some(n) = chat.limit() {
        body.insert("max_output_tokens".into(), n.clone());
    }
    if let Some(effort) = &chat.reasoning_effort {
        body.insert("reasoning".into(), json!({"effort": effort}));
    }
    for (key, value) in [
        ("temperature", chat.temperature),
        ("top_p", chat.top_p),
        (
            "parallel_tool_calls",
            chat.parallel_tool_calls.map(Value::Bool),
        ),
        ("user", chat.user),
        ("metadata", chat.metadata),
        ("service_tier", chat.service_tier),
    ] {
        if let Some(v) = value {
            body.insert(key.into(), v);
        }
    }
    body.insert("store".into(), Value::Bool(false));
    body
}

/// A chat `response_format` as the Responses API's `text.format`: a JSON schema's fields
/// beside its `type`, any other as it is.
fn text_format(format: &Value) -> Value {
    #[derive(serde::Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Format {
        JsonSchema { json_schema: Map<String, Value> },
    }
    match Format::deserialize(format) {
        Ok(Format::JsonSchema { mut json_schema }) => {
            json_schema.insert("type".into(), json!("json_schema"));
            Value::Object(json_schema)
        }
        Err(_) => format.clone(),
    }
}

/// Chat content as Responses content: a string as it is, parts in the Responses API's
/// types (`input_text` or, for the assistant, `output_text`; `input_image`).
fn content(content: &Content, assistant: bool) -> Value {
    match content {
        Content::Text(text) => json!(text),
        Content::Parts(parts) => Value::Array(
            parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text { text } => {
                        let kind = if assistant {
                            "output_text"
                        } else {
                            "input_text"
                        };
                        Some(json!({"type": kind, "text": text}))
                    }
                    Part::ImageUrl { image_url } => Some(json!({"type": "input_image",
                        "image_url": image_url.url,
                        "detail": image_url.detail.clone().unwrap_or(json!("auto"))})),
                    Part::Other => None,
                })
                .collect(),
        ),
        Content::Other(other) => other.clone(),
    }
}

/// What has been read of one response.
#[derive(Default)]
struct Reader {
    /// Function calls seen so far: the chat `index` of the next one.
    calls: u32,
}

/// One event of a Responses stream, as far as sluice reads it.
#[derive(serde::Deserialize)]
#[serde(tag = "type")]
enum Event {
    #[serde(rename = "response.output_text.delta")]
    TextDelta { delta: Option<String> },
    #[serde(rename = "response.output_item.added")]
    ItemAdded {
        #[serde(default)]
        item: Item,
    },
    #[serde(
        rename = "response.reasoning_text.delta",
        alias = "response.reasoning_summary_text.delta"
    )]
    ReasoningDelta { delta: Option<String> },
    #[serde(rename = "response.output_item.done")]
    ItemDone {
        #[serde(default)]
        item: Item,
    },
    #[serde(rename = "response.output_text.annotation.added")]
    Annotation {
        #[serde(default)]
        annotation: Value,
    },
    #[serde(rename = "response.function_call_arguments.delta")]
    ArgumentsDelta {
        #[serde(default)]
        delta: String,
    },
    #[serde(rename = "response.completed")]
    Completed {
        #[serde(default)]
        response: Finished,
    },
    #[serde(rename = "response.incomplete")]
    Incomplete {
        #[serde(default)]
        response: Finished,
    },
    #[serde(rename = "response.failed")]
    Failed {
        #[serde(default)]
        response: Finished,
    },
    #[serde(rename = "error")]
    Error { message: Option<String> },
    /// `keepalive`, the many events sluice does not read, and types to come.
    #[serde(other)]
    Other,
}

/// An output item, as far as sluice reads it.
#[derive(serde::Deserialize, Default)]
struct Item {
    #[serde(rename = "type")]
    kind: Option<String>,
    call_id: Option<String>,
    name: Option<String>,
    encrypted_content: Option<String>,
}

/// A response as it ends.
#[derive(serde::Deserialize, Default)]
struct Finished {
    #[serde(default)]
    usage: Option<Counts>,
    #[serde(default)]
    error: Option<Failure>,
}

/// A usage object's two counts.
#[derive(serde::Deserialize, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
pub(crate) struct Failure {
    pub(crate) message: Option<String>,
}

impl Event {
    /// After it the response has no more.
    fn ends(&self) -> bool {
        matches!(
            self,
            Event::Completed { .. }
                | Event::Incomplete { .. }
                | Event::Failed { .. }
                | Event::Error { .. }
        )
    }
}

impl Reader {
    /// The finish (`cut` short by the token limit, or not) and the usage.
    fn finish(&self, cut: bool, response: Finished, ready: &mut Vec<Delta>) {
        ready.push(Delta::Finish(if cut {
            Finish::Length
        } else if self.calls > 0 {
            Finish::ToolUse
        } else {
            Finish::Stop
        }));
        if let Some(Counts {
            input_tokens: Some(input),
            output_tokens: Some(output),
        }) = response.usage
        {
            let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
            ready.push(Delta::Usage(Usage::new(clamp(input), clamp(output))));
        }
    }
}

impl speaker::Translate for Reader {
    type Event = Event;

    fn ends(event: &Event) -> bool {
        event.ends()
    }

    fn translate(&mut self, event: Event, ready: &mut Vec<Delta>) -> Result<(), BackendError> {
        match event {
            Event::TextDelta { delta: Some(text) } => ready.push(Delta::Text(Text::plain(&text))),
            Event::ItemAdded { item } if item.kind.as_deref() == Some("function_call") => {
                ready.push(Delta::ToolCall(ToolCall {
                    index: self.calls,
                    id: item.call_id,
                    name: item.name,
                    arguments: Text::plain(""),
                }));
                self.calls += 1;
            }
            Event::ReasoningDelta { delta: Some(text) } => {
                ready.push(Delta::Reasoning(Text::plain(&text)));
            }
            Event::ItemDone { item } => match item.kind.as_deref() {
                Some("reasoning") => {
                    if let Some(encrypted) = item.encrypted_content {
                        ready.push(Delta::Signature(Signature::Encrypted(encrypted)));
                    }
                }
                Some("message" | "function_call") => {}
                // Built-in tools' calls (`web_search_call`…) and items to come.
                kind => ready.push(Delta::Untranslated(format!("{} item", shown(kind)))),
            },
            Event::Annotation { annotation } => {
                ready.push(Delta::Annotation(Raw::of(&annotation)));
            }
            Event::ArgumentsDelta { delta } => {
                ready.push(Delta::ToolCall(ToolCall {
                    index: self.calls.saturating_sub(1),
                    id: None,
                    name: None,
                    arguments: Text::plain(&delta),
                }));
            }
            Event::Completed { response } => self.finish(false, response, ready),
            Event::Incomplete { response } => self.finish(true, response, ready),
            Event::Failed { response } => {
                let message = response
                    .error
                    .and_then(|e| e.message)
                    .unwrap_or_else(|| "the upstream's response failed".to_owned());
                return Err(BackendError::Interrupted(message));
            }
            Event::Error { message } => {
                let message =
                    message.unwrap_or_else(|| "the upstream's response failed".to_owned());
                return Err(BackendError::Interrupted(message));
            }
            _ => {}
        }
        Ok(())
    }
}
