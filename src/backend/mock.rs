//! The built-in `mock` model: deterministic replies derived from the prompt (or scripted by a
//! fixtures file), paced like a real model, with failure modes selected by model name.
//!
//! With function `tools` (and `tool_choice` other than `none`) it calls one, so tool flows
//! can be tested without an upstream: a fixture with `tool` (and `arguments`) whose pattern
//! matches the last user message, else the tool `tool_choice` names, else (with
//! `tool_choice: "required"`) the first tool, else the first tool whose name appears in
//! the message outside `<system-reminder>` blocks, unless a fixture scripts a reply for it.
//! Its arguments are the fixture's, or one value per required parameter (`"mock"`, `1`,
//! `true`, `[]`, `{}` by JSON type). It calls at most one tool a user turn: after the result
//! it answers `The tool returned: <result>`, so an agent's loop ends. A `stop` sequence cuts
//! the reply before it.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use regex::Regex;
use serde::Deserialize;

use serde_json::{Value, json};

use super::{
    Backend, BackendError, Delta, DeltaStream, Finish, Message, ModelRequest, Text, ToolCall, Usage,
};

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
    /// A function to call instead of replying, with these arguments (JSON).
    pub tool: Option<(String, String)>,
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
    #[serde(default)]
    reply: String,
    tool: Option<String>,
    arguments: Option<String>,
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
            let tool = entry
                .tool
                .map(|name| (name, entry.arguments.unwrap_or_else(|| "{}".into())));
            Ok(Fixture {
                pattern,
                reply: entry.reply,
                tool,
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
    fn reply(&self, request: &ModelRequest) -> String {
        if let Some(result) = tool_result_this_turn(&request.messages) {
            return format!("The tool returned: {result}");
        }
        // What the user wrote, not what an agent reminds the model of.
        let said = without_reminders(request.last_user_text());
        let prompt = said.trim();
        if let Some(fixture) = self.fixtures.iter().find(|f| f.pattern.is_match(prompt)) {
            return fixture.reply.clone();
        }
        generated_reply(prompt)
    }

    /// The function call the request gets instead of text, if any: name and arguments.
    fn tool_call(&self, request: &ModelRequest) -> Option<(String, String)> {
        let tools = request.body.get("tools")?.as_array()?;
        let choice = request.body.get("tool_choice");
        // One call a user turn: after its result the mock answers in text, so an agent's
        // loop ends.
        if choice.is_some_and(|c| c == "none") || tool_result_this_turn(&request.messages).is_some()
        {
            return None;
        }
        let said = without_reminders(request.last_user_text());
        let prompt = said.trim();
        let named = |name: &str| {
            tools
                .iter()
                .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
        };
        if let Some((name, arguments)) = self
            .fixtures
            .iter()
            .find(|f| f.tool.is_some() && f.pattern.is_match(prompt))
            .and_then(|f| f.tool.clone())
        {
            return Some((name, arguments));
        }
        let tool = match choice {
            Some(Value::Object(c)) => c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .and_then(named),
            Some(c) if c == "required" => tools.first(),
            // A scripted reply for the prompt wins over naming a tool.
            _ if self.fixtures.iter().any(|f| f.pattern.is_match(prompt)) => None,
            _ => tools.iter().find(|t| {
                t.pointer("/function/name")
                    .and_then(Value::as_str)
                    .is_some_and(|name| !name.is_empty() && prompt.contains(name))
            }),
        }?;
        let name = tool.pointer("/function/name")?.as_str()?.to_owned();
        let parameters = tool.pointer("/function/parameters");
        let mut arguments = serde_json::Map::new();
        for required in parameters
            .and_then(|p| p.get("required"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let kind = parameters
                .and_then(|p| p.pointer(&format!("/properties/{required}/type")))
                .and_then(Value::as_str);
            let value = match kind {
                Some("number" | "integer") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("mock"),
            };
            arguments.insert(required.to_owned(), value);
        }
        Some((name, Value::Object(arguments).to_string()))
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

/// The result of a tool called in the current user turn, if one was: the turn is the
/// messages since the last user message that is not a tool result's companion (Anthropic's
/// clients put text beside a `tool_result`, which arrives as a user message after it).
fn tool_result_this_turn(messages: &[Message]) -> Option<&str> {
    for (i, m) in messages.iter().enumerate().rev() {
        match m.role.as_str() {
            "tool" => return Some(&m.content),
            "user" if i == 0 || messages[i - 1].role != "tool" => return None,
            _ => {}
        }
    }
    None
}

/// `text` without its `<system-reminder>…</system-reminder>` blocks (what agents such as
/// Claude Code add to a user's turn, naming every tool they have).
fn without_reminders(text: &str) -> std::borrow::Cow<'_, str> {
    const OPEN: &str = "<system-reminder>";
    const CLOSE: &str = "</system-reminder>";
    if !text.contains(OPEN) {
        return text.into();
    }
    let mut said = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        said.push_str(&rest[..start]);
        rest = match rest[start..].find(CLOSE) {
            Some(end) => &rest[start + end + CLOSE.len()..],
            None => "",
        };
    }
    said.push_str(rest);
    said.into()
}

impl Backend for MockBackend {
    fn stream(&self, request: ModelRequest) -> DeltaStream {
        let Some(mode) = Mode::from_model(&request.model) else {
            let message = format!("the mock backend has no model {}", request.model);
            return futures::stream::iter([Err(BackendError::Protocol(message))]).boxed();
        };
        if let Some((name, arguments)) = self.tool_call(&request) {
            return tool_call_stream(
                &name,
                &arguments,
                request.prompt_tokens,
                self.generated.clone(),
            );
        }
        let mut reply = self.reply(&request);
        for stop in stop_sequences(&request) {
            if let Some(at) = reply.find(&stop) {
                reply.truncate(at);
            }
        }
        let mut tokens = tokens(&reply);
        let limit = request.max_tokens.map_or(usize::MAX, |n| n as usize);
        let finish = if tokens.len() > limit {
            tokens.truncate(limit);
            Finish::Length
        } else {
            Finish::Stop
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
            yield Ok(Delta::Finish(finish));
            yield Ok(Delta::Usage(Usage::new(prompt_tokens, count)));
        })
    }
}

/// The request's `stop` sequences (a string or a list of them).
fn stop_sequences(request: &ModelRequest) -> Vec<String> {
    match request.body.get("stop") {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// A function call streamed as an upstream would: the call's name and id, its arguments in
/// two pieces, then `finish_reason: tool_calls`.
fn tool_call_stream(
    name: &str,
    arguments: &str,
    prompt_tokens: u32,
    generated: metrics::Counter,
) -> DeltaStream {
    // FNV-1a of the call: the same request calls with the same id.
    let hash = format!("{name}{arguments}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let piece = |id: Option<String>, name: Option<String>, arguments: &str| {
        Delta::ToolCall(ToolCall {
            index: 0,
            id,
            name,
            arguments: Text::plain(arguments),
        })
    };
    let split = arguments
        .char_indices()
        .map(|(i, _)| i)
        .nth(arguments.chars().count() / 2)
        .unwrap_or(arguments.len());
    let mut deltas = vec![piece(
        Some(format!("call_{hash:016x}")),
        Some(name.to_owned()),
        "",
    )];
    for part in [&arguments[..split], &arguments[split..]] {
        if !part.is_empty() {
            deltas.push(piece(None, None, part));
        }
    }
    let count = deltas.len() as u32;
    generated.increment(u64::from(count));
    let events: Vec<Result<Delta, BackendError>> = deltas
        .into_iter()
        .chain([
            Delta::Finish(Finish::ToolUse),
            Delta::Usage(Usage::new(prompt_tokens, count)),
        ])
        .map(Ok)
        .collect();
    futures::stream::iter(events).boxed()
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
    fn reminders_are_not_what_the_user_said() {
        let text = "a <system-reminder>tools: Bash</system-reminder>b<system-reminder>x";
        assert_eq!(without_reminders(text), "a b");
        assert_eq!(without_reminders("plain"), "plain");
    }

    #[test]
    fn a_turn_has_used_its_tool_once_a_result_came() {
        let m = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(tool_result_this_turn(&[m("user", "run it")]), None);
        let turn = [
            m("user", "run it"),
            m("assistant", ""),
            m("tool", "42"),
            m("user", "<system-reminder>…"),
        ];
        assert_eq!(tool_result_this_turn(&turn), Some("42"));
        let next = [
            m("user", "run it"),
            m("assistant", ""),
            m("tool", "42"),
            m("assistant", "42"),
            m("user", "again"),
        ];
        assert_eq!(tool_result_this_turn(&next), None);
    }

    #[test]
    fn tokens_rejoin_to_the_text() {
        let text = "one two  three";
        assert_eq!(tokens(text).concat(), text);
        assert_eq!(tokens(text), ["one", " two", " ", " three"]);
    }
}
