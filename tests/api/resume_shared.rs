//! Resumable streams across instances, through a real redis-server: a stream started on
//! instance A (the binary) resumes on instance B with exactly the rest, a cancel sent to B
//! closes A's upstream, and when A dies B's reader ends with `producer_lost`, not a hang.

use std::time::Instant;

use eventsource_stream::Event;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::shared::Redis;
use crate::startup::Running;
use crate::support::{DEADLINE, FakeUpstream, TestApp, all_events, chat_text, events, paced_reply};

/// Instance A: the binary, so that it can be killed.
fn instance_a(redis: &Redis, upstream: &FakeUpstream) -> Running {
    Running::start(&[
        ("SLUICE_REDIS_URL", &redis.url),
        ("OPENAI_BASE_URL", &upstream.base_url()),
        ("OPENAI_API_KEY", "sk-test"),
        ("SLUICE_IDLE_TIMEOUT_MS", "3000"),
    ])
}

/// Instance B, in this process.
async fn instance_b(redis: &Redis, upstream: &FakeUpstream) -> TestApp {
    let url = redis.url.clone();
    TestApp::in_front_of_with(upstream, move |c| {
        c.redis_url = Some(url);
        c.idle_timeout_ms = 3000;
    })
    .await
}

/// Starts a `/api/chat` stream on A, reads `n` events and drops it: the events and the id.
async fn start_on_a(a: &Running, model: &str, n: usize) -> (Vec<Event>, String) {
    let response = reqwest::Client::new()
        .post(a.url("/api/chat"))
        .json(&json!({"prompt": "Hi", "model": model}))
        .send()
        .await
        .expect("A answers");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-sluice-resumable")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let mut stream = events(response);
    let mut seen = Vec::new();
    while seen.len() < n {
        let event = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        seen.push(event);
    }
    (seen, id)
}

async fn a_stream_started_on_one_instance_resumes_on_another(redis: Redis) {
    let upstream = FakeUpstream::spawn().await;
    let a = instance_a(&redis, &upstream);
    let b = instance_b(&redis, &upstream).await;

    let (first, id) = start_on_a(&a, "paced", 6).await;
    let last = first.last().expect("events").id.clone();
    let resumed = b
        .http
        .get(b.url(&format!("/api/chat/{id}")))
        .header("last-event-id", &last)
        .send()
        .await
        .expect("B answers");
    assert_eq!(resumed.status(), 200);
    let rest = all_events(resumed).await;
    assert_eq!(rest.last().expect("an ending").event, "done");
    let mut all = first;
    all.extend(rest);
    let expected = paced_reply();
    assert_eq!(chat_text(&all), expected);
    let ids: Vec<u64> = all.iter().map(|e| e.id.parse().expect("id")).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    assert_eq!(upstream.requests().len(), 1, "generated once, on A");

    // Another client (another address would do; here an unknown id) sees nothing.
    let unknown = b
        .http
        .get(b.url("/api/chat/chat-00000000000000000000000000000000deadbeef"))
        .send()
        .await
        .expect("B answers");
    assert_eq!(unknown.status(), 404);
}

async fn a_cancel_sent_to_another_instance_closes_the_upstream(redis: Redis) {
    let upstream = FakeUpstream::spawn().await;
    let a = instance_a(&redis, &upstream);
    let b = instance_b(&redis, &upstream).await;
    // A stays attached to its stream: the cancel must travel, not wait for a grace period.
    let response = reqwest::Client::new()
        .post(a.url("/api/chat"))
        .json(&json!({"prompt": "Hi", "model": "slow"}))
        .send()
        .await
        .expect("A answers");
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let mut stream = events(response);
    stream.next().await.expect("meta");
    upstream.request(1).await;
    let asked = Instant::now();
    let answer = b
        .http
        .post(b.url(&format!("/api/chat/{id}/cancel")))
        .send()
        .await
        .expect("B answers");
    assert_eq!(answer.status(), 200);
    let closed = upstream.closed(1).await;
    eprintln!(
        "cancel on B → A's upstream closed after {:?}",
        closed.saturating_duration_since(asked)
    );
    let rest: Vec<Event> = tokio::time::timeout(DEADLINE, stream.collect())
        .await
        .expect("A's stream ends");
    assert!(
        rest.last()
            .expect("an ending")
            .data
            .contains("stream_cancelled")
    );
    // Once its end is in Redis, a resume on B is what it is on A: 409, nothing to follow.
    let started = Instant::now();
    loop {
        let resumed = b
            .http
            .get(b.url(&format!("/api/chat/{id}?last_event_id=0")))
            .send()
            .await
            .expect("B answers");
        if resumed.status() == 409 {
            let body: serde_json::Value = resumed.json().await.expect("JSON");
            assert_eq!(body["error"]["code"], "stream_cancelled");
            break;
        }
        // Before the end marker lands, the log is replayed to its cancelled ending.
        assert_eq!(resumed.status(), 200);
        assert!(
            resumed
                .text()
                .await
                .expect("a body")
                .contains("stream_cancelled")
        );
        assert!(started.elapsed() < DEADLINE, "no 409 within {DEADLINE:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn when_the_producing_instance_dies_readers_elsewhere_get_producer_lost(redis: Redis) {
    let upstream = FakeUpstream::spawn().await;
    let mut a = instance_a(&redis, &upstream);
    let b = instance_b(&redis, &upstream).await;
    let (first, id) = start_on_a(&a, "slow", 4).await;
    let last = first.last().expect("events").id.clone();
    let resumed = b
        .http
        .get(b.url(&format!("/api/chat/{id}")))
        .header("last-event-id", &last)
        .send()
        .await
        .expect("B answers");
    assert_eq!(resumed.status(), 200);
    let mut follow = events(resumed);
    // B follows live events from A...
    let live = tokio::time::timeout(DEADLINE, follow.next())
        .await
        .expect("a live event")
        .expect("event");
    assert_eq!(live.event, "token");
    // ...until A is killed.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let killed = Instant::now();
    let rest: Vec<Event> = tokio::time::timeout(DEADLINE * 2, follow.collect())
        .await
        .expect("B's reader ends, it does not hang");
    let ending = rest.last().expect("an ending");
    assert_eq!(ending.event, "error");
    assert!(ending.data.contains("producer_lost"), "{}", ending.data);
    let after = killed.elapsed();
    eprintln!("producer_lost {after:?} after A died (idle timeout 3 s)");
    // Its heartbeat key expires within a third of the idle timeout, and must then stay
    // missing for as long again (a failover may let it lapse for a moment).
    assert!(after.as_millis() < 3000 + 1500, "{after:?}");
}

/// Redis loses entries a stream had logged (a primary's last writes not yet on its
/// replica when it died; here, the log deleted under the running stream): a reader on
/// another instance is told `stream_events_lost`, never a silent gap, while the
/// producing instance still has every event.
async fn entries_redis_lost_are_never_skipped_in_silence(redis: Redis) {
    let upstream = FakeUpstream::spawn().await;
    let a = instance_a(&redis, &upstream);
    let b = instance_b(&redis, &upstream).await;
    let (first, id) = start_on_a(&a, "paced", 4).await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("sluice:{{{id}}}:log"))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let last = first.last().expect("events").id.clone();
    let resumed = b
        .http
        .get(b.url(&format!("/api/chat/{id}")))
        .header("last-event-id", &last)
        .send()
        .await
        .expect("B answers");
    let rest = if resumed.status() == 200 {
        tokio::time::timeout(DEADLINE * 2, all_events(resumed))
            .await
            .expect("B's reader ends")
    } else {
        panic!("B answered {}", resumed.status());
    };
    let ending = rest.last().expect("an ending");
    assert_eq!(ending.event, "error", "{rest:?}");
    assert!(
        ending.data.contains("stream_events_lost"),
        "{}",
        ending.data
    );
    let ids: Vec<u64> = first
        .iter()
        .chain(&rest[..rest.len() - 1])
        .map(|e| e.id.parse().expect("id"))
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "no gap before it"
    );
    // A, the producer, has it all.
    let whole = reqwest::Client::new()
        .get(a.url(&format!("/api/chat/{id}")))
        .header("last-event-id", "0")
        .send()
        .await
        .expect("A answers");
    assert_eq!(chat_text(&all_events(whole).await), paced_reply());
}

async fn a_background_response_started_on_one_instance_is_read_on_another(redis: Redis) {
    let upstream = FakeUpstream::spawn().await;
    let a = instance_a(&redis, &upstream);
    let b = instance_b(&redis, &upstream).await;
    let http = reqwest::Client::new();
    let queued: Value = http
        .post(a.url("/v1/responses"))
        .json(&json!({"model": "paced", "input": "Hi", "background": true}))
        .send()
        .await
        .expect("A answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(queued["status"], "queued");
    let id = queued["id"].as_str().expect("id");
    // On B: its events from sequence number 2 on, as A produces them, to the end.
    let stream = b
        .http
        .get(b.url(&format!("/v1/responses/{id}?stream=true&starting_after=2")))
        .send()
        .await
        .expect("B answers");
    assert_eq!(stream.status(), 200);
    let events = all_events(stream).await;
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("JSON"))
        .collect();
    assert_eq!(data[0]["sequence_number"], 3);
    assert_eq!(data.last().expect("end")["type"], "response.completed");
    let text: String = data
        .iter()
        .filter(|d| d["type"] == "response.output_text.delta")
        .filter_map(|d| d["delta"].as_str())
        .collect();
    let expected = paced_reply();
    assert!(expected.ends_with(&text) && text.len() > 10, "{text}");
    // And the finished response object, on B, from Redis.
    let done = b.get_json(&format!("/v1/responses/{id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"][0]["content"][0]["text"], json!(expected));
    assert_eq!(upstream.requests().len(), 1);
}

crate::shared::on_one_server_and_a_cluster!(
    a_stream_started_on_one_instance_resumes_on_another,
    a_cancel_sent_to_another_instance_closes_the_upstream,
    when_the_producing_instance_dies_readers_elsewhere_get_producer_lost,
    a_background_response_started_on_one_instance_is_read_on_another,
    entries_redis_lost_are_never_skipped_in_silence,
);
