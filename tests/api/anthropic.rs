//! Anthropic's Messages API: the official Python SDK against the mock model, a strict check
//! of the event order when a stream's content changes kind, and raw requests against the
//! fake upstream, which records the chat request each became.

use std::time::Instant;

use eventsource_stream::Event;
use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp, all_events, events, skip_without};

#[tokio::test]
async fn the_python_sdk_uses_the_messages_api_on_the_mock_model() {
    if !crate::support::python_has("anthropic.lib.streaming")
        && skip_without("python3 with the anthropic package")
    {
        return;
    }
    let app = TestApp::spawn_with(|c| c.mock_tokens_per_s = 200.0).await;
    let limited = TestApp::spawn_with(|c| {
        c.mock_tokens_per_s = 200.0;
        c.rpm = 60;
        c.rpm_burst = Some(1);
    })
    .await;
    let stdout = crate::support::python("messages.py", &[&app.url(""), &limited.url("")]).await;
    let found: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let stream = &found["stream"];
    let kinds: Vec<&str> = stream["types"]
        .as_array()
        .expect("types")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(kinds[..2], ["message_start", "content_block_start"]);
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let text = stream["text"].as_str().expect("text");
    assert!(
        text.starts_with("You said: Tell me about rivers."),
        "{text}"
    );
    assert_eq!(stream["stop_reason"], "end_turn");
    let helper = &found["helper"];
    assert_eq!(helper["text"], stream["text"]);
    assert_eq!(helper["final"], stream["text"]);
    assert_eq!(helper["output_tokens"], 40);
    assert!(helper["input_tokens"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(found["plain"]["text"], "You said: Tell");
    assert_eq!(found["plain"]["stop_reason"], "max_tokens");
    assert!(
        found["plain"]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_"))
    );
    assert_eq!(found["tools"]["stop_reason"], "tool_use");
    assert_eq!(found["tools"]["name"], "get_weather");
    assert_eq!(found["tools"]["input"], json!({"city": "mock"}));
    assert_eq!(found["tools"]["answer"], "The tool returned: sunny");
    assert!(found["count"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(found["midstream"], "APIStatusError");
    assert_eq!(found["missing"], "not_found_error");
    // The second request waited out the 429's retry-after (1 s) and then went through.
    let waited = found["retried_after_s"].as_f64().expect("seconds");
    assert!(waited >= 0.9, "retried after {waited} s");
    assert!(
        limited
            .metric("sluice_rate_limited_total{limit=\"client\"}")
            .await
            >= 1.0
    );
}

/// Checks a Messages stream against Anthropic's order: `message_start`, then blocks each
/// opened, given its deltas (of the block's kind) and closed before the next one, then
/// `message_delta` and `message_stop`. Returns the blocks' first deltas.
fn check_order(events: &[Event]) -> Vec<Value> {
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("JSON"))
        .collect();
    for (event, payload) in events.iter().zip(&data) {
        assert_eq!(
            payload["type"],
            json!(event.event),
            "the event name is its type"
        );
    }
    let kinds: Vec<&str> = data.iter().filter_map(|d| d["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"message_start"));
    assert_eq!(kinds[kinds.len() - 2..], ["message_delta", "message_stop"]);
    let mut open: Option<(u64, &str)> = None;
    let mut next = 0;
    let mut firsts = Vec::new();
    let mut fresh = false;
    for d in &data[1..data.len() - 2] {
        match d["type"].as_str().expect("type") {
            "ping" => {}
            "content_block_start" => {
                assert!(open.is_none(), "a block opened inside another: {d}");
                assert_eq!(d["index"], next);
                let kind = d["content_block"]["type"].as_str().expect("block type");
                open = Some((next, kind));
                next += 1;
                fresh = true;
            }
            "content_block_delta" => {
                let (index, kind) = open.expect("a delta outside a block");
                assert_eq!(d["index"], index);
                let expected = match kind {
                    "text" => "text_delta",
                    "tool_use" => "input_json_delta",
                    "thinking" => "thinking_delta",
                    other => panic!("block type {other}"),
                };
                assert_eq!(d["delta"]["type"], expected, "{d}");
                if fresh {
                    firsts.push(d["delta"].clone());
                    fresh = false;
                }
            }
            "content_block_stop" => {
                let (index, _) = open.take().expect("a stop outside a block");
                assert_eq!(d["index"], index);
                assert!(!fresh, "a block with no delta");
            }
            other => panic!("unexpected {other} in {kinds:?}"),
        }
    }
    assert!(open.is_none(), "a block left open");
    firsts
}

#[tokio::test]
async fn a_stream_that_switches_from_text_to_tool_use_keeps_every_first_delta() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let request = json!({"model": "text-then-tools", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "Weather?"}]});
    let stream = all_events(app.post("/v1/messages", &request).await).await;
    let firsts = check_order(&stream);
    assert_eq!(
        firsts,
        [
            json!({"type": "text_delta", "text": "Let me check"}),
            json!({"type": "input_json_delta", "partial_json": "{\"city\""})
        ]
    );
    let data: Vec<Value> = stream
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("JSON"))
        .collect();
    let tool = data
        .iter()
        .find(|d| d["content_block"]["type"] == "tool_use")
        .expect("a tool block");
    assert_eq!(tool["content_block"]["id"], "call_9");
    assert_eq!(tool["content_block"]["name"], "get_weather");
    let end = &data[data.len() - 2];
    assert_eq!(end["delta"]["stop_reason"], "tool_use");
    // Every event carries sluice's id, for a resumable stream.
    let ids: Vec<u64> = stream.iter().map(|e| e.id.parse().expect("id")).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());

    // Thinking, then text.
    let request = json!({"model": "rich", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]});
    let stream = all_events(app.post("/v1/messages", &request).await).await;
    let firsts = check_order(&stream);
    assert_eq!(
        firsts,
        [
            json!({"type": "thinking_delta", "thinking": "thinking"}),
            json!({"type": "text_delta", "text": "Hi"})
        ]
    );

    // Not streamed: the same blocks, assembled.
    let mut request = json!({"model": "text-then-tools", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Weather?"}]});
    let message = app.post_json("/v1/messages", &request).await;
    assert_eq!(message["type"], "message");
    assert_eq!(
        message["content"][0],
        json!({"type": "text", "text": "Let me check the weather."})
    );
    assert_eq!(
        message["content"][1],
        json!({"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {"city": "Paris"}})
    );
    assert_eq!(message["stop_reason"], "tool_use");
    request["model"] = json!("gpt-test");
    let message = app.post_json("/v1/messages", &request).await;
    assert_eq!(message["usage"]["input_tokens"], 11);
    assert_eq!(message["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn a_messages_request_becomes_the_chat_request_the_upstream_takes() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let request = json!({
        "model": "gpt-test",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "text", "text": "Thanks"}]}
        ],
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_k": 5,
        "metadata": {"user_id": "u-1"}
    });
    let reply = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", "anything")
        .header("anthropic-version", "2023-06-01")
        .json(&request)
        .send()
        .await
        .expect("answers");
    assert_eq!(reply.status(), 200);
    let sent = upstream.request(1).await.body;
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "Be brief.\nBe kind."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "toolu_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "user", "content": "Thanks"}
        ])
    );
    assert_eq!(
        sent["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}}])
    );
    assert_eq!(sent["tool_choice"], "required");
    assert_eq!(sent["parallel_tool_calls"], false);
    assert_eq!(sent["stop"], json!(["END"]));
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(sent["temperature"], 0.5);
    assert_eq!(sent["top_k"], 5);
    assert_eq!(sent["user"], "u-1");
}

#[tokio::test]
async fn errors_are_in_anthropics_shape_and_a_dropped_stream_closes_the_upstream() {
    let upstream = FakeUpstream::spawn().await;
    let app =
        TestApp::in_front_of_with(&upstream, |c| c.api_keys = vec!["sk-ant-test".into()]).await;
    let post = |key: &str, body: Value| {
        app.http
            .post(app.url("/v1/messages"))
            .header("x-api-key", key)
            .json(&body)
            .send()
    };
    let hi = json!([{"role": "user", "content": "Hi"}]);
    for (key, body, status, kind) in [
        (
            "wrong",
            json!({"model": "gpt-test", "max_tokens": 5, "messages": hi}),
            401,
            "authentication_error",
        ),
        (
            "sk-ant-test",
            json!({"model": "gpt-test", "messages": hi}),
            400,
            "invalid_request_error",
        ),
        (
            "sk-ant-test",
            json!({"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        (
            "sk-ant-test",
            json!({"model": "status-500", "max_tokens": 5, "messages": hi, "stream": true}),
            502,
            "api_error",
        ),
        (
            "sk-ant-test",
            json!({"model": "status-429", "max_tokens": 5, "messages": hi}),
            429,
            "rate_limit_error",
        ),
    ] {
        let answer = post(key, body.clone()).await.expect("answers");
        assert_eq!(answer.status(), status, "{body}");
        if status == 429 {
            assert!(answer.headers().contains_key("retry-after"));
        }
        let error: Value = answer.json().await.expect("JSON");
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], kind, "{error}");
        assert!(error["error"]["message"].is_string());
        // Anthropic's own wording, which its clients match on.
        if status == 401 {
            assert_eq!(error["error"]["message"], "invalid x-api-key");
        }
    }
    // A name nothing routes (no default upstream here).
    let bare = TestApp::spawn().await;
    let unknown = bare
        .post(
            "/v1/messages",
            &json!({"model": "claude-nothing", "max_tokens": 5, "messages": hi}),
        )
        .await;
    assert_eq!(unknown.status(), 404);
    let error: Value = unknown.json().await.expect("JSON");
    assert_eq!(error["error"]["type"], "not_found_error");
    assert_eq!(error["error"]["message"], "model: claude-nothing");
    // The key as a bearer token works too.
    let ok = app
        .http
        .post(app.url("/v1/messages/count_tokens"))
        .bearer_auth("sk-ant-test")
        .json(&json!({"model": "gpt-test", "messages": hi}))
        .send()
        .await
        .expect("answers");
    let count: Value = ok.json().await.expect("JSON");
    assert!(
        count["input_tokens"].as_u64().is_some_and(|n| n > 0),
        "{count}"
    );

    // A stream the client leaves: the upstream's connection closes.
    let response = post(
        "sk-ant-test",
        json!({"model": "slow", "max_tokens": 500, "messages": hi, "stream": true}),
    )
    .await
    .expect("answers");
    let mut stream = events(response);
    for _ in 0..4 {
        futures::StreamExt::next(&mut stream).await.expect("events");
    }
    let dropped = Instant::now();
    drop(stream);
    let n = upstream.requests().len();
    let closed = upstream.closed(n).await;
    eprintln!(
        "upstream closed {:?} after the drop",
        closed.saturating_duration_since(dropped)
    );
    app.wait_metric("sluice_active_streams", 0.0).await;
}

#[tokio::test]
async fn a_route_that_speaks_the_messages_api_is_relayed_natively() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dir = std::env::temp_dir().join(format!("sluice-anthropic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[models.claude]\nbase_url = \"{base}\"\nmodel = \"claude-up\"\napi = \"anthropic\"\n"
        ),
    )
    .expect("config");
    // The default upstream's key, as Anthropic's header.
    let app = TestApp::in_front_of_with(&upstream, |c| c.config = Some(path)).await;

    let request = json!({"model": "claude", "max_tokens": 50, "stream": true, "thinking": {"type": "disabled"},
        "messages": [{"role": "user", "content": "Hi"}]});
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "fine-grained-tool-streaming-2025-05-14")
        .json(&request)
        .send()
        .await
        .expect("answers");
    // Nothing was left out: the upstream speaks the client's API.
    assert!(response.headers().get("x-sluice-dropped").is_none());
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let stream = all_events(response).await;
    check_order(&stream);
    let data: Vec<Value> = stream
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("JSON"))
        .collect();
    assert_eq!(
        data[0]["message"]["x_vendor"], "kept",
        "the upstream's own field"
    );
    assert_eq!(
        data[0]["message"]["id"],
        json!(id),
        "the message id is sluice's"
    );
    let text: String = data
        .iter()
        .filter_map(|d| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "Hello from claude");
    let seen = upstream.request(1).await;
    assert_eq!(seen.body["model"], "claude-up");
    assert_eq!(
        seen.body["thinking"],
        json!({"type": "disabled"}),
        "the request as sent"
    );
    assert_eq!(
        seen.headers.get("x-api-key").map(String::as_str),
        Some("sk-test-secret-key")
    );
    assert_eq!(
        seen.headers.get("anthropic-version").map(String::as_str),
        Some("2023-06-01")
    );
    assert_eq!(
        seen.headers.get("anthropic-beta").map(String::as_str),
        Some("fine-grained-tool-streaming-2025-05-14")
    );
    app.wait_metric("sluice_completion_tokens_total{model=\"claude\"}", 3.0)
        .await;

    // An OpenAI client on the same route: the events read as chat.
    let chat = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "claude", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(
        chat["choices"][0]["message"]["content"], "Hello from claude",
        "{chat}"
    );
    assert_eq!(chat["usage"]["prompt_tokens"], 9);
    let sent = upstream.request(2).await.body;
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["messages"], json!([{"role": "user", "content": "Hi"}]));
    assert_eq!(sent["max_tokens"], 4096);
}

#[tokio::test]
async fn a_resumable_messages_stream_resumes_with_last_event_id() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-sluice-resumable", "true")
        .json(&json!({"model": "paced", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.headers()["x-sluice-resumable"], "true");
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert!(id.starts_with("msg_"));
    let mut stream = events(response);
    let mut first = Vec::new();
    while first.len() < 6 {
        first.push(
            futures::StreamExt::next(&mut stream)
                .await
                .expect("an event"),
        );
    }
    drop(stream);
    let rest = app
        .http
        .get(app.url(&format!("/v1/messages/{id}")))
        .header("last-event-id", "6")
        .send()
        .await
        .expect("answers");
    let mut all = first;
    all.extend(all_events(rest).await);
    check_order(&all);
    let text: String = all
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .filter_map(|d| d["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, crate::support::paced_reply());
    assert_eq!(upstream.requests().len(), 1);
    // Unknown: Anthropic's 404.
    let gone = app
        .http
        .get(app.url("/v1/messages/msg_nope"))
        .send()
        .await
        .expect("answers");
    assert_eq!(gone.status(), 404);
    let body: Value = gone.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn claude_code_s_requests_are_accepted_and_what_a_chat_upstream_cannot_take_is_named() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    // As Claude Code sends it: betas in the query and a header, thinking, context
    // management, cache hints, a server tool, signed thinking in the history, and a
    // system message mid-conversation.
    let request = json!({"model": "gpt-test", "max_tokens": 32000, "stream": true,
    "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
    "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "tools": [{"name": "Bash", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "sig"},
            {"type": "text", "text": "Hello."}]},
        {"role": "system", "content": "The user prefers French."},
        {"role": "user", "content": [{"type": "text", "text": "Again", "cache_control": {"type": "ephemeral"}}]},
    ]});
    let answer = app
        .http
        .post(app.url("/v1/messages?beta=true"))
        .header(
            "anthropic-beta",
            "claude-code-20250219,interleaved-thinking-2025-05-14",
        )
        .json(&request)
        .send()
        .await
        .expect("answers");
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["x-sluice-dropped"],
        "thinking,cache_control,context_management,output_config,web_search_20250305"
    );
    all_events(answer).await;
    // Counted by name for the operator, not logged as a warning.
    assert_eq!(
        app.metric("sluice_dropped_fields_total{field=\"thinking\"}")
            .await,
        1.0
    );
    let sent = upstream.request(1).await.body;
    let roles: Vec<&str> = sent["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "system", "user"]);
    assert_eq!(sent["messages"][3]["content"], "The user prefers French.");
    assert_eq!(sent["tools"].as_array().map(Vec::len), Some(1));
    // Forcing the server tool a chat upstream cannot run is refused, in Anthropic's shape.
    let mut forced = request.clone();
    forced["tool_choice"] = json!({"type": "tool", "name": "web_search"});
    let refused = app.post("/v1/messages", &forced).await;
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.expect("JSON");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    // Claude Code checks the gateway with `HEAD /` first.
    let head = app.http.head(app.url("/")).send().await.expect("answers");
    assert!(head.status().is_success());
}

/// `x-sluice-dropped` names what the target that served could not carry, not what the
/// route's first target could: an Anthropic client's `thinking` is named when a chat
/// fallback serves it, and not when an Anthropic fallback relays it as sent.
#[tokio::test]
async fn what_was_left_out_is_named_for_the_target_that_served() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dead = format!("http://127.0.0.1:{}/v1", crate::support::free_port());
    let config = crate::support::config_file(&format!(
        r#"
[models.to-chat]
base_url = "{dead}"
model = "claude-up"
api = "anthropic"
fallbacks = [{{ base_url = "{base}", model = "gpt-test" }}]

[models.to-anthropic]
base_url = "{dead}"
model = "gpt-test"
fallbacks = [{{ base_url = "{base}", model = "claude-up", api = "anthropic" }}]
"#
    ));
    let app = TestApp::in_front_of_with(&upstream, |c| c.config = Some(config)).await;
    for (model, named) in [("to-chat", Some("thinking")), ("to-anthropic", None)] {
        let request = json!({"model": model, "max_tokens": 50, "stream": true,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "Hi"}]});
        let answer = app
            .http
            .post(app.url("/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .json(&request)
            .send()
            .await
            .expect("answers");
        assert_eq!(answer.status(), 200, "{model}");
        let header = answer
            .headers()
            .get("x-sluice-dropped")
            .map(|v| v.to_str().expect("ascii").to_owned());
        assert_eq!(header.as_deref(), named, "{model}");
        all_events(answer).await;
    }
    // The chat fallback was sent a chat request, the Anthropic one the request as sent.
    let sent = upstream.requests();
    assert!(sent[0].body.get("messages").is_some() && sent[0].body.get("thinking").is_none());
    assert_eq!(sent[1].body["thinking"]["type"], "enabled");
}
