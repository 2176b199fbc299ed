//! Golden tests of every pair of client API and upstream API, both ways:
//! - replies: each recorded upstream stream (`tests/fixtures/*.sse`) read by its API's
//!   upstream role into the pivot's events, and those events written by every client API's
//!   encoder (`golden/<fixture>.events`, `golden/<fixture>.<client>.sse`);
//! - requests: each client API's request (`tests/fixtures/requests/<client>.json`) parsed by
//!   its client role and written by every upstream role as its call, with what was left
//!   out and named (`golden/<client>-to-<upstream>.request`).
//!
//! Ids sluice draws at random are written as `<random>`; `SLUICE_BLESS=1 cargo test golden`
//! writes the files anew, for review as a diff.

use std::path::PathBuf;

use crate::backend::ModelRequest;
use crate::backend::speaker::read_recorded;
use crate::backend::{Delta, Usage};
use crate::error::ApiError;
use crate::relay::{Completion, Encoder, End, Out};

/// The fixtures and the API each is in (as a route names it).
const FIXTURES: [(&str, &str); 3] = [
    ("anthropic-thinking", "anthropic"),
    ("responses-reasoning", "responses"),
    ("chat-annotations", "chat"),
];

const END: End = End {
    usage: Usage {
        prompt_tokens: 11,
        completion_tokens: 7,
        total_tokens: 18,
    },
    cost: None,
    first_token: None,
    duration: std::time::Duration::from_millis(9),
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The `data` of each event of a fixture.
fn recorded(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir().join(format!("{name}.sse"))).unwrap_or_default();
    text.split("\n\n")
        .map(|event| {
            event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|data| !data.is_empty())
        .collect()
}

/// A client API's encoder over `deltas`, ended as the stream ended: its SSE text.
fn encode(encoder: &mut impl Encoder, deltas: &[Delta], failure: Option<&ApiError>) -> String {
    let mut out = Out::new();
    encoder.open(&mut out);
    for delta in deltas {
        encoder.event(delta.clone(), &mut out);
    }
    match failure {
        Some(error) => encoder.fail(error, &mut out),
        None => encoder.end(&END, &mut out),
    }
    out.take()
        .map(|e| String::from_utf8_lossy(&e).into_owned())
        .collect()
}

/// What every client is sent for `deltas`.
fn clients(deltas: &[Delta], failure: Option<&ApiError>) -> Vec<(&'static str, String)> {
    let completion = || Completion {
        token: "1".into(),
        created: 1,
        model: "m".into(),
    };
    let responses = super::responses::Meta {
        id: "resp_1".into(),
        created_at: 1,
        model: "m".into(),
        echo: serde_json::Map::new(),
        background: false,
        namespaces: Vec::new(),
    };
    let anthropic = super::anthropic::Meta {
        id: "msg_1".into(),
        model: "m".into(),
    };
    vec![
        (
            "chat",
            encode(
                &mut super::completions::Encoder::new(completion(), true),
                deltas,
                failure,
            ),
        ),
        (
            "responses",
            encode(
                &mut super::responses::Encoder::new(responses),
                deltas,
                failure,
            ),
        ),
        (
            "anthropic",
            encode(
                &mut super::anthropic::Encoder::new(anthropic, 11),
                deltas,
                failure,
            ),
        ),
        (
            "sluice",
            encode(
                &mut super::sluice::Encoder::new(completion()),
                deltas,
                failure,
            ),
        ),
    ]
}

/// Ids sluice draws at random, as `<random>`.
fn settled(text: &str) -> String {
    let random =
        regex::Regex::new(r"(toolu|fc|call|rs|msg)_[0-9a-f]{32}").unwrap_or_else(|e| panic!("{e}"));
    random.replace_all(text, "${1}_<random>").into_owned()
}

/// Compares `got` with golden file `name`, or writes it under `SLUICE_BLESS=1`.
fn golden(name: &str, got: &str, differ: &mut Vec<String>) {
    let path = dir().join("golden").join(name);
    if std::env::var_os("SLUICE_BLESS").is_some() {
        let _ = std::fs::create_dir_all(dir().join("golden"));
        let _ = std::fs::write(&path, got);
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want != got {
        differ.push(format!("{name}:\n--- want\n{want}\n--- got\n{got}"));
    }
}

#[test]
fn every_recorded_stream_through_every_client_api_is_as_golden() {
    let mut differ = Vec::new();
    for (name, api) in FIXTURES {
        let data = recorded(name);
        assert!(!data.is_empty(), "tests/fixtures/{name}.sse");
        let (deltas, error) = read_recorded(&*super::speaker(api, "http://upstream"), &data);
        let mut events: String = deltas.iter().map(|d| format!("{d:?}\n")).collect();
        if let Some(error) = &error {
            events.push_str(&format!("ended by: {error}\n"));
        }
        golden(&format!("{name}.events"), &events, &mut differ);
        let failure = error.map(ApiError::from);
        for (client, sse) in clients(&deltas, failure.as_ref()) {
            golden(&format!("{name}.{client}.sse"), &settled(&sse), &mut differ);
        }
    }
    assert!(
        differ.is_empty(),
        "{} golden files differ (SLUICE_BLESS=1 writes them):\n{}",
        differ.len(),
        differ.join("\n")
    );
}

/// A client API's request fixture, parsed by its client role.
fn parsed(client: &str) -> super::ClientRequest {
    let path = dir().join("requests").join(format!("{client}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let size = text.len();
    let parsed = match client {
        "chat" => super::completions::request::parse(body, size).map(|(c, _)| c),
        "anthropic" => super::anthropic::request::parse(body, size, None, None).map(|(c, _)| c),
        _ => crate::http::typed(&mut body).and_then(|fields| {
            super::responses::request::request(fields, body, Vec::new(), size, false)
                .map(|r| r.chat)
        }),
    };
    parsed.unwrap_or_else(|e| panic!("{client}.json is refused: {e}"))
}

#[test]
fn every_client_request_through_every_upstream_api_is_as_golden() {
    let mut differ = Vec::new();
    for client in ["chat", "anthropic", "responses"] {
        for upstream in ["chat", "anthropic", "responses"] {
            let chat = parsed(client);
            let speaker = super::speaker(upstream, "http://upstream");
            let target = crate::backend::openai::OpenAiBackend::new(
                "http://upstream",
                None,
                std::time::Duration::from_secs(1),
                speaker.clone(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let mut request = ModelRequest {
                model: "upstream-model".into(),
                messages: chat.messages,
                max_tokens: chat.max_tokens,
                temperature: chat.temperature,
                top_p: chat.top_p,
                seed: chat.seed,
                body: chat.body,
                native: chat.native,
                dropped: chat.dropped,
                ..ModelRequest::default()
            };
            // As dispatch decides it for the target: relayed as sent, or translated and
            // what was left out named.
            let dropped = crate::dispatch::verdict(&mut request, &target);
            let mut headers = Vec::new();
            let body = speaker.body(request, &mut headers);
            let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let mut text = format!("POST {}\n", speaker.path());
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
            }
            text.push_str(&format!("x-sluice-dropped: {}\n\n", dropped.join(",")));
            text.push_str(&serde_json::to_string_pretty(&body).unwrap_or_default());
            text.push('\n');
            golden(
                &format!("{client}-to-{upstream}.request"),
                &settled(&text),
                &mut differ,
            );
        }
    }
    assert!(
        differ.is_empty(),
        "{} golden files differ (SLUICE_BLESS=1 writes them):\n{}",
        differ.len(),
        differ.join("\n")
    );
}
