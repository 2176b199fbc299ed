//! The relay: a backend's canonical events ([`Delta`](crate::backend::Delta)s) to what a
//! client reads, whatever its wire format. Here: the first-event peek (a failure before the
//! first token is a real status), the SSE writer and response, and the identity of a reply.
//! `encode.rs` is the one loop that runs a dialect's pure encoder over a stream and meters
//! it; `meter.rs` records what a stream delivered and how it ended. The encoders themselves
//! are the dialects' (`src/dialect/`).
//!
//! The SSE body owns the backend stream: when the client goes away hyper drops the body,
//! the body drops the backend stream, and the backend's work stops. No task, no channel.

mod encode;
mod meter;

#[cfg(test)]
pub use encode::{CANNED_END, Must, canned, payloads};
pub use encode::{Encoder, End, Out, Relayed, collect, encode};
pub use meter::{Bounds, StreamGuard};

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};

use crate::backend::{BackendError, Delta, DeltaStream};
use crate::wake::Woken;

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
    /// Comment lines for the next event (after its `id:`, so that it is still an event).
    notes: String,
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
            notes: String::new(),
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
        if !self.notes.is_empty() {
            self.buf.put_slice(self.notes.as_bytes());
            self.notes.clear();
        }
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

    /// A comment line in the next event, part of it (every client ignores it).
    pub(crate) fn note(&mut self, text: &str) {
        let _ = writeln!(self.notes, ": {text}");
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
/// buffering by proxies, and `ping` (the wire format's keep-alive) whenever `keep_alive`
/// passes without an event (a tick checks, so events cost no timer work).
pub fn sse(
    events: impl Stream<Item = Bytes> + Send + 'static,
    ping: &'static [u8],
    stream_id: &str,
    keep_alive: Duration,
) -> Response {
    let body = async_stream::stream! {
        let mut events = std::pin::pin!(events);
        // Polled when it goes off, not at every event (see `wake`).
        let mut tick = Woken::new(Box::pin(tokio::time::sleep(keep_alive)));
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
                () = &mut tick => {
                    if quiet {
                        yield Ok(Bytes::from_static(ping));
                    }
                    quiet = true;
                    tick.get_mut().as_mut().reset(tokio::time::Instant::now() + keep_alive);
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

/// A reply's identity: its random token (each dialect writes its id as its own prefix and
/// this token), when it was made, and the model it is from.
pub struct Completion {
    pub token: String,
    pub created: u64,
    pub model: String,
}

impl Completion {
    pub fn new(model: &str) -> Self {
        // Unguessable: 154 random bits (a v4 UUID holds 122; 32 more from a second one).
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let more = &b.simple().to_string()[..8];
        Completion {
            token: format!("{}{more}", a.simple()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_owned(),
        }
    }
}
