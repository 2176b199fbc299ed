//! Text in and out of the model: the chat template and tokenizer from the GGUF file, and
//! the generated tokens turned back into text in whole characters.

use anyhow::Context as _;
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::Tokenizer;

use super::super::{BackendError, Message};

/// The model's tokenizer, chat template and end tokens.
pub struct Chat {
    pub tokenizer: Tokenizer,
    template: minijinja::Environment<'static>,
    /// End-of-turn and end-of-text tokens.
    pub stop: Vec<u32>,
    bos: String,
    eos: String,
}

impl Chat {
    pub fn load(content: &gguf_file::Content) -> anyhow::Result<Self> {
        let tokenizer = tokenizer(content)?;
        let text = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_string().ok())
                .cloned()
        };
        let token = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let piece = |id: Option<u32>| {
            id.and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        let bos = piece(token("tokenizer.ggml.bos_token_id"));
        let eos = piece(token("tokenizer.ggml.eos_token_id"));
        let mut stop: Vec<u32> = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        stop.extend(token("tokenizer.ggml.eos_token_id"));
        let mut template = minijinja::Environment::new();
        template.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        template
            .add_template_owned(
                "chat",
                text("tokenizer.chat_template").unwrap_or_else(|| CHATML.to_owned()),
            )
            .context("the model's chat template does not parse")?;
        Ok(Chat {
            tokenizer,
            template,
            stop,
            bos,
            eos,
        })
    }

    /// The conversation as the model's tokens, ready for the assistant's reply.
    pub fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>, BackendError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let text = self
            .template
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.bos.as_str(),
                    eos_token => self.eos.as_str(),
                })
            })
            .map_err(|e| BackendError::Protocol(format!("the chat template failed: {e}")))?;
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| BackendError::Protocol(format!("cannot tokenize the prompt: {e}")))?
            .get_ids()
            .to_vec())
    }
}

/// The model's tokenizer from the GGUF, with SmolLM's pre-tokenizer: candle's guess for
/// `smollm` prefixes a space and gives ids that differ from the model's training.
fn tokenizer(content: &gguf_file::Content) -> anyhow::Result<Tokenizer> {
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
    let mut tokenizer = Tokenizer::from_gguf(content)
        .context("SLUICE_LOCAL_MODEL: no tokenizer in the GGUF file")?;
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    if pre == Some("smollm") {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
    }
    Ok(tokenizer)
}

/// Turns tokens into text in whole UTF-8 characters: a token that ends inside a multi-byte
/// character is held until the character is complete. Decoding a short window of tokens
/// rather than one token alone keeps the spaces that byte-level BPE attaches to words.
#[derive(Default)]
pub struct TextStream {
    /// Start of the window: tokens before it are sent and no longer needed as context.
    start: usize,
    /// Tokens before this index have been sent.
    sent: usize,
}

impl TextStream {
    /// The new text that the last of `tokens` (every token so far) completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) -> Option<String> {
        let piece = self.unsent(tokenizer, tokens)?;
        if piece.ends_with('\u{FFFD}') {
            return None; // A character is cut in two: wait for the rest of it.
        }
        self.start = self.sent;
        self.sent = tokens.len();
        Some(piece)
    }

    /// Whatever text is still held when generation ends.
    pub fn finish(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) -> Option<String> {
        let piece = self.unsent(tokenizer, tokens)?;
        self.sent = tokens.len();
        Some(piece)
    }

    fn unsent(&self, tokenizer: &Tokenizer, tokens: &[u32]) -> Option<String> {
        let sent = tokenizer
            .decode(&tokens[self.start..self.sent], true)
            .ok()?;
        let all = tokenizer.decode(&tokens[self.start..], true).ok()?;
        all.get(sent.len()..)
            .filter(|piece| !piece.is_empty())
            .map(str::to_owned)
    }
}

const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tokenizer of the model at `path`, for tests of text streaming.
pub fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<Tokenizer> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    tokenizer(&content)
}
