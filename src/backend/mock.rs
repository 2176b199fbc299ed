//! The built-in `mock` model: deterministic replies derived from the prompt (or scripted by a
//! fixtures file), paced like a real model, with failure modes selected by model name.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use regex::Regex;
use serde::Deserialize;

use super::{Backend, BackendError, ChatRequest, Delta, DeltaStream, Text, Usage};

/// How the mock behaves, chosen by the model name a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `mock`: a complete reply.
    Normal,
    /// `mock-error-before`: fails before its first token.
    ErrorBefore,
    /// `mock-error-after`: fails after a few tokens.
    ErrorAfter,
    /// `mock-hang`: never sends anything.
    Hang,
    /// `mock-stall`: sends one token, then nothing.
    Stall,
}

impl Mode {
    pub const MODEL_NAMES: [&'static str; 5] = [
        "mock",
        "mock-error-before",
        "mock-error-after",
        "mock-hang",
        "mock-stall",
    ];

    pub fn from_model(model: &str) -> Option<Mode> {
        Some(match model {
            "mock" => Mode::Normal,
            "mock-error-before" => Mode::ErrorBefore,
            "mock-error-after" => Mode::ErrorAfter,
            "mock-hang" => Mode::Hang,
            "mock-stall" => Mode::Stall,
            _ => return None,
        })
    }
}

/// How many tokens `mock-error-after` sends before it fails.
const TOKENS_BEFORE_ERROR: usize = 5;
/// Reply length when the request sets no `max_tokens`.
const DEFAULT_REPLY_WORDS: usize = 40;

/// A scripted reply: when `pattern` matches the last user message, answer `reply`.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub pattern: Regex,
    pub reply: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    #[serde(default)]
    reply: Vec<FixtureEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureEntry {
    pattern: String,
    reply: String,
}

/// Reads a fixtures file: `[[reply]]` tables of `pattern` (a regex) and `reply`.
pub fn load_fixtures(path: &Path) -> anyhow::Result<Vec<Fixture>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read mock fixtures {}", path.display()))?;
    let file: FixtureFile = toml::from_str(&text)
        .with_context(|| format!("mock fixtures {} are not valid", path.display()))?;
    file.reply
        .into_iter()
        .map(|entry| {
            let pattern = Regex::new(&entry.pattern).with_context(|| {
                format!(
                    "mock fixtures {}: bad pattern {:?}",
                    path.display(),
                    entry.pattern
                )
            })?;
            Ok(Fixture {
                pattern,
                reply: entry.reply,
            })
        })
        .collect()
}

pub struct MockBackend {
    /// Time between tokens; zero sends them as fast as the client reads.
    interval: Duration,
    fixtures: Vec<Fixture>,
    /// Counts every token generated, so a cancelled request can be seen to stop.
    generated: metrics::Counter,
}

impl MockBackend {
    pub fn new(tokens_per_s: f64, fixtures: Vec<Fixture>, generated: metrics::Counter) -> Self {
        let interval = if tokens_per_s > 0.0 {
            Duration::from_secs_f64(1.0 / tokens_per_s)
        } else {
            Duration::ZERO
        };
        MockBackend {
            interval,
            fixtures,
            generated,
        }
    }

    /// The whole reply for a request, before `max_tokens` cuts it.
    fn reply(&self, request: &ChatRequest) -> String {
        let prompt = request.last_user_text();
        if let Some(fixture) = self.fixtures.iter().find(|f| f.pattern.is_match(prompt)) {
            return fixture.reply.clone();
        }
        generated_reply(prompt)
    }
}

/// A reply that depends only on the prompt: an echo of it, then words picked by its hash.
fn generated_reply(prompt: &str) -> String {
    const WORDS: [&str; 24] = [
        "stream", "token", "river", "gate", "flows", "quietly", "through", "the", "sluice", "and",
        "every", "chunk", "arrives", "in", "order", "while", "clients", "read", "each", "word",
        "as", "it", "is", "written",
    ];
    let echo: Vec<&str> = prompt.split_whitespace().take(8).collect();
    let mut text = if echo.is_empty() {
        String::from("Hello from the sluice mock model.")
    } else {
        format!("You said: {}.", echo.join(" "))
    };
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    let mut state = prompt.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let already = text.split(' ').count();
    for _ in already..DEFAULT_REPLY_WORDS {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        text.push(' ');
        text.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
    }
    text.push('.');
    text
}

/// Splits text into tokens the way a BPE model streams words: each after the first
/// carries its leading space.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, word) in text.split(' ').enumerate() {
        if i == 0 {
            if !word.is_empty() {
                out.push(word.to_owned());
            }
        } else {
            out.push(format!(" {word}"));
        }
    }
    out
}

impl Backend for MockBackend {
    fn stream(&self, request: ChatRequest) -> DeltaStream {
        let Some(mode) = Mode::from_model(&request.model) else {
            let message = format!("the mock backend has no model {}", request.model);
            return futures::stream::iter([Err(BackendError::Protocol(message))]).boxed();
        };
        let mut tokens = tokens(&self.reply(&request));
        let limit = request.max_tokens.map_or(usize::MAX, |n| n as usize);
        let finish = if tokens.len() > limit {
            tokens.truncate(limit);
            "length"
        } else {
            "stop"
        };
        let prompt_tokens = request.prompt_tokens;
        let interval = self.interval;
        let generated = self.generated.clone();
        Box::pin(async_stream::stream! {
            match mode {
                Mode::ErrorBefore => {
                    yield Err(BackendError::Unreachable(
                        "mock-error-before: the mock upstream failed before its first token".into(),
                    ));
                    return;
                }
                Mode::Hang => {
                    futures::future::pending::<()>().await;
                }
                _ => {}
            }
            let mut ticks = tokio::time::interval(interval.max(Duration::from_nanos(1)));
            let count = tokens.len() as u32;
            for (i, token) in tokens.into_iter().enumerate() {
                if mode == Mode::ErrorAfter && i == TOKENS_BEFORE_ERROR {
                    yield Err(BackendError::Interrupted(format!(
                        "mock-error-after: the mock upstream failed after {i} tokens"
                    )));
                    return;
                }
                if mode == Mode::Stall && i == 1 {
                    futures::future::pending::<()>().await;
                }
                if !interval.is_zero() {
                    ticks.tick().await;
                }
                generated.increment(1);
                yield Ok(Delta::Text(Text::plain(&token)));
            }
            yield Ok(Delta::Finish(finish.to_owned()));
            yield Ok(Delta::Usage(Usage::new(prompt_tokens, count)));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_deterministic_and_prompt_dependent() {
        let a = generated_reply("What is the capital of France?");
        assert_eq!(a, generated_reply("What is the capital of France?"));
        assert_ne!(a, generated_reply("Tell me a story"));
        assert!(a.starts_with("You said: What is the capital of France?."));
    }

    #[test]
    fn tokens_rejoin_to_the_text() {
        let text = "one two  three";
        assert_eq!(tokens(text).concat(), text);
        assert_eq!(tokens(text), ["one", " two", " ", " three"]);
    }
}
