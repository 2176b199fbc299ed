//! The JavaScript clients people use, unchanged, through sluice: the `openai` npm package
//! (Responses and chat completions streams), the Vercel AI SDK's default OpenAI provider,
//! which speaks the Responses API, and `@anthropic-ai/sdk` (Messages). The packages are installed, pinned
//! (`tests/js/package.json`), into a folder of the tests' own under `target/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::{TestApp, skip_without};

/// `tests/js` copied under `target/` with its packages installed; `None` (after saying
/// why) when Node or the npm registry is not there.
fn installed() -> Option<PathBuf> {
    npm_installed("js", &["package.json", "responses.mjs", "messages.mjs"])
}

/// `tests/<folder>` (its `files`, `package.json` first) copied under `target/`, with the
/// packages its `package.json` pins installed there once (again only when it changes);
/// `None` (after saying why) when Node or the npm registry is not there. One install at a
/// time: tests that share a folder wait for the first.
pub fn npm_installed(folder: &str, files: &[&str]) -> Option<PathBuf> {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !(found("node") && found("npm")) && skip_without("node and npm") {
        return None;
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(folder);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("npm-{folder}"));
    std::fs::create_dir_all(&dir).expect("a folder for the packages");
    let manifest = std::fs::read(source.join("package.json")).expect("package.json");
    let fresh = std::fs::read(dir.join("package.json")).ok().as_ref() != Some(&manifest)
        || !dir.join("node_modules").is_dir();
    for file in files {
        std::fs::copy(source.join(file), dir.join(file)).expect("copy");
    }
    if fresh {
        let install = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .expect("npm runs");
        if !install.status.success() {
            // Not marked installed: the next run tries again.
            let _ = std::fs::remove_file(dir.join("package.json"));
            let why = String::from_utf8_lossy(&install.stderr).into_owned();
            if skip_without(&format!(
                "the pinned npm packages of tests/{folder} (npm install failed: {why})"
            )) {
                return None;
            }
        }
    }
    Some(dir)
}

#[tokio::test]
async fn the_javascript_sdks_stream_through_sluice() {
    let Some(dir) = tokio::task::spawn_blocking(installed)
        .await
        .expect("install")
    else {
        return;
    };
    let app = TestApp::spawn_with(|c| c.mock_tokens_per_s = 200.0).await;
    let output = tokio::process::Command::new("node")
        .arg("responses.mjs")
        .arg(app.url("/v1"))
        .current_dir(&dir)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let found: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let reply = found["chat"].as_str().expect("the chat stream's text");
    assert!(
        reply.starts_with("You said: Tell me about rivers."),
        "{reply}"
    );
    assert_eq!(found["openai"]["first"], "response.created");
    assert_eq!(found["openai"]["last"], "response.completed");
    assert_eq!(found["openai"]["text"], reply);
    assert_eq!(found["openai"]["final"], reply);
    assert_eq!(found["ai"]["text"], reply);
    assert_eq!(found["ai"]["finishReason"], "stop");
    assert_eq!(found["ai"]["usage"], 40);
    // Anthropic's SDK: the stream helper to its final message.
    let output = tokio::process::Command::new("node")
        .arg("messages.mjs")
        .arg(app.url(""))
        .current_dir(&dir)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let messages: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(messages["text"], reply);
    assert_eq!(messages["final"], reply);
    assert_eq!(messages["stop_reason"], "end_turn");
    assert_eq!(messages["output_tokens"], 40);
    // The AI SDK's provider went through /v1/responses.
    assert!(app.metrics().await.contains(
        "sluice_requests_total{route=\"/v1/responses\",model=\"mock\",status=\"200\"} 2"
    ));
}
