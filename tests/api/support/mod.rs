//! What every test uses: sluice on port 0, a fake upstream that records what it saw, and
//! an SSE reader that parses the stream the way clients do.

pub mod otlp;
pub mod upstream;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::Value;
use sluice::{AppState, Config};

pub use upstream::{FakeUpstream, paced_reply};

/// How long a test waits for something that should happen at once.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// How long a whole reply may take: a real model on a busy 2-core machine is slow.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(120);

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    /// `SLUICE_METRICS_TOKEN`: sent to `/readyz` and `/metrics`.
    pub operator: Option<String>,
}

impl TestApp {
    /// sluice with the default configuration and a fast mock model.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// sluice with the configuration `adjust` leaves.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        init_logging();
        // Pinned, whatever the developer's environment or checkout holds.
        let mut config = Config::defaults();
        config.openai_api_key = None;
        config.openai_base_url = None;
        config.config = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/empty.toml").into());
        config.prompts = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/prompts").into());
        config.mock_fixtures = None;
        config.local_model = Some("off".into());
        config.api_keys = Vec::new();
        config.rpm = 600;
        config.rpm_burst = None;
        config.tpm = None;
        config.max_streams = 16;
        config.global_max_streams = 10_000;
        config.trusted_proxies = Vec::new();
        config.redis_url = None;
        config.redis_failure = "open".into();
        // No ledger unless a test asks for one (tests/api/ledger.rs).
        config.database_url = "off".into();
        config.admin_key = None;
        config.mock_tokens_per_s = 0.0;
        config.connect_timeout_ms = 10_000;
        config.first_token_timeout_ms = 60_000;
        config.idle_timeout_ms = 30_000;
        config.total_timeout_ms = 600_000;
        config.slow_client_timeout_ms = 30_000;
        config.keepalive_s = 15.0;
        config.shutdown_grace_s = 10;
        config.header_timeout_ms = 10_000;
        config.max_connections = Some(4_000);
        // Every test client comes from 127.0.0.1.
        config.max_connections_per_ip = 4_000;
        config.max_readers = 8;
        config.resume_client_share = 0.25;
        config.tls_cert = None;
        config.tls_key = None;
        config.cors_origins = Vec::new();
        config.metrics_token = None;
        config.max_reply_bytes = 16 * 1024 * 1024;
        config.resume_grace_s = 30.0;
        config.resume_ttl_s = 300.0;
        config.resume_memory_mb = 64.0;
        config.otel_endpoint = None;
        config.otel_sdk_disabled = false;
        config.otel_capture_content = false;
        adjust(&mut config);
        let state = AppState::build(&config).expect("the test configuration is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let grace = Duration::from_secs(config.shutdown_grace_s);
        tokio::spawn(sluice::serve(
            listener,
            state,
            std::future::pending(),
            grace,
        ));
        TestApp {
            addr,
            http: reqwest::Client::new(),
            operator: config.metrics_token.clone(),
        }
    }

    /// sluice in front of `upstream` as its default upstream.
    pub async fn in_front_of(upstream: &FakeUpstream) -> TestApp {
        Self::in_front_of_with(upstream, |_| {}).await
    }

    /// sluice in front of `upstream`, with `adjust` applied to the rest of its settings.
    pub async fn in_front_of_with(
        upstream: &FakeUpstream,
        adjust: impl FnOnce(&mut Config),
    ) -> TestApp {
        let base = upstream.base_url();
        Self::spawn_with(|c| {
            c.openai_base_url = Some(base);
            c.openai_api_key = Some("sk-test-secret-key".into());
            adjust(c);
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("sluice answers")
    }

    /// POSTs `body` and reads the answer as JSON, whatever its status.
    pub async fn post_json(&self, path: &str, body: &Value) -> Value {
        self.post(path, body)
            .await
            .json()
            .await
            .expect("a JSON answer")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.operator(path).send().await.expect("answers");
        response.json().await.expect("JSON")
    }

    /// A GET of `path`, with the metrics token when it is an operator's route.
    fn operator(&self, path: &str) -> reqwest::RequestBuilder {
        let get = self.http.get(self.url(path));
        match &self.operator {
            Some(token) if ["/readyz", "/metrics"].contains(&path) => get.bearer_auth(token),
            _ => get,
        }
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        self.operator("/metrics")
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// The value of one series in `/metrics`, 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `series` reaches at least `value`.
    pub async fn wait_metric_at_least(&self, series: &str, value: f64) {
        let start = Instant::now();
        loop {
            let now = self.metric(series).await;
            if now >= value {
                return;
            }
            assert!(
                start.elapsed() < REPLY_DEADLINE,
                "{series} is {now}, expected at least {value}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `series` reaches `value`; panics with what it was at the deadline.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let start = Instant::now();
        loop {
            let now = self.metric(series).await;
            if now == value {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{series} is {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// SSE events as a client parses them.
pub fn events(response: reqwest::Response) -> impl Stream<Item = Event> + Unpin {
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|e| e.expect("well-formed SSE")),
    )
}

/// Every event until the server ends the stream.
pub async fn all_events(response: reqwest::Response) -> Vec<Event> {
    tokio::time::timeout(REPLY_DEADLINE, events(response).collect())
        .await
        .expect("the stream ends")
}

/// The `data:` payloads of a `/v1/chat/completions` stream, parsed; `[DONE]` as a string.
pub fn payloads(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .map(|e| match e.data.as_str() {
            "[DONE]" => Value::String("[DONE]".into()),
            data => serde_json::from_str(data).expect("each data line is JSON"),
        })
        .collect()
}

/// The text of `/api/chat` `token` events.
pub fn chat_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| {
            let data: Value = serde_json::from_str(&e.data).expect("JSON");
            data["text"].as_str().expect("text").to_owned()
        })
        .collect()
}

/// The text of a streamed reply.
pub fn content(payloads: &[Value]) -> String {
    payloads
        .iter()
        .filter_map(|p| p["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A mock fixtures file with one scripted reply; a fresh path each call.
pub fn fixtures(pattern: &str, reply: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("sluice-fixtures-{}-{n}.toml", std::process::id()));
    let file = serde_json::json!({"reply": [{"pattern": pattern, "reply": reply}]});
    let text = toml::to_string(&file).expect("fixtures as TOML");
    std::fs::write(&path, text).expect("write fixtures");
    path
}

/// Whether `python3` can import `module` (an SDK the tests drive).
pub fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `tests/sdk/<script>` with `args`: what it printed, or a failure showing it all.
pub async fn python(script: &str, args: &[&str]) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let run = tokio::process::Command::new("python3")
        .arg(path)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(REPLY_DEADLINE, run)
        .await
        .expect("the script ends")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `SLUICE_ADMIN_KEY` of the tests that use the admin API.
pub const ADMIN: &str = "sk-admin-test";

/// A SQLite file of the test's own (`what` names its tests in the file's name).
pub fn sqlite_url(what: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("sluice-{what}-{}-{n}.db", std::process::id()));
    for end in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{end}", path.display()));
    }
    format!("sqlite://{}", path.display())
}

/// An admin API call with [`ADMIN`]: its status and its JSON body (`Null` when none).
pub async fn admin(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let mut request = app.http.request(method, app.url(path)).bearer_auth(ADMIN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A TOML config in a file of its own; a fresh path each call.
pub fn config_file(toml: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("sluice-config-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, toml).expect("write the config");
    path
}

/// Whether a test needing `what` may skip here; under `SLUICE_TEST_STRICT=1` (CI) it may not.
pub fn skip_without(what: &str) -> bool {
    assert!(
        std::env::var("SLUICE_TEST_STRICT").as_deref() != Ok("1"),
        "{what} is missing and SLUICE_TEST_STRICT=1"
    );
    eprintln!("skipped: {what} is missing on this machine");
    true
}

/// `TEST_LOG=1` shows sluice's logs.
fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
    }
}

/// Reads one HTTP/1.1 request (its head, and as much body as it says) from a raw upstream's
/// connection: whether it was a POST; `None` when the connection ended first.
pub async fn read_request(tcp: &mut tokio::net::TcpStream) -> Option<bool> {
    use tokio::io::AsyncReadExt;
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&request).to_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return Some(text.starts_with("post "));
            }
        }
    }
}
