//! The cost of choosing a pool's target for one request and giving its slot back: each
//! balance over three targets (one with a cap), and a pool of one (what every plain route
//! pays), in process.
//!
//! `cargo bench --bench pools`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::backend::Backend;
use sluice::backend::mock::MockBackend;
use sluice::dispatch::{Balance, Pool, PoolSettings, Route, Target, TargetState};

fn route(balance: Balance, targets: usize) -> Arc<Route> {
    let backend: Arc<dyn Backend> =
        Arc::new(MockBackend::new(0.0, Vec::new(), metrics::Counter::noop()));
    let targets = (0..targets)
        .map(|i| Target {
            weight: 1 + i as u32,
            max_streams: (i == 0).then_some(1_000_000),
            ..Target::new(
                backend.clone(),
                Some("mock".into()),
                TargetState::new(&format!("mock@t{i}")),
            )
        })
        .collect();
    let pool = Pool::new(
        targets,
        PoolSettings {
            balance,
            queue: 100,
            queue_timeout: Duration::from_secs(5),
            waitlist: Arc::default(),
            shared: None,
        },
    );
    Arc::new(Route {
        pools: vec![pool],
        unset: Vec::new(),
    })
}

fn pools(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cases = [
        ("target choice: pool of one", route(Balance::Weighted, 1)),
        ("target choice: weighted, 3", route(Balance::Weighted, 3)),
        ("target choice: least-busy, 3", route(Balance::LeastBusy, 3)),
        ("target choice: latency, 3", route(Balance::Latency, 3)),
    ];
    for (name, route) in cases {
        c.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| async {
                let start = route.begin(1).await.expect("a target");
                drop(start);
            })
        });
    }
}

criterion_group!(benches, pools);
criterion_main!(benches);
