//! Bad input gets a 4xx with OpenAI's error body, and nothing else happens: no backend is
//! called, nothing is counted.

use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp};

async fn assert_error(response: reqwest::Response, status: u16, param: Option<&str>) -> Value {
    assert_eq!(response.status(), status);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("application/json")
    );
    let body: Value = response.json().await.expect("a JSON body");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("code").is_some() && error.get("param").is_some(),
        "{body}"
    );
    if let Some(param) = param {
        assert_eq!(error["param"], param, "{body}");
    }
    body
}

#[tokio::test]
async fn malformed_bodies_are_400s() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let raw = |body: &'static str| {
        app.http
            .post(app.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in ["{not json", "[1,2]", "42", "\"text\"", "null", ""] {
        assert_error(raw(body).await.expect("answers"), 400, None).await;
    }
    let cases = [
        (json!({"model": "gpt-4o"}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
            "model",
        ),
        (json!({"model": "gpt-4o", "messages": []}), "messages"),
        (
            json!({"model": "gpt-4o", "messages": [{"content": "Hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "gpt-4o", "messages": [{"role": "wizard", "content": "Hi"}]}),
            "messages[0].role",
        ),
        (json!({"model": "gpt-4o", "messages": "Hi"}), "messages"),
        (
            json!({"model": "gpt-4o", "stream": "yes", "messages": [{"role": "user", "content": "Hi"}]}),
            "stream",
        ),
        (
            json!({"model": "gpt-4o", "max_tokens": -1, "messages": [{"role": "user", "content": "Hi"}]}),
            "max_tokens",
        ),
        (
            json!({"model": "gpt-4o", "n": 3, "messages": [{"role": "user", "content": "Hi"}]}),
            "n",
        ),
        (
            json!({"model": 7, "messages": [{"role": "user", "content": "Hi"}]}),
            "model",
        ),
    ];
    for (body, param) in cases {
        let response = app.post("/v1/chat/completions", &body).await;
        assert_error(response, 400, Some(param)).await;
    }
    assert!(
        upstream.requests().is_empty(),
        "no bad request reaches the upstream"
    );
    assert_eq!(
        app.metric("sluice_chat_requests_total{outcome=\"completed\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn an_unknown_model_is_404_model_not_found() {
    // With no default upstream only sluice's own models exist.
    let app = TestApp::spawn().await;
    let body = json!({"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]});
    let error = assert_error(
        app.post("/v1/chat/completions", &body).await,
        404,
        Some("model"),
    )
    .await;
    assert_eq!(error["error"]["code"], "model_not_found");
    let error = assert_error(
        app.post("/api/chat", &json!({"prompt": "Hi", "model": "gpt-9"}))
            .await,
        404,
        Some("model"),
    )
    .await;
    assert_eq!(error["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn transport_mistakes_have_their_own_statuses() {
    let app = TestApp::spawn().await;
    let url = app.url("/v1/chat/completions");
    let big = format!(
        "{{\"model\":\"mock\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(1024 * 1024 + 1)
    );
    let response = app
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("answers");
    assert_error(response, 413, None).await;

    let response = app
        .http
        .post(&url)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .expect("answers");
    assert_error(response, 415, None).await;

    let response = app.http.get(&url).send().await.expect("answers");
    assert_error(response, 405, None).await;
    let response = app
        .http
        .get(app.url("/v1/nothing"))
        .send()
        .await
        .expect("answers");
    assert_error(response, 404, None).await;
}

#[tokio::test]
async fn api_chat_validates_its_fields() {
    let app = TestApp::spawn().await;
    for (body, param) in [
        (json!({"model": "mock"}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": "Hi", "temperature": "hot"}), "temperature"),
        (
            json!({"prompt": "Hi", "history": [{"role": "system", "content": "x"}]}),
            "history[0].role",
        ),
        (json!({"prompt": "Hi", "template": "translate"}), "vars"),
        // The template itself is what is wrong, not its variables.
        (
            json!({"prompt": "Hi", "template": "no-such-template"}),
            "template",
        ),
        (json!({"prompt": "Hi", "colour": "blue"}), "colour"),
    ] {
        let response = app.post("/api/chat", &body).await;
        let status = response.status();
        let error: Value = response.json().await.expect("JSON");
        assert_eq!(status, 400, "{body} → {error}");
        assert_eq!(error["error"]["param"], param, "{body} → {error}");
    }
}
