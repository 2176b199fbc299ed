//! Requests whose cost is not where it seems: token counts and megabyte translations on the
//! async workers, reservations that miss what goes upstream, usage an upstream invents,
//! and what errors and logs give away.

use serde_json::{Value, json};

use super::{unslowed, victim_under};
use crate::startup::Running;
use crate::support::{FakeUpstream, TestApp};

/// 900 KB of tool schemas: about 150,000 tokens.
fn big_tools() -> Value {
    let properties: serde_json::Map<String, Value> = (0..9_000)
        .map(|i| (format!("field_{i}"), json!({"type": "string", "description": "a value the tool needs to do its work well"})))
        .collect();
    json!([{"name": "lookup", "description": "Looks things up.",
        "input_schema": {"type": "object", "properties": properties}}])
}

#[tokio::test]
async fn count_tokens_is_a_request_like_any_other() {
    // M5: admitted and counted against the request rate...
    let app = TestApp::spawn_with(|c| c.rpm = 2).await;
    let body = json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]});
    for _ in 0..2 {
        let response = app.post("/v1/messages/count_tokens", &body).await;
        assert_eq!(response.status(), 200);
    }
    let refused = app.post("/v1/messages/count_tokens", &body).await;
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.expect("JSON");
    assert_eq!(error["type"], "error", "Anthropic's shape: {error}");
    assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");

    // ...and every part of it is counted, tools included.
    let app = TestApp::spawn().await;
    let counted = app
        .post_json(
            "/v1/messages/count_tokens",
            &json!({"model": "mock", "tools": big_tools(),
                "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    let tokens = counted["input_tokens"].as_u64().expect("a count");
    assert!(tokens > 100_000, "{counted}");
}

#[tokio::test]
async fn megabyte_token_counts_and_translations_do_not_slow_a_victim() {
    // M5: tools counted off the async workers.
    let attack = json!({"model": "mock", "tools": big_tools(),
        "messages": [{"role": "user", "content": "Hi"}]})
    .to_string();
    let (quiet, loaded, sent) = victim_under("/v1/messages/count_tokens", attack).await;
    eprintln!(
        "count_tokens of 900 KB of tools: victim p50 quiet {quiet:?}, under attack {loaded:?} ({sent} attack requests)"
    );
    assert!(
        unslowed(quiet, loaded),
        "quiet {quiet:?}, under attack {loaded:?}"
    );
    // L6: a 1 MiB Responses request translated off the async workers.
    let items: Vec<Value> = (0..2_500)
        .map(|i| {
            json!({"role": if i % 2 == 0 { "user" } else { "assistant" },
            "content": [{"type": "input_text", "text": "z".repeat(300)}]})
        })
        .collect();
    let attack = json!({"model": "mock", "max_output_tokens": 1, "input": items}).to_string();
    assert!(attack.len() > 900_000 && attack.len() < 1024 * 1024);
    let (quiet, loaded, sent) = victim_under("/v1/responses", attack).await;
    eprintln!(
        "1 MiB Responses requests: victim p50 quiet {quiet:?}, under attack {loaded:?} ({sent} attack requests)"
    );
    assert!(
        unslowed(quiet, loaded),
        "quiet {quiet:?}, under attack {loaded:?}"
    );
}

#[tokio::test]
async fn the_token_reservation_covers_everything_sent_upstream() {
    // M6: under 1,000 tokens a minute, none of these may go through.
    let app = TestApp::spawn_with(|c| c.tpm = Some(1_000)).await;
    let chat_tools: Vec<Value> = (0..2_500)
        .map(|i| {
            json!({"type": "function", "function": {"name": format!("tool_{i}"),
            "description": "x".repeat(250), "parameters": {"type": "object"}}})
        })
        .collect();
    let image = format!("data:image/png;base64,{}", "A".repeat(800_000));
    let schema: serde_json::Map<String, Value> = (0..10_000)
        .map(|i| {
            (
                format!("f{i}"),
                json!({"type": "string", "description": "a field of the answer"}),
            )
        })
        .collect();
    let requests = [
        (
            "tools",
            json!({"model": "mock", "max_tokens": 5, "tools": chat_tools,
            "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "an image",
            json!({"model": "mock", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                {"type": "image_url", "image_url": {"url": image}}]}]}),
        ),
        (
            "a schema",
            json!({"model": "mock", "max_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer",
                "schema": {"type": "object", "properties": schema}}},
            "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    ];
    for (what, body) in requests {
        let size = body.to_string().len();
        let response = app.post("/v1/chat/completions", &body).await;
        let status = response.status().as_u16();
        let error: Value = response.json().await.expect("JSON");
        eprintln!(
            "{size} bytes of {what} under a TPM of 1,000: {status} {}",
            error["error"]["message"]
        );
        assert!(matches!(status, 400 | 429), "{what} went through: {error}");
    }
    // An ordinary request still fits.
    let fine = app
        .post(
            "/v1/chat/completions",
            &json!({"model": "mock", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(fine.status(), 200);
}

#[tokio::test]
async fn usage_an_upstream_reports_is_held_to_what_it_was_sent() {
    // L4: `prompt_tokens: 4294967295` must not lock the client out for days.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| c.tpm = Some(20_000)).await;
    let body = json!({"model": "huge-usage", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]});
    let reply = app.post("/v1/chat/completions", &body).await;
    assert_eq!(reply.status(), 200);
    reply.bytes().await.expect("the reply");
    let next = app.post("/v1/chat/completions", &body).await;
    let wait = next
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    eprintln!(
        "after a reported prompt of 4294967295 tokens: {} (retry after {wait} s)",
        next.status()
    );
    assert!(wait <= 120, "locked out for {wait} s");
}

#[tokio::test]
async fn errors_name_what_was_sent_plainly() {
    // L7: no Rust `Debug` text in a message.
    let app = TestApp::spawn().await;
    let error = app
        .post_json(
            "/v1/responses",
            &json!({"model": "mock", "input": "Hi", "tools": [{"type": "web_search"}],
                "tool_choice": {"type": "web_search"}}),
        )
        .await;
    let message = error["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains("`web_search`") && !message.contains("Some("),
        "{message}"
    );
    let error = app
        .post_json(
            "/v1/messages",
            &json!({"model": "mock", "max_tokens": 5,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                "tool_choice": {"type": "tool", "name": "web_search"},
                "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    let message = error["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains("web_search_20250305") && !message.contains("Some("),
        "{message}"
    );
    let error = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "mock", "messages": [{"role": "robot", "content": "Hi"}]}),
        )
        .await;
    let message = error["error"]["message"].as_str().expect("a message");
    assert!(
        !message.contains('"') && message.contains("`robot`"),
        "{message}"
    );
    // A cursor past a finished stream is named as the client sent it.
    let done = app
        .post_json("/v1/responses", &json!({"model": "mock", "input": "Hi"}))
        .await;
    let id = done["id"].as_str().expect("an id");
    let error = app
        .get_json(&format!(
            "/v1/responses/{id}?stream=true&starting_after=9999"
        ))
        .await;
    assert_eq!(error["error"]["param"], "starting_after", "{error}");
    let message = error["error"]["message"].as_str().expect("a message");
    assert!(message.contains("`starting_after` 9999"), "{message}");
}

#[tokio::test]
async fn a_stream_id_is_logged_only_once_its_owner_is_known() {
    // L5: a 401 for a stream's path logs the route, never the id.
    let sluice = Running::start(&[
        ("SLUICE_LOG", "json"),
        ("SLUICE_API_KEYS", "sk-owner"),
        ("SLUICE_MOCK_TOKENS_PER_S", "0"),
    ]);
    let http = reqwest::Client::new();
    let secret = "chat-0123456789abcdef0123456789abcdef";
    let refused = http
        .get(sluice.url(&format!("/api/chat/{secret}")))
        .header("x-request-id", "log-l5-1")
        .send()
        .await
        .expect("answers");
    assert_eq!(refused.status(), 401);
    let seen = std::cell::RefCell::new(Vec::new());
    let line = sluice
        .line(|l| {
            seen.borrow_mut().push(l.to_owned());
            l.contains("log-l5-1") && l.contains("\"status\":401")
        })
        .expect("a log line for the 401");
    assert!(line.contains("/api/chat/{id}"), "{line}");
    for logged in seen.borrow().iter() {
        assert!(!logged.contains(secret), "the id was logged: {logged}");
    }
}
