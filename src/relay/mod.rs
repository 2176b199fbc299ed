//! The relay: a backend's canonical events ([`Delta`](crate::backend::Delta)s) to what a
//! client reads. Here: the first-event peek (a failure before the first token is a real
//! status), the SSE response, and the identity of a reply. `meter.rs` records what a
//! stream delivered and how it ended; one encoder per wire format turns events into its
//! SSE: `openai.rs` (chat completion chunks, and the assembled non-streamed reply) and
//! `chat.rs` (sluice's `/api/chat` events).
//!
//! The SSE body owns the backend stream: when the client goes away hyper drops the body,
//! the body drops the backend stream, and the backend's work stops. No task, no channel.

mod chat;
mod meter;
mod openai;

pub use chat::chat_sse;
pub use meter::StreamGuard;
pub use openai::{collect, openai_sse};

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

use crate::backend::{BackendError, Delta, DeltaStream};

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
    pub(crate) fn into_stream(self) -> DeltaStream {
        match self.first {
            Some(first) => Box::pin(futures::stream::once(async { Ok(first) }).chain(self.rest)),
            None => self.rest,
        }
    }
}

/// The SSE response around an event stream: no buffering by proxies, keep-alive comments.
pub(crate) fn sse(
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
pub(crate) fn queued(ahead: usize) -> Event {
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
