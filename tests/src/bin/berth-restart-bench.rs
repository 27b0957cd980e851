//! berth-restart-bench: the downtime of nightly restarts of the test tenant, as the tenant's
//! clients see it. Starts a coordinator and an agent on the local Docker engine, places
//! `--tenants` test tenants whose nightly slots fall in the next minute (a window opened this
//! minute, tenant ids picked by the agent's own slot arithmetic), and watches each one's
//! health endpoint every 10 ms through its restart.
//!
//! Run as root with dockerd running, after `cargo build --release --workspace --bins`:
//! `target/release/berth-restart-bench --tenants 5`

use std::time::Duration;

use berth_tests::fleet::{Outage, fleet_with, nightly_slot_soon, unique};

/// The target of the issue: one nightly restart keeps the tenant down at most this long.
const LIMIT: Duration = Duration::from_secs(2);

fn main() {
    let mut tenants = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--tenants", Some(n)) => {
                tenants = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=8).contains(n))
                    .unwrap_or_else(|| {
                        eprintln!("--tenants: a number from 1 to 8");
                        std::process::exit(2)
                    })
            }
            _ => {
                eprintln!("usage: berth-restart-bench [--tenants N]");
                std::process::exit(2)
            }
        }
    }
    let Some(f) = fleet_with("[restarts]\nskip_if_started_within = \"0s\"\n") else {
        eprintln!("no Docker engine");
        std::process::exit(1)
    };
    // Slots 8 s apart, so each restart is measured on its own.
    let mut placed = Vec::new();
    for i in 0..tenants as u64 {
        let (tenant, window, slot) = nightly_slot_soon(
            &unique("rb"),
            Duration::from_secs(15 + 8 * i),
            Duration::from_secs(18 + 8 * i),
        );
        f.place_with_window(&tenant, &window);
        placed.push((tenant, slot));
    }
    let mut watched = Vec::new();
    for (tenant, slot) in &placed {
        let view = f.wait_serving(tenant, Duration::from_secs(20));
        let port = view["published_port"].as_u64().unwrap() as u16;
        let container = f.container(tenant);
        watched.push((
            tenant.clone(),
            *slot,
            berth_tests::docker::started_at(&container),
            Outage::watch(port),
        ));
    }
    let mut downtimes = Vec::new();
    println!(
        "{:<20} {:<26} {:>12}  AGENT'S NOTE",
        "TENANT", "SLOT", "DOWNTIME"
    );
    for (tenant, slot, first, outage) in watched {
        let (_, view) = f.wait_nightly_restart(&tenant, &first, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(300));
        let down = outage.stop();
        println!(
            "{tenant:<20} {:<26} {:>10.3} s  {}",
            slot.to_string(),
            down.as_secs_f64(),
            view["restart_note"].as_str().unwrap_or_default()
        );
        downtimes.push(down);
    }
    downtimes.sort();
    let p50 = downtimes[downtimes.len() / 2];
    let max = *downtimes.last().unwrap();
    println!(
        "nightly restart downtime over {} restarts: p50 {:.3} s, max {:.3} s; limit {:.1} s: max is {:.2}x the limit",
        downtimes.len(),
        p50.as_secs_f64(),
        max.as_secs_f64(),
        LIMIT.as_secs_f64(),
        max.as_secs_f64() / LIMIT.as_secs_f64()
    );
}
