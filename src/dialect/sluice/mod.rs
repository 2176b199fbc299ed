//! sluice's own `/api/chat`: the request (`request.rs`) and the encoder — `meta`,
//! `token`…, then `done` (finish reason, usage, timings) or `error`, each event with an
//! `id:`.

pub mod request;

use serde_json::{Value, json};

use crate::backend::{Delta, Finish};
use crate::error::ApiError;
use crate::relay::{Completion, End, Out, put};

/// What an `/api/chat` stream's id begins with.
pub const ID_PREFIX: &str = "chat-";

/// The `/api/chat` encoder for one reply.
pub struct Encoder {
    completion: Completion,
    finish: Option<Finish>,
}

impl Encoder {
    pub fn new(completion: Completion) -> Self {
        Encoder {
            completion,
            finish: None,
        }
    }
}

impl crate::relay::Encoder for Encoder {
    fn open(&mut self, out: &mut Out) {
        let id = super::Wire::Sluice.stream_id(&self.completion);
        let meta =
            json!({"id": id, "model": self.completion.model, "created": self.completion.created});
        out.json(Some("meta"), &meta.to_string());
    }

    fn event(&mut self, delta: Delta, out: &mut Out) {
        match delta {
            // The text is already a JSON string: written as it is.
            Delta::Text(text) => out.event(Some("token"), |b| {
                put(b, "{\"text\":");
                put(b, text.json());
                put(b, "}");
            }),
            Delta::Finish(reason) => self.finish = Some(reason),
            Delta::Signature(_) | Delta::Redacted(_) => out.left_out("signed reasoning"),
            Delta::Untranslated(what) => out.left_out(&what),
            // Tool calls, reasoning and the upstream's own fields have no `/api/chat` event.
            _ => {}
        }
    }

    fn end(&mut self, end: &End, out: &mut Out) {
        let done = Done {
            cost: end.cost,
            duration_ms: end.duration.as_millis() as u64,
            finish_reason: self.finish.as_ref().map(Finish::chat),
            ttft_ms: end.first_token.map(|d| d.as_millis() as u64),
            usage: json!(end.usage),
        };
        out.json(
            Some("done"),
            &serde_json::to_string(&done).unwrap_or_default(),
        );
    }

    fn fail(&mut self, error: &ApiError, out: &mut Out) {
        self::error(error, out);
    }
}

/// The `done` event: how the reply ended, its usage and, when its model has a price, its
/// cost (a model with none has no `cost`: unpriced is not free). Its fields in the order
/// they have always been written: alphabetical.
#[derive(serde::Serialize)]
struct Done<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<f64>,
    duration_ms: u64,
    finish_reason: Option<&'a str>,
    ttft_ms: Option<u64>,
    /// As a JSON object, so that its counts are alphabetical too.
    usage: Value,
}

/// The `error` event that ends a stream: the OpenAI error body.
pub fn error(error: &ApiError, out: &mut Out) {
    out.json(Some("error"), &error.body().to_string());
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::{Text, Usage};
    use crate::relay::Encoder as _;
    use crate::relay::Must;

    #[test]
    fn a_reply_is_meta_tokens_then_done() -> Result<(), String> {
        let mut encoder = Encoder::new(Completion::new("mock"));
        let mut out = Out::new();
        encoder.open(&mut out);
        encoder.event(Delta::Text(Text::plain("Hi \"you\"")), &mut out);
        encoder.event(Delta::Finish(Finish::Stop), &mut out);
        let end = End {
            usage: Usage::new(3, 1),
            cost: Some(0.5),
            first_token: Some(Duration::from_millis(7)),
            duration: Duration::from_millis(9),
        };
        encoder.end(&end, &mut out);
        let events: Vec<String> = out
            .take()
            .map(|e| String::from_utf8_lossy(&e).into_owned())
            .collect();
        assert_eq!(events.len(), 3);
        assert!(
            events[0].starts_with("retry: 1000\nid: 1\nevent: meta\ndata: {"),
            "{}",
            events[0]
        );
        assert_eq!(
            events[1],
            "id: 2\nevent: token\ndata: {\"text\":\"Hi \\\"you\\\"\"}\n\n"
        );
        let done = crate::relay::payload(events[2].as_bytes()).must("JSON")?;
        assert_eq!(done["finish_reason"], "stop");
        assert_eq!(done["usage"]["total_tokens"], 4);
        assert_eq!(done["ttft_ms"], 7);
        assert_eq!(done["cost"], 0.5);
        // Written as it always was: keys in alphabetical order, the counts' too.
        assert!(
            events[2].contains(
                "{\"cost\":0.5,\"duration_ms\":9,\"finish_reason\":\"stop\",\"ttft_ms\":7,\
                 \"usage\":{\"completion_tokens\":1,\"prompt_tokens\":3,\"total_tokens\":4}}"
            ),
            "{}",
            events[2]
        );
        Ok(())
    }

    #[test]
    fn a_failure_is_an_error_event_with_the_openai_body() -> Result<(), String> {
        let mut out = Out::numbered_from(4);
        error(&ApiError::StreamCancelled, &mut out);
        let event = out.take().next().must("one event")?;
        assert!(event.starts_with(b"id: 5\nevent: error\n"));
        let body = crate::relay::payload(&event).must("JSON")?;
        assert_eq!(body["error"]["code"], "stream_cancelled");
        Ok(())
    }
}
