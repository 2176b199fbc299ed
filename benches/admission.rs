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
        budget: None,
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

/// Admissions a second from 64 clients at once, through one Redis and through a Cluster of
/// three primaries, side by side, and the share of the scripts each node ran: the clients'
/// limits spread over the Cluster's nodes (no one key every admission touches).
fn spread(_: &mut Criterion) {
    if !redis_nodes::available(&["redis-server", "redis-cli"]) {
        eprintln!("skipped: admissions on one node and on a Cluster (no redis-server here)");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    const FOR: std::time::Duration = std::time::Duration::from_secs(5);
    for (name, server) in [
        ("one node", redis_nodes::Redis::single()),
        ("3-primary cluster", redis_nodes::Redis::cluster()),
    ] {
        let shared = SharedLimits {
            link: sluice::link::Link::open(&server.url).expect("url"),
            fail_closed: true,
            errors: metrics::Counter::noop(),
        };
        let admission = Admission::new(Vec::new(), limits(), Vec::new(), 1_000_000, Some(shared))
            .expect("admission");
        let stop = tokio_util::sync::CancellationToken::new();
        runtime.spawn(admission.clone().maintain(stop.clone()));
        let before = server.scripts_run();
        let clients: Vec<_> = (0..64u8)
            .map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, i));
                admission
                    .identify(None, std::iter::empty(), Some(ip))
                    .expect("open")
            })
            .collect();
        let admitted: u64 = runtime.block_on(async {
            let until = std::time::Instant::now() + FOR;
            let each = clients.iter().map(|who| {
                let admission = admission.clone();
                async move {
                    let mut n = 0;
                    while std::time::Instant::now() < until {
                        let permit = admission.admit(who, "mock").await.expect("admitted");
                        drop(permit);
                        n += 1;
                    }
                    n
                }
            });
            futures::future::join_all(each).await.into_iter().sum()
        });
        let after = server.scripts_run();
        let ran: Vec<u64> = after
            .iter()
            .map(|(port, n)| {
                n - before
                    .iter()
                    .find(|(p, _)| p == port)
                    .map_or(0, |(_, b)| *b)
            })
            .filter(|n| *n > 0)
            .collect();
        let total: u64 = ran.iter().sum();
        let shares: Vec<String> = ran
            .iter()
            .map(|n| format!("{:.0} %", *n as f64 * 100.0 / total.max(1) as f64))
            .collect();
        println!(
            "admissions through Redis, {name}: {:.0} a second from 64 clients; scripts by node: {}",
            admitted as f64 / FOR.as_secs_f64(),
            shares.join(", ")
        );
        stop.cancel();
    }
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

criterion_group!(benches, admission, spread, counting);
criterion_main!(benches);
