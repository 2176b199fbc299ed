//! Admission as clients see it: keys, request and token limits with OpenAI's headers and
//! statuses, stream permits that end with their stream, and bounded memory.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use sluice::admission::{Admission, Limits};

use crate::support::{TestApp, all_events, events};

fn chat(model: &str, max_tokens: u32) -> Value {
    json!({"model": model, "stream": true, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Hi"}]})
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_owned()
}

async fn post_as(app: &TestApp, key: Option<&str>, path: &str, body: &Value) -> reqwest::Response {
    let mut request = app.http.post(app.url(path)).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("answers")
}

#[tokio::test]
async fn with_keys_every_api_route_needs_one() {
    let app = TestApp::spawn_with(|c| c.api_keys = vec!["sk-alpha".into(), "sk-beta".into()]).await;
    for key in [None, Some("sk-wrong"), Some("sk-alph")] {
        let response = post_as(&app, key, "/v1/chat/completions", &chat("mock", 3)).await;
        assert_eq!(response.status(), 401, "{key:?}");
        let body = response.text().await.expect("body");
        assert!(body.contains("invalid_api_key"), "{body}");
        assert!(!body.contains("sk-wrong"), "the key is echoed: {body}");
        let response = post_as(&app, key, "/api/chat", &json!({"prompt": "Hi"})).await;
        assert_eq!(response.status(), 401);
        for path in ["/v1/models", "/api/prompts"] {
            let mut request = app.http.get(app.url(path));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            assert_eq!(
                request.send().await.expect("answers").status(),
                401,
                "{path}"
            );
        }
    }
    for key in ["sk-alpha", "sk-beta"] {
        let response = post_as(&app, Some(key), "/v1/chat/completions", &chat("mock", 3)).await;
        assert_eq!(response.status(), 200);
        all_events(response).await;
        let models = app
            .http
            .get(app.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .expect("answers");
        assert_eq!(models.status(), 200);
    }
    // The page and health stay open.
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        let response = app.http.get(app.url(path)).send().await.expect("answers");
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn over_the_request_rate_is_a_429_that_a_patient_client_gets_past() {
    let app = TestApp::spawn_with(|c| {
        c.rpm = 600; // one request every 100 ms...
        c.rpm_burst = Some(2); // ...after a burst of two
    })
    .await;
    let first = app.post("/v1/chat/completions", &chat("mock", 2)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-requests"), "600");
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), "1");
    assert!(header(&first, "x-ratelimit-reset-requests").ends_with("ms"));
    all_events(first).await;
    let second = app.post("/v1/chat/completions", &chat("mock", 2)).await;
    assert_eq!(header(&second, "x-ratelimit-remaining-requests"), "0");
    all_events(second).await;

    let refused = app.post("/v1/chat/completions", &chat("mock", 2)).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after"), "1", "seconds, rounded up");
    let wait_ms: u64 = header(&refused, "retry-after-ms")
        .parse()
        .expect("a number");
    assert!((1..=100).contains(&wait_ms), "{wait_ms}");
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    // A client that waits as long as it was told gets in.
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let retried = app.post("/v1/chat/completions", &chat("mock", 2)).await;
    assert_eq!(retried.status(), 200);
}

#[tokio::test]
async fn token_reservations_are_settled_to_what_was_used() {
    let app = TestApp::spawn_with(|c| c.tpm = Some(1000)).await;
    // A request that can never fit is told so.
    let never = app.post("/v1/chat/completions", &chat("mock", 2000)).await;
    assert_eq!(never.status(), 400);
    let body: Value = never.json().await.expect("JSON");
    assert_eq!(body["error"]["param"], "max_tokens");

    // Reserving 600 leaves 400; the reply uses about 50 and the rest comes back, so a
    // second reservation of 600 fits.
    for _ in 0..3 {
        let response = app.post("/v1/chat/completions", &chat("mock", 600)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit-tokens"), "1000");
        let remaining: u32 = header(&response, "x-ratelimit-remaining-tokens")
            .parse()
            .expect("n");
        assert!(remaining < 400, "{remaining}");
        all_events(response).await;
    }
    let body = json!({"model": "mock", "max_tokens": 600, "messages": [{"role": "user", "content": "Hi"}]});
    let reply = app.post("/v1/chat/completions", &body).await;
    assert_eq!(reply.status(), 200);
}

#[tokio::test]
async fn a_cancelled_stream_is_charged_what_it_delivered() {
    let app = TestApp::spawn_with(|c| {
        c.tpm = Some(1000);
        c.mock_tokens_per_s = 50.0;
    })
    .await;
    let mut stream = events(app.post("/v1/chat/completions", &chat("mock", 900)).await);
    for _ in 0..3 {
        stream.next().await.expect("a chunk");
    }
    drop(stream);
    app.wait_metric("sluice_chat_requests_total{outcome=\"cancelled\"}", 1.0)
        .await;
    // Had the reservation of ~910 been kept, this would not fit.
    let response = app.post("/v1/chat/completions", &chat("mock", 900)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn stream_permits_live_as_long_as_their_streams() {
    let app = TestApp::spawn_with(|c| {
        c.max_streams = 2;
        c.mock_tokens_per_s = 1.0;
    })
    .await;
    let long = chat("mock", 100);
    let mut open = vec![
        events(app.post("/v1/chat/completions", &long).await),
        events(app.post("/v1/chat/completions", &long).await),
    ];
    let refused = app.post("/v1/chat/completions", &long).await;
    assert_eq!(refused.status(), 429);
    assert!(header(&refused, "retry-after").parse::<u64>().is_ok());

    // The client disconnects: its permit is free again.
    open.pop();
    app.wait_metric("sluice_active_streams", 1.0).await;
    let admitted = app.post("/v1/chat/completions", &long).await;
    assert_eq!(admitted.status(), 200);
}

#[tokio::test]
async fn the_global_stream_cap_is_a_503() {
    let app = TestApp::spawn_with(|c| {
        c.global_max_streams = 1;
        c.mock_tokens_per_s = 1.0;
    })
    .await;
    let _open = events(app.post("/v1/chat/completions", &chat("mock", 100)).await);
    let refused = app.post("/api/chat", &json!({"prompt": "Hi"})).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(header(&refused, "retry-after"), "1");
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    for (trusted, second) in [(false, 429), (true, 200)] {
        let app = TestApp::spawn_with(|c| {
            c.rpm_burst = Some(1);
            if trusted {
                c.trusted_proxies = vec!["127.0.0.0/8".parse().expect("CIDR")];
            }
        })
        .await;
        for (client, status) in [("203.0.113.7", 200), ("203.0.113.8", second)] {
            let response = app
                .http
                .post(app.url("/v1/chat/completions"))
                .header("x-forwarded-for", client)
                .json(&chat("mock", 2))
                .send()
                .await
                .expect("answers");
            assert_eq!(response.status(), status, "trusted: {trusted}, {client}");
        }
    }
}

#[tokio::test]
async fn keys_in_the_config_have_their_own_limits_and_models() {
    let path = std::env::temp_dir().join(format!("sluice-keys-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[keys.alice]\nkey = \"sk-alice\"\nburst = 1\nmodels = [\"mock\"]\n\n[keys.bob]\nkey = \"sk-bob\"\n",
    )
    .expect("write");
    let app = TestApp::spawn_with(|c| c.config = Some(path.clone())).await;
    let stall = post_as(
        &app,
        Some("sk-alice"),
        "/v1/chat/completions",
        &chat("mock-stall", 2),
    )
    .await;
    assert_eq!(stall.status(), 404, "not on alice's list");
    let ok = post_as(
        &app,
        Some("sk-alice"),
        "/v1/chat/completions",
        &chat("mock", 2),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let refused = post_as(
        &app,
        Some("sk-alice"),
        "/v1/chat/completions",
        &chat("mock", 2),
    )
    .await;
    assert_eq!(refused.status(), 429, "alice's burst is 1");
    // Bob has the defaults, and his own budget.
    for _ in 0..3 {
        let response = post_as(
            &app,
            Some("sk-bob"),
            "/v1/chat/completions",
            &chat("mock", 2),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn memory_stays_bounded_with_100_000_clients() {
    let limits = Limits {
        rpm: 60_000, // a bucket refills in 1 ms
        burst: 1,
        tpm: Some(100_000),
        max_streams: 4,
        models: None,
        budget: None,
    };
    let admission: Arc<Admission> =
        Admission::new(Vec::new(), limits, Vec::new(), 1_000_000, None).expect("admission");
    for i in 0..100_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let who = admission
            .identify(None, std::iter::empty(), Some(ip))
            .expect("open");
        let mut permit = admission.admit(&who, "mock").await.expect("admitted");
        permit.reserve(50).await.expect("reserved");
        drop(permit);
    }
    assert_eq!(admission.tracked(), (100_000, 100_000, 100_000));
    assert_eq!(admission.open_streams(), 0);
    // Once their limits have recovered, idle clients are forgotten.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        admission.purge();
        if admission.tracked() == (0, 0, 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still tracked: {:?}",
            admission.tracked()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
