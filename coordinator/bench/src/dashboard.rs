//! `berth-bench dashboard`: the fleet page of a seeded fleet (real registry and placement code
//! in memory), rendered end to end as the HTTP handler does it: size and time per render.
//! With `--serve ADDR` it serves that fleet's dashboard instead (for screenshots).

use std::net::SocketAddr;
use std::time::Instant;

use berth_coordinator::dashboard;
use berth_coordinator::testing::seed;
use serde_json::json;

/// The targets for 500 hosts and 10,000 tenants.
const LIMIT_MS: f64 = 50.0;
const LIMIT_BYTES: usize = 200 * 1024;

pub fn run(hosts: usize, tenants: usize, renders: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let c = seed::seeded(hosts, tenants)?;
    let seeded_seconds = started.elapsed().as_secs_f64();
    let placed = c.placements.tenants(None).len();
    let mut millis = Vec::with_capacity(renders);
    let mut bytes = 0;
    for _ in 0..renders {
        let t = Instant::now();
        let html = std::hint::black_box(dashboard::fleet_page(&c)?);
        millis.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes = html.len();
    }
    millis.sort_by(f64::total_cmp);
    let pct = |p: f64| millis[((millis.len() as f64 * p) as usize).min(millis.len() - 1)];
    println!(
        "{}",
        json!({ "dashboard": { "hosts": hosts, "tenants_placed": placed, "renders": renders,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0), "bytes": bytes,
            "p99_over_limit": pct(0.99) / LIMIT_MS, "bytes_over_limit": bytes as f64 / LIMIT_BYTES as f64,
            "seed_seconds": seeded_seconds } })
    );
    Ok(())
}

pub async fn serve(hosts: usize, tenants: usize, addr: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--serve {addr}: the seeded dashboard serves on loopback only"
    );
    let backend = seed::backend(hosts, tenants)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // Scripts wait for this line to learn the port.
    println!("serving http://{}/", listener.local_addr()?);
    axum::serve(
        listener,
        dashboard::router(backend, dashboard::HttpAccess::Loopback),
    )
    .await?;
    Ok(())
}
