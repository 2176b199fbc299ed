//! The pivot: what every dialect reads a reply into and writes a reply from. A backend
//! (an upstream in any API, the mock, the local model) turns what it receives into a stream
//! of [`Delta`]s; each client API's encoder writes its own events from them. Nothing here
//! is any one API's JSON: text and reasoning are JSON string literals (an upstream's go to
//! the client as they came, copied once), tool calls and finish reasons are typed, and
//! what only one API has travels as an opaque event ([`Delta::ChatFields`], [`Delta::Event`],
//! [`Delta::Untranslated`]) that the other dialects name or leave out.

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// Generated text, kept as the JSON string literal it is written as (quotes included): an
/// upstream's arrives that way and goes to the client without being unescaped and escaped
/// again; a model sluice runs escapes its text once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(Box<str>);

impl Text {
    /// Plain text, escaped once.
    pub fn plain(text: &str) -> Self {
        Text(serde_json::to_string(text).unwrap_or_default().into())
    }

    /// A JSON string literal as it came, quotes included.
    pub(crate) fn literal(raw: &str) -> Self {
        Text(raw.into())
    }

    /// The JSON string literal.
    pub fn json(&self) -> &str {
        &self.0
    }

    /// Appends the text itself to `out`.
    pub fn push_to(&self, out: &mut String) {
        match self.0.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Some(inner) if !inner.contains('\\') => out.push_str(inner),
            _ => out.push_str(&serde_json::from_str::<String>(&self.0).unwrap_or_default()),
        }
    }

    /// The text's size as written, in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.len() <= 2
    }
}

/// JSON as an upstream wrote it (an object of delta fields, an annotation, an event),
/// carried without being parsed into a `Value`.
#[derive(Debug, Clone)]
pub struct Raw(pub Box<serde_json::value::RawValue>);

impl Raw {
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// A JSON value as written.
    pub fn of(value: &Value) -> Raw {
        // A `Value` always serialises; `null` stands in for the impossible.
        Raw(serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned()))
    }
}

impl PartialEq for Raw {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

/// One step of a generated reply: the canonical events every encoder writes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Generated text.
    Text(Text),
    /// Reasoning as it streams (chat's `reasoning_content`, Anthropic's `thinking`, a
    /// Responses reasoning item's text), a JSON string literal like [`Delta::Text`].
    Reasoning(Text),
    /// A piece of a tool call as it streams.
    ToolCall(ToolCall),
    /// Chat delta fields no other event carries (`refusal`, `audio`, any to come), as an
    /// OpenAI-compatible upstream wrote them: relayed to chat clients unchanged, left to
    /// the rest.
    ChatFields(Raw),
    /// Fields of the upstream's chunks themselves, `"system_fingerprint":…,"service_tier":…`
    /// as written: sent before the first event they came with, and again when they change.
    Identity(Box<str>),
    /// The `logprobs` of the choice whose text or fields follow.
    Logprobs(Raw),
    /// Usage fields beyond the three counts (`prompt_tokens_details`…), `"k":v,…` as
    /// written: sent just before the [`Delta::Usage`] they belong to.
    UsageDetails(Box<str>),
    /// The reply is complete, and why.
    Finish(Finish),
    /// Token counts as the backend reports them.
    Usage(Usage),
    /// Waiting for the model, with this many requests ahead: shown to the client as a
    /// keep-alive comment.
    Queued(usize),
    /// The signature of the reasoning just streamed (Anthropic's `signature_delta`), or
    /// reasoning the upstream sent encrypted (a Responses reasoning item's
    /// `encrypted_content`): what a client sends back for the model to continue from it.
    Signature(Signature),
    /// Reasoning the upstream redacted (Anthropic's `redacted_thinking` block): its data.
    Redacted(String),
    /// A citation or annotation on the text just streamed, as the upstream wrote it.
    Annotation(Raw),
    /// Content of the upstream's own API that no canonical event carries (a server tool's
    /// use and result, a block or item of a type to come), named: an encoder says it was
    /// left out, so that nothing vanishes without a word.
    Untranslated(String),
    /// One event of an upstream that speaks the client's own API (a Responses API
    /// upstream answering a `/v1/responses` request), to relay as it came.
    Event(Raw),
}

/// Which kind of proof of reasoning a [`Delta::Signature`] is: each goes back only to
/// the API that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// Anthropic's thinking signature.
    Anthropic(String),
    /// OpenAI's encrypted reasoning.
    Encrypted(String),
}

/// A piece of a tool call as it streams: the first piece of call `index` has its `id` and
/// `name`, every piece a part of its `arguments` (JSON text, streamed in arbitrary cuts).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The call's place among the reply's calls, from 0.
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    /// A piece of the arguments, as the JSON string literal it was written as.
    pub arguments: Text,
}

impl ToolCall {
    /// The first piece of call `index`: its id and name.
    pub fn start(index: u32, id: &str, name: &str) -> Delta {
        Delta::ToolCall(ToolCall {
            index,
            id: Some(id.to_owned()),
            name: Some(name.to_owned()),
            arguments: Text::plain(""),
        })
    }

    /// A later piece of call `index`: more of its arguments.
    pub fn more(index: u32, arguments: &str) -> Delta {
        Delta::ToolCall(ToolCall {
            index,
            id: None,
            name: None,
            arguments: Text::plain(arguments),
        })
    }
}

/// Why a reply ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The model was done (or met a stop sequence).
    Stop,
    /// The token limit.
    Length,
    /// The model called tools and waits for their results.
    ToolUse,
    /// A content filter (or the model's refusal) ended it.
    Filtered,
    /// A reason only an OpenAI-compatible upstream gives (`function_call`, a server's own):
    /// relayed to chat clients as it came, a stop to the rest.
    Other(Box<str>),
}

impl Finish {
    /// A chat completion's `finish_reason`.
    pub fn from_chat(reason: &str) -> Finish {
        match reason {
            "stop" => Finish::Stop,
            "length" => Finish::Length,
            "tool_calls" => Finish::ToolUse,
            "content_filter" => Finish::Filtered,
            other => Finish::Other(other.into()),
        }
    }

    /// As chat completions say it.
    pub fn chat(&self) -> &str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolUse => "tool_calls",
            Finish::Filtered => "content_filter",
            Finish::Other(reason) => reason,
        }
    }

    /// What it is among the four every API has (`function_call` is a tool use).
    pub fn kind(&self) -> Finish {
        match self {
            Finish::Other(reason) if &**reason == "function_call" => Finish::ToolUse,
            Finish::Other(_) => Finish::Stop,
            known => known.clone(),
        }
    }
}

/// The names of what a translation left out, each once, in the order met. Names can be a
/// client's (unknown fields), so they are held to [`Dropped::MOST`] names of printable
/// ASCII of at most [`Dropped::LONGEST`] bytes each, the rest counted: the header and the
/// log line stay small whatever a request holds.
#[derive(Debug, Default, Clone)]
pub struct Dropped {
    names: Vec<String>,
    more: usize,
}

impl Dropped {
    pub const MOST: usize = 32;
    pub const LONGEST: usize = 64;

    pub fn add(&mut self, name: &str) {
        let name: String = name
            .chars()
            .take(Self::LONGEST)
            .map(|c| {
                if c.is_ascii_graphic() && c != ',' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if self.names.contains(&name) {
            return;
        }
        if self.names.len() < Self::MOST {
            self.names.push(name);
        } else {
            self.more += 1;
        }
    }

    pub fn into_names(mut self) -> Vec<String> {
        if self.more > 0 {
            self.names.push(format!("+{} more", self.more));
        }
        self.names
    }
}
