//! The binary: a bad setting stops start-up with a message naming it; with nothing
//! configured it serves the mock model and says so.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sluice(vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.env_clear().current_dir(env!("CARGO_MANIFEST_DIR"));
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
    let mut child = sluice(&[("SLUICE_ADDR", "127.0.0.1:0")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut said = false;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("serving the built-in mock model") {
            said = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(said, "no start-up line about the mock model");
}
