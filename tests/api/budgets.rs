//! Budgets that hold: a key's (and its team's) spend limit holds under 50 concurrent
//! streams, in one instance and in two on one Redis; a stream ends at the chunk where the
//! money runs out, with its API's error event; later requests are 429s until the period
//! resets; a key with budget left is never refused for a `max_tokens` it may not use; a
//! flushed Redis rebuilds every balance from the ledger; a key revoked with
//! `?end_streams=true` ends its open streams.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::shared::Redis;
use crate::support::{
    ADMIN, TestApp, admin, all_events, config_file, events, payloads, sqlite_url,
};

/// The mock at $1 a million prompt tokens and $1,000 a million reply tokens: a reply token
/// costs $0.001.
const PRICES: &str = "[prices.mock]\ninput = 1\noutput = 1000\n";
const CHUNK_USD: f64 = 0.001;

async fn instance(database: &str, redis: Option<&str>, tokens_per_s: f64) -> TestApp {
    let (database, redis) = (database.to_owned(), redis.map(str::to_owned));
    let prices = config_file(PRICES);
    TestApp::spawn_with(move |c| {
        c.database_url = database;
        c.admin_key = Some(ADMIN.into());
        c.config = Some(prices);
        c.redis_url = redis;
        c.mock_tokens_per_s = tokens_per_s;
        c.max_streams = 100;
        c.rpm = 10_000;
    })
    .await
}

/// A key made with `terms`: its id and secret.
async fn key(app: &TestApp, terms: Value) -> (String, String) {
    let (status, made) = admin(app, "POST", "/admin/keys", Some(terms)).await;
    assert_eq!(status, 201, "{made}");
    (
        made["id"].as_str().expect("an id").to_owned(),
        made["key"].as_str().expect("a secret").to_owned(),
    )
}

fn stream(max_tokens: u32) -> Value {
    json!({"model": "mock", "stream": true, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Tell me about rivers and the sea"}]})
}

/// How one stream of the 50 went.
#[derive(Debug, PartialEq)]
enum Ended {
    Completed,
    /// Its last event was an error with `insufficient_quota`.
    OutOfBudget,
    /// Refused before it started: a 429 `insufficient_quota` with `Retry-After`.
    Refused,
}

async fn one_stream(app: &TestApp, secret: &str) -> Ended {
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&stream(40))
        .send()
        .await
        .expect("answers");
    if response.status() == 429 {
        assert!(response.headers().contains_key("retry-after"));
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        return Ended::Refused;
    }
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .contains_key("x-ratelimit-remaining-budget-usd")
    );
    let events = payloads(&all_events(response).await);
    match events.last() {
        Some(Value::String(done)) if done == "[DONE]" => Ended::Completed,
        Some(last) => {
            assert_eq!(last["error"]["code"], "insufficient_quota", "{last}");
            assert!(
                !events.iter().any(|e| e == "[DONE]"),
                "no [DONE] after a failure"
            );
            Ended::OutOfBudget
        }
        None => panic!("an empty stream"),
    }
}

/// Spend recorded for `key_name` in the ledger, once `requests` records are there.
async fn spent(app: &TestApp, key_name: &str, requests: usize) -> (f64, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, page) = admin(app, "GET", "/admin/requests?limit=1000", None).await;
        let records: Vec<Value> = page["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["key"] == key_name)
            .collect();
        if records.len() >= requests {
            let usd = records
                .iter()
                .map(|r| r["cost_usd"].as_f64().unwrap_or(0.0))
                .sum();
            return (usd, records);
        }
        assert!(Instant::now() < deadline, "{} records", records.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 50 streams at once on `apps` (in turn) with a key whose budget covers about 20.
async fn fifty_streams_hold_one_budget(apps: &[&TestApp]) {
    let budget = 0.8;
    let (_, secret) = key(
        apps[0],
        json!({"name": "budgeted", "budget_usd": budget, "budget_period": "month"}),
    )
    .await;
    // Every instance has taken the key (it polls the database every second): a request
    // without one is refused there.
    for app in apps {
        let deadline = Instant::now() + Duration::from_secs(10);
        while app
            .http
            .post(app.url("/v1/chat/completions"))
            .json(&json!({"model": "mock", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .expect("answers")
            .status()
            != 401
        {
            assert!(Instant::now() < deadline, "the key never held");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ended: Vec<Ended> =
        futures::future::join_all((0..50).map(|i| one_stream(apps[i % apps.len()], &secret))).await;
    let count = |what: Ended| ended.iter().filter(|e| **e == what).count();
    let (completed, cut, refused) = (
        count(Ended::Completed),
        count(Ended::OutOfBudget),
        count(Ended::Refused),
    );
    println!("{completed} completed, {cut} ended out of budget, {refused} refused");
    // The budget covers about 20 whole replies: the rest are cut or refused.
    assert!(completed <= 21, "{completed} completed");
    assert!(cut + refused >= 29, "{cut} cut, {refused} refused");

    // What the ledger recorded: within the budget but for one chunk per stream.
    let admitted = completed + cut;
    let (usd, records) = spent(apps[0], "budgeted", admitted).await;
    // One chunk per stream, and the prompts' few tokens the upstream counted past
    // sluice's own count.
    let bound = budget + CHUNK_USD * (completed + cut) as f64 + 0.001;
    println!("spent ${usd:.4} of a ${budget} budget (bound ${bound:.4})");
    assert!(usd <= bound + 1e-9, "spent {usd} past {bound}");
    assert!(usd > budget * 0.9, "only {usd} of {budget} was spent");
    if cut > 0 {
        assert!(
            records.iter().any(|r| r["outcome"] == "budget_exceeded"),
            "{records:?}"
        );
    }

    // Later requests: 429 insufficient_quota, until the month resets.
    for app in apps {
        let response = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&stream(40))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 429);
        let retry: u64 = response.headers()["retry-after"]
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("Retry-After in seconds");
        assert!(retry > 0 && retry <= 31 * 86_400);
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "insufficient_quota");
        assert_eq!(body["error"]["type"], "insufficient_quota");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("budgeted") && message.contains("month"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn fifty_streams_on_one_instance_spend_no_more_than_the_budget() {
    let app = instance(&sqlite_url("budgets"), None, 400.0).await;
    fifty_streams_hold_one_budget(&[&app]).await;
}

#[tokio::test]
async fn fifty_streams_on_two_instances_on_one_redis_hold_one_budget() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let url = sqlite_url("budgets");
    let a = instance(&url, Some(&redis.url), 400.0).await;
    let b = instance(&url, Some(&redis.url), 400.0).await;
    fifty_streams_hold_one_budget(&[&a, &b]).await;
}

/// A reply long enough to spend a small tokens budget, on each API: the stream ends with
/// that API's error event.
#[tokio::test]
async fn a_stream_out_of_budget_ends_with_its_apis_error_event() {
    let app = instance(&sqlite_url("budgets"), None, 0.0).await;
    let messages = json!([{"role": "user", "content": "Tell me about rivers and the sea"}]);
    let routes = [
        (
            "/v1/chat/completions",
            json!({"model": "mock", "stream": true, "max_tokens": 200, "messages": messages}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock", "stream": true, "max_tokens": 200, "messages": messages}),
        ),
        (
            "/v1/responses",
            json!({"model": "mock", "stream": true, "max_output_tokens": 200,
                "input": "Tell me about rivers and the sea"}),
        ),
        (
            "/api/chat",
            json!({"model": "mock", "max_tokens": 200, "prompt": "Tell me about rivers and the sea"}),
        ),
    ];
    for (i, (route, body)) in routes.into_iter().enumerate() {
        // Room for the prompt and about 25 tokens of the 40 the mock writes.
        let (_, secret) = key(
            &app,
            json!({"name": format!("small-{i}"), "budget_usd": 0.025, "budget_period": "day"}),
        )
        .await;
        let send = || {
            app.http
                .post(app.url(route))
                .bearer_auth(&secret)
                .header("x-api-key", &secret)
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
        };
        let response = send().await.expect("answers");
        assert_eq!(response.status(), 200, "{route}");
        assert!(
            response
                .headers()
                .contains_key("x-ratelimit-remaining-budget-usd"),
            "{route}"
        );
        let events = all_events(response).await;
        let last = events.last().expect("events");
        let data: Value = serde_json::from_str(&last.data).unwrap_or(Value::Null);
        match route {
            "/v1/chat/completions" => {
                assert_eq!(data["error"]["code"], "insufficient_quota", "{data}");
            }
            "/v1/messages" => {
                assert_eq!(last.event, "error");
                assert_eq!(data["type"], "error");
                assert!(
                    data["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("budget")),
                    "{data}"
                );
            }
            "/v1/responses" => {
                assert_eq!(last.event, "response.failed");
                assert_eq!(
                    data["response"]["error"]["code"], "insufficient_quota",
                    "{data}"
                );
            }
            _ => {
                assert_eq!(last.event, "error");
                assert!(data.to_string().contains("insufficient_quota"), "{data}");
            }
        }
        // The next request is refused, in the route's own error shape.
        let refused = send().await.expect("answers");
        assert_eq!(refused.status(), 429, "{route}");
        assert!(refused.headers().contains_key("retry-after"));
    }
}

#[tokio::test]
async fn a_team_budget_holds_over_two_of_its_keys_and_a_rich_key_is_never_refused() {
    let app = instance(&sqlite_url("budgets"), None, 0.0).await;
    let (status, team) = admin(
        &app,
        "POST",
        "/admin/teams",
        Some(json!({"name": "research", "budget_tokens": 400, "budget_period": "week"})),
    )
    .await;
    assert_eq!(status, 201, "{team}");
    let team_id = team["id"].as_str().expect("an id");
    let (_, first) = key(&app, json!({"name": "r1", "team_id": team_id})).await;
    let (_, second) = key(&app, json!({"name": "r2", "team_id": team_id})).await;
    let ask = |secret: String| {
        let app = &app;
        async move {
            app.http
                .post(app.url("/v1/chat/completions"))
                .bearer_auth(secret)
                .json(&json!({"model": "mock", "max_tokens": 20,
                    "messages": [{"role": "user", "content": "Hi"}]}))
                .send()
                .await
                .expect("answers")
        }
    };
    let mut served = 0;
    let refusal = loop {
        let secret = if served % 2 == 0 { &first } else { &second };
        let response = ask(secret.clone()).await;
        if response.status() == 429 {
            break response.json::<Value>().await.expect("JSON");
        }
        assert_eq!(response.status(), 200);
        served += 1;
        assert!(served < 100, "the team's budget never ran out");
    };
    assert_eq!(refusal["error"]["code"], "insufficient_quota");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("team \"research\""), "{message}");
    assert!(served >= 5, "{served} served");
    // Both keys are refused now: the team's budget holds them both.
    assert_eq!(ask(first).await.status(), 429);
    assert_eq!(ask(second).await.status(), 429);
    let (_, shown) = admin(&app, "GET", &format!("/admin/teams/{team_id}"), None).await;
    assert_eq!(shown["keys"].as_array().map(Vec::len), Some(2), "{shown}");

    // A $25 key with nothing spent asks for the most tokens a request may: admitted (its
    // prompt and a first slice fit; the rest is drawn as it streams).
    let (_, rich) = key(&app, json!({"name": "rich", "budget_usd": 25})).await;
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&rich)
        .json(&json!({"model": "mock", "max_tokens": 1_000_000,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let left: f64 = response.headers()["x-ratelimit-remaining-budget-usd"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("the budget left");
    assert!(left > 24.9 && left < 25.0, "{left}");
}

#[tokio::test]
async fn a_flushed_redis_keeps_every_keys_spend() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let app = instance(&sqlite_url("budgets"), Some(&redis.url), 0.0).await;
    let (_, secret) = key(&app, json!({"name": "kept", "budget_usd": 1.0})).await;
    let ask = || {
        app.http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&json!({"model": "mock", "max_tokens": 100,
                "messages": [{"role": "user", "content": "Tell me about rivers and the sea"}]}))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(ask().await.expect("answers").status(), 200);
    }
    let (usd, _) = spent(&app, "kept", 3).await;
    assert!(usd > 0.1, "{usd}");
    let mut connection = redis.connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut connection)
        .await
        .expect("FLUSHALL");
    let response = ask().await.expect("answers");
    assert_eq!(response.status(), 200);
    let left: f64 = response.headers()["x-ratelimit-remaining-budget-usd"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("the budget left");
    // What is left after the flush: the budget less what the ledger holds (and this
    // request's first slice), not a whole new budget.
    assert!(left < 1.0 - usd + 1e-6, "{left} left after spending {usd}");
    assert!(left > 1.0 - usd - 0.05, "{left} left after spending {usd}");
}

#[tokio::test]
async fn a_key_revoked_with_end_streams_ends_its_open_streams() {
    let app = instance(&sqlite_url("budgets"), None, 50.0).await;
    for end_streams in [false, true] {
        let (id, secret) = key(&app, json!({"name": format!("leaving-{end_streams}")})).await;
        let response = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&stream(40))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
        let mut events = events(response);
        let first = events.next().await.expect("a first event");
        assert!(!first.data.is_empty());
        let path = format!("/admin/keys/{id}?end_streams={end_streams}");
        let (status, revoked) = admin(&app, "DELETE", &path, None).await;
        assert_eq!(status, 200, "{revoked}");
        let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(60), events.collect())
            .await
            .expect("the stream ends");
        let last = rest.last().expect("more events");
        if end_streams {
            let data: Value = serde_json::from_str(&last.data).expect("JSON");
            assert_eq!(data["error"]["code"], "key_revoked", "{data}");
        } else {
            assert_eq!(
                last.data, "[DONE]",
                "a revoke alone lets open streams finish"
            );
        }
        // Its next request is refused either way.
        let again = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&stream(2))
            .send()
            .await
            .expect("answers");
        assert_eq!(again.status(), 401);
    }
}

#[tokio::test]
async fn bad_budgets_are_400s_naming_the_field_and_patches_are_not_lost() {
    let app = instance(&sqlite_url("budgets"), None, 0.0).await;
    for (body, param) in [
        (json!({"name": "x", "budget_usd": -1}), "budget_usd"),
        (json!({"name": "x", "budget_usd": "lots"}), "budget_usd"),
        (json!({"name": "x", "budget_tokens": -5}), "budget_tokens"),
        (json!({"name": "x", "budget_tokens": 1.5}), "budget_tokens"),
        (
            json!({"name": "x", "budget_period": "year"}),
            "budget_period",
        ),
        (json!({"name": "x", "team_id": "team_nope"}), "team_id"),
    ] {
        let (status, error) = admin(&app, "POST", "/admin/keys", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
    }
    let (status, error) = admin(
        &app,
        "POST",
        "/admin/teams",
        Some(json!({"name": "t", "models": ["mock"]})),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "models");
    let (status, _) = admin(
        &app,
        "PATCH",
        "/admin/teams/team_nope",
        Some(json!({"rpm": 5})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = admin(&app, "GET", "/admin/keys/key_nope", None).await;
    assert_eq!(status, 404);

    // Concurrent PATCHes of one key, each of its own field: every one is kept.
    let (id, _) = key(&app, json!({"name": "patched"})).await;
    let fields = [
        ("rpm", json!(7)),
        ("tpm", json!(7000)),
        ("max_streams", json!(3)),
        ("budget_usd", json!(2.5)),
        ("budget_tokens", json!(9000)),
        ("budget_period", json!("week")),
        ("metadata", json!({"owner": "ops"})),
    ];
    let path = format!("/admin/keys/{id}");
    let patches = fields
        .iter()
        .map(|(field, value)| admin(&app, "PATCH", &path, Some(json!({ *field: value }))));
    for (status, body) in futures::future::join_all(patches).await {
        assert_eq!(status, 200, "{body}");
    }
    let (_, shown) = admin(&app, "GET", &path, None).await;
    for (field, value) in fields {
        assert_eq!(shown[field], value, "{field}: {shown}");
    }
}

/// The admin page in Chromium: signs in with the admin key, makes a key with a budget,
/// shows what the key spent after a request, and disables it.
#[tokio::test]
async fn the_admin_page_makes_a_key_shows_its_spend_and_disables_it() {
    use crate::browser::{browser, js, screenshot, start_driver, wait_for};
    use fantoccini::Locator;
    let Some(driver) = start_driver() else { return };
    let app = instance(&sqlite_url("budgets"), None, 0.0).await;
    let client = browser(&driver).await;
    client
        .goto(&app.url("/admin"))
        .await
        .expect("the page loads");
    let ready = "return document.body.dataset.ready === 'true'";
    wait_for(&client, ready, Duration::from_secs(10)).await;
    // Asked for the admin key first, with the focus in its field.
    assert_eq!(
        js(&client, "return document.activeElement.id").await,
        "admin-key"
    );
    let field = client
        .find(Locator::Id("admin-key"))
        .await
        .expect("the field");
    field
        .send_keys(&format!("{ADMIN}\n"))
        .await
        .expect("typing");
    wait_for(
        &client,
        "return document.body.dataset.ready === 'true' && !document.getElementById('console').hidden",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        js(&client, "return sessionStorage.getItem('sluice-admin-key')").await,
        ADMIN
    );
    assert_eq!(js(&client, "return localStorage.length").await, 0);

    // A new key with a budget of $1 a month: its secret is shown once.
    client
        .find(Locator::Css("#new-key-box summary"))
        .await
        .expect("the form's summary")
        .click()
        .await
        .expect("opens");
    for (name, value) in [("name", "web-key"), ("budget_usd", "1")] {
        client
            .find(Locator::Css(&format!("#new-key [name={name}]")))
            .await
            .expect("a field")
            .send_keys(value)
            .await
            .expect("typing");
    }
    client
        .find(Locator::Css("#new-key button[type=submit]"))
        .await
        .expect("the button")
        .click()
        .await
        .expect("click");
    wait_for(
        &client,
        "return document.getElementById('secret-value').textContent.startsWith('sk-sluice-') && !!document.querySelector('#keys tr[data-name=\"web-key\"]')",
        Duration::from_secs(10),
    )
    .await;
    let secret = js(
        &client,
        "return document.getElementById('secret-value').textContent",
    )
    .await;
    let secret = secret.as_str().expect("the secret").to_owned();

    // A request on it; the page shows what it spent once the ledger has it.
    let ask = || {
        app.http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&json!({"model": "mock", "max_tokens": 20,
                "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
    };
    assert_eq!(ask().await.expect("answers").status(), 200);
    let spent =
        "return (document.querySelector('#keys tr[data-name=\"web-key\"] meter') || {}).value > 0";
    let deadline = Instant::now() + Duration::from_secs(30);
    while js(&client, spent).await != json!(true) {
        assert!(Instant::now() < deadline, "the page never showed the spend");
        client
            .find(Locator::Id("refresh"))
            .await
            .expect("refresh")
            .click()
            .await
            .expect("click");
        wait_for(&client, ready, Duration::from_secs(10)).await;
    }
    let row = js(
        &client,
        "return document.querySelector('#keys tr[data-name=\"web-key\"] .spend').textContent",
    )
    .await;
    assert!(
        row.as_str()
            .is_some_and(|t| t.contains("of $1.00 this month")),
        "{row}"
    );
    // The chart has the day's spend.
    assert_eq!(
        js(
            &client,
            "return document.querySelectorAll('#chart rect').length > 0"
        )
        .await,
        true
    );
    // The secret, once copied, is put away.
    client
        .find(Locator::Id("secret-done"))
        .await
        .expect("Done")
        .click()
        .await
        .expect("click");
    assert_eq!(
        js(&client, "return document.getElementById('secret').hidden").await,
        true
    );
    // With the form folded, the page shows the keys, the teams and the chart.
    js(
        &client,
        "document.getElementById('new-key-box').open = false",
    )
    .await;
    screenshot(
        "admin-desktop.png",
        &client.screenshot().await.expect("png"),
    );

    // Disabled from the page: refused at once.
    client
        .find(Locator::Css("button[aria-label='Disable web-key']"))
        .await
        .expect("the button")
        .click()
        .await
        .expect("click");
    wait_for(
        &client,
        "return (document.querySelector('#keys tr[data-name=\"web-key\"] td.state-disabled') || {}).textContent === 'disabled'",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(ask().await.expect("answers").status(), 401);

    // At a phone's width nothing but the tables scrolls sideways.
    client.set_window_size(390, 844).await.expect("resize");
    assert_eq!(
        js(
            &client,
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )
        .await,
        true,
        "wider than a phone"
    );
    screenshot("admin-phone.png", &client.screenshot().await.expect("png"));
    let _ = client.close().await;
}
