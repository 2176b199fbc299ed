//! Golden tests of every pair: each recorded upstream stream (`tests/fixtures/*.sse`) read
//! by its API's upstream reader into the pivot's events, and those events written by every
//! client API's encoder. What each step gives is kept in `tests/fixtures/golden/`
//! (`<fixture>.events`, `<fixture>.<client>.sse`), ids sluice draws at random written as
//! `<random>`; `SLUICE_BLESS=1 cargo test golden` writes them anew, for review as a diff.

use std::path::PathBuf;

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
