//! `POST /api/chat` and `GET /api/prompts`: sluice's own events, templates, history, and the
//! mock model's scripted replies.

use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp, all_events, fixtures};

#[tokio::test]
async fn events_are_meta_tokens_done_with_increasing_ids() {
    let app = TestApp::spawn().await;
    let response = app
        .post(
            "/api/chat",
            &json!({"prompt": "Hello there", "max_tokens": 5}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let stream_id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let events = all_events(response).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["meta", "token", "token", "token", "token", "token", "done"]
    );
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e.id.parse().expect("numeric id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "{ids:?}");
    assert_eq!(
        ids,
        (1..=7).collect::<Vec<u64>>(),
        "numbered from 1, no gap"
    );
    assert_eq!(
        events[0].retry,
        Some(std::time::Duration::from_millis(1000))
    );

    let meta: Value = serde_json::from_str(&events[0].data).expect("JSON");
    assert!(
        meta["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chat-"))
    );
    assert_eq!(
        meta["id"],
        stream_id.as_str(),
        "the header names the stream"
    );
    // 128 random bits or more: at least 32 hex digits after the prefix.
    assert!(stream_id.len() >= "chat-".len() + 32, "{stream_id}");
    assert_eq!(meta["model"], "mock");
    assert!(meta["created"].is_u64());
    let text: String = events[1..6]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).expect("JSON")["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert!(text.starts_with("You said: Hello there. "), "{text}");
    let done: Value = serde_json::from_str(&events[6].data).expect("JSON");
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], 5);
    assert!(done["ttft_ms"].is_u64() && done["duration_ms"].is_u64());
}

#[tokio::test]
async fn templates_and_history_become_the_upstream_messages() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let body = json!({"prompt": "The quick brown fox.", "model": "gpt-4o-mini",
        "template": "summarize", "vars": {"sentences": 2, "audience": "children"},
        "history": [{"role": "user", "content": "Earlier"}, {"role": "assistant", "content": "Reply"}],
        "max_tokens": 50, "temperature": 0.5});
    let events = all_events(app.post("/api/chat", &body).await).await;
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("done"));
    let seen = upstream.request(1).await.body;
    let messages = seen["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0]["role"], "system");
    let system = messages[0]["content"].as_str().unwrap_or_default();
    assert!(
        system.contains("at most 2 sentences for children"),
        "{system}"
    );
    assert_eq!(messages[1], json!({"role": "user", "content": "Earlier"}));
    assert_eq!(
        messages[2],
        json!({"role": "assistant", "content": "Reply"})
    );
    assert_eq!(
        messages[3],
        json!({"role": "user", "content": "The quick brown fox."})
    );
    assert_eq!(seen["max_tokens"], 50);
    assert_eq!(seen["temperature"], 0.5);
}

#[tokio::test]
async fn prompts_lists_templates_with_descriptions_and_variables() {
    let app = TestApp::spawn().await;
    let list = app.get_json("/api/prompts").await;
    let data = list["data"].as_array().expect("a list");
    assert!(data.len() >= 3);
    let translate = data
        .iter()
        .find(|p| p["name"] == "translate")
        .expect("translate");
    assert!(
        translate["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    assert_eq!(
        translate["variables"],
        json!(["formality", "target_language"])
    );
}

#[tokio::test]
async fn fixtures_script_the_mock_model() {
    let path = fixtures("(?i)capital of france", "Paris is the capital of France.");
    let app = TestApp::spawn_with(|c| c.mock_fixtures = Some(path.clone())).await;
    let body = json!({"model": "mock", "messages": [{"role": "user", "content": "What is the CAPITAL of France?"}]});
    let reply = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "Paris is the capital of France."
    );
    assert_eq!(reply["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn the_mock_serves_an_agent_s_loop_to_its_end() {
    // What a coding agent sends: its tools named in reminders, a tool result with text
    // beside it, a scripted prompt that names a tool.
    let path = fixtures("(?i)say hello", "Hello!");
    let app = TestApp::spawn_with(|c| c.mock_fixtures = Some(path.clone())).await;
    let tools = json!([{"type": "function", "function": {"name": "Bash",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
            "required": ["command"]}}}]);
    let ask = |messages: Value| {
        let body = json!({"model": "mock", "tools": tools, "messages": messages});
        let app = &app;
        async move {
            let reply = app.post_json("/v1/chat/completions", &body).await;
            reply["choices"][0]["message"].clone()
        }
    };
    let reminder = "<system-reminder>You can use Bash.</system-reminder>";
    // A reminder naming a tool is not the user asking for it...
    let said =
        ask(json!([{"role": "user", "content": format!("{reminder} What is 2 + 2?")}])).await;
    assert!(said["tool_calls"].is_null(), "{said}");
    // ...a scripted reply wins over a tool the prompt names...
    let said = ask(json!([{"role": "user", "content": "Use Bash to say hello"}])).await;
    assert_eq!(said["content"], "Hello!", "{said}");
    // ...and a tool is called once a turn: after its result, text, whatever the reminders say.
    let said = ask(json!([{"role": "user", "content": "Run Bash"}])).await;
    assert_eq!(said["tool_calls"][0]["function"]["name"], "Bash", "{said}");
    let call = said["tool_calls"][0].clone();
    let said = ask(json!([
        {"role": "user", "content": "Run Bash"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "ok"},
        {"role": "user", "content": format!("{reminder} Bash is there")},
    ]))
    .await;
    assert!(said["tool_calls"].is_null(), "{said}");
    assert_eq!(said["content"], "The tool returned: ok", "{said}");
}

#[tokio::test]
async fn the_page_and_health_answer() {
    let app = TestApp::spawn().await;
    let page = app.http.get(app.url("/")).send().await.expect("answers");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("/ui/app.js"));
    let script = app
        .http
        .get(app.url("/ui/app.js"))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(script.text().await.expect("js").contains("/api/chat"));
    assert_eq!(app.get_json("/healthz").await["status"], "ok");
    assert_eq!(app.get_json("/readyz").await["status"], "ready");
    let response = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert!(response.headers().contains_key("x-request-id"));
}
