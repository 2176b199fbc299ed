//! The streaming load benchmark: what sluice adds to the first token and to every chunk,
//! at 1 to 10,000 concurrent streams, measured side by side with the upstream called
//! directly and through nginx (the floor: a plain relay); cancellation of 1,000 streams at
//! once; and a soak.
//!
//!     cargo run --release --example loadgen                 # levels + cancellation
//!     cargo run --release --example loadgen -- soak 10      # minutes at 1,000 streams
//!     cargo run --release --example loadgen -- 1000 2000    # those levels of the plan
//!     cargo run --release --example loadgen -- 1000 BIN     # BIN: another sluice beside
//!     cargo run --release --example loadgen -- pinned       # pauses: sluice on one core
//!     cargo run --release --example loadgen -- resumable    # CPU per chunk: direct streams,
//!                                                           # resumable in memory, via Redis
//!     cargo run --release --example loadgen -- dialects [BIN]  # CPU per chunk of each wire
//!                                                           # format; BIN: another sluice too
//!     cargo run --release --example loadgen -- otel         # CPU per chunk with and without
//!                                                           # an OpenTelemetry exporter
//!     cargo run --release --example loadgen -- ledger       # CPU per chunk and RSS with the
//!                                                           # ledger off, on SQLite, on
//!                                                           # PostgreSQL; records/s each takes
//!     cargo run --release --example loadgen -- budget       # CPU per chunk of a key with a
//!                                                           # budget and of one without
//!
//! Separate processes, so each one's CPU is its own: this driver (the clients), a fast fake
//! OpenAI upstream and sluice (both this same binary, started with `upstream` / `sluice`),
//! and Debian's nginx (`nginx-light`; left out, with a message, when it is not installed)
//! relaying the same upstream with `proxy_buffering off`, two workers. Every chunk's
//! content is the time the upstream sent it (ns since the epoch, one clock for all), so a
//! client knows each chunk's latency; a relay's share is the latency through it minus the
//! latency direct. The driver raises RLIMIT_NOFILE to 65,536 (root, or a hard limit that
//! high) for itself and its children. Results go to target/loadgen/*.json and
//! docs/src/images/loadgen.svg.

// The benchmark's clients and its upstream are tasks of their own; the rule against
// spawning is for sluice's request path.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/proc.rs"]
mod proc;
#[path = "common/redis.rs"]
mod redis_nodes;
use proc::{cpu_s, open_fds, rss_kib};

/// CPU seconds of all of `pids`.
fn cpu_all(pids: &[String]) -> f64 {
    pids.iter().map(|p| cpu_s(p)).sum()
}

/// Resident memory of all of `pids`, KiB.
fn rss_all(pids: &[String]) -> u64 {
    pids.iter().map(|p| rss_kib(p)).sum()
}

/// The allocator sluice's binary uses (src/main.rs), for the sluice this binary runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `LOADGEN_SLUICE_WORKERS=1`: this build's sluice on a runtime of one thread (for the
    // profile of what cross-thread wake-ups cost; the sluice binary has one a core).
    if args.first().is_some_and(|mode| mode == "sluice") {
        // As sluice's binary does, before its runtime starts.
        sluice::server::reserve_descriptors();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if args.first().is_some_and(|mode| mode == "sluice")
        && let Some(n) = std::env::var("LOADGEN_SLUICE_WORKERS")
            .ok()
            .and_then(|n| n.parse().ok())
    {
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build()?;
    match args.first().map(String::as_str) {
        Some("upstream") => runtime.block_on(upstream()),
        Some("sluice") => runtime.block_on(sluice(&args[1], args.get(2).cloned(), None, None)),
        Some("sluice-otel") => runtime.block_on(sluice(&args[1], None, args.get(2).cloned(), None)),
        Some("sluice-ledger") => {
            runtime.block_on(sluice(&args[1], None, None, args.get(2).cloned()))
        }
        Some("sluice-budget") => runtime.block_on(sluice_budget(
            &args[1],
            &args[2],
            args.get(3).is_some_and(|b| b == "budget"),
        )),
        Some("ledger") => runtime.block_on(ledger()),
        Some("budget") => runtime.block_on(budget()),
        Some("otel") => runtime.block_on(otel()),
        Some("resumable") => runtime.block_on(resumable()),
        Some("dialects") => runtime.block_on(dialects(args.get(1).cloned())),
        Some("cancel") => runtime.block_on(cancel_only()),
        Some("pinned") => runtime.block_on(pinned()),
        Some("soak") => {
            let minutes: f64 = args.get(1).map_or(Ok(10.0), |m| m.parse())?;
            runtime.block_on(soak(minutes))
        }
        // Numbers run only those levels of the plan; a path adds another sluice binary
        // beside this build's, for a before-and-after in one run.
        _ => {
            let only = args.iter().filter_map(|n| n.parse().ok()).collect();
            let other = args.iter().find(|a| a.contains('/')).cloned();
            runtime.block_on(levels(only, other))
        }
    }
}

// ---------------------------------------------------------------------------------------
// The fake upstream: `load-{tokens}-{interval_ms}` streams that many chunks at that pace.

async fn upstream() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    let closes: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let closes = closes.clone();
        let id: Arc<Mutex<Option<String>>> = Arc::default();
        tokio::spawn(async move {
            let seen = id.clone();
            let record = closes.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                let closes = record.clone();
                async move { Ok::<_, Infallible>(answer(req, &seen, &closes).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            let id = id.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(id) = id {
                closes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, now_ns());
            }
        });
    }
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    seen: &Mutex<Option<String>>,
    closes: &Mutex<HashMap<String, u64>>,
) -> Response<Body> {
    if req.uri().path() == "/closes" {
        let all = std::mem::take(&mut *closes.lock().unwrap_or_else(|e| e.into_inner()));
        let body = serde_json::to_vec(&all).unwrap_or_default();
        return Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    }
    if let Some(id) = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_owned());
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body: Value = body
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let model = body["model"].as_str().unwrap_or("load-10-50");
    let mut parts = model
        .split('-')
        .skip(1)
        .map(|n| n.parse::<u64>().unwrap_or(10));
    let (tokens, interval) = (parts.next().unwrap_or(10), parts.next().unwrap_or(50));
    let frames = async_stream::stream! {
        let mut tick = tokio::time::interval(Duration::from_millis(interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..tokens {
            tick.tick().await;
            let chunk = format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":null}}]}}\n\n",
                now_ns()
            );
            yield Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)));
        }
        let end = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\ndata: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            tokens + 5
        );
        yield Ok(Frame::data(Bytes::from(end)));
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(Box::pin(frames)).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

// ---------------------------------------------------------------------------------------
// sluice, in front of the upstream, with limits out of the way.

async fn sluice(
    upstream: &str,
    redis: Option<String>,
    otel: Option<String>,
    database: Option<String>,
) -> anyhow::Result<()> {
    sluice_with(upstream, redis, otel, database, |_| {}).await
}

/// The key every load client sends (sluice without keys takes no notice of it).
const LOAD_KEY: &str = "sk-loadgen-budget-benchmark";

/// sluice on the ledger at `database`, with one key made through the admin API
/// (`LOAD_KEY`), with a budget it never reaches (`budgeted`) or none, and the load models
/// priced: the same work but the budget's.
async fn sluice_budget(upstream: &str, database: &str, budgeted: bool) -> anyhow::Result<()> {
    use sluice::ledger::keys::{Key, Terms, digest_hex};
    let db = sluice::ledger::Db::open(database).await?;
    db.create_key(&Key {
        id: "key_loadgen".into(),
        name: "loadgen".into(),
        prefix: LOAD_KEY.chars().take(14).collect(),
        digest: digest_hex(LOAD_KEY),
        previous_digest: None,
        previous_until_us: None,
        terms: Terms {
            rpm: Some(10_000_000),
            max_streams: Some(1_000_000),
            budget_usd: budgeted.then_some(1e9),
            budget_period: Some("month".into()),
            ..Terms::default()
        },
        models: None,
        team_id: None,
        expires_at_us: None,
        revoked_at_us: None,
        end_streams: false,
        created_us: 0,
        updated_us: 0,
    })
    .await?;
    let prices = std::env::current_dir()?.join("target/loadgen/budget-prices.toml");
    std::fs::write(&prices, "[prices.\"load-*\"]\ninput = 1\noutput = 2\n")?;
    let database = database.to_owned();
    sluice_with(upstream, None, None, Some(database), move |config| {
        config.config = Some(prices);
    })
    .await
}

async fn sluice_with(
    upstream: &str,
    redis: Option<String>,
    otel: Option<String>,
    database: Option<String>,
    adjust: impl FnOnce(&mut sluice::Config),
) -> anyhow::Result<()> {
    let mut config = sluice::Config::defaults();
    // No ledger but where one is measured (`ledger`).
    config.database_url = database.unwrap_or_else(|| "off".into());
    config.redis_url = redis;
    // Every request traced (sample ratio 1.0), exported as it would be in production.
    config.otel_endpoint = otel;
    config.otel_traces_sampler = "always_on".into();
    config.openai_base_url = Some(format!("http://{upstream}/v1"));
    config.local_model = Some("off".into());
    config.rpm = 10_000_000;
    config.max_streams = 1_000_000;
    config.global_max_streams = 1_000_000;
    config.keepalive_s = 60.0;
    // Every client of the benchmark is one address.
    config.max_connections_per_ip = 1_000_000;
    adjust(&mut config);
    let state = sluice::AppState::build(&config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    sluice::serve(listener, state, std::future::pending(), Duration::ZERO).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// nginx: the floor. Debian's nginx (`nginx-light`) relaying the same upstream with
// `proxy_buffering off`, two workers (one a core), upstream connections kept alive as
// sluice's are.

struct Nginx {
    master: Child,
    addr: String,
}

impl Nginx {
    /// nginx in front of `upstream`, its files under target/loadgen/nginx; `None`, said on
    /// stderr, when it is not installed.
    fn start(upstream: &str) -> anyhow::Result<Option<Nginx>> {
        let Some(binary) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            eprintln!(
                "nginx is not installed (Debian: apt-get install nginx-light): the nginx path is left out"
            );
            return Ok(None);
        };
        let dir = std::env::current_dir()?.join("target/loadgen/nginx");
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = format!(
            "daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 65536;
user root;
pid nginx.pid;
error_log error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path body;
    proxy_temp_path proxy;
    upstream mock {{ server {upstream}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
            proxy_request_buffering off;
            tcp_nodelay on;
        }}
    }}
}}
"
        );
        std::fs::write(dir.join("nginx.conf"), config)?;
        let master = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .args(["-c", "nginx.conf"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nginx did not listen on {addr} (see {})",
                dir.join("error.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(Nginx { master, addr }))
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<String> {
        let master = self.master.id().to_string();
        let mut pids = children(&master);
        pids.push(master);
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master is nginx's fast shutdown: it stops its workers, then
        // exits. (A worker stopped first would be started again by the master.) Any worker
        // left once the master is gone is stopped by its pid.
        let master = self.master.id().to_string();
        let workers = children(&master);
        let _ = Command::new("kill").args(["-TERM", &master]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(self.master.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
        for pid in workers {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }
}

/// The processes whose parent is `pid`.
fn children(pid: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    Some(rest.split_whitespace().nth(1)? == pid)
                })
                .unwrap_or(false)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The driver.

struct Proc {
    child: Child,
    addr: String,
}

impl Proc {
    fn start(args: &[&str]) -> anyhow::Result<Proc> {
        Self::start_on(args, None)
    }

    /// Starts this binary with `args`, on the given CPUs (`taskset -c`) when set. Memory
    /// settles as in sluice's own binary (see src/main.rs).
    fn start_on(args: &[&str], cpus: Option<&str>) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe()?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset.arg("-c").arg(cpus).arg(exe);
                taskset
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(args)
            // As sluice's own binary sets it, unless this run was given another value.
            .env(
                "MIMALLOC_PURGE_DELAY",
                std::env::var("MIMALLOC_PURGE_DELAY").unwrap_or_else(|_| "0".into()),
            )
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .ok_or_else(|| anyhow::anyhow!("{args:?} said {line:?}"))?
            .to_owned();
        Ok(Proc { child, addr })
    }

    /// Another sluice binary in front of `upstream` (for a side-by-side run), with the
    /// settings of this binary's own `sluice` mode.
    fn binary(binary: &str, upstream: &str) -> anyhow::Result<Proc> {
        // A port the kernel just gave out and took back: this run's own.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .to_string();
        let child = Command::new(binary)
            .env("SLUICE_ADDR", &addr)
            .env("OPENAI_BASE_URL", format!("http://{upstream}/v1"))
            .env("SLUICE_LOCAL_MODEL", "off")
            .env("SLUICE_RPM", "10000000")
            .env("SLUICE_MAX_STREAMS", "1000000")
            .env("SLUICE_GLOBAL_MAX_STREAMS", "1000000")
            .env("SLUICE_KEEPALIVE_S", "60")
            .env("SLUICE_MAX_CONNECTIONS_PER_IP", "1000000")
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{binary} did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Proc { child, addr })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one stream saw.
#[derive(Default)]
struct Seen {
    ttft_us: Option<u64>,
    /// Upstream send → client receive, per chunk, in µs.
    chunk_us: Vec<u32>,
    ok: bool,
}

/// The body of a streaming request on `path`, in that surface's wire format.
fn request_body(path: &str, model: &str) -> String {
    let body = match path {
        "/v1/responses" => json!({"model": model, "stream": true, "input": "Count."}),
        "/v1/messages" => json!({"model": model, "stream": true, "max_tokens": 1000,
            "messages": [{"role": "user", "content": "Count."}]}),
        "/api/chat" => json!({"model": model, "prompt": "Count."}),
        _ => json!({"model": model, "stream": true,
            "messages": [{"role": "user", "content": "Count."}]}),
    };
    body.to_string()
}

/// What comes just before a text delta's JSON string in `path`'s events.
fn text_key(path: &str) -> &'static str {
    match path {
        "/v1/responses" => "\"delta\":\"",
        "/v1/messages" | "/api/chat" => "\"text\":\"",
        _ => "\"content\":\"",
    }
}

/// What says `path`'s stream ended well, and what says it failed.
fn endings(path: &str) -> (&'static str, &'static str) {
    match path {
        "/v1/responses" => ("event: response.completed", "event: response.failed"),
        "/v1/messages" => ("event: message_stop", "event: error"),
        "/api/chat" => ("event: done", "event: error"),
        _ => ("[DONE]", "\"error\""),
    }
}

/// One streaming request to `addr`, read to the end (or until `cancel` fires: then the
/// connection is closed at once and the close time returned).
async fn stream(
    addr: &str,
    path: &str,
    id: &str,
    model: &str,
    opened: &AtomicUsize,
    cancel: Option<tokio::sync::watch::Receiver<bool>>,
    resumable: bool,
) -> (Seen, Option<u64>) {
    let mut seen = Seen::default();
    let started = Instant::now();
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (seen, None);
    };
    let _ = tcp.set_nodelay(true);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return (seen, None);
    };
    // The connection is driven in this task, not a spawned one: dropping it closes the
    // socket there and then, so a close's time is known exactly.
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let body = request_body(path, model);
    let mut request = Request::post(path);
    if resumable {
        request = request.header("x-sluice-resumable", "true");
    }
    let request = request
        .header("host", addr)
        .header("content-type", "application/json")
        .header(
            "authorization",
            concat!("Bearer ", "sk-loadgen-budget-benchmark"),
        )
        .header("x-request-id", id)
        .body(Full::new(Bytes::from(body)));
    let Ok(request) = request else {
        return (seen, None);
    };
    let response = tokio::select! {
        response = sender.send_request(request) => response,
        _ = &mut conn => return (seen, None),
    };
    let Ok(response) = response else {
        return (seen, None);
    };
    if response.status() != 200 {
        return (seen, None);
    }
    // A resumable stream must have been served as one, or the figures would lie.
    if resumable
        && response
            .headers()
            .get("x-sluice-resumable")
            .is_none_or(|v| v != "true")
    {
        return (seen, None);
    }
    let mut body = response.into_body();
    let mut cancel = cancel;
    let mut counted = false;
    loop {
        let cancelled = async {
            match &mut cancel {
                Some(cancel) => {
                    let _ = cancel.wait_for(|c| *c).await;
                }
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = &mut conn, if !conn_done => {
                conn_done = true;
                continue;
            }
            () = cancelled => {
                drop(body);
                drop(conn);
                return (seen, Some(now_ns()));
            }
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let received = now_ns();
        let text = String::from_utf8_lossy(&data);
        for part in text.split(text_key(path)).skip(1) {
            let digits: &str = part.split('"').next().unwrap_or("");
            if let Ok(sent) = digits.parse::<u64>() {
                if seen.ttft_us.is_none() {
                    seen.ttft_us = Some(started.elapsed().as_micros() as u64);
                    if !counted {
                        opened.fetch_add(1, Ordering::SeqCst);
                        counted = true;
                    }
                }
                seen.chunk_us
                    .push((received.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
            }
        }
        let (done, failed) = endings(path);
        if text.contains(done) {
            seen.ok = true;
        }
        if text.contains(failed) {
            seen.ok = false;
            break;
        }
    }
    (seen, None)
}

fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// How many times each level runs each path.
const REPEATS: usize = 3;

/// One phase: `c` streams to `target`, started in batches; the measurements.
#[derive(Default)]
struct Phase {
    ttft: Vec<u32>,
    chunks: Vec<u32>,
    errors: usize,
    wall_s: f64,
    rss_open_kib: u64,
}

impl Phase {
    fn add(&mut self, other: Phase) {
        self.ttft.extend(other.ttft);
        self.chunks.extend(other.chunks);
        self.errors += other.errors;
        self.wall_s += other.wall_s;
        self.rss_open_kib = other.rss_open_kib;
    }

    fn sort(&mut self) {
        self.ttft.sort_unstable();
        self.chunks.sort_unstable();
    }
}

async fn phase(target: &str, path: &str, c: usize, model: &str, watch: &[String]) -> Phase {
    phase_with(target, path, c, model, watch, false).await
}

async fn phase_with(
    target: &str,
    path: &str,
    c: usize,
    model: &str,
    watch: &[String],
    resumable: bool,
) -> Phase {
    let opened = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(c);
    for i in 0..c {
        let (target, path, model, opened) = (
            target.to_owned(),
            path.to_owned(),
            model.to_owned(),
            opened.clone(),
        );
        tasks.push(tokio::spawn(async move {
            stream(
                &target,
                &path,
                &format!("s{i}"),
                &model,
                &opened,
                None,
                resumable,
            )
            .await
            .0
        }));
        // Starts spread evenly over a second (three above 1,000 streams): streams tick
        // at every phase of their interval, and no SYN storm hits the 1,024-deep backlog.
        let batch = (c / 100).max(1);
        if i % batch == batch - 1 {
            let spread = if c > 1_000 { 3_000 } else { 1_000 };
            tokio::time::sleep(Duration::from_millis(spread / 100)).await;
        }
    }
    // RSS once every stream is open and streaming.
    let deadline = Instant::now() + Duration::from_secs(30);
    while opened.load(Ordering::SeqCst) < c && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_open_kib = rss_all(watch);
    let mut ttft = Vec::with_capacity(c);
    let mut chunks = Vec::new();
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(seen) if seen.ok => {
                ttft.extend(seen.ttft_us.map(|t| t.min(u32::MAX as u64) as u32));
                chunks.extend(seen.chunk_us);
            }
            _ => errors += 1,
        }
    }
    ttft.sort_unstable();
    chunks.sort_unstable();
    Phase {
        ttft,
        chunks,
        errors,
        wall_s: started.elapsed().as_secs_f64(),
        rss_open_kib,
    }
}

/// Raises RLIMIT_NOFILE as far as allowed; returns it. sluice holds two descriptors a
/// stream (its client's and its upstream's).
fn raise_fd_limit() -> u64 {
    let want = 65_536;
    if rlimit::Resource::NOFILE.set(want, want).is_err() {
        let _ = rlimit::increase_nofile_limit(want);
    }
    let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((0, 0));
    eprintln!("RLIMIT_NOFILE: {soft}");
    soft
}

/// Pauses: 128 streams at 50 tokens a second with sluice pinned to one core (the upstream
/// and this driver on the other). Any stall in sluice's runtime shows in the tail and the
/// maximum of the per-chunk latency, direct against through sluice.
async fn pinned() -> anyhow::Result<()> {
    raise_fd_limit();
    let upstream = Proc::start_on(&["upstream"], Some("0"))?;
    let gateway = Proc::start_on(&["sluice", &upstream.addr], Some("1"))?;
    let gw_pid = gateway.pid().to_string();
    let (c, model) = (128, "load-100-20");
    let mut direct = Phase::default();
    let mut through = Phase::default();
    let mut cpu = 0.0;
    let mut wall = 0.0;
    for _ in 0..REPEATS {
        direct.add(phase(&upstream.addr, "/v1/chat/completions", c, model, &[]).await);
        let (g0, t0) = (cpu_s(&gw_pid), Instant::now());
        through.add(
            phase(
                &gateway.addr,
                "/v1/chat/completions",
                c,
                model,
                std::slice::from_ref(&gw_pid),
            )
            .await,
        );
        cpu += cpu_s(&gw_pid) - g0;
        wall += t0.elapsed().as_secs_f64();
    }
    direct.sort();
    through.sort();
    let row = |name: &str, p: &Phase| {
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
            quantile(&p.chunks, 0.5),
            quantile(&p.chunks, 0.99),
            quantile(&p.chunks, 0.999),
            quantile(&p.chunks, 1.0),
            p.errors
        );
    };
    println!("128 streams x 50 tokens/s, sluice on one core: chunk latency (ms)\n");
    println!("| path | p50 | p99 | p99.9 | max | errors |\n|---|---|---|---|---|---|");
    row("direct", &direct);
    row("through sluice", &through);
    println!(
        "\nadded: p99.9 {:.3} ms, max {:.3} ms; sluice used {:.0}% of its core",
        quantile(&through.chunks, 0.999) - quantile(&direct.chunks, 0.999),
        quantile(&through.chunks, 1.0) - quantile(&direct.chunks, 1.0),
        cpu / wall * 100.0
    );
    Ok(())
}

/// A redis-server of the benchmark's own on a free port (killed with the guard).
fn redis_server() -> anyhow::Result<(redis_nodes::Redis, String)> {
    anyhow::ensure!(
        redis_nodes::available(&["redis-server"]),
        "redis-server is not installed (Debian package redis-server)"
    );
    let redis = redis_nodes::Redis::single();
    let url = redis.url.clone();
    Ok((redis, url))
}

/// CPU per chunk of each wire format on one chat upstream, 1,000 streams each, passes
/// interleaved: chat completions (the relay), and the three translated ones. With
/// `other` (a sluice binary), the same on it, side by side in the same run.
async fn dialects(other: Option<String>) -> anyhow::Result<()> {
    raise_fd_limit();
    let upstream = Proc::start(&["upstream"])?;
    let mut gateways = vec![(
        "this build".to_owned(),
        Proc::start(&["sluice", &upstream.addr])?,
    )];
    if let Some(binary) = other {
        gateways.push((binary.clone(), Proc::binary(&binary, &upstream.addr)?));
    }
    let paths = [
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/api/chat",
    ];
    let (c, model) = (1_000, "load-40-50");
    let n = gateways.len() * paths.len();
    let (mut cpu, mut chunks, mut errors) = (vec![0.0f64; n], vec![0usize; n], vec![0usize; n]);
    let mut ttft: Vec<Vec<u32>> = vec![Vec::new(); n];
    for _ in 0..REPEATS {
        for (g, (_, gateway)) in gateways.iter().enumerate() {
            for (p, path) in paths.iter().enumerate() {
                let i = g * paths.len() + p;
                let pid = gateway.pid().to_string();
                let before = cpu_s(&pid);
                let pass = phase_with(
                    &gateway.addr,
                    path,
                    c,
                    model,
                    std::slice::from_ref(&pid),
                    false,
                )
                .await;
                cpu[i] += cpu_s(&pid) - before;
                chunks[i] += pass.chunks.len();
                errors[i] += pass.errors;
                ttft[i].extend(pass.ttft);
            }
        }
    }
    println!(
        "1,000 streams x 20 tokens/s (40 tokens each) on one chat upstream, {REPEATS} passes each, interleaved\n"
    );
    println!(
        "| sluice | path | chunks | errors | sluice CPU µs / chunk | vs chat completions | first token p50 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (g, (name, _)) in gateways.iter().enumerate() {
        let base = cpu[g * paths.len()] / chunks[g * paths.len()].max(1) as f64;
        for (p, path) in paths.iter().enumerate() {
            let i = g * paths.len() + p;
            ttft[i].sort_unstable();
            let per = cpu[i] / chunks[i].max(1) as f64;
            let first = quantile(&ttft[i], 0.5);
            println!(
                "| {name} | `{path}` | {} | {} | {:.1} | {:.2}x | {first:.3} |",
                chunks[i],
                errors[i],
                per * 1e6,
                per / base
            );
            rows.push(
                json!({"sluice": name, "path": path, "chunks": chunks[i], "errors": errors[i],
                "cpu_us_per_chunk": per * 1e6, "vs_chat": per / base, "first_token_p50_ms": first}),
            );
        }
    }
    std::fs::create_dir_all("target/loadgen")?;
    std::fs::write(
        "target/loadgen/dialects.json",
        serde_json::to_vec_pretty(&rows)?,
    )?;
    Ok(())
}

/// One pass of `c` streams of `model` through `gateway` on /v1/chat/completions: its CPU
/// per chunk (what it spent until `settle` after the pass), and the pass.
async fn cpu_pass(gateway: &Proc, c: usize, model: &str, settle: Duration) -> (f64, Phase) {
    let pid = gateway.pid().to_string();
    let before = cpu_s(&pid);
    let pass = phase_with(
        &gateway.addr,
        "/v1/chat/completions",
        c,
        model,
        std::slice::from_ref(&pid),
        false,
    )
    .await;
    tokio::time::sleep(settle).await;
    let cpu = (cpu_s(&pid) - before) / pass.chunks.len().max(1) as f64;
    (cpu, pass)
}

/// What OpenTelemetry costs: 1,000 streams x 20 tokens/s through two sluices side by side,
/// one without an exporter and one tracing every request (sample ratio 1.0) to a collector
/// (a sink in this process that counts what it is sent), passes interleaved; sluice's CPU
/// per chunk for each, its exporter thread included.
async fn otel() -> anyhow::Result<()> {
    raise_fd_limit();
    let (sink, received) = otlp_sink().await?;
    let upstream = Proc::start(&["upstream"])?;
    let plain = Proc::start(&["sluice", &upstream.addr])?;
    let traced = Proc::start(&["sluice-otel", &upstream.addr, &format!("http://{sink}")])?;
    let (c, model) = (1_000, "load-40-50");
    let paths = [
        ("no exporter", &plain),
        ("OTLP exporter, every request traced", &traced),
    ];
    let mut per_pass: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let (mut chunks, mut errors) = (vec![0usize; paths.len()], vec![0usize; paths.len()]);
    for _ in 0..REPEATS {
        for (i, (_, gateway)) in paths.iter().enumerate() {
            let (cpu, pass) = cpu_pass(gateway, c, model, Duration::ZERO).await;
            per_pass[i].push(cpu);
            chunks[i] += pass.chunks.len();
            errors[i] += pass.errors;
        }
    }
    // The exporter sends its last batch within its schedule (5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (exports, bytes) = {
        let r = received.lock().unwrap_or_else(|e| e.into_inner());
        (r.0, r.1)
    };
    println!(
        "1,000 streams x 20 tokens/s (40 tokens each), /v1/chat/completions, {REPEATS} passes each, interleaved\n"
    );
    println!("| sluice | chunks | errors | CPU µs / chunk (median of passes) | vs no exporter |");
    println!("|---|---|---|---|---|");
    let medians: Vec<f64> = per_pass.into_iter().map(median).collect();
    let mut rows = Vec::new();
    for (i, (name, _)) in paths.iter().enumerate() {
        let ratio = medians[i] / medians[0];
        println!(
            "| {name} | {} | {} | {:.1} | {ratio:.3}x |",
            chunks[i],
            errors[i],
            medians[i] * 1e6
        );
        rows.push(
            json!({"sluice": name, "chunks": chunks[i], "errors": errors[i],
            "cpu_us_per_chunk": medians[i] * 1e6, "vs_no_exporter": ratio}),
        );
    }
    println!(
        "\nthe collector received {exports} exports, {:.1} MiB",
        bytes as f64 / 1_048_576.0
    );
    std::fs::create_dir_all("target/loadgen")?;
    std::fs::write(
        "target/loadgen/otel.json",
        serde_json::to_vec_pretty(&rows)?,
    )?;
    Ok(())
}

/// What the ledger costs: 1,000 streams x 20 tokens/s through three sluices side by side
/// (ledger off; on SQLite; on PostgreSQL, when Debian's server is installed), passes
/// interleaved: CPU per chunk and RSS after each pass; then the records per second each
/// database takes, written in the ledger's batches, and each sluice's count of what it wrote.
async fn ledger() -> anyhow::Result<()> {
    raise_fd_limit();
    let pg = postgres::Postgres::start();
    if pg.is_none() {
        eprintln!("PostgreSQL is not installed (Debian's postgresql): measured without it");
    }
    std::fs::create_dir_all("target/loadgen")?;
    let sqlite_path = std::env::current_dir()?.join("target/loadgen/ledger.db");
    for end in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{end}", sqlite_path.display()));
    }
    let sqlite_url = format!("sqlite://{}", sqlite_path.display());
    let upstream = Proc::start(&["upstream"])?;
    let mut paths = vec![
        ("ledger off", Proc::start(&["sluice", &upstream.addr])?),
        (
            "ledger on SQLite",
            Proc::start(&["sluice-ledger", &upstream.addr, &sqlite_url])?,
        ),
    ];
    if let Some(pg) = &pg {
        paths.push((
            "ledger on PostgreSQL",
            Proc::start(&["sluice-ledger", &upstream.addr, &pg.url()])?,
        ));
    }
    let (c, model) = (1_000, "load-40-50");
    // More passes than elsewhere: the difference sought is a few per cent.
    let passes = 2 * REPEATS;
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut rss: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let (mut chunks, mut errors) = (vec![0usize; paths.len()], vec![0usize; paths.len()]);
    for _ in 0..passes {
        for (i, (_, gateway)) in paths.iter().enumerate() {
            // The ledger writes a pass's records a moment after its last stream ends.
            let (per_chunk, pass) = cpu_pass(gateway, c, model, Duration::from_millis(500)).await;
            cpu[i].push(per_chunk);
            rss[i].push(rss_kib(&gateway.pid().to_string()) as f64 / 1024.0);
            chunks[i] += pass.chunks.len();
            errors[i] += pass.errors;
        }
    }
    println!(
        "1,000 streams x 20 tokens/s (40 tokens each), /v1/chat/completions, {passes} passes each, interleaved\n"
    );
    println!(
        "| sluice | chunks | errors | CPU µs / chunk (median) | vs off | RSS MiB (median) | records written |"
    );
    println!("|---|---|---|---|---|---|---|");
    let medians: Vec<f64> = cpu.into_iter().map(median).collect();
    let mut rows = Vec::new();
    for (i, (name, gateway)) in paths.iter().enumerate() {
        let ratio = medians[i] / medians[0];
        let rss = median(rss[i].clone());
        let written = metric(&gateway.addr, "sluice_ledger_records_written_total").await;
        println!(
            "| {name} | {} | {} | {:.2} | {ratio:.3}x | {rss:.0} | {written} |",
            chunks[i],
            errors[i],
            medians[i] * 1e6
        );
        rows.push(
            json!({"sluice": name, "chunks": chunks[i], "errors": errors[i],
            "cpu_us_per_chunk": medians[i] * 1e6, "vs_off": ratio, "rss_mib": rss,
            "records_written": written}),
        );
    }

    // The write rate: records in the ledger's batches (256), one after another.
    let mut rates = vec![("SQLite", sqlite_url.clone())];
    if let Some(pg) = &pg {
        rates.push(("PostgreSQL", pg.url()));
    }
    println!("\n| database | records | seconds | records / s |");
    println!("|---|---|---|---|");
    for (name, url) in rates {
        let db = sluice::ledger::Db::open(&url).await?;
        let n = 50_000;
        let started = Instant::now();
        for batch in 0..n / 250 {
            let records: Vec<sluice::ledger::Record> = (0..250)
                .map(|i| sluice::ledger::Record {
                    id: format!("rate-{batch}-{i}-{}", now_ns()),
                    request_id: format!("{batch}-{i}"),
                    at_us: (now_ns() / 1_000) as i64,
                    key: "loadgen".into(),
                    route: "/v1/chat/completions".into(),
                    model: model.into(),
                    api: "openai".into(),
                    outcome: "completed".into(),
                    input_tokens: 12,
                    output_tokens: 40,
                    duration_ms: 2000.0,
                    ..Default::default()
                })
                .collect();
            db.insert("loadgen", &records).await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "| {name} | {n} | {seconds:.2} | {:.0} |",
            n as f64 / seconds
        );
        rows.push(json!({"database": name, "records": n, "seconds": seconds,
            "records_per_s": n as f64 / seconds}));
    }
    std::fs::write(
        "target/loadgen/ledger.json",
        serde_json::to_vec_pretty(&rows)?,
    )?;
    Ok(())
}

/// What a budget costs per chunk: 1,000 streams x 20 tokens/s through two sluices side by
/// side, each on its own SQLite ledger with one key, priced models, passes interleaved: the
/// key with a budget (never reached: every chunk is metered against it, a slice drawn every
/// 16 tokens) and without one.
async fn budget() -> anyhow::Result<()> {
    raise_fd_limit();
    std::fs::create_dir_all("target/loadgen")?;
    let url = |name: &str| -> anyhow::Result<String> {
        let path = std::env::current_dir()?.join(format!("target/loadgen/{name}.db"));
        for end in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{end}", path.display()));
        }
        Ok(format!("sqlite://{}", path.display()))
    };
    let upstream = Proc::start(&["upstream"])?;
    let paths = [
        (
            "key without a budget",
            Proc::start(&["sluice-budget", &upstream.addr, &url("unbudgeted")?, "none"])?,
        ),
        (
            "key with a budget",
            Proc::start(&["sluice-budget", &upstream.addr, &url("budgeted")?, "budget"])?,
        ),
    ];
    // Each takes its key from the database within a second of starting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (c, model) = (1_000, "load-40-50");
    let passes = 2 * REPEATS;
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let (mut chunks, mut errors) = (vec![0usize; paths.len()], vec![0usize; paths.len()]);
    for _ in 0..passes {
        for (i, (_, gateway)) in paths.iter().enumerate() {
            let (per_chunk, pass) = cpu_pass(gateway, c, model, Duration::from_millis(500)).await;
            cpu[i].push(per_chunk);
            chunks[i] += pass.chunks.len();
            errors[i] += pass.errors;
        }
    }
    println!(
        "1,000 streams x 20 tokens/s (40 tokens each), /v1/chat/completions, {passes} passes each, interleaved\n"
    );
    println!("| sluice | chunks | errors | CPU µs / chunk (median) | vs no budget |");
    println!("|---|---|---|---|---|");
    let medians: Vec<f64> = cpu.into_iter().map(median).collect();
    let mut rows = Vec::new();
    for (i, (name, _)) in paths.iter().enumerate() {
        let ratio = medians[i] / medians[0];
        println!(
            "| {name} | {} | {} | {:.2} | {ratio:.3}x |",
            chunks[i],
            errors[i],
            medians[i] * 1e6
        );
        rows.push(
            json!({"sluice": name, "chunks": chunks[i], "errors": errors[i],
            "cpu_us_per_chunk": medians[i] * 1e6, "vs_no_budget": ratio}),
        );
    }
    std::fs::write(
        "target/loadgen/budget.json",
        serde_json::to_vec_pretty(&rows)?,
    )?;
    Ok(())
}

/// One series' value in the `/metrics` of the sluice at `addr` (0 when absent).
async fn metric(addr: &str, series: &str) -> f64 {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return 0.0;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return 0.0;
    };
    let driver = tokio::spawn(conn);
    let request = Request::get("/metrics")
        .header("host", addr)
        .body(Full::new(Bytes::new()));
    let mut value = 0.0;
    if let Ok(request) = request
        && let Ok(response) = sender.send_request(request).await
        && let Ok(body) = response.into_body().collect().await
    {
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        value = text
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0);
    }
    driver.abort();
    value
}

/// A collector that takes OTLP/HTTP exports and counts them (exports, bytes).
async fn otlp_sink() -> anyhow::Result<(std::net::SocketAddr, Arc<Mutex<(usize, usize)>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let received: Arc<Mutex<(usize, usize)>> = Arc::default();
    let counts = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counts = counts.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let n = body.map_or(0, |b| b.len());
                        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                        c.0 += 1;
                        c.1 += n;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok((addr, received))
}

/// What resumption costs: 1,000 streams x 20 tokens/s through three sluices side by side
/// (direct streams; resumable ones logged in memory; resumable ones logged in memory and
/// in Redis), passes interleaved; sluice's CPU per chunk for each (Redis' own CPU apart).
async fn resumable() -> anyhow::Result<()> {
    raise_fd_limit();
    let (redis, redis_url) = redis_server()?;
    let upstream = Proc::start(&["upstream"])?;
    let plain = Proc::start(&["sluice", &upstream.addr])?;
    let shared = Proc::start(&["sluice", &upstream.addr, &redis_url])?;
    let (c, model) = (1_000, "load-40-50");
    // (name, sluice, resumable)
    let paths = [
        ("direct (not resumable)", &plain, false),
        ("resumable, in memory", &plain, true),
        ("resumable, memory + Redis", &shared, true),
    ];
    let mut cpu = [0.0f64; 3];
    let mut redis_cpu = [0.0f64; 3];
    let mut chunks = [0usize; 3];
    let mut errors = [0usize; 3];
    let mut latency: [Vec<u32>; 3] = Default::default();
    let redis_pid = redis.pid().unwrap_or(0).to_string();
    for _ in 0..REPEATS {
        for (i, (_, gateway, resumable)) in paths.iter().enumerate() {
            let pid = gateway.pid().to_string();
            let (g0, r0) = (cpu_s(&pid), cpu_s(&redis_pid));
            let pass = phase_with(
                &gateway.addr,
                "/v1/chat/completions",
                c,
                model,
                std::slice::from_ref(&pid),
                *resumable,
            )
            .await;
            cpu[i] += cpu_s(&pid) - g0;
            redis_cpu[i] += cpu_s(&redis_pid) - r0;
            chunks[i] += pass.chunks.len();
            errors[i] += pass.errors;
            latency[i].extend(pass.chunks);
        }
    }
    println!("1,000 streams x 20 tokens/s (40 tokens each), {REPEATS} passes each, interleaved\n");
    println!(
        "| path | chunks | errors | sluice CPU µs / chunk | ratio | redis-server CPU µs / chunk | chunk latency p50 / p99 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let base = cpu[0] / chunks[0].max(1) as f64;
    let mut rows = Vec::new();
    for (i, (name, _, _)) in paths.iter().enumerate() {
        latency[i].sort_unstable();
        let per = cpu[i] / chunks[i].max(1) as f64;
        let redis_per = redis_cpu[i] / chunks[i].max(1) as f64;
        println!(
            "| {name} | {} | {} | {:.1} | {:.2}x | {:.1} | {:.3} / {:.3} |",
            chunks[i],
            errors[i],
            per * 1e6,
            per / base,
            redis_per * 1e6,
            quantile(&latency[i], 0.5),
            quantile(&latency[i], 0.99),
        );
        rows.push(json!({"path": name, "chunks": chunks[i], "errors": errors[i],
            "sluice_cpu_us_per_chunk": per * 1e6, "ratio": per / base,
            "redis_cpu_us_per_chunk": redis_per * 1e6,
            "chunk_ms_p50": quantile(&latency[i], 0.5), "chunk_ms_p99": quantile(&latency[i], 0.99)}));
    }
    std::fs::create_dir_all("target/loadgen")?;
    std::fs::write(
        "target/loadgen/resumable.json",
        serde_json::to_string_pretty(&json!({"rows": rows}))?,
    )?;
    println!("\nwrote target/loadgen/resumable.json");
    Ok(())
}

/// A path's figures in one pass.
struct Pass {
    phase: Phase,
    /// CPU seconds of the path's own processes (none for direct), and of the upstream.
    cpu_s: f64,
    upstream_cpu_s: f64,
}

impl Pass {
    fn rate(&self) -> f64 {
        self.phase.chunks.len() as f64 / self.phase.wall_s.max(1e-9)
    }

    /// A latency quantile of this pass (ms): to the first token, or per chunk.
    fn quantile(&self, q: f64, ttft: bool) -> f64 {
        quantile(
            if ttft {
                &self.phase.ttft
            } else {
                &self.phase.chunks
            },
            q,
        )
    }

    /// CPU seconds a chunk: the path's own, and the upstream's.
    fn cpu_per_chunk(&self) -> (f64, f64) {
        let chunks = self.phase.chunks.len().max(1) as f64;
        (self.cpu_s / chunks, self.upstream_cpu_s / chunks)
    }
}

/// The median, over the rounds, of a quantile of `passes` minus the same quantile of
/// `base`'s pass in that round.
fn apart(passes: &[Pass], base: &[Pass], q: f64, ttft: bool) -> f64 {
    median(
        passes
            .iter()
            .zip(base)
            .map(|(p, b)| p.quantile(q, ttft) - b.quantile(q, ttft))
            .collect(),
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One path's figures at one level: each the median over the passes, a latency added
/// being the path's quantile minus the direct pass's of the same repeat.
fn figures(passes: &[Pass], direct: &[Pass], c: usize, idle_rss_kib: u64) -> Value {
    let added = |q: f64, ttft: bool| apart(passes, direct, q, ttft);
    let p99 = |ttft: bool| median(passes.iter().map(|p| p.quantile(0.99, ttft)).collect());
    let chunks: usize = passes.iter().map(|p| p.phase.chunks.len()).sum();
    let cpu: f64 = passes.iter().map(|p| p.cpu_s).sum();
    let upstream: f64 = passes.iter().map(|p| p.upstream_cpu_s).sum();
    let rss_open = median(passes.iter().map(|p| p.phase.rss_open_kib as f64).collect());
    json!({
        "ttft_ms": {"added_p50": added(0.5, true), "added_p99": added(0.99, true),
            "p99": p99(true)},
        "chunk_ms": {"added_p50": added(0.5, false), "added_p99": added(0.99, false),
            "added_p999": added(0.999, false),
            "p99": p99(false)},
        "chunks": chunks,
        "chunks_per_s": median(passes.iter().map(Pass::rate).collect()),
        "share_of_direct": median(passes.iter().zip(direct).map(|(p, d)| p.rate() / d.rate()).collect()),
        "errors": passes.iter().map(|p| p.phase.errors).sum::<usize>(),
        "cpu_s": cpu,
        "cpu_us_per_chunk": median(passes.iter().map(|p| p.cpu_per_chunk().0 * 1e6).collect()),
        "upstream_cpu_us_per_chunk": median(passes.iter().map(|p| p.cpu_per_chunk().1 * 1e6).collect()),
        "cpu_vs_upstream": cpu / upstream.max(1e-9),
        "rss_kib": {"idle": idle_rss_kib, "open": rss_open,
            "per_stream": (rss_open - idle_rss_kib as f64).max(0.0) / c as f64},
    })
}

/// The plan, or the levels named on the command line (`loadgen -- 1000 2000`).
async fn levels(only: Vec<usize>, other: Option<String>) -> anyhow::Result<()> {
    let fd_limit = raise_fd_limit();
    let upstream = Proc::start(&["upstream"])?;
    let gateway = Proc::start(&["sluice", &upstream.addr])?;
    let nginx = Nginx::start(&upstream.addr)?;
    let other = match other {
        Some(binary) => Some(Proc::binary(&binary, &upstream.addr)?),
        None => None,
    };
    let up_pid = upstream.pid().to_string();
    let me = std::process::id().to_string();
    // (name, address, its own processes)
    let mut paths = vec![("direct", upstream.addr.clone(), Vec::new())];
    if let Some(nginx) = &nginx {
        paths.push(("nginx", nginx.addr.clone(), nginx.pids()));
    }
    paths.push((
        "sluice",
        gateway.addr.clone(),
        vec![gateway.pid().to_string()],
    ));
    if let Some(other) = &other {
        paths.push(("other", other.addr.clone(), vec![other.pid().to_string()]));
    }
    eprintln!(
        "pids: sluice {}, nginx {:?}, upstream {up_pid}, client {me}",
        gateway.pid(),
        nginx.as_ref().map(Nginx::pids).unwrap_or_default()
    );
    let idle: Vec<u64> = paths.iter().map(|(_, _, pids)| rss_all(pids)).collect();
    // (streams, tokens a stream, ms between tokens)
    let plan: [(usize, u64, u64); 6] = [
        (1, 40, 50),
        (100, 40, 50),
        (1_000, 40, 50),
        (2_000, 40, 50),
        (5_000, 30, 250),
        (10_000, 20, 500),
    ];
    let mut rows = Vec::new();
    println!(
        "each figure the median of {REPEATS} passes a path, passes interleaved; added = the path's quantile minus the direct pass's\n"
    );
    println!(
        "| streams | tokens/s each | path | added TTFT p50 / p99 (ms) | added per chunk p50 / p99 / p99.9 (ms) | chunks/s (share of direct) | errors | CPU µs / chunk (× upstream's) | RSS / open stream |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (c, tokens, interval) in plan {
        if !only.is_empty() && !only.contains(&c) {
            continue;
        }
        let most = (fd_limit.saturating_sub(100) / 2) as usize;
        let c = if c > most {
            eprintln!(
                "{c} streams need {} descriptors in a relay; the limit is {fd_limit}: running {most}",
                2 * c + 100
            );
            most
        } else {
            c
        };
        let model = format!("load-{tokens}-{interval}");
        let mut passes: Vec<Vec<Pass>> = paths.iter().map(|_| Vec::new()).collect();
        for _ in 0..REPEATS {
            for (i, (_, addr, pids)) in paths.iter().enumerate() {
                let (c0, u0) = (cpu_all(pids), cpu_s(&up_pid));
                let phase = phase(addr, "/v1/chat/completions", c, &model, pids).await;
                passes[i].push(Pass {
                    phase,
                    cpu_s: cpu_all(pids) - c0,
                    upstream_cpu_s: cpu_s(&up_pid) - u0,
                });
            }
        }
        let mut row = json!({"streams": c, "tokens_per_s": 1000.0 / interval as f64,
            "tokens_per_stream": tokens});
        for (i, (name, _, _)) in paths.iter().enumerate() {
            let figures = figures(&passes[i], &passes[0], c, idle[i]);
            let f = |group: &str, key: &str| figures[group][key].as_f64().unwrap_or(f64::NAN);
            let cpu = if i == 0 {
                format!(
                    "({:.1} upstream)",
                    figures["upstream_cpu_us_per_chunk"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                )
            } else {
                format!(
                    "{:.1} ({:.2}×)",
                    figures["cpu_us_per_chunk"].as_f64().unwrap_or(f64::NAN),
                    figures["cpu_vs_upstream"].as_f64().unwrap_or(f64::NAN)
                )
            };
            println!(
                "| {c} | {:.0} | {name} | {:.3} / {:.3} | {:.3} / {:.3} / {:.3} | {:.0} ({:.1} %) | {} | {cpu} | {:.1} KiB |",
                1000.0 / interval as f64,
                f("ttft_ms", "added_p50"),
                f("ttft_ms", "added_p99"),
                f("chunk_ms", "added_p50"),
                f("chunk_ms", "added_p99"),
                f("chunk_ms", "added_p999"),
                figures["chunks_per_s"].as_f64().unwrap_or(0.0),
                figures["share_of_direct"].as_f64().unwrap_or(0.0) * 100.0,
                figures["errors"],
                f("rss_kib", "per_stream"),
            );
            row[name] = figures;
        }
        // Each relay against nginx, pass by pass (the same round's), then the median: the
        // direct pass's own tail drops out of the comparison.
        if let Some(n) = paths.iter().position(|(name, _, _)| *name == "nginx") {
            for (i, (name, _, _)) in paths.iter().enumerate().skip(n + 1) {
                let (relay, floor) = (&passes[i], &passes[n]);
                let cpu = relay.iter().zip(floor);
                row[name]["vs_nginx"] = json!({
                    "cpu_ratio": median(cpu.map(|(p, g)| p.cpu_per_chunk().0 / g.cpu_per_chunk().0).collect()),
                    "chunk_p99_ms": apart(relay, floor, 0.99, false),
                    "ttft_p99_ms": apart(relay, floor, 0.99, true),
                });
            }
        }
        rows.push(row);
    }
    println!();
    against_nginx(&rows);
    if !only.is_empty() {
        write_levels(&rows, None)?;
        return Ok(());
    }
    let cancel = cancellation(&gateway.addr, &upstream.addr, 1_000).await;
    println!(
        "\ncancellation, 1,000 clients closing at once: upstream closed after p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} of {} seen closed)",
        cancel["p50_ms"].as_f64().unwrap_or(f64::NAN),
        cancel["p99_ms"].as_f64().unwrap_or(f64::NAN),
        cancel["max_ms"].as_f64().unwrap_or(f64::NAN),
        cancel["closed"],
        cancel["streams"],
    );
    write_levels(&rows, Some(cancel))?;
    chart(&rows)?;
    println!("wrote docs/src/images/loadgen.svg");
    Ok(())
}

fn write_levels(rows: &[Value], cancel: Option<Value>) -> anyhow::Result<()> {
    let results = json!({"levels": rows, "cancellation": cancel,
        "machine": {"cores": std::thread::available_parallelism().map_or(0, |n| n.get())}});
    std::fs::create_dir_all("target/loadgen")?;
    std::fs::write(
        "target/loadgen/levels.json",
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("wrote target/loadgen/levels.json");
    Ok(())
}

/// sluice against nginx at each level, as ratios (the targets beside them), and
/// the memory each holds per stream added from one level to the next.
fn against_nginx(rows: &[Value]) {
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    if rows.iter().all(|r| r["nginx"].is_null()) {
        return;
    }
    println!(
        "| streams | CPU / chunk, sluice ÷ nginx (≤ 1.25) | chunk p99, sluice − nginx (≤ 1 ms) | TTFT p99, sluice − nginx (≤ 2 ms) | share of direct: nginx / sluice (≥ 95 %) |"
    );
    println!("|---|---|---|---|---|");
    for (row, relay) in rows
        .iter()
        .flat_map(|r| ["sluice", "other"].map(|relay| (r, relay)))
        .filter(|(r, relay)| !r[*relay].is_null())
    {
        let (s, n) = (&row[relay], &row["nginx"]);
        println!(
            "| {} {relay} | {:.2}× | {:+.3} ms | {:+.3} ms | {:.1} % / {:.1} % |",
            row["streams"],
            num(&s["vs_nginx"]["cpu_ratio"]),
            num(&s["vs_nginx"]["chunk_p99_ms"]),
            num(&s["vs_nginx"]["ttft_p99_ms"]),
            num(&n["share_of_direct"]) * 100.0,
            num(&s["share_of_direct"]) * 100.0,
        );
    }
    for pair in rows.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let extra = num(&b["streams"]) - num(&a["streams"]);
        let per = |path: &str| {
            (num(&b[path]["rss_kib"]["open"]) - num(&a[path]["rss_kib"]["open"])) / extra
        };
        for relay in ["sluice", "other"].into_iter().filter(|r| !b[*r].is_null()) {
            println!(
                "RSS per extra stream, {} → {} streams: nginx {:.1} KiB, {relay} {:.1} KiB ({:.2}×; ≤ 1.5)",
                a["streams"],
                b["streams"],
                per("nginx"),
                per(relay),
                per(relay) / per("nginx")
            );
        }
    }
}

async fn cancel_only() -> anyhow::Result<()> {
    raise_fd_limit();
    let upstream = Proc::start(&["upstream"])?;
    let gateway = Proc::start(&["sluice", &upstream.addr])?;
    eprintln!(
        "pids: sluice {}, upstream {}",
        gateway.pid(),
        upstream.pid()
    );
    let cancel = cancellation(&gateway.addr, &upstream.addr, 1_000).await;
    println!("{cancel}");
    Ok(())
}

/// `n` long streams through sluice; once all stream, every client closes at once. How long
/// until the upstream saw each of its connections close?
async fn cancellation(gateway: &str, upstream: &str, n: usize) -> Value {
    let opened = Arc::new(AtomicUsize::new(0));
    let (fire, cancel) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..n {
        let (gateway, opened, cancel) = (gateway.to_owned(), opened.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("cancel-{i}");
            let (_, closed) = stream(
                &gateway,
                "/v1/chat/completions",
                &id,
                "load-100000-50",
                &opened,
                Some(cancel),
                false,
            )
            .await;
            (id, closed)
        }));
        if i % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while opened.load(Ordering::SeqCst) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = fire.send(true);
    let mut closed_at = HashMap::new();
    for task in tasks {
        if let Ok((id, Some(at))) = task.await {
            closed_at.insert(id, at);
        }
    }
    // Let the upstream see the closes, then ask it when.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = fetch_closes(upstream).await;
    let mut delays: Vec<u32> = closed_at
        .iter()
        .filter_map(|(id, client)| {
            let upstream = seen.get(id)?;
            Some((upstream.saturating_sub(*client) / 1000).min(u32::MAX as u64) as u32)
        })
        .collect();
    delays.sort_unstable();
    json!({"streams": n, "closed": delays.len(), "p50_ms": quantile(&delays, 0.5),
        "p99_ms": quantile(&delays, 0.99), "max_ms": quantile(&delays, 1.0)})
}

async fn fetch_closes(upstream: &str) -> HashMap<String, u64> {
    let Ok(tcp) = tokio::net::TcpStream::connect(upstream).await else {
        return HashMap::new();
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return HashMap::new();
    };
    let driver = tokio::spawn(conn);
    let request = Request::get("/closes")
        .header("host", upstream)
        .body(Full::new(Bytes::new()));
    let mut out = HashMap::new();
    if let Ok(request) = request
        && let Ok(response) = sender.send_request(request).await
        && let Ok(body) = response.into_body().collect().await
    {
        out = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    }
    driver.abort();
    out
}

/// docs/src/images/loadgen.svg: added latency per level (ms), TTFT and per chunk, p50 and p99.
fn chart(rows: &[Value]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let series = [
        (
            "sluice: added TTFT p50",
            "sluice",
            "ttft_ms",
            "added_p50",
            BLUE,
        ),
        (
            "sluice: added TTFT p99",
            "sluice",
            "ttft_ms",
            "added_p99",
            CYAN,
        ),
        (
            "sluice: added per chunk p50",
            "sluice",
            "chunk_ms",
            "added_p50",
            RED,
        ),
        (
            "sluice: added per chunk p99",
            "sluice",
            "chunk_ms",
            "added_p99",
            MAGENTA,
        ),
        (
            "sluice: added per chunk p99.9",
            "sluice",
            "chunk_ms",
            "added_p999",
            BLACK,
        ),
        (
            "nginx: added TTFT p99",
            "nginx",
            "ttft_ms",
            "added_p99",
            GREEN,
        ),
        (
            "nginx: added per chunk p99",
            "nginx",
            "chunk_ms",
            "added_p99",
            YELLOW,
        ),
    ];
    let points = |path: &str, group: &str, key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| !r[path].is_null())
            .map(|r| {
                (
                    (r["streams"].as_f64().unwrap_or(1.0)).log10(),
                    r[path][group][key].as_f64().unwrap_or(0.0),
                )
            })
            .collect()
    };
    let top = series
        .iter()
        .flat_map(|(_, p, g, k, _)| points(p, g, k))
        .map(|(_, y)| y)
        .fold(1.0_f64, f64::max)
        * 1.1;
    let bottom = series
        .iter()
        .flat_map(|(_, p, g, k, _)| points(p, g, k))
        .map(|(_, y)| y)
        .fold(0.0_f64, f64::min)
        * 1.1;
    std::fs::create_dir_all("docs")?;
    let root = SVGBackend::new("docs/src/images/loadgen.svg", (760, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "What sluice and nginx add, by concurrent streams (2 cores, loopback)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(-0.2f64..4.2f64, bottom..top)?;
    chart
        .configure_mesh()
        .x_desc("concurrent streams")
        .y_desc("ms added vs direct")
        .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
        .x_labels(5)
        .draw()?;
    for (name, path, group, key, color) in series {
        chart
            .draw_series(LineSeries::new(
                points(path, group, key),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The soak: 1,000 streams at all times for `minutes`, a third of the clients leaving at a
// random moment; sluice's RSS and open descriptors sampled every 10 s.

async fn soak(minutes: f64) -> anyhow::Result<()> {
    raise_fd_limit();
    let upstream = Proc::start(&["upstream"])?;
    let gateway = Proc::start(&["sluice", &upstream.addr])?;
    let gw_pid = gateway.pid().to_string();
    let end = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..1_000u64 {
        let (addr, done, failed) = (gateway.addr.clone(), done.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut seed = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let opened = AtomicUsize::new(0);
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let tokens = 20 + next() % 180;
                let model = format!("load-{tokens}-100");
                let id = format!("soak-{w}-{n}");
                let request = stream(
                    &addr,
                    "/v1/chat/completions",
                    &id,
                    &model,
                    &opened,
                    None,
                    false,
                );
                // A third of the clients leave at a random point of their stream.
                let result = if next() % 3 == 0 {
                    let leave = Duration::from_millis(next() % (tokens * 100));
                    tokio::time::timeout(leave, request).await.ok()
                } else {
                    Some(request.await)
                };
                match result {
                    Some((seen, _)) if !seen.ok => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        if w % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut samples = Vec::new();
    println!("| minute | sluice RSS (MiB) | open fds | streams ended | failed |");
    println!("|---|---|---|---|---|");
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Not once the clients have begun to stop.
        if Instant::now() >= end {
            break;
        }
        let minute = started.elapsed().as_secs_f64() / 60.0;
        let (rss, fds) = (rss_kib(&gw_pid), open_fds(&gw_pid));
        println!(
            "| {minute:.2} | {:.1} | {fds} | {} | {} |",
            rss as f64 / 1024.0,
            done.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
        samples.push(json!({"minute": minute, "rss_kib": rss, "fds": fds,
            "ended": done.load(Ordering::Relaxed), "failed": failed.load(Ordering::Relaxed)}));
    }
    for worker in workers {
        let _ = worker.await;
    }
    let after_two: Vec<&Value> = samples
        .iter()
        .filter(|s| s["minute"].as_f64().unwrap_or(0.0) >= 2.0)
        .collect();
    let range = |key: &str| {
        let values: Vec<u64> = after_two.iter().filter_map(|s| s[key].as_u64()).collect();
        (
            values.iter().copied().min().unwrap_or(0),
            values.iter().copied().max().unwrap_or(0),
        )
    };
    let (rss_min, rss_max) = range("rss_kib");
    let (fd_min, fd_max) = range("fds");
    println!(
        "\nfrom minute 2 to the end: RSS {:.1}-{:.1} MiB, open fds {fd_min}-{fd_max}; {} streams ended, {} failed",
        rss_min as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    std::fs::create_dir_all("target/loadgen")?;
    std::fs::write(
        "target/loadgen/soak.json",
        serde_json::to_string_pretty(
            &json!({"minutes": minutes, "streams": 1000, "samples": samples}),
        )?,
    )?;
    Ok(())
}
