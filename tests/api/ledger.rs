//! The ledger: one record per request that reached a model, in SQLite (the default) or
//! PostgreSQL (started here from Debian's `postgresql`, as a Redis is for the shared
//! tests), read back through the admin reports. What a record says a request cost is the
//! price table times its tokens however the stream ended; a record survives a restart, is
//! written once, and a database that stops loses none and holds up no stream.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::startup::Running;
use crate::support::{
    ADMIN, FakeUpstream, TestApp, all_events, config_file, events, skip_without, sqlite_url,
};

#[path = "../../examples/common/postgres.rs"]
mod postgres;
use postgres::Postgres;

const PRICES: &str = r#"
[prices."mock"]
input = 1.0
output = 1000.0

[prices."mock-stall"]
input = 1.0
output = 1000.0

[prices."gpt-test"]
input = 2.0
output = 8.0

[prices."midstream-error"]
input = 2.0
output = 8.0

[prices."stall"]
input = 2.0
output = 8.0
"#;

/// A PostgreSQL of the test's own, or `None` (said) where it is not installed.
fn postgres() -> Option<Postgres> {
    let pg = Postgres::start();
    if pg.is_none() {
        skip_without("PostgreSQL (Debian's postgresql package)");
    }
    pg
}

/// sluice with a ledger on `url`, the admin key and the price table.
async fn app_on(
    url: &str,
    upstream: Option<&FakeUpstream>,
    adjust: impl FnOnce(&mut sluice::Config),
) -> TestApp {
    let prices = config_file(PRICES);
    let url = url.to_owned();
    let base = upstream.map(FakeUpstream::base_url);
    TestApp::spawn_with(move |c| {
        c.database_url = url;
        c.admin_key = Some(ADMIN.into());
        c.config = Some(prices);
        if let Some(base) = base {
            c.openai_base_url = Some(base);
            c.openai_api_key = Some("sk-test-secret-key".into());
        }
        adjust(c);
    })
    .await
}

async fn admin_get(http: &reqwest::Client, url: String) -> Value {
    let response = http
        .get(url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON")
}

/// Every record, newest first, once `until` accepts them (within a deadline).
async fn records_until(
    http: &reqwest::Client,
    base: &str,
    until: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = admin_get(http, format!("{base}/admin/requests?limit=1000")).await;
        let records = page["data"].as_array().cloned().unwrap_or_default();
        if until(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger did not get there: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The record of the request sent with `x-request-id: id`.
async fn record_of(app: &TestApp, id: &str) -> Value {
    let base = app.url("");
    let records = records_until(&app.http, &base, |all| {
        all.iter().any(|r| r["request_id"] == id)
    })
    .await;
    let mine: Vec<&Value> = records.iter().filter(|r| r["request_id"] == id).collect();
    assert_eq!(mine.len(), 1, "one record for {id}: {mine:?}");
    mine[0].clone()
}

fn tokens(record: &Value, field: &str) -> f64 {
    record[field].as_f64().unwrap_or(-1.0)
}

/// What the record's tokens cost at (input, output) USD per million.
fn priced(record: &Value, (input, output): (f64, f64)) -> f64 {
    let cost =
        (tokens(record, "input_tokens") * input + tokens(record, "output_tokens") * output) / 1e6;
    (cost * 1e9).round() / 1e9
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// The record's cost is the price table times its tokens.
fn assert_costs(record: &Value, prices: (f64, f64)) -> f64 {
    let cost = record["cost_usd"].as_f64().unwrap_or(-1.0);
    assert!(close(cost, priced(record, prices)), "{record}");
    cost
}

async fn post(app: &TestApp, id: &str, path: &str, body: Value) -> reqwest::Response {
    app.http
        .post(app.url(path))
        .header("x-request-id", id)
        .json(&body)
        .send()
        .await
        .expect("answers")
}

fn cost_header(response: &reqwest::Response) -> f64 {
    response
        .headers()
        .get("x-sluice-cost-usd")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

/// Reads `n` token events of a stream, then leaves: what it saw.
async fn read_then_leave(response: reqwest::Response, n: usize, token: &str) -> Vec<String> {
    let mut stream = events(response);
    let mut seen = Vec::new();
    let mut tokens = 0;
    while tokens < n {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        let text = serde_json::from_str::<Value>(&event.data)
            .ok()
            .and_then(|chunk| {
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .is_some_and(|content| !content.is_empty());
        if (token == "message" && text) || (token != "message" && event.event == token) {
            tokens += 1;
        }
        seen.push(event.id);
    }
    seen
}

const MOCK: (f64, f64) = (1.0, 1000.0);
const GPT: (f64, f64) = (2.0, 8.0);

/// The mock, priced: a reply streamed, answered whole, cut by its client after 10 tokens,
/// timed out, resumed after a drop, and run in the background: each has one record whose
/// cost is its tokens at the table's prices, and the same cost the client was told.
#[tokio::test]
async fn every_way_a_mock_reply_ends_is_recorded_once_at_its_price() {
    let url = sqlite_url("ledger");
    let app = app_on(&url, None, |c| {
        c.mock_tokens_per_s = 200.0;
        c.idle_timeout_ms = 2_000;
    })
    .await;
    let chat = |stream: bool| {
        let mut body = json!({"model": "mock", "stream": stream,
            "messages": [{"role": "user", "content": "Tell me about rivers"}]});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    };

    // Streamed, with its usage chunk.
    let events = all_events(post(&app, "streamed", "/v1/chat/completions", chat(true)).await).await;
    let usage = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .find(|c| c["usage"].is_object())
        .expect("a usage chunk")["usage"]
        .clone();
    let record = record_of(&app, "streamed").await;
    assert_eq!(record["outcome"], "completed");
    assert_eq!(record["output_tokens"], usage["completion_tokens"]);
    assert_eq!(record["input_tokens"], usage["prompt_tokens"]);
    let cost = assert_costs(&record, MOCK);
    assert!(
        close(cost, usage["cost"].as_f64().unwrap_or(-1.0)),
        "{usage}"
    );
    assert!(cost > 0.0);

    // Answered whole: the header says what the record says.
    let whole = post(&app, "whole", "/v1/chat/completions", chat(false)).await;
    let told = cost_header(&whole);
    let record = record_of(&app, "whole").await;
    assert_eq!(record["outcome"], "completed");
    assert!(
        close(assert_costs(&record, MOCK), told),
        "{record} vs {told}"
    );
    assert!(
        close(told, cost),
        "the same request costs the same streamed or not"
    );

    // Resumed: read 5 tokens, dropped, the rest read again; one record, the whole reply.
    let first = post(
        &app,
        "resumed",
        "/api/chat",
        json!({"model": "mock", "prompt": "Tell me about rivers"}),
    )
    .await;
    let stream = first
        .headers()
        .get("x-sluice-stream-id")
        .and_then(|v| v.to_str().ok())
        .expect("a stream id")
        .to_owned();
    let seen = read_then_leave(first, 5, "token").await;
    let last = seen.last().cloned().unwrap_or_default();
    let rest = app
        .http
        .get(app.url(&format!("/api/chat/{stream}")))
        .header("last-event-id", last)
        .send()
        .await
        .expect("resumes");
    let done = all_events(rest)
        .await
        .into_iter()
        .find(|e| e.event == "done")
        .and_then(|e| serde_json::from_str::<Value>(&e.data).ok())
        .expect("a done event");
    let record = record_of(&app, "resumed").await;
    assert_eq!(record["stream_id"], stream.as_str());
    assert_eq!(record["outcome"], "completed");
    assert_eq!(record["output_tokens"], done["usage"]["completion_tokens"]);
    assert!(close(
        assert_costs(&record, MOCK),
        done["cost"].as_f64().unwrap_or(-1.0)
    ));

    // In the background: created, then read when done.
    let created: Value = post(
        &app,
        "background",
        "/v1/responses",
        json!({"model": "mock", "input": "Tell me about rivers", "background": true}),
    )
    .await
    .json()
    .await
    .expect("JSON");
    let id = created["id"].as_str().expect("an id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        let now: Value = app.get_json(&format!("/v1/responses/{id}")).await;
        if now["status"] == "completed" {
            break now;
        }
        assert!(Instant::now() < deadline, "{now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let record = record_of(&app, "background").await;
    assert_eq!(record["api"], "openai");
    assert_eq!(record["output_tokens"], finished["usage"]["output_tokens"]);
    let cost = assert_costs(&record, MOCK);
    assert!(
        close(cost, finished["usage"]["cost"].as_f64().unwrap_or(-1.0)),
        "{finished}"
    );

    // Timed out: one token, then nothing for longer than the limit between chunks.
    let stalled = post(
        &app,
        "timed-out",
        "/v1/chat/completions",
        json!({"model": "mock-stall", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    all_events(stalled).await;
    let record = record_of(&app, "timed-out").await;
    assert_eq!(record["outcome"], "timed_out");
    assert_eq!(record["output_tokens"], 1);
    assert!(assert_costs(&record, MOCK) > 0.0);

    // Every request that reached the model has exactly one record.
    let all = records_until(&app.http, &app.url(""), |all| all.len() >= 5).await;
    let mut ids: Vec<&str> = all.iter().filter_map(|r| r["id"].as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "{all:?}");
    assert_eq!(all.len(), 5, "{all:?}");
}

/// A client that leaves after 10 tokens pays for what the mock generated by then (±1).
#[tokio::test]
async fn a_reply_cut_after_ten_tokens_costs_what_was_generated() {
    let url = sqlite_url("ledger");
    let app = app_on(&url, None, |c| c.mock_tokens_per_s = 50.0).await;
    let body = json!({"model": "mock", "stream": true, "max_tokens": 500,
        "messages": [{"role": "user", "content": "Tell me about rivers"}]});
    let response = post(&app, "cut", "/v1/chat/completions", body).await;
    read_then_leave(response, 10, "message").await;
    let record = record_of(&app, "cut").await;
    assert_eq!(record["outcome"], "cancelled");
    let generated = app.metric("sluice_mock_tokens_generated_total").await;
    let output = tokens(&record, "output_tokens");
    assert!(output >= 10.0, "{record}");
    assert!(
        (output - generated).abs() <= 1.0,
        "{output} vs {generated} generated"
    );
    assert_costs(&record, MOCK);
}

/// A priced upstream that reports its usage: the same request costs the same on all four
/// APIs, streamed or not, exactly its reported tokens at the table's prices; an upstream
/// that fails after its first token, or stalls, costs what it sent.
#[tokio::test]
async fn the_same_request_costs_the_same_on_every_api_streamed_or_not() {
    let upstream = FakeUpstream::spawn().await;
    let url = sqlite_url("ledger");
    let app = app_on(&url, Some(&upstream), |c| c.idle_timeout_ms = 2_000).await;
    let message = [json!({"role": "user", "content": "Hi"})];
    // The fake upstream reports 11 prompt and 5 completion tokens.
    let expected = (11.0 * 2.0 + 5.0 * 8.0) / 1e6;
    let requests = [
        (
            "chat-s",
            "/v1/chat/completions",
            json!({"model": "gpt-test", "stream": true, "messages": message}),
        ),
        (
            "chat-w",
            "/v1/chat/completions",
            json!({"model": "gpt-test", "messages": message}),
        ),
        (
            "responses-s",
            "/v1/responses",
            json!({"model": "gpt-test", "stream": true, "input": "Hi"}),
        ),
        (
            "responses-w",
            "/v1/responses",
            json!({"model": "gpt-test", "input": "Hi"}),
        ),
        (
            "messages-s",
            "/v1/messages",
            json!({"model": "gpt-test", "stream": true, "max_tokens": 100, "messages": message}),
        ),
        (
            "messages-w",
            "/v1/messages",
            json!({"model": "gpt-test", "max_tokens": 100, "messages": message}),
        ),
        (
            "sluice-s",
            "/api/chat",
            json!({"model": "gpt-test", "prompt": "Hi"}),
        ),
    ];
    for (id, path, body) in requests {
        let streamed = body["stream"] == true || path == "/api/chat";
        let response = post(&app, id, path, body).await;
        assert_eq!(response.status(), 200, "{id}");
        if !streamed {
            assert!(
                close(cost_header(&response), expected),
                "{id}: x-sluice-cost-usd"
            );
        }
        all_events(response).await;
        let record = record_of(&app, id).await;
        assert_eq!(record["outcome"], "completed", "{record}");
        assert_eq!(record["input_tokens"], 11, "{record}");
        assert_eq!(record["output_tokens"], 5, "{record}");
        assert!(close(assert_costs(&record, GPT), expected), "{record}");
        assert_eq!(record["served_model"], "gpt-test");
        assert_eq!(
            record["target"], "default",
            "the default upstream: {record}"
        );
    }

    // Broken off after its first token; stalled after its first token.
    for (id, model, outcome) in [
        ("broken", "midstream-error", "upstream_error"),
        ("stalled", "stall", "timed_out"),
    ] {
        let body = json!({"model": model, "stream": true, "messages": message});
        all_events(post(&app, id, "/v1/chat/completions", body).await).await;
        let record = record_of(&app, id).await;
        assert_eq!(record["outcome"], outcome, "{record}");
        assert_eq!(record["output_tokens"], 1, "{record}");
        assert!(assert_costs(&record, GPT) > 0.0, "{model}: {record}");
    }

    // A model with no price: its tokens are counted, its cost is unknown, not zero.
    let body = json!({"model": "unpriced-model", "stream": true, "messages": message});
    all_events(post(&app, "unpriced", "/v1/chat/completions", body).await).await;
    let record = record_of(&app, "unpriced").await;
    assert_eq!(record["output_tokens"], 5, "{record}");
    assert!(record["cost_usd"].is_null(), "{record}");

    // The spend in /metrics: by key (`open`: sluice has no keys here) and model.
    let spend = app
        .metric("sluice_spend_usd_total{key=\"open\",model=\"gpt-test\"}")
        .await;
    assert!((spend - 7.0 * expected).abs() < 1e-9, "{spend}");
    let input = app
        .metric("sluice_tokens_total{key=\"open\",model=\"gpt-test\",type=\"input\"}")
        .await;
    assert_eq!(input, 77.0);
    assert!(
        app.metric("sluice_unpriced_requests_total{model=\"other\"}")
            .await
            >= 1.0
    );

    // The report: by model, what the records add up to.
    let usage = admin_get(
        &app.http,
        app.url("/admin/usage?group_by=model,api&from=2000-01-01"),
    )
    .await;
    let rows = usage["data"].as_array().cloned().unwrap_or_default();
    let openai = rows
        .iter()
        .find(|r| r["model"] == "gpt-test" && r["api"] == "openai")
        .expect("a row of gpt-test on the OpenAI APIs");
    assert_eq!(openai["requests"], 4, "{usage}");
    assert_eq!(openai["output_tokens"], 20, "{usage}");
    assert!(close(
        openai["cost_usd"].as_f64().unwrap_or(-1.0),
        4.0 * expected
    ));
    assert_eq!(usage["total"]["requests"], 10, "{usage}");
    assert_eq!(usage["total"]["unpriced"], 1, "{usage}");
}

/// `/admin/*` exists only with SLUICE_ADMIN_KEY, answers only that key, refuses it for
/// inference, and says what is wrong with a query.
#[tokio::test]
async fn the_admin_api_is_there_only_with_its_key_and_checks_its_queries() {
    let without = TestApp::spawn().await;
    let answer = without
        .http
        .get(without.url("/admin/usage"))
        .send()
        .await
        .expect("answers");
    assert_eq!(answer.status(), 404);

    let url = sqlite_url("ledger");
    let app = app_on(&url, None, |c| c.api_keys = vec!["sk-user".into()]).await;
    let get = |path: &str, key: Option<&str>| {
        let mut request = app.http.get(app.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(
        get("/admin/usage", None).await.expect("answers").status(),
        401
    );
    assert_eq!(
        get("/admin/usage", Some("sk-user"))
            .await
            .expect("answers")
            .status(),
        401
    );
    assert_eq!(
        get("/admin/usage", Some(ADMIN))
            .await
            .expect("answers")
            .status(),
        200
    );
    let inference = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(ADMIN)
        .json(&json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("answers");
    assert_eq!(inference.status(), 401);
    for (query, param) in [
        ("/admin/usage?from=yesterday", "from"),
        ("/admin/usage?to=2026-02-30", "to"),
        ("/admin/usage?group_by=key,prompt", "group_by"),
        ("/admin/requests?limit=0", "limit"),
        ("/admin/requests?limit=many", "limit"),
    ] {
        let answer = get(query, Some(ADMIN)).await.expect("answers");
        assert_eq!(answer.status(), 400, "{query}");
        let body: Value = answer.json().await.expect("JSON");
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
    }

    // Pages, newest first, each record once.
    for n in 0..5 {
        let response = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth("sk-user")
            .header("x-request-id", format!("page-{n}"))
            .json(&json!({"model": "mock", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
    }
    records_until(&app.http, &app.url(""), |all| all.len() == 5).await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(id) => format!("/admin/requests?limit=2&after={id}"),
            None => "/admin/requests?limit=2".to_owned(),
        };
        let page = admin_get(&app.http, app.url(&query)).await;
        for record in page["data"].as_array().cloned().unwrap_or_default() {
            seen.push(record["request_id"].as_str().unwrap_or_default().to_owned());
        }
        if page["has_more"] != true {
            break;
        }
        after = page["last_id"].as_str().map(str::to_owned);
    }
    assert_eq!(seen, ["page-4", "page-3", "page-2", "page-1", "page-0"]);
}

/// Records written before a restart are there after it; each once.
#[tokio::test]
async fn records_survive_a_restart() {
    let url = sqlite_url("ledger");
    let vars = [
        ("SLUICE_DATABASE_URL", url.as_str()),
        ("SLUICE_ADMIN_KEY", ADMIN),
        ("SLUICE_SHUTDOWN_GRACE_S", "1"),
    ];
    let http = reqwest::Client::new();
    let ask = |sluice: &Running, id: &str| {
        http.post(sluice.url("/v1/chat/completions"))
            .header("x-request-id", id)
            .json(&json!({"model": "mock", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
    };
    let mut first = Running::start(&vars);
    for id in ["before-1", "before-2"] {
        assert_eq!(ask(&first, id).await.expect("answers").status(), 200);
    }
    // Queued records are written at shutdown.
    assert!(first.terminate().success());

    let second = Running::start(&vars);
    assert_eq!(ask(&second, "after").await.expect("answers").status(), 200);
    let all = records_until(&http, &second.url(""), |all| all.len() >= 3).await;
    let mut ids: Vec<&str> = all
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["after", "before-1", "before-2"]);
    let instances: std::collections::HashSet<&str> =
        all.iter().filter_map(|r| r["instance"].as_str()).collect();
    assert_eq!(instances.len(), 2, "two processes wrote them: {all:?}");
}

/// A batch written again (a retry after a failure whose commit did land) adds nothing.
#[tokio::test]
async fn a_batch_written_twice_is_recorded_once() {
    let mut urls = vec![sqlite_url("ledger")];
    let pg = postgres();
    if let Some(pg) = &pg {
        urls.push(pg.url());
    }
    for url in urls {
        let db = sluice::ledger::Db::open(&url).await.expect("opens");
        let records: Vec<sluice::ledger::Record> = (0..3)
            .map(|n| sluice::ledger::Record {
                id: format!("twice-{n}"),
                request_id: format!("r{n}"),
                at_us: 1_800_000_000_000_000 + n,
                key: "k".into(),
                route: "/v1/chat/completions".into(),
                model: "m".into(),
                api: "openai".into(),
                outcome: "completed".into(),
                input_tokens: 10,
                output_tokens: 2,
                cost_usd: Some(0.5),
                ..Default::default()
            })
            .collect();
        db.insert("test", &records).await.expect("written");
        db.insert("test", &records).await.expect("written again");
        let filter = sluice::ledger::report::Filter::parse(None, None, None).expect("a filter");
        let usage = db.usage(&filter, &[]).await.expect("a report");
        assert_eq!(usage.len(), 1, "{url}");
        assert_eq!(usage[0].requests, 3, "{url}");
        assert_eq!(usage[0].input_tokens, 30, "{url}");
        assert!(close(usage[0].cost_usd, 1.5), "{url}");
    }
}

/// Two sluices on one PostgreSQL: each writes its own rows, and each one's reports hold
/// both's.
#[tokio::test]
async fn two_instances_on_one_postgres_report_each_other_s_rows() {
    let Some(pg) = postgres() else { return };
    let url = pg.url();
    let vars = [
        ("SLUICE_DATABASE_URL", url.as_str()),
        ("SLUICE_ADMIN_KEY", ADMIN),
    ];
    let (a, b) = (Running::start(&vars), Running::start(&vars));
    let http = reqwest::Client::new();
    for (sluice, n) in [(&a, 2), (&b, 3)] {
        for _ in 0..n {
            let answer = http
                .post(sluice.url("/v1/chat/completions"))
                .json(&json!({"model": "mock", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}))
                .send()
                .await
                .expect("answers");
            assert_eq!(answer.status(), 200);
        }
    }
    for sluice in [&a, &b] {
        records_until(&http, &sluice.url(""), |all| all.len() == 5).await;
        let usage = admin_get(&http, sluice.url("/admin/usage?group_by=instance")).await;
        let mut counts: Vec<i64> = usage["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| row["requests"].as_i64())
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, [2, 3], "{usage}");
    }
}

/// PostgreSQL stopped under 100 streams: no stream waits on it, `/readyz` says the ledger
/// is buffering, and once it is back every record is written, once.
#[tokio::test]
async fn a_postgres_stopped_under_load_loses_no_record_and_holds_up_no_stream() {
    let Some(mut pg) = postgres() else { return };
    let app = app_on(&pg.url(), None, |c| {
        c.mock_tokens_per_s = 20.0;
        c.max_streams = 200;
    })
    .await;
    // Connected and written once before the outage.
    let body = json!({"model": "mock", "stream": true, "max_tokens": 20,
        "messages": [{"role": "user", "content": "Hi"}]});
    all_events(post(&app, "warm", "/v1/chat/completions", body.clone()).await).await;
    record_of(&app, "warm").await;

    pg.stop();
    let stopped = tokio::time::Instant::now();
    let streams = (0..100).map(|n| {
        let (app, body) = (&app, body.clone());
        async move {
            let response = post(app, &format!("load-{n}"), "/v1/chat/completions", body).await;
            assert_eq!(response.status(), 200);
            let events = all_events(response).await;
            assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
        }
    });
    futures::future::join_all(streams).await;
    // Every stream ended while the database was still down: none waited on it. The ledger
    // says so once its next write has failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = app.get_json("/readyz").await;
        assert_eq!(ready["status"], "ready");
        if ready["ledger"]["status"] == "buffering" {
            assert!(
                ready["ledger"]["queued"].as_u64().unwrap_or(0) > 0,
                "{ready}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The outage lasts 10 s (its length, not a wait for anything).
    tokio::time::sleep_until(stopped + Duration::from_secs(10)).await;
    pg.resume();
    let all = records_until(&app.http, &app.url(""), |all| all.len() >= 101).await;
    assert_eq!(all.len(), 101, "every record, once");
    assert!(app.metric("sluice_ledger_write_errors_total").await >= 1.0);
    assert_eq!(app.metric("sluice_ledger_records_dropped_total").await, 0.0);
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["ledger"]["status"], "ok", "{ready}");
}

/// A database URL sluice cannot use does not stop it: it serves, and `/readyz` says why the
/// ledger is buffering.
#[tokio::test]
async fn an_unusable_database_url_leaves_sluice_serving_and_says_so() {
    let app = app_on("mysql://nowhere/db", None, |_| {}).await;
    let answer = post(
        &app,
        "served",
        "/v1/chat/completions",
        json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(answer.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = app.get_json("/readyz").await;
        if ready["ledger"]["status"] == "buffering" {
            assert!(
                ready["ledger"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("SLUICE_DATABASE_URL")),
                "{ready}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = app
        .http
        .get(app.url("/admin/usage"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("answers");
    assert_eq!(report.status(), 503);
}
