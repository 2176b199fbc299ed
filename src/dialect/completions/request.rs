//! A chat completions request as the canonical request: its messages (role and text, for
//! the models sluice runs and for counting), its options, and the body as sent, which an
//! OpenAI-compatible upstream receives untouched (tools, content parts and unknown fields
//! included).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::backend::Message;
use crate::dialect::{ClientRequest, Dropped};
use crate::error::ApiError;
use crate::http::typed;

/// The fields sluice reads; every other field stays in the body and goes to the upstream.
#[derive(Deserialize)]
struct Body {
    model: String,
    messages: Vec<MessageIn>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part: text is kept for the models sluice runs itself and for counting; other
/// parts (images, audio) pass through to the upstream.
#[derive(Deserialize)]
struct Part {
    text: Option<String>,
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn messages(raw: Vec<MessageIn>) -> Result<Vec<Message>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!(
                        "unknown role {}; expected one of {}",
                        crate::error::shown(Some(&m.role)),
                        ROLES.join(", ")
                    ),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => parts.into_iter().filter_map(|p| p.text).collect(),
            };
            Ok(Message {
                role: m.role,
                content,
            })
        })
        .collect()
}

/// What the answer's form depends on.
pub struct Asked {
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses and checks a request body of `size` bytes: a client's mistake is a 400 and
/// nothing else happens.
pub fn parse(
    mut body: Map<String, Value>,
    size: usize,
) -> Result<(ClientRequest, Asked), ApiError> {
    let fields: Body = typed(&mut body)?;
    if fields.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("sluice supports only n = 1", Some("n")));
    }
    let messages = messages(fields.messages)?;
    let (max_tokens, max_tokens_param) = match (fields.max_completion_tokens, fields.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let asked = Asked {
        stream: fields.stream,
        include_usage: fields.stream_options.is_some_and(|o| o.include_usage),
    };
    let chat = ClientRequest {
        model: fields.model,
        messages,
        max_tokens,
        max_tokens_param,
        temperature: fields.temperature,
        top_p: fields.top_p,
        seed: fields.seed,
        body,
        native: None,
        size,
        dropped: Dropped::default(),
    };
    Ok((chat, asked))
}
