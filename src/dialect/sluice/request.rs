//! An `/api/chat` request (a prompt, an optional template with its variables, the
//! history) as the canonical request.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::backend::Message;
use crate::dialect::{ClientRequest, Dropped};
use crate::error::ApiError;
use crate::http::typed;
use crate::prompts::{Prompts, RenderError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    prompt: String,
    model: Option<String>,
    template: Option<String>,
    #[serde(default)]
    vars: Map<String, Value>,
    #[serde(default)]
    history: Vec<Turn>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    /// A system prompt of the client's own, after the template's.
    system: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Turn {
    role: String,
    content: String,
}

/// Parses and checks a request body of `size` bytes; `template` is rendered from
/// `prompts`, and a request that names no model gets `default_model`.
pub fn parse(
    mut body: Map<String, Value>,
    size: usize,
    prompts: &Prompts,
    default_model: &str,
) -> Result<ClientRequest, ApiError> {
    let req: ChatBody = typed(&mut body)?;
    if req.prompt.trim().is_empty() {
        return Err(ApiError::invalid(
            "`prompt` must not be empty",
            Some("prompt"),
        ));
    }
    let mut messages = Vec::with_capacity(req.history.len() + 2);
    if let Some(name) = &req.template {
        let system = prompts.render(name, &req.vars).map_err(|e| {
            let param = match e {
                RenderError::Unknown(_) => "template",
                _ => "vars",
            };
            ApiError::invalid(e.to_string(), Some(param))
        })?;
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    if let Some(system) = req.system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    for (i, turn) in req.history.into_iter().enumerate() {
        if !matches!(turn.role.as_str(), "user" | "assistant") {
            return Err(ApiError::invalid(
                "history turns are `user` or `assistant`",
                Some(&format!("history[{i}].role")),
            ));
        }
        messages.push(Message {
            role: turn.role,
            content: turn.content,
        });
    }
    messages.push(Message {
        role: "user".into(),
        content: req.prompt,
    });

    let model = req.model.unwrap_or_else(|| default_model.to_owned());

    Ok(ClientRequest {
        dropped: Dropped::default(),
        model,
        messages,
        max_tokens: req.max_tokens,
        max_tokens_param: "max_tokens",
        temperature: req.temperature,
        top_p: None,
        seed: None,
        // Nothing beyond the chat itself: an upstream's body is built from it.
        body: Map::new(),
        native: None,
        size,
    })
}
