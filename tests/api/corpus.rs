//! The faithful-relay corpus (`tests/fixtures/`): event streams shaped as each API sends
//! them today, served by the fake upstream. Through a route whose upstream speaks the
//! client's own API every event comes out as it went in, byte for byte, but for the id
//! sluice gives the response; through a translating route nothing signed or encrypted
//! vanishes without a word, and what has a counterpart (reasoning, citations) is carried.

use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp};

/// The events of a fixture: each one's name (if any) and `data`, as written.
fn fixture(name: &str) -> Vec<(Option<String>, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.sse"));
    let text = std::fs::read_to_string(path).expect("a fixture");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let mut name = None;
            let mut data = Vec::new();
            for line in event.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            (name, data.join("\n"))
        })
        .collect()
}

/// sluice in front of a fake upstream, with a route for each fixture: `responses`,
/// `anthropic` (routes that speak those APIs) and `chat`.
async fn corpus() -> (FakeUpstream, TestApp) {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dir = std::env::temp_dir().join(format!("sluice-corpus-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[models.responses]\nbase_url = \"{base}\"\nmodel = \"fixture:responses-reasoning\"\napi = \"responses\"\n\n\
             [models.anthropic]\nbase_url = \"{base}\"\nmodel = \"fixture:anthropic-thinking\"\napi = \"anthropic\"\n\n\
             [models.chat]\nbase_url = \"{base}\"\nmodel = \"fixture:chat-annotations\"\n"
        ),
    )
    .expect("config");
    let app = TestApp::in_front_of_with(&upstream, |c| c.config = Some(path)).await;
    (upstream, app)
}

/// Streams `body` from `path`: the raw body, and its events.
async fn stream(
    app: &TestApp,
    path: &str,
    body: &Value,
) -> (String, Vec<(Option<String>, String)>) {
    let response = app.post(path, body).await;
    assert_eq!(response.status(), 200, "{body}");
    let raw = response.text().await.expect("a body");
    let events = raw
        .split("\n\n")
        .filter(|e| e.lines().any(|l| l.starts_with("data: ")))
        .map(|event| {
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .map(str::to_owned);
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (name, data.join("\n"))
        })
        .collect();
    (raw, events)
}

#[tokio::test]
async fn a_native_route_relays_every_event_byte_for_byte_but_the_id() {
    let (_upstream, app) = corpus().await;

    let (_, got) = stream(
        &app,
        "/v1/responses",
        &json!({"model": "responses", "input": "Rivers?", "stream": true}),
    )
    .await;
    let sent = fixture("responses-reasoning");
    let id = serde_json::from_str::<Value>(&got[0].1).expect("JSON")["response"]["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    assert!(id.starts_with("resp_") && id != "resp_up1", "{id}");
    assert_eq!(got.len(), sent.len());
    for ((name, data), (sent_name, sent_data)) in got.iter().zip(&sent) {
        assert_eq!(name, sent_name);
        // Only the response's id is sluice's: every other byte is the upstream's.
        assert_eq!(
            data,
            &sent_data.replacen("\"resp_up1\"", &format!("\"{id}\""), 1)
        );
    }

    let (_, got) = stream(
        &app,
        "/v1/messages",
        &json!({"model": "anthropic", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "Rivers?"}]}),
    )
    .await;
    let sent = fixture("anthropic-thinking");
    let id = serde_json::from_str::<Value>(&got[0].1).expect("JSON")["message"]["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    assert!(id.starts_with("msg_") && id != "msg_01UpStream", "{id}");
    assert_eq!(got.len(), sent.len(), "{got:?}");
    for ((name, data), (sent_name, sent_data)) in got.iter().zip(&sent) {
        assert_eq!(name, sent_name);
        assert_eq!(
            data,
            &sent_data.replacen("\"msg_01UpStream\"", &format!("\"{id}\""), 1)
        );
    }
    // The mid-stream `overloaded_error` is the upstream's failure, not a success.
    app.wait_metric_at_least(
        "sluice_chat_requests_total{outcome=\"upstream_error\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_chat_upstream_s_fields_pass_through_to_a_chat_client() {
    let (_upstream, app) = corpus().await;
    let (_, got) = stream(
        &app,
        "/v1/chat/completions",
        &json!({"model": "chat", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Rivers?"}]}),
    )
    .await;
    let chunks: Vec<Value> = got
        .iter()
        .filter_map(|(_, d)| serde_json::from_str(d).ok())
        .collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|c| &c["delta"]))
        .collect();
    let sent = fixture("chat-annotations");
    let sent: Vec<Value> = sent
        .iter()
        .filter_map(|(_, d)| serde_json::from_str(d).ok())
        .collect();
    // Each delta the upstream sent that carries something, as it sent it.
    for want in sent
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|c| &c["delta"]))
        .filter(|d| {
            d.as_object()
                .is_some_and(|d| d.values().any(|v| !v.is_null() && v != ""))
        })
        .filter(|d| d.get("role").is_none())
    {
        assert!(deltas.contains(&want), "{want} not in {deltas:?}");
    }
    assert!(
        chunks
            .iter()
            .all(|c| c["system_fingerprint"] == "fp_1" || c.get("error").is_some())
    );
    let usage = &chunks.last().expect("usage")["usage"];
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 3);
    assert_eq!(got.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
}

#[tokio::test]
async fn a_translated_route_carries_reasoning_and_citations_and_names_what_it_cannot() {
    let (_upstream, app) = corpus().await;

    // A Responses upstream to a chat client.
    let (raw, got) = stream(
        &app,
        "/v1/chat/completions",
        &json!({"model": "responses", "stream": true,
            "messages": [{"role": "user", "content": "Rivers?"}]}),
    )
    .await;
    let chunks: Vec<Value> = got
        .iter()
        .filter_map(|(_, d)| serde_json::from_str(d).ok())
        .collect();
    let delta = |key: &str| -> Vec<&Value> {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"].get(key))
            .collect()
    };
    let reasoning: String = delta("reasoning_content")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(reasoning, "**Planning** the reply");
    let text: String = delta("content").iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(text, "Rivers reach the sea.");
    assert_eq!(
        delta("annotations")[0][0]["url"],
        "https://example.org/rivers"
    );
    // Encrypted reasoning has no place in chat completions: said, not lost silently.
    assert!(
        raw.contains(": sluice: left out the upstream's signed reasoning"),
        "{raw}"
    );
    assert_eq!(got.last().map(|(_, d)| d.as_str()), Some("[DONE]"));

    // An Anthropic upstream to a Responses client.
    let (raw, got) = stream(
        &app,
        "/v1/responses",
        &json!({"model": "anthropic", "input": "Rivers?", "stream": true}),
    )
    .await;
    let events: Vec<Value> = got
        .iter()
        .filter_map(|(_, d)| serde_json::from_str(d).ok())
        .collect();
    let of = |kind: &str| -> Vec<&Value> { events.iter().filter(|e| e["type"] == kind).collect() };
    let reasoning: String = of("response.reasoning_text.delta")
        .iter()
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(reasoning, "The user wants rivers.");
    assert_eq!(
        of("response.output_text.annotation.added")[0]["annotation"]["cited_text"],
        "Rivers flow to the sea"
    );
    // The Bash call's partial (and never finished) input, as streamed.
    let arguments: String = of("response.function_call_arguments.delta")
        .iter()
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(arguments, "{\"command\": \"ls -la\", \"timeout\": 12");
    for left_out in [
        "signed reasoning",
        "`server_tool_use` block",
        "`web_search_tool_result` block",
    ] {
        assert!(
            raw.contains(&format!(": sluice: left out the upstream's {left_out}")),
            "{raw}"
        );
    }
    // The upstream's mid-stream failure ends the response as failed.
    let last = events.last().expect("an end");
    assert_eq!(last["type"], "response.failed", "{last}");
    assert!(
        last["response"]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Overloaded"))
    );
}

#[tokio::test]
async fn a_chat_client_s_tools_and_history_reach_an_upstream_of_another_api() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dir = std::env::temp_dir().join(format!("sluice-cross-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[models.claude]\nbase_url = \"{base}\"\nmodel = \"claude-up\"\napi = \"anthropic\"\n\n\
             [models.gpt]\nbase_url = \"{base}\"\nmodel = \"gpt-up\"\napi = \"responses\"\n"
        ),
    )
    .expect("config");
    let app = TestApp::in_front_of_with(&upstream, |c| c.config = Some(path)).await;
    // A chat client mid tool loop: a system prompt, an image, a call and its result.
    let request = |model: &str| {
        json!({"model": model, "stream": true, "max_tokens": 50, "stop": "END", "tool_choice": "required",
        "logprobs": true,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "user", "content": "And tomorrow?"},
        ]})
    };
    // What an API takes no counterpart of is named (the Responses API has no `stop`).
    for (model, dropped) in [("claude", "logprobs"), ("gpt", "logprobs,stop")] {
        let answer = app.post("/v1/chat/completions", &request(model)).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["x-sluice-dropped"], dropped);
        answer.bytes().await.expect("a reply");
    }
    let sent = upstream.request(1).await.body;
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(sent["tool_choice"], json!({"type": "any"}));
    assert_eq!(sent["stop_sequences"], json!(["END"]));
    let messages = sent["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 3, "{sent}");
    assert_eq!(
        messages[0]["content"][1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "iVBOR"})
    );
    assert_eq!(
        messages[1]["content"][0],
        json!({"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}})
    );
    // The tool's result and the user's next words are one user turn.
    assert_eq!(messages[2]["content"][0]["type"], "tool_result");
    assert_eq!(messages[2]["content"][1]["text"], "And tomorrow?");

    let sent = upstream.request(2).await.body;
    assert_eq!(
        sent["tools"][0],
        json!({"type": "function", "name": "get_weather", "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}})
    );
    assert_eq!(sent["tool_choice"], "required");
    assert_eq!(sent["max_output_tokens"], 50);
    let input = sent["input"].as_array().expect("input");
    let kinds: Vec<&str> = input
        .iter()
        .map(|i| {
            i["type"]
                .as_str()
                .or(i["role"].as_str())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "system",
            "user",
            "function_call",
            "function_call_output",
            "user"
        ]
    );
    assert_eq!(input[1]["content"][1]["type"], "input_image");
    assert_eq!(input[2]["arguments"], "{\"city\":\"Paris\"}");
}
