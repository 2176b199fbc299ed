//! OpenAI's Responses API: the official Python SDK against the mock model, and raw
//! requests against the fake upstream, which records the chat request each became.

use serde_json::{Value, json};

use crate::support::{DEADLINE, FakeUpstream, TestApp, all_events, events, skip_without};

/// The `data:` of each event, parsed.
fn payloads(events: &[eventsource_stream::Event]) -> Vec<Value> {
    events
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("JSON data"))
        .collect()
}

fn types(payloads: &[Value]) -> Vec<&str> {
    payloads
        .iter()
        .map(|p| p["type"].as_str().expect("a type"))
        .collect()
}

/// Every event has `sequence_number` = its position, and its SSE `event:` is its type.
fn assert_numbered(events: &[eventsource_stream::Event]) {
    for (n, (event, payload)) in events.iter().zip(payloads(events)).enumerate() {
        assert_eq!(payload["sequence_number"], json!(n), "{payload}");
        assert_eq!(payload["type"], json!(event.event));
        assert_eq!(event.id, (n + 1).to_string());
    }
}

#[tokio::test]
async fn the_python_sdk_uses_the_responses_api_on_the_mock_model() {
    if !crate::support::python_has("openai") && skip_without("python3 with the openai package") {
        return;
    }
    let app = TestApp::spawn_with(|c| c.mock_tokens_per_s = 200.0).await;
    let stdout = crate::support::python("responses.py", &[&app.url("/v1")]).await;
    let found: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");

    let stream = &found["stream"];
    let kinds: Vec<&str> = stream["types"]
        .as_array()
        .expect("types")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let sequence: Vec<u64> = stream["sequence"]
        .as_array()
        .expect("numbers")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(sequence, (0..sequence.len() as u64).collect::<Vec<_>>());
    assert!(
        stream["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("You said: Tell me about rivers."))
    );
    assert_eq!(stream["text"], stream["final_text"]);
    assert_eq!(stream["usage"], 40);

    assert_eq!(found["helper"]["text"], found["helper"]["final"]);
    assert_eq!(found["helper"]["status"], "completed");
    assert_eq!(found["plain"]["status"], "completed");
    assert_eq!(found["plain"]["text"], found["plain"]["again"]);
    assert_eq!(found["plain"]["instructions"], "Be brief.");
    assert_eq!(found["plain"]["text"], stream["text"]);

    let tools = &found["tools"];
    assert_eq!(tools["type"], "function_call");
    assert_eq!(tools["name"], "get_weather");
    assert_eq!(tools["arguments"], json!({"city": "mock"}));
    assert_eq!(tools["answer"], "The tool returned: sunny");
    assert_eq!(tools["stateless"], "The tool returned: rainy");

    let background = &found["background"];
    let sequence: Vec<u64> = background["sequence"]
        .as_array()
        .expect("numbers")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(
        sequence,
        (0..sequence.len() as u64).collect::<Vec<_>>(),
        "dropped and resumed: no gap, no repeat"
    );
    assert_eq!(background["text"], background["final"]);
    assert_eq!(background["status"], "completed");
    assert_eq!(background["last"], "response.completed");
    assert_eq!(found["queued"], "queued");
    assert_eq!(found["unknown_previous"], "previous_response_id");
    assert_eq!(found["model"], "mock");
    assert!(
        found["models"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("mock")))
    );
    assert_eq!(found["missing_model"], 404);
}

#[tokio::test]
async fn a_responses_request_becomes_the_chat_request_the_upstream_takes() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let request = json!({
        "model": "gpt-test",
        "instructions": "Answer in French.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                {"type": "input_image", "image_url": "https://example.com/sky.png"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": "rainy"}
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"}, "strict": true}},
        "max_output_tokens": 50,
        "temperature": 0.7,
        "reasoning": {"effort": "low"},
        "metadata": {"ticket": "42"},
        "seed": 7,
        "top_k": 3
    });
    let reply = app.post_json("/v1/responses", &request).await;
    assert_eq!(reply["status"], "completed", "{reply}");
    assert_eq!(
        reply["output"][0]["content"][0]["text"],
        "Hello from the fake upstream"
    );
    assert_eq!(reply["metadata"], json!({"ticket": "42"}));
    assert_eq!(reply["usage"]["input_tokens"], 11);
    assert_eq!(reply["usage"]["output_tokens"], 5);

    let sent = upstream.request(1).await.body;
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/sky.png"}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "rainy"}
        ])
    );
    assert_eq!(
        sent["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "strict": true}}])
    );
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(
        sent["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "weather", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(sent["max_tokens"], 50);
    assert_eq!(sent["temperature"], 0.7);
    assert_eq!(sent["reasoning_effort"], "low");
    // Fields sluice does not know go through untouched; the Responses ones do not.
    assert_eq!(sent["seed"], 7);
    assert_eq!(sent["top_k"], 3);
    for gone in [
        "input",
        "instructions",
        "text",
        "max_output_tokens",
        "metadata",
        "reasoning",
    ] {
        assert!(sent.get(gone).is_none(), "{gone} went upstream");
    }
}

#[tokio::test]
async fn a_streamed_response_has_items_in_the_order_sdks_expect() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    // Reasoning, then text, with the upstream's usage details.
    let stream = all_events(
        app.post(
            "/v1/responses",
            &json!({"model": "rich", "input": "Hi", "stream": true}),
        )
        .await,
    )
    .await;
    assert_numbered(&stream);
    let data = payloads(&stream);
    assert_eq!(
        types(&data),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(data[2]["item"]["type"], "reasoning");
    assert_eq!(data[3]["delta"], "thinking");
    let done = &data.last().expect("completed")["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], "thinking");
    assert_eq!(done["output"][1]["content"][0]["text"], "Hi");
    assert_eq!(done["usage"]["input_tokens_details"]["cached_tokens"], 8);
    assert_eq!(
        done["usage"]["output_tokens_details"]["reasoning_tokens"],
        4
    );

    // A function call: its item, the argument deltas, the done events.
    let stream = all_events(
        app.post(
            "/v1/responses",
            &json!({"model": "tools", "input": "Hi", "stream": true}),
        )
        .await,
    )
    .await;
    assert_numbered(&stream);
    let data = payloads(&stream);
    assert_eq!(
        types(&data),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(data[2]["item"]["call_id"], "call_1");
    assert_eq!(data[5]["arguments"], "{\"city\":\"Paris\"}");
    let item = &data.last().expect("completed")["response"]["output"][0];
    assert_eq!(item["type"], "function_call");
    assert_eq!(item["name"], "get_weather");
    assert_eq!(item["arguments"], "{\"city\":\"Paris\"}");
}

#[tokio::test]
async fn failures_and_the_token_limit_end_a_response_as_openai_does() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    // Before the first event: a real status.
    let refused = app
        .post(
            "/v1/responses",
            &json!({"model": "status-500", "input": "Hi", "stream": true}),
        )
        .await;
    assert_eq!(refused.status(), 502);
    let body: Value = refused.json().await.expect("JSON");
    assert!(body["error"]["message"].is_string());
    // After it: `response.failed`.
    let failed = all_events(
        app.post(
            "/v1/responses",
            &json!({"model": "midstream-error", "input": "Hi", "stream": true}),
        )
        .await,
    )
    .await;
    let data = payloads(&failed);
    let last = data.last().expect("an ending");
    assert_eq!(last["type"], "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert!(last["response"]["error"]["message"].is_string());
    // Cut by max_output_tokens: `response.incomplete`.
    let cut = all_events(
        app.post(
            "/v1/responses",
            &json!({"model": "mock", "input": "Hi", "stream": true, "max_output_tokens": 3}),
        )
        .await,
    )
    .await;
    let data = payloads(&cut);
    let last = data.last().expect("an ending");
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    // Bad input: 400 naming the field.
    for (bad, param) in [
        (json!({"model": "mock"}), "input"),
        (
            json!({"model": "mock", "input": [{"role": "robot", "content": "x"}]}),
            "input[0].role",
        ),
        (
            json!({"model": "mock", "input": "x", "tools": [{"type": "web_search"}],
                "tool_choice": {"type": "web_search"}}),
            "tool_choice",
        ),
        (
            json!({"model": "mock", "input": "x", "background": true, "store": false}),
            "store",
        ),
    ] {
        let answer = app.post("/v1/responses", &bad).await;
        assert_eq!(answer.status(), 400, "{bad}");
        let body: Value = answer.json().await.expect("JSON");
        assert_eq!(body["error"]["param"], param, "{body}");
    }
}

#[tokio::test]
async fn previous_response_id_continues_the_stored_conversation() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let first = app
        .post_json(
            "/v1/responses",
            &json!({"model": "gpt-test", "input": "My name is Ada.", "instructions": "Be kind."}),
        )
        .await;
    let id = first["id"].as_str().expect("an id");
    let second = app
        .post_json(
            "/v1/responses",
            &json!({"model": "gpt-test", "input": "What is my name?", "previous_response_id": id}),
        )
        .await;
    assert_eq!(second["previous_response_id"], json!(id));
    let sent = upstream.request(2).await.body;
    // The earlier input and output, then the new input; the earlier instructions are not
    // carried over (as OpenAI does).
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello from the fake upstream"},
            {"role": "user", "content": "What is my name?"}
        ])
    );
    // Not stored: it cannot be continued, nor read.
    let unstored = app
        .post_json(
            "/v1/responses",
            &json!({"model": "gpt-test", "input": "Hi", "store": false}),
        )
        .await;
    let unstored_id = unstored["id"].as_str().expect("an id");
    let answer = app
        .post(
            "/v1/responses",
            &json!({"model": "gpt-test", "input": "Hi", "previous_response_id": unstored_id}),
        )
        .await;
    assert_eq!(answer.status(), 404);
    let body: Value = answer.json().await.expect("JSON");
    assert_eq!(body["error"]["param"], "previous_response_id");
    let read = app
        .http
        .get(app.url(&format!("/v1/responses/{unstored_id}")))
        .send()
        .await
        .expect("answers");
    assert_eq!(read.status(), 404);
}

#[tokio::test]
async fn a_foreground_stream_is_cancelled_with_its_connection_a_background_one_is_not() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    // Foreground, stored: the client leaves, the upstream is closed.
    let response = app
        .post(
            "/v1/responses",
            &json!({"model": "slow", "input": "Hi", "stream": true}),
        )
        .await;
    let mut stream = events(response);
    for _ in 0..4 {
        futures::StreamExt::next(&mut stream).await.expect("events");
    }
    drop(stream);
    upstream.closed(1).await;

    // Background: the client leaves, generation goes on; cancel stops it.
    let response = app
        .post(
            "/v1/responses",
            &json!({"model": "slow", "input": "Hi", "stream": true, "background": true}),
        )
        .await;
    assert_eq!(response.headers()["x-sluice-resumable"], "true");
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let mut stream = events(response);
    for _ in 0..4 {
        futures::StreamExt::next(&mut stream).await.expect("events");
    }
    drop(stream);
    // The upstream is still being read after the client left: it sends on.
    let sent = upstream.sent_bytes();
    let started = std::time::Instant::now();
    while upstream.sent_bytes() == sent {
        assert!(
            started.elapsed() < DEADLINE,
            "the background response stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let now = app.get_json(&format!("/v1/responses/{id}")).await;
    assert_eq!(now["status"], "in_progress", "{now}");
    assert!(
        upstream.is_open(2),
        "a background response outlives its connection"
    );
    let cancelled = app
        .post_json(&format!("/v1/responses/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    upstream.closed(2).await;
    // Deleted: gone.
    let deleted = app
        .http
        .delete(app.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .expect("answers");
    let body: Value = deleted.json().await.expect("JSON");
    assert_eq!(
        body,
        json!({"id": id, "object": "response", "deleted": true})
    );
    let read = app
        .http
        .get(app.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .expect("answers");
    assert_eq!(read.status(), 404);
}

#[tokio::test]
async fn a_route_that_speaks_the_responses_api_is_relayed_natively() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dir = std::env::temp_dir().join(format!("sluice-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[models.native]\nbase_url = \"{base}\"\nmodel = \"up-model\"\napi = \"responses\"\n"
        ),
    )
    .expect("config");
    let app = TestApp::spawn_with(|c| c.config = Some(path)).await;

    let request = json!({"model": "native", "input": "Hi", "stream": true, "include": ["x"], "service_tier": "flex",
        "tools": [{"type": "web_search"}, {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "f"}]}]});
    let response = app.post("/v1/responses", &request).await;
    // Nothing was left out: the upstream speaks the client's API.
    assert!(response.headers().get("x-sluice-dropped").is_none());
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let stream = all_events(response).await;
    assert_numbered(&stream);
    let data = payloads(&stream);
    // The upstream's own fields and numbers, as sent; the response's id is sluice's.
    assert_eq!(data[4]["obfuscation"], "x7");
    assert_eq!(data[0]["response"]["x_vendor"], "kept");
    assert_eq!(data[0]["response"]["id"], json!(id));
    let last = data.last().expect("completed");
    assert_eq!(last["type"], "response.completed");
    assert_eq!(
        last["response"]["output"][0]["content"][0]["text"],
        "Hello from responses"
    );
    // The client's request went on as it was, with the upstream's model name.
    let sent = upstream.request(1).await.body;
    assert_eq!(sent["model"], "up-model");
    assert_eq!(sent["input"], "Hi");
    assert_eq!(sent["include"], json!(["x"]));
    assert_eq!(sent["service_tier"], "flex");
    assert_eq!(sent["tools"], request["tools"]);
    // Metered from the upstream's usage, and stored: read back through sluice.
    app.wait_metric("sluice_completion_tokens_total{model=\"native\"}", 3.0)
        .await;
    let stored = app.get_json(&format!("/v1/responses/{id}")).await;
    assert_eq!(stored["status"], "completed");
    assert_eq!(stored["id"], json!(id));

    // Continued: the upstream does not know sluice's ids, so it gets the conversation.
    let next = app
        .post_json(
            "/v1/responses",
            &json!({"model": "native", "input": "And then?", "previous_response_id": id}),
        )
        .await;
    assert_eq!(next["status"], "completed", "{next}");
    let sent = upstream.request(2).await.body;
    assert!(sent.get("previous_response_id").is_none());
    assert_eq!(
        sent["input"],
        json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello from responses"},
            {"role": "user", "content": "And then?"}])
    );

    // A chat completions client on the same route: the events read as chat chunks.
    let chat = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "native", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(
        chat["choices"][0]["message"]["content"], "Hello from responses",
        "{chat}"
    );
    assert_eq!(chat["usage"]["completion_tokens"], 3);
    let sent = upstream.request(3).await.body;
    assert_eq!(sent["input"], json!([{"role": "user", "content": "Hi"}]));
}

#[tokio::test]
async fn the_mock_honours_stop_and_calls_tools_on_the_chat_route_too() {
    let app = TestApp::spawn().await;
    let reply = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "mock", "stop": ["rivers"], "messages": [{"role": "user", "content": "Tell me about rivers"}]}),
        )
        .await;
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "You said: Tell me about "
    );
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters":
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]);
    let call = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "mock", "tools": tools, "messages": [{"role": "user", "content": "Please lookup this"}]}),
        )
        .await;
    let choice = &call["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"n\":1}"
    );
    // A message that names no tool gets text, unless a tool is required.
    let text = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "mock", "tools": tools, "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await;
    assert_eq!(text["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn codex_s_tools_are_flattened_or_left_out_and_named_back() {
    // Codex CLI's defaults: function tools, a namespace of functions, a built-in tool.
    let tools = json!([
        {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
        {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
            "tools": [{"type": "function", "name": "spawn_agent", "description": "Spawns one.",
                "parameters": {"type": "object", "properties": {"task": {"type": "string"}}, "required": ["task"]}}]},
        {"type": "web_search", "external_web_access": false},
    ]);
    // A chat upstream gets the namespace's functions by their flat names, no web_search;
    // the answer says what was left out.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let answer = app
        .post(
            "/v1/responses",
            &json!({"model": "gpt-test", "input": "hi", "tools": tools,
                "client_metadata": {"x": "y"}, "stream": true}),
        )
        .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["x-sluice-dropped"],
        "client_metadata,web_search"
    );
    all_events(answer).await;
    let sent = upstream.request(1).await.body;
    let names: Vec<&str> = sent["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert_eq!(names, ["exec_command", "multi_agent_v1__spawn_agent"]);
    assert_eq!(
        sent["tools"][1]["function"]["description"],
        "Sub-agents.\nSpawns one."
    );
    assert!(sent.get("client_metadata").is_none(), "{sent}");

    // A call of a namespaced function comes back as the client named it, and its call
    // goes upstream again by the flat name.
    let mock = TestApp::spawn().await;
    let choice = json!({"type": "function", "name": "spawn_agent", "namespace": "multi_agent_v1"});
    let reply = mock
        .post_json(
            "/v1/responses",
            &json!({"model": "mock", "input": "go", "tools": tools, "tool_choice": choice}),
        )
        .await;
    let call = &reply["output"][0];
    assert_eq!(call["type"], "function_call", "{reply}");
    assert_eq!(call["name"], "spawn_agent");
    assert_eq!(call["namespace"], "multi_agent_v1");
    assert_eq!(call["arguments"], r#"{"task":"mock"}"#);
    let next = json!({"model": "gpt-test", "tools": tools, "input": [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "spawn_agent", "namespace": "multi_agent_v1", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
    ]});
    let answer = app.post("/v1/responses", &next).await;
    assert_eq!(
        answer.headers()["x-sluice-dropped"],
        "web_search_call,reasoning.encrypted_content,web_search"
    );
    answer.bytes().await.expect("the reply");
    let sent = upstream.request(2).await.body;
    assert_eq!(
        sent["messages"][1]["tool_calls"][0]["function"]["name"],
        "multi_agent_v1__spawn_agent"
    );
}

#[tokio::test]
async fn a_background_response_is_there_from_the_moment_it_is_created() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    // Created and read at once, many times over: never "gone" for events never logged.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..32 {
        let created = app
            .post_json(
                "/v1/responses",
                &json!({"model": "slow", "input": "Hi", "background": true}),
            )
            .await;
        assert_eq!(created["status"], "queued", "{created}");
        let id = created["id"].as_str().expect("an id");
        let response = app
            .http
            .get(app.url(&format!("/v1/responses/{id}")))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["id"], id);
        *seen.entry(body["status"].to_string()).or_insert(0) += 1;
        let cancel = app.url(&format!("/v1/responses/{id}/cancel"));
        app.http.post(cancel).send().await.expect("cancelled");
    }
    println!("statuses right after creation: {seen:?}");
    assert!(
        seen.keys()
            .all(|s| s == "\"queued\"" || s == "\"in_progress\""),
        "{seen:?}"
    );
}

#[tokio::test]
async fn the_python_sdk_polls_a_background_response_the_moment_it_is_created() {
    if !crate::support::python_has("openai") && skip_without("python3 with the openai package") {
        return;
    }
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let stdout = crate::support::python("background.py", &[&app.url("/v1"), "slow"]).await;
    let line = stdout.trim();
    println!("statuses the SDK saw: {line}");
    assert!(
        line.split(' ')
            .all(|s| s.starts_with("queued=") || s.starts_with("in_progress=")),
        "{line}"
    );
}
