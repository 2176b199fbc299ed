//! A fake OpenAI-compatible upstream on port 0. It behaves as the request's `model` says,
//! records every request, and records when each TCP connection closed: what a real
//! upstream would see of a cancellation.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::DEADLINE;

/// What the fake upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub connection: u64,
    pub body: Value,
    pub authorization: Option<String>,
    pub request_id: Option<String>,
    /// Every header, by lowercase name.
    pub headers: HashMap<String, String>,
}

#[derive(Default)]
struct Record {
    requests: Vec<Seen>,
    closed: HashMap<u64, Instant>,
    /// `GET /models` requests (model lists and readiness probes), kept apart.
    model_lists: usize,
}

/// The models the fake upstream lists at `GET /models`.
pub const LISTED: [&str; 3] = ["gpt-test", "status-500", "slow"];

#[derive(Clone)]
pub struct FakeUpstream {
    addr: std::net::SocketAddr,
    record: Arc<Mutex<Record>>,
    changed: Arc<Notify>,
    /// Bytes of response bodies that went out (handed to the connection), all requests.
    sent: Arc<std::sync::atomic::AtomicUsize>,
    /// While set, every chat request is answered 500.
    failing: Arc<std::sync::atomic::AtomicBool>,
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

impl FakeUpstream {
    pub async fn spawn() -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let upstream = FakeUpstream {
            addr: listener.local_addr().expect("addr"),
            record: Arc::default(),
            changed: Arc::default(),
            sent: Arc::default(),
            failing: Arc::default(),
        };
        let server = upstream.clone();
        tokio::spawn(async move {
            let mut next_connection = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                next_connection += 1;
                let connection = next_connection;
                let server = server.clone();
                tokio::spawn(async move {
                    let handler = server.clone();
                    let service = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler.answer(connection, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                    server.lock().closed.insert(connection, Instant::now());
                    server.changed.notify_waiters();
                });
            }
        });
        upstream
    }

    /// From now on, every chat request is answered 500 (`true`), or as its model says.
    pub fn set_failing(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    /// Chat requests seen so far.
    pub fn count(&self) -> usize {
        self.lock().requests.len()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.lock().requests.clone()
    }

    /// Waits for the `n`th request (from 1) to arrive.
    pub async fn request(&self, n: usize) -> Seen {
        self.wait(|r| r.requests.get(n - 1).cloned()).await
    }

    /// Waits until the connection that carried the `n`th request closes; when it did.
    pub async fn closed(&self, n: usize) -> Instant {
        let connection = self.request(n).await.connection;
        self.wait(|r| r.closed.get(&connection).copied()).await
    }

    /// How many times `GET /models` was asked.
    pub fn model_lists(&self) -> usize {
        self.lock().model_lists
    }

    /// Bytes of response bodies sent so far.
    pub fn sent_bytes(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the connection of the `n`th request is still open.
    pub fn is_open(&self, n: usize) -> bool {
        let record = self.lock();
        let connection = record.requests[n - 1].connection;
        !record.closed.contains_key(&connection)
    }

    async fn wait<T>(&self, mut found: impl FnMut(&Record) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let changed = self.changed.notified();
            if let Some(value) = found(&self.lock()) {
                return value;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("the fake upstream did not see it within {DEADLINE:?}");
            }
        }
    }

    async fn answer(&self, connection: u64, req: Request<Incoming>) -> Response<Body> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if req.method() == hyper::Method::GET && req.uri().path().ends_with("/models") {
            self.lock().model_lists += 1;
            let data: Vec<Value> = LISTED
                .iter()
                .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "fake"}))
                .collect();
            return full(200, &json!({"object": "list", "data": data}).to_string());
        }
        let authorization = header("authorization");
        let request_id = header("x-request-id");
        let responses_api = req.uri().path().ends_with("/responses");
        let messages_api = req.uri().path().ends_with("/messages");
        let headers = req
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        self.lock().requests.push(Seen {
            connection,
            body: body.clone(),
            authorization,
            request_id,
            headers,
        });
        self.changed.notify_waiters();
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return error(500, None, "The replica is down");
        }
        if let Some(name) = body["model"]
            .as_str()
            .and_then(|m| m.strip_prefix("fixture:"))
        {
            return fixture(name, self.sent.clone());
        }
        if responses_api {
            return respond(&body, self.sent.clone());
        }
        if messages_api {
            return message(&body, self.sent.clone());
        }
        behave(&body, self.sent.clone()).await
    }
}

/// `tests/fixtures/<name>.sse` as it is written, an event at a time.
fn fixture(name: &str, sent: Arc<std::sync::atomic::AtomicUsize>) -> Response<Body> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.sse"));
    let text = std::fs::read_to_string(&path).expect("a fixture");
    let steps = text
        .split_inclusive("\n\n")
        .map(|event| Step::Send(event.to_owned()))
        .collect();
    stream_steps(steps, sent)
}

/// An upstream that speaks Anthropic's Messages API: a short reply whose events carry a
/// field of the upstream's own (`x_vendor`).
fn message(body: &Value, sent: Arc<std::sync::atomic::AtomicUsize>) -> Response<Body> {
    let model = body["model"].as_str().unwrap_or("");
    if model == "hostile" {
        // Events of the right types with the wrong shapes.
        let steps = [
            json!({"type": "message_start", "message": "not an object"}),
            json!({"type": "content_block_delta", "index": 99, "delta": {"type": "text_delta", "text": "x"}}),
            json!({"type": "content_block_start", "index": 0, "content_block": 7}),
            json!({"type": "message_delta", "delta": 3, "usage": "none"}),
            json!({"type": "message_stop"}),
        ]
        .into_iter()
        .map(|e| Step::Send(format!("data: {e}\n\n")))
        .collect();
        return stream_steps(steps, sent);
    }
    let mut events = vec![
        json!({"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 9, "output_tokens": 1}, "x_vendor": "kept"}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ];
    for piece in ["Hello", " from", " claude"] {
        events.push(json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": piece}}));
    }
    events.extend([
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 3}}),
        json!({"type": "message_stop"}),
    ]);
    let mut steps: Vec<Step> = events
        .into_iter()
        .map(|event| {
            let kind = event["type"].as_str().unwrap_or_default().to_owned();
            Step::Send(format!("event: {kind}\ndata: {event}\n\n"))
        })
        .collect();
    // As Anthropic does: a ping after the start.
    steps.insert(
        1,
        Step::Send("event: ping\ndata: {\"type\": \"ping\"}\n\n".into()),
    );
    stream_steps(steps, sent)
}

/// An upstream that speaks the Responses API: a short reply whose events carry fields of
/// the upstream's own (`obfuscation`, `x_vendor`), numbered from 0.
fn respond(body: &Value, sent: Arc<std::sync::atomic::AtomicUsize>) -> Response<Body> {
    let model = body["model"].as_str().unwrap_or("");
    if model == "hostile" {
        let steps = [
            json!({"type": "response.created", "response": 5}),
            json!({"type": "response.output_item.done", "item": "x"}),
            json!({"type": "response.output_text.delta", "delta": 9}),
            json!({"type": "response.completed", "response": "done"}),
        ]
        .into_iter()
        .map(|e| Step::Send(format!("data: {e}\n\n")))
        .collect();
        return stream_steps(steps, sent);
    }
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_up", "object": "response", "created_at": 1, "status": status,
            "model": model, "output": output, "usage": usage, "x_vendor": "kept"})
    };
    let message = |text: &str, status: &str| {
        json!({"id": "msg_up", "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let usage = json!({"input_tokens": 7, "output_tokens": 3, "total_tokens": 10,
        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
    let mut events = vec![
        json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}),
        json!({"type": "response.in_progress", "response": response("in_progress", json!([]), Value::Null)}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": message("", "in_progress")}),
        json!({"type": "response.content_part.added", "item_id": "msg_up", "output_index": 0,
            "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
    ];
    for piece in ["Hello", " from", " responses"] {
        events.push(
            json!({"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 0,
            "content_index": 0, "delta": piece, "obfuscation": "x7", "logprobs": []}),
        );
    }
    let text = "Hello from responses";
    events.extend([
        json!({"type": "response.output_text.done", "item_id": "msg_up", "output_index": 0,
            "content_index": 0, "text": text, "logprobs": []}),
        json!({"type": "response.content_part.done", "item_id": "msg_up", "output_index": 0,
            "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}),
        json!({"type": "response.output_item.done", "output_index": 0, "item": message(text, "completed")}),
        json!({"type": "response.completed", "response": response("completed", json!([message(text, "completed")]), usage)}),
    ]);
    let steps = events
        .into_iter()
        .enumerate()
        .map(|(n, mut event)| {
            event["sequence_number"] = json!(n);
            let kind = event["type"].as_str().unwrap_or_default().to_owned();
            Step::Send(format!("event: {kind}\ndata: {event}\n\n"))
        })
        .collect();
    stream_steps(steps, sent)
}

/// One streamed chunk as OpenAI writes it.
fn chunk(delta: Value, finish: Option<&str>) -> String {
    let chunk = json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
        "model": "up", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {chunk}\n\n")
}

fn text(t: &str) -> String {
    chunk(json!({"content": t}), None)
}

/// The `paced` model's whole reply: 30 tokens, ` w0` to ` w29`.
pub fn paced_reply() -> String {
    (0..30).map(|i| format!(" w{i}")).collect()
}

/// What the upstream sends, step by step.
enum Step {
    Send(String),
    Wait(Duration),
    /// Never send anything more, keeping the connection open.
    Hang,
    /// Break the connection off.
    Abort,
}

/// The behaviour the request's model name selects.
async fn behave(body: &Value, sent: Arc<std::sync::atomic::AtomicUsize>) -> Response<Body> {
    // A last message `behave:<model>` behaves as that model would, whatever the model's
    // name at this upstream: one client's requests can fail where another's succeed.
    let told = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .and_then(|c| c.strip_prefix("behave:"));
    let model = told.unwrap_or(body["model"].as_str().unwrap_or(""));
    // "no-usage" is an upstream that never reports usage, asked or not.
    let usage = body["stream_options"]["include_usage"] == json!(true) && model != "no-usage";
    let tokens = ["Hello", " from", " the", " fake", " upstream"];
    let role = chunk(json!({"role": "assistant", "content": ""}), None);
    let finish = chunk(json!({}), Some("stop"));
    let usage_chunk = format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}})
    );
    let done = "data: [DONE]\n\n".to_owned();
    let mut steps = vec![Step::Send(role)];
    if let Some(port) = model.strip_prefix("redirect-") {
        return Response::builder()
            .status(307)
            .header(
                "location",
                format!("http://127.0.0.1:{port}/v1/chat/completions"),
            )
            .body(BodyExt::boxed_unsync(
                Full::new(Bytes::new()).map_err(|never: Infallible| match never {}),
            ))
            .unwrap_or_else(|_| unreachable!());
    }
    if let Some(ms) = model.strip_prefix("hold-") {
        // A first token, then the reply's end after `ms`.
        let ms: u64 = ms.parse().unwrap_or(0);
        steps.push(Step::Send(text("Hello")));
        steps.push(Step::Wait(Duration::from_millis(ms)));
        steps.extend([Step::Send(finish), Step::Send(done)]);
        return stream_steps(steps, sent);
    }
    if let Some(size) = model.strip_prefix("long-line-") {
        // One chunk whose `data:` line is `size` bytes and more, then a normal reply.
        let size: usize = size.parse().unwrap_or(0);
        let line = text(&"x".repeat(size));
        steps.push(Step::Send(line));
        steps.extend(tokens.iter().map(|t| Step::Send(text(t))));
        steps.extend([Step::Send(finish), Step::Send(done)]);
        return stream_steps(steps, sent);
    }
    match model {
        "status-500-traceback" => {
            return error(
                500,
                None,
                "Traceback (most recent call last): File \"/srv/internal-host-7.corp/app.py\"",
            );
        }
        // A 500 whose body would be 400 MiB, sent as fast as it is read.
        "status-500-huge" => {
            let mib = Bytes::from(vec![b'e'; 1024 * 1024]);
            let frames = futures::stream::iter((0..400).map(move |_| {
                sent.fetch_add(mib.len(), std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::io::Error>(Frame::data(mib.clone()))
            }));
            return Response::builder()
                .status(500)
                .body(BodyExt::boxed_unsync(StreamBody::new(frames)))
                .unwrap_or_else(|_| unreachable!());
        }
        // Everything a faithful relay carries through: the chunk's own fields, logprobs,
        // reasoning and refusal deltas, usage details.
        "rich" => {
            let rich = |choice: Value, usage: Value| {
                format!("data: {}\n\n", json!({"id": "chatcmpl-up", "object": "chat.completion.chunk",
                    "created": 1, "model": "up", "system_fingerprint": "fp_up", "service_tier": "default",
                    "choices": choice, "usage": usage}))
            };
            let lp = json!({"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]});
            steps = vec![
                Step::Send(rich(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), Value::Null)),
                Step::Send(rich(json!([{"index": 0, "delta": {"reasoning_content": "thinking"}, "logprobs": null, "finish_reason": null}]), Value::Null)),
                Step::Send(rich(json!([{"index": 0, "delta": {"content": "Hi"}, "logprobs": lp, "finish_reason": null}]), Value::Null)),
                Step::Send(rich(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]), Value::Null)),
                Step::Send(rich(json!([]), json!({"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10,
                    "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 4}}))),
                Step::Send(done),
            ];
            return stream_steps(steps, sent);
        }
        "huge-usage" => {
            steps.extend(tokens.iter().map(|t| Step::Send(text(t))));
            steps.push(Step::Send(finish));
            steps.push(Step::Send(format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                    "model": "up", "choices": [], "usage": {"prompt_tokens": 4_294_967_295_u64,
                    "completion_tokens": 10, "total_tokens": 4_294_967_305_u64}})
            )));
            steps.push(Step::Send(done));
            return stream_steps(steps, sent);
        }
        "status-401" => return error(401, None, "Incorrect API key provided: sk-test-***"),
        "status-400" => return error(400, None, "temperature must be at most 2"),
        "status-404" => return error(404, None, "The model `nope` does not exist"),
        "status-429" => return error(429, Some("7"), "Rate limit reached for requests"),
        // What OpenAI answers a request larger than what is left of a tokens-per-minute
        // limit, and Azure a minute's worth of them: a long Retry-After.
        "status-429-300" => return error(429, Some("300"), "Rate limit reached for requests"),
        "status-429-too-large" => {
            return error(
                429,
                Some("300"),
                "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.",
            );
        }
        "status-500" => return error(500, None, "The server had an error"),
        "hang-headers" => {
            futures::future::pending::<()>().await;
        }
        "hang-body" => steps.push(Step::Hang),
        // A replica whose first token comes late, then as fast as another's.
        "slow-first" => {
            steps.insert(0, Step::Wait(Duration::from_millis(250)));
            steps.extend(tokens.iter().map(|t| Step::Send(text(t))));
            steps.extend([Step::Send(finish), Step::Send(done)]);
        }
        "stall" => steps.extend([Step::Send(text("Hello")), Step::Hang]),
        // A whole reply at a steady pace: 30 tokens, 30 ms apart.
        "paced" => {
            for i in 0..30 {
                steps.push(Step::Send(text(&format!(" w{i}"))));
                steps.push(Step::Wait(Duration::from_millis(30)));
            }
            steps.push(Step::Send(finish));
            if usage {
                steps.push(Step::Send(usage_chunk));
            }
            steps.push(Step::Send(done));
        }
        "slow" => {
            for i in 0..200 {
                steps.push(Step::Send(text(&format!(" t{i}"))));
                steps.push(Step::Wait(Duration::from_millis(50)));
            }
        }
        "midstream-error" => steps.extend([
            Step::Send(text("Hello")),
            Step::Send("data: {\"error\":{\"message\":\"upstream overloaded\",\"type\":\"server_error\"}}\n\n".into()),
            Step::Send(text(" after")),
            Step::Send(finish.clone()),
            Step::Send(done.clone()),
        ]),
        // The pause lets hyper flush what was sent, as a real upstream dying mid-reply would.
        "abort" => steps.extend([Step::Send(text("Hello")), Step::Wait(Duration::from_millis(20)), Step::Abort]),
        "garbage" => steps.extend([Step::Send(text("Hello")), Step::Send("data: not json\n\n".into())]),
        "no-finish" => steps.extend([Step::Send(text("Hello")), Step::Send(done.clone())]),
        // As fast as the connection takes it: 64 MiB in chunks of 1 KiB.
        "flood" => {
            let kib = text(&"x".repeat(1024));
            steps.extend((0..65_536).map(|_| Step::Send(kib.clone())));
        }
        // A finished reply of 2 MiB, in chunks of 1 KiB.
        "large" => {
            let kib = text(&"x".repeat(1024));
            steps.extend((0..2_048).map(|_| Step::Send(kib.clone())));
            steps.extend([Step::Send(finish), Step::Send(done)]);
        }
        "tools" => steps.extend([
            Step::Send(chunk(json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]}), None)),
            Step::Send(chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}), None)),
            Step::Send(chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}), None)),
            Step::Send(chunk(json!({}), Some("tool_calls"))),
            Step::Send(done.clone()),
        ]),
        // Text, then a function call: a stream whose kind of content changes.
        "text-then-tools" => steps.extend([
            Step::Send(text("Let me check")),
            Step::Send(text(" the weather.")),
            Step::Send(chunk(json!({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\""}}]}), None)),
            Step::Send(chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": ":\"Paris\"}"}}]}), None)),
            Step::Send(chunk(json!({}), Some("tool_calls"))),
            Step::Send(done.clone()),
        ]),
        // A reply whose body ends a moment after its `[DONE]`.
        "late-end" => {
            steps.extend(tokens.iter().map(|t| Step::Send(text(t))));
            steps.extend([
                Step::Send(finish),
                Step::Send(done),
                Step::Wait(Duration::from_millis(20)),
            ]);
        }
        _ => {
            for t in tokens {
                steps.push(Step::Send(text(t)));
            }
            steps.push(Step::Send(finish));
            if usage {
                steps.push(Step::Send(usage_chunk));
            }
            steps.push(Step::Send(done));
        }
    }
    stream_steps(steps, sent)
}

fn stream_steps(steps: Vec<Step>, sent: Arc<std::sync::atomic::AtomicUsize>) -> Response<Body> {
    let frames = async_stream::stream! {
        for step in steps {
            match step {
                Step::Send(data) => {
                    sent.fetch_add(data.len(), std::sync::atomic::Ordering::SeqCst);
                    yield Ok(Frame::data(Bytes::from(data)));
                }
                Step::Wait(d) => tokio::time::sleep(d).await,
                Step::Hang => futures::future::pending::<()>().await,
                Step::Abort => {
                    yield Err(std::io::Error::other("aborted by the fake upstream"));
                    return;
                }
            }
        }
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed_unsync(StreamBody::new(frames.boxed())))
        .unwrap_or_else(|_| unreachable!())
}

fn full(status: u16, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(BodyExt::boxed_unsync(
            Full::new(Bytes::from(body.to_owned())).map_err(|never: Infallible| match never {}),
        ))
        .unwrap_or_else(|_| unreachable!())
}

fn error(status: u16, retry_after: Option<&str>, message: &str) -> Response<Body> {
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
        "param": null, "code": null}})
    .to_string();
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(seconds) = retry_after {
        response = response.header("retry-after", seconds);
    }
    response
        .body(BodyExt::boxed_unsync(
            Full::new(Bytes::from(body)).map_err(|never: Infallible| match never {}),
        ))
        .unwrap_or_else(|_| unreachable!())
}
