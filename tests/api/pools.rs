//! Upstream pools, against three fake replicas (fast, slow to its first token, answering
//! 500): no client error while one fails, its ejection and return, what each balance sends
//! to the slow one, the queue and its 429 at `max_streams`, a reload under 100 open streams,
//! and two instances sharing ejections and caps through Redis.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::shared::Redis;
use crate::support::{
    DEADLINE, FakeUpstream, REPLY_DEADLINE, TestApp, all_events, config_file, content, events,
    paced_reply, payloads,
};

/// `[[models.<route>.targets]]` for each `(upstream, model, extra lines)`.
fn targets(route: &str, targets: &[(&FakeUpstream, &str, &str)]) -> String {
    targets
        .iter()
        .map(|(upstream, model, extra)| {
            format!(
                "[[models.{route}.targets]]\nbase_url = \"{}\"\nmodel = \"{model}\"\n{extra}\n",
                upstream.base_url()
            )
        })
        .collect()
}

async fn app_with(config: &std::path::Path, adjust: impl FnOnce(&mut sluice::Config)) -> TestApp {
    let path = config.to_owned();
    TestApp::spawn_with(|c| {
        c.config = Some(path);
        c.openai_api_key = Some("sk-test".into());
        c.max_streams = 1_000;
        // `/readyz` tells when an ejected target is back only to the operator.
        c.metrics_token = Some("operator-token".into());
        adjust(c);
    })
    .await
}

fn chat(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "Hi"}]})
}

/// A streamed reply read whole: its status and text.
async fn ask(app: &TestApp, model: &str) -> (u16, String) {
    let response = app.post("/v1/chat/completions", &chat(model)).await;
    let status = response.status().as_u16();
    if status != 200 {
        return (status, response.text().await.unwrap_or_default());
    }
    let payloads = payloads(&all_events(response).await);
    assert_eq!(
        payloads.last(),
        Some(&json!("[DONE]")),
        "the stream finished"
    );
    (status, content(&payloads))
}

/// The state `/readyz` gives the target at `base_url` of route `model`'s own pool.
async fn target_state(app: &TestApp, model: &str, base_url: &str) -> Value {
    let ready = app.get_json("/readyz").await;
    let pool = ready["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["model"] == model && p["fallback"] == 0)
        .cloned()
        .expect("the route's pool");
    let url = base_url.trim_end_matches('/');
    pool["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["target"].as_str().is_some_and(|n| n.ends_with(url)))
        .cloned()
        .expect("the target")
}

/// Waits, up to `limit`, until the target's state is `want`.
async fn wait_state(app: &TestApp, model: &str, base_url: &str, want: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        let state = target_state(app, model, base_url).await;
        if state["state"] == want {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "the target is {state}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failing_target_costs_no_client_an_error_is_ejected_and_comes_back() {
    let (fast, other, failing) = (
        FakeUpstream::spawn().await,
        FakeUpstream::spawn().await,
        FakeUpstream::spawn().await,
    );
    failing.set_failing(true);
    let file = config_file(&targets(
        "llama",
        &[
            (&fast, "gpt-test", ""),
            (&other, "gpt-test", ""),
            (&failing, "gpt-test", ""),
        ],
    ));
    let app = app_with(&file, |_| {}).await;
    for _ in 0..30 {
        let (status, text) = ask(&app, "llama").await;
        assert_eq!(
            (status, text.as_str()),
            (200, "Hello from the fake upstream")
        );
    }
    // Three failures in a row took it out; the rest went to the others.
    assert_eq!(failing.count(), 3);
    assert_eq!(fast.count() + other.count(), 30);
    let out = target_state(&app, "llama", &failing.base_url()).await;
    assert_eq!(out["state"], "ejected", "{out}");
    assert!(out["back_in_s"].as_u64().is_some_and(|s| s <= 10), "{out}");

    // Recovered: once its back-off is over, the next request probes it and brings it back.
    failing.set_failing(false);
    wait_state(
        &app,
        "llama",
        &failing.base_url(),
        "probing",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(ask(&app, "llama").await.0, 200);
    assert_eq!(failing.count(), 4, "the probe went to the recovered target");
    wait_state(&app, "llama", &failing.base_url(), "healthy", DEADLINE).await;
}

#[tokio::test]
async fn an_upstream_429_is_one_failure_and_its_retry_after_is_capped() {
    let (limited, fast) = (FakeUpstream::spawn().await, FakeUpstream::spawn().await);
    let file = config_file(&targets(
        "llama",
        &[
            (&limited, "status-429-300", "weight = 100"),
            (&fast, "gpt-test", ""),
        ],
    ));
    let app = app_with(&file, |_| {}).await;
    for _ in 0..6 {
        assert_eq!(ask(&app, "llama").await.0, 200);
    }
    // Each 429 is one failure (laid at the target once the other target served the
    // request): three take it out, whatever its weight.
    assert_eq!(limited.count(), 3, "out after three 429s");
    let out = target_state(&app, "llama", &limited.base_url()).await;
    assert_eq!(out["state"], "ejected");
    // It said Retry-After: 300; an ejection lasts 30 s at the most.
    assert!(
        out["back_in_s"]
            .as_u64()
            .is_some_and(|s| (20..=30).contains(&s)),
        "{out}"
    );
}

/// A streamed chat of `content` to `model` with `key`: its status.
async fn ask_as(app: &TestApp, key: &str, model: &str, content: &str) -> u16 {
    let body = json!({"model": model, "stream": true,
        "messages": [{"role": "user", "content": content}]});
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("sluice answers");
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

#[tokio::test]
async fn one_key_cannot_take_a_pools_targets_out_for_another() {
    let (a, b) = (FakeUpstream::spawn().await, FakeUpstream::spawn().await);
    let file = config_file(&targets(
        "llama",
        &[(&a, "gpt-test", ""), (&b, "gpt-test", "")],
    ));
    let app = app_with(&file, |c| {
        c.api_keys = vec!["sk-attacker".into(), "sk-victim".into()];
    })
    .await;
    // A 429 with Retry-After: 300 from every target, for the attacker's requests only;
    // then failures of every kind, as fast as it likes, between the victim's requests.
    for told in [
        "status-429-300",
        "status-429-too-large",
        "status-500",
        "status-429",
    ] {
        for _ in 0..3 {
            let status = ask_as(&app, "sk-attacker", "llama", &format!("behave:{told}")).await;
            assert!(status >= 429, "{told}: {status}");
        }
        for _ in 0..5 {
            assert_eq!(
                ask_as(&app, "sk-victim", "llama", "Hi").await,
                200,
                "after {told}"
            );
        }
    }
    for upstream in [&a, &b] {
        let state = target_state(&app, "llama", &upstream.base_url()).await;
        assert_eq!(state["state"], "healthy", "{state}");
    }
    // A 429 that names the request's size went to one target, not to each in turn.
    let before = a.count() + b.count();
    let status = ask_as(&app, "sk-attacker", "llama", "behave:status-429-too-large").await;
    assert_eq!(status, 429);
    assert_eq!(a.count() + b.count(), before + 1, "not spread by failover");
}

#[tokio::test]
async fn readyz_tells_no_timing_without_the_metrics_token() {
    let (a, b) = (FakeUpstream::spawn().await, FakeUpstream::spawn().await);
    a.set_failing(true);
    let file = config_file(&targets(
        "llama",
        &[(&a, "gpt-test", ""), (&b, "gpt-test", "")],
    ));
    let app = app_with(&file, |c| c.metrics_token = None).await;
    for _ in 0..6 {
        assert_eq!(ask(&app, "llama").await.0, 200);
    }
    let out = target_state(&app, "llama", &a.base_url()).await;
    assert_eq!(out["state"], "ejected", "{out}");
    assert!(
        out["back_in_s"].is_null() && out["ttft_ms"].is_null(),
        "{out}"
    );
}

/// Streams each target got of `n` requests, `parallel` at a time, under `balance`.
async fn distribution(balance: &str, n: usize, parallel: usize) -> [usize; 3] {
    let (fast, slow, failing) = (
        FakeUpstream::spawn().await,
        FakeUpstream::spawn().await,
        FakeUpstream::spawn().await,
    );
    let mut text = format!("[models.llama]\nbalance = \"{balance}\"\n");
    text += &targets(
        "llama",
        &[
            (&fast, "gpt-test", ""),
            (&slow, "slow-first", ""),
            (&failing, "status-500", ""),
        ],
    );
    let app = app_with(&config_file(&text), |_| {}).await;
    let answers: Vec<u16> = futures::stream::iter(0..n)
        .map(|_| async { ask(&app, "llama").await.0 })
        .buffer_unordered(parallel)
        .collect()
        .await;
    assert!(answers.iter().all(|s| *s == 200), "{balance}: {answers:?}");
    let seen = [fast.count(), slow.count(), failing.count()];
    println!(
        "{balance}: fast {} slow {} failing {}",
        seen[0], seen[1], seen[2]
    );
    seen
}

#[tokio::test]
async fn least_busy_and_latency_send_fewer_streams_to_the_slow_target_than_weighted() {
    let weighted = distribution("weighted", 60, 6).await;
    let least_busy = distribution("least-busy", 60, 6).await;
    let latency = distribution("latency", 60, 6).await;
    // Weighted splits evenly what the failing one does not get.
    assert!(weighted[1] >= 20, "weighted {weighted:?}");
    assert!(
        least_busy[1] * 2 <= weighted[1],
        "least-busy {least_busy:?}, weighted {weighted:?}"
    );
    assert!(
        latency[1] * 2 <= weighted[1],
        "latency {latency:?}, weighted {weighted:?}"
    );
    // Ejected after three failures in a row; up to one a request in flight may have been on
    // its way by then (each retried elsewhere).
    for seen in [weighted, least_busy, latency] {
        assert!(seen[2] <= 3 + 6, "the failing target was ejected: {seen:?}");
    }
}

#[tokio::test]
async fn a_full_pool_queues_then_answers_429_with_retry_after() {
    let upstream = FakeUpstream::spawn().await;
    let mut text = "[models.capped]\nqueue = 1\nqueue_timeout_ms = 10000\n".to_owned();
    text += &targets("capped", &[(&upstream, "paced", "max_streams = 2")]);
    text += "[models.brief]\nqueue = 5\nqueue_timeout_ms = 200\n";
    text += &targets("brief", &[(&upstream, "slow", "max_streams = 1")]);
    let app = app_with(&config_file(&text), |_| {}).await;

    // Two streams fill the target; a third waits; a fourth finds the queue full.
    let mut open = Vec::new();
    for _ in 0..2 {
        let response = app.post("/v1/chat/completions", &chat("capped")).await;
        assert_eq!(response.status(), 200);
        open.push(events(response));
    }
    let body = chat("capped");
    let waiting = app.post("/v1/chat/completions", &body);
    let refused = async {
        let started = Instant::now();
        while app
            .metric("sluice_pool_queue_waiting{model=\"capped\"}")
            .await
            < 1.0
        {
            assert!(
                started.elapsed() < DEADLINE,
                "the third request never queued"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused = app.post("/v1/chat/completions", &chat("capped")).await;
        assert_eq!(refused.status(), 429);
        let retry_after: u64 = refused.headers()["retry-after"]
            .to_str()
            .expect("text")
            .parse()
            .expect("seconds");
        assert!((1..=300).contains(&retry_after));
        let body: Value = refused.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "model_at_capacity");
        // The streams end; the waiting request gets its turn.
        for stream in open.drain(..) {
            let events: Vec<_> = stream.collect().await;
            assert_eq!(content(&payloads(&events)), paced_reply());
        }
    };
    let (waited, ()) = tokio::join!(waiting, refused);
    assert_eq!(waited.status(), 200);
    assert_eq!(content(&payloads(&all_events(waited).await)), paced_reply());

    // A wait that runs out is a 429 too, as soon as it does.
    let held = events(app.post("/v1/chat/completions", &chat("brief")).await);
    let started = Instant::now();
    let timed_out = app.post("/v1/chat/completions", &chat("brief")).await;
    assert_eq!(timed_out.status(), 429);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(held);
}

#[tokio::test]
async fn a_waiting_client_that_leaves_is_out_of_the_queue_at_once() {
    let upstream = FakeUpstream::spawn().await;
    let mut text = "[models.capped]\nqueue = 4\nqueue_timeout_ms = 30000\n".to_owned();
    text += &targets("capped", &[(&upstream, "slow", "max_streams = 1")]);
    let app = app_with(&config_file(&text), |_| {}).await;
    let _held = events(app.post("/v1/chat/completions", &chat("capped")).await);
    let series = "sluice_pool_queue_waiting{model=\"capped\"}";
    {
        let body = chat("capped");
        let waiting = app.post("/v1/chat/completions", &body);
        tokio::pin!(waiting);
        let started = Instant::now();
        loop {
            tokio::select! {
                _ = &mut waiting => panic!("answered while the target is full"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if app.metric(series).await == 1.0 {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "the request never queued");
        }
        // The client gives up: its request is dropped with its connection.
    }
    app.wait_metric(series, 0.0).await;
}

#[tokio::test]
async fn a_reload_during_100_open_streams_loses_none_and_an_invalid_file_changes_nothing() {
    let (before, after) = (FakeUpstream::spawn().await, FakeUpstream::spawn().await);
    let path = config_file(&targets("pooled", &[(&before, "paced", "")]));
    let app = app_with(&path, |c| c.config_watch = true).await;
    let mut open = Vec::new();
    for _ in 0..100 {
        let response = app.post("/v1/chat/completions", &chat("pooled")).await;
        assert_eq!(response.status(), 200);
        open.push(events(response));
    }
    assert_eq!(before.count(), 100);

    let mut text = targets("pooled", &[(&after, "gpt-test", "")]);
    text += "[models.added]\nbackend = \"mock\"\nmodel = \"mock\"\n";
    std::fs::write(&path, text).expect("rewrite the config");
    app.wait_metric_at_least("sluice_config_reloads_total{outcome=\"ok\"}", 1.0)
        .await;
    // New requests use the new table at once.
    assert_eq!(
        ask(&app, "pooled").await,
        (200, "Hello from the fake upstream".into())
    );
    assert_eq!(after.count(), 1);
    assert_eq!(ask(&app, "added").await.0, 200);
    // The streams that started before it finish where they started, whole.
    let replies = futures::future::join_all(open.into_iter().map(|s| s.collect::<Vec<_>>()));
    let replies = tokio::time::timeout(REPLY_DEADLINE, replies)
        .await
        .expect("they end");
    for events in replies {
        let payloads = payloads(&events);
        assert_eq!(content(&payloads), paced_reply());
        assert_eq!(payloads.last(), Some(&json!("[DONE]")));
    }
    assert_eq!(before.count(), 100);

    // A file that is not valid is refused; the running table stays.
    std::fs::write(&path, "[models.pooled]\nbalance = \"fastest\"\n").expect("rewrite");
    app.wait_metric_at_least("sluice_config_reloads_total{outcome=\"refused\"}", 1.0)
        .await;
    assert_eq!(ask(&app, "pooled").await.0, 200);
    assert_eq!(after.count(), 2);
    assert_eq!(ask(&app, "added").await.0, 200);

    // Nor does a file that is gone (an editor's save in progress, as likely as not).
    std::fs::remove_file(&path).expect("remove the config");
    app.wait_metric_at_least("sluice_config_reloads_total{outcome=\"refused\"}", 2.0)
        .await;
    assert_eq!(ask(&app, "added").await.0, 200);
}

#[tokio::test]
async fn two_instances_share_ejections_and_caps_through_redis() {
    let Some(redis) = Redis::start() else { return };
    let (fast, failing, capped) = (
        FakeUpstream::spawn().await,
        FakeUpstream::spawn().await,
        FakeUpstream::spawn().await,
    );
    failing.set_failing(true);
    let mut text = targets(
        "llama",
        &[(&fast, "gpt-test", ""), (&failing, "gpt-test", "")],
    );
    text += "[models.capped]\nqueue = 0\n";
    text += &targets("capped", &[(&capped, "slow", "max_streams = 1")]);
    let file = config_file(&text);
    let url = redis.url.clone();
    let a = app_with(&file, |c| c.redis_url = Some(url.clone())).await;
    let b = app_with(&file, |c| c.redis_url = Some(url)).await;

    // Instance a finds the failing target out; b sees it within a second, having sent it
    // nothing.
    for _ in 0..6 {
        assert_eq!(ask(&a, "llama").await.0, 200);
    }
    assert_eq!(failing.count(), 3);
    wait_state(
        &b,
        "llama",
        &failing.base_url(),
        "ejected",
        Duration::from_secs(2),
    )
    .await;
    for _ in 0..6 {
        assert_eq!(ask(&b, "llama").await.0, 200);
    }
    assert_eq!(
        failing.count(),
        3,
        "instance b sent the ejected target nothing"
    );

    // One stream on a fills the target's cap of 1 for b too; b has room once it ends.
    let held = events(a.post("/v1/chat/completions", &chat("capped")).await);
    let refused = b.post("/v1/chat/completions", &chat("capped")).await;
    assert_eq!(refused.status(), 429);
    drop(held);
    let started = Instant::now();
    loop {
        let response = b.post("/v1/chat/completions", &chat("capped")).await;
        if response.status() == 200 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "b never got the slot back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_the_routes_and_an_invalid_file_is_refused_naming_the_problem() {
    use crate::startup::Running;
    let path = config_file("[models.first]\nbackend = \"mock\"\n");
    let sluice = Running::start(&[("SLUICE_CONFIG", path.to_str().expect("a path"))]);
    let http = reqwest::Client::new();
    let models = || async {
        let models: Value = http
            .get(sluice.url("/v1/models"))
            .send()
            .await
            .expect("/v1/models answers")
            .json()
            .await
            .expect("JSON");
        models["data"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    assert!(models().await.contains(&"first".to_owned()));

    std::fs::write(&path, "[models.second]\nbackend = \"mock\"\n").expect("rewrite");
    sluice.hangup();
    assert!(
        sluice
            .line(|l| l.contains("configuration reloaded"))
            .is_some()
    );
    let now = models().await;
    assert!(
        now.contains(&"second".to_owned()) && !now.contains(&"first".to_owned()),
        "{now:?}"
    );

    std::fs::write(&path, "[models.third]\nbackend = \"mock\"\nweight = 0\n").expect("rewrite");
    sluice.hangup();
    let refused = sluice
        .line(|l| l.contains("not reloaded"))
        .expect("a line saying why");
    assert!(refused.contains("weight"), "{refused}");
    assert!(
        models().await.contains(&"second".to_owned()),
        "the running table is kept"
    );
}

#[tokio::test]
async fn a_pool_whose_every_target_fails_is_a_503_with_retry_after_not_a_hang() {
    let (one, two) = (FakeUpstream::spawn().await, FakeUpstream::spawn().await);
    let file = config_file(&targets(
        "llama",
        &[(&one, "status-500", ""), (&two, "status-500", "")],
    ));
    let keys = ["sk-a", "sk-b", "sk-c"];
    let app = app_with(&file, |c| c.api_keys = keys.map(str::to_owned).to_vec()).await;
    // Each request tries both, then gets the last failure. One client's failures are not
    // laid at the targets (its requests may be the cause); three clients' take both out.
    for key in keys {
        assert_eq!(ask_as(&app, key, "llama", "Hi").await, 502);
    }
    assert_eq!((one.count(), two.count()), (3, 3));
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-a")
        .json(&chat("llama"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "no_healthy_upstream");
    assert_eq!((one.count(), two.count()), (3, 3), "nothing was sent");
}

#[tokio::test]
async fn a_reload_replaces_the_keys_too() {
    let path = config_file("[keys.old]\nkey = \"sk-old\"\n");
    let app = app_with(&path, |c| c.config_watch = true).await;
    let status = |key: &'static str| {
        let request = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat("mock"));
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    assert_eq!((status("sk-old").await, status("sk-new").await), (200, 401));
    std::fs::write(&path, "[keys.new]\nkey = \"sk-new\"\n").expect("rewrite");
    app.wait_metric_at_least("sluice_config_reloads_total{outcome=\"ok\"}", 1.0)
        .await;
    assert_eq!((status("sk-old").await, status("sk-new").await), (401, 200));
}

#[tokio::test]
async fn the_python_sdk_gets_a_clean_429_from_a_full_pool() {
    if !crate::support::python_has("openai")
        && crate::support::skip_without("python3 with the openai package")
    {
        return;
    }
    let upstream = FakeUpstream::spawn().await;
    let mut text = "[models.capped]\nqueue = 0\n".to_owned();
    text += &targets("capped", &[(&upstream, "slow", "max_streams = 1")]);
    let app = app_with(&config_file(&text), |_| {}).await;
    let _held = events(app.post("/v1/chat/completions", &chat("capped")).await);
    // The SDK's own timeout (10 s) bounds it, and no retry is allowed: a hang fails.
    let stdout = crate::support::python("busy.py", &[&app.url("/v1"), "capped"]).await;
    let line = stdout.trim();
    assert!(
        line.starts_with("429 ") && line.ends_with(" model_at_capacity"),
        "{line}"
    );
}

#[tokio::test]
async fn a_request_still_queued_when_the_grace_period_ends_gets_a_503() {
    use crate::startup::Running;
    let text = "[models.capped]\nqueue = 5\nqueue_timeout_ms = 60000\n\
        [[models.capped.targets]]\nbackend = \"mock\"\nmodel = \"mock-hang\"\nmax_streams = 1\n";
    let path = config_file(text);
    let sluice = Running::start(&[
        ("SLUICE_CONFIG", path.to_str().expect("a path")),
        ("SLUICE_SHUTDOWN_GRACE_S", "1"),
    ]);
    let http = reqwest::Client::new();
    let url = sluice.url("/v1/chat/completions");
    let pool = || async {
        let ready: Value = http
            .get(sluice.url("/readyz"))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("JSON");
        ready["pools"][0].clone()
    };
    let until = |what: &'static str, done: fn(&Value) -> bool| async move {
        let started = Instant::now();
        while !done(&pool().await) {
            assert!(started.elapsed() < DEADLINE, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // One request holds the target's one slot (its first token never comes); the next waits.
    let held = tokio::spawn(http.post(&url).json(&chat("capped")).send());
    until("the first request never started", |p| {
        p["targets"][0]["open_streams"] == 1
    })
    .await;
    let queued = tokio::spawn(http.post(&url).json(&chat("capped")).send());
    until("the second request never queued", |p| p["waiting"] == 1).await;
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &sluice.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(signalled.success());
    let queued = tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("answered within the grace period and a second")
        .expect("joined")
        .expect("an answer, not a reset");
    assert_eq!(queued.status(), 503);
    let body: Value = queued.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "server_restarting");
    drop(held);
}

/// Requests waiting in route `model`'s queue, as `/readyz` counts them.
async fn queued(app: &TestApp, model: &str) -> u64 {
    let ready = app.get_json("/readyz").await;
    ready["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["model"] == model && p["fallback"] == 0)
        .and_then(|p| p["waiting"].as_u64())
        .expect("the route's pool")
}

/// Waits, up to the deadline, until `n` requests wait in route `model`'s queue.
async fn wait_queued(app: &TestApp, model: &str, n: u64) {
    let started = Instant::now();
    while queued(app, model).await != n {
        assert!(started.elapsed() < DEADLINE, "{n} never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_key_filling_a_pool_and_its_queue_does_not_lock_another_out() {
    let (a, b) = (FakeUpstream::spawn().await, FakeUpstream::spawn().await);
    let mut text = "[models.llama]\nqueue = 2\nqueue_timeout_ms = 30000\n".to_owned();
    text += &targets(
        "llama",
        &[
            (&a, "hold-3000", "max_streams = 1"),
            (&b, "hold-3000", "max_streams = 1"),
        ],
    );
    let path = config_file(&text);
    let app = app_with(&path, |c| {
        c.api_keys = vec!["sk-hog".into(), "sk-victim".into()];
        c.config_watch = true;
    })
    .await;
    // The hog takes both slots and both places in the queue; its fifth is refused.
    let hog = futures::future::join_all((0..4).map(|_| ask_as(&app, "sk-hog", "llama", "Hi")));
    let victim = async {
        wait_queued(&app, "llama", 2).await;
        assert_eq!(ask_as(&app, "sk-hog", "llama", "Hi").await, 429);
        // A reload carries the queue over: the same two wait, and no more may.
        std::fs::write(&path, format!("{text}\n# edited\n")).expect("rewrite");
        app.wait_metric_at_least("sluice_config_reloads_total{outcome=\"ok\"}", 1.0)
            .await;
        assert_eq!(queued(&app, "llama").await, 2);
        // The victim arriving now takes the hog's newest place, and the next slot.
        let started = Instant::now();
        let status = ask_as(&app, "sk-victim", "llama", "Hi").await;
        (status, started.elapsed())
    };
    let (hogs, (victim, waited)) = tokio::join!(hog, victim);
    assert_eq!(victim, 200, "the victim waited its turn");
    let mut hogs = hogs;
    hogs.sort_unstable();
    assert_eq!(hogs, [200, 200, 200, 429], "the hog gave one place up");
    println!("the victim waited {waited:?}");
    assert_eq!((a.count() + b.count()), 4);
}

#[tokio::test]
async fn a_reload_never_opens_the_door() {
    let keyed =
        "[models.llama]\nbackend = \"mock\"\nmodel = \"mock\"\n\n[keys.team]\nkey = \"sk-team\"\n";
    let path = config_file(keyed);
    let app = app_with(&path, |c| c.config_watch = true).await;
    let status = |key: Option<&'static str>, model: &'static str| {
        let mut request = app.http.post(app.url("/v1/chat/completions"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let request = request.json(&chat(model));
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    let refused = "sluice_config_reloads_total{outcome=\"refused\"}";
    let reloaded = "sluice_config_reloads_total{outcome=\"ok\"}";
    let keyless = std::sync::Mutex::new(Vec::new());
    let probe = async {
        for _ in 0..200 {
            for model in ["llama", "mock"] {
                let got = status(None, model).await;
                keyless.lock().expect("lock").push(got);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let edits = async {
        // A file caught before its keys (written in place), then caught empty.
        std::fs::write(&path, "[models.llama]\nbackend = \"mock\"\n").expect("write");
        app.wait_metric_at_least(refused, 1.0).await;
        std::fs::write(&path, "").expect("write");
        app.wait_metric_at_least(refused, 2.0).await;
        // A generator writing the file over three seconds: read once, when it is whole.
        let lines: Vec<String> = (0..30)
            .map(|i| format!("# line {i} of a generated file"))
            .chain(keyed.lines().map(str::to_owned))
            .chain(["[keys.more]".into(), "key = \"sk-more\"".into()])
            .collect();
        std::fs::write(&path, "").expect("truncate");
        let mut text = String::new();
        for line in &lines {
            text += line;
            text += "\n";
            std::fs::write(&path, &text).expect("write");
            tokio::time::sleep(Duration::from_millis(90)).await;
        }
        app.wait_metric_at_least(reloaded, 1.0).await;
    };
    tokio::join!(probe, edits);
    let keyless = keyless.into_inner().expect("lock");
    assert!(keyless.iter().all(|s| *s == 401), "{keyless:?}");
    assert_eq!(app.metric(reloaded).await, 1.0, "read once, whole");
    assert_eq!(app.metric(refused).await, 2.0);
    assert_eq!(status(Some("sk-more"), "llama").await, 200);
    // Opening the door is said in so many words.
    std::fs::write(&path, "open = true\n[models.llama]\nbackend = \"mock\"\n").expect("write");
    app.wait_metric_at_least(reloaded, 2.0).await;
    assert_eq!(status(None, "llama").await, 200);
}

#[tokio::test]
async fn a_target_removed_by_a_reload_leaves_metrics() {
    let (a, b) = (FakeUpstream::spawn().await, FakeUpstream::spawn().await);
    let both = targets("llama", &[(&a, "gpt-test", ""), (&b, "gpt-test", "")]);
    let path = config_file(&both);
    let app = app_with(&path, |c| c.config_watch = true).await;
    for _ in 0..2 {
        assert_eq!(ask(&app, "llama").await.0, 200);
    }
    let port = |u: &FakeUpstream| u.base_url().trim_end_matches("/v1").to_owned();
    assert!(app.metrics().await.contains(&port(&b)));
    std::fs::write(&path, targets("llama", &[(&a, "gpt-test", "")])).expect("rewrite");
    app.wait_metric_at_least("sluice_config_reloads_total{outcome=\"ok\"}", 1.0)
        .await;
    let text = app.metrics().await;
    assert!(text.contains(&port(&a)), "the remaining target is there");
    assert!(!text.contains(&port(&b)), "{text}");
}
