//! OpenTelemetry as a collector sees it: the tests' own OTLP/HTTP receiver decodes what
//! sluice exports (spans and metrics, protobuf), and the fake upstream records the
//! `traceparent` each attempt carried.

use serde_json::{Value, json};

use opentelemetry_proto::tonic::trace::v1::Span;

use crate::support::otlp::{Collector, flag, float, hex, int, text, texts};
use crate::support::{FakeUpstream, TestApp, all_events, config_file};

/// `kind` of a span in OTLP: 2 server, 3 client.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// sluice exporting to `collector` every 100 ms (spans) and 200 ms (metrics).
async fn traced(
    upstream: &FakeUpstream,
    collector: &Collector,
    adjust: impl FnOnce(&mut sluice::Config),
) -> TestApp {
    let endpoint = collector.endpoint();
    TestApp::in_front_of_with(upstream, |c| {
        c.otel_endpoint = Some(endpoint);
        c.otel_service_name = "sluice-under-test".into();
        c.otel_bsp_schedule_delay_ms = 100;
        c.otel_metric_export_interval_ms = 200;
        adjust(c);
    })
    .await
}

/// A client's W3C trace context: trace `n` (as 32 hex digits), its span `0…0n`.
fn client_context(n: u8) -> (String, String, String) {
    let trace = format!("{:032x}", 0xabc0_0000_u128 + u128::from(n));
    let span = format!("{:016x}", 0x1000 + u64::from(n));
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// A streamed chat completion of `model`, read to its end.
async fn stream_chat(app: &TestApp, model: &str, content: &str) {
    let response = app
        .post(
            "/v1/chat/completions",
            &json!({"model": model, "stream": true, "messages": [{"role": "user", "content": content}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    all_events(response).await;
}

/// The server span of `spans`, and its first client span.
fn server_and_client(spans: &[Span]) -> (&Span, &Span) {
    let server = spans
        .iter()
        .find(|s| s.kind == SERVER)
        .expect("a server span");
    let client = spans
        .iter()
        .find(|s| s.kind == CLIENT)
        .expect("a client span");
    (server, client)
}

/// One streamed request on each API, each continuing a client's trace.
fn requests() -> Vec<(&'static str, &'static str, Value)> {
    let messages = json!([{"role": "user", "content": "Tell me about otters"}]);
    vec![
        (
            "/v1/chat/completions",
            "openai",
            json!({"model": "gpt-test", "stream": true, "max_tokens": 50, "messages": messages}),
        ),
        (
            "/v1/responses",
            "openai",
            json!({"model": "gpt-test", "stream": true, "max_output_tokens": 50, "input": "Tell me about otters"}),
        ),
        (
            "/v1/messages",
            "anthropic",
            json!({"model": "gpt-test", "stream": true, "max_tokens": 50, "messages": messages}),
        ),
        (
            "/api/chat",
            "sluice",
            json!({"model": "gpt-test", "prompt": "Tell me about otters", "max_tokens": 50}),
        ),
    ]
}

#[tokio::test]
async fn each_api_s_stream_is_a_server_span_over_a_client_span_whose_traceparent_went_upstream() {
    let upstream = FakeUpstream::spawn().await;
    let collector = Collector::spawn().await;
    let prices = config_file("[prices.\"gpt-test\"]\ninput = 2\noutput = 8\n");
    let app = traced(&upstream, &collector, |c| c.config = Some(prices)).await;
    for (n, (path, provider, body)) in requests().into_iter().enumerate() {
        let (traceparent, trace, parent) = client_context(n as u8);
        let response = app
            .http
            .post(app.url(path))
            .header("traceparent", &traceparent)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{path}");
        let events = all_events(response).await;
        assert!(!events.is_empty(), "{path}: a stream");

        let spans = collector
            .wait(&format!("the spans of {path}"), |r| {
                let ours: Vec<_> = r
                    .spans
                    .iter()
                    .filter(|s| hex(&s.trace_id) == trace)
                    .cloned()
                    .collect();
                (ours.len() >= 2).then_some(ours)
            })
            .await;
        let (server, client) = server_and_client(&spans);
        // The client's trace goes on: sluice's span is a child of the client's.
        assert_eq!(hex(&server.parent_span_id), parent, "{path}");
        assert_eq!(
            client.parent_span_id, server.span_id,
            "{path}: the attempt under the request"
        );
        assert_eq!(
            spans.len(),
            2,
            "{path}: one request, one attempt, no span per chunk"
        );

        assert_eq!(server.name, "chat gpt-test", "{path}");
        assert_eq!(
            text(server, "gen_ai.operation.name").as_deref(),
            Some("chat")
        );
        assert_eq!(
            text(server, "gen_ai.provider.name").as_deref(),
            Some(provider),
            "{path}"
        );
        assert_eq!(
            text(server, "gen_ai.request.model").as_deref(),
            Some("gpt-test")
        );
        assert_eq!(
            text(server, "gen_ai.response.model").as_deref(),
            Some("gpt-test")
        );
        assert_eq!(int(server, "gen_ai.request.max_tokens"), Some(50), "{path}");
        assert_eq!(flag(server, "gen_ai.request.stream"), Some(true), "{path}");
        assert_eq!(int(server, "gen_ai.usage.input_tokens"), Some(11), "{path}");
        assert_eq!(int(server, "gen_ai.usage.output_tokens"), Some(5), "{path}");
        // What the request cost: 11 tokens in at $2/M, 5 out at $8/M.
        assert_eq!(
            float(server, "sluice.usage.cost_usd"),
            Some(0.000062),
            "{path}"
        );
        assert_eq!(
            texts(server, "gen_ai.response.finish_reasons"),
            Some(vec!["stop".to_owned()]),
            "{path}"
        );
        let ttft = float(server, "gen_ai.response.time_to_first_chunk").expect("a ttft");
        assert!(ttft > 0.0 && ttft < 5.0, "{path}: {ttft}");
        assert!(text(server, "error.type").is_none(), "{path}");
        assert_eq!(flag(server, "sluice.cancelled"), Some(false));
        assert_eq!(flag(server, "sluice.stream.resumed"), Some(false));
        assert!(
            text(server, "sluice.stream.id").is_some(),
            "{path}: the stream's id"
        );
        assert!(
            float(server, "sluice.admission.wait_ms").is_some(),
            "{path}"
        );

        assert_eq!(client.name, "chat gpt-test");
        assert_eq!(
            text(client, "gen_ai.provider.name").as_deref(),
            Some("openai")
        );
        assert_eq!(
            text(client, "gen_ai.request.model").as_deref(),
            Some("gpt-test")
        );
        assert_eq!(int(client, "gen_ai.usage.output_tokens"), Some(5));
        assert_eq!(text(client, "server.address").as_deref(), Some("127.0.0.1"));
        assert!(int(client, "server.port").is_some());
        assert!(float(client, "gen_ai.response.time_to_first_chunk").is_some());

        // What the upstream received names the attempt's span.
        let seen = upstream.request(n + 1).await;
        assert_eq!(
            seen.headers.get("traceparent"),
            Some(&format!("00-{trace}-{}-01", hex(&client.span_id))),
            "{path}"
        );
    }
    assert!(
        collector
            .services()
            .iter()
            .all(|s| s == "sluice-under-test")
    );
}

#[tokio::test]
async fn a_request_that_fails_over_shows_each_attempt_and_each_upstream_saw_its_own() {
    let failing = FakeUpstream::spawn().await;
    failing.set_failing(true);
    let good = FakeUpstream::spawn().await;
    let collector = Collector::spawn().await;
    let file = config_file(&format!(
        "[models.resilient]\nbase_url = \"{}\"\nmodel = \"gpt-test\"\nfallbacks = [{{ base_url = \"{}\", model = \"gpt-test\" }}]\n",
        failing.base_url(),
        good.base_url()
    ));
    let app = traced(&good, &collector, |c| c.config = Some(file)).await;
    stream_chat(&app, "resilient", "Hi").await;

    let spans = collector.trace("chat resilient", 3).await;
    let server = spans
        .iter()
        .find(|s| s.kind == SERVER)
        .expect("a server span");
    let mut attempts: Vec<_> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "two attempts");
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, server.span_id);
    }
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(text(first, "error.type").as_deref(), Some("500"));
    assert_eq!(
        first.status.as_ref().map(|s| s.code),
        Some(2),
        "an error status"
    );
    assert!(text(second, "error.type").is_none());
    assert_eq!(int(second, "gen_ai.usage.output_tokens"), Some(5));
    assert!(
        text(server, "error.type").is_none(),
        "the request itself succeeded"
    );

    let trace = hex(&server.trace_id);
    let saw = |upstream: &FakeUpstream| {
        upstream.requests()[0]
            .headers
            .get("traceparent")
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        saw(&failing),
        format!("00-{trace}-{}-01", hex(&first.span_id))
    );
    assert_eq!(
        saw(&good),
        format!("00-{trace}-{}-01", hex(&second.span_id))
    );
}

#[tokio::test]
async fn the_genai_metrics_go_out_by_otlp_and_on_metrics_under_their_current_names() {
    let upstream = FakeUpstream::spawn().await;
    let collector = Collector::spawn().await;
    let app = traced(&upstream, &collector, |_| {}).await;
    for _ in 0..2 {
        stream_chat(&app, "gpt-test", "Hi").await;
    }
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
    let ours = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
        let get = |k| crate::support::otlp::attribute(attrs, k);
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        get("gen_ai.operation.name") == Some(Any::StringValue("chat".into()))
            && get("gen_ai.provider.name") == Some(Any::StringValue("openai".into()))
            && get("gen_ai.request.model") == Some(Any::StringValue("gpt-test".into()))
    };
    for (name, bounds) in [
        (
            "gen_ai.server.time_to_first_token",
            &sluice::telemetry::TTFT_BUCKETS[..],
        ),
        (
            "gen_ai.server.time_per_output_token",
            &sluice::telemetry::TPOT_BUCKETS[..],
        ),
        (
            "gen_ai.server.request.duration",
            &sluice::telemetry::DURATION_BUCKETS[..],
        ),
        (
            "gen_ai.client.inference.duration",
            &sluice::telemetry::DURATION_BUCKETS[..],
        ),
        (
            "gen_ai.client.inference.time_to_first_chunk",
            &sluice::telemetry::DURATION_BUCKETS[..],
        ),
    ] {
        let (unit, points) = collector
            .metric(name, |m| match &m.data {
                Some(Data::Histogram(h)) => {
                    let point = h.data_points.iter().find(|p| ours(&p.attributes))?;
                    (point.count == 2).then(|| (m.unit.clone(), point.clone()))
                }
                _ => None,
            })
            .await;
        assert_eq!(unit, "s", "{name}");
        assert_eq!(
            points.explicit_bounds, bounds,
            "{name}: the conventions' buckets"
        );
        let sum = points.sum.expect("a sum");
        assert!(sum > 0.0 && sum < 10.0, "{name}: {sum}");
    }
    for (name, value) in [
        ("gen_ai.client.inference.usage.input_tokens", 22),
        ("gen_ai.client.inference.usage.output_tokens", 10),
    ] {
        let unit = collector
            .metric(name, |m| match &m.data {
                Some(Data::Sum(s)) if s.is_monotonic => {
                    let point = s.data_points.iter().find(|p| ours(&p.attributes))?;
                    (point.value == Some(Number::AsInt(value))).then(|| m.unit.clone())
                }
                _ => None,
            })
            .await;
        assert_eq!(unit, "{token}", "{name}");
    }
    // The same measurements on /metrics, beside sluice's own series.
    let text = app.metrics().await;
    let labels = r#"gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-test""#;
    for series in [
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
        "gen_ai_server_request_duration_seconds_count",
        "gen_ai_client_inference_duration_seconds_count",
        "gen_ai_client_inference_time_to_first_chunk_seconds_count",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(series) && l.contains(labels) && l.ends_with(" 2")),
            "{series} in\n{text}"
        );
    }
    assert!(text.contains(r#"gen_ai_server_time_to_first_token_seconds_bucket{"#));
    assert!(text.contains(r#"le="0.001""#), "the conventions' buckets");
    assert!(
        text.lines().any(
            |l| l.starts_with("gen_ai_client_inference_usage_output_tokens_total")
                && l.contains(r#"gen_ai_token_modality="text""#)
                && l.ends_with(" 10")
        ),
        "{text}"
    );
    assert!(
        text.contains("sluice_time_to_first_token_seconds"),
        "sluice's own stay"
    );
}

#[tokio::test]
async fn no_prompt_or_reply_text_leaves_sluice_unless_content_capture_is_asked_for() {
    let upstream = FakeUpstream::spawn().await;
    let prompt = "the secret word is periwinkle-42";

    let quiet = Collector::spawn().await;
    let app = traced(&upstream, &quiet, |_| {}).await;
    stream_chat(&app, "gpt-test", prompt).await;
    let spans = quiet.trace("chat gpt-test", 2).await;
    // Metrics went out too by now, and nothing anywhere holds the text.
    quiet
        .metric("gen_ai.server.request.duration", |_| Some(()))
        .await;
    assert!(
        !quiet.received_bytes(prompt.as_bytes()),
        "the prompt left sluice"
    );
    assert!(
        !quiet.received_bytes(b"fake upstream"),
        "the reply left sluice"
    );
    assert!(
        spans
            .iter()
            .all(|s| text(s, "gen_ai.input.messages").is_none())
    );

    let capturing = Collector::spawn().await;
    let app = traced(&upstream, &capturing, |c| c.otel_capture_content = true).await;
    stream_chat(&app, "gpt-test", prompt).await;
    let spans = capturing.trace("chat gpt-test", 2).await;
    let (_, client) = server_and_client(&spans);
    let input: Value =
        serde_json::from_str(&text(client, "gen_ai.input.messages").expect("input")).expect("json");
    assert_eq!(input[0]["parts"][0]["content"], prompt);
    let output: Value =
        serde_json::from_str(&text(client, "gen_ai.output.messages").expect("output"))
            .expect("json");
    assert_eq!(
        output[0]["parts"][0]["content"],
        "Hello from the fake upstream"
    );
    assert_eq!(output[0]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_resumed_stream_s_span_links_to_the_span_that_started_it() {
    let upstream = FakeUpstream::spawn().await;
    let collector = Collector::spawn().await;
    let app = traced(&upstream, &collector, |_| {}).await;
    resumed_reader_links_to_its_producer(&app, &app, &collector).await;
}

/// A resumable stream started on `producer` and read to its end, then resumed on `reader`
/// after event 2: the reader's span is marked resumed, names the stream, and links to the
/// span of the request that started it.
async fn resumed_reader_links_to_its_producer(
    producer: &TestApp,
    reader: &TestApp,
    collector: &Collector,
) {
    let response = producer
        .http
        .post(producer.url("/v1/chat/completions"))
        .header("x-sluice-resumable", "true")
        .json(&json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("the producer answers");
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .expect("an id")
        .to_owned();
    all_events(response).await;
    let response = reader
        .http
        .get(reader.url(&format!("/v1/chat/completions/{id}?stream=true")))
        .header("last-event-id", "2")
        .send()
        .await
        .expect("the reader answers");
    assert_eq!(response.status(), 200);
    let events = all_events(response).await;
    assert!(!events.is_empty(), "the rest of the stream");

    let started = collector.trace("chat gpt-test", 2).await;
    let (server, _) = server_and_client(&started);
    let span = collector
        .wait("the reader's span", |r| {
            r.spans
                .iter()
                .find(|s| s.name.starts_with("GET /v1/chat/completions/"))
                .cloned()
        })
        .await;
    assert_eq!(flag(&span, "sluice.stream.resumed"), Some(true));
    assert_eq!(
        text(&span, "sluice.stream.id").as_deref(),
        Some(id.as_str())
    );
    assert_eq!(span.links.len(), 1, "a link to the stream's trace");
    assert_eq!(span.links[0].trace_id, server.trace_id);
    assert_eq!(span.links[0].span_id, server.span_id);
}

#[tokio::test]
async fn without_an_endpoint_or_when_disabled_nothing_is_traced_and_no_traceparent_goes_upstream() {
    let upstream = FakeUpstream::spawn().await;
    let collector = Collector::spawn().await;
    let plain = TestApp::in_front_of(&upstream).await;
    let disabled = traced(&upstream, &collector, |c| c.otel_sdk_disabled = true).await;
    for (n, app) in [plain, disabled].iter().enumerate() {
        let (traceparent, _, _) = client_context(9);
        let response = app
            .http
            .post(app.url("/v1/chat/completions"))
            .header("traceparent", &traceparent)
            .json(&json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .expect("request");
        all_events(response).await;
        let seen = upstream.request(n + 1).await;
        assert!(
            !seen.headers.contains_key("traceparent"),
            "{:?}",
            seen.headers
        );
    }
}

#[tokio::test]
async fn a_collector_that_is_down_costs_a_client_nothing_on_either_protocol() {
    let upstream = FakeUpstream::spawn().await;
    for protocol in ["http/protobuf", "grpc"] {
        // A port nobody listens on.
        let endpoint = format!("http://127.0.0.1:{}", crate::support::free_port());
        let app = TestApp::in_front_of_with(&upstream, |c| {
            c.otel_endpoint = Some(endpoint);
            c.otel_protocol = protocol.into();
            c.otel_bsp_schedule_delay_ms = 50;
            c.otel_metric_export_interval_ms = 50;
        })
        .await;
        for _ in 0..3 {
            let before = upstream.count();
            let response = app
                .post(
                    "/v1/chat/completions",
                    &json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
                )
                .await;
            assert_eq!(response.status(), 200, "{protocol}");
            let events = all_events(response).await;
            let text = crate::support::content(&crate::support::payloads(&events));
            assert_eq!(text, "Hello from the fake upstream", "{protocol}");
            // The trace still goes upstream: only its export is lost.
            let seen = upstream.request(before + 1).await;
            assert!(seen.headers["traceparent"].starts_with("00-"), "{protocol}");
        }
    }
}

#[tokio::test]
async fn the_binary_s_request_log_line_carries_its_trace_and_span_ids() {
    use crate::startup::Running;
    let collector = Collector::spawn().await;
    let endpoint = collector.endpoint();
    let sluice = Running::start(&[
        ("SLUICE_LOG", "json"),
        ("SLUICE_MOCK_TOKENS_PER_S", "0"),
        ("SLUICE_SHUTDOWN_GRACE_S", "0"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let (traceparent, trace, _) = client_context(7);
    let response = reqwest::Client::new()
        .post(sluice.url("/v1/chat/completions"))
        .header("traceparent", &traceparent)
        .header("x-request-id", "traced-1")
        .json(&json!({"model": "mock", "stream": true, "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("answers");
    all_events(response).await;
    let line = sluice
        .line(|line| {
            line.contains("\"request_id\":\"traced-1\"") && line.contains("\"message\":\"request\"")
        })
        .expect("the request's line");
    let line: Value = serde_json::from_str(&line).expect("JSON");
    let spans = collector
        .wait("the server span", |r| {
            r.spans
                .iter()
                .find(|s| s.kind == SERVER && hex(&s.trace_id) == trace)
                .cloned()
        })
        .await;
    assert_eq!(line["fields"]["trace_id"], trace, "{line}");
    assert_eq!(line["fields"]["span_id"], hex(&spans.span_id), "{line}");
}

#[tokio::test]
async fn a_collector_that_is_down_does_not_hold_the_binary_s_exit() {
    use crate::startup::Running;
    let endpoint = format!("http://127.0.0.1:{}", crate::support::free_port());
    let mut sluice = Running::start(&[
        ("SLUICE_MOCK_TOKENS_PER_S", "0"),
        ("SLUICE_SHUTDOWN_GRACE_S", "0"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
    ]);
    // Spans and metrics are waiting to go when the signal comes.
    let response = reqwest::Client::new()
        .post(sluice.url("/v1/chat/completions"))
        .json(&json!({"model": "mock", "stream": true, "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    all_events(response).await;
    let signalled = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &sluice.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    // The exporters get two seconds; a busy machine some slack.
    let deadline = signalled + std::time::Duration::from_secs(6);
    loop {
        if let Some(status) = sluice.child.try_wait().expect("wait") {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running {:?} after SIGTERM",
            signalled.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test]
async fn over_grpc_the_same_spans_and_metrics_reach_the_collector() {
    let upstream = FakeUpstream::spawn().await;
    let collector = Collector::spawn_grpc().await;
    let app = traced(&upstream, &collector, |c| c.otel_protocol = "grpc".into()).await;
    stream_chat(&app, "gpt-test", "Hi").await;
    let spans = collector.trace("chat gpt-test", 2).await;
    let (server, client) = server_and_client(&spans);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(int(server, "gen_ai.usage.output_tokens"), Some(5));
    let unit = collector
        .metric("gen_ai.server.time_to_first_token", |m| {
            Some(m.unit.clone())
        })
        .await;
    assert_eq!(unit, "s");
}

#[tokio::test]
async fn a_reader_on_another_instance_links_to_the_span_that_started_the_stream() {
    let Some(redis) = crate::shared::Redis::start() else {
        return;
    };
    let upstream = FakeUpstream::spawn().await;
    let collector = Collector::spawn().await;
    let url = redis.url.clone();
    let a = traced(&upstream, &collector, |c| c.redis_url = Some(url)).await;
    let url = redis.url.clone();
    let b = traced(&upstream, &collector, |c| c.redis_url = Some(url)).await;
    // B has no stream of its own: it reads A's through Redis, the link too.
    resumed_reader_links_to_its_producer(&a, &b, &collector).await;
}
