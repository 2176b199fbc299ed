//! Cancellation by drop: when the client goes away, the upstream sees its connection close —
//! before the first token, mid-stream, idle between chunks, and for non-streamed requests.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp, events};

/// Generous: a close that waited on anything (a next chunk, a timeout) would take seconds.
const PROMPT_CLOSE: Duration = Duration::from_secs(1);

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]})
}

/// Sends a request in a task the test can abort, as a client process that goes away.
fn send(app: &TestApp, body: Value) -> tokio::task::JoinHandle<()> {
    let request = app.http.post(app.url("/v1/chat/completions")).json(&body);
    tokio::spawn(async move {
        if let Ok(response) = request.send().await {
            let mut body = response.bytes_stream();
            while body.next().await.is_some() {}
        }
    })
}

async fn assert_cancelled(app: &TestApp, upstream: &FakeUpstream, dropped: Instant) {
    let closed = upstream.closed(1).await;
    let after = closed.saturating_duration_since(dropped);
    eprintln!("upstream connection closed {after:?} after the client left");
    assert!(after < PROMPT_CLOSE, "closed only after {after:?}");
    app.wait_metric("sluice_chat_requests_total{outcome=\"cancelled\"}", 1.0)
        .await;
    app.wait_metric("sluice_active_streams", 0.0).await;
    app.wait_metric("sluice_upstream_requests_in_flight", 0.0)
        .await;
}

#[tokio::test]
async fn mid_stream() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app.post("/v1/chat/completions", &chat("slow", true)).await;
    let mut stream = events(response);
    for _ in 0..3 {
        stream.next().await.expect("a chunk");
    }
    assert!(upstream.is_open(1));
    drop(stream);
    assert_cancelled(&app, &upstream, Instant::now()).await;
}

#[tokio::test]
async fn while_the_upstream_is_silent_between_chunks() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app.post("/v1/chat/completions", &chat("stall", true)).await;
    let mut stream = events(response);
    stream.next().await.expect("the role chunk");
    stream.next().await.expect("the first token");
    drop(stream);
    assert_cancelled(&app, &upstream, Instant::now()).await;
}

#[tokio::test]
async fn before_the_upstream_answers() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let client = send(&app, chat("hang-headers", true));
    upstream.request(1).await;
    client.abort();
    let _ = client.await;
    assert_cancelled(&app, &upstream, Instant::now()).await;
}

#[tokio::test]
async fn before_the_first_token() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let client = send(&app, chat("hang-body", true));
    upstream.request(1).await;
    client.abort();
    let _ = client.await;
    assert_cancelled(&app, &upstream, Instant::now()).await;
}

#[tokio::test]
async fn a_request_that_is_not_streamed() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let client = send(&app, chat("slow", false));
    upstream.request(1).await;
    client.abort();
    let _ = client.await;
    assert_cancelled(&app, &upstream, Instant::now()).await;
}

#[tokio::test]
async fn the_mock_model_stops_generating() {
    let app = TestApp::spawn_with(|c| c.mock_tokens_per_s = 100.0).await;
    let response = app.post("/v1/chat/completions", &chat("mock", true)).await;
    let mut stream = events(response);
    for _ in 0..3 {
        stream.next().await.expect("a chunk");
    }
    drop(stream);
    app.wait_metric("sluice_chat_requests_total{outcome=\"cancelled\"}", 1.0)
        .await;
    let generated = app.metric("sluice_mock_tokens_generated_total").await;
    assert!(
        generated < 40.0,
        "the whole reply was generated: {generated}"
    );

    // A second reply of exactly 10 tokens takes 100 ms at this pace: if the first were still
    // generating, the count would grow by more than 10.
    let mut body = chat("mock", false);
    body["max_tokens"] = json!(10);
    let reply = app.post("/v1/chat/completions", &body).await;
    assert_eq!(reply.status(), 200);
    assert_eq!(
        app.metric("sluice_mock_tokens_generated_total").await,
        generated + 10.0
    );
}
