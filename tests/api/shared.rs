//! Limits shared through a real Redis: two sluice instances admit together what one quota
//! allows, hold one stream cap, and behave as configured when Redis dies.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{DEADLINE, TestApp, all_events, events, skip_without};

#[path = "../../examples/common/redis.rs"]
mod nodes;

/// Redis of this test's own (see `examples/common/redis.rs`), or a skip when the machine
/// lacks it.
pub(crate) struct Redis(nodes::Redis);

impl std::ops::Deref for Redis {
    type Target = nodes::Redis;
    fn deref(&self) -> &nodes::Redis {
        &self.0
    }
}

impl std::ops::DerefMut for Redis {
    fn deref_mut(&mut self) -> &mut nodes::Redis {
        &mut self.0
    }
}

impl Redis {
    pub(crate) fn start() -> Option<Redis> {
        if !nodes::available(&["redis-server"])
            && skip_without("redis-server (Debian package redis-server)")
        {
            return None;
        }
        Some(Redis(nodes::Redis::single()))
    }

    pub(crate) fn cluster() -> Option<Redis> {
        if !nodes::available(&["redis-server", "redis-cli"])
            && skip_without("redis-server and redis-cli (Debian package redis-server)")
        {
            return None;
        }
        Some(Redis(nodes::Redis::cluster()))
    }

    /// A connection of the test's own, on the same link sluice uses.
    pub(crate) async fn connection(&self) -> sluice::link::Connection {
        sluice::link::Link::open(&self.url)
            .expect("url")
            .connect(Duration::from_secs(2))
            .await
            .expect("connects")
    }

    /// Waits until a replica serves `key`'s slot in place of the dead primary `dead`.
    pub(crate) async fn wait_failover(&self, key: &str, dead: u16) {
        let started = Instant::now();
        while !self.failed_over(key, dead) {
            assert!(started.elapsed() < DEADLINE * 6, "no replica took over");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs each named test (an `async fn(Redis)`) twice: against one redis-server
/// (`one_server::…`) and against a Redis Cluster of three primaries and three replicas
/// (`cluster::…`).
macro_rules! on_one_server_and_a_cluster {
    ($($test:ident),* $(,)?) => {
        mod one_server {
            $(
                #[tokio::test]
                async fn $test() {
                    if let Some(redis) = crate::shared::Redis::start() {
                        super::$test(redis).await;
                    }
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $test() {
                    if let Some(redis) = crate::shared::Redis::cluster() {
                        super::$test(redis).await;
                    }
                }
            )*
        }
    };
}
pub(crate) use on_one_server_and_a_cluster;

fn chat(max_tokens: u32) -> Value {
    json!({"model": "mock", "stream": true, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Hi"}]})
}

async fn instance(redis: &Redis, adjust: impl FnOnce(&mut sluice::Config)) -> TestApp {
    let url = redis.url.clone();
    TestApp::spawn_with(move |c| {
        c.redis_url = Some(url);
        adjust(c);
    })
    .await
}

async fn two_instances_share_one_request_quota(redis: Redis) {
    let limits = |c: &mut sluice::Config| {
        c.rpm = 6; // one request every 10 s, after...
        c.rpm_burst = Some(4); // ...a burst of four, for both instances together
    };
    let a = instance(&redis, limits).await;
    let b = instance(&redis, limits).await;
    let mut admitted = 0;
    for i in 0..10 {
        let app = if i % 2 == 0 { &a } else { &b };
        let response = app.post("/v1/chat/completions", &chat(2)).await;
        match response.status().as_u16() {
            200 => {
                admitted += 1;
                all_events(response).await;
            }
            429 => assert!(response.headers().contains_key("retry-after")),
            other => panic!("status {other}"),
        }
    }
    assert_eq!(
        admitted, 4,
        "the two instances together admitted {admitted}"
    );
    assert_eq!(a.metric("sluice_redis_errors_total").await, 0.0);
}

async fn two_instances_share_one_stream_cap(redis: Redis) {
    let limits = |c: &mut sluice::Config| {
        c.max_streams = 1;
        c.mock_tokens_per_s = 2.0;
    };
    let a = instance(&redis, limits).await;
    let b = instance(&redis, limits).await;
    let open = events(a.post("/v1/chat/completions", &chat(100)).await);
    let refused = b.post("/v1/chat/completions", &chat(100)).await;
    assert_eq!(refused.status(), 429);

    // The client leaves instance a; instance b admits once the release has reached Redis.
    drop(open);
    all_events(admitted_soon(&b, &chat(2)).await).await;
}

async fn a_crashed_instance_cannot_hold_permits(redis: Redis) {
    let app = instance(&redis, |c| c.max_streams = 1).await;
    // A permit left by an instance that crashed: nobody refreshes it, it expires in 300 ms.
    let mut conn = redis.connection().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .expect("TIME");
    let expiry = secs * 1000 + micros / 1000 + 300;
    let _: i64 = redis::cmd("ZADD")
        .arg(sluice::admission::shared::client_key(
            "127.0.0.1",
            "streams",
        ))
        .arg(expiry)
        .arg("crashed-instance")
        .query_async(&mut conn)
        .await
        .expect("ZADD");
    let held = app.post("/v1/chat/completions", &chat(2)).await;
    assert_eq!(
        held.status(),
        429,
        "the crashed instance's permit counts while it lasts"
    );
    all_events(admitted_soon(&app, &chat(2)).await).await;
}

async fn when_redis_dies_each_instance_fails_as_configured(mut redis: Redis) {
    let open = instance(&redis, |c| c.redis_failure = "open".into()).await;
    let closed = instance(&redis, |c| c.redis_failure = "closed".into()).await;
    for app in [&open, &closed] {
        let response = app.post("/v1/chat/completions", &chat(2)).await;
        assert_eq!(response.status(), 200);
        all_events(response).await;
    }

    redis.kill();
    // Fail-open: this instance's own limits apply, and the failure is counted.
    let response = open.post("/v1/chat/completions", &chat(2)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .contains_key("x-ratelimit-remaining-requests")
    );
    all_events(response).await;
    assert!(open.metric("sluice_redis_errors_total").await >= 1.0);
    // A resumable stream is served without resumption, and counted.
    let response = open.post("/api/chat", &json!({"prompt": "Hi"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-sluice-resumable")
            .map(|v| v.as_bytes()),
        Some(&b"false"[..])
    );
    all_events(response).await;
    assert!(
        open.metric("sluice_streams_not_resumable_total{reason=\"redis\"}")
            .await
            >= 1.0
    );
    // Fail-closed: refused, with a time to retry.
    let response = closed.post("/v1/chat/completions", &chat(2)).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "server_busy");
}

/// Posts until admitted: a release reaches Redis through the instance's background task.
async fn admitted_soon(app: &TestApp, body: &Value) -> reqwest::Response {
    let started = Instant::now();
    loop {
        let response = app.post("/v1/chat/completions", body).await;
        if response.status() == 200 {
            return response;
        }
        assert_eq!(response.status(), 429);
        assert!(started.elapsed() < DEADLINE, "never admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn token_budgets_are_shared_and_settled(redis: Redis) {
    let limits = |c: &mut sluice::Config| c.tpm = Some(1000);
    let a = instance(&redis, limits).await;
    let b = instance(&redis, limits).await;
    // Each reserves ~610 of 1000 and uses ~50. Settled, the next fits within moments;
    // unsettled, the budget would take over half a minute to refill.
    for app in [&a, &b, &a, &b] {
        all_events(admitted_soon(app, &chat(600)).await).await;
    }
}

crate::shared::on_one_server_and_a_cluster!(
    two_instances_share_one_request_quota,
    two_instances_share_one_stream_cap,
    a_crashed_instance_cannot_hold_permits,
    when_redis_dies_each_instance_fails_as_configured,
    token_budgets_are_shared_and_settled,
);
