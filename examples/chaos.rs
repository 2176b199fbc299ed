//! The chaos run: many sluice instances sharing a Redis Cluster lose nothing a client was
//! promised, while connections are cut, an instance is killed and a Redis primary dies.
//!
//! `cargo run --release --example chaos` starts N sluice instances (`--instances`, 3) behind
//! a round-robin TCP balancer of its own, a Redis Cluster (three primaries, three replicas)
//! and a fake upstream whose every token is numbered. It opens `--streams` (1,000) resumable
//! streams through the balancer, spread over the four chat surfaces (`/api/chat`,
//! `/v1/chat/completions`, `/v1/responses`, `/v1/messages`), cuts `--cuts` (1,000) client
//! connections at random points and resumes each through the balancer (so on any instance)
//! with its cursor, kills one sluice instance with SIGKILL and starts it again, and kills the
//! Redis primary holding the limits. Then it checks every stream's tokens against the
//! upstream's record: 0 lost, 0 duplicated, 0 reordered where the producer survived; where
//! it was killed, a `producer_lost` error after the last event received, never silence and
//! never a normal ending. It prints the counts, resume latency p50/p99 and Redis's memory,
//! and exits non-zero if any check failed.
//!
//! `--soak 600` runs that long at a steady 500 streams with cuts and no kills, and reports
//! the instances' RSS and Redis's memory every 30 s; it fails on an error or on growth after
//! warm-up. `--seed n` replays a run's random choices.

// A harness: its servers and clients are tasks of their own, ended with the process.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[path = "common/proc.rs"]
#[allow(dead_code)]
mod proc;
#[path = "common/redis.rs"]
mod redis_nodes;

/// Tokens a stream's upstream sends, and the pause before each.
const TOKENS: u64 = 100;
const TOKEN_EVERY: Duration = Duration::from_millis(80);
/// The key whose slot holds the limits of the clients here (127.0.0.1, with no key): the
/// primary killed is the one serving it.
fn limits() -> String {
    sluice::admission::shared::shard_streams(sluice::admission::shared::shard("127.0.0.1"))
}

struct Options {
    instances: usize,
    streams: usize,
    cuts: usize,
    soak: Option<u64>,
    seed: u64,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        instances: 3,
        streams: 1000,
        cuts: 1000,
        soak: None,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || -> anyhow::Result<u64> {
            let v = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a number"))?;
            Ok(v.parse()?)
        };
        match flag.as_str() {
            "--instances" => o.instances = value()?.max(1) as usize,
            "--streams" => o.streams = value()?.max(1) as usize,
            "--cuts" => o.cuts = value()? as usize,
            "--soak" => o.soak = Some(value()?),
            "--seed" => o.seed = value()?,
            other => anyhow::bail!(
                "unknown argument {other}: --instances n, --streams n, --cuts n, --soak s, --seed n"
            ),
        }
    }
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "sluice") {
        sluice::server::reserve_descriptors();
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime.block_on(instance(&args[1], &args[2], &args[3], &args[4]));
    }
    let options = options()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let passed = runtime.block_on(run(options))?;
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One sluice instance, a process of its own (so that it can be killed), on a fixed address.

async fn instance(addr: &str, upstream: &str, redis: &str, ttl: &str) -> anyhow::Result<()> {
    let mut config = sluice::Config::defaults();
    // No ledger: what is measured here is the stream.
    config.database_url = "off".into();
    config.redis_url = Some(redis.to_owned());
    config.openai_base_url = Some(format!("http://{upstream}/v1"));
    config.openai_api_key = Some("sk-chaos".into());
    config.local_model = Some("off".into());
    config.rpm = 10_000_000;
    config.max_streams = 1_000_000;
    config.global_max_streams = 1_000_000;
    config.max_connections_per_ip = 1_000_000;
    config.max_readers = 64;
    // A producer killed is noticed by its readers elsewhere within about three seconds.
    config.idle_timeout_ms = 6000;
    config.resume_ttl_s = ttl.parse()?;
    config.resume_memory_mb = 256.0;
    if let Ok(filter) = std::env::var("CHAOS_SLUICE_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let state = sluice::AppState::build(&config)?;
    let listener = bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    sluice::serve(listener, state, std::future::pending(), Duration::ZERO).await?;
    Ok(())
}

/// Binds `addr`, retrying for a moment: a killed instance's port may linger.
async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let started = Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if started.elapsed() > Duration::from_secs(10) => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

struct Instance {
    child: Option<Child>,
    addr: String,
    args: Vec<String>,
}

impl Instance {
    fn start(addr: String, upstream: &str, redis: &str, ttl: u64) -> anyhow::Result<Instance> {
        let mut instance = Instance {
            child: None,
            args: vec![
                "sluice".into(),
                addr.clone(),
                upstream.into(),
                redis.into(),
                ttl.to_string(),
            ],
            addr,
        };
        instance.restart()?;
        Ok(instance)
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        anyhow::ensure!(line.starts_with("listening"), "an instance said {line:?}");
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn rss_kib(&self) -> u64 {
        self.child
            .as_ref()
            .map_or(0, |c| proc::rss_kib(&c.id().to_string()))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

// ---------------------------------------------------------------------------------------
// The balancer: each connection to the next instance in turn, the next again if that one
// refuses (it was killed).

async fn balancer(backends: Vec<String>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let _ = client.set_nodelay(true);
            let (backends, next) = (backends.clone(), next.clone());
            tokio::spawn(async move {
                for _ in 0..backends.len() {
                    let i = next.fetch_add(1, Ordering::Relaxed) % backends.len();
                    if let Ok(mut backend) = tokio::net::TcpStream::connect(&backends[i]).await {
                        let _ = backend.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------
// The upstream: the stream named `chaos-n` in its prompt gets tokens `n.0 n.1 …`, and the
// record keeps, per stream, how many were sent and whether the reply reached its end.

#[derive(Default, Clone, Copy)]
struct Sent {
    tokens: u64,
    finished: bool,
}

type Record = Arc<Mutex<HashMap<u64, Sent>>>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn upstream(record: Record) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move { Ok::<_, Infallible>(answer(req, record).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn answer(req: Request<Incoming>, record: Record) -> Response<Body> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let n: u64 = text
        .split("chaos-")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(u64::MAX);
    record
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(n, Sent::default());
    let frames = async_stream::stream! {
        for i in 0..TOKENS {
            tokio::time::sleep(TOKEN_EVERY).await;
            let chunk = format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{n}.{i} \"}},\"finish_reason\":null}}]}}\n\n"
            );
            yield Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)));
            if let Some(sent) = record.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&n) {
                sent.tokens = i + 1;
            }
        }
        let end = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{TOKENS},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            TOKENS + 5
        );
        yield Ok(Frame::data(Bytes::from(end)));
        if let Some(sent) = record.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&n) {
            sent.finished = true;
        }
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(Box::pin(frames)).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

// ---------------------------------------------------------------------------------------
// A client: one stream on one of the four surfaces, cut and resumed.

#[derive(Clone, Copy, Debug)]
enum Surface {
    Sluice,
    Chat,
    Responses,
    Messages,
}

impl Surface {
    fn of(n: u64) -> Surface {
        [
            Surface::Sluice,
            Surface::Chat,
            Surface::Responses,
            Surface::Messages,
        ][(n % 4) as usize]
    }

    fn start(self, base: &str, n: u64) -> (String, Value) {
        let prompt = format!("chaos-{n}");
        let messages = json!([{"role": "user", "content": prompt}]);
        match self {
            Surface::Sluice => (
                format!("{base}/api/chat"),
                json!({"model": "chaos", "prompt": prompt}),
            ),
            Surface::Chat => (
                format!("{base}/v1/chat/completions"),
                json!({"model": "chaos", "stream": true, "messages": messages}),
            ),
            Surface::Responses => (
                format!("{base}/v1/responses"),
                json!({"model": "chaos", "stream": true, "input": prompt}),
            ),
            Surface::Messages => (
                format!("{base}/v1/messages"),
                json!({"model": "chaos", "stream": true, "max_tokens": 1024, "messages": messages}),
            ),
        }
    }

    fn resume(self, base: &str, id: &str) -> String {
        match self {
            Surface::Sluice => format!("{base}/api/chat/{id}"),
            Surface::Chat => format!("{base}/v1/chat/completions/{id}?stream=true"),
            Surface::Responses => format!("{base}/v1/responses/{id}?stream=true"),
            Surface::Messages => format!("{base}/v1/messages/{id}"),
        }
    }

    /// What one event is: text, the normal end, an error (its data), or nothing of note.
    fn read(self, event: &str, data: &str) -> Seen {
        if event == "error" || data.starts_with("{\"error\"") {
            return Seen::Error(data.to_owned());
        }
        let json = || serde_json::from_str::<Value>(data).unwrap_or_default();
        let text = |v: &Value| v.as_str().map_or(Seen::Other, |t| Seen::Text(t.to_owned()));
        match (self, event) {
            (Surface::Sluice, "token") => text(&json()["text"]),
            (Surface::Sluice, "done") => Seen::End,
            (Surface::Chat, _) if data == "[DONE]" => Seen::End,
            (Surface::Chat, _) => text(&json()["choices"][0]["delta"]["content"]),
            (Surface::Responses, "response.output_text.delta") => text(&json()["delta"]),
            (Surface::Responses, "response.completed") => Seen::End,
            (Surface::Responses, "response.failed" | "response.incomplete") => {
                Seen::Error(data.to_owned())
            }
            (Surface::Messages, "content_block_delta") => text(&json()["delta"]["text"]),
            (Surface::Messages, "message_stop") => Seen::End,
            _ => Seen::Other,
        }
    }
}

enum Seen {
    Text(String),
    End,
    Error(String),
    Other,
}

/// How one stream went, as its client saw it.
#[derive(Default)]
struct Outcome {
    n: u64,
    /// Every token received, in order of arrival.
    tokens: Vec<String>,
    ended: bool,
    error: Option<String>,
    not_resumable: bool,
    /// The connection went away without an ending, and no resume could be made.
    failure: Option<String>,
    resumes: Vec<Duration>,
}

struct Client {
    http: reqwest::Client,
    base: String,
}

/// Runs stream `n` to its end, cutting its connection after each of the event counts in
/// `cuts` (and whenever the connection breaks), resuming with the last event's id.
async fn one_stream(client: Arc<Client>, n: u64, mut cuts: Vec<usize>) -> Outcome {
    let surface = Surface::of(n);
    let mut outcome = Outcome {
        n,
        ..Outcome::default()
    };
    let (url, body) = surface.start(&client.base, n);
    // Opening: a connection refused or reset (an instance being killed) is tried again.
    let mut response = None;
    for _ in 0..50 {
        let sent = client
            .http
            .post(&url)
            .header("x-sluice-resumable", "true")
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => {
                response = Some(r);
                break;
            }
            Ok(r) if r.status() == 429 || r.status() == 503 => {}
            Ok(r) => {
                outcome.failure = Some(format!("open: {}", r.status()));
                return outcome;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(mut response) = response else {
        outcome.failure = Some("open: never answered".into());
        return outcome;
    };
    outcome.not_resumable = response
        .headers()
        .get("x-sluice-resumable")
        .is_none_or(|v| v != "true");
    let id = response
        .headers()
        .get("x-sluice-stream-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    cuts.sort_unstable();
    cuts.reverse();
    let mut last_id = String::new();
    let mut events = 0usize;
    loop {
        let mut stream = response.bytes_stream().eventsource();
        let cut_at = if outcome.not_resumable {
            None
        } else {
            cuts.last().copied()
        };
        let mut broke = true;
        while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap_or(None)
        {
            let Ok(event) = event else { break };
            if !event.id.is_empty() {
                last_id.clone_from(&event.id);
            }
            events += 1;
            match surface.read(&event.event, &event.data) {
                Seen::Text(text) => outcome
                    .tokens
                    .extend(text.split_whitespace().map(str::to_owned)),
                Seen::End => {
                    outcome.ended = true;
                    return outcome;
                }
                Seen::Error(data) => {
                    outcome.error = Some(data);
                    return outcome;
                }
                Seen::Other => {}
            }
            if cut_at.is_some_and(|at| events >= at) {
                cuts.pop();
                broke = false;
                break;
            }
        }
        drop(stream);
        if outcome.not_resumable {
            outcome.failure = Some("a stream served without resumption broke".into());
            return outcome;
        }
        let _ = broke;
        // Resume through the balancer, so on whichever instance it picks.
        let started = Instant::now();
        let mut resumed = None;
        for _ in 0..100 {
            let mut request = client.http.get(surface.resume(&client.base, &id));
            if !last_id.is_empty() {
                request = request.header("last-event-id", &last_id);
            }
            match request.send().await {
                Ok(r) if r.status() == 200 => {
                    resumed = Some(r);
                    break;
                }
                Ok(r) if r.status() == 204 => {
                    // Nothing after the cursor, and the stream has ended.
                    outcome.resumes.push(started.elapsed());
                    outcome.ended = true;
                    return outcome;
                }
                Ok(r) if r.status() == 429 || r.status() == 503 => {}
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    outcome.failure = Some(format!("resume: {status} {text}"));
                    return outcome;
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(r) = resumed else {
            outcome.failure = Some("resume: never answered".into());
            return outcome;
        };
        outcome.resumes.push(started.elapsed());
        response = r;
    }
}

// ---------------------------------------------------------------------------------------
// Checking: each stream against what the upstream sent for it.

#[derive(Default)]
struct Tally {
    streams: usize,
    survived: usize,
    producer_lost: usize,
    not_resumable: usize,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    failures: Vec<String>,
    resumes: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, outcome: Outcome, sent: Option<Sent>) {
        self.streams += 1;
        self.resumes.extend(&outcome.resumes);
        let n = outcome.n;
        if let Some(failure) = &outcome.failure {
            self.failures.push(format!("stream {n}: {failure}"));
            return;
        }
        if outcome.not_resumable {
            self.not_resumable += 1;
        }
        let Some(sent) = sent else {
            self.failures
                .push(format!("stream {n}: the upstream never saw it"));
            return;
        };
        // The tokens as numbers, in the order they came.
        let numbers: Vec<u64> = outcome
            .tokens
            .iter()
            .filter_map(|t| {
                let (stream, i) = t.split_once('.')?;
                (stream.parse::<u64>().ok()? == n).then(|| i.parse().ok())?
            })
            .collect();
        let mut seen = vec![false; TOKENS as usize];
        let mut last: Option<u64> = None;
        let (mut duplicated, mut reordered) = (0, 0);
        for &i in &numbers {
            match seen.get_mut(i as usize) {
                Some(s) if *s => duplicated += 1,
                Some(s) => *s = true,
                None => duplicated += 1,
            }
            if last.is_some_and(|l| i <= l) {
                reordered += 1;
            }
            last = Some(last.map_or(i, |l| l.max(i)));
        }
        self.duplicated += duplicated;
        self.reordered += reordered;
        let received = seen.iter().filter(|s| **s).count() as u64;
        if sent.finished {
            self.survived += 1;
            let lost = TOKENS - received;
            self.lost += lost;
            if !outcome.ended {
                self.failures.push(format!(
                    "stream {n}: the producer finished, the client got {} instead of the ending",
                    outcome.error.as_deref().unwrap_or("silence")
                ));
            } else if lost > 0 {
                self.failures
                    .push(format!("stream {n}: {lost} tokens lost"));
            }
        } else {
            // Its producer was killed: what came must be what the upstream sent, in
            // order, then `producer_lost`.
            let gaps = numbers.len() as u64 != received
                || numbers.iter().enumerate().any(|(k, &i)| i != k as u64);
            match &outcome.error {
                // Anthropic's errors have no code: its message says it.
                Some(e)
                    if (e.contains("producer_lost")
                        || e.contains("producing this stream is gone"))
                        && !gaps =>
                {
                    self.producer_lost += 1
                }
                Some(e) => self
                    .failures
                    .push(format!("stream {n}: producer killed, then {e}")),
                None if outcome.ended => self.failures.push(format!(
                    "stream {n}: producer killed after {} tokens, yet a normal ending",
                    sent.tokens
                )),
                None => self
                    .failures
                    .push(format!("stream {n}: producer killed, then silence")),
            }
        }
    }

    fn passed(&self) -> bool {
        self.failures.is_empty() && self.lost == 0 && self.duplicated == 0 && self.reordered == 0
    }

    fn print(&self) {
        let mut resumes = self.resumes.clone();
        resumes.sort_unstable();
        let at = |q: f64| {
            resumes
                .get(((resumes.len() as f64 * q) as usize).min(resumes.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "streams {}: producer survived {}, producer killed (told producer_lost) {}, served without resumption {}",
            self.streams, self.survived, self.producer_lost, self.not_resumable
        );
        println!(
            "tokens lost {}, duplicated {}, reordered {}; failures {}",
            self.lost,
            self.duplicated,
            self.reordered,
            self.failures.len()
        );
        println!(
            "resumes {}: latency p50 {:.1} ms, p99 {:.1} ms",
            resumes.len(),
            at(0.5),
            at(0.99)
        );
        for failure in self.failures.iter().take(usize::MAX) {
            println!("  {failure}");
        }
    }
}

// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct World {
    redis: redis_nodes::Redis,
    instances: Vec<Instance>,
    record: Record,
    client: Arc<Client>,
}

async fn world(options: &Options, ttl: u64) -> anyhow::Result<World> {
    anyhow::ensure!(
        redis_nodes::available(&["redis-server", "redis-cli"]),
        "the chaos run needs redis-server and redis-cli (Debian: apt-get install redis-server)"
    );
    let redis = tokio::task::spawn_blocking(redis_nodes::Redis::cluster).await?;
    let record = Record::default();
    let upstream = upstream(record.clone()).await?;
    let mut instances = Vec::new();
    for _ in 0..options.instances {
        instances.push(Instance::start(free_addr()?, &upstream, &redis.url, ttl)?);
    }
    let base = balancer(instances.iter().map(|i| i.addr.clone()).collect()).await?;
    let http = reqwest::Client::builder()
        // A new connection each request: the balancer picks an instance per connection.
        .pool_max_idle_per_host(0)
        .build()?;
    Ok(World {
        redis,
        instances,
        record,
        client: Arc::new(Client {
            http,
            base: format!("http://{base}"),
        }),
    })
}

async fn run(options: Options) -> anyhow::Result<bool> {
    if let Some(seconds) = options.soak {
        return soak(options, seconds).await;
    }
    println!(
        "chaos: {} instances, a Redis Cluster of 3 primaries and 3 replicas, {} streams, {} cuts, seed {}",
        options.instances, options.streams, options.cuts, options.seed
    );
    let mut world = world(&options, 300).await?;
    let started = Instant::now();
    let mut rng = Rng(options.seed | 1);
    // Streams open over the first three seconds; each lasts about eight.
    let mut tasks = Vec::new();
    for n in 0..options.streams as u64 {
        let extra = usize::from((n as usize) < options.cuts % options.streams);
        let cuts: Vec<usize> = (0..options.cuts / options.streams + extra)
            .map(|_| 1 + rng.below(TOKENS) as usize)
            .collect();
        let delay = Duration::from_millis(3000 * n / options.streams as u64);
        let client = world.client.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            one_stream(client, n, cuts).await
        }));
    }
    // The kills, while every stream runs: one sluice instance (started again two seconds
    // later), then the Redis primary that holds the limits.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let victim = rng.below(options.instances as u64) as usize;
    world.instances[victim].kill();
    println!(
        "{:>5.1}s killed sluice instance {victim} (SIGKILL)",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    world.instances[victim].restart()?;
    println!("{:>5.1}s started it again", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let primary = world
        .redis
        .primary_of(&limits())
        .ok_or_else(|| anyhow::anyhow!("no primary serves the limits"))?;
    world.redis.kill_node(primary);
    println!(
        "{:>5.1}s killed the Redis primary on port {primary} (SIGKILL)",
        started.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    let deadline = Duration::from_secs(170);
    for task in tasks {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            Ok(Err(e)) => anyhow::bail!("a client task failed: {e}"),
            Err(_) => anyhow::bail!("the run went past {} s", deadline.as_secs()),
        }
    }
    let failed_over = world.redis.failed_over(&limits(), primary);
    let record = world
        .record
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut tally = Tally::default();
    for outcome in outcomes {
        let sent = record.get(&outcome.n).copied();
        tally.add(outcome, sent);
    }
    println!(
        "{:>5.1}s all streams over; a replica took over: {failed_over}",
        started.elapsed().as_secs_f64()
    );
    tally.print();
    println!(
        "Redis memory at the end: {:.1} MiB (live nodes); sluice RSS: {:.1} MiB (all instances)",
        world.redis.used_memory() as f64 / 1048576.0,
        world.instances.iter().map(Instance::rss_kib).sum::<u64>() as f64 / 1024.0
    );
    let passed = tally.passed() && failed_over && tally.survived > 0 && tally.producer_lost > 0;
    println!("{}", if passed { "PASSED" } else { "FAILED" });
    Ok(passed)
}

// ---------------------------------------------------------------------------------------
// The soak: 500 streams at all times, each cut once, no kills; memory sampled every 30 s.

const SOAK_STREAMS: usize = 500;
/// Finished logs stay this long: the soak's warm-up is past it.
const SOAK_TTL_S: u64 = 60;

async fn soak(options: Options, seconds: u64) -> anyhow::Result<bool> {
    println!(
        "soak: {} instances, a Redis Cluster, {SOAK_STREAMS} streams at all times for {seconds} s, each cut once, seed {}",
        options.instances, options.seed
    );
    let world = world(&options, SOAK_TTL_S).await?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut slots = Vec::new();
    for slot in 0..SOAK_STREAMS as u64 {
        let (client, next, tally, record) = (
            world.client.clone(),
            next.clone(),
            tally.clone(),
            world.record.clone(),
        );
        let mut rng = Rng((options.seed ^ (slot + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
        slots.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10 * slot)).await;
            while Instant::now() < until {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let outcome =
                    one_stream(client.clone(), n, vec![1 + rng.below(TOKENS) as usize]).await;
                let sent = record.lock().unwrap_or_else(|e| e.into_inner()).remove(&n);
                tally
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(outcome, sent);
            }
        }));
    }
    let mut samples: Vec<(f64, f64, f64)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    while Instant::now() < until {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        let rss = world.instances.iter().map(Instance::rss_kib).sum::<u64>() as f64 / 1024.0;
        let redis = world.redis.used_memory() as f64 / 1048576.0;
        let (done, failures) = {
            let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
            (tally.streams, tally.failures.len())
        };
        println!(
            "{t:>6.0}s streams done {done:>7}, failures {failures}, sluice RSS {rss:>7.1} MiB, Redis {redis:>6.1} MiB"
        );
        samples.push((t, rss, redis));
    }
    for slot in slots {
        slot.await?;
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    tally.print();
    // Flat after warm-up: the last sample within 10 % (and 16 MiB) of the first one past
    // the warm-up (the finished logs' TTL and a minute).
    let warm: Vec<&(f64, f64, f64)> = samples
        .iter()
        .filter(|(t, ..)| *t >= (SOAK_TTL_S + 60) as f64)
        .collect();
    let flat = match (warm.first(), warm.last()) {
        (Some(first), Some(last)) => {
            let grew = |a: f64, b: f64| b > a * 1.1 + 16.0;
            println!(
                "after warm-up: sluice RSS {:.1} → {:.1} MiB, Redis {:.1} → {:.1} MiB",
                first.1, last.1, first.2, last.2
            );
            !grew(first.1, last.1) && !grew(first.2, last.2)
        }
        _ => {
            println!(
                "too short a soak to judge memory after warm-up ({} s)",
                SOAK_TTL_S + 60
            );
            true
        }
    };
    let passed = tally.passed() && flat && tally.producer_lost == 0;
    println!("{}", if passed { "PASSED" } else { "FAILED" });
    Ok(passed)
}
