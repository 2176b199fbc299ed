//! Resumable streams, over real sockets: a client that drops and comes back with
//! `Last-Event-ID` gets exactly the rest, the upstream is asked once, and a stream nobody
//! comes back to (or that is cancelled) closes the upstream's connection.

use std::time::{Duration, Instant};

use eventsource_stream::Event;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{
    DEADLINE, FakeUpstream, TestApp, all_events, chat_text, content, events, paced_reply, payloads,
};

fn chat_body(model: &str) -> Value {
    json!({"prompt": "Hi", "model": model})
}

fn completion_body(model: &str) -> Value {
    json!({"model": model, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hi"}]})
}

fn ids(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.id.parse().expect("every event has a numeric id"))
        .collect()
}

/// Reads events until `stop` says so, then drops the connection; what was read.
async fn read_then_drop(
    response: reqwest::Response,
    stop: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut stream = events(response);
    let mut seen = Vec::new();
    while !stop(&seen) {
        let event = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        seen.push(event);
    }
    seen
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII").to_owned())
}

async fn resume(app: &TestApp, path: &str, last: u64) -> reqwest::Response {
    app.http
        .get(app.url(path))
        .header("last-event-id", last.to_string())
        .send()
        .await
        .expect("answers")
}

#[tokio::test]
async fn a_dropped_chat_stream_resumes_with_exactly_the_rest_and_is_billed_once() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app.post("/api/chat", &chat_body("paced")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-sluice-resumable").as_deref(),
        Some("true")
    );
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    let first = read_then_drop(response, |seen| {
        seen.iter().filter(|e| e.event == "token").count() == 5
    })
    .await;
    let last: u64 = first.last().expect("events").id.parse().expect("id");

    let resumed = resume(&app, &format!("/api/chat/{id}"), last).await;
    assert_eq!(resumed.status(), 200);
    let rest = all_events(resumed).await;
    assert_eq!(rest.last().expect("an ending").event, "done");

    let mut all = first.clone();
    all.extend(rest);
    assert_eq!(
        chat_text(&all),
        paced_reply(),
        "joined text = the uninterrupted reply"
    );
    let numbers = ids(&all);
    assert_eq!(
        numbers,
        (1..=numbers.len() as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    assert_eq!(upstream.requests().len(), 1, "the upstream was asked once");
    // Billed once, for what the upstream reported (5), however many times it was read.
    // (An unlisted upstream model is labelled `other`.)
    app.wait_metric("sluice_active_streams", 0.0).await;
    assert_eq!(
        app.metric("sluice_completion_tokens_total{model=\"other\"}")
            .await,
        5.0
    );
    assert_eq!(
        app.metric("sluice_chat_requests_total{outcome=\"completed\"}")
            .await,
        1.0
    );
    assert_eq!(app.metric("sluice_stream_resumes_total").await, 1.0);
}

#[tokio::test]
async fn a_stream_resumes_from_before_its_first_token_and_after_its_end() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app.post("/api/chat", &chat_body("paced")).await;
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    // Only the `meta` event: no token yet.
    let first = read_then_drop(response, |seen| !seen.is_empty()).await;
    assert_eq!(first[0].event, "meta");
    assert_eq!(first[0].id, "1");
    let rest = all_events(resume(&app, &format!("/api/chat/{id}"), 1).await).await;
    assert_eq!(chat_text(&rest), paced_reply());
    let done = rest.last().expect("an ending").clone();
    assert_eq!(done.event, "done");

    // After the end: the events after the cursor, and the same ending.
    let total: u64 = done.id.parse().expect("id");
    let replay = all_events(resume(&app, &format!("/api/chat/{id}"), total - 3).await).await;
    assert_eq!(ids(&replay), vec![total - 2, total - 1, total]);
    assert_eq!(replay.last().expect("ending").data, done.data);
    // From the start, with the query parameter a first EventSource connection can use.
    let whole = app
        .http
        .get(app.url(&format!("/api/chat/{id}?last_event_id=0")))
        .send()
        .await
        .expect("answers");
    let whole = all_events(whole).await;
    assert_eq!(whole[0].event, "meta");
    assert_eq!(chat_text(&whole), paced_reply());
    // Nothing left: 204, which tells an EventSource to stop reconnecting.
    let none = resume(&app, &format!("/api/chat/{id}"), total).await;
    assert_eq!(none.status(), 204);
    // A cursor past the end is the client's mistake.
    let beyond = resume(&app, &format!("/api/chat/{id}"), total + 5).await;
    assert_eq!(beyond.status(), 400);
    let error: Value = beyond.json().await.expect("JSON");
    assert_eq!(error["error"]["param"], "Last-Event-ID", "{error}");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn a_cursor_ahead_of_a_running_stream_waits_for_its_events() {
    // A client that raced the producer (a background response read from a sequence number
    // it has not reached yet) is not refused: it gets the events after its cursor.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app.post("/api/chat", &chat_body("paced")).await;
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    let first = read_then_drop(response, |seen| !seen.is_empty()).await;
    assert_eq!(first[0].id, "1");
    let ahead = resume(&app, &format!("/api/chat/{id}"), 20).await;
    assert_eq!(ahead.status(), 200);
    let rest = all_events(ahead).await;
    assert_eq!(rest[0].id, "21", "{rest:?}");
    assert_eq!(rest.last().expect("an ending").event, "done");
}

#[tokio::test]
async fn two_readers_follow_one_stream_at_once() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app.post("/api/chat", &chat_body("paced")).await;
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    let second = app
        .http
        .get(app.url(&format!("/api/chat/{id}")))
        .send()
        .await
        .expect("answers");
    let (a, b) = tokio::join!(all_events(response), all_events(second));
    assert_eq!(chat_text(&a), paced_reply());
    assert_eq!(chat_text(&b), paced_reply());
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn a_resumable_openai_stream_resumes_in_openai_format_and_assembles_when_done() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .header("x-sluice-resumable", "true")
        .json(&completion_body("paced"))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        header(&response, "x-sluice-resumable").as_deref(),
        Some("true")
    );
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    let first = read_then_drop(response, |seen| seen.len() == 4).await;
    assert_eq!(payloads(&first)[0]["id"], json!(id));

    // While it runs, the assembled reply is not there yet: 409 in OpenAI's shape.
    let running = app
        .http
        .get(app.url(&format!("/v1/chat/completions/{id}")))
        .send()
        .await
        .expect("answers");
    assert_eq!(running.status(), 409);
    let body: Value = running.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "stream_running");

    let rest = app
        .http
        .get(app.url(&format!(
            "/v1/chat/completions/{id}?stream=true&starting_after=4"
        )))
        .send()
        .await
        .expect("answers");
    assert_eq!(rest.status(), 200);
    let rest = all_events(rest).await;
    let mut all = first.clone();
    all.extend(rest);
    let all_payloads = payloads(&all);
    assert_eq!(content(&all_payloads), paced_reply());
    assert_eq!(all_payloads.last(), Some(&json!("[DONE]")));
    let usage = &all_payloads[all_payloads.len() - 2];
    assert_eq!(
        usage["usage"]["completion_tokens"], 5,
        "the upstream's own usage chunk"
    );
    assert_eq!(ids(&all), (1..=all.len() as u64).collect::<Vec<_>>());

    let assembled: Value = app
        .http
        .get(app.url(&format!("/v1/chat/completions/{id}")))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(assembled["object"], "chat.completion");
    assert_eq!(assembled["id"], json!(id));
    assert_eq!(
        assembled["choices"][0]["message"]["content"],
        json!(paced_reply())
    );
    assert_eq!(assembled["choices"][0]["finish_reason"], "stop");
    assert_eq!(assembled["usage"]["total_tokens"], 16);
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_not_asked_to_be_resumable_still_closes_its_upstream_on_drop() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app
        .post("/v1/chat/completions", &completion_body("slow"))
        .await;
    assert_eq!(header(&response, "x-sluice-resumable"), None);
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    let dropped = Instant::now();
    drop(read_then_drop(response, |seen| seen.len() == 3).await);
    let closed = upstream.closed(1).await;
    eprintln!(
        "upstream closed {:?} after the drop",
        closed.saturating_duration_since(dropped)
    );
    // And nothing can be resumed.
    let gone = resume(&app, &format!("/v1/chat/completions/{id}?stream=true"), 3).await;
    assert_eq!(gone.status(), 404);
}

#[tokio::test]
async fn a_stream_nobody_comes_back_to_is_cancelled_after_the_grace_period() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| c.resume_grace_s = 0.5).await;
    let response = app.post("/api/chat", &chat_body("slow")).await;
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    drop(read_then_drop(response, |seen| seen.len() == 3).await);
    let dropped = Instant::now();
    // Still generating during the grace period...
    app.wait_metric("sluice_streams_detached_total", 1.0).await;
    assert!(upstream.is_open(1));
    // ...then dropped: the upstream sees its connection close.
    let closed = upstream.closed(1).await;
    let after = closed.saturating_duration_since(dropped);
    assert!(
        after >= Duration::from_millis(400),
        "closed {after:?} after the drop: before the grace period ended"
    );
    app.wait_metric("sluice_stream_grace_expired_total", 1.0)
        .await;
    app.wait_metric("sluice_active_streams", 0.0).await;
    // A late reader gets what was logged and the same ending: cancelled.
    let late = all_events(resume(&app, &format!("/api/chat/{id}"), 0).await).await;
    let ending = late.last().expect("an ending");
    assert_eq!(ending.event, "error");
    assert!(ending.data.contains("stream_cancelled"), "{}", ending.data);
}

#[tokio::test]
async fn a_reader_that_comes_back_in_time_keeps_the_stream_going() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| c.resume_grace_s = 5.0).await;
    let response = app.post("/api/chat", &chat_body("paced")).await;
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    let first = read_then_drop(response, |seen| seen.len() == 3).await;
    app.wait_metric("sluice_streams_detached_total", 1.0).await;
    let rest = all_events(resume(&app, &format!("/api/chat/{id}"), 3).await).await;
    let mut all = first;
    all.extend(rest);
    assert_eq!(chat_text(&all), paced_reply());
    assert_eq!(all.last().expect("end").event, "done");
    assert_eq!(app.metric("sluice_stream_grace_expired_total").await, 0.0);
}

#[tokio::test]
async fn cancel_closes_the_upstream_at_once_on_both_routes() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    for (n, (post, path)) in [
        ("/api/chat", "/api/chat"),
        ("/v1/chat/completions", "/v1/chat/completions"),
    ]
    .into_iter()
    .enumerate()
    {
        let request = app
            .http
            .post(app.url(post))
            .header("x-sluice-resumable", "true");
        let body = if post == "/api/chat" {
            chat_body("slow")
        } else {
            completion_body("slow")
        };
        let response = request.json(&body).send().await.expect("answers");
        let id = header(&response, "x-sluice-stream-id").expect("a stream id");
        // The client is still attached: a cancel does not wait for anyone to leave.
        let mut stream = events(response);
        stream.next().await.expect("a first event");
        let asked = Instant::now();
        let answer = app
            .http
            .post(app.url(&format!("{path}/{id}/cancel")))
            .send()
            .await
            .expect("answers");
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().await.expect("JSON");
        assert_eq!(body["status"], "cancelled");
        let closed = upstream.closed(n + 1).await;
        eprintln!(
            "{path}: upstream closed {:?} after the cancel call",
            closed.saturating_duration_since(asked)
        );
        // The attached client sees the stream end as cancelled, not as a success.
        let rest: Vec<Event> = tokio::time::timeout(DEADLINE, stream.collect())
            .await
            .expect("the stream ends");
        let last = rest.last().expect("an ending");
        assert!(last.data.contains("stream_cancelled"), "{}", last.data);
        assert!(!rest.iter().any(|e| e.data == "[DONE]" || e.event == "done"));
        // Resuming a cancelled stream is a conflict, not a 200 with one error event.
        let again = app
            .http
            .get(app.url(&format!("{path}/{id}?stream=true")))
            .header("last-event-id", "1")
            .send()
            .await
            .expect("answers");
        assert_eq!(again.status(), 409);
        let error: Value = again.json().await.expect("JSON");
        assert_eq!(error["error"]["code"], "stream_cancelled", "{error}");
    }
    app.wait_metric("sluice_stream_cancels_total", 2.0).await;
}

#[tokio::test]
async fn only_the_owner_may_read_or_cancel_a_stream() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.api_keys = vec!["sk-alice".into(), "sk-bob".into()];
    })
    .await;
    let response = app
        .http
        .post(app.url("/api/chat"))
        .bearer_auth("sk-alice")
        .json(&chat_body("paced"))
        .send()
        .await
        .expect("answers");
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    let unknown = "chat-0123456789abcdef0123456789abcdef01234567";
    let huge = "x".repeat(4000);
    for (key, target) in [
        ("sk-bob", id.as_str()),
        ("sk-alice", unknown),
        ("sk-alice", "a}b{c"),
        ("sk-alice", huge.as_str()),
    ] {
        for (method, path) in [
            ("GET", format!("/api/chat/{target}")),
            ("POST", format!("/api/chat/{target}/cancel")),
            ("GET", format!("/v1/chat/completions/{target}?stream=true")),
        ] {
            let answer = app
                .http
                .request(method.parse().expect("method"), app.url(&path))
                .bearer_auth(key)
                .send()
                .await
                .expect("answers");
            assert_eq!(answer.status(), 404, "{key} {method} {path}");
            let body: Value = answer.json().await.expect("JSON");
            assert_eq!(body["error"]["code"], "stream_not_found");
        }
    }
    // Without a key at all: 401, as on every route.
    let anonymous = app
        .http
        .get(app.url(&format!("/api/chat/{id}")))
        .send()
        .await
        .expect("answers");
    assert_eq!(anonymous.status(), 401);
    // The owner reads it whole, and Bob's attempts changed nothing.
    let own = app
        .http
        .get(app.url(&format!("/api/chat/{id}")))
        .bearer_auth("sk-alice")
        .send()
        .await
        .expect("answers");
    assert_eq!(chat_text(&all_events(own).await), paced_reply());
    assert_eq!(chat_text(&all_events(response).await), paced_reply());
}

#[tokio::test]
async fn a_finished_stream_is_forgotten_after_its_ttl() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| c.resume_ttl_s = 0.3).await;
    let response = app.post("/api/chat", &chat_body("gpt-test")).await;
    let id = header(&response, "x-sluice-stream-id").expect("a stream id");
    all_events(response).await;
    let started = Instant::now();
    loop {
        let answer = resume(&app, &format!("/api/chat/{id}"), 0).await;
        if answer.status() == 404 {
            let body: Value = answer.json().await.expect("JSON");
            assert_eq!(body["error"]["code"], "stream_not_found");
            break;
        }
        assert_eq!(answer.status(), 200);
        assert!(
            started.elapsed() < DEADLINE,
            "still readable long after its TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.wait_metric("sluice_stream_log_bytes", 0.0).await;
}

#[tokio::test]
async fn past_the_memory_cap_new_streams_are_served_without_resumption() {
    let upstream = FakeUpstream::spawn().await;
    // Room for about one log of a short reply.
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.resume_memory_mb = 0.0015;
        c.resume_client_share = 1.0;
    })
    .await;
    let held = app.post("/api/chat", &chat_body("slow")).await;
    assert_eq!(header(&held, "x-sluice-resumable").as_deref(), Some("true"));
    let mut held = events(held);
    // Let its log fill until no other log fits beside it (a log's entry is 1 KiB; a log
    // being read keeps within the cap by dropping its oldest events).
    let mut n = 0;
    while app.metric("sluice_stream_log_bytes").await < 0.0015 * 1024.0 * 1024.0 - 1000.0 {
        held.next().await.expect("events");
        n += 1;
        assert!(n < 200, "the log never grew");
    }
    let second = app.post("/api/chat", &chat_body("gpt-test")).await;
    assert_eq!(second.status(), 200);
    assert_eq!(
        header(&second, "x-sluice-resumable").as_deref(),
        Some("false")
    );
    let second = all_events(second).await;
    assert_eq!(chat_text(&second), "Hello from the fake upstream");
    assert_eq!(
        app.metric("sluice_streams_not_resumable_total{reason=\"memory\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_detached_producer_pauses_at_its_log_cap_instead_of_buffering() {
    let upstream = FakeUpstream::spawn().await;
    // A 1 MiB budget: 128 KiB per stream.
    let app = TestApp::in_front_of_with(&upstream, |c| c.resume_memory_mb = 1.0).await;
    let response = app.post("/api/chat", &chat_body("flood")).await;
    drop(read_then_drop(response, |seen| seen.len() == 2).await);
    app.wait_metric_at_least("sluice_stream_log_bytes", 128.0 * 1024.0)
        .await;
    // Wait until the upstream has stopped being read (its sent count stands still).
    let started = Instant::now();
    let mut last = upstream.sent_bytes();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = upstream.sent_bytes();
        if now == last {
            break;
        }
        last = now;
        assert!(
            started.elapsed() < DEADLINE * 4,
            "the upstream is still being read"
        );
    }
    let log = app.metric("sluice_stream_log_bytes").await;
    eprintln!("paused: log {log} bytes, upstream sent {last} of 64 MiB");
    assert!(log < 256.0 * 1024.0, "the log stays near its cap: {log}");
    assert!(
        last < 32 * 1024 * 1024,
        "the upstream was read without bound: {last}"
    );
    assert!(
        upstream.is_open(1),
        "paused, not cancelled, during the grace period"
    );
}
