//! What a request costs: the price table (`[prices]`, USD per million tokens, by name or
//! pattern) times the usage sluice settles, as the client reads it: `usage.cost` in a chat
//! completion's usage, `x-sluice-cost-usd` on a reply answered whole, `cost` in
//! `/api/chat`'s `done`. A model with no price has no cost field: unpriced is not free.

use serde_json::{Value, json};

use crate::support::{FakeUpstream, TestApp, all_events, config_file};

const PRICES: &str = r#"
[prices."gpt-4.1"]
input = 2.00
output = 8.00

[prices."rich"]
input = 2
output = 8
cache_read = 0.5
reasoning = 10

[prices."mock"]
input = 1.0
output = 1000.0
"#;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

async fn priced_app(upstream: &FakeUpstream) -> TestApp {
    let prices = config_file(PRICES);
    TestApp::in_front_of_with(upstream, |c| c.config = Some(prices)).await
}

/// The usage chunk of a streamed chat completion that asked for it.
async fn streamed_usage(app: &TestApp, model: &str) -> Value {
    let response = app
        .post(
            "/v1/chat/completions",
            &json!({"model": model, "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let events = all_events(response).await;
    let usage = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .find(|chunk| chunk["usage"].is_object())
        .expect("a usage chunk");
    usage["usage"].clone()
}

#[tokio::test]
async fn a_chat_completion_costs_its_reported_usage_streamed_or_not() {
    let upstream = FakeUpstream::spawn().await;
    let app = priced_app(&upstream).await;
    // The fake upstream reports 11 prompt and 5 completion tokens.
    let expected = (11.0 * 2.0 + 5.0 * 8.0) / 1e6;
    let usage = streamed_usage(&app, "gpt-4.1").await;
    assert_eq!(usage["prompt_tokens"], 11);
    assert!(
        usage["cost"].as_f64().is_some_and(|c| close(c, expected)),
        "{usage}"
    );

    let whole = app
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    let header = whole
        .headers()
        .get("x-sluice-cost-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(header.as_deref(), Some("0.000062"));
    let reply: Value = whole.json().await.expect("JSON");
    assert!(
        reply["usage"]["cost"]
            .as_f64()
            .is_some_and(|c| close(c, expected)),
        "{reply}"
    );
}

#[tokio::test]
async fn cached_and_reasoning_tokens_have_their_own_prices() {
    let upstream = FakeUpstream::spawn().await;
    let app = priced_app(&upstream).await;
    // "rich": 9 prompt tokens, 8 of them cached; 1 completion token, reported as reasoning.
    let usage = streamed_usage(&app, "rich").await;
    let expected = (1.0 * 2.0 + 8.0 * 0.5 + 1.0 * 10.0) / 1e6;
    assert!(
        usage["cost"].as_f64().is_some_and(|c| close(c, expected)),
        "{usage}"
    );
}

#[tokio::test]
async fn an_unpriced_model_has_no_cost_and_a_priced_mock_has_one() {
    let upstream = FakeUpstream::spawn().await;
    let app = priced_app(&upstream).await;
    let usage = streamed_usage(&app, "unpriced-model").await;
    assert!(usage.get("cost").is_none(), "{usage}");

    let done = |events: Vec<eventsource_stream::Event>| {
        events
            .into_iter()
            .find(|e| e.event == "done")
            .and_then(|e| serde_json::from_str::<Value>(&e.data).ok())
            .expect("a done event")
    };
    let priced = done(
        all_events(
            app.post(
                "/api/chat",
                &json!({"model": "mock", "prompt": "Tell me about rivers"}),
            )
            .await,
        )
        .await,
    );
    let (prompt, completion) = (
        priced["usage"]["prompt_tokens"].as_f64().unwrap_or(-1.0),
        priced["usage"]["completion_tokens"]
            .as_f64()
            .unwrap_or(-1.0),
    );
    assert!(completion > 0.0, "{priced}");
    assert!(
        priced["cost"]
            .as_f64()
            .is_some_and(|c| close(c, (prompt + completion * 1000.0) / 1e6)),
        "{priced}"
    );
    let free = done(
        all_events(
            app.post(
                "/api/chat",
                &json!({"model": "unpriced-model", "prompt": "Hi"}),
            )
            .await,
        )
        .await,
    );
    assert!(free.get("cost").is_none(), "{free}");
}

#[test]
fn a_bad_price_table_stops_start_up_naming_its_entry() {
    for (toml, named) in [
        ("[prices.cheap]\ninput = -1\noutput = 2\n", "cheap"),
        ("[prices.typo]\ninput = 1\noutput = 2\ninptu = 3\n", "inptu"),
        ("[prices.words]\ninput = \"free\"\noutput = 2\n", "words"),
    ] {
        let mut config = sluice::Config::defaults();
        config.local_model = Some("off".into());
        config.config = Some(config_file(toml));
        let error = match sluice::AppState::build(&config) {
            Ok(_) => panic!("{toml} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(error.contains(named), "{toml}: {error}");
    }
}

/// The chat page shows a reply's cost beside its speed when its model has a price.
#[tokio::test]
async fn the_page_shows_what_a_priced_reply_cost() {
    use crate::browser::{js, open_page, start_driver, type_and_send, wait_for};
    let Some(driver) = start_driver() else { return };
    let prices = config_file(PRICES);
    let app = TestApp::spawn_with(|c| c.config = Some(prices)).await;
    let client = open_page(&driver, &app.url("/")).await;
    type_and_send(&client, "Tell me about rivers").await;
    wait_for(
        &client,
        "return (document.querySelector('.turn.assistant .meta')?.textContent || '').includes('tokens/s')",
        crate::support::REPLY_DEADLINE,
    )
    .await;
    let meta = js(
        &client,
        "return document.querySelector('.turn.assistant .meta').textContent",
    )
    .await;
    let meta = meta.as_str().unwrap_or_default();
    // The mock at $1 / $1,000 a million: some hundredths of a dollar.
    assert!(meta.contains(" · $0.0"), "{meta}");
    client.close().await.expect("closes");
}

/// SIGHUP reads the price table again; a bad entry is refused, naming it, and the running
/// table is kept.
#[tokio::test]
async fn a_reload_replaces_the_price_table_and_refuses_a_bad_one() {
    use crate::startup::Running;
    let path = config_file("[prices.mock]\ninput = 1\noutput = 1000\n");
    let sluice = Running::start(&[("SLUICE_CONFIG", path.to_str().expect("a path"))]);
    let cost = || async {
        let events = all_events(
            reqwest::Client::new()
                .post(sluice.url("/api/chat"))
                .json(&json!({"model": "mock", "prompt": "Hi"}))
                .send()
                .await
                .expect("sluice answers"),
        )
        .await;
        let done: Value = events
            .iter()
            .find(|e| e.event == "done")
            .and_then(|e| serde_json::from_str(&e.data).ok())
            .expect("a done event");
        let tokens = |field: &str| done["usage"][field].as_f64().unwrap_or(-1.0);
        (
            done["cost"].as_f64(),
            tokens("prompt_tokens"),
            tokens("completion_tokens"),
        )
    };
    let (before, prompt, completion) = cost().await;
    assert!(before.is_some_and(|c| close(c, (prompt + completion * 1000.0) / 1e6)));

    std::fs::write(&path, "[prices.mock]\ninput = 1\noutput = 2000\n").expect("rewrite");
    sluice.hangup();
    assert!(
        sluice
            .line(|l| l.contains("configuration reloaded"))
            .is_some()
    );
    let (after, prompt, completion) = cost().await;
    assert!(after.is_some_and(|c| close(c, (prompt + completion * 2000.0) / 1e6)));

    std::fs::write(&path, "[prices.mock]\ninput = -1\noutput = 2000\n").expect("rewrite");
    sluice.hangup();
    let refused = sluice
        .line(|l| l.contains("not reloaded"))
        .expect("a line saying why");
    assert!(refused.contains("mock"), "{refused}");
    let (kept, prompt, completion) = cost().await;
    assert!(kept.is_some_and(|c| close(c, (prompt + completion * 2000.0) / 1e6)));
}
