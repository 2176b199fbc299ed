//! OpenAI's Responses API encoder: canonical events to the event sequence the official
//! SDKs expect — `response.created`, `response.in_progress`, then per output item
//! `response.output_item.added`, its parts and deltas, `….done`, and at the end
//! `response.completed` (or `.incomplete` when cut by the token limit, `.failed` on an
//! error) — every event with a `sequence_number` from 0 (its SSE `id:` minus one). Also the
//! response object a finished (or running) stream's events add up to.

pub mod request;
pub mod upstream;

use std::fmt::Write as _;

use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use super::completions::wire::lenient;
use crate::backend::{Delta, Finish, Signature, Text, ToolCall, Usage};
use crate::error::ApiError;
use crate::relay::{End, Out, Relayed, payload, put};
use upstream::{Counts, Failure};

/// What a response's id begins with.
pub const ID_PREFIX: &str = "resp_";

/// A response's identity and the request fields its object repeats.
pub struct Meta {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    /// `instructions`, `tools`, `tool_choice`, `temperature`, `metadata`…, as the request
    /// gave them (with OpenAI's defaults).
    pub echo: Map<String, Value>,
    /// Started with `background: true`: its first status is `queued`.
    pub background: bool,
    /// Functions of the request's namespace tools: the chat name each was flattened to,
    /// its namespace and its own name. A call by the chat name is written back as the
    /// client named it (`name` and `namespace`).
    pub namespaces: Vec<(String, String, String)>,
}

impl Meta {
    /// The response object at a given moment.
    pub fn object(&self, status: &str, output: &[Value], usage: Value) -> Value {
        let mut object = Map::new();
        object.insert("id".into(), json!(self.id));
        object.insert("object".into(), json!("response"));
        object.insert("created_at".into(), json!(self.created_at));
        object.insert("status".into(), json!(status));
        object.insert("background".into(), json!(self.background));
        object.insert("error".into(), Value::Null);
        object.insert("incomplete_details".into(), Value::Null);
        object.insert("model".into(), json!(self.model));
        object.insert("output".into(), Value::Array(output.to_vec()));
        object.insert("usage".into(), usage);
        for (key, value) in &self.echo {
            object.insert(key.clone(), value.clone());
        }
        Value::Object(object)
    }
}

/// An id for an output item: `msg_…`, `fc_…`, `rs_…`.
fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// The output item being streamed now.
enum Open {
    None,
    Message {
        id: String,
        index: usize,
        text: String,
        /// The upstream's annotations on the text (citations…), in order.
        annotations: Vec<Value>,
    },
    Reasoning {
        id: String,
        index: usize,
        text: String,
        /// The reasoning as the upstream encrypted it, for the client to send back.
        encrypted: Option<String>,
    },
    Function {
        id: String,
        index: usize,
        /// The tool call's `index`, which its later pieces name.
        tool: u32,
        call_id: String,
        name: String,
        /// The namespace tool the function belongs to, if it does.
        namespace: Option<String>,
        arguments: String,
    },
}

/// The Responses encoder for one response: each event gets its `sequence_number` from the
/// next `id:`.
pub struct Encoder {
    meta: Meta,
    /// Finished output items, in order.
    output: Vec<Value>,
    open: Open,
    finish: Option<Finish>,
    /// The upstream's usage fields beyond the counts.
    details: Option<Box<str>>,
}

/// Writes event `name` with `data`, typed and numbered.
fn event(out: &mut Out, name: &str, mut data: Value) {
    let sequence = out.next_id() - 1;
    if let Value::Object(data) = &mut data {
        data.insert("type".into(), json!(name));
        data.insert("sequence_number".into(), json!(sequence));
    }
    out.json(Some(name), &data.to_string());
}

impl Encoder {
    pub fn new(meta: Meta) -> Self {
        Encoder {
            meta,
            output: Vec::new(),
            open: Open::None,
            finish: None,
            details: None,
        }
    }

    /// The index the next output item gets.
    fn next_index(&self) -> usize {
        self.output.len()
    }

    fn open_message(&mut self, out: &mut Out) {
        let (id, index) = (item_id("msg"), self.next_index());
        event(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": {"id": id, "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}}),
        );
        event(
            out,
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}}),
        );
        self.open = Open::Message {
            id,
            index,
            text: String::new(),
            annotations: Vec::new(),
        };
    }

    fn open_reasoning(&mut self, out: &mut Out) {
        let (id, index) = (item_id("rs"), self.next_index());
        event(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": {"id": id, "type": "reasoning", "status": "in_progress",
                "summary": [], "content": []}}),
        );
        self.open = Open::Reasoning {
            id,
            index,
            text: String::new(),
            encrypted: None,
        };
    }

    /// Ends the open item: its `….done` events, and it joins the output.
    fn close(&mut self, out: &mut Out) {
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Message {
                id,
                index,
                text,
                annotations,
            } => {
                let part = json!({"type": "output_text", "annotations": annotations, "logprobs": [],
                    "text": text});
                event(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                event(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                let item = json!({"id": id, "type": "message", "status": "completed", "role": "assistant",
                    "content": [part]});
                event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
            Open::Reasoning {
                id,
                index,
                text,
                encrypted,
            } => {
                event(
                    out,
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                let mut item = json!({"id": id, "type": "reasoning", "status": "completed", "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}]});
                if let Some(encrypted) = encrypted {
                    set(&mut item, "encrypted_content", json!(encrypted));
                }
                event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
            Open::Function {
                id,
                index,
                call_id,
                name,
                namespace,
                arguments,
                ..
            } => {
                event(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": arguments, "name": name}),
                );
                let mut item = json!({"id": id, "type": "function_call", "status": "completed",
                    "arguments": arguments, "call_id": call_id, "name": name});
                if let Some(namespace) = namespace {
                    set(&mut item, "namespace", json!(namespace));
                }
                event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
        }
    }

    /// Reasoning, in a reasoning item.
    fn reasoning(&mut self, piece: &Text, out: &mut Out) {
        if piece.is_empty() {
            return;
        }
        if !matches!(self.open, Open::Reasoning { .. }) {
            self.close(out);
            self.open_reasoning(out);
        }
        if let Open::Reasoning {
            id, index, text, ..
        } = &mut self.open
        {
            let mut reasoning = String::new();
            piece.push_to(&mut reasoning);
            text.push_str(&reasoning);
            let data = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": reasoning});
            event(out, "response.reasoning_text.delta", data);
        }
    }

    /// A piece of a tool call: its `function_call` item (opened by its first piece, under
    /// the name the client gave the tool) and its arguments.
    fn tool_call(&mut self, call: ToolCall, out: &mut Out) {
        let same = matches!(&self.open, Open::Function { tool, .. } if *tool == call.index);
        if !same {
            self.close(out);
            let (id, index) = (item_id("fc"), self.next_index());
            let call_id = call.id.unwrap_or_else(|| item_id("call"));
            let chat_name = call.name.unwrap_or_default();
            let namespaces = &self.meta.namespaces;
            let (name, namespace) = match namespaces.iter().find(|(flat, ..)| *flat == chat_name) {
                Some((_, namespace, name)) => (name.clone(), Some(namespace.clone())),
                None => (chat_name, None),
            };
            let mut item = json!({"id": id, "type": "function_call",
                "status": "in_progress", "arguments": "", "call_id": call_id, "name": name});
            if let Some(namespace) = &namespace {
                set(&mut item, "namespace", json!(namespace));
            }
            event(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.open = Open::Function {
                id,
                index,
                tool: call.index,
                call_id,
                name,
                namespace,
                arguments: String::new(),
            };
        }
        if let Open::Function {
            id,
            index,
            arguments,
            ..
        } = &mut self.open
            && !call.arguments.is_empty()
        {
            let mut more = String::new();
            call.arguments.push_to(&mut more);
            arguments.push_str(&more);
            let data = json!({"item_id": id, "output_index": index, "delta": more});
            event(out, "response.function_call_arguments.delta", data);
        }
    }
}

/// Usage in the Responses API's terms, with the upstream's details when it sent them.
fn usage(usage: Usage, details: Option<&str>, cost: Option<f64>) -> Value {
    let details = details
        .map(crate::prices::Details::of_fields)
        .unwrap_or_default();
    let mut usage = json!({"input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": details.cached,
            "cache_write_tokens": details.cache_write},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": details.reasoning},
        "total_tokens": usage.total_tokens});
    // What it cost, as a chat completion's usage says it (`cost`, USD), when priced.
    if let (Some(cost), Value::Object(fields)) = (cost, &mut usage) {
        fields.insert("cost".into(), json!(cost));
    }
    usage
}

impl crate::relay::Encoder for Encoder {
    fn open(&mut self, out: &mut Out) {
        let first = if self.meta.background {
            "queued"
        } else {
            "in_progress"
        };
        let created = self.meta.object(first, &[], Value::Null);
        event(out, "response.created", json!({"response": created}));
        let started = self.meta.object("in_progress", &[], Value::Null);
        event(out, "response.in_progress", json!({"response": started}));
    }

    fn event(&mut self, delta: Delta, out: &mut Out) {
        match delta {
            Delta::Text(text) => {
                if !matches!(self.open, Open::Message { .. }) {
                    self.close(out);
                    self.open_message(out);
                }
                let sequence = out.next_id() - 1;
                if let Open::Message {
                    id,
                    index,
                    text: all,
                    ..
                } = &mut self.open
                {
                    text.push_to(all);
                    let (id, index) = (id.as_str(), *index);
                    // Per token: the text's JSON literal, as it came.
                    out.event(Some("response.output_text.delta"), |b| {
                        put(b, "{\"type\":\"response.output_text.delta\",\"item_id\":\"");
                        put(b, id);
                        put(b, "\",\"output_index\":");
                        let _ = write!(b, "{index}");
                        put(b, ",\"content_index\":0,\"delta\":");
                        put(b, text.json());
                        put(b, ",\"logprobs\":[],\"sequence_number\":");
                        let _ = write!(b, "{sequence}");
                        put(b, "}");
                    });
                }
            }
            Delta::Reasoning(text) => self.reasoning(&text, out),
            Delta::ToolCall(call) => self.tool_call(call, out),
            Delta::Signature(Signature::Encrypted(encrypted)) => {
                if !matches!(self.open, Open::Reasoning { .. }) {
                    self.close(out);
                    self.open_reasoning(out);
                }
                if let Open::Reasoning { encrypted: e, .. } = &mut self.open {
                    *e = Some(encrypted);
                }
            }
            // Another API's proof of reasoning: no Responses client can send it back.
            Delta::Signature(Signature::Anthropic(_)) | Delta::Redacted(_) => {
                out.left_out("signed reasoning");
            }
            Delta::Untranslated(what) => out.left_out(&what),
            Delta::Annotation(annotation) => {
                if let Open::Message {
                    id,
                    index,
                    annotations,
                    ..
                } = &mut self.open
                {
                    let annotation: Value =
                        serde_json::from_str(annotation.json()).unwrap_or_default();
                    let data = json!({"item_id": id, "output_index": index, "content_index": 0,
                        "annotation_index": annotations.len(), "annotation": annotation});
                    annotations.push(annotation);
                    event(out, "response.output_text.annotation.added", data);
                }
            }
            Delta::Finish(reason) => self.finish = Some(reason),
            Delta::UsageDetails(details) => self.details = Some(details),
            _ => {}
        }
    }

    fn end(&mut self, end: &End, out: &mut Out) {
        self.close(out);
        let usage = usage(end.usage, self.details.as_deref(), end.cost);
        if self.finish.as_ref().map(Finish::kind) == Some(Finish::Length) {
            let mut object = self.meta.object("incomplete", &self.output, usage);
            set(
                &mut object,
                "incomplete_details",
                json!({"reason": "max_output_tokens"}),
            );
            event(out, "response.incomplete", json!({"response": object}));
        } else {
            let object = self.meta.object("completed", &self.output, usage);
            event(out, "response.completed", json!({"response": object}));
        }
    }

    fn fail(&mut self, error: &ApiError, out: &mut Out) {
        let mut object = self.meta.object("failed", &self.output, Value::Null);
        set(&mut object, "error", error_object(error));
        event(out, "response.failed", json!({"response": object}));
    }

    /// One event of an upstream that speaks the Responses API: its fields and its
    /// `sequence_number` as sent, the response's `id` made sluice's (so that it can be read
    /// back and continued here).
    fn relay(&mut self, raw: &str, out: &mut Out) -> Relayed {
        let mut seen = Relayed::default();
        let Ok(event) = serde_json::from_str::<Head>(raw) else {
            out.json(None, raw);
            return seen;
        };
        // Where the event holds the upstream's id for the response, to write as sluice's.
        let mut swap = None;
        match &*event.kind {
            "response.output_text.delta" => seen.text = true,
            "response.created"
            | "response.queued"
            | "response.in_progress"
            | "response.completed"
            | "response.incomplete"
            | "response.failed" => {
                if let Some(response) = &event.response {
                    swap = Some(("/response/id", response.id.as_deref()));
                    if let Some(Counts {
                        input_tokens: Some(input),
                        output_tokens: Some(output),
                    }) = response.usage
                    {
                        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
                        seen.usage = Some(Usage::new(clamp(input), clamp(output)));
                    }
                    if event.kind == "response.failed" {
                        let message = response
                            .error
                            .as_ref()
                            .and_then(|e| e.message.clone())
                            .unwrap_or_else(|| "the upstream's response failed".to_owned());
                        seen.ended = Some(Err(message));
                    } else if !matches!(
                        &*event.kind,
                        "response.created" | "response.queued" | "response.in_progress"
                    ) {
                        seen.ended = Some(Ok(()));
                    }
                }
            }
            _ => {}
        }
        out.relayed(raw, &event.kind, swap, &self.meta.id);
        seen
    }
}

/// What the relay reads of an event of an upstream that speaks the Responses API.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, deserialize_with = "lenient")]
    response: Option<ResponseHead>,
}

#[derive(serde::Deserialize)]
struct ResponseHead {
    #[serde(default, deserialize_with = "lenient")]
    id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<Counts>,
    #[serde(default, deserialize_with = "lenient")]
    error: Option<Failure>,
}

/// A response's `error`: `{code, message}`.
fn error_object(error: &ApiError) -> Value {
    #[derive(serde::Deserialize, Default)]
    struct Body {
        #[serde(default)]
        error: Inner,
    }
    #[derive(serde::Deserialize, Default)]
    struct Inner {
        #[serde(default)]
        code: Value,
        #[serde(default)]
        message: Value,
    }
    let body = Body::deserialize(error.body()).unwrap_or_default();
    json!({"code": body.error.code, "message": body.error.message})
}

/// Sets field `key` of `object` (an object, as every one written here is).
fn set(object: &mut Value, key: &str, value: Value) {
    if let Value::Object(object) = object {
        object.insert(key.to_owned(), value);
    }
}

/// What the fold reads of a logged event.
#[derive(serde::Deserialize)]
struct Logged {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    response: Value,
    #[serde(default)]
    item: Value,
}

/// The `response.failed` that ends stream `id` cut short by `error` (a cancel, its
/// producer lost), after the events already written.
pub fn ended_by(id: &str, error: &ApiError, out: &mut Out) {
    let status = if matches!(error, ApiError::StreamCancelled) {
        "cancelled"
    } else {
        "failed"
    };
    let response = json!({"id": id, "object": "response", "status": status,
        "error": error_object(error), "output": []});
    event(out, "response.failed", json!({"response": response}));
}

/// The response object a stream's events add up to so far: the final one once it has
/// ended, else the latest state with the items finished so far.
pub fn snapshot<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Option<Value> {
    let mut latest: Option<Value> = None;
    let mut output = Vec::new();
    for event in events {
        let Some(event) = payload(event).and_then(|e| Logged::deserialize(e).ok()) else {
            continue;
        };
        match event.kind.as_str() {
            "response.completed" | "response.incomplete" | "response.failed" => {
                let mut response = event.response;
                // A cut-short ending carries no output: the items finished before it.
                if let Value::Object(end) = &mut response
                    && !output.is_empty()
                    && let Some(outputs) = end.get_mut("output")
                    && outputs.as_array().is_some_and(Vec::is_empty)
                {
                    *outputs = Value::Array(std::mem::take(&mut output));
                }
                if let (Some(Value::Object(base)), Value::Object(end)) = (&latest, &mut response) {
                    for (key, value) in base {
                        end.entry(key.clone()).or_insert_with(|| value.clone());
                    }
                }
                return Some(response);
            }
            "response.created" | "response.in_progress" | "response.queued" => {
                latest = Some(event.response);
            }
            "response.output_item.done" => output.push(event.item),
            _ => {}
        }
    }
    let mut response = latest?;
    if let Some(object) = response.as_object_mut() {
        object.insert("output".into(), Value::Array(output));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Raw, Signature, Text};
    use crate::relay::Must;
    use crate::relay::{CANNED_END, Encoder as _, canned, payloads};

    fn meta(namespaces: Vec<(String, String, String)>) -> Meta {
        Meta {
            id: "resp_1".into(),
            created_at: 1,
            model: "m".into(),
            echo: Map::new(),
            background: false,
            namespaces,
        }
    }

    #[test]
    fn text_is_one_message_item_between_created_and_completed() -> Result<(), String> {
        let mut encoder = Encoder::new(meta(Vec::new()));
        let deltas = vec![
            Delta::Text(Text::plain("Hel")),
            Delta::Text(Text::plain("lo")),
            Delta::Finish(Finish::Stop),
        ];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let data = payloads(&events);
        let types: Vec<&str> = data.iter().filter_map(|d| d["type"].as_str()).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        // `sequence_number` is the SSE id minus one, from 0.
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["sequence_number"], i, "{d}");
        }
        let last = data.last().must("completed")?;
        assert_eq!(last["response"]["usage"]["output_tokens"], 2);
        let response = snapshot(events.iter().map(|e| e.as_bytes())).must("a response")?;
        assert_eq!(response["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(response["status"], "completed");
        Ok(())
    }

    #[test]
    fn a_namespaced_call_is_named_as_the_client_named_it() -> Result<(), String> {
        let flat = ("ns__f".to_owned(), "ns".to_owned(), "f".to_owned());
        let mut encoder = Encoder::new(meta(vec![flat]));
        let deltas = vec![
            ToolCall::start(0, "c1", "ns__f"),
            ToolCall::more(0, "{}"),
            Delta::Finish(Finish::ToolUse),
        ];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let response = snapshot(events.iter().map(|e| e.as_bytes())).must("a response")?;
        let item = &response["output"][0];
        assert_eq!(item["type"], "function_call");
        assert_eq!(
            (item["name"].as_str(), item["namespace"].as_str()),
            (Some("f"), Some("ns"))
        );
        assert_eq!(item["arguments"], "{}");
        Ok(())
    }

    #[test]
    fn the_token_limit_is_incomplete_and_a_failure_keeps_what_was_done() -> Result<(), String> {
        let mut encoder = Encoder::new(meta(Vec::new()));
        let deltas = vec![Delta::Text(Text::plain("a")), Delta::Finish(Finish::Length)];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let last = payloads(&events).pop().must("an end")?;
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );

        let mut encoder = Encoder::new(meta(Vec::new()));
        let reasoning = Delta::Reasoning(Text::plain("hm"));
        let mut out = Out::new();
        encoder.open(&mut out);
        encoder.event(reasoning, &mut out);
        encoder.event(Delta::Text(Text::plain("a")), &mut out);
        encoder.fail(&ApiError::StreamCancelled, &mut out);
        let events: Vec<String> = out
            .take()
            .map(|e| String::from_utf8_lossy(&e).into_owned())
            .collect();
        let last = payloads(&events).pop().must("an end")?;
        assert_eq!(last["type"], "response.failed");
        assert_eq!(last["response"]["error"]["code"], "stream_cancelled");
        // The reasoning item was finished before the text began.
        assert_eq!(last["response"]["output"][0]["type"], "reasoning");
        Ok(())
    }

    #[test]
    fn encrypted_reasoning_and_annotations_reach_their_items() -> Result<(), String> {
        let mut encoder = Encoder::new(meta(Vec::new()));
        let thinking = Delta::Reasoning(Text::plain("hm"));
        let annotation = Raw::of(&json!({"type": "url_citation", "url": "https://x"}));
        let deltas = vec![
            thinking,
            Delta::Signature(Signature::Encrypted("gAAA".into())),
            Delta::Text(Text::plain("a")),
            Delta::Annotation(annotation),
        ];
        let events = canned(&mut encoder, deltas, Some(&CANNED_END));
        let response = snapshot(events.iter().map(|e| e.as_bytes())).must("a response")?;
        assert_eq!(response["output"][0]["encrypted_content"], "gAAA");
        assert_eq!(
            response["output"][1]["content"][0]["annotations"][0]["url"],
            "https://x"
        );
        let added = payloads(&events)
            .into_iter()
            .find(|e| e["type"] == "response.output_text.annotation.added")
            .must("the annotation's event")?;
        assert_eq!(added["annotation_index"], 0);
        Ok(())
    }

    #[test]
    fn a_relayed_event_keeps_its_fields_and_numbers_but_takes_sluice_s_id() -> Result<(), String> {
        let mut encoder = Encoder::new(meta(Vec::new()));
        let mut out = Out::new();
        let delta = r#"{"type":"response.output_text.delta","delta":"a","obfuscation":"x7","sequence_number":4}"#;
        assert!(encoder.relay(delta, &mut out).text);
        let done = r#"{"type":"response.completed","sequence_number":5,"response":{"id":"up_1","usage":{"input_tokens":3,"output_tokens":1}}}"#;
        let seen = encoder.relay(done, &mut out);
        assert_eq!(seen.usage, Some(Usage::new(3, 1)));
        assert_eq!(seen.ended, Some(Ok(())));
        let events: Vec<_> = out.take().collect();
        assert!(events[0].ends_with(format!("data: {delta}\n\n").as_bytes()));
        let completed = payload(&events[1]).must("JSON")?;
        assert_eq!(completed["response"]["id"], "resp_1");
        assert_eq!(completed["sequence_number"], 5);
        Ok(())
    }
}
