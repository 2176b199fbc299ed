//! The in-process model with the real SmolLM2 weights (`scripts/fetch-model.sh`): real
//! answers in OpenAI's format, determinism, cancellation that stops generation, whole UTF-8
//! characters, and a bounded queue.

use futures::StreamExt;
use serde_json::{Value, json};
use sluice::backend::local::{TextStream, load_tokenizer};

use crate::support::{TestApp, all_events, content, events, payloads, skip_without};

const WEIGHTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn have_weights() -> bool {
    std::path::Path::new(WEIGHTS).exists()
        || !skip_without("the SmolLM2 weights (run scripts/fetch-model.sh)")
}

async fn local_app(queue: u32) -> TestApp {
    TestApp::spawn_with(|c| {
        c.local_model = Some(WEIGHTS.into());
        c.local_queue = queue;
    })
    .await
}

fn ask(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": prompt}]})
}

#[tokio::test]
async fn answers_a_factual_question_in_openai_chunks() {
    if !have_weights() {
        return;
    }
    let app = local_app(4).await;
    let mut body = ask("What is the capital of France?", 40);
    body["stream_options"] = json!({"include_usage": true});
    let response = app.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let p = payloads(&all_events(response).await);
    assert_eq!(p[0]["choices"][0]["delta"]["role"], "assistant");
    let text = content(&p);
    assert!(text.contains("Paris"), "{text}");
    let n = p.len();
    assert_eq!(p[n - 1], json!("[DONE]"));
    let usage = &p[n - 2]["usage"];
    assert!(usage["prompt_tokens"].as_u64() > Some(10), "{usage}");
    assert!(usage["completion_tokens"].as_u64() > Some(0), "{usage}");
    assert!(p[n - 3]["choices"][0]["finish_reason"].is_string());

    // It is the default model now, and listed first.
    assert_eq!(app.get_json("/v1/models").await["data"][0]["id"], "smollm2");
    let events = all_events(
        app.post("/api/chat", &json!({"prompt": "Hi", "max_tokens": 3}))
            .await,
    )
    .await;
    let meta: Value = serde_json::from_str(&events[0].data).expect("JSON");
    assert_eq!(meta["model"], "smollm2");
}

#[tokio::test]
async fn the_same_seed_gives_the_same_text() {
    if !have_weights() {
        return;
    }
    let app = local_app(4).await;
    let mut replies = Vec::new();
    let mut greedy = ask("Name three colours.", 24);
    greedy["stream"] = json!(false);
    for body in [
        greedy.clone(),
        greedy,
        json!({"model": "smollm2", "seed": 42, "temperature": 0.9, "max_tokens": 24,
            "messages": [{"role": "user", "content": "Write a line about rivers."}]}),
        json!({"model": "smollm2", "seed": 42, "temperature": 0.9, "max_tokens": 24,
            "messages": [{"role": "user", "content": "Write a line about rivers."}]}),
    ] {
        let reply = app.post_json("/v1/chat/completions", &body).await;
        replies.push(
            reply["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert!(!replies[0].is_empty());
    assert_eq!(replies[0], replies[1], "temperature 0");
    assert_eq!(replies[2], replies[3], "seed 42");
}

#[tokio::test]
async fn a_client_that_leaves_stops_generation() {
    if !have_weights() {
        return;
    }
    let app = local_app(4).await;
    let response = app
        .post(
            "/v1/chat/completions",
            &ask("Count from 1 to 300, separated by commas.", 400),
        )
        .await;
    let mut stream = events(response);
    for _ in 0..6 {
        stream.next().await.expect("a chunk");
    }
    drop(stream);
    app.wait_metric("sluice_chat_requests_total{outcome=\"cancelled\"}", 1.0)
        .await;

    // The model serves one request at a time, so this one starts only once the first has
    // stopped; its own count is known, so what remains is what the first computed.
    let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello."}]});
    let reply = app.post_json("/v1/chat/completions", &body).await;
    let tokens = reply["usage"]["completion_tokens"].as_f64().unwrap_or(-1.0);
    // A reply that ended on its own also computed its end-of-turn token.
    let stop_token = if reply["choices"][0]["finish_reason"] == "stop" {
        1.0
    } else {
        0.0
    };
    let total = app.metric("sluice_local_tokens_generated_total").await;
    let first = total - tokens - stop_token;
    eprintln!("the cancelled request computed {first} tokens; its client read 5");
    // What the client read, what sluice had sent on, the small channel, the one in flight:
    // nowhere near the 400 it asked for.
    assert!((5.0..20.0).contains(&first), "{first} tokens computed");
}

#[test]
fn text_streams_in_whole_characters() {
    if !have_weights() {
        return;
    }
    let tokenizer = load_tokenizer(WEIGHTS.as_ref()).expect("the tokenizer loads");
    // SmolLM's pre-tokenizer: no space is added before "system" (9690, not 817).
    let ids = tokenizer
        .encode("<|im_start|>system", false)
        .expect("encodes");
    assert_eq!(ids.get_ids(), [1, 9690]);

    let text = "Grüße aus Köln! 東京は晴れ 🎉🦀 naïve café — ok";
    let ids = tokenizer
        .encode(text, false)
        .expect("encodes")
        .get_ids()
        .to_vec();
    assert!(ids.len() > 10);
    let mut stream = TextStream::default();
    let mut out = String::new();
    let mut held = 0;
    for end in 1..=ids.len() {
        match stream.push(&tokenizer, &ids[..end]) {
            Some(piece) => {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "a broken character in {piece:?}"
                );
                out.push_str(&piece);
            }
            None => held += 1,
        }
    }
    out.push_str(&stream.finish(&tokenizer, &ids).unwrap_or_default());
    assert_eq!(out, text);
    assert!(held > 0, "some token split a character and was held");
}

#[tokio::test]
async fn requests_queue_for_the_model_and_a_full_queue_is_a_503() {
    if !have_weights() {
        return;
    }
    let app = local_app(1).await;
    let long = ask("Count from 1 to 300, separated by commas.", 300);
    // The first request holds the model (once its first token arrives)...
    let mut first = events(app.post("/v1/chat/completions", &long).await);
    while let Some(event) = first.next().await {
        if event.data.contains("\"content\":\"") && !event.data.contains("\"content\":\"\"") {
            break;
        }
    }
    // ...the second waits, and is told where it stands...
    let second = app
        .http
        .post(app.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .expect("answers");
    assert_eq!(second.status(), 200);
    let mut raw = second.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(": queued: 1 ahead") {
        let chunk = raw.next().await.expect("a keep-alive").expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // ...and a third finds the queue full.
    let third = app.post("/v1/chat/completions", &long).await;
    assert_eq!(third.status(), 503);
    let retry_after: u64 = third.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    let body: Value = third.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "model_overloaded");
}
