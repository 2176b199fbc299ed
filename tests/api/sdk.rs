//! The official Python openai SDK streams through sluice unchanged.

use crate::support::{FakeUpstream, TestApp, skip_without};

fn python_has_openai() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn the_python_openai_sdk_streams_through_sluice() {
    if !python_has_openai() && skip_without("python3 with the openai package") {
        return;
    }
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/stream.py");
    let output = tokio::process::Command::new("python3")
        .args([script, &app.url("/v1"), "gpt-4o-mini"])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "Hello from the fake upstream",
            "11 5 16",
            "Hello from the fake upstream"
        ]
    );
}
