//! The official Python openai SDK streams through sluice unchanged.

use crate::support::{FakeUpstream, TestApp, skip_without};

#[tokio::test]
async fn the_python_openai_sdk_streams_through_sluice() {
    if !crate::support::python_has("openai") && skip_without("python3 with the openai package") {
        return;
    }
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let stdout = crate::support::python("stream.py", &[&app.url("/v1"), "gpt-4o-mini"]).await;
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
