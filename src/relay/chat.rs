//! sluice's own `/api/chat` encoder: `meta`, `token`…, then `done` or `error`, each event
//! with an `id:`.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::Response;
use axum::response::sse::Event;
use futures::StreamExt;
use serde_json::json;

use super::{Completion, Opened, StreamGuard, queued, sse};
use crate::backend::Delta;
use crate::error::ApiError;
use crate::telemetry::Outcome;

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
