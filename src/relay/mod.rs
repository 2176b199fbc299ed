//! The relay: a backend's canonical events ([`Delta`](crate::backend::Delta)s) to what a
//! client reads. Here: the first-event peek (a failure before the first token is a real
//! status), the SSE response, and the identity of a reply. `meter.rs` records what a
//! stream delivered and how it ended; one encoder per wire format turns events into its
//! SSE: `openai.rs` (chat completion chunks, and the assembled non-streamed reply) and
//! `chat.rs` (sluice's `/api/chat` events).
//!
//! The SSE body owns the backend stream: when the client goes away hyper drops the body,
//! the body drops the backend stream, and the backend's work stops. No task, no channel.

pub mod anthropic;
mod chat;
mod meter;
mod openai;
pub mod responses;

pub use chat::chat_events;
pub use meter::{Bounds, StreamGuard};
pub use openai::{assemble, collect, openai_events};

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};

use crate::backend::{BackendError, Delta, DeltaStream};
use crate::error::ApiError;

/// Which encoder wrote a stream: a resumed stream is read in the format it was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// sluice's `/api/chat` events.
    Chat,
    /// OpenAI's chat completion chunks.
    OpenAi,
    /// OpenAI's Responses API events.
    Responses,
    /// Anthropic's Messages API events.
    Anthropic,
}

impl Wire {
    pub fn as_str(self) -> &'static str {
        match self {
            Wire::Chat => "chat",
            Wire::OpenAi => "openai",
            Wire::Responses => "responses",
            Wire::Anthropic => "anthropic",
        }
    }

    pub fn parse(name: &str) -> Option<Wire> {
        match name {
            "chat" => Some(Wire::Chat),
            "openai" => Some(Wire::OpenAi),
            "responses" => Some(Wire::Responses),
            "anthropic" => Some(Wire::Anthropic),
            _ => None,
        }
    }
}

/// The event that ends stream `stream_id` with `error` when `id - 1` events came before
/// it, in the stream's format: for a stream cut short after its encoder stopped
/// (cancelled, its producer lost).
pub fn error_event(wire: Wire, stream_id: &str, id: u64, error: &ApiError) -> Bytes {
    let mut out = SseWriter::new();
    out.last_id = id.saturating_sub(1);
    match wire {
        Wire::Chat => {
            let body = error.body().to_string();
            out.event(Some("error"), |b| put(b, &body))
        }
        Wire::OpenAi => {
            let body = error.body().to_string();
            out.event(None, |b| put(b, &body))
        }
        Wire::Responses => {
            let body = responses::ended_by(stream_id, id.saturating_sub(1), error).to_string();
            out.event(Some("response.failed"), |b| put(b, &body))
        }
        Wire::Anthropic => {
            let body = anthropic::error_body(error).to_string();
            out.event(Some("error"), |b| put(b, &body))
        }
    }
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
) -> Result<Opened, BackendError> {
    let first = match tokio::time::timeout(window, stream.next()).await {
        Ok(Some(Ok(first))) => Some(first),
        Ok(Some(Err(e))) => {
            guard.failed(&e);
            return Err(e);
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
    /// A stream not peeked at: for a reply that is answered only once it is whole.
    pub fn unpeeked(stream: DeltaStream) -> Self {
        Opened {
            first: None,
            rest: stream,
        }
    }

    /// The next item: the one seen first, then the rest of the stream.
    pub(crate) async fn next(&mut self) -> Option<Result<Delta, BackendError>> {
        match self.first.take() {
            Some(first) => Some(Ok(first)),
            None => self.rest.next().await,
        }
    }
}

/// Writes a stream's SSE events into one buffer kept for the whole stream: each event
/// leaves as the bytes written since the last, and the buffer's memory is reused once
/// hyper has sent them. Payloads are written straight in, not built and copied.
pub(crate) struct SseWriter {
    buf: BytesMut,
    /// The last event's number: every event carries its `id:`, for clients that resume.
    last_id: u64,
}

impl SseWriter {
    /// The number the next event gets.
    pub(crate) fn next_id(&self) -> u64 {
        self.last_id + 1
    }
}

/// How long a client that lost its stream waits before it connects again (`retry:`).
const RETRY_MS: u32 = 1000;

impl SseWriter {
    /// A writer whose events are numbered `id: 1`, `id: 2`…; the stream opens with
    /// `retry:`, so a client that drops early already has a cursor and a pace to return at.
    pub(crate) fn new() -> Self {
        SseWriter {
            buf: BytesMut::with_capacity(1024),
            last_id: 0,
        }
    }

    /// `retry:`, written ahead of the first event.
    pub(crate) fn retry(&mut self) {
        let _ = writeln!(self.buf, "retry: {RETRY_MS}");
    }

    /// One event: its `id:`, `event:` when named, and one `data:` line with
    /// what `data` writes (JSON has no raw line break; should a payload hold one, it is
    /// split into `data:` lines as SSE wants).
    pub(crate) fn event(&mut self, name: Option<&str>, data: impl FnOnce(&mut BytesMut)) -> Bytes {
        self.last_id += 1;
        let _ = writeln!(self.buf, "id: {}", self.last_id);
        if let Some(name) = name {
            self.buf.put_slice(b"event: ");
            self.buf.put_slice(name.as_bytes());
            self.buf.put_u8(b'\n');
        }
        self.buf.put_slice(b"data: ");
        let start = self.buf.len();
        data(&mut self.buf);
        if self.buf[start..].contains(&b'\n') {
            let payload = self.buf.split_off(start);
            for (i, line) in payload[..].split(|&b| b == b'\n').enumerate() {
                if i > 0 {
                    self.buf.put_slice(b"\ndata: ");
                }
                self.buf.put_slice(line);
            }
        }
        self.buf.put_slice(b"\n\n");
        self.buf.split().freeze()
    }

    /// A comment line, which every client ignores.
    pub(crate) fn comment(&mut self, text: &str) -> Bytes {
        self.buf.put_slice(b": ");
        self.buf.put_slice(text.as_bytes());
        self.buf.put_slice(b"\n\n");
        self.buf.split().freeze()
    }
}

/// The JSON payload of one logged event (its `data:` lines joined), if it is JSON.
pub(crate) fn payload(event: &[u8]) -> Option<serde_json::Value> {
    let data: Vec<&[u8]> = event
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data: "))
        .collect();
    serde_json::from_slice(&data.join(&b'\n')).ok()
}

/// Writes `s` into a payload.
pub(crate) fn put(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
}

/// The SSE response around a stream of events: the stream's id as `x-sluice-stream-id`, no
/// buffering by proxies, and a `: keep-alive` comment whenever `keep_alive` passes without
/// an event (a tick checks, so events cost no timer work).
pub fn sse(
    events: impl Stream<Item = Bytes> + Send + 'static,
    wire: Wire,
    stream_id: &str,
    keep_alive: Duration,
) -> Response {
    // Anthropic's clients expect `ping` events; a comment is what every other one ignores.
    let ping: &'static [u8] = match wire {
        Wire::Anthropic => b"event: ping\ndata: {\"type\": \"ping\"}\n\n",
        _ => b": keep-alive\n\n",
    };
    let body = async_stream::stream! {
        let mut events = std::pin::pin!(events);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quiet = true;
        loop {
            tokio::select! {
                biased;
                event = events.next() => match event {
                    Some(event) => {
                        quiet = false;
                        yield Ok::<_, Infallible>(event);
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    if quiet {
                        yield Ok(Bytes::from_static(ping));
                    }
                    quiet = true;
                }
            }
        }
    };
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(id) = HeaderValue::from_str(stream_id) {
        headers.insert("x-sluice-stream-id", id);
    }
    response
}

/// The events of an upstream that speaks the client's own API, relayed: `first` (already
/// read) and the rest, each written by `write` (which meters it, and sets its last argument
/// once the upstream's reply has ended); a failure, or an end before the upstream's own, is
/// written by `failed`.
pub(crate) fn relay_native<W, F>(
    first: Option<Result<Delta, BackendError>>,
    mut opened: Opened,
    mut guard: StreamGuard,
    mut write: W,
    failed: F,
) -> impl Stream<Item = Bytes> + Send
where
    W: FnMut(&mut SseWriter, &mut StreamGuard, &str, &mut bool) -> Bytes + Send,
    F: Fn(&mut SseWriter, &ApiError) -> Bytes + Send,
{
    async_stream::stream! {
        let mut out = SseWriter::new();
        out.retry();
        let mut ended = false;
        let mut item = first;
        while let Some(next) = item {
            match next {
                Ok(Delta::Event(event)) => yield write(&mut out, &mut guard, event.json(), &mut ended),
                Ok(Delta::Queued(ahead)) => yield queued(&mut out, ahead),
                Ok(_) => {}
                Err(e) => {
                    guard.failed(&e);
                    yield failed(&mut out, &ApiError::from(e));
                    return;
                }
            }
            item = opened.next().await;
        }
        if !ended {
            let e = BackendError::Interrupted("the upstream's event stream ended before its reply did".into());
            guard.failed(&e);
            yield failed(&mut out, &ApiError::from(e));
        }
    }
}

/// A keep-alive comment that says where the request waits; every client ignores it.
pub(crate) fn queued(writer: &mut SseWriter, ahead: usize) -> Bytes {
    writer.comment(&format!("queued: {ahead} ahead"))
}

/// The identity every chunk of one OpenAI completion shares.
pub struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Completion {
    /// The id clients know the stream by: the chunks' `id`, or the `meta` event's.
    pub fn stream_id(&self, wire: Wire) -> String {
        match wire {
            Wire::OpenAi => self.id.clone(),
            Wire::Chat => self.id.replacen("chatcmpl-", "chat-", 1),
            Wire::Responses => self.id.replacen("chatcmpl-", "resp_", 1),
            Wire::Anthropic => self.id.replacen("chatcmpl-", "msg_", 1),
        }
    }

    pub fn new(model: &str) -> Self {
        // Unguessable: 154 random bits (a v4 UUID holds 122; 32 more from a second one).
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let more = &b.simple().to_string()[..8];
        Completion {
            id: format!("chatcmpl-{}{more}", a.simple()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_owned(),
        }
    }
}
