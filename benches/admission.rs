//! The cost of one admission (identify the client, check requests, reserve tokens, take a
//! stream permit, release it), in process and through Redis; and of counting a hostile
//! prompt's tokens (a megabyte of `!`, a million spaces), which admission pays after the
//! cheap checks.
//!
//! `cargo bench --bench admission`. The Redis case starts its own redis-server on a free
//! port, and is skipped with a message when the binary is missing.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "../examples/common/redis.rs"]
mod redis_nodes;
use sluice::admission::{Admission, Limits, SharedLimits};

fn limits() -> Limits {
    Limits {
        rpm: 1_000_000_000, // never the limit here: the cost is what is measured
        burst: 1_000_000_000,
        tpm: Some(1_000_000_000),
        max_streams: 1_000_000,
        models: None,
    }
}

fn bench(
    c: &mut Criterion,
    name: &str,
    admission: Arc<Admission>,
    runtime: &tokio::runtime::Runtime,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    runtime.spawn(admission.clone().maintain(stop.clone()));
    let who = admission
        .identify(
            None,
            std::iter::empty(),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        )
        .expect("open");
    c.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            let mut permit = admission.admit(&who, "mock").await.expect("admitted");
            permit.reserve(100).await.expect("reserved");
            permit.settle(60);
        })
    });
    stop.cancel();
}

fn admission(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let local =
        Admission::new(Vec::new(), limits(), Vec::new(), 1_000_000, None).expect("admission");
    bench(c, "admission in process", local, &runtime);

    if !redis_nodes::available(&["redis-server"]) {
        eprintln!("skipped: admission through Redis (no redis-server on this machine)");
        return;
    }
    let server = redis_nodes::Redis::single();
    let shared = SharedLimits {
        link: sluice::link::Link::open(&server.url).expect("url"),
        fail_closed: true, // a failure must not be measured as a fast local admission
        errors: metrics::Counter::noop(),
    };
    let through_redis = Admission::new(Vec::new(), limits(), Vec::new(), 1_000_000, Some(shared))
        .expect("admission");
    bench(c, "admission through Redis", through_redis, &runtime);
    drop(server);
}

fn counting(c: &mut Criterion) {
    let mut group = c.benchmark_group("count");
    group.sample_size(10);
    let bang = "!".repeat(1_000_000);
    group.bench_function("1 MB of !", |b| b.iter(|| sluice::tokens::text(&bang)));
    let spaces = " ".repeat(1_000_001);
    group.bench_function("1,000,001 spaces", |b| {
        b.iter(|| sluice::tokens::text(&spaces))
    });
    let prose = "The quick brown fox jumps over the lazy dog. ".repeat(22_000);
    group.bench_function("1 MB of prose", |b| b.iter(|| sluice::tokens::text(&prose)));
    group.finish();
}

criterion_group!(benches, admission, counting);
criterion_main!(benches);
