//! sluice's own `/api/chat` encoder: `meta`, `token`…, then `done` or `error`, each event
//! with an `id:`.

use bytes::Bytes;
use futures::Stream;
use serde_json::json;

use super::{Completion, Opened, SseWriter, StreamGuard, Wire, put, queued};
use crate::backend::Delta;
use crate::error::ApiError;
use crate::telemetry::Outcome;

/// `POST /api/chat`: `meta`, `token`…, then `done` or `error`, each event with an `id:`.
pub fn chat_events(
    mut opened: Opened,
    completion: Completion,
    mut guard: StreamGuard,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let chat_id = completion.stream_id(Wire::Chat);
    async_stream::stream! {
        let mut out = SseWriter::new();
        out.retry();
        let meta = json!({"id": chat_id, "model": completion.model, "created": completion.created});
        yield out.event(Some("meta"), |b| put(b, &meta.to_string()));
        let mut finish = None;
        while let Some(item) = opened.next().await {
            match item {
                Ok(Delta::Text(text)) => {
                    guard.delivered();
                    // The text is already a JSON string: written as it is.
                    yield out.event(Some("token"), |b| {
                        put(b, "{\"text\":");
                        put(b, text.json());
                        put(b, "}");
                    });
                }
                // Native events come only to the route that speaks their API.
                Ok(Delta::Fields(_) | Delta::Identity(_) | Delta::Logprobs(_) | Delta::UsageDetails(_) | Delta::Event(_)) => {}
                Ok(Delta::Finish(reason)) => finish = Some(reason),
                Ok(Delta::Usage(usage)) => guard.reported = Some(usage),
                Ok(Delta::Queued(ahead)) => yield queued(&mut out, ahead),
                Err(e) => {
                    guard.failed(&e);
                    let body = ApiError::from(e).body().to_string();
                    yield out.event(Some("error"), |b| put(b, &body));
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
        yield out.event(Some("done"), |b| put(b, &done.to_string()));
    }
}
