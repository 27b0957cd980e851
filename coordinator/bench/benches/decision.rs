//! One placement decision in a fleet of 10,000 hosts with 200,000 tenants placed.
//! `cargo bench -p berth-coordinator --bench decision`; `berth-bench decide` reports p99.

use berth_coordinator::testing::synthetic;
use criterion::{Criterion, criterion_group, criterion_main};

fn decision(c: &mut Criterion) {
    let (scheduler, mut rng) = synthetic::fleet(10_000, 200_000, 7);
    let requests: Vec<_> = (0..4096)
        .map(|i| synthetic::request(&mut rng, 200_000 + i))
        .collect();
    let mut next = 0;
    c.bench_function("choose/10k_hosts/200k_tenants", |b| {
        b.iter(|| {
            next = (next + 1) % requests.len();
            std::hint::black_box(scheduler.choose(&requests[next].request()))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(200);
    targets = decision
}
criterion_main!(benches);
