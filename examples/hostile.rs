//! The hostile-input probes of streams and connections as resources, against a sluice
//! binary (any version: the same command measures before and after a change):
//!
//!     cargo build --release && cargo run --release --example hostile
//!     cargo run --release --example hostile -- --sluice /path/to/sluice h1 m3
//!
//! Each probe starts the binary with its own settings (loopback, port 0), runs an attack
//! bounded in count and time, and prints what its victim or the operator sees:
//! - `h1`: 1,100 idle HTTP/2 connections against `SLUICE_MAX_CONNECTIONS=1000`: a victim's
//!   `/healthz` latency, sluice's RSS;
//! - `m1`: 32 detached streams of 64 MiB against `SLUICE_RESUME_MEMORY_MB=4`: the logs' bytes
//!   at their peak, sluice's RSS;
//! - `m2`: 4 background responses of 64 MiB through Redis (`redis-server` from PATH) against
//!   the same 4 MiB: Redis' memory after 10 s;
//! - `m3`: one client at `SLUICE_RPM=1` replaying one stored stream for 10 s: replays served,
//!   bytes, sluice's CPU;
//! - `m5`: four clients at `SLUICE_RPM=1` counting 900 KB of tools for 10 s: counts served,
//!   sluice's CPU, a victim's `/healthz` p50.
//!
//! Probes of one tenant against another, and of upstreams that misbehave:
//! - `p1`: a pool of two targets; one key's single request that both answer 429 with
//!   `Retry-After: 300`, then six that both answer 500: another key's 20 requests served;
//! - `p2`: an upstream that reads each request and closes, after eight kept connections:
//!   the POSTs it received for one client request;
//! - `p3`: an upstream sending `100 Continue` without end: how long the request takes to
//!   fail, sluice's CPU meanwhile;
//! - `p4`: an upstream that sends a second answer 150 ms after the first: what the next
//!   request gets;
//! - `p5`: a TOML file with keys rewritten in place by a generator (1,223 lines over 3 s)
//!   under `SLUICE_CONFIG_WATCH=1`, then caught empty: keyless requests answered 200;
//! - `p6`: a pool of 2 targets x 2 streams, queue 6: one key churning 10 workers for 12 s,
//!   another key's 5 requests.

// The probes' clients and the fake upstream are tasks of their own.
#![allow(clippy::disallowed_methods)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

#[path = "common/proc.rs"]
#[expect(dead_code, reason = "the descriptor count is loadgen's")]
mod proc;
#[path = "common/redis.rs"]
mod redis_nodes;
use proc::cpu_s;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let binary = match args.iter().position(|a| a == "--sluice") {
        Some(i) if i + 1 < args.len() => {
            let path = args.remove(i + 1);
            args.remove(i);
            // The probes start it from folders of their own.
            std::fs::canonicalize(&path).map_or(path, |p| p.display().to_string())
        }
        _ => concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/sluice").to_owned(),
    };
    let probes: Vec<String> = if args.is_empty() {
        [
            "h1", "m1", "m2", "m3", "m5", "p1", "p2", "p3", "p4", "p5", "p6",
        ]
        .map(String::from)
        .to_vec()
    } else {
        args
    };
    let _ = rlimit::increase_nofile_limit(65_536);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let upstream = upstream().await?;
        for probe in probes {
            let started = Instant::now();
            let result = match probe.as_str() {
                "h1" => h1(&binary).await,
                "m1" => m1(&binary, &upstream).await,
                "m2" => m2(&binary, &upstream).await,
                "m3" => m3(&binary, &upstream).await,
                "m5" => m5(&binary).await,
                "p1" => p1(&binary).await,
                "p2" => p2(&binary).await,
                "p3" => p3(&binary).await,
                "p4" => p4(&binary).await,
                "p5" => p5(&binary).await,
                "p6" => p6(&binary).await,
                other => Err(anyhow::anyhow!("no probe {other:?}")),
            };
            match result {
                Ok(line) => println!("{probe}: {line} ({:.0} s)", started.elapsed().as_secs_f64()),
                Err(e) => println!("{probe}: failed: {e}"),
            }
        }
        anyhow::Ok(())
    })
}

// ---- the fake upstream: `flood` (64 MiB in 1 KiB chunks, as fast as it is read) or any
// other model (30 short tokens).

async fn upstream() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer(req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(format!("http://{addr}/v1"))
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>) -> Response<Body> {
    if req.uri().path().ends_with("/models") {
        let list = json!({"object": "list", "data": [{"id": "flood", "object": "model"}]});
        return Response::new(Full::new(Bytes::from(list.to_string())).boxed_unsync());
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body: Value = body
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    // One key's requests that the upstream fails: `attack:429` (with `Retry-After: 300`,
    // what OpenAI answers a request over a tokens-per-minute limit) or `attack:500`.
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    if let Some(status) = last.strip_prefix("attack:") {
        let status: u16 = status.parse().unwrap_or(500);
        let error =
            json!({"error": {"message": "Rate limit reached", "type": "error", "code": null}});
        return Response::builder()
            .status(status)
            .header("retry-after", "300")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(error.to_string())).boxed_unsync())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()));
    }
    let (count, text, pause) = match body["model"].as_str() {
        Some("flood") => (65_536, "x".repeat(1024), Duration::ZERO),
        // A stream that holds its slot for a while: 20 tokens 50 ms apart.
        Some("held") => (20, " word".to_owned(), Duration::from_millis(50)),
        _ => (30, " word".to_owned(), Duration::ZERO),
    };
    let chunk = Bytes::from(format!(
        "data: {}\n\n",
        json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    ));
    let end = Bytes::from(format!(
        "data: {}\n\ndata: [DONE]\n\n",
        json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    ));
    let frames = futures::stream::iter(std::iter::repeat_n(chunk, count).chain([end])).then(
        move |b| async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            Ok::<_, Infallible>(Frame::data(b))
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

// ---- sluice, the binary under test.

struct Sluice {
    child: Child,
    addr: SocketAddr,
}

impl Sluice {
    fn start(binary: &str, vars: &[(&str, &str)]) -> anyhow::Result<Sluice> {
        let mut child = Command::new(binary)
            .env_clear()
            .env("SLUICE_ADDR", "127.0.0.1:0")
            .env("SLUICE_LOCAL_MODEL", "off")
            .env("SLUICE_MOCK_TOKENS_PER_S", "0")
            .env("SLUICE_LOG", "info")
            .envs(vars.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .ok_or_else(|| anyhow::anyhow!("sluice ended before it listened"))??;
            if let Some(at) = line.find("listening on http://") {
                let rest = &line[at + "listening on http://".len()..];
                let addr: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '"')
                    .collect();
                break addr.parse()?;
            }
        };
        // Its log must be read, or it blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Ok(Sluice { child, addr })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .ok()
            .map(|r| r.text());
        let text = match text {
            Some(text) => text.await.unwrap_or_default(),
            None => String::new(),
        };
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mib(pid: &str) -> f64 {
    proc::rss_kib(pid) as f64 / 1024.0
}

/// `/healthz` on a connection of its own (it must win a slot), or `None` past 5 s.
async fn healthz(sluice: &Sluice) -> Option<Duration> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default()
    });
    let started = Instant::now();
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        http.get(sluice.url("/healthz")).send(),
    )
    .await;
    matches!(answered, Ok(Ok(r)) if r.status() == 200).then(|| started.elapsed())
}

fn shown(d: Option<Duration>) -> String {
    d.map_or("timed out (5 s)".into(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    })
}

// ---- the probes.

async fn h1(binary: &str) -> anyhow::Result<String> {
    let sluice = Sluice::start(binary, &[("SLUICE_MAX_CONNECTIONS", "1000")])?;
    let before = rss_mib(&sluice.pid());
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    // 1,100 from eight addresses, a hundred at a time, each given 2 s to be served.
    for batch in 0..11u32 {
        let tries = (0..100u32).map(|i| {
            let (addr, held) = (sluice.addr, held.clone());
            async move {
                let from = 2 + ((batch * 100 + i) % 8) as u8;
                let attempt = async {
                    let socket = tokio::net::TcpSocket::new_v4().ok()?;
                    socket
                        .bind(SocketAddr::new(
                            IpAddr::V4(Ipv4Addr::new(127, 0, 0, from)),
                            0,
                        ))
                        .ok()?;
                    let tcp = socket.connect(addr).await.ok()?;
                    let (mut sender, connection) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(tcp),
                    )
                    .await
                    .ok()?;
                    let task = tokio::spawn(connection);
                    let request = Request::get("/healthz")
                        .body(Full::new(Bytes::new()))
                        .ok()?;
                    sender.send_request(request).await.ok()?;
                    Some((sender, task))
                };
                if let Ok(Some(kept)) = tokio::time::timeout(Duration::from_secs(2), attempt).await
                {
                    held.lock().unwrap_or_else(|e| e.into_inner()).push(kept);
                }
            }
        });
        futures::future::join_all(tries).await;
    }
    let served = held.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mut victim = Vec::new();
    for _ in 0..5 {
        victim.push(healthz(&sluice).await);
    }
    let after = rss_mib(&sluice.pid());
    let open = held
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, task)| !task.is_finished())
        .count();
    Ok(format!(
        "1,100 idle h2c connections, {served} served, {open} still open; victim /healthz: {}; RSS {before:.0} -> {after:.0} MiB",
        victim.into_iter().map(shown).collect::<Vec<_>>().join(", ")
    ))
}

async fn detach(sluice: &Sluice, http: &reqwest::Client) -> anyhow::Result<String> {
    let response = http
        .post(sluice.url("/api/chat"))
        .json(&json!({"prompt": "Hi", "model": "flood"}))
        .send()
        .await?;
    let id = response
        .headers()
        .get("x-sluice-stream-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut body = response.bytes_stream();
    let _ = tokio::time::timeout(Duration::from_secs(5), body.next()).await;
    Ok(id)
}

async fn m1(binary: &str, upstream: &str) -> anyhow::Result<String> {
    let sluice = Sluice::start(
        binary,
        &[
            ("OPENAI_BASE_URL", upstream),
            ("SLUICE_RESUME_MEMORY_MB", "4"),
            ("SLUICE_MAX_STREAMS", "64"),
        ],
    )?;
    let http = reqwest::Client::new();
    for _ in 0..32 {
        detach(&sluice, &http).await?;
    }
    let mut peak = 0.0f64;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        peak = peak.max(sluice.metric("sluice_stream_log_bytes").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(format!(
        "32 detached floods against 4 MiB: logs at most {:.1} MiB, RSS {:.0} MiB",
        peak / 1048576.0,
        rss_mib(&sluice.pid())
    ))
}

async fn m2(binary: &str, upstream: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        redis_nodes::available(&["redis-server"]),
        "redis-server is not installed (Debian package redis-server)"
    );
    let redis = redis_nodes::Redis::single();
    let url = redis.url.clone();
    let sluice = Sluice::start(
        binary,
        &[
            ("OPENAI_BASE_URL", upstream),
            ("SLUICE_REDIS_URL", &url),
            ("SLUICE_RESUME_MEMORY_MB", "4"),
        ],
    )?;
    let baseline = redis.used_memory() as f64;
    let http = reqwest::Client::new();
    for _ in 0..4 {
        http.post(sluice.url("/v1/responses"))
            .json(&json!({"model": "flood", "input": "Hi", "background": true}))
            .send()
            .await?;
    }
    let mut peak = 0.0f64;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        peak = peak.max((redis.used_memory() as f64) - baseline);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(format!(
        "4 background floods through Redis against 4 MiB: Redis grew by up to {:.1} MiB, sluice's logs {:.1} MiB",
        peak / 1048576.0,
        sluice.metric("sluice_stream_log_bytes").await / 1048576.0
    ))
}

async fn m3(binary: &str, upstream: &str) -> anyhow::Result<String> {
    let sluice = Sluice::start(
        binary,
        &[("OPENAI_BASE_URL", upstream), ("SLUICE_RPM", "1")],
    )?;
    let http = reqwest::Client::new();
    let response = http
        .post(sluice.url("/api/chat"))
        .json(&json!({"prompt": "Hi", "model": "paced"}))
        .send()
        .await?;
    let id = response
        .headers()
        .get("x-sluice-stream-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    response.bytes().await?;
    let cpu = cpu_s(&sluice.pid());
    let (served, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let answered = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(10);
    let readers = (0..4).map(|_| {
        let (http, url, served, bytes, answered) = (
            http.clone(),
            sluice.url(&format!("/api/chat/{id}?last_event_id=0")),
            served.clone(),
            bytes.clone(),
            answered.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < until && n < 100_000 {
                n += 1;
                let Ok(response) = http.get(&url).send().await else {
                    continue;
                };
                answered.fetch_add(1, Ordering::Relaxed);
                if response.status() == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                    let body = response.bytes().await.map_or(0, |b| b.len());
                    bytes.fetch_add(body, Ordering::Relaxed);
                }
            }
        })
    });
    futures::future::join_all(readers).await;
    Ok(format!(
        "a client at SLUICE_RPM=1 replaying one stream for 10 s: {} of {} replays served, {:.1} MB, {:.1} s of sluice CPU",
        served.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) as f64 / 1e6,
        cpu_s(&sluice.pid()) - cpu
    ))
}

async fn m5(binary: &str) -> anyhow::Result<String> {
    let sluice = Sluice::start(binary, &[("SLUICE_RPM", "1")])?;
    let properties: serde_json::Map<String, Value> = (0..9_000)
        .map(|i| (format!("field_{i}"), json!({"type": "string", "description": "a value the tool needs to do its work well"})))
        .collect();
    let attack = json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"name": "lookup", "input_schema": {"type": "object", "properties": properties}}]})
    .to_string();
    let quiet: Vec<_> = futures::future::join_all((0..20).map(|_| healthz(&sluice))).await;
    let cpu = cpu_s(&sluice.pid());
    let served = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(10);
    let http = reqwest::Client::new();
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, attack, served) = (
                http.clone(),
                sluice.url("/v1/messages/count_tokens"),
                attack.clone(),
                served.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < until && n < 10_000 {
                    n += 1;
                    let answer = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(attack.clone())
                        .send()
                        .await;
                    if answer.is_ok_and(|r| r.status() == 200) {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut loaded = Vec::new();
    while Instant::now() < until - Duration::from_secs(1) {
        loaded.push(healthz(&sluice).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    futures::future::join_all(attackers).await;
    let p50 = |mut sample: Vec<Option<Duration>>| {
        sample.sort();
        sample.get(sample.len() / 2).copied().flatten()
    };
    Ok(format!(
        "4 clients at SLUICE_RPM=1 counting 900 KB of tools for 10 s: {} counts served, {:.1} s of sluice CPU; victim /healthz p50 {} quiet, {} meanwhile",
        served.load(Ordering::Relaxed),
        cpu_s(&sluice.pid()) - cpu,
        shown(p50(quiet)),
        shown(p50(loaded))
    ))
}

// ---- one tenant against another, and upstreams that misbehave.

/// A TOML file of the probe's own, in a temporary directory.
fn config_file(name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("sluice-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A streamed chat of `content` to `model` with `key`: its status.
async fn ask(
    sluice: &Sluice,
    http: &reqwest::Client,
    key: Option<&str>,
    model: &str,
    content: &str,
) -> u16 {
    let mut request = http.post(sluice.url("/v1/chat/completions"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let body =
        json!({"model": model, "stream": true, "messages": [{"role": "user", "content": content}]});
    match tokio::time::timeout(Duration::from_secs(30), request.json(&body).send()).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let _ = tokio::time::timeout(Duration::from_secs(30), response.bytes()).await;
            status
        }
        _ => 0,
    }
}

/// How many of `statuses` are `want`, as "n of m".
fn of(statuses: &[u16], want: u16) -> String {
    let n = statuses.iter().filter(|s| **s == want).count();
    format!("{n} of {}", statuses.len())
}

async fn p1(binary: &str) -> anyhow::Result<String> {
    let (a, b) = (upstream().await?, upstream().await?);
    let file = config_file(
        "p1.toml",
        &format!(
            "[[models.pool.targets]]\nbase_url = \"{a}\"\nmodel = \"m\"\n\n\
             [[models.pool.targets]]\nbase_url = \"{b}\"\nmodel = \"m\"\n"
        ),
    )?;
    let path = file.to_string_lossy();
    let sluice = Sluice::start(
        binary,
        &[
            ("SLUICE_CONFIG", &path),
            ("SLUICE_API_KEYS", "sk-attacker,sk-victim"),
            ("OPENAI_API_KEY", "sk-upstream"),
        ],
    )?;
    let http = reqwest::Client::new();
    let victim = async || {
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(ask(&sluice, &http, Some("sk-victim"), "pool", "Hi").await);
        }
        statuses
    };
    ask(&sluice, &http, Some("sk-attacker"), "pool", "attack:429").await;
    let after_429 = victim().await;
    for _ in 0..6 {
        ask(&sluice, &http, Some("sk-attacker"), "pool", "attack:500").await;
    }
    let after_500 = victim().await;
    Ok(format!(
        "the other key served {} after one 429 (Retry-After: 300), {} after six 500s",
        of(&after_429, 200),
        of(&after_500, 200)
    ))
}

/// A raw HTTP/1.1 upstream: `act(n)` says what it does with the `n`th POST (from 1):
/// `answer` a short stream with a Content-Length, `close`, `continue` (100 Continue without
/// end), or `twice` (an answer, then another 150 ms later). It counts the POSTs.
async fn raw(act: fn(usize) -> &'static str) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let posts = Arc::new(AtomicUsize::new(0));
    let counter = posts.clone();
    let answer = |text: &str| {
        let body = format!(
            "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
            json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}),
            json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        );
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let Ok(n) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_lowercase();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if request.len() < end + 4 + length {
                        continue;
                    }
                    let post = text.starts_with("post ");
                    request.clear();
                    if !post {
                        let list = "{\"object\":\"list\",\"data\":[]}";
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", list.len());
                        let _ = tcp.write_all(format!("{head}{list}").as_bytes()).await;
                        continue;
                    }
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    match act(n) {
                        "close" => return,
                        "continue" => {
                            let interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(64);
                            let until = Instant::now() + Duration::from_secs(30);
                            while Instant::now() < until && tcp.write_all(&interim).await.is_ok() {}
                            return;
                        }
                        "twice" => {
                            let _ = tcp.write_all(answer("FOR-A").as_bytes()).await;
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            let _ = tcp.write_all(answer("LEAKED-FROM-A").as_bytes()).await;
                        }
                        _ => {
                            let _ = tcp.write_all(answer("FOR-THIS-REQUEST").as_bytes()).await;
                        }
                    }
                }
            });
        }
    });
    Ok((format!("http://{addr}/v1"), posts))
}

async fn p2(binary: &str) -> anyhow::Result<String> {
    let (url, posts) = raw(|n| if n <= 8 { "answer" } else { "close" }).await?;
    let sluice = Sluice::start(
        binary,
        &[("OPENAI_BASE_URL", &url), ("OPENAI_API_KEY", "sk")],
    )?;
    let http = reqwest::Client::new();
    futures::future::join_all((0..8).map(|_| ask(&sluice, &http, None, "m", "Hi"))).await;
    let before = posts.load(Ordering::SeqCst);
    let status = ask(&sluice, &http, None, "m", "Hi").await;
    Ok(format!(
        "one request the upstream reads and drops: it received the POST {} times (client: {status})",
        posts.load(Ordering::SeqCst) - before
    ))
}

async fn p3(binary: &str) -> anyhow::Result<String> {
    let (url, _) = raw(|_| "continue").await?;
    let sluice = Sluice::start(
        binary,
        &[
            ("OPENAI_BASE_URL", &url),
            ("OPENAI_API_KEY", "sk"),
            ("SLUICE_FIRST_TOKEN_TIMEOUT_MS", "25000"),
        ],
    )?;
    let cpu = cpu_s(&sluice.pid());
    let started = Instant::now();
    let status = ask(&sluice, &reqwest::Client::new(), None, "m", "Hi").await;
    Ok(format!(
        "endless 100 Continue: the request ended in {:.1} s ({status}), {:.1} s of sluice CPU",
        started.elapsed().as_secs_f64(),
        cpu_s(&sluice.pid()) - cpu
    ))
}

async fn p4(binary: &str) -> anyhow::Result<String> {
    let (url, _) = raw(|n| if n == 1 { "twice" } else { "answer" }).await?;
    let sluice = Sluice::start(
        binary,
        &[("OPENAI_BASE_URL", &url), ("OPENAI_API_KEY", "sk")],
    )?;
    let http = reqwest::Client::new();
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "Hi"}]});
    let text = async |http: &reqwest::Client| {
        let response = http
            .post(sluice.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await;
        match response {
            Ok(r) => String::from_utf8_lossy(&r.bytes().await.unwrap_or_default()).into_owned(),
            Err(e) => e.to_string(),
        }
    };
    text(&http).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let early = text(&http).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = text(&http).await;
    let got = |t: &str| {
        if t.contains("LEAKED-FROM-A") {
            "the first request's late answer"
        } else {
            "its own answer"
        }
    };
    Ok(format!(
        "a second answer 150 ms after the first: the next request (50 ms on) got {}, a later one {}",
        got(&early),
        got(&later)
    ))
}

async fn p5(binary: &str) -> anyhow::Result<String> {
    let keyed =
        "[keys.team]\nkey = \"sk-team\"\n\n[models.pool]\nbackend = \"mock\"\nmodel = \"mock\"\n";
    let file = config_file("p5.toml", keyed)?;
    let path = file.to_string_lossy().into_owned();
    let sluice = Sluice::start(
        binary,
        &[("SLUICE_CONFIG", &path), ("SLUICE_CONFIG_WATCH", "1")],
    )?;
    let http = reqwest::Client::new();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (done, http) = (done.clone(), http.clone());
        let url = sluice.url("/v1/chat/completions");
        async move {
            let mut statuses = Vec::new();
            while !done.load(Ordering::SeqCst) && statuses.len() < 2_000 {
                let body =
                    json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]});
                let status = http
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                statuses.push(status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        }
    };
    let edits = async {
        // A generator writing the file in place: its routes first, its keys last.
        let lines: Vec<String> = (0..1_220)
            .map(|i| format!("# generated line {i}"))
            .chain([
                "[models.pool]".into(),
                "backend = \"mock\"".into(),
                "[keys.team]".into(),
                "key = \"sk-team\"".into(),
            ])
            .collect();
        let mut text = String::new();
        for chunk in lines.chunks(41) {
            for line in chunk {
                text += line;
                text += "\n";
            }
            let _ = std::fs::write(&path, &text);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = std::fs::write(&path, "");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = std::fs::write(&path, keyed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        done.store(true, Ordering::SeqCst);
    };
    let (statuses, ()) = tokio::join!(probe, edits);
    Ok(format!(
        "a file rewritten in place, then emptied, under SLUICE_CONFIG_WATCH=1: keyless requests answered 200: {}",
        of(&statuses, 200)
    ))
}

async fn p6(binary: &str) -> anyhow::Result<String> {
    let (a, b) = (upstream().await?, upstream().await?);
    let file = config_file(
        "p6.toml",
        &format!(
            "[models.pool]\nqueue = 6\nqueue_timeout_ms = 10000\n\n\
             [[models.pool.targets]]\nbase_url = \"{a}\"\nmodel = \"held\"\nmax_streams = 2\n\n\
             [[models.pool.targets]]\nbase_url = \"{b}\"\nmodel = \"held\"\nmax_streams = 2\n"
        ),
    )?;
    let path = file.to_string_lossy();
    let sluice = Sluice::start(
        binary,
        &[
            ("SLUICE_CONFIG", &path),
            ("SLUICE_API_KEYS", "sk-hog,sk-victim"),
            ("SLUICE_MAX_STREAMS", "100"),
            ("OPENAI_API_KEY", "sk-upstream"),
        ],
    )?;
    let http = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(12);
    let served = Arc::new(AtomicUsize::new(0));
    let hog = (0..10).map(|_| {
        let (http, served, sluice) = (http.clone(), served.clone(), &sluice);
        async move {
            while Instant::now() < until {
                if ask(sluice, &http, Some("sk-hog"), "pool", "Hi").await == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let victim = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(ask(&sluice, &http, Some("sk-victim"), "pool", "Hi").await);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        statuses
    };
    let (_, statuses) = tokio::join!(futures::future::join_all(hog), victim);
    Ok(format!(
        "one key churning 10 workers on 2x2 slots and a queue of 6 was served {} streams; the other key's requests answered 200: {}",
        served.load(Ordering::Relaxed),
        of(&statuses, 200)
    ))
}
