//! The binary: a bad setting stops start-up with a message naming it; with nothing
//! configured it serves the mock model and says so.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn sluice(vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.env_clear().current_dir(env!("CARGO_MANIFEST_DIR"));
    // No ledger file in the checkout unless a test names one.
    command.env("SLUICE_DATABASE_URL", "off");
    for (name, value) in vars {
        command.env(name, value);
    }
    command
}

fn fails_naming(vars: &[(&str, &str)], expected: &str) {
    let output = sluice(vars).output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{vars:?} should stop start-up");
    assert!(stderr.contains(expected), "{vars:?}: {stderr}");
}

#[test]
fn a_bad_value_stops_start_up_naming_the_variable() {
    fails_naming(&[("SLUICE_ADDR", "not-an-address")], "SLUICE_ADDR");
    fails_naming(&[("SLUICE_IDLE_TIMEOUT_MS", "0")], "SLUICE_IDLE_TIMEOUT_MS");
    fails_naming(
        &[("SLUICE_FIRST_TOKEN_TIMEOUT_MS", "soon")],
        "SLUICE_FIRST_TOKEN_TIMEOUT_MS",
    );
    fails_naming(&[("OPENAI_BASE_URL", "ftp://example")], "OPENAI_BASE_URL");
    fails_naming(
        &[("SLUICE_CONFIG", "/nonexistent/sluice.toml")],
        "SLUICE_CONFIG",
    );
    fails_naming(&[("SLUICE_LOG", "info,[[[")], "SLUICE_LOG");
    fails_naming(
        &[
            ("SLUICE_API_KEYS", "sk-a,sk-b"),
            ("SLUICE_ADMIN_KEY", "sk-b"),
        ],
        "SLUICE_ADMIN_KEY",
    );
    fails_naming(
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    );
    fails_naming(
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")],
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    );
    fails_naming(
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
        ],
        "OTEL_TRACES_SAMPLER",
    );
    fails_naming(
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ],
        "OTEL_TRACES_SAMPLER_ARG",
    );
}

#[test]
fn a_broken_template_stops_start_up_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("sluice-broken-prompts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("fine.j2"), "{# Fine. #}\nHello {{ name }}").expect("write");
    std::fs::write(dir.join("broken.j2"), "{# Broken. #}\n{% if %}").expect("write");
    fails_naming(
        &[("SLUICE_PROMPTS", dir.to_str().unwrap_or_default())],
        "broken.j2",
    );
}

#[test]
fn with_nothing_configured_it_serves_the_mock_model_and_says_so() {
    let sluice = Running::start(&[]);
    assert!(
        sluice
            .early
            .iter()
            .any(|line| line.contains("serving the built-in mock model")),
        "no start-up line about the mock model: {:?}",
        sluice.early
    );
}

/// A sluice binary running on a free port, and its log lines as they come.
pub(crate) struct Running {
    pub(crate) child: std::process::Child,
    pub(crate) addr: String,
    /// What it logged before saying where it listens.
    pub(crate) early: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    pub(crate) fn start(vars: &[(&str, &str)]) -> Running {
        let mut vars = vars.to_vec();
        vars.extend([
            ("SLUICE_ADDR", "127.0.0.1:0"),
            ("SLUICE_LOCAL_MODEL", "off"),
        ]);
        Self::start_command(sluice(&vars))
    }

    /// Runs `command` (the binary, perhaps behind a wrapper) until it says where it listens.
    pub(crate) fn start_command(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
        // sluice logs to stderr.
        let stdout = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut early = Vec::new();
        while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Some(at) = line.find("listening on http://") {
                let rest = &line[at + "listening on http://".len()..];
                let addr = rest
                    .split(|c: char| c.is_whitespace() || c == '"')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                return Running {
                    child,
                    addr,
                    early,
                    lines,
                };
            }
            early.push(line);
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("sluice did not say where it listens");
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends it SIGHUP: read the TOML config again.
    pub(crate) fn hangup(&self) {
        let sent = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }

    /// Sends it SIGTERM and waits (within a deadline) until it has exited: what it logged
    /// meanwhile is in [`Running::line`].
    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first log line `matches` accepts, within a deadline.
    pub(crate) fn line(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if matches(&line) {
                return Some(line);
            }
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mock_chat(max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model": "mock", "stream": true, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Tell me a story"}]})
}

#[tokio::test]
async fn sigterm_lets_streams_finish_within_the_grace_period_and_ends_the_rest_saying_so() {
    let mut sluice = Running::start(&[
        ("SLUICE_SHUTDOWN_GRACE_S", "1"),
        ("SLUICE_MOCK_TOKENS_PER_S", "10"),
        ("SLUICE_LOCAL_MODEL", "off"),
    ]);
    let http = reqwest::Client::new();
    let url = sluice.url("/v1/chat/completions");
    // 40 tokens at 10 a second outlast the grace period; 4 do not.
    let long = http
        .post(&url)
        .json(&mock_chat(40))
        .send()
        .await
        .expect("answers");
    let short = http
        .post(&url)
        .json(&mock_chat(4))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        (long.status().as_u16(), short.status().as_u16()),
        (200, 200)
    );
    // A request still waiting for its first token when the grace period ends: no answer
    // yet, so it gets a status.
    let mut waiting = serde_json::json!({"model": "mock-hang", "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]});
    waiting["max_tokens"] = 4.into();
    let waiting = tokio::spawn(http.post(&url).json(&waiting).send());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http
            .get(sluice.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if metrics.lines().any(|l| l == "sluice_active_streams 3") {
            break;
        }
        assert!(Instant::now() < deadline, "the third stream never opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &sluice.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());

    let short = crate::support::payloads(&crate::support::all_events(short).await);
    assert_eq!(
        short.last(),
        Some(&serde_json::json!("[DONE]")),
        "{short:?}"
    );
    let long = crate::support::payloads(&crate::support::all_events(long).await);
    let last = long.last().expect("events");
    assert_eq!(last["error"]["code"], "server_restarting", "{last}");
    let waiting = waiting.await.expect("the task ran").expect("an answer");
    assert_eq!(waiting.status(), 503);
    assert_eq!(waiting.headers()["retry-after"], "1");
    let body: serde_json::Value = waiting.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "server_restarting", "{body}");
    let cut = signalled.elapsed();
    assert!(
        cut >= Duration::from_millis(900),
        "ended after {cut:?}, before the grace period"
    );

    // No new connections once shutting down.
    assert!(
        std::net::TcpStream::connect(&sluice.addr).is_err(),
        "still accepting connections"
    );
    // Exit 0, within the grace period and a second (and some slack for a busy machine).
    let deadline = signalled + Duration::from_secs(4);
    let status = loop {
        if let Some(status) = sluice.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running {:?} after SIGTERM",
            signalled.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn with_sluice_log_json_each_request_ends_in_one_json_line() {
    let sluice = Running::start(&[
        ("SLUICE_LOG", "json"),
        ("SLUICE_API_KEYS", "sk-first"),
        ("SLUICE_MOCK_TOKENS_PER_S", "0"),
        ("SLUICE_LOCAL_MODEL", "off"),
    ]);
    let http = reqwest::Client::new();
    let url = sluice.url("/v1/chat/completions");
    let response = http
        .post(&url)
        .bearer_auth("sk-first")
        .header("x-request-id", "log-line-1")
        .json(&mock_chat(3))
        .send()
        .await
        .expect("answers");
    crate::support::all_events(response).await;
    let refused = http
        .post(&url)
        .header("x-request-id", "log-line-2")
        .json(&mock_chat(3))
        .send()
        .await
        .expect("answers");
    assert_eq!(refused.status(), 401);
    let unknown = http
        .post(&url)
        .bearer_auth("sk-first")
        .header("x-request-id", "log-line-3")
        .json(&serde_json::json!({"model": "no-such-model",
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("answers");
    assert_eq!(unknown.status(), 404);

    let request_line = |id: &'static str| {
        move |line: &str| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| {
                v["fields"]["message"] == "request" && v["fields"]["request_id"] == id
            })
        }
    };
    let line = sluice
        .line(request_line("log-line-1"))
        .expect("a line for the request");
    let line: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let fields = &line["fields"];
    assert_eq!(fields["status"], 200, "{line}");
    // A key's name is its digest's first 16 bytes, never its position in the list.
    assert_eq!(
        fields["key"],
        sluice::admission::key_name("sk-first"),
        "{line}"
    );
    assert_eq!(fields["key"].as_str().map(str::len), Some(4 + 32), "{line}");
    assert_eq!(fields["model"], "mock", "{line}");
    assert_eq!(fields["outcome"], "completed", "{line}");
    assert_eq!(fields["completion_tokens"], 3, "{line}");
    assert!(fields["ttft_ms"].is_number(), "{line}");
    let line = sluice
        .line(request_line("log-line-2"))
        .expect("a line for the refusal");
    assert!(line.contains("\"status\":401"), "{line}");
    // A 4xx is logged with its code, its message and the model asked for.
    let line = sluice
        .line(request_line("log-line-3"))
        .expect("a line for the 404");
    let line: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let fields = &line["fields"];
    assert_eq!(fields["status"], 404, "{line}");
    assert_eq!(fields["model"], "no-such-model", "{line}");
    let error = fields["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("model_not_found: "), "{line}");
    // One line each: nothing else about them before the next request's.
    assert!(sluice.line(request_line("log-line-1")).is_none());
}
