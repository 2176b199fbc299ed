//! The relay: a backend's [`Delta`] stream → SSE events (OpenAI chunks, or sluice's own
//! `/api/chat` events), with timeouts, usage metering, and a guard that records on drop
//! whether the stream completed, failed, or was cancelled by its client.
//!
//! The SSE body owns the backend stream: when the client goes away hyper drops the body,
//! the body drops the backend stream, and the backend's work stops. No task, no channel.

use std::convert::Infallible;
use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{Map, Value, json};

use crate::admission::Permit;
use crate::backend::{BackendError, ChatRequest, Delta, DeltaStream, Route, Usage};
use crate::error::ApiError;
use crate::metrics::{Exchange, Metrics, Outcome, TokenTimes};
use crate::state::AppState;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub first_token: Duration,
    pub idle: Duration,
    pub total: Duration,
}

/// Calls the route's targets in order, each until one answers: a target that cannot be
/// reached, answers 5xx or 429, or sends no first token in time is followed by the next,
/// but only while nothing of a reply has been relayed. Then it applies the limits (first
/// token, between chunks, total: past one, the stream ends with [`BackendError::Timeout`];
/// time spent waiting on a slow client does not count) and ends the stream when sluice
/// shuts down.
///
/// A stream it returns ends either with [`Delta::Finish`] (and perhaps usage) or with an
/// error: one that just stops did not complete, whatever the backend thought.
pub fn upstream(
    state: &AppState,
    exchange: &Exchange,
    route: Route,
    label: &str,
    request: ChatRequest,
) -> DeltaStream {
    let label = label.to_owned();
    let limits = state.timeouts;
    let metrics = state.metrics.clone();
    let closing = state.closing.clone().cancelled_owned();
    let exchange = exchange.clone();
    Box::pin(async_stream::stream! {
        let total = tokio::time::sleep(limits.total);
        tokio::pin!(total, closing);
        let mut request = Some(request);
        let count = route.targets.len();
        for (i, target) in route.targets.iter().enumerate() {
            let last = i + 1 == count;
            let mut attempt = if last { request.take() } else { request.clone() }.unwrap_or_default();
            attempt.model.clone_from(&target.model);
            let target_label = if target.configured { &target.model } else { &label };
            let _call = metrics.upstream_call(target_label);
            let started = Instant::now();
            let mut inner = target.backend.stream(attempt);
            let deadline = tokio::time::sleep(limits.first_token);
            tokio::pin!(deadline);
            let mut waiting_for = "first token";
            let mut finished = false;
            let mut relayed = false;
            loop {
                let item = tokio::select! {
                    biased;
                    () = &mut closing => Err(BackendError::ShuttingDown),
                    item = inner.next() => match item {
                        Some(item) => item,
                        None if finished => return,
                        None => Err(BackendError::Interrupted(
                            "the stream ended before the reply was finished".into(),
                        )),
                    },
                    () = &mut deadline => Err(BackendError::Timeout(waiting_for)),
                    () = &mut total => Err(BackendError::Timeout("end of the reply")),
                };
                let delta = match item {
                    Ok(delta) => delta,
                    Err(e) => {
                        if let Some(reason) = e.fallback_reason().filter(|_| !relayed && !last) {
                            tracing::warn!(
                                request_id = exchange.request_id(),
                                model = %target.model,
                                upstream = target.backend.upstream().unwrap_or("-"),
                                error = %e,
                                "trying the route's next upstream"
                            );
                            metrics.fallback(target_label, reason);
                            exchange.fell_back(&e);
                            break;
                        }
                        yield Err(e);
                        return;
                    }
                };
                let first = !relayed && !matches!(delta, Delta::Queued(_));
                match delta {
                    Delta::Text(_) | Delta::Fields(_) => waiting_for = "chunk",
                    Delta::Finish(_) => finished = true,
                    // Moving up the queue is progress: the wait for a first token starts
                    // when the model takes the request.
                    Delta::Queued(_) => deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + limits.first_token),
                    Delta::Usage(_) => {}
                }
                relayed |= first;
                let received = first.then(Instant::now);
                yield Ok(delta);
                if let Some(received) = received {
                    // Resumed once the first chunk has been written: sluice's own share of
                    // the time to first byte is what came before the call, and this.
                    metrics.overhead(started.duration_since(exchange.arrived()) + received.elapsed());
                }
                if waiting_for == "chunk" {
                    deadline.as_mut().reset(tokio::time::Instant::now() + limits.idle);
                }
            }
        }
    })
}

/// A backend stream whose first item has been seen, so its status is known.
pub struct Opened {
    first: Option<Delta>,
    rest: DeltaStream,
}

/// Peek before committing: waits up to `window` for the first item, so a failure before
/// the first token becomes a real HTTP status (and is recorded on `guard`). A first token
/// slower than `window` is committed to as 200 anyway, so keep-alive comments flow while
/// the client waits.
pub async fn open(
    mut stream: DeltaStream,
    window: Duration,
    guard: &mut StreamGuard,
) -> Result<Opened, ApiError> {
    let first = match tokio::time::timeout(window, stream.next()).await {
        Ok(Some(Ok(first))) => Some(first),
        Ok(Some(Err(e))) => {
            guard.failed(&e);
            return Err(e.into());
        }
        // `timed` streams end with a finish or an error, never empty.
        Ok(None) | Err(_) => None,
    };
    Ok(Opened {
        first,
        rest: stream,
    })
}

impl Opened {
    fn into_stream(self) -> DeltaStream {
        match self.first {
            Some(first) => Box::pin(futures::stream::once(async { Ok(first) }).chain(self.rest)),
            None => self.rest,
        }
    }
}

/// Which stream this is, for logs and metrics, and the running count of what it delivered.
/// Dropping it records the outcome: a stream dropped before it finished was cancelled.
pub struct StreamGuard {
    metrics: Metrics,
    /// The client's hold on its limits: settled to the real usage when the stream ends.
    permit: Permit,
    exchange: Exchange,
    model: String,
    times: TokenTimes,
    prompt_tokens: u32,
    delivered_tokens: u32,
    reported: Option<Usage>,
    outcome: Option<Outcome>,
}

impl StreamGuard {
    pub fn new(
        metrics: Metrics,
        permit: Permit,
        exchange: Exchange,
        model: String,
        prompt_tokens: u32,
    ) -> Self {
        metrics.stream_started();
        StreamGuard {
            metrics,
            permit,
            exchange,
            model,
            times: TokenTimes::default(),
            prompt_tokens,
            delivered_tokens: 0,
            reported: None,
            outcome: None,
        }
    }

    /// A token (one chunk of text) went to the client. Chunks are counted, not re-tokenised:
    /// the mock and local models send one token a chunk, OpenAI-compatible servers almost
    /// always do too, and their own usage replaces this count whenever they report it.
    fn delivered(&mut self) {
        self.times.token(self.exchange.arrived().elapsed());
        self.delivered_tokens = self.delivered_tokens.saturating_add(1);
    }

    /// The backend's own counts when it sent them, else sluice's count of what it delivered.
    pub fn usage(&self) -> Usage {
        self.reported
            .unwrap_or_else(|| Usage::new(self.prompt_tokens, self.delivered_tokens))
    }

    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }

    fn failed(&mut self, error: &BackendError) {
        self.exchange.failed(error);
        self.finish(Outcome::of(error));
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        let usage = self.usage();
        // A cancelled stream is charged what it delivered; a failed one, what it used.
        self.permit.settle(usage.total_tokens);
        self.exchange.ended(outcome, self.times.first, usage);
        self.metrics
            .stream_ended(outcome, &self.model, usage, &self.times);
    }
}

/// The SSE response around an event stream: no buffering by proxies, keep-alive comments.
fn sse(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    keep_alive: Duration,
) -> Response {
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response();
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    response
}

/// A keep-alive comment that says where the request waits; every client ignores it.
fn queued(ahead: usize) -> Event {
    Event::default().comment(format!("queued: {ahead} ahead"))
}

/// The identity every chunk of one OpenAI completion shares.
pub struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Completion {
    pub fn new(model: &str) -> Self {
        Completion {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_owned(),
        }
    }
}

/// Writes `chat.completion.chunk` JSON around a prefix built once per stream.
struct ChunkWriter {
    /// `{"id":…,"object":…,"created":…,"model":…,"system_fingerprint":null,"choices":`
    head: String,
    /// `}` or `,"usage":null}`: what closes a chunk that carries a choice.
    tail: &'static str,
}

impl ChunkWriter {
    fn new(c: &Completion, include_usage: bool) -> Self {
        let head = json!({"id": c.id, "object": "chat.completion.chunk", "created": c.created,
            "model": c.model, "system_fingerprint": null})
        .to_string();
        // Reopen the object to append the choices.
        let head = format!("{},\"choices\":", head.trim_end_matches('}'));
        let tail = if include_usage {
            ",\"usage\":null}"
        } else {
            "}"
        };
        ChunkWriter { head, tail }
    }

    /// A chunk with one choice whose delta is `delta`, written as the concatenation of its
    /// parts into one buffer.
    fn write(&self, delta: &[&str], finish_reason: Option<&str>) -> String {
        let finish = finish_reason.map(|r| json!(r).to_string());
        let len: usize = delta.iter().map(|p| p.len()).sum();
        let mut out = String::with_capacity(self.head.len() + len + 80);
        out.push_str(&self.head);
        out.push_str("[{\"index\":0,\"delta\":");
        delta.iter().for_each(|part| out.push_str(part));
        out.push_str(",\"logprobs\":null,\"finish_reason\":");
        out.push_str(finish.as_deref().unwrap_or("null"));
        out.push_str("}]");
        out.push_str(self.tail);
        out
    }

    fn choice(&self, delta: &str, finish_reason: Option<&str>) -> String {
        self.write(&[delta], finish_reason)
    }

    /// Per token: the text is escaped once and written straight into the chunk.
    fn text(&self, text: &str) -> String {
        let escaped = serde_json::to_string(text).unwrap_or_default();
        self.write(&["{\"content\":", &escaped, "}"], None)
    }

    fn usage(&self, usage: Usage) -> String {
        format!("{}[],\"usage\":{}}}", self.head, json!(usage))
    }
}

/// `POST /v1/chat/completions` with `stream: true`: OpenAI's chunks, then `[DONE]`; a failure
/// after the first byte is a `data: {"error":…}` event and the stream ends without `[DONE]`.
pub fn openai_sse(
    opened: Opened,
    completion: Completion,
    include_usage: bool,
    mut guard: StreamGuard,
    keep_alive: Duration,
) -> Response {
    let writer = ChunkWriter::new(&completion, include_usage);
    let mut stream = opened.into_stream();
    let events = async_stream::stream! {
        yield Ok(Event::default().data(writer.choice(r#"{"role":"assistant","content":""}"#, None)));
        while let Some(item) = stream.next().await {
            match item {
                Ok(Delta::Text(text)) => {
                    guard.delivered();
                    yield Ok(Event::default().data(writer.text(&text)));
                }
                Ok(Delta::Fields(fields)) => {
                    guard.times.token(guard.exchange.arrived().elapsed());
                    yield Ok(Event::default().data(writer.choice(&Value::Object(fields).to_string(), None)));
                }
                Ok(Delta::Finish(reason)) => {
                    yield Ok(Event::default().data(writer.choice("{}", Some(&reason))));
                }
                Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
                Ok(Delta::Queued(ahead)) => yield Ok(queued(ahead)),
                Err(e) => {
                    guard.failed(&e);
                    yield Ok(Event::default().data(ApiError::from(e).body().to_string()));
                    return;
                }
            }
        }
        if include_usage {
            yield Ok(Event::default().data(writer.usage(guard.usage())));
        }
        guard.finish(Outcome::Completed);
        yield Ok(Event::default().data("[DONE]"));
    };
    sse(events, keep_alive)
}

/// `POST /api/chat`: `meta`, `token`…, then `done` or `error`, each event with an `id:`.
pub fn chat_sse(
    opened: Opened,
    completion: Completion,
    mut guard: StreamGuard,
    keep_alive: Duration,
) -> Response {
    let mut stream = opened.into_stream();
    let events = async_stream::stream! {
        let mut id = 0u64;
        let mut event = move |name: &'static str, data: String| {
            id += 1;
            Ok::<_, Infallible>(Event::default().event(name).id(id.to_string()).data(data))
        };
        let chat_id = completion.id.replacen("chatcmpl-", "chat-", 1);
        yield event("meta", json!({"id": chat_id, "model": completion.model, "created": completion.created}).to_string());
        let mut finish = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(Delta::Text(text)) => {
                    guard.delivered();
                    // Per token: escape the text alone, no JSON map built and serialised.
                    let escaped = serde_json::to_string(&text).unwrap_or_default();
                    yield event("token", format!("{{\"text\":{escaped}}}"));
                }
                Ok(Delta::Fields(_)) => {}
                Ok(Delta::Finish(reason)) => finish = Some(reason),
                Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
                Ok(Delta::Queued(ahead)) => yield Ok(queued(ahead)),
                Err(e) => {
                    guard.failed(&e);
                    yield event("error", ApiError::from(e).body().to_string());
                    return;
                }
            }
        }
        guard.finish(Outcome::Completed);
        let done = json!({
            "finish_reason": finish,
            "usage": guard.usage(),
            "ttft_ms": guard.times.first.map(|d| d.as_millis() as u64),
            "duration_ms": guard.exchange.arrived().elapsed().as_millis() as u64,
        });
        yield event("done", done.to_string());
    };
    sse(events, keep_alive)
}

/// `stream: false`: the whole reply as one `chat.completion` object. Dropping this future
/// (the client left) drops the backend stream like a streamed request would.
pub async fn collect(
    stream: DeltaStream,
    completion: Completion,
    mut guard: StreamGuard,
    max_bytes: usize,
) -> Result<Value, ApiError> {
    let mut stream: Pin<Box<dyn Stream<Item = _> + Send>> = stream;
    let mut content = String::new();
    let mut fields = Map::new();
    let mut finish = None;
    // What the reply holds so far, in bytes (fields counted as the upstream sent them).
    let mut size = 0usize;
    while let Some(item) = stream.next().await {
        match &item {
            Ok(Delta::Text(text)) => size = size.saturating_add(text.len()),
            Ok(Delta::Fields(delta)) => {
                size = size.saturating_add(delta.values().map(value_size).sum());
            }
            _ => {}
        }
        if size > max_bytes {
            let e = BackendError::TooLarge(max_bytes);
            guard.failed(&e);
            return Err(e.into());
        }
        match item {
            Ok(Delta::Text(text)) => {
                guard.delivered();
                content.push_str(&text);
            }
            Ok(Delta::Fields(delta)) => merge_fields(&mut fields, delta),
            Ok(Delta::Finish(reason)) => finish = Some(reason),
            Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
            Ok(Delta::Queued(_)) => {}
            Err(e) => {
                guard.failed(&e);
                return Err(e.into());
            }
        }
    }
    guard.finish(Outcome::Completed);
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    let has_tool_calls = fields.contains_key("tool_calls");
    message.insert(
        "content".into(),
        if content.is_empty() && has_tool_calls {
            Value::Null
        } else {
            Value::String(content)
        },
    );
    message.extend(fields);
    Ok(json!({
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": guard.usage(),
    }))
}

/// Roughly the bytes a JSON value takes: its strings' lengths plus a little per item.
fn value_size(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len() + 2,
        Value::Array(items) => items.iter().map(value_size).sum::<usize>() + 2,
        Value::Object(map) => {
            map.iter()
                .map(|(k, v)| k.len() + 3 + value_size(v))
                .sum::<usize>()
                + 2
        }
        _ => 8,
    }
}

/// Folds one streamed delta into the message so far, the way OpenAI's SDKs do: strings
/// append (`function.arguments`), objects merge, list items merge by their `index`.
fn merge_fields(into: &mut Map<String, Value>, delta: Map<String, Value>) {
    for (key, value) in delta {
        match (into.get_mut(&key), value) {
            (Some(Value::String(have)), Value::String(more)) if key != "index" => {
                if key == "id" || key == "type" {
                    *have = more;
                } else {
                    have.push_str(&more);
                }
            }
            (Some(Value::Object(have)), Value::Object(more)) => merge_fields(have, more),
            (Some(Value::Array(have)), Value::Array(more)) => {
                for item in more {
                    let index = item.get("index").cloned();
                    let slot = have
                        .iter_mut()
                        .find(|h| index.is_some() && h.get("index") == index.as_ref());
                    match (slot, item) {
                        (Some(Value::Object(h)), Value::Object(m)) => merge_fields(h, m),
                        (_, item) => have.push(item),
                    }
                }
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_deltas_merge_like_the_sdks() {
        let mut message = Map::new();
        let parts = [
            json!({"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}),
            json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}),
            json!({"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}),
        ];
        for part in parts {
            let Value::Object(part) = part else {
                unreachable!()
            };
            merge_fields(&mut message, part);
        }
        assert_eq!(
            Value::Object(message),
            json!({"tool_calls":[{"index":0,"id":"call_1","type":"function",
                "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]})
        );
    }

    #[test]
    fn chunks_are_valid_json_with_the_shared_identity() {
        let c = Completion::new("m\"odel");
        let writer = ChunkWriter::new(&c, true);
        let chunk: Value = serde_json::from_str(&writer.text("a\n\"b")).expect("valid JSON");
        assert_eq!(chunk["model"], "m\"odel");
        assert_eq!(chunk["choices"][0]["delta"]["content"], "a\n\"b");
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        let usage: Value = serde_json::from_str(&writer.usage(Usage::new(2, 3))).expect("JSON");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
    }
}
