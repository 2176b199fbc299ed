//! Stored streams as resources: the memory their logs hold (here and in Redis), who may
//! evict whose, reads counted like requests, readers capped, identities that survive a
//! key rotation, and the small ways a stored stream could be read or billed wrong.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::shared::Redis;
use crate::support::{DEADLINE, FakeUpstream, TestApp, all_events, events};

const MIB: f64 = 1024.0 * 1024.0;

fn keyed(app: &TestApp, key: &str, path: &str) -> reqwest::RequestBuilder {
    app.http.post(app.url(path)).bearer_auth(key)
}

fn get(app: &TestApp, key: Option<&str>, path: &str) -> reqwest::RequestBuilder {
    let request = app.http.get(app.url(path));
    match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    }
}

fn stream_id(response: &reqwest::Response) -> String {
    response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("an id")
        .to_owned()
}

fn resumable(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-sluice-resumable")
        .map(|v| v.to_str().expect("ASCII").to_owned())
}

/// Starts an `/api/chat` stream of `model`, reads its first two events and leaves: its id.
async fn detached(app: &TestApp, key: Option<&str>, model: &str) -> (String, Option<String>) {
    let mut request = app.http.post(app.url("/api/chat"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request
        .json(&json!({"prompt": "Hi", "model": model}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let id = stream_id(&response);
    let flag = resumable(&response);
    let mut stream = events(response);
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
    }
    (id, flag)
}

/// Waits until the upstream has stopped being read (what it sent stands still); the bytes.
async fn until_paused(upstream: &FakeUpstream) -> usize {
    let started = Instant::now();
    let mut last = upstream.sent_bytes();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = upstream.sent_bytes();
        if now == last {
            return now;
        }
        last = now;
        assert!(
            started.elapsed() < DEADLINE * 6,
            "the upstream is still being read ({now} bytes)"
        );
    }
}

#[tokio::test]
async fn stream_logs_hold_to_the_memory_cap_at_every_append_and_to_each_client_s_share() {
    // M1, the instance's total: 16 detached streams of 64 MiB each against 1 MiB.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.resume_memory_mb = 1.0;
        c.resume_client_share = 1.0;
        c.max_streams = 64;
    })
    .await;
    let mut peak = 0.0f64;
    for _ in 0..16 {
        detached(&app, None, "flood").await;
        peak = peak.max(app.metric("sluice_stream_log_bytes").await);
    }
    let sent = until_paused(&upstream).await;
    peak = peak.max(app.metric("sluice_stream_log_bytes").await);
    eprintln!(
        "16 detached floods: logs at most {:.2} MiB against 1 MiB; the upstream sent {:.1} MiB and then was paused",
        peak / MIB,
        sent as f64 / MIB
    );
    assert!(peak <= MIB + 64.0 * 1024.0, "the logs held {peak} bytes");

    // Each client's share: a quarter of 1 MiB.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.resume_memory_mb = 1.0;
        c.max_streams = 64;
        c.api_keys = vec!["k1".into(), "k2".into()];
    })
    .await;
    for _ in 0..8 {
        detached(&app, Some("k1"), "flood").await;
    }
    until_paused(&upstream).await;
    let held = app.metric("sluice_stream_log_bytes").await;
    eprintln!(
        "8 detached floods of one client: {:.0} KiB against its share of 256 KiB",
        held / 1024.0
    );
    assert!(
        held <= 256.0 * 1024.0 + 16.0 * 1024.0,
        "one client held {held} bytes"
    );
    // That client's next stream finds no room; another client's does.
    let (_, flag) = detached(&app, Some("k1"), "paced").await;
    assert_eq!(flag.as_deref(), Some("false"));
    let (_, flag) = detached(&app, Some("k2"), "paced").await;
    assert_eq!(flag.as_deref(), Some("true"));
}

#[tokio::test]
async fn a_detached_producer_pauses_when_its_next_event_would_not_fit() {
    // L1: four streams with nobody reading, each at a cap of 128 KiB.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.resume_memory_mb = 1.0;
        c.resume_client_share = 1.0;
    })
    .await;
    for _ in 0..4 {
        detached(&app, None, "flood").await;
    }
    let sent = until_paused(&upstream).await;
    let held = app.metric("sluice_stream_log_bytes").await;
    eprintln!("4 detached floods paused: logs {held} bytes, the upstream sent {sent}");
    assert!(held <= 4.0 * (128.0 + 1.0) * 1024.0, "{held}");
    for n in 1..=4 {
        assert!(
            upstream.is_open(n),
            "paused, not cancelled, in the grace period"
        );
    }
}

#[tokio::test]
async fn an_event_larger_than_a_log_ends_its_stream_instead_of_outgrowing_memory() {
    // A Responses stream's last events carry the whole reply: 2 MiB of it, against logs of
    // 128 KiB. The stream ends saying so; memory holds to its budget.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.resume_memory_mb = 1.0;
        c.resume_client_share = 1.0;
    })
    .await;
    let response = app
        .http
        .post(app.url("/v1/responses"))
        .header("x-sluice-resumable", "true")
        .json(&json!({"model": "large", "input": "Hi", "stream": true}))
        .send()
        .await
        .expect("answers");
    assert_eq!(resumable(&response).as_deref(), Some("true"));
    // The log's size is sampled beside the reader, which reads as fast as it can.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (app, peak) = (
            TestApp {
                addr: app.addr,
                http: app.http.clone(),
                operator: None,
            },
            peak.clone(),
        );
        tokio::spawn(async move {
            for _ in 0..6_000 {
                let now = app.metric("sluice_stream_log_bytes").await as u64;
                peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let mut body = response.bytes_stream().eventsource();
    let mut last = None;
    while let Some(event) = tokio::time::timeout(DEADLINE, body.next())
        .await
        .expect("the stream goes on")
    {
        last = Some(event.expect("well-formed SSE"));
        assert!(started.elapsed() < DEADLINE * 24, "the flood never ended");
    }
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let last = last.expect("events");
    eprintln!(
        "a 2 MiB Responses reply against 1 MiB: logs at most {:.0} KiB; it ended with {}",
        peak / 1024.0,
        last.event
    );
    assert_eq!(last.event, "response.failed");
    let failed: Value = serde_json::from_str(&last.data).expect("JSON");
    assert_eq!(
        failed["response"]["error"]["code"], "stream_too_large",
        "{failed}"
    );
    assert!(peak <= MIB + 64.0 * 1024.0, "{peak}");
}

#[tokio::test]
async fn a_live_reader_of_a_stream_faster_than_it_loses_nothing() {
    // 2 MiB as fast as the upstream sends it, logs of 128 KiB: the producer waits for its
    // reader instead of dropping what the reader has not taken.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.resume_memory_mb = 1.0;
        c.resume_client_share = 1.0;
    })
    .await;
    let response = app
        .post("/api/chat", &json!({"prompt": "Hi", "model": "large"}))
        .await;
    assert_eq!(resumable(&response).as_deref(), Some("true"));
    let events = all_events(response).await;
    assert_eq!(events.last().expect("an ending").event, "done");
    assert_eq!(crate::support::chat_text(&events).len(), 2_048 * 1024);
}

/// A stored Responses reply of `key`, its input about `bytes` long: its id.
async fn stored_response(app: &TestApp, key: &str, bytes: usize) -> String {
    let response = keyed(app, key, "/v1/responses")
        .json(&json!({"model": "mock", "input": "x ".repeat(bytes / 2), "max_output_tokens": 3}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    body["id"].as_str().expect("an id").to_owned()
}

#[tokio::test]
async fn one_client_cannot_evict_another_s_stored_responses() {
    // M4: 256 KiB of logs, 64 KiB a client.
    let app = TestApp::spawn_with(|c| {
        c.resume_memory_mb = 0.25;
        c.api_keys = vec!["k1".into(), "k2".into()];
    })
    .await;
    let theirs = stored_response(&app, "k2", 8_000).await;
    let mut mine = Vec::new();
    for _ in 0..60 {
        mine.push(stored_response(&app, "k1", 8_000).await);
    }
    let status = |key: &'static str, id: &str| {
        let request = get(&app, Some(key), &format!("/v1/responses/{id}"));
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    assert_eq!(
        status("k2", &theirs).await,
        200,
        "another client's log was evicted"
    );
    assert_eq!(
        status("k1", &mine[0]).await,
        404,
        "the client's own oldest goes first"
    );
    assert_eq!(status("k1", &mine[59]).await, 200);
}

#[tokio::test]
async fn a_chain_of_previous_responses_sends_no_more_than_the_body_limit_upstream() {
    // M4: each step adds 300 KB; what goes upstream is held to 1 MiB.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let mut previous: Option<String> = None;
    let mut refused = None;
    for step in 0..6 {
        let mut body = json!({"model": "gpt-test", "input": "y ".repeat(150_000)});
        if let Some(id) = &previous {
            body["previous_response_id"] = json!(id);
        }
        let response = app.post("/v1/responses", &body).await;
        if response.status() != 200 {
            refused = Some((
                step,
                response.status().as_u16(),
                response.json::<Value>().await.expect("JSON"),
            ));
            break;
        }
        let reply: Value = response.json().await.expect("JSON");
        previous = Some(reply["id"].as_str().expect("an id").to_owned());
    }
    let (step, status, error) = refused.expect("the chain is refused once it outgrows the limit");
    eprintln!("a 300 KB chain is refused at step {step}: {error}");
    assert_eq!(status, 400);
    assert_eq!(error["error"]["param"], "previous_response_id", "{error}");
    for seen in upstream.requests() {
        let size = serde_json::to_vec(&seen.body).expect("JSON").len();
        assert!(size <= 1024 * 1024 + 4096, "{size} bytes went upstream");
    }
}

#[tokio::test]
async fn reading_stored_streams_is_admitted_counted_and_capped() {
    // M3: every read counts against the request rate...
    let app = TestApp::spawn_with(|c| c.rpm = 3).await;
    let response = app
        .post("/api/chat", &json!({"prompt": "Hi", "model": "mock"}))
        .await;
    let id = stream_id(&response);
    all_events(response).await;
    let path = format!("/api/chat/{id}?last_event_id=0");
    assert_eq!(
        get(&app, None, &path)
            .send()
            .await
            .expect("answers")
            .status(),
        200
    );
    assert_eq!(
        get(&app, None, &path)
            .send()
            .await
            .expect("answers")
            .status(),
        200
    );
    let refused = get(&app, None, &path).send().await.expect("answers");
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.expect("JSON");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");

    // ...and before any stored state is loaded: an unknown previous response is a 429 for a
    // client over its rate, not a lookup.
    let unknown = app
        .post_json(
            "/v1/responses",
            &json!({"model": "mock", "input": "Hi", "previous_response_id": "resp_unknown"}),
        )
        .await;
    assert_eq!(unknown["error"]["code"], "rate_limit_exceeded", "{unknown}");

    // Readers per stream (SLUICE_MAX_READERS)...
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| c.max_readers = 2).await;
    let first = app
        .post("/api/chat", &json!({"prompt": "Hi", "model": "slow"}))
        .await;
    let id = stream_id(&first);
    let path = format!("/api/chat/{id}?last_event_id=0");
    let second = get(&app, None, &path).send().await.expect("answers");
    assert_eq!(second.status(), 200);
    let third = get(&app, None, &path).send().await.expect("answers");
    assert_eq!(third.status(), 429);
    let error: Value = third.json().await.expect("JSON");
    assert!(
        error["error"]["message"]
            .as_str()
            .expect("a message")
            .contains("2 readers"),
        "{error}"
    );
    drop((first, second));

    // ...and per client (its SLUICE_MAX_STREAMS).
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| c.max_streams = 2).await;
    let (a, _) = detached(&app, None, "slow").await;
    let (b, _) = detached(&app, None, "slow").await;
    let on_a = get(&app, None, &format!("/api/chat/{a}?last_event_id=0"))
        .send()
        .await
        .expect("answers");
    let on_b = get(&app, None, &format!("/api/chat/{b}?last_event_id=0"))
        .send()
        .await
        .expect("answers");
    assert_eq!((on_a.status().as_u16(), on_b.status().as_u16()), (200, 200));
    let third = get(&app, None, &format!("/api/chat/{a}?last_event_id=0"))
        .send()
        .await
        .expect("answers");
    assert_eq!(third.status(), 429);
    drop((on_a, on_b));
    // A reader that left frees its slot.
    let started = Instant::now();
    loop {
        let again = get(&app, None, &format!("/api/chat/{a}?last_event_id=0"))
            .send()
            .await
            .expect("answers");
        if again.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the readers' slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn store_false_is_never_readable_back() {
    // L2: not by GET, not by resuming it.
    let app = TestApp::spawn().await;
    let response = app
        .http
        .post(app.url("/v1/responses"))
        .header("x-sluice-resumable", "true")
        .json(&json!({"model": "mock", "input": "Hi", "store": false, "stream": true}))
        .send()
        .await
        .expect("answers");
    assert_eq!(resumable(&response).as_deref(), Some("false"));
    let id = stream_id(&response);
    all_events(response).await;
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}?stream=true"),
    ] {
        let status = get(&app, None, &path)
            .send()
            .await
            .expect("answers")
            .status();
        assert_eq!(status, 404, "{path}");
    }
}

async fn redis_connection(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url.as_str())
        .expect("a URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers")
}

#[tokio::test]
async fn redis_logs_hold_no_more_than_memory_and_readers_share_connections() {
    let Some(redis) = Redis::start() else { return };
    let mut conn = redis_connection(&redis).await;
    // M2: streams of 64 MiB each, against logs of 128 KiB a stream.
    let upstream = FakeUpstream::spawn().await;
    let url = redis.url.clone();
    let app = TestApp::in_front_of_with(&upstream, move |c| {
        c.redis_url = Some(url);
        c.resume_memory_mb = 1.0;
        c.resume_client_share = 1.0;
    })
    .await;
    // Background responses run to their end whoever reads: memory trims their logs.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let queued = app
            .post_json(
                "/v1/responses",
                &json!({"model": "flood", "input": "Hi", "background": true}),
            )
            .await;
        ids.push(queued["id"].as_str().expect("an id").to_owned());
    }
    let started = Instant::now();
    while upstream.sent_bytes() < 16 * 1024 * 1024 {
        assert!(started.elapsed() < DEADLINE * 6, "the floods did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut in_redis = 0u64;
    for id in &ids {
        let started = Instant::now();
        let used = loop {
            // The writer may be a batch behind: wait for the log to be trimmed.
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("sluice:{{{id}}}:log"))
                .query_async(&mut conn)
                .await
                .expect("MEMORY USAGE");
            let used = used.unwrap_or(0);
            if used <= 1024 * 1024 || started.elapsed() > DEADLINE {
                break used;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        in_redis += used;
    }
    eprintln!(
        "2 background floods, 16 MiB in all so far: {:.0} KiB of their logs in Redis (memory: 128 KiB a stream)",
        in_redis as f64 / 1024.0
    );
    // A stream's log and at most one writer batch on top (512 events).
    assert!(
        in_redis <= 2 * 1024 * 1024,
        "Redis holds {in_redis} bytes of logs"
    );

    // M3: fifty readers on another instance share its connection to Redis.
    let upstream = FakeUpstream::spawn().await;
    let (url_a, url_b) = (redis.url.clone(), redis.url.clone());
    let a = TestApp::in_front_of_with(&upstream, move |c| c.redis_url = Some(url_a)).await;
    let b = TestApp::in_front_of_with(&upstream, move |c| {
        c.redis_url = Some(url_b);
        c.max_readers = 100;
        c.max_streams = 100;
    })
    .await;
    let (id, _) = detached(&a, None, "slow").await;
    let mut readers = Vec::new();
    let path = format!("/api/chat/{id}?last_event_id=0");
    for _ in 0..50 {
        let response = get(&b, None, &path).send().await.expect("answers");
        assert_eq!(response.status(), 200);
        let mut stream = events(response);
        tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        readers.push(stream);
    }
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    let count = clients.lines().count();
    eprintln!("50 readers on B: {count} Redis clients in all (both instances and this test)");
    // Three instances (their limits, logs and subscriptions) and this test: not one a reader.
    assert!(count <= 16, "{clients}");
    // Every reader still follows the stream live.
    for stream in &mut readers {
        tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("a live event in time")
            .expect("the stream goes on");
    }
}

#[tokio::test]
async fn a_flushed_redis_gets_live_permits_back_and_a_dead_one_is_named_as_such() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let mut conn = redis_connection(&redis).await;
    // L3: a cap of one stream, a stream running, Redis flushed.
    let upstream = FakeUpstream::spawn().await;
    let url = redis.url.clone();
    let app = TestApp::in_front_of_with(&upstream, move |c| {
        c.redis_url = Some(url);
        c.max_streams = 1;
    })
    .await;
    // A first token, then silence: a stream that holds its permit.
    let body = json!({"model": "stall", "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]});
    let running = app.post("/v1/chat/completions", &body).await;
    assert_eq!(running.status(), 200);
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    let started = Instant::now();
    loop {
        let held: u64 = redis::cmd("ZCARD")
            .arg(sluice::admission::shared::client_key(
                "127.0.0.1",
                "streams",
            ))
            .query_async(&mut conn)
            .await
            .expect("ZCARD");
        if held == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the running stream's permit was never put back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the live permit was back {:?} after FLUSHALL",
        started.elapsed()
    );
    let second = app.post("/v1/chat/completions", &body).await;
    assert_eq!(
        second.status(),
        429,
        "the cap of one let a second stream in"
    );
    drop(running);

    // L3: Redis dies under a reader on another instance: not `producer_lost`.
    let upstream = FakeUpstream::spawn().await;
    let (url_a, url_b) = (redis.url.clone(), redis.url.clone());
    let a = TestApp::in_front_of_with(&upstream, move |c| c.redis_url = Some(url_a)).await;
    let b = TestApp::in_front_of_with(&upstream, move |c| {
        c.redis_url = Some(url_b);
        c.idle_timeout_ms = 3_000;
    })
    .await;
    let (id, _) = detached(&a, None, "slow").await;
    let response = get(&b, None, &format!("/api/chat/{id}?last_event_id=0"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let mut stream = events(response);
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("an event")
        .expect("the stream goes on");
    redis.kill();
    let ending = tokio::time::timeout(DEADLINE * 2, async {
        while let Some(event) = stream.next().await {
            if event.event == "error" {
                return Some(event);
            }
        }
        None
    })
    .await
    .expect("the reader ends in time")
    .expect("with an error event");
    let error: Value = serde_json::from_str(&ending.data).expect("JSON");
    assert_eq!(error["error"]["code"], "shared_log_unavailable", "{error}");
}

#[tokio::test]
async fn a_client_is_its_key_not_its_position_in_a_list() {
    // M7: two instances with the same keys in another order share one Redis.
    let Some(redis) = Redis::start() else { return };
    let (url_a, url_c) = (redis.url.clone(), redis.url.clone());
    let a = TestApp::spawn_with(move |c| {
        c.redis_url = Some(url_a);
        c.api_keys = vec!["k1".into(), "k2".into()];
    })
    .await;
    let c = TestApp::spawn_with(move |c| {
        c.redis_url = Some(url_c);
        c.api_keys = vec!["k2".into(), "k1".into()];
    })
    .await;
    let id = stored_response(&a, "k1", 100).await;
    let path = format!("/v1/responses/{id}");
    let status = |key: &'static str| {
        let request = get(&c, Some(key), &path);
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    assert_eq!(
        status("k2").await,
        404,
        "another key read it on the other instance"
    );
    assert_eq!(
        status("k1").await,
        200,
        "its own key cannot read it on the other instance"
    );
    let deleted = c
        .http
        .delete(c.url(&path))
        .bearer_auth("k2")
        .send()
        .await
        .expect("answers");
    assert_eq!(deleted.status(), 404);
    assert_eq!(status("k1").await, 200);
}
