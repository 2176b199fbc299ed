//! Measures what sluice adds, against a minimal upstream on loopback, in one run:
//! - cancellation: from a client dropping its stream to the upstream seeing its response
//!   dropped (its connection closing), mid-stream and while the upstream is silent;
//! - time to first byte of content through sluice minus directly to the upstream.
//!
//! `cargo run --release --example latency -- [trials]` (default 200).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// When the upstream's last response body was dropped: what it saw of the client leaving.
#[derive(Clone, Default)]
struct Upstream {
    closed: Arc<Mutex<Option<Instant>>>,
    changed: Arc<Notify>,
}

struct OnDrop(Upstream);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Ok(mut closed) = self.0.closed.lock() {
            *closed = Some(Instant::now());
        }
        self.0.changed.notify_waiters();
    }
}

fn chunk(content: &str) -> Bytes {
    let c = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    Bytes::from(format!("data: {c}\n\n"))
}

/// `model` "quick": one token and done; "busy": a token every 5 ms; "silent": one token,
/// then nothing.
async fn completions(State(up): State<Upstream>, body: String) -> Response {
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or("quick").to_owned();
    let guard = OnDrop(up);
    let frames = async_stream::stream! {
        let _guard = guard;
        yield Ok::<_, Infallible>(chunk("Hello"));
        match model.as_str() {
            "busy" => loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                yield Ok(chunk(" more"));
            },
            "silent" => futures::future::pending::<()>().await,
            _ => {
                let end = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
                yield Ok(Bytes::from(format!("data: {end}\n\ndata: [DONE]\n\n")));
            }
        }
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(frames))
        .unwrap_or_default()
}

async fn serve_upstream() -> (String, Upstream) {
    let up = Upstream::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/v1", listener.local_addr().expect("addr"));
    #[expect(clippy::disallowed_methods, reason = "the benchmark's own upstream")]
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, up)
}

async fn serve_sluice(upstream: &str) -> String {
    let mut config = sluice::Config::defaults();
    // No ledger: what is measured here is the stream.
    config.database_url = "off".into();
    config.openai_base_url = Some(upstream.to_owned());
    // Over 600 requests in a minute: the default request rate would refuse some.
    config.rpm = 1_000_000;
    let state = sluice::AppState::build(&config).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/v1", listener.local_addr().expect("addr"));
    #[expect(clippy::disallowed_methods, reason = "sluice under measurement")]
    tokio::spawn(sluice::serve(
        listener,
        state,
        std::future::pending(),
        Duration::ZERO,
    ));
    base
}

/// Time from sending the request to the first byte of content.
async fn first_content(http: &reqwest::Client, base: &str, model: &str) -> Duration {
    let body =
        json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "Hi"}]});
    first_hello(http, &format!("{base}/chat/completions"), &body).await
}

/// The same through sluice's Responses API (translated to chat completions upstream), to
/// its first `response.output_text.delta`.
async fn first_content_responses(http: &reqwest::Client, base: &str, model: &str) -> Duration {
    let body = json!({"model": model, "stream": true, "input": "Hi", "store": false});
    first_hello(http, &format!("{base}/responses"), &body).await
}

/// The same through sluice's Messages API, to its first `text_delta`.
async fn first_content_messages(http: &reqwest::Client, base: &str, model: &str) -> Duration {
    let body = json!({"model": model, "stream": true, "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hi"}]});
    first_hello(http, &format!("{base}/messages"), &body).await
}

async fn first_hello(http: &reqwest::Client, url: &str, body: &serde_json::Value) -> Duration {
    let start = Instant::now();
    let response = http.post(url).json(body).send().await.expect("answers");
    let mut body = response.bytes_stream();
    let mut seen = Vec::new();
    while let Some(bytes) = body.next().await {
        seen.extend_from_slice(&bytes.expect("bytes"));
        if seen.windows(7).any(|w| w == b"\"Hello\"") {
            return start.elapsed();
        }
    }
    panic!("no content arrived: {}", String::from_utf8_lossy(&seen));
}

/// Opens a stream through sluice, reads the first content, drops it; how long until the
/// upstream's response was dropped.
async fn cancel_latency(
    http: &reqwest::Client,
    sluice: &str,
    up: &Upstream,
    model: &str,
) -> Duration {
    if let Ok(mut closed) = up.closed.lock() {
        *closed = None;
    }
    first_content(http, sluice, model).await;
    // `first_content` dropped the body on return: the client has left.
    let left = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let changed = up.changed.notified();
        if let Some(at) = up.closed.lock().ok().and_then(|c| *c) {
            return at.saturating_duration_since(left);
        }
        tokio::time::timeout_at(deadline, changed)
            .await
            .expect("the upstream saw the close within 5 s");
    }
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:<44} p50 {:>9.3} ms   p99 {:>9.3} ms   max {:>9.3} ms   (n = {})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
        samples.len()
    );
}

#[tokio::main]
async fn main() {
    let trials: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let (upstream, up) = serve_upstream().await;
    let sluice = serve_sluice(&upstream).await;
    let http = reqwest::Client::new();
    // Warm both paths (connections, tokenizer).
    for _ in 0..20 {
        first_content(&http, &upstream, "quick").await;
        first_content(&http, &sluice, "quick").await;
    }

    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        direct.push(first_content(&http, &upstream, "quick").await);
        through.push(first_content(&http, &sluice, "quick").await);
    }
    let mut added: Vec<Duration> = through
        .iter()
        .zip(&direct)
        .map(|(t, d)| t.saturating_sub(*d))
        .collect();
    added.sort();
    summary("time to first content, direct", direct);
    summary("time to first content, through sluice", through);
    summary("added by sluice (paired)", added);

    // The Responses API, translated: its first text delta against the direct chat stream.
    for _ in 0..20 {
        first_content_responses(&http, &sluice, "quick").await;
    }
    let (mut direct, mut responses) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        direct.push(first_content(&http, &upstream, "quick").await);
        responses.push(first_content_responses(&http, &sluice, "quick").await);
    }
    let added: Vec<Duration> = responses
        .iter()
        .zip(&direct)
        .map(|(t, d)| t.saturating_sub(*d))
        .collect();
    summary("first text, /v1/responses through sluice", responses);
    summary("added by sluice + translation (paired)", added);

    // Anthropic's Messages API, translated the same way.
    for _ in 0..20 {
        first_content_messages(&http, &sluice, "quick").await;
    }
    let (mut direct, mut messages) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        direct.push(first_content(&http, &upstream, "quick").await);
        messages.push(first_content_messages(&http, &sluice, "quick").await);
    }
    let added: Vec<Duration> = messages
        .iter()
        .zip(&direct)
        .map(|(t, d)| t.saturating_sub(*d))
        .collect();
    summary("first text, /v1/messages through sluice", messages);
    summary("added by sluice + translation (paired)", added);

    let mut busy = Vec::new();
    let mut silent = Vec::new();
    for _ in 0..trials {
        busy.push(cancel_latency(&http, &sluice, &up, "busy").await);
        silent.push(cancel_latency(&http, &sluice, &up, "silent").await);
    }
    summary("client drop → upstream close, mid-stream", busy);
    summary("client drop → upstream close, upstream silent", silent);
}
