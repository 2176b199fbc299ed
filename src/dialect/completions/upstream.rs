//! Chat completions as an upstream speaks them: the request (the client's body with the
//! upstream's model name, always streamed, always with usage), and each
//! `chat.completion.chunk` read in place — a typed view that borrows from the event's
//! text, so a token costs one small copy (its JSON string literal) and no
//! `serde_json::Value`. Fields sluice does not interpret pass through as the upstream wrote
//! them.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use serde_json::{Value, json};

use crate::backend::speaker::{Api, Headers, Reader, Speaker};
use crate::backend::{BackendError, Delta, Finish, ModelRequest, Raw, Text, ToolCall, Usage};

/// An upstream that speaks chat completions.
pub struct Upstream {
    /// Also send `max_tokens` when the client set only `max_completion_tokens`: servers
    /// such as llama-cpp-python ignore the newer name. OpenAI itself rejects the old one
    /// for some models, so not there.
    copy_max_tokens: bool,
}

impl Upstream {
    pub fn new(base_url: &str) -> Self {
        Upstream {
            copy_max_tokens: !base_url.contains("api.openai.com"),
        }
    }
}

impl Speaker for Upstream {
    fn api(&self) -> Api {
        Api::Completions
    }

    fn path(&self) -> &'static str {
        "/chat/completions"
    }

    /// A client that spoke OpenAI's format sent its messages and options as they go
    /// upstream (content parts, tools, unknown fields pass through); for any other, they
    /// are written from the canonical request.
    fn body(&self, mut request: ModelRequest, _: &mut Headers) -> String {
        let mut body = crate::backend::chat_body(&mut request);
        body.insert("model".into(), Value::String(request.model));
        body.insert("stream".into(), Value::Bool(true));
        let options = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Value::Object(options) = options {
            options.insert("include_usage".into(), Value::Bool(true));
        } else {
            *options = json!({"include_usage": true});
        }
        if self.copy_max_tokens
            && !body.contains_key("max_tokens")
            && let Some(n) = body.get("max_completion_tokens").cloned()
        {
            body.insert("max_tokens".into(), n);
        }
        Value::Object(body).to_string()
    }

    fn reader(&self, _native: bool) -> Box<dyn Reader> {
        Box::<Chunks>::default()
    }
}

/// Reads a chat completions stream's chunks, up to `[DONE]`.
#[derive(Default)]
struct Chunks {
    seen: Seen,
}

impl Reader for Chunks {
    fn event(&mut self, data: &str, ready: &mut Vec<Delta>) -> Result<bool, BackendError> {
        if data == "[DONE]" {
            return Ok(true);
        }
        deltas(data, ready, &mut self.seen).map(|()| false)
    }
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Option<First<Choice<'a>>>,
    #[serde(default, borrow)]
    system_fingerprint: Option<&'a RawValue>,
    #[serde(default, borrow)]
    service_tier: Option<&'a RawValue>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaParts<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    logprobs: Option<&'a RawValue>,
}

/// A delta split into its text and reasoning (the literals as sent), its tool calls, and
/// every other field that is set.
#[derive(Default)]
struct DeltaParts<'a> {
    content: Option<&'a str>,
    /// `reasoning_content` (DeepSeek, vLLM) or `reasoning` (OpenRouter, Ollama).
    reasoning: Option<&'a str>,
    calls: Vec<CallPiece<'a>>,
    /// `{"refusal":…,"annotations":…}`: the rest, as written, or empty.
    rest: String,
}

/// A piece of a tool call in a chat delta.
#[derive(Deserialize)]
struct CallPiece<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionPiece<'a>>,
}

#[derive(Deserialize)]
struct FunctionPiece<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<&'a RawValue>,
}

impl CallPiece<'_> {
    fn into_delta(self) -> Delta {
        let (name, arguments) = match self.function {
            Some(f) => (f.name, f.arguments),
            None => (None, None),
        };
        let arguments = match arguments.map(RawValue::get) {
            Some(raw) if raw.starts_with('"') => Text::literal(raw),
            // Arguments written as an object, not as the text of one (some servers do).
            Some(raw) if raw != "null" => Text::plain(raw),
            _ => Text::plain(""),
        };
        Delta::ToolCall(ToolCall {
            index: self.index,
            id: self.id.map(Cow::into_owned),
            name: name.map(Cow::into_owned),
            arguments,
        })
    }
}

/// What one stream's chunks have said of themselves so far.
#[derive(Default)]
pub struct Seen {
    /// `"system_fingerprint":…,"service_tier":…` of the last chunk that had them.
    identity: String,
    /// Changed since it was last sent on.
    unsent: bool,
}

#[derive(Deserialize)]
struct InBand<'a> {
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

/// Appends the deltas of one upstream chunk (the `data` of its event) to `out`, or returns
/// the error it carries in band. `seen` carries what earlier chunks of the stream said.
pub fn deltas(data: &str, out: &mut Vec<Delta>, seen: &mut Seen) -> Result<(), BackendError> {
    let chunk: Chunk = serde_json::from_str(data)
        .map_err(|e| BackendError::Protocol(format!("a chunk that is not JSON ({e})")))?;
    if let Some(error) = chunk.error {
        let message = serde_json::from_str::<InBand>(error.get())
            .ok()
            .and_then(|e| e.message)
            .unwrap_or(Cow::Borrowed("the upstream reported an error mid-stream"));
        return Err(BackendError::Interrupted(message.into_owned()));
    }
    if chunk.system_fingerprint.is_some() || chunk.service_tier.is_some() {
        let mut identity = String::new();
        for (name, value) in [
            ("system_fingerprint", chunk.system_fingerprint),
            ("service_tier", chunk.service_tier),
        ] {
            if let Some(value) = value.filter(|v| v.get() != "null") {
                let comma = if identity.is_empty() { "" } else { "," };
                identity.push_str(&format!("{comma}\"{name}\":{}", value.get()));
            }
        }
        if identity != seen.identity {
            seen.identity = identity;
            seen.unsent = !seen.identity.is_empty();
        }
    }
    match chunk.choices {
        Some(First(Some(choice))) => {
            let delta = choice.delta.unwrap_or_default();
            let carries = delta.content.is_some()
                || delta.reasoning.is_some()
                || !delta.calls.is_empty()
                || !delta.rest.is_empty();
            if carries || choice.finish_reason.is_some() {
                seen.send(out);
            }
            if carries && let Some(logprobs) = choice.logprobs.filter(|l| l.get() != "null") {
                out.push(Delta::Logprobs(Raw(logprobs.to_owned())));
            }
            if let Some(reasoning) = delta.reasoning {
                out.push(Delta::Reasoning(Text::literal(reasoning)));
            }
            if let Some(text) = delta.content {
                out.push(Delta::Text(Text::literal(text)));
            }
            out.extend(delta.calls.into_iter().map(CallPiece::into_delta));
            if !delta.rest.is_empty() {
                let fields = RawValue::from_string(delta.rest).map_err(|e| {
                    BackendError::Protocol(format!("a delta that is not JSON ({e})"))
                })?;
                out.push(Delta::ChatFields(Raw(fields)));
            }
            if let Some(reason) = choice.finish_reason {
                out.push(Delta::Finish(Finish::from_chat(&reason)));
            }
        }
        Some(First(None)) => {}
        None if chunk.usage.is_none() => {
            return Err(BackendError::Protocol(
                "a chunk with neither choices nor usage".into(),
            ));
        }
        None => {}
    }
    if let Some(usage) = chunk.usage.filter(|u| u.get() != "null") {
        let usage: UsageParts = serde_json::from_str(usage.get())
            .map_err(|e| BackendError::Protocol(format!("usage that is not an object ({e})")))?;
        if !usage.details.is_empty() {
            out.push(Delta::UsageDetails(usage.details.into()));
        }
        out.push(Delta::Usage(Usage::new(usage.prompt, usage.completion)));
    }
    Ok(())
}

impl Seen {
    /// Sends the chunk's own fields on, ahead of what they came with, when they changed.
    fn send(&mut self, out: &mut Vec<Delta>) {
        if self.unsent {
            self.unsent = false;
            out.push(Delta::Identity(self.identity.as_str().into()));
        }
    }
}

/// A usage object: the two counts sluice reads, and every other field as written.
#[derive(Default)]
struct UsageParts {
    prompt: u32,
    completion: u32,
    /// `"prompt_tokens_details":{…},…`, without `total_tokens` (sluice's own sum).
    details: String,
}

impl<'de> Deserialize<'de> for UsageParts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = UsageParts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageParts, A::Error> {
                let mut usage = UsageParts::default();
                // Counts that are not whole numbers in range count as 0 or the most.
                let count = |raw: &str| {
                    raw.parse::<u64>()
                        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
                };
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &RawValue = map.next_value()?;
                    match &*key {
                        "prompt_tokens" => usage.prompt = count(value.get()),
                        "completion_tokens" => usage.completion = count(value.get()),
                        "total_tokens" => {}
                        _ => push_field(&mut usage.details, &key, value.get()),
                    }
                }
                Ok(usage)
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// Appends `"key":raw` to a list of fields written as JSON.
fn push_field(fields: &mut String, key: &str, raw: &str) {
    if !fields.is_empty() {
        fields.push(',');
    }
    fields.push_str(&serde_json::to_string(key).unwrap_or_default());
    fields.push(':');
    fields.push_str(raw);
}

/// The first item of a list, the rest skipped.
struct First<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Items<T> {
            type Value = First<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
                let first = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
        }
        deserializer.deserialize_seq(Items(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for DeltaParts<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DeltaVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for DeltaVisitor<'a> {
            type Value = DeltaParts<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a delta object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DeltaParts<'a>, A::Error> {
                let mut parts = DeltaParts::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    let raw = value.get();
                    match &*key {
                        "role" => {}
                        // Only text is text; an empty string or null is nothing.
                        "content" => {
                            if raw.starts_with('"') && raw != "\"\"" {
                                parts.content = Some(raw);
                            }
                        }
                        "reasoning_content" | "reasoning"
                            if raw.starts_with('"') && raw != "\"\"" =>
                        {
                            parts.reasoning = Some(raw);
                        }
                        "tool_calls" => match serde_json::from_str::<Vec<CallPiece>>(raw) {
                            Ok(calls) => parts.calls = calls,
                            Err(_) => push_field(&mut parts.rest, &key, raw),
                        },
                        _ if raw == "null" => {}
                        _ => push_field(&mut parts.rest, &key, raw),
                    }
                }
                if !parts.rest.is_empty() {
                    parts.rest = format!("{{{}}}", parts.rest);
                }
                Ok(parts)
            }
        }
        deserializer.deserialize_map(DeltaVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_yields_text_fields_finish_and_usage() {
        let chunk = r#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi \"you\"",
            "tool_calls":[{"index":0,"id":"c1"}],"refusal":null,"audio":{"id":"a"},"reasoning_content":"hm"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let mut out = Vec::new();
        deltas(chunk, &mut out, &mut Seen::default()).expect("a valid chunk");
        assert_eq!(out[0], Delta::Reasoning(Text::plain("hm")));
        assert_eq!(out[1], Delta::Text(Text::plain("Hi \"you\"")));
        assert_eq!(
            out[2],
            Delta::ToolCall(ToolCall {
                index: 0,
                id: Some("c1".into()),
                name: None,
                arguments: Text::plain(""),
            })
        );
        let Delta::ChatFields(fields) = &out[3] else {
            panic!("{:?}", out[3])
        };
        assert_eq!(fields.json(), r#"{"audio":{"id":"a"}}"#);
        assert_eq!(out[4], Delta::Finish(Finish::Stop));
        assert_eq!(out[5], Delta::Usage(Usage::new(3, 1)));
    }

    #[test]
    fn an_error_object_in_band_is_an_error() {
        let result = deltas(
            r#"{"error":{"message":"overloaded"}}"#,
            &mut Vec::new(),
            &mut Seen::default(),
        );
        assert!(matches!(result, Err(BackendError::Interrupted(m)) if m == "overloaded"));
    }

    #[test]
    fn odd_chunks_are_read_or_refused_never_misread() {
        let seen = &mut Seen::default();
        let mut out = Vec::new();
        deltas(
            r#"{"choices":[],"usage":{"prompt_tokens":1.5,"completion_tokens":-2}}"#,
            &mut out,
            seen,
        )
        .expect("usage alone");
        assert_eq!(out, [Delta::Usage(Usage::new(0, 0))]);
        assert!(deltas(r#"{"id":"x"}"#, &mut Vec::new(), seen).is_err());
        assert!(deltas("not json", &mut Vec::new(), seen).is_err());
        let mut out = Vec::new();
        deltas(
            r#"{"choices":[{"delta":{"content":""}},{"delta":{"content":"b"}}]}"#,
            &mut out,
            seen,
        )
        .expect("an empty delta");
        assert!(out.is_empty());
    }

    #[test]
    fn what_sluice_does_not_read_passes_through() {
        let seen = &mut Seen::default();
        let mut out = Vec::new();
        let role = r#"{"system_fingerprint":"fp_1","service_tier":"default","choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        deltas(role, &mut out, seen).expect("the role chunk");
        assert!(out.is_empty(), "nothing to send yet: {out:?}");
        let text = r#"{"system_fingerprint":"fp_1","service_tier":"default","choices":[{"delta":{"content":"a"},"logprobs":{"content":[]}}]}"#;
        deltas(text, &mut out, seen).expect("a text chunk");
        deltas(text, &mut out, seen).expect("the same again");
        assert_eq!(
            out[0],
            Delta::Identity(r#""system_fingerprint":"fp_1","service_tier":"default""#.into())
        );
        assert!(matches!(&out[1], Delta::Logprobs(l) if l.json() == r#"{"content":[]}"#));
        assert_eq!(out[2], Delta::Text(Text::plain("a")));
        assert_eq!(out.len(), 5, "the identity is sent once: {out:?}");
        let mut out = Vec::new();
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,"prompt_tokens_details":{"cached_tokens":2}}}"#;
        deltas(usage, &mut out, seen).expect("usage");
        assert_eq!(
            out,
            [
                Delta::UsageDetails(r#""prompt_tokens_details":{"cached_tokens":2}"#.into()),
                Delta::Usage(Usage::new(3, 1))
            ]
        );
    }
}
