//! OpenAI's Responses API encoder: canonical events to the event sequence the official
//! SDKs expect — `response.created`, `response.in_progress`, then per output item
//! `response.output_item.added`, its parts and deltas, `….done`, and at the end
//! `response.completed` (or `.incomplete` when cut by the token limit, `.failed` on an
//! error) — every event with a `sequence_number` from 0 (its SSE `id:` minus one). Also the
//! response object a finished (or running) stream's events add up to.

use std::fmt::Write as _;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Map, Value, json};

use super::{Opened, SseWriter, StreamGuard, payload, put, queued};
use crate::backend::{BackendError, Delta, Usage};
use crate::error::ApiError;
use crate::telemetry::Outcome;

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
    },
    Reasoning {
        id: String,
        index: usize,
        text: String,
    },
    Function {
        id: String,
        index: usize,
        /// The chat tool call's `index`, which its later deltas name.
        tool: u64,
        call_id: String,
        name: String,
        /// The namespace tool the function belongs to, if it does.
        namespace: Option<String>,
        arguments: String,
    },
}

/// Writes the events: each gets its `sequence_number` from the writer's next `id:`.
struct Writer {
    out: SseWriter,
    /// Finished output items, in order.
    output: Vec<Value>,
    open: Open,
}

impl Writer {
    fn event(&mut self, name: &str, mut data: Value) -> Bytes {
        let sequence = self.out.next_id() - 1;
        if let Value::Object(data) = &mut data {
            data.insert("type".into(), json!(name));
            data.insert("sequence_number".into(), json!(sequence));
        }
        let body = data.to_string();
        self.out.event(Some(name), |b| put(b, &body))
    }

    /// The index the next output item gets.
    fn next_index(&self) -> usize {
        self.output.len()
    }

    fn open_message(&mut self, events: &mut Vec<Bytes>) {
        let (id, index) = (item_id("msg"), self.next_index());
        events.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": {"id": id, "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}}),
        ));
        events.push(self.event(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}}),
        ));
        self.open = Open::Message {
            id,
            index,
            text: String::new(),
        };
    }

    fn open_reasoning(&mut self, events: &mut Vec<Bytes>) {
        let (id, index) = (item_id("rs"), self.next_index());
        events.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": {"id": id, "type": "reasoning", "status": "in_progress",
                "summary": [], "content": []}}),
        ));
        self.open = Open::Reasoning {
            id,
            index,
            text: String::new(),
        };
    }

    /// Ends the open item: its `….done` events, and it joins the output.
    fn close(&mut self, events: &mut Vec<Bytes>) {
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Message { id, index, text } => {
                let part =
                    json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text});
                events.push(self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                ));
                events.push(self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                ));
                let item = json!({"id": id, "type": "message", "status": "completed", "role": "assistant",
                    "content": [part]});
                events.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
                self.output.push(item);
            }
            Open::Reasoning { id, index, text } => {
                events.push(self.event(
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                ));
                let item = json!({"id": id, "type": "reasoning", "status": "completed", "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}]});
                events.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
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
                events.push(self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": arguments, "name": name}),
                ));
                let mut item = json!({"id": id, "type": "function_call", "status": "completed",
                    "arguments": arguments, "call_id": call_id, "name": name});
                if let Some(namespace) = namespace {
                    item["namespace"] = json!(namespace);
                }
                events.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
                self.output.push(item);
            }
        }
    }

    /// Upstream fields beyond text: tool call deltas, reasoning.
    fn fields(
        &mut self,
        delta: &Map<String, Value>,
        namespaces: &[(String, String, String)],
        events: &mut Vec<Bytes>,
    ) {
        let reasoning = ["reasoning_content", "reasoning"]
            .iter()
            .find_map(|k| delta.get(*k).and_then(Value::as_str))
            .filter(|r| !r.is_empty());
        if let Some(reasoning) = reasoning {
            if !matches!(self.open, Open::Reasoning { .. }) {
                self.close(events);
                self.open_reasoning(events);
            }
            if let Open::Reasoning { id, index, text } = &mut self.open {
                text.push_str(reasoning);
                let data = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": reasoning});
                events.push(self.event("response.reasoning_text.delta", data));
            }
        }
        let Some(Value::Array(calls)) = delta.get("tool_calls") else {
            return;
        };
        for call in calls {
            let tool = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let same = matches!(&self.open, Open::Function { tool: t, .. } if *t == tool);
            if !same {
                self.close(events);
                let (id, index) = (item_id("fc"), self.next_index());
                let call_id = call
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| item_id("call"), str::to_owned);
                let chat_name = call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let (name, namespace) = match namespaces.iter().find(|(flat, ..)| flat == chat_name)
                {
                    Some((_, namespace, name)) => (name.clone(), Some(namespace.clone())),
                    None => (chat_name.to_owned(), None),
                };
                let mut item = json!({"id": id, "type": "function_call",
                    "status": "in_progress", "arguments": "", "call_id": call_id, "name": name});
                if let Some(namespace) = &namespace {
                    item["namespace"] = json!(namespace);
                }
                events.push(self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                ));
                self.open = Open::Function {
                    id,
                    index,
                    tool,
                    call_id,
                    name,
                    namespace,
                    arguments: String::new(),
                };
            }
            let more = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Open::Function {
                id,
                index,
                arguments,
                ..
            } = &mut self.open
                && !more.is_empty()
            {
                arguments.push_str(more);
                let data = json!({"item_id": id, "output_index": index, "delta": more});
                events.push(self.event("response.function_call_arguments.delta", data));
            }
        }
    }
}

/// Usage in the Responses API's terms, with the upstream's details when it sent them.
fn usage(usage: Usage, details: Option<&str>) -> Value {
    let details: Map<String, Value> = details
        .and_then(|d| serde_json::from_str(&format!("{{{d}}}")).ok())
        .unwrap_or_default();
    let cached = details
        .get("prompt_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let reasoning = details
        .get("completion_tokens_details")
        .and_then(|d| d.get("reasoning_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({"input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.total_tokens})
}

/// `POST /v1/responses`: the Responses API's events for one response.
pub fn responses_events(
    mut opened: Opened,
    meta: Meta,
    mut guard: StreamGuard,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let first = opened.next().await;
        if matches!(first, Some(Ok(Delta::Event(_)))) {
            // An upstream that speaks the Responses API: its events as they came.
            let id = meta.id.clone();
            let relayed = super::relay_native(
                first,
                opened,
                guard,
                move |out, guard, raw, ended| native(out, &meta, guard, raw, ended),
                move |out, error| {
                    let body = ended_by(&id, out.next_id() - 1, error).to_string();
                    out.event(Some("response.failed"), |b| put(b, &body))
                },
            );
            for await event in relayed {
                yield event;
            }
            return;
        }
        let mut pending = Some(first);
        let mut w = Writer { out: SseWriter::new(), output: Vec::new(), open: Open::None };
        w.out.retry();
        let first = if meta.background { "queued" } else { "in_progress" };
        yield w.event("response.created", json!({"response": meta.object(first, &[], Value::Null)}));
        yield w.event("response.in_progress", json!({"response": meta.object("in_progress", &[], Value::Null)}));
        let mut finish = None;
        let mut details: Option<Box<str>> = None;
        let mut events = Vec::new();
        loop {
            let item = match pending.take() {
                Some(first) => first,
                None => opened.next().await,
            };
            let Some(item) = item else { break };
            match item {
                Ok(Delta::Text(text)) => {
                    guard.delivered();
                    if !matches!(w.open, Open::Message { .. }) {
                        w.close(&mut events);
                        w.open_message(&mut events);
                        for event in events.drain(..) {
                            yield event;
                        }
                    }
                    let sequence = w.out.next_id() - 1;
                    if let Open::Message { id, index, text: all } = &mut w.open {
                        text.push_to(all);
                        let (id, index) = (id.as_str(), *index);
                        // Per token: the text's JSON literal, as it came.
                        yield w.out.event(Some("response.output_text.delta"), |b| {
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
                Ok(Delta::Fields(fields)) => {
                    guard.times.token(guard.exchange.arrived().elapsed());
                    if let Ok(Value::Object(delta)) = serde_json::from_str(fields.json()) {
                        w.fields(&delta, &meta.namespaces, &mut events);
                        for event in events.drain(..) {
                            yield event;
                        }
                    }
                }
                Ok(Delta::Finish(reason)) => finish = Some(reason),
                Ok(Delta::Usage(u)) => guard.reported = Some(u),
                Ok(Delta::UsageDetails(d)) => details = Some(d),
                Ok(Delta::Identity(_) | Delta::Logprobs(_) | Delta::Event(_)) => {}
                Ok(Delta::Queued(ahead)) => yield queued(&mut w.out, ahead),
                Err(e) => {
                    guard.failed(&e);
                    let error = ApiError::from(e);
                    let mut object = meta.object("failed", &w.output, Value::Null);
                    object["error"] = error_object(&error);
                    yield w.event("response.failed", json!({"response": object}));
                    return;
                }
            }
        }
        w.close(&mut events);
        for event in events.drain(..) {
            yield event;
        }
        let usage = usage(guard.usage(), details.as_deref());
        guard.finish(Outcome::Completed);
        if finish.as_deref() == Some("length") {
            let mut object = meta.object("incomplete", &w.output, usage);
            object["incomplete_details"] = json!({"reason": "max_output_tokens"});
            yield w.event("response.incomplete", json!({"response": object}));
        } else {
            yield w.event("response.completed", json!({"response": meta.object("completed", &w.output, usage)}));
        }
    }
}

/// One event of an upstream that speaks the Responses API, relayed: its fields and its
/// `sequence_number` as sent, the response's `id` made sluice's (so that it can be read
/// back and continued here); metered as it goes.
fn native(
    out: &mut SseWriter,
    meta: &Meta,
    guard: &mut StreamGuard,
    raw: &str,
    ended: &mut bool,
) -> Bytes {
    let Ok(mut event) = serde_json::from_str::<Value>(raw) else {
        return out.event(None, |b| put(b, raw));
    };
    let kind = event["type"].as_str().unwrap_or_default().to_owned();
    let mut changed = false;
    match kind.as_str() {
        "response.output_text.delta" => guard.delivered(),
        "response.created"
        | "response.queued"
        | "response.in_progress"
        | "response.completed"
        | "response.incomplete"
        | "response.failed" => {
            if let Some(response) = event.get_mut("response").filter(|r| r.is_object()) {
                response["id"] = json!(meta.id);
                changed = true;
                let usage = &response["usage"];
                if let (Some(input), Some(output)) = (
                    usage["input_tokens"].as_u64(),
                    usage["output_tokens"].as_u64(),
                ) {
                    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
                    guard.reported = Some(Usage::new(clamp(input), clamp(output)));
                }
                if kind == "response.failed" {
                    let message = response["error"]["message"]
                        .as_str()
                        .unwrap_or("the upstream's response failed")
                        .to_owned();
                    guard.failed(&BackendError::Interrupted(message));
                    *ended = true;
                } else if kind != "response.created"
                    && kind != "response.queued"
                    && kind != "response.in_progress"
                {
                    guard.finish(Outcome::Completed);
                    *ended = true;
                }
            }
        }
        _ => {}
    }
    let name = if kind.is_empty() {
        None
    } else {
        Some(kind.as_str())
    };
    if changed {
        let body = event.to_string();
        out.event(name, |b| put(b, &body))
    } else {
        out.event(name, |b| put(b, raw))
    }
}

/// A response's `error`: `{code, message}`.
fn error_object(error: &ApiError) -> Value {
    let body = error.body();
    json!({"code": body["error"]["code"], "message": body["error"]["message"]})
}

/// The `response.failed` that ends stream `id` cut short by `error` (a cancel, its
/// producer lost), as event number `sequence`.
pub fn ended_by(id: &str, sequence: u64, error: &ApiError) -> Value {
    let status = if matches!(error, ApiError::StreamCancelled) {
        "cancelled"
    } else {
        "failed"
    };
    json!({"type": "response.failed", "sequence_number": sequence, "response": {
        "id": id, "object": "response", "status": status, "error": error_object(error), "output": []}})
}

/// The response object a stream's events add up to so far: the final one once it has
/// ended, else the latest state with the items finished so far.
pub fn snapshot<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Option<Value> {
    let mut latest: Option<Value> = None;
    let mut output = Vec::new();
    for event in events {
        let Some(mut event) = payload(event) else {
            continue;
        };
        match event["type"].as_str().unwrap_or_default() {
            "response.completed" | "response.incomplete" | "response.failed" => {
                let mut response = event["response"].take();
                // A cut-short ending carries no output: the items finished before it.
                if response["output"].as_array().is_some_and(Vec::is_empty) && !output.is_empty() {
                    response["output"] = Value::Array(std::mem::take(&mut output));
                }
                if let (Some(Value::Object(base)), Value::Object(end)) = (&latest, &mut response) {
                    for (key, value) in base {
                        end.entry(key.clone()).or_insert_with(|| value.clone());
                    }
                }
                return Some(response);
            }
            "response.created" | "response.in_progress" | "response.queued" => {
                latest = Some(event["response"].take());
            }
            "response.output_item.done" => output.push(event["item"].take()),
            _ => {}
        }
    }
    let mut response = latest?;
    if let Some(object) = response.as_object_mut() {
        object.insert("output".into(), Value::Array(output));
    }
    Some(response)
}
