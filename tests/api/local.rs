//! The in-process model with the real SmolLM2 weights (`scripts/fetch-model.sh`): real
//! answers in OpenAI's format, determinism, cancellation that stops generation, whole UTF-8
//! characters, a bounded queue; the prefix cache (a hit gives what a miss gives, a turn
//! computes only its new tokens, memory within its budget), batched decoding (each
//! sequence gets what it would alone; a cancel stops only its own) and the whole context.

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
    local(|c| c.local_queue = queue).await
}

/// sluice serving the local model, with `adjust`'s settings.
async fn local(adjust: impl FnOnce(&mut sluice::Config)) -> TestApp {
    TestApp::spawn_with(|c| {
        c.local_model = Some(WEIGHTS.into());
        adjust(c);
    })
    .await
}

/// A whole (not streamed) greedy reply to `messages`: its text and usage.
async fn reply(app: &TestApp, messages: &Value, max_tokens: u32) -> (String, Value) {
    let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": max_tokens,
        "messages": messages});
    let answer = app.post_json("/v1/chat/completions", &body).await;
    let text = answer["choices"][0]["message"]["content"].as_str();
    let text = text
        .unwrap_or_else(|| panic!("no reply: {answer}"))
        .to_owned();
    (text, answer["usage"].clone())
}

fn cached(usage: &Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

/// The streamed text of a greedy reply.
async fn streamed(app: &TestApp, body: &Value) -> String {
    content(&payloads(
        &all_events(app.post("/v1/chat/completions", body).await).await,
    ))
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
    let app = local(|c| {
        c.local_queue = 1;
        c.local_batch = 1;
    })
    .await;
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

#[tokio::test]
async fn a_cache_hit_gives_the_tokens_a_miss_gives() {
    if !have_weights() {
        return;
    }
    let app = local(|_| {}).await;
    let cold = local(|c| c.local_cache_mb = 0).await;
    let mut messages = json!([
        {"role": "system", "content": "You are a helpful assistant who answers in full sentences."},
        {"role": "user", "content": "Name three rivers of Europe and say where each one flows."}]);
    let (first, usage) = reply(&app, &messages, 32).await;
    assert_eq!(cached(&usage), 0, "{usage}");

    // Regenerate: the same prompt takes all of it but its last token from the cache.
    let (again, usage) = reply(&app, &messages, 32).await;
    assert_eq!(again, first);
    let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
    assert_eq!(cached(&usage), prompt - 1, "{usage}");

    // The next turn: with the conversation's state kept, and computed from nothing.
    let list = messages.as_array_mut().expect("messages");
    list.push(json!({"role": "assistant", "content": first}));
    list.push(json!({"role": "user", "content": "Which of them is the longest?"}));
    let (hit, usage) = reply(&app, &messages, 32).await;
    let (miss, cold_usage) = reply(&cold, &messages, 32).await;
    assert_eq!(hit, miss, "a cache hit and a miss disagree");
    assert!(cached(&usage) >= prompt, "{usage}");
    assert_eq!(cached(&cold_usage), 0, "{cold_usage}");
    assert_eq!(usage["prompt_tokens"], cold_usage["prompt_tokens"]);
}

#[tokio::test]
async fn a_conversations_third_turn_computes_only_its_new_tokens() {
    if !have_weights() {
        return;
    }
    let app = local(|_| {}).await;
    let computed = "sluice_local_prompt_tokens_total{source=\"computed\"}";
    let mut messages =
        vec![json!({"role": "user", "content": "Tell me about the moon in two sentences."})];
    let mut previous = 0;
    for turn in 1..=3 {
        let before = app.metric(computed).await;
        let (text, usage) = reply(&app, &json!(messages), 24).await;
        let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
        let reused = cached(&usage);
        let counted = app.metric(computed).await - before;
        eprintln!(
            "turn {turn}: {prompt} prompt tokens, {reused} from the cache, {counted} computed"
        );
        assert_eq!(counted, (prompt - reused) as f64, "turn {turn}: {usage}");
        if turn == 3 {
            // Every token the last turn computed was kept (its prompt, and its reply but
            // the last token, which the length limit left unread): only the new message
            // and what the template puts around it are computed.
            assert!(reused >= previous - 1, "turn 3 reused {reused} of {prompt}");
            assert!(
                prompt - reused < 30,
                "turn 3 computed {} tokens",
                prompt - reused
            );
        }
        previous = prompt + usage["completion_tokens"].as_u64().unwrap_or(0);
        messages.push(json!({"role": "assistant", "content": text}));
        messages.push(json!({"role": "user", "content": format!("And what else? ({turn})")}));
    }
}

#[tokio::test]
async fn four_streams_at_once_each_get_what_they_would_alone() {
    if !have_weights() {
        return;
    }
    // No cache: alone and together, every prompt is computed the same way.
    let app = local(|c| c.local_cache_mb = 0).await;
    let bodies: Vec<Value> = ["rivers", "mountains", "colours", "planets"]
        .iter()
        .map(|topic| ask(&format!("List five {topic}, one per line."), 40))
        .collect();
    let mut alone = Vec::new();
    for body in &bodies {
        alone.push(streamed(&app, body).await);
    }
    let together = futures::future::join_all(bodies.iter().map(|body| streamed(&app, body))).await;
    assert_eq!(together, alone);
    assert!(alone.iter().all(|text| !text.is_empty()));
}

#[tokio::test]
async fn a_cancel_inside_a_batch_stops_that_sequence_only() {
    if !have_weights() {
        return;
    }
    let app = local(|c| c.local_cache_mb = 0).await;
    let count = ask("Count from 1 to 300, separated by commas.", 400);
    let mut other = ask("Count from 500 to 600, separated by commas.", 60);
    other["stream_options"] = json!({"include_usage": true});
    let alone = streamed(&app, &other).await;
    let before = app.metric("sluice_local_tokens_generated_total").await;

    let mut cancelled = events(app.post("/v1/chat/completions", &count).await);
    for _ in 0..6 {
        cancelled.next().await.expect("a chunk");
    }
    let beside = tokio::spawn({
        let app_url = app.url("/v1/chat/completions");
        let http = app.http.clone();
        async move {
            let response = http
                .post(app_url)
                .json(&other)
                .send()
                .await
                .expect("answers");
            let p = payloads(&all_events(response).await);
            (content(&p), p)
        }
    });
    drop(cancelled);
    app.wait_metric("sluice_chat_requests_total{outcome=\"cancelled\"}", 1.0)
        .await;
    let (text, p) = beside.await.expect("the other stream");
    assert_eq!(text, alone, "the other sequence went on as it would alone");

    // What the model computed since: the other reply (and its end token) and the few
    // tokens of the cancelled one before it left the batch.
    let usage = p
        .iter()
        .find(|c| c["usage"].is_object())
        .map(|c| c["usage"].clone())
        .expect("usage");
    let stop = p.iter().any(|c| c["choices"][0]["finish_reason"] == "stop");
    let tokens = usage["completion_tokens"].as_f64().unwrap_or(-1.0) + f64::from(u8::from(stop));
    let generated = app.metric("sluice_local_tokens_generated_total").await - before;
    let first = generated - tokens;
    eprintln!("the cancelled sequence computed about {first} tokens; its client read 5");
    assert!(
        first < 30.0,
        "{first} tokens computed for a client that left"
    );
}

#[tokio::test]
async fn a_prompt_of_eight_thousand_tokens_is_served_and_a_longer_one_refused() {
    if !have_weights() {
        return;
    }
    // A debug build on two busy cores reads 8,000 tokens in well over a minute.
    let app = local(|c| c.first_token_timeout_ms = 900_000).await;
    let words = |n: usize| -> String {
        let words = ["river", "stone", "bridge", "field", "harbour"];
        (0..n)
            .map(|i| words[i % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let long =
        json!([{"role": "user", "content": format!("{} Which word came first?", words(7_950))}]);
    let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 4, "messages": long});
    let started = std::time::Instant::now();
    let answer = app.post_json("/v1/chat/completions", &body).await;
    eprintln!(
        "{} prompt tokens answered in {:?}",
        answer["usage"]["prompt_tokens"],
        started.elapsed()
    );
    let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert!((7_950..8_192).contains(&prompt), "{answer}");
    let finish = &answer["choices"][0]["finish_reason"];
    assert!(finish == "stop" || finish == "length", "{answer}");

    let longer = json!({"model": "smollm2", "max_tokens": 4,
        "messages": [{"role": "user", "content": words(9_000)}]});
    let response = app.post("/v1/chat/completions", &longer).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
}

#[tokio::test]
async fn the_cache_stays_within_its_budget_after_a_hundred_prompts() {
    if !have_weights() {
        return;
    }
    let budget = 4.0 * 1024.0 * 1024.0;
    let app = local(|c| c.local_cache_mb = 4).await;
    let mut held = 0.0;
    for i in 0..100 {
        let prompt = json!([{"role": "user", "content": format!("Prompt {i}: name one colour.")}]);
        reply(&app, &prompt, 2).await;
        held = app.metric("sluice_local_cache_bytes").await;
        assert!(
            held <= budget,
            "after {} prompts the cache holds {held} bytes",
            i + 1
        );
    }
    assert!(held > budget / 2.0, "the cache is used: {held} bytes");
}
