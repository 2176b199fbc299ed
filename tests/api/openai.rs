//! `POST /v1/chat/completions` as OpenAI clients see it: the exact chunk format, usage,
//! non-streamed answers, fields passed through to the upstream, and a real SDK client.

use async_openai::config::OpenAIConfig;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp, all_events, content, payloads};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
}

#[tokio::test]
async fn a_stream_has_openai_exact_chunk_format() {
    let app = TestApp::spawn().await;
    let mut body = chat("mock", true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_tokens"] = json!(6);
    let response = app.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    let p = payloads(&all_events(response).await);

    // One identity for every chunk.
    let id = p[0]["id"].as_str().expect("an id");
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &p[..p.len() - 1] {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["created"], p[0]["created"]);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "mock");
    }
    // Role first, then content, then the finish, then usage, then [DONE].
    assert_eq!(
        p[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let n = p.len();
    assert_eq!(p[n - 1], json!("[DONE]"));
    assert_eq!(p[n - 2]["choices"], json!([]));
    assert_eq!(
        p[n - 2]["usage"]["completion_tokens"],
        6,
        "the mock's own count"
    );
    assert!(p[n - 2]["usage"]["prompt_tokens"].as_u64() > Some(0));
    assert_eq!(p[n - 3]["choices"][0]["delta"], json!({}));
    assert_eq!(p[n - 3]["choices"][0]["finish_reason"], "length");
    let contents = &p[1..n - 3];
    assert_eq!(contents.len(), 6, "one chunk a token, none merged");
    for chunk in contents {
        assert!(chunk["choices"][0]["delta"]["content"].is_string());
        assert!(chunk["choices"][0]["finish_reason"].is_null());
        assert!(chunk.get("usage").is_some_and(Value::is_null));
    }
}

#[tokio::test]
async fn without_include_usage_there_is_no_usage_chunk() {
    let app = TestApp::spawn().await;
    let response = app.post("/v1/chat/completions", &chat("mock", true)).await;
    let p = payloads(&all_events(response).await);
    assert!(p.iter().all(|c| c.get("usage").is_none()), "{p:?}");
    assert_eq!(p.last(), Some(&json!("[DONE]")));
    assert_eq!(p[p.len() - 2]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_non_streamed_answer_is_a_chat_completion_with_usage() {
    let app = TestApp::spawn().await;
    let response = app.post("/v1/chat/completions", &chat("mock", false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(text.starts_with("You said: What is the capital of France?"));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap_or(0)
                + usage["completion_tokens"].as_u64().unwrap_or(0)
        )
    );
}

#[tokio::test]
async fn the_mock_is_deterministic() {
    let app = TestApp::spawn().await;
    let mut replies = Vec::new();
    for _ in 0..2 {
        let response = app.post("/v1/chat/completions", &chat("mock", true)).await;
        replies.push(content(&payloads(&all_events(response).await)));
    }
    assert_eq!(replies[0], replies[1]);
    assert!(replies[0].len() > 40);
}

#[tokio::test]
async fn upstream_chunks_relay_with_fields_passed_through() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "seed": 7,
        "response_format": {"type": "json_object"}, "logit_bias": {"50256": -100},
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]});
    let response = app.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let p = payloads(&all_events(response).await);
    assert_eq!(content(&p), "Hello from the fake upstream");
    assert!(
        p.iter().all(|c| c.get("usage").is_none()),
        "usage not asked for: {p:?}"
    );

    let seen = upstream.request(1).await;
    assert_eq!(seen.body["model"], "gpt-4o-mini");
    assert_eq!(seen.body["seed"], 7);
    assert_eq!(seen.body["response_format"], json!({"type": "json_object"}));
    assert_eq!(seen.body["logit_bias"], json!({"50256": -100}));
    assert_eq!(seen.body["messages"][1]["content"][0]["text"], "Hi");
    assert_eq!(seen.body["stream"], true);
    assert_eq!(
        seen.body["stream_options"]["include_usage"], true,
        "sluice always asks for usage"
    );
    assert_eq!(
        seen.authorization.as_deref(),
        Some("Bearer sk-test-secret-key")
    );
}

#[tokio::test]
async fn upstream_usage_is_reported_when_asked_for() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let mut body = chat("gpt-4o-mini", true);
    body["stream_options"] = json!({"include_usage": true});
    let p = payloads(&all_events(app.post("/v1/chat/completions", &body).await).await);
    let usage = &p[p.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16})
    );
}

#[tokio::test]
async fn usage_is_counted_when_the_upstream_sends_none() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let mut body = chat("no-usage", true);
    body["stream_options"] = json!({"include_usage": true});
    let p = payloads(&all_events(app.post("/v1/chat/completions", &body).await).await);
    let usage = &p[p.len() - 2]["usage"];
    // "Hello from the fake upstream" is 5 tokens in o200k; the prompt is one short message.
    assert_eq!(usage["completion_tokens"], 5, "{usage}");
    assert!(
        usage["prompt_tokens"].as_u64().is_some_and(|n| n > 5),
        "{usage}"
    );

    body["stream"] = json!(false);
    let reply = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(reply["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn tool_call_deltas_relay_unchanged_and_merge_when_not_streamed() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let mut body = chat("tools", true);
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let p = payloads(&all_events(app.post("/v1/chat/completions", &body).await).await);
    // Before tool calls, OpenAI's role chunk has `content: null` (an empty string makes
    // some SDKs emit an empty text part).
    assert_eq!(
        p[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    assert_eq!(
        p[1]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}]})
    );
    assert_eq!(
        p[2]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":"
    );
    assert_eq!(p[4]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(upstream.request(1).await.body["tools"], body["tools"]);

    body["stream"] = json!(false);
    let reply = app.post_json("/v1/chat/completions", &body).await;
    let message = &reply["choices"][0]["message"];
    assert!(message["content"].is_null());
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Paris\"}"
    );
    // `index` belongs to stream deltas: an assembled call has none.
    assert_eq!(
        message["tool_calls"][0],
        json!({"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn the_async_openai_sdk_streams_through_sluice() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let client = async_openai::Client::with_config(
        OpenAIConfig::new()
            .with_api_base(app.url("/v1"))
            .with_api_key("unused"),
    );
    let request = json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]});
    let mut stream = client
        .chat()
        .create_stream_byot::<_, async_openai::types::chat::CreateChatCompletionStreamResponse>(
            request,
        )
        .await
        .expect("the stream starts");
    let mut text = String::new();
    let mut finish = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("every chunk parses as OpenAI's type");
        for choice in chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
            finish = finish.or(choice.finish_reason);
        }
    }
    assert_eq!(text, "Hello from the fake upstream");
    assert!(finish.is_some());
}

#[tokio::test]
async fn models_lists_every_routable_model() {
    let app = TestApp::spawn().await;
    let list = app.get_json("/v1/models").await;
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    for name in [
        "mock",
        "mock-error-before",
        "mock-error-after",
        "mock-hang",
        "mock-stall",
    ] {
        assert!(ids.contains(&name), "{ids:?}");
    }
    assert_eq!(list["data"][0]["object"], "model");
}

#[tokio::test]
async fn the_relay_carries_what_the_upstream_sent() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let body = json!({"model": "rich", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hi"}]});
    let response = app.post("/v1/chat/completions", &body).await;
    let chunks = payloads(&all_events(response).await);
    let objects: Vec<&serde_json::Value> = chunks.iter().filter(|c| c.is_object()).collect();
    for chunk in &objects {
        assert_eq!(chunk["system_fingerprint"], "fp_up", "{chunk}");
        assert_eq!(chunk["service_tier"], "default", "{chunk}");
        assert_eq!(chunk["model"], "rich", "{chunk}");
    }
    assert!(
        objects
            .iter()
            .any(|c| c["choices"][0]["delta"]["reasoning_content"] == "thinking"),
        "{chunks:?}"
    );
    let text = objects
        .iter()
        .find(|c| c["choices"][0]["delta"]["content"] == "Hi")
        .expect("the text chunk");
    assert_eq!(
        text["choices"][0]["logprobs"]["content"][0]["token"], "Hi",
        "{text}"
    );
    let usage = &objects.last().expect("a usage chunk")["usage"];
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 8,
        "{usage}"
    );
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"], 4,
        "{usage}"
    );
    assert_eq!(usage["total_tokens"], 10, "{usage}");

    let mut body = body;
    body["stream"] = json!(false);
    let reply = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(reply["system_fingerprint"], "fp_up", "{reply}");
    assert_eq!(reply["service_tier"], "default", "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["reasoning_content"], "thinking",
        "{reply}"
    );
    assert_eq!(
        reply["usage"]["prompt_tokens_details"]["cached_tokens"], 8,
        "{reply}"
    );
    // As OpenAI writes a message, and the stream's log probabilities joined.
    let message = &reply["choices"][0]["message"];
    assert_eq!(message["refusal"], Value::Null, "{reply}");
    assert_eq!(message["annotations"], json!([]), "{reply}");
    assert_eq!(
        reply["choices"][0]["logprobs"]["content"][0]["token"], "Hi",
        "{reply}"
    );
}

#[tokio::test]
async fn a_stream_is_named_and_its_events_numbered() {
    let app = TestApp::spawn().await;
    let body = json!({"model": "mock", "stream": true, "max_tokens": 3,
        "messages": [{"role": "user", "content": "Hi"}]});
    let response = app.post("/v1/chat/completions", &body).await;
    let stream_id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let events = all_events(response).await;
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5", "6"],
        "role, 3 tokens, finish, [DONE]"
    );
    let chunks = payloads(&events);
    assert_eq!(chunks[0]["id"], stream_id.as_str());
    assert!(stream_id.len() >= "chatcmpl-".len() + 32, "{stream_id}");
}

#[tokio::test]
async fn models_include_the_upstream_catalogue_and_one_can_be_retrieved() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let list = app.get_json("/v1/models").await;
    let owned: Vec<(String, String)> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or("").to_owned(),
                m["owned_by"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        owned.contains(&("mock".into(), "sluice".into())),
        "{owned:?}"
    );
    assert!(
        owned.contains(&("gpt-test".into(), "upstream".into())),
        "{owned:?}"
    );
    let one = app.get_json("/v1/models/gpt-test").await;
    assert_eq!(one["id"], "gpt-test", "{one}");
    assert_eq!(one["object"], "model", "{one}");
    let response = app
        .http
        .get(app.url("/v1/models/no-such-model"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.expect("JSON");
    assert_eq!(error["error"]["code"], "model_not_found", "{error}");
}
