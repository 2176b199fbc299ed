//! Failures are never masked: before the first token a real status with OpenAI's error body;
//! after it an error event and no `[DONE]`; a stalled stream ends within its limit.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp, all_events, events, fixtures, free_port, payloads};
use futures::StreamExt;

fn chat(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "Hi"}]})
}

async fn error_of(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let body: Value = response.json().await.expect("an error body in JSON");
    for field in ["message", "type", "param", "code"] {
        assert!(body["error"].get(field).is_some(), "no {field} in {body}");
    }
    (status, retry_after, body)
}

#[tokio::test]
async fn upstream_statuses_before_the_first_token_become_fitting_statuses() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    for stream in [true, false] {
        for (model, want) in [
            ("status-401", 502),
            ("status-400", 400),
            ("status-404", 404),
            ("status-429", 429),
            ("status-500", 502),
        ] {
            let mut body = chat(model);
            body["stream"] = json!(stream);
            let (status, retry_after, error) =
                error_of(app.post("/v1/chat/completions", &body).await).await;
            assert_eq!(status, want, "{model} (stream: {stream}): {error}");
            let message = error["error"]["message"].as_str().unwrap_or_default();
            match model {
                "status-401" => {
                    assert!(!message.contains("sk-test"), "the key leaked: {message}");
                    assert_eq!(error["error"]["code"], "upstream_auth_failed");
                }
                "status-400" => assert!(message.contains("temperature must be at most 2")),
                "status-429" => assert_eq!(retry_after.as_deref(), Some("7")),
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn one_upstream_500_is_one_upstream_request() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let (status, _, _) =
        error_of(app.post("/v1/chat/completions", &chat("status-500")).await).await;
    assert_eq!(status, 502);
    // A second, different request marks the end of anything the first could have caused.
    let ok = app.post("/v1/chat/completions", &chat("gpt-4o-mini")).await;
    assert_eq!(ok.status(), 200);
    all_events(ok).await;
    let models: Vec<Value> = upstream
        .requests()
        .into_iter()
        .map(|r| r.body["model"].clone())
        .collect();
    assert_eq!(models, [json!("status-500"), json!("gpt-4o-mini")]);
}

#[tokio::test]
async fn a_refused_connection_is_a_502() {
    // Bind and drop: nothing listens on this port now.
    let port = free_port();
    let app = TestApp::spawn_with(|c| {
        c.openai_base_url = Some(format!("http://127.0.0.1:{port}/v1"));
    })
    .await;
    let (status, _, body) = error_of(app.post("/v1/chat/completions", &chat("gpt-4o")).await).await;
    assert_eq!(status, 502, "{body}");
}

#[tokio::test]
async fn no_first_token_in_time_is_a_504() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.first_token_timeout_ms = 300;
    })
    .await;
    for model in ["hang-headers", "hang-body", "mock-hang"] {
        let (status, _, body) =
            error_of(app.post("/v1/chat/completions", &chat(model)).await).await;
        assert_eq!(status, 504, "{model}: {body}");
        assert_eq!(body["error"]["code"], "upstream_timeout");
    }
    app.wait_metric("sluice_chat_requests_total{outcome=\"timed_out\"}", 3.0)
        .await;
}

/// The payloads of a stream that failed after its first token: content, then one error.
async fn failed_stream(app: &TestApp, model: &str) -> Vec<Value> {
    let response = app.post("/v1/chat/completions", &chat(model)).await;
    assert_eq!(response.status(), 200, "{model}: the stream had started");
    let p = payloads(&all_events(response).await);
    assert!(
        !p.contains(&json!("[DONE]")),
        "{model}: a failed stream must not end with [DONE]: {p:?}"
    );
    let last = p.last().expect("events");
    assert!(
        last["error"]["message"].is_string(),
        "{model}: last event is an error: {p:?}"
    );
    assert!(
        p.iter().all(|c| c["choices"][0]["finish_reason"].is_null()),
        "{model}: no success finish: {p:?}"
    );
    p
}

#[tokio::test]
async fn failures_after_the_first_token_end_with_an_error_not_done() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let p = failed_stream(&app, "midstream-error").await;
    let message = p.last().expect("error")["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("upstream overloaded"), "{message}");
    assert!(
        !p.iter()
            .any(|c| c["choices"][0]["delta"]["content"] == " after"),
        "nothing after the upstream's error is relayed"
    );
    failed_stream(&app, "abort").await;
    failed_stream(&app, "garbage").await;
    failed_stream(&app, "no-finish").await;
    failed_stream(&app, "mock-error-after").await;
    app.wait_metric(
        "sluice_chat_requests_total{outcome=\"upstream_error\"}",
        5.0,
    )
    .await;
}

#[tokio::test]
async fn a_stream_that_stalls_after_its_first_token_ends_within_the_idle_limit() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.idle_timeout_ms = 300;
    })
    .await;
    for model in ["stall", "mock-stall"] {
        let p = failed_stream(&app, model).await;
        assert_eq!(
            p.last().expect("error")["error"]["code"],
            "upstream_timeout"
        );
    }
    // The upstream was told: its connection closed.
    upstream.closed(1).await;
}

#[tokio::test]
async fn api_chat_reports_failures_as_error_events() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app
        .post("/api/chat", &json!({"prompt": "Hi", "model": "abort"}))
        .await;
    assert_eq!(response.status(), 200);
    let e = all_events(response).await;
    let names: Vec<&str> = e.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"meta"));
    assert_eq!(names.last(), Some(&"error"));
    assert!(!names.contains(&"done"));

    let response = app
        .post("/api/chat", &json!({"prompt": "Hi", "model": "status-429"}))
        .await;
    assert_eq!(response.status(), 429);
}

#[tokio::test]
async fn a_slow_first_token_gets_keep_alive_comments() {
    let app = TestApp::spawn_with(|c| {
        c.keepalive_s = 0.1;
        c.first_token_timeout_ms = 60_000;
    })
    .await;
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .json(&chat("mock-hang"))
        .send()
        .await
        .expect("answers");
    // Past the commit window the stream starts, so proxies see bytes while the model thinks.
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.matches(": keep-alive").count() < 2 {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("keep-alives arrive")
            .expect("the stream stays open")
            .expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(body);
    app.wait_metric("sluice_active_streams", 0.0).await;
}

#[tokio::test]
async fn sse_framing_survives_awkward_text() {
    // Newlines, quotes and unicode inside tokens must not break SSE framing.
    let reply = "line one\n\ndata: not an event \"quoted\" \u{1F600} \u{00E9}t\u{00E9}";
    let path = fixtures("(?i)awkward", reply);
    let app = TestApp::spawn_with(|c| c.mock_fixtures = Some(path)).await;
    let response = app
        .post(
            "/v1/chat/completions",
            &json!({"model": "mock", "stream": true, "messages": [{"role": "user", "content": "Say something AWKWARD"}]}),
        )
        .await;
    let mut stream = events(response);
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).expect("JSON");
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    assert_eq!(text, reply);
}
