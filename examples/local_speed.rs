//! The local model's speed on this machine, in one run, beside llama.cpp's on the same file
//! when `LLAMA_BENCH=path/to/llama-bench` is set (docs/src/local-model.md says how to build it):
//! - prefill at 512 and 2,048 tokens and decode of 128 tokens, as `llama-bench` measures
//!   them (`pp512`, `pp2048`, `tg128`: random tokens, two threads), and four sequences
//!   decoding together;
//! - through sluice's HTTP API: a ~2,400-token conversation's first token, then its next
//!   turn's (the prefix cache), and four concurrent streams against one.
//!
//! `cargo run --release --example local_speed` (the weights come with `cargo run` or
//! `scripts/fetch-model.sh`); `-- --short`: small sizes, one run (CI runs it so).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use sluice::backend::local::model::{self, Kv, Llama, PREFILL_CHUNK, Rows};

const WEIGHTS: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Sizes {
    runs: usize,
    prefill: [usize; 2],
    decode: usize,
    /// Sentences of filler in the conversation (~35 tokens each).
    sentences: usize,
}

const FULL: Sizes = Sizes {
    runs: 3,
    prefill: [512, 2048],
    decode: 128,
    sentences: 67,
};
const SHORT: Sizes = Sizes {
    runs: 1,
    prefill: [64, 128],
    decode: 16,
    sentences: 8,
};

/// Tokens as llama-bench feeds them: arbitrary ids, the same every run.
fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1000 + (i.wrapping_mul(2_654_435_761) ^ seed) % 40_000)
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn prefill(model: &Llama, n: usize) -> f64 {
    let prompt = tokens(n, 7);
    let mut kv = Kv::new(&model.dims);
    let started = Instant::now();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        model
            .forward(&mut [Rows {
                kv: &mut kv,
                tokens: chunk,
                logits: false,
            }])
            .expect("prefill");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Tokens per second of `batch` sequences decoding `n` tokens each from an empty context.
fn decode(model: &Llama, batch: usize, n: usize) -> f64 {
    let mut kvs: Vec<Kv> = (0..batch).map(|_| Kv::new(&model.dims)).collect();
    let feed: Vec<Vec<u32>> = (0..batch as u32).map(|s| tokens(n, s)).collect();
    let started = Instant::now();
    for i in 0..n {
        let mut rows: Vec<Rows> = kvs
            .iter_mut()
            .zip(&feed)
            .map(|(kv, feed)| Rows {
                kv,
                tokens: &feed[i..i + 1],
                logits: true,
            })
            .collect();
        model.forward(&mut rows).expect("decode");
    }
    (batch * n) as f64 / started.elapsed().as_secs_f64()
}

/// llama-bench's pp and tg figures on the same file, two threads: `(test, tokens/s)`.
fn llama_bench(path: &str, sizes: &Sizes) -> Vec<(String, f64)> {
    let prompts = format!("{},{}", sizes.prefill[0], sizes.prefill[1]);
    let output = std::process::Command::new(path)
        .args(["-m", WEIGHTS, "-t", "2", "-r", "3", "-o", "json"])
        .args(["-p", &prompts, "-n", &sizes.decode.to_string()])
        .output()
        .expect("LLAMA_BENCH runs");
    let runs: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "llama-bench gave no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    runs.iter()
        .map(|r| {
            let (p, n) = (r["n_prompt"].as_u64(), r["n_gen"].as_u64());
            let test = match (p, n) {
                (Some(p), Some(0)) => format!("pp{p}"),
                (_, Some(n)) => format!("tg{n}"),
                _ => "?".into(),
            };
            (test, r["avg_ts"].as_f64().unwrap_or(0.0))
        })
        .collect()
}

/// What a client sees of one streamed reply.
struct Seen {
    first: Duration,
    total: Duration,
    usage: Value,
}

async fn stream(http: &reqwest::Client, url: &str, body: &Value) -> Seen {
    let started = Instant::now();
    let response = http.post(url).json(body).send().await.expect("answers");
    let status = response.status();
    let mut bytes = response.bytes_stream();
    let (mut first, mut usage, mut buffer) = (None, Value::Null, String::new());
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                first.get_or_insert_with(|| started.elapsed());
            }
            if chunk["usage"].is_object() {
                usage = chunk["usage"].clone();
            }
        }
    }
    Seen {
        first: first.unwrap_or_else(|| panic!("no content came through sluice ({status})")),
        total: started.elapsed(),
        usage,
    }
}

fn ask(messages: &Value, max_tokens: usize) -> Value {
    json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": max_tokens,
        "stream_options": {"include_usage": true}, "messages": messages})
}

/// A conversation of three turns whose prompt is about `35 · sentences` tokens.
fn conversation(sentences: usize) -> Vec<Value> {
    let filler = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| format!("Note {i}: the ferry number {} leaves the north pier at {}:{:02} and stops at the mill, the market and the old bridge. ", i * 7 % 31, 6 + i % 12, i * 13 % 60))
            .collect()
    };
    let third = sentences / 3;
    vec![
        json!({"role": "system", "content": "You are a helpful assistant who reads timetables."}),
        json!({"role": "user", "content": format!("Here is the first part of the timetable. {}", filler(0, third))}),
        json!({"role": "assistant", "content": "Thank you, I have read the first part."}),
        json!({"role": "user", "content": format!("Here is the second part. {}", filler(third, 2 * third))}),
        json!({"role": "assistant", "content": "I have read the second part too."}),
        json!({"role": "user", "content": format!("And the last part. {} Which ferry leaves first?", filler(2 * third, sentences))}),
    ]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let sizes = if std::env::args().any(|a| a == "--short") {
        SHORT
    } else {
        FULL
    };
    let started = Instant::now();
    let model = model::load(WEIGHTS.as_ref()).expect("run scripts/fetch-model.sh first");
    println!(
        "load (re-quantised to Q8_0, padded): {:.2} s",
        secs(started.elapsed())
    );
    let mut rows: Vec<(String, f64)> = Vec::new();
    for n in sizes.prefill {
        let rates = (0..sizes.runs).map(|_| prefill(&model, n)).collect();
        rows.push((format!("pp{n}"), median(rates)));
    }
    let one = median(
        (0..sizes.runs)
            .map(|_| decode(&model, 1, sizes.decode))
            .collect(),
    );
    rows.push((format!("tg{}", sizes.decode), one));
    let four = median(
        (0..sizes.runs)
            .map(|_| decode(&model, 4, sizes.decode))
            .collect(),
    );
    drop(model);
    let theirs = std::env::var("LLAMA_BENCH")
        .ok()
        .map(|path| llama_bench(&path, &sizes));
    println!("\n| test (2 threads) | sluice tok/s | llama.cpp tok/s | sluice / llama.cpp |");
    println!("| --- | --- | --- | --- |");
    for (test, ours) in &rows {
        let theirs = theirs
            .as_ref()
            .and_then(|t| t.iter().find(|(name, _)| name == test))
            .map(|(_, ts)| *ts);
        match theirs {
            Some(ts) => println!("| {test} | {ours:.1} | {ts:.1} | {:.2} |", ours / ts),
            None => println!("| {test} | {ours:.1} | (LLAMA_BENCH unset) | |"),
        }
    }
    println!(
        "| tg{} × 4 sequences together | {four:.1} | | {:.2}× one sequence |",
        sizes.decode,
        four / one
    );

    // Through the HTTP API, as a client sees it.
    let mut config = sluice::Config::defaults();
    config.database_url = "off".into(); // what is measured here is the stream
    config.local_model = Some(WEIGHTS.into());
    let state = sluice::AppState::build(&config).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().expect("addr")
    );
    #[expect(clippy::disallowed_methods, reason = "sluice under measurement")]
    tokio::spawn(sluice::serve(
        listener,
        state,
        std::future::pending(),
        Duration::ZERO,
    ));
    let http = reqwest::Client::new();

    let mut messages = conversation(sizes.sentences);
    let cold = stream(&http, &url, &ask(&json!(messages), 24)).await;
    messages.push(json!({"role": "assistant", "content": "The first ferry leaves at six."}));
    messages.push(json!({"role": "user", "content": "And the last one?"}));
    let warm = stream(&http, &url, &ask(&json!(messages), 24)).await;
    println!(
        "\nthrough /v1/chat/completions: a {}-token conversation's first token after {:.2} s; its next turn ({} tokens, {} of them from the prefix cache) after {:.2} s",
        cold.usage["prompt_tokens"],
        secs(cold.first),
        warm.usage["prompt_tokens"],
        warm.usage["prompt_tokens_details"]["cached_tokens"],
        secs(warm.first),
    );

    let topics = [
        "a river",
        "a lighthouse",
        "a mountain village",
        "an old train",
    ];
    let story = |topic: &str| {
        ask(
            &json!([{"role": "user", "content": format!("Write a long story about {topic}.")}]),
            sizes.decode,
        )
    };
    let rate = |s: &Seen| s.usage["completion_tokens"].as_f64().unwrap_or(0.0) / secs(s.total);
    let alone = rate(&stream(&http, &url, &story("a harbour")).await);
    let started = Instant::now();
    let bodies: Vec<Value> = topics.iter().map(|t| story(t)).collect();
    let together = futures::future::join_all(bodies.iter().map(|b| stream(&http, &url, b))).await;
    let wall = secs(started.elapsed());
    let generated: f64 = together
        .iter()
        .map(|s| s.usage["completion_tokens"].as_f64().unwrap_or(0.0))
        .sum();
    let slowest = together.iter().map(rate).fold(f64::INFINITY, f64::min);
    println!(
        "one stream alone: {alone:.1} tok/s; four at once: {:.1} tok/s together ({:.2}× one), the slowest {slowest:.1} tok/s ({:.2} of one)",
        generated / wall,
        generated / wall / alone,
        slowest / alone
    );
}
