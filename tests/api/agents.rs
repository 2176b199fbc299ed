//! Coding agents, unchanged, through sluice: Codex CLI (`@openai/codex`, the Responses API
//! with its namespace and built-in tools) and two releases of Claude Code
//! (`@anthropic-ai/claude-code`, the Messages API with its betas, thinking and
//! mid-conversation system messages), each configured only as its documentation says for
//! a gateway. Each one answers a prompt, and runs a shell command through its own tool and
//! reads the output back: the whole loop an agent makes. The packages are pinned
//! (`tests/agents/package.json`) and installed once under `target/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::js::npm_installed;
use crate::support::TestApp;

/// The most one agent run may take: a hung agent fails the test, never the CI.
const AGENT_RUN: Duration = Duration::from_secs(90);

fn installed() -> Option<PathBuf> {
    npm_installed("agents", &["package.json"])
}

async fn app() -> TestApp {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agents/fixtures.toml");
    TestApp::spawn_with(|c| c.mock_fixtures = Some(fixtures)).await
}

/// Runs `command` to its end (within [`AGENT_RUN`]) and returns what it printed; fails
/// the test with its output when it fails.
async fn run(mut command: tokio::process::Command, what: &str) -> String {
    command
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(AGENT_RUN, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {AGENT_RUN:?}"))
        .expect("the agent runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{what} failed: {printed}");
    printed
}

/// A home of its own for one agent run: its configuration, sessions and logs.
fn home(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("agent-homes")
        .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("a home");
    dir
}

#[tokio::test]
async fn codex_exec_answers_and_runs_a_tool_through_the_responses_api() {
    let Some(dir) = tokio::task::spawn_blocking(installed)
        .await
        .expect("install")
    else {
        return;
    };
    let app = app().await;
    let home = home("codex");
    // Only what Codex's documentation asks for a custom provider.
    let config = format!(
        "model = \"mock\"\nmodel_provider = \"sluice\"\n\n[model_providers.sluice]\nname = \"sluice\"\nbase_url = \"{}\"\nenv_key = \"SLUICE_CLIENT_KEY\"\nwire_api = \"responses\"\n",
        app.url("/v1")
    );
    std::fs::write(home.join("config.toml"), config).expect("config");
    let codex = |prompt: &str| {
        let mut command = tokio::process::Command::new("node");
        command
            .arg(dir.join("node_modules/@openai/codex/bin/codex.js"))
            .args(["exec", "--skip-git-repo-check"])
            .arg("--dangerously-bypass-approvals-and-sandbox")
            .arg(prompt)
            .env("CODEX_HOME", &home)
            .env("HOME", &home)
            .env("SLUICE_CLIENT_KEY", "sk-any")
            .current_dir(&home);
        command
    };
    let said = run(codex("say hello"), "codex exec").await;
    assert!(said.contains("You said: say hello."), "{said}");
    // exec_command → function_call_output → text.
    let said = run(codex("Run the shell check"), "codex exec with a tool").await;
    assert!(
        said.contains("The tool returned:") && said.contains("sluice-tool-ok"),
        "{said}"
    );
}

/// Claude Code `release` (`claude -p`) against sluice with `ANTHROPIC_BASE_URL`: a reply,
/// then a Bash tool round trip. A model name it does not know (`mock`) makes it send
/// mid-conversation system messages and assume a context window; both work.
async fn claude_code(release: &str) {
    let Some(dir) = tokio::task::spawn_blocking(installed)
        .await
        .expect("install")
    else {
        return;
    };
    let app = app().await;
    let home = home(&format!("claude-{release}"));
    let claude = |prompt: &str| {
        let mut command = tokio::process::Command::new(
            dir.join(format!("node_modules/claude-code-{release}/bin/claude.exe")),
        );
        command
            .args(["-p", prompt, "--model", "mock", "--allowedTools", "Bash"])
            .env("ANTHROPIC_BASE_URL", app.url(""))
            .env("ANTHROPIC_API_KEY", "sk-any")
            .env("HOME", &home)
            .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
            .env("DISABLE_AUTOUPDATER", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .current_dir(&home);
        command
    };
    let said = run(claude("say hello"), &format!("claude {release}")).await;
    assert!(said.contains("You said: say hello."), "{said}");
    let said = run(
        claude("Run the bash check"),
        &format!("claude {release} with Bash"),
    )
    .await;
    assert!(said.contains("The tool returned: sluice-tool-ok"), "{said}");
}

#[tokio::test]
async fn claude_code_2_1_197_answers_and_runs_a_tool_through_the_messages_api() {
    claude_code("2.1.197").await;
}

#[tokio::test]
async fn claude_code_2_1_332_answers_and_runs_a_tool_through_the_messages_api() {
    claude_code("2.1.332").await;
}

#[tokio::test]
async fn pattern_routes_take_every_claude_and_gpt_name_an_agent_asks_for() {
    // Agents ask for dated names and switch models mid-session (a small one for titles):
    // `claude-*` and `gpt-*` routes take them all, as the client named them.
    let upstream = crate::support::FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("patterns-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[models.\"claude-*\"]\nbase_url = \"{base}\"\n\n[models.\"gpt-*\"]\nbase_url = \"{base}\"\n\n[models.\"gpt-5-mini*\"]\nbackend = \"mock\"\n"
        ),
    )
    .expect("config");
    let app = TestApp::spawn_with(|c| c.config = Some(path)).await;
    let ask = |model: &str| serde_json::json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]});
    let answer = app
        .post("/v1/messages", &ask("claude-haiku-4-5-20251001"))
        .await;
    assert_eq!(answer.status(), 200);
    answer.bytes().await.expect("a reply");
    assert_eq!(
        upstream.request(1).await.body["model"],
        "claude-haiku-4-5-20251001"
    );
    let answer = app
        .post("/v1/chat/completions", &ask("gpt-5.1-codex"))
        .await;
    assert_eq!(answer.status(), 200);
    answer.bytes().await.expect("a reply");
    assert_eq!(upstream.request(2).await.body["model"], "gpt-5.1-codex");
    // The longest pattern wins; a name no pattern takes is still unknown.
    let reply = app
        .post_json("/v1/chat/completions", &ask("gpt-5-mini-2025"))
        .await;
    assert!(
        reply["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|t| t.starts_with("You said"))
    );
    assert_eq!(
        app.post("/v1/chat/completions", &ask("llama"))
            .await
            .status(),
        404
    );
    // Metrics name the pattern, never each name asked for.
    let metrics = app.metrics().await;
    assert!(metrics.contains("model=\"claude-*\""), "{metrics}");
    assert!(
        !metrics.contains("claude-haiku-4-5-20251001"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("haiku"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn pattern_routes_are_listed_as_the_names_they_serve() {
    let upstream = crate::support::FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let path = crate::support::config_file(&format!(
        "[models.\"claude-*\"]\nbase_url = \"{base}\"\n\n[models.\"gpt-*\"]\nbase_url = \"{base}\"\n"
    ));
    let app = TestApp::spawn_with(|c| {
        c.config = Some(path);
        c.openai_api_key = Some("sk-test".into());
    })
    .await;
    let ids = |list: &serde_json::Value| -> Vec<String> {
        list["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect()
    };
    // From the upstream's own list: `gpt-test` is a name `gpt-*` serves.
    let started = std::time::Instant::now();
    let list = loop {
        let list = app.get_json("/v1/models").await;
        if ids(&list).contains(&"gpt-test".to_owned()) {
            break list;
        }
        assert!(started.elapsed() < crate::support::DEADLINE, "{list}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(ids(&list).iter().all(|id| !id.ends_with('*')), "{list}");
    assert_eq!(list["sluice_patterns"][0]["pattern"], "claude-*", "{list}");
    // Any name a pattern serves is a model; the pattern itself is not.
    let one = app.get_json("/v1/models/claude-sonnet-4-5").await;
    assert_eq!(one["id"], "claude-sonnet-4-5", "{one}");
    let literal = app
        .http
        .get(app.url("/v1/models/claude-*"))
        .send()
        .await
        .expect("answers");
    assert_eq!(literal.status(), 404);
    let ask = serde_json::json!({"model": "claude-*", "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]});
    assert_eq!(app.post("/v1/messages", &ask).await.status(), 404);
    // A name served is listed from then on.
    let ask = serde_json::json!({"model": "claude-haiku-4-5", "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]});
    let answer = app.post("/v1/messages", &ask).await;
    assert_eq!(answer.status(), 200);
    answer.bytes().await.expect("a reply");
    let list = app.get_json("/v1/models").await;
    assert!(
        ids(&list).contains(&"claude-haiku-4-5".to_owned()),
        "{list}"
    );
    assert_eq!(
        list["sluice_patterns"][0]["serves"][0], "claude-haiku-4-5",
        "{list}"
    );
}
