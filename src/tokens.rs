//! Token counts with OpenAI's o200k encoding, for backends that report none and for what a
//! cancelled stream delivered.

use crate::backend::Message;

pub fn text(text: &str) -> u32 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u32
}

/// OpenAI's accounting for chat prompts: 3 tokens a message, 3 to prime the reply.
pub fn prompt(messages: &[Message]) -> u32 {
    3 + messages
        .iter()
        .map(|m| 3 + text(&m.role) + text(&m.content))
        .sum::<u32>()
}
