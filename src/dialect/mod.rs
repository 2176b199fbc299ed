//! One dialect per wire format. Everything about one API lives in its folder and nothing
//! else does: how its request becomes the canonical request ([`ClientRequest`]), its pure encoder
//! (canonical events in, SSE events out: see [`crate::relay::Encoder`]), how it assembles a
//! whole reply from its events, its errors in its own shape and words, and its stream ids.
//!
//! - `completions/`: OpenAI chat completions (`/v1/chat/completions`).
//! - `responses/`: OpenAI's Responses API (`/v1/responses`).
//! - `anthropic/`: Anthropic's Messages API (`/v1/messages`).
//! - `sluice/`: sluice's own `/api/chat` events.
//!
//! A route (`src/routes/`) reads the HTTP request, asks its dialect for the canonical
//! request, runs it through the pipeline, and answers with its dialect's encoder over the
//! one encode loop. A new API is a new folder here, a [`Wire`] variant, and a route.

pub mod anthropic;
pub mod completions;
#[cfg(test)]
mod golden;
pub mod responses;
pub mod sluice;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::backend::{Message, Native};
use crate::error::ApiError;
pub use crate::pivot::Dropped;
use crate::relay::{Completion, Out};

/// A request as its dialect parsed it: the one shape the pipeline takes.
pub struct ClientRequest {
    pub model: String,
    /// The conversation as the models sluice runs itself read it (role and text).
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    /// The field `max_tokens` came from, to name in errors.
    pub max_tokens_param: &'static str,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    /// The body an OpenAI-compatible upstream receives (unknown fields pass through).
    pub body: Map<String, Value>,
    /// The request as the client sent it, for an upstream that speaks the client's API.
    pub native: Option<Native>,
    /// The request's size in bytes as it goes upstream: its tokens are reserved beyond the
    /// messages' text, at a token per four bytes.
    pub size: usize,
    /// What translating `native` into `body` left out (`web_search`, `thinking`…): named to
    /// the client (`x-sluice-dropped`) when the upstream does not speak the client's API.
    pub dropped: Dropped,
}

/// The upstream role of the dialect an upstream's route names (`api = "chat"`,
/// `"responses"`, `"anthropic"`): how the HTTP upstream at `base_url` is called and read.
pub fn speaker(api: &str, base_url: &str) -> std::sync::Arc<dyn crate::backend::speaker::Speaker> {
    match api {
        "responses" => std::sync::Arc::new(responses::upstream::Upstream),
        "anthropic" => std::sync::Arc::new(anthropic::upstream::Upstream),
        _ => std::sync::Arc::new(completions::upstream::Upstream::new(base_url)),
    }
}

/// Which dialect wrote a stream: a resumed stream is read in the format it was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// sluice's `/api/chat` events.
    Sluice,
    /// OpenAI's chat completion chunks.
    Completions,
    /// OpenAI's Responses API events.
    Responses,
    /// Anthropic's Messages API events.
    Anthropic,
}

impl Wire {
    pub fn as_str(self) -> &'static str {
        match self {
            Wire::Sluice => "chat",
            Wire::Completions => "openai",
            Wire::Responses => "responses",
            Wire::Anthropic => "anthropic",
        }
    }

    /// `gen_ai.provider.name` (OpenTelemetry) of the API: the maker of the API a client
    /// speaks, `sluice` for sluice's own.
    pub fn provider(self) -> &'static str {
        match self {
            Wire::Sluice => "sluice",
            Wire::Completions | Wire::Responses => "openai",
            Wire::Anthropic => "anthropic",
        }
    }

    pub fn parse(name: &str) -> Option<Wire> {
        match name {
            "chat" => Some(Wire::Sluice),
            "openai" => Some(Wire::Completions),
            "responses" => Some(Wire::Responses),
            "anthropic" => Some(Wire::Anthropic),
            _ => None,
        }
    }

    /// The id clients know a reply's stream by, in this dialect's form.
    pub fn stream_id(self, completion: &Completion) -> String {
        let prefix = match self {
            Wire::Completions => completions::ID_PREFIX,
            Wire::Sluice => sluice::ID_PREFIX,
            Wire::Responses => responses::ID_PREFIX,
            Wire::Anthropic => anthropic::ID_PREFIX,
        };
        format!("{prefix}{}", completion.token)
    }

    /// What a quiet stream of this dialect is sent to keep it open.
    pub fn keep_alive(self) -> &'static [u8] {
        match self {
            Wire::Anthropic => anthropic::PING,
            _ => b": keep-alive\n\n",
        }
    }

    /// The event that ends stream `stream_id` with `error` when `id - 1` events came before
    /// it: for a stream cut short after its encoder stopped (cancelled, its producer lost).
    pub fn error_event(self, stream_id: &str, id: u64, error: &ApiError) -> Bytes {
        let mut out = Out::numbered_from(id.saturating_sub(1));
        match self {
            Wire::Sluice => sluice::error(error, &mut out),
            Wire::Completions => completions::error(error, &mut out),
            Wire::Responses => responses::ended_by(stream_id, error, &mut out),
            Wire::Anthropic => anthropic::error(error, &mut out),
        }
        out.take().next().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::Dropped;

    #[test]
    fn what_was_left_out_is_named_within_bounds() {
        let mut dropped = Dropped::default();
        dropped.add("web_search");
        dropped.add("web_search");
        dropped.add("caf\u{e9},\nx");
        dropped.add(&"y".repeat(500));
        for i in 0..100 {
            dropped.add(&format!("field{i}"));
        }
        let names = dropped.into_names();
        assert_eq!(names[0], "web_search");
        assert_eq!(names[1], "caf???x");
        assert_eq!(names[2].len(), Dropped::LONGEST);
        assert_eq!(names.len(), Dropped::MOST + 1);
        assert_eq!(names[Dropped::MOST], "+71 more");
    }
}
