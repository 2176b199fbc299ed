//! The local model's speed on this machine, in one run:
//! - decode and prefill rates of the weights as shipped (Q4_1) and as sluice loads them
//!   (re-quantised to Q8_0), greedy, 128 tokens after a 42-token prompt;
//! - time to first token and tokens per second through sluice's HTTP API, as a client
//!   sees them, for a 40-token prompt.
//!
//! `cargo run --release --example local_speed` (needs `scripts/fetch-model.sh` first);
//! `-- --short`: one run of each, 32 tokens (CI runs it so, to keep it working).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice::backend::local::{load_tokenizer, load_weights};

const WEIGHTS: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const RUNS: usize = 5;
const PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a short story about a river that flows through a city.<|im_end|>\n<|im_start|>assistant\n";

/// (prefill tokens/s, decode tokens/s) for one greedy generation of `n` tokens.
fn run(model: &mut ModelWeights, prompt: &[u32], n: usize) -> (f64, f64) {
    model.clear_kv_cache();
    let started = Instant::now();
    let input = Tensor::new(prompt, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("input");
    let mut logits = model
        .forward(&input, 0)
        .and_then(|l| l.squeeze(0))
        .expect("prefill");
    let prefill = started.elapsed();
    let started = Instant::now();
    for i in 0..n {
        let next = logits
            .argmax(0)
            .and_then(|t| t.to_scalar::<u32>())
            .expect("argmax");
        let input = Tensor::new(&[next], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input");
        logits = model
            .forward(&input, prompt.len() + i)
            .and_then(|l| l.squeeze(0))
            .expect("decode");
    }
    (
        prompt.len() as f64 / prefill.as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64(),
    )
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

async fn through_sluice(runs: usize, tokens: usize) -> (Vec<Duration>, Vec<f64>) {
    let mut config = sluice::Config::defaults();
    // No ledger: what is measured here is the stream.
    config.database_url = "off".into();
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
    // 40 prompt tokens after the chat template.
    let body = json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": tokens,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Write a short story, in five sentences, about a river that flows through an old city at night."}]});
    let (mut ttft, mut rates) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        let started = Instant::now();
        let response = http.post(&url).json(&body).send().await.expect("answers");
        let status = response.status();
        let mut body = response.bytes_stream();
        let mut seen = String::new();
        let (mut first, mut usage) = (None, Value::Null);
        let mut buffer = String::new();
        while let Some(bytes) = body.next().await {
            let text = String::from_utf8_lossy(&bytes.expect("bytes")).into_owned();
            if seen.len() < 2048 {
                seen.push_str(&text);
            }
            buffer.push_str(&text);
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                // Each event carries its `id:` (and the first a `retry:`) before its data.
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
                    first.get_or_insert_with(Instant::now);
                }
                if chunk["usage"].is_object() {
                    usage = chunk["usage"].clone();
                }
            }
        }
        let Some(first) = first else {
            panic!("no content came through sluice ({status}): {seen}");
        };
        let tokens = usage["completion_tokens"].as_f64().unwrap_or(0.0);
        if run == 0 {
            println!(
                "(warm-up: prompt {} tokens, reply {tokens} tokens)",
                usage["prompt_tokens"]
            );
            continue;
        }
        ttft.push(first - started);
        rates.push((tokens - 1.0) / first.elapsed().as_secs_f64());
    }
    (ttft, rates)
}

#[tokio::main]
async fn main() {
    let (runs, tokens) = if std::env::args().any(|a| a == "--short") {
        (1, 32)
    } else {
        (RUNS, 128)
    };
    let tokenizer = load_tokenizer(WEIGHTS.as_ref()).expect("run scripts/fetch-model.sh first");
    let prompt = tokenizer
        .encode(PROMPT, false)
        .expect("encodes")
        .get_ids()
        .to_vec();
    for (name, requantize) in [("Q4_1 as shipped", false), ("re-quantised to Q8_0", true)] {
        let started = Instant::now();
        let mut model = load_weights(WEIGHTS.as_ref(), requantize).expect("weights");
        let load = started.elapsed();
        run(&mut model, &prompt, 16); // warm-up
        let (prefill, decode): (Vec<f64>, Vec<f64>) =
            (0..runs).map(|_| run(&mut model, &prompt, tokens)).unzip();
        println!(
            "{name:<22} load {:>5.2} s   prefill {:>6.1} tok/s   decode {:>5.1} tok/s   (median of {runs}, {}-token prompt)",
            load.as_secs_f64(),
            median(prefill),
            median(decode),
            prompt.len()
        );
    }
    let (ttft, rates) = through_sluice(runs, tokens).await;
    let ms: Vec<f64> = ttft.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    println!(
        "through sluice's HTTP API: time to first token {:.0} ms (median; max {:.0} ms), {:.1} tok/s as the client sees them",
        median(ms.clone()),
        ms.iter().copied().fold(0.0, f64::max),
        median(rates)
    );
}
