//! Anthropic's Messages API as an upstream speaks it (`api = "anthropic"` in its route):
//! the client's own request when it spoke that API, else the chat request written as one;
//! for a client of that same API each event goes on as it came ([`Delta::Event`]), for
//! any other the events become the pivot's — text, reasoning and its signature, tool call
//! pieces, citations, the finish and the usage.

use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use crate::backend::shown;
use crate::backend::speaker::{self, Api, Headers, Speaker};
use crate::backend::{
    BackendError, Delta, Finish, ModelRequest, Native, Raw, Signature, Text, ToolCall, Usage,
};
use crate::dialect::completions::wire::{Body, Content, Part, Stop, ToolChoice};

/// An upstream that speaks the Messages API.
pub struct Upstream;

impl Speaker for Upstream {
    fn api(&self) -> Api {
        Api::Messages
    }

    fn path(&self) -> &'static str {
        "/messages"
    }

    /// Anthropic's own key header (a Bearer token works on compatible servers).
    fn key(&self, key: &str) -> Option<(HeaderName, HeaderValue)> {
        let mut value = HeaderValue::from_str(key).ok()?;
        value.set_sensitive(true);
        Some((HeaderName::from_static("x-api-key"), value))
    }

    fn body(&self, request: ModelRequest, headers: &mut Headers) -> String {
        let (body, version, beta) = body(request);
        let mut header = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.push((HeaderName::from_static(name), value));
            }
        };
        header("anthropic-version", &version);
        if let Some(beta) = beta {
            header("anthropic-beta", &beta);
        }
        Value::Object(body).to_string()
    }

    fn reader(&self, native: bool) -> Box<dyn speaker::Reader> {
        speaker::Typed::<Reader>::reader(native)
    }

    fn carried(&self) -> &'static [&'static str] {
        &CARRIED
    }
}

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
        _ => (
            from_chat(&crate::backend::chat_body(&mut request)),
            None,
            None,
        ),
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
    let chat = Body::of(chat);
    let mut body = Map::new();
    let mut system = Vec::new();
    // Turns alternate: a tool result and the user's words after it are one user turn.
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for m in &chat.messages {
        let role = m.role.as_deref().unwrap_or("user");
        let text = || m.content.as_ref().map(Content::text).unwrap_or_default();
        if matches!(role, "system" | "developer") {
            system.push(text());
            continue;
        }
        let mut blocks = Vec::new();
        if role == "tool" {
            blocks.push(json!({"type": "tool_result",
                "tool_use_id": m.tool_call_id.clone().unwrap_or(Value::Null), "content": text()}));
        } else {
            blocks.extend(m.content.as_ref().map(content_blocks).unwrap_or_default());
            for call in &m.tool_calls {
                let arguments = call.function.arguments.as_ref().and_then(Value::as_str);
                let input: Value =
                    serde_json::from_str(arguments.unwrap_or("{}")).unwrap_or_else(|_| json!({}));
                blocks.push(json!({"type": "tool_use", "id": call.id,
                    "name": call.function.name, "input": input}));
            }
        }
        let role = if role == "assistant" {
            "assistant"
        } else {
            "user"
        };
        match turns.last_mut() {
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages = turns
        .into_iter()
        .map(|(role, mut blocks)| {
            // A turn of text alone is a string, as clients write it.
            let content = match blocks.as_mut_slice() {
                [Value::Object(block)] if block.get("type") == Some(&json!("text")) => {
                    block.remove("text").unwrap_or_default()
                }
                _ => Value::Array(blocks),
            };
            json!({"role": role, "content": content})
        })
        .collect();
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n")));
    }
    body.insert("messages".into(), Value::Array(messages));
    let tools: Vec<Value> = chat
        .tools
        .iter()
        .filter_map(|t| {
            let f = t.function.as_ref()?;
            let field = |name: &str| f.get(name).cloned();
            Some(json!({"name": field("name"),
                "description": field("description").unwrap_or(json!("")),
                "input_schema": field("parameters").unwrap_or(json!({"type": "object"}))}))
        })
        .collect();
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match &chat.tool_choice {
        Some(ToolChoice::Mode(c)) if c == "required" => Some(json!({"type": "any"})),
        Some(ToolChoice::Mode(c)) if c == "none" => Some(json!({"type": "none"})),
        Some(ToolChoice::Named { function }) => {
            Some(json!({"type": "tool", "name": function.name}))
        }
        _ => None,
    };
    if chat.parallel_tool_calls == Some(false) {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if let Value::Object(choice) = choice {
            choice.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    if let Some(choice) = choice {
        body.insert("tool_choice".into(), choice);
    }
    let max_tokens = chat.limit().cloned().unwrap_or(json!(DEFAULT_MAX_TOKENS));
    body.insert("max_tokens".into(), max_tokens);
    match chat.stop {
        Some(Stop::One(stop)) => {
            body.insert("stop_sequences".into(), json!([stop]));
        }
        Some(Stop::Many(stops)) => {
            body.insert("stop_sequences".into(), Value::Array(stops));
        }
        _ => {}
    }
    for (key, value) in [
        ("temperature", chat.temperature),
        ("top_p", chat.top_p),
        ("top_k", chat.top_k),
    ] {
        if let Some(v) = value {
            body.insert(key.into(), v);
        }
    }
    if let Some(user) = chat.user {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    body
}

/// Chat content as Messages blocks: text, and images (a data URL as base64, else by URL).
fn content_blocks(content: &Content) -> Vec<Value> {
    match content {
        Content::Text(s) if !s.is_empty() => vec![json!({"type": "text", "text": s})],
        Content::Parts(parts) => parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(json!({"type": "text", "text": text})),
                Part::ImageUrl { image_url } => {
                    let url = image_url.url.as_str();
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
                Part::Other => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What has been read of one message.
#[derive(Default)]
struct Reader {
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
    Counts::deserialize(usage).ok()?.cache()
}

/// The usage fields that carry `cache` as chat completions say it (`cached_tokens`, and
/// `cache_write_tokens` for what was written).
pub fn cache_details((read, written): (u32, u32)) -> String {
    format!(r#""prompt_tokens_details":{{"cached_tokens":{read},"cache_write_tokens":{written}}}"#)
}

fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One event of a Messages stream, as far as sluice reads it.
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        #[serde(default)]
        message: Started,
    },
    ContentBlockStart {
        #[serde(default)]
        content_block: Block,
    },
    ContentBlockDelta {
        #[serde(default)]
        index: usize,
        #[serde(default)]
        delta: BlockDelta,
    },
    MessageDelta {
        #[serde(default)]
        delta: StopReason,
        #[serde(default)]
        usage: Counts,
    },
    MessageStop,
    Error {
        #[serde(default)]
        error: Failure,
    },
    /// `ping`, `content_block_stop`, and types to come.
    #[serde(other)]
    Other,
}

#[derive(serde::Deserialize, Default)]
struct Started {
    #[serde(default)]
    usage: Counts,
}

/// A usage object's counts.
#[derive(serde::Deserialize, Default)]
pub(crate) struct Counts {
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl Counts {
    /// Prompt tokens read from and written to the cache, when it says.
    pub(crate) fn cache(&self) -> Option<(u32, u32)> {
        let (read, written) = (
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        );
        (read.is_some() || written.is_some())
            .then(|| (clamp(read.unwrap_or(0)), clamp(written.unwrap_or(0))))
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    #[default]
    Text,
    Thinking,
    RedactedThinking {
        #[serde(default)]
        data: String,
    },
    ToolUse {
        id: Option<String>,
        name: Option<String>,
    },
    /// A server tool's use or result, and block types to come, by their type.
    #[serde(untagged)]
    Other {
        #[serde(rename = "type")]
        kind: Option<String>,
    },
}

#[derive(serde::Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: Option<String>,
    },
    ThinkingDelta {
        #[serde(default)]
        thinking: String,
    },
    SignatureDelta {
        #[serde(default)]
        signature: String,
    },
    CitationsDelta {
        #[serde(default)]
        citation: Value,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    #[default]
    #[serde(other)]
    Other,
}

#[derive(serde::Deserialize, Default)]
struct StopReason {
    stop_reason: Option<String>,
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct Failure {
    pub(crate) message: Option<String>,
}

impl Event {
    /// After it the message has no more.
    fn ends(&self) -> bool {
        matches!(self, Event::MessageStop | Event::Error { .. })
    }
}

impl speaker::Translate for Reader {
    type Event = Event;

    fn ends(event: &Event) -> bool {
        event.ends()
    }

    fn translate(&mut self, event: Event, ready: &mut Vec<Delta>) -> Result<(), BackendError> {
        match event {
            Event::MessageStart { message } => {
                self.input_tokens = clamp(message.usage.input_tokens.unwrap_or(0));
                self.cache = message.usage.cache().unwrap_or_default();
            }
            Event::ContentBlockStart { content_block } => match content_block {
                Block::RedactedThinking { data } => {
                    self.blocks.push(None);
                    ready.push(Delta::Redacted(data));
                }
                Block::ToolUse { id, name } => {
                    ready.push(Delta::ToolCall(ToolCall {
                        index: self.calls,
                        id,
                        name,
                        arguments: Text::plain(""),
                    }));
                    self.blocks.push(Some(self.calls));
                    self.calls += 1;
                }
                Block::Text | Block::Thinking => self.blocks.push(None),
                Block::Other { kind } => {
                    self.blocks.push(None);
                    ready.push(Delta::Untranslated(format!(
                        "{} block",
                        shown(kind.as_deref())
                    )));
                }
            },
            Event::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } => {
                    if let Some(text) = text {
                        ready.push(Delta::Text(Text::plain(&text)));
                    }
                }
                BlockDelta::ThinkingDelta { thinking } => {
                    ready.push(Delta::Reasoning(Text::plain(&thinking)));
                }
                BlockDelta::SignatureDelta { signature } => {
                    ready.push(Delta::Signature(Signature::Anthropic(signature)));
                }
                BlockDelta::CitationsDelta { citation } => {
                    ready.push(Delta::Annotation(Raw::of(&citation)));
                }
                // A server tool's input (its block is not a tool call) has none.
                BlockDelta::InputJsonDelta { partial_json } => {
                    if let Some(call) = self.blocks.get(index).copied().flatten() {
                        ready.push(Delta::ToolCall(ToolCall {
                            index: call,
                            id: None,
                            name: None,
                            arguments: Text::plain(&partial_json),
                        }));
                    }
                }
                BlockDelta::Other => {}
            },
            Event::MessageDelta { delta, usage } => {
                self.finish = Some(match delta.stop_reason.as_deref() {
                    Some("max_tokens") => Finish::Length,
                    Some("tool_use") => Finish::ToolUse,
                    Some("refusal") => Finish::Filtered,
                    _ => Finish::Stop,
                });
                if let Some(input) = usage.input_tokens {
                    self.input_tokens = clamp(input);
                }
                if let Some(cache) = usage.cache() {
                    self.cache = cache;
                }
                if let Some(output) = usage.output_tokens {
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
            Event::MessageStop => {
                ready.push(Delta::Finish(self.finish.take().unwrap_or(Finish::Stop)));
            }
            Event::Error { error } => {
                let message = error
                    .message
                    .unwrap_or_else(|| "the upstream's message failed".to_owned());
                return Err(BackendError::Interrupted(message));
            }
            Event::Other => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::speaker::Translate as _;

    #[test]
    fn a_cached_prompt_is_counted_whole_with_its_cached_parts_named() {
        let mut reader = Reader::default();
        let mut ready = Vec::new();
        let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 9,
            "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}}});
        let delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 4}});
        for event in [start, delta] {
            let event = serde_json::from_value(event).expect("an event");
            assert!(reader.translate(event, &mut ready).is_ok());
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
