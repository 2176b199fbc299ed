//! Fault injection: every way an upstream or a client can misbehave ends in a bounded,
//! readable failure, and afterwards nothing is left open (asserted on /metrics: no active
//! stream, no backend call in flight). Also the limits that catch them (connect, first
//! token, idle, total, slow client), fallbacks before the first byte, and the request id
//! reaching the upstream.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    DEADLINE, FakeUpstream, TestApp, all_events, config_file, free_port, payloads,
};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]})
}

/// Nothing left open: no stream in sluice, no call to a backend.
async fn settled(app: &TestApp) {
    app.wait_metric("sluice_active_streams", 0.0).await;
    app.wait_metric("sluice_upstream_requests_in_flight", 0.0)
        .await;
}

/// What a client sees of one request: the status, and the error it was told of (from the
/// body, or from the stream's error event), if any.
async fn outcome(app: &TestApp, model: &str, stream: bool) -> (u16, Option<Value>) {
    let response = app.post("/v1/chat/completions", &chat(model, stream)).await;
    let status = response.status().as_u16();
    if status != 200 {
        let body: Value = response.json().await.expect("an error body in JSON");
        return (status, Some(body["error"].clone()));
    }
    if !stream {
        let body: Value = response.json().await.expect("a completion");
        return (status, body.get("error").cloned());
    }
    let events = payloads(&all_events(response).await);
    let error = events.iter().find_map(|e| e.get("error").cloned());
    if error.is_none() {
        assert_eq!(
            events.last(),
            Some(&json!("[DONE]")),
            "{model}: ended neither with [DONE] nor an error"
        );
    }
    (status, error)
}

#[tokio::test]
async fn every_upstream_fault_fails_readably_and_leaves_nothing_open() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.first_token_timeout_ms = 300;
        c.idle_timeout_ms = 300;
    })
    .await;
    // (model, status before the first token, error code the client is told)
    let faults = [
        ("status-500", 502, "upstream_failed"),
        ("status-429", 429, "rate_limit_exceeded"),
        ("hang-headers", 504, "upstream_timeout"),
        ("hang-body", 504, "upstream_timeout"),
        ("stall", 200, "upstream_timeout"),
        ("abort", 200, "upstream_failed"),
        ("midstream-error", 200, "upstream_failed"),
        ("garbage", 200, "upstream_failed"),
        ("no-finish", 200, "upstream_failed"),
    ];
    let mut requests = 0.0;
    for stream in [true, false] {
        for (model, status, code) in faults {
            let (got, error) = outcome(&app, model, stream).await;
            requests += 1.0;
            // Not streamed, a failure at any point is the request's status.
            let want = match (stream, status, code) {
                (false, 200, "upstream_timeout") => 504,
                (false, 200, _) => 502,
                _ => status,
            };
            assert_eq!(got, want, "{model} (stream: {stream}): {error:?}");
            let error = error.unwrap_or_else(|| panic!("{model}: no error reported"));
            assert_eq!(error["code"], code, "{model} (stream: {stream})");
            settled(&app).await;
        }
    }
    let failed = app
        .metric("sluice_chat_requests_total{outcome=\"upstream_error\"}")
        .await
        + app
            .metric("sluice_chat_requests_total{outcome=\"timed_out\"}")
            .await;
    assert_eq!(failed, requests);
}

#[tokio::test]
async fn a_refused_connection_fails_at_once_and_leaves_nothing_open() {
    let port = free_port();
    let app = TestApp::spawn_with(|c| {
        c.openai_base_url = Some(format!("http://127.0.0.1:{port}/v1"));
    })
    .await;
    for stream in [true, false] {
        let (status, error) = outcome(&app, "gpt-test", stream).await;
        assert_eq!(status, 502);
        assert_eq!(error.expect("an error")["code"], "upstream_failed");
        settled(&app).await;
    }
}

#[tokio::test]
async fn a_connection_that_is_never_accepted_hits_the_connect_limit() {
    // A listener whose backlog is full: the kernel drops further SYNs, so a connect hangs.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind port 0");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    let filled = loop {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => panic!("connect failed instead of waiting: {e}"),
            Err(_) => break true,
        }
        if held.len() > 64 {
            break false;
        }
    };
    assert!(filled, "the backlog never filled");
    let app = TestApp::spawn_with(|c| {
        c.openai_base_url = Some(format!("http://{addr}/v1"));
        c.connect_timeout_ms = 300;
    })
    .await;
    let (status, error) = outcome(&app, "gpt-test", true).await;
    assert_eq!(status, 504);
    let error = error.expect("an error");
    assert_eq!(error["code"], "upstream_timeout");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("connection"),
        "{error}"
    );
    settled(&app).await;
    assert_eq!(
        app.metric("sluice_chat_requests_total{outcome=\"timed_out\"}")
            .await,
        1.0
    );
    drop(listener);
}

#[tokio::test]
async fn a_reply_longer_than_the_total_limit_ends_with_a_timeout_event() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.total_timeout_ms = 400;
    })
    .await;
    // "slow" sends a token every 50 ms for 10 s: never idle, but far too long.
    let response = app.post("/v1/chat/completions", &chat("slow", true)).await;
    assert_eq!(response.status(), 200);
    let events = payloads(&all_events(response).await);
    let tokens = events
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"].is_string())
        .count();
    assert!(tokens > 2, "tokens flowed before the limit: {tokens}");
    let last = events.last().expect("events");
    assert_eq!(last["error"]["code"], "upstream_timeout", "{last}");
    assert!(!events.contains(&json!("[DONE]")));
    upstream.closed(1).await;
    settled(&app).await;
    assert_eq!(
        app.metric("sluice_chat_requests_total{outcome=\"timed_out\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_request_id_reaches_the_upstream_and_comes_back() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .header("x-request-id", "req-from-the-client")
        .json(&chat("gpt-test", true))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.headers()["x-request-id"], "req-from-the-client");
    all_events(response).await;
    let seen = upstream.request(1).await;
    assert_eq!(seen.request_id.as_deref(), Some("req-from-the-client"));

    // Made by sluice when the client sends none: the same id both ways.
    let response = app
        .post("/v1/chat/completions", &chat("gpt-test", false))
        .await;
    let id = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    response.bytes().await.expect("body");
    assert_eq!(upstream.request(2).await.request_id, Some(id));
}

#[tokio::test]
async fn fallbacks_are_tried_in_order_only_before_the_first_byte() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let config = config_file(&format!(
        r#"
[models.chain]
base_url = "{dead}"
fallbacks = [
  {{ base_url = "{base}", model = "status-500" }},
  {{ base_url = "{base}", model = "status-429" }},
  {{ base_url = "{base}", model = "hang-headers" }},
  {{ base_url = "{base}", model = "gpt-test" }},
]

[models.late]
base_url = "{base}"
model = "midstream-error"
fallbacks = [{{ base_url = "{base}", model = "gpt-test" }}]

[models.refused]
base_url = "{base}"
model = "status-400"
fallbacks = [{{ base_url = "{base}", model = "gpt-test" }}]
"#
    ));
    let app = TestApp::spawn_with(|c| {
        c.config = Some(config);
        c.first_token_timeout_ms = 300;
    })
    .await;

    // Four upstreams fail before the first token; the fifth answers.
    let (status, error) = outcome(&app, "chain", true).await;
    assert_eq!((status, error), (200, None));
    let models: Vec<Value> = upstream
        .requests()
        .iter()
        .map(|s| s.body["model"].clone())
        .collect();
    assert_eq!(
        models,
        [
            json!("status-500"),
            json!("status-429"),
            json!("hang-headers"),
            json!("gpt-test")
        ]
    );
    // The upstream that sent nothing in time was let go.
    upstream.closed(3).await;
    for reason in [
        "unreachable",
        "server_error",
        "rate_limited",
        "first_token_timeout",
    ] {
        let series = format!(
            "sluice_upstream_fallbacks_total{{model=\"{}\",reason=\"{reason}\"}}",
            match reason {
                "unreachable" => "chain",
                "server_error" => "status-500",
                "rate_limited" => "status-429",
                _ => "hang-headers",
            }
        );
        assert_eq!(app.metric(&series).await, 1.0, "{series}");
    }

    // After the first token, a failure is the client's to see: no second upstream.
    let (status, error) = outcome(&app, "late", true).await;
    assert_eq!(status, 200);
    assert_eq!(error.expect("an error event")["code"], "upstream_failed");
    assert_eq!(upstream.requests().len(), 5);

    // A request the upstream refuses as invalid would be refused anywhere.
    let (status, _) = outcome(&app, "refused", true).await;
    assert_eq!(status, 400);
    assert_eq!(upstream.requests().len(), 6);
    settled(&app).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_the_upstream_paused_then_cancelled() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.slow_client_timeout_ms = 1_000;
    })
    .await;
    // A raw client: send the request, read the head, then read nothing more.
    let mut client = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let body = chat("flood", true).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sluice\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut head = [0u8; 12];
    client.read_exact(&mut head).await.expect("the status line");
    assert_eq!(&head, b"HTTP/1.1 200");

    // The upstream offers 64 MiB as fast as it is taken; the client takes none of it.
    tokio::time::timeout(DEADLINE + Duration::from_secs(5), upstream.closed(1))
        .await
        .expect("the upstream request is cancelled");
    let sent = upstream.sent_bytes();
    eprintln!(
        "the upstream got {} KiB out before sluice let it go",
        sent / 1024
    );
    // What the kernel's socket buffers between the three of them hold (tcp_wmem and
    // tcp_rmem allow several MiB each), not the whole reply: 14 MiB on the machine this
    // was written on, the same whether the upstream offered 20 MiB or 64.
    assert!(
        sent < 32 * 1024 * 1024,
        "sluice took {sent} bytes from the upstream"
    );
    settled(&app).await;
    assert_eq!(app.metric("sluice_slow_clients_dropped_total").await, 1.0);
    assert_eq!(
        app.metric("sluice_chat_requests_total{outcome=\"cancelled\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn readyz_reports_each_upstream_and_stays_ready_when_one_is_down() {
    let upstream = FakeUpstream::spawn().await;
    let base = upstream.base_url();
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let config = config_file(&format!(
        "[models.up]\nbase_url = \"{base}\"\n\n[models.down]\nbase_url = \"{dead}\"\n"
    ));
    let app = TestApp::spawn_with(|c| c.config = Some(config)).await;
    let response = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let ready: Value = response.json().await.expect("JSON");
    let upstreams = ready["upstreams"].as_array().expect("upstreams");
    let find = |url: &str| {
        upstreams
            .iter()
            .find(|u| u["url"] == url)
            .unwrap_or_else(|| panic!("{url} not in {ready}"))
    };
    assert_eq!(find(&upstream.base_url())["reachable"], true);
    assert_eq!(find(&dead)["reachable"], false);
}

#[tokio::test]
async fn metrics_show_every_documented_series() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.rpm = 2;
    })
    .await;
    let (status, _) = outcome(&app, "gpt-test", true).await;
    assert_eq!(status, 200);
    let (status, _) = outcome(&app, "status-500", true).await;
    assert_eq!(status, 502);
    let (status, _) = outcome(&app, "gpt-test", true).await;
    assert_eq!(status, 429);
    settled(&app).await;
    let text = app.metrics().await;
    for series in [
        "sluice_requests_total{route=\"/v1/chat/completions\",model=\"gpt-test\",status=\"200\"} 1",
        "sluice_requests_total{route=\"/v1/chat/completions\",model=\"status-500\",status=\"502\"} 1",
        // Refused before admission: no model label (any name could be sent).
        "sluice_requests_total{route=\"/v1/chat/completions\",model=\"\",status=\"429\"} 1",
        "sluice_rate_limited_total{limit=\"client\"} 1",
        "sluice_active_streams 0",
        "sluice_upstream_requests_in_flight 0",
        "sluice_chat_requests_total{outcome=\"completed\"} 1",
        "sluice_chat_requests_total{outcome=\"upstream_error\"} 1",
        "sluice_chat_requests_total{outcome=\"cancelled\"} 0",
        "sluice_chat_requests_total{outcome=\"timed_out\"} 0",
        "sluice_prompt_tokens_total{model=\"gpt-test\"} 11",
        "sluice_completion_tokens_total{model=\"gpt-test\"} 5",
        "sluice_time_to_first_token_seconds_count{model=\"gpt-test\"} 1",
        "sluice_time_per_output_token_seconds_count{model=\"gpt-test\"} 1",
        "sluice_upstream_request_duration_seconds_count{model=\"gpt-test\"} 1",
        "sluice_overhead_seconds_count 1",
        "# TYPE sluice_time_to_first_token_seconds histogram",
        "sluice_stream_resumes_total 0",
        "sluice_streams_detached_total 0",
        "sluice_stream_grace_expired_total 0",
        "sluice_stream_cancels_total 0",
        "sluice_streams_not_resumable_total{reason=\"memory\"} 0",
        "sluice_stream_log_bytes 0",
    ] {
        assert!(text.contains(series), "no `{series}` in\n{text}");
    }
}

#[tokio::test]
async fn requests_in_a_row_reuse_one_upstream_connection() {
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    // The body ends 20 ms after `[DONE]`: sluice reads on to its end, or the connection
    // could not serve another request.
    for stream in [true, true, false] {
        let (status, error) = outcome(&app, "late-end", stream).await;
        assert_eq!((status, error), (200, None));
    }
    let connections: Vec<u64> = upstream.requests().iter().map(|s| s.connection).collect();
    assert_eq!(connections.len(), 3);
    assert!(
        connections.iter().all(|c| *c == connections[0]),
        "each reply read to its end frees its connection: {connections:?}"
    );
}

#[tokio::test]
async fn a_kept_connection_the_upstream_closed_is_replaced_without_an_error() {
    // An upstream that answers one request a connection, then closes it: what sluice kept
    // of the first connection is gone by the second request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                // Chat calls counted, not the model list sluice asks for.
                match crate::support::read_request(&mut tcp).await {
                    Some(true) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Some(false) => {}
                    None => return,
                }
                let events = concat!(
                    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n",
                    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
                    "data: [DONE]\n\n"
                );
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{events}\r\n0\r\n\r\n",
                    events.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
                // Closed once answered, as an upstream's idle timeout would.
            });
        }
    });
    let app = TestApp::spawn_with(|c| {
        c.openai_base_url = Some(format!("http://{addr}/v1"));
        c.local_model = Some("off".into());
    })
    .await;
    for _ in 0..3 {
        let (status, error) = outcome(&app, "any", true).await;
        assert_eq!((status, error), (200, None));
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "each request on a connection of its own"
    );
    settled(&app).await;
}
