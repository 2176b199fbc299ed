//! A Redis Cluster loses a primary while streams run: meanwhile each instance follows
//! `SLUICE_REDIS_FAILURE` (open: its own limits, counted; closed: 503), then returns to
//! shared mode by itself, holds no leaked permit, and no resumable stream loses an event
//! without saying so, on the instance producing it or on another one following it.

use std::time::{Duration, Instant};

use eventsource_stream::Event;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::shared::Redis;
use crate::support::{DEADLINE, TestApp, events};

/// The key whose slot holds the limits of the clients here (127.0.0.1, with no key): the
/// primary killed is the one serving it.
fn limits() -> String {
    sluice::admission::shared::shard_streams(sluice::admission::shared::shard("127.0.0.1"))
}
const STREAMS: usize = 12;
const MAX_STREAMS: u32 = 30;

async fn instance(redis: &Redis, failure: &str) -> TestApp {
    let (url, failure) = (redis.url.clone(), failure.to_owned());
    TestApp::spawn_with(move |c| {
        c.redis_url = Some(url);
        c.redis_failure = failure;
        c.mock_tokens_per_s = 10.0;
        c.max_streams = MAX_STREAMS;
        c.idle_timeout_ms = 10_000;
    })
    .await
}

fn chat(max_tokens: u32) -> Value {
    json!({"prompt": "Hi", "model": "mock", "max_tokens": max_tokens})
}

/// Every event of a stream, read to its end.
async fn read_all(response: reqwest::Response) -> Vec<Event> {
    let mut stream = events(response);
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(DEADLINE * 6, stream.next())
        .await
        .expect("an event (or the end) in time")
    {
        let last = event.event == "done" || event.event == "error";
        seen.push(event);
        if last {
            break;
        }
    }
    seen
}

fn error_code(event: &Event) -> Option<String> {
    let body: Value = serde_json::from_str(&event.data).ok()?;
    body["error"]["code"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn a_primary_killed_while_streams_run_is_ridden_out() {
    let Some(mut redis) = Redis::cluster() else {
        return;
    };
    let open = instance(&redis, "open").await;
    let closed = instance(&redis, "closed").await;

    // Streams produced on `open`, each read there to its end and followed from Redis on
    // `closed` from its first event: about six seconds each, across the failover.
    let mut producers = Vec::new();
    let mut followers = Vec::new();
    for _ in 0..STREAMS {
        let response = open.post("/api/chat", &chat(60)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-resumable"], "true");
        let id = response.headers()["x-sluice-stream-id"]
            .to_str()
            .expect("id")
            .to_owned();
        let follower = closed
            .http
            .get(closed.url(&format!("/api/chat/{id}")))
            .header("last-event-id", "0")
            .send()
            .await
            .expect("closed answers");
        assert_eq!(follower.status(), 200, "followed from Redis");
        producers.push(tokio::spawn(read_all(response)));
        followers.push(tokio::spawn(read_all(follower)));
    }

    let dead = redis
        .primary_of(&limits())
        .expect("a primary serves the limits");
    redis.kill_node(dead);

    // During the failover: `open` admits on its own limits and counts the failure; `closed`
    // refuses with 503 and a time to retry.
    let response = open
        .post(
            "/v1/chat/completions",
            &json!({"model": "mock",
        "stream": true, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    drop(response);
    assert!(open.metric("sluice_redis_errors_total").await >= 1.0);
    let response = closed.post("/api/chat", &chat(2)).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));

    // A replica takes over; `closed` admits again by itself, through Redis.
    redis.wait_failover(&limits(), dead).await;
    let started = Instant::now();
    loop {
        let response = closed.post("/api/chat", &chat(2)).await;
        if response.status() == 200 {
            read_all(response).await;
            break;
        }
        assert_eq!(response.status(), 503);
        assert!(
            started.elapsed() < DEADLINE * 4,
            "never back to shared mode"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let errors = closed.metric("sluice_redis_errors_total").await;
    for _ in 0..3 {
        let response = closed.post("/api/chat", &chat(2)).await;
        assert_eq!(response.status(), 200);
        read_all(response).await;
    }
    assert_eq!(closed.metric("sluice_redis_errors_total").await, errors);

    // Each stream, as its producer sent it and as Redis gave it to the follower: the same
    // events, or a follower told `stream_events_lost` after an unbroken prefix.
    for (producer, follower) in producers.into_iter().zip(followers) {
        let produced = producer.await.expect("the producer's reader");
        let followed = follower.await.expect("the follower");
        assert_eq!(produced.last().map(|e| e.event.as_str()), Some("done"));
        let last = followed.last().expect("the follower got events");
        if last.event == "error" {
            assert_eq!(error_code(last).as_deref(), Some("stream_events_lost"));
            let prefix = &followed[..followed.len() - 1];
            assert_eq!(
                prefix.iter().map(|e| (&e.id, &e.data)).collect::<Vec<_>>(),
                produced[..prefix.len()]
                    .iter()
                    .map(|e| (&e.id, &e.data))
                    .collect::<Vec<_>>(),
            );
        } else {
            assert_eq!(
                followed
                    .iter()
                    .map(|e| (&e.id, &e.data))
                    .collect::<Vec<_>>(),
                produced
                    .iter()
                    .map(|e| (&e.id, &e.data))
                    .collect::<Vec<_>>(),
                "a follower on another instance got exactly what was produced"
            );
        }
    }

    // No permit leaked: once every stream has ended, Redis holds none of them (released,
    // or expired within the permit lease)...
    let mut conn = redis.connection().await;
    let started = Instant::now();
    loop {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .expect("TIME");
        let live: u64 = redis::cmd("ZCOUNT")
            .arg(limits())
            .arg(secs * 1000 + micros / 1000)
            .arg("+inf")
            .query_async(&mut conn)
            .await
            .expect("ZCOUNT");
        if live == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "{live} permits outlived their streams"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and the shared cap is exact: every slot of it usable and no more, across both
    // instances (streams that stall after one token hold theirs).
    let mut held = Vec::new();
    for i in 0..MAX_STREAMS {
        let app = if i % 2 == 0 { &open } else { &closed };
        let response = app.post("/api/chat", &stalled()).await;
        assert_eq!(response.status(), 200, "stream {i} of {MAX_STREAMS}");
        held.push(response);
    }
    let refused = closed.post("/api/chat", &stalled()).await;
    assert_eq!(refused.status(), 429, "the cap holds across instances");
    let refused = open.post("/api/chat", &stalled()).await;
    assert_eq!(refused.status(), 429, "the cap holds across instances");
}

fn stalled() -> Value {
    json!({"prompt": "Hi", "model": "mock-stall"})
}
