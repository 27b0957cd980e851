//! CPU on the real Docker engine: a tenant's request is its weight and its limit its quota,
//! it bursts past the one up to the other, its host measures and reports what it uses, and
//! the fleet's capacity report counts both. Alone in its test binary: the other container
//! tests' tenants would share this machine's two cores with the burst.

use std::time::Duration;

use berth_tests::docker::inspect;
use berth_tests::fleet::{fleet, http_get_within, unique};

/// CPU is compressible: a tenant that requests a quarter of a core bursts past it when the
/// host has CPU to spare, up to its limit (1.5 cores here, on a machine of 2), never beyond.
#[test]
fn a_tenant_bursts_past_its_cpu_request_up_to_its_limit() {
    let Some(f) = fleet() else { return };
    let tenant = unique("burst");
    f.place_toml(&tenant, "128MiB", (250, 1500), &[], "");
    let view = f.wait_serving(&tenant, Duration::from_secs(60));
    assert_eq!(
        (
            view["cpu_millicores"].as_u64(),
            view["cpu_limit_millicores"].as_u64()
        ),
        (Some(250), Some(1500))
    );
    let hc = &inspect(&f.container(&tenant)).expect("container")["HostConfig"];
    assert_eq!(hc["CpuShares"], 256);
    assert_eq!(
        (hc["CpuPeriod"].as_i64(), hc["CpuQuota"].as_i64()),
        (Some(100_000), Some(150_000))
    );
    let port = view["published_port"].as_u64().unwrap() as u16;
    // Three busy threads for 12 s: as much as the quota lets through. Meanwhile the agent
    // measures it from the cgroup (at its looks, every 5 s) and reports it.
    let spin = std::thread::spawn(move || {
        http_get_within(port, "/spin?ms=12000&threads=3", Duration::from_secs(20))
    });
    let mut reported = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until && reported.last().is_none_or(|r| *r <= 500) {
        std::thread::sleep(Duration::from_millis(250));
        if let Some(used) = f
            .tenant(&tenant)
            .and_then(|t| t["cpu_used_millicores"].as_u64())
        {
            reported.push(used);
        }
    }
    eprintln!("the agent reported {reported:?} mCPU used");
    let most = reported.iter().max().copied().unwrap_or(0);
    assert!(most > 500, "no burst reported: {reported:?}");
    assert!(most <= 1_650, "reported past the limit: {reported:?}");
    let answer = spin.join().unwrap().expect("the spin answers");
    // The fleet's capacity counts its request and the use its host reported.
    let (ok, out, err) = f.coordinator.berthctl(&["--json", "capacity"]);
    assert!(ok, "{err}");
    let capacity: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        capacity["cpu_requested_millicores"].as_u64() >= Some(250),
        "{capacity}"
    );
    assert!(
        capacity["cpu_capacity_millicores"].as_u64() >= Some(1000),
        "{capacity}"
    );
    assert!(
        capacity["tiers"].as_array().is_some_and(|t| t.len() == 3),
        "{capacity}"
    );
    let (ok, out, err) = f.coordinator.berthctl(&["capacity", "--advice"]);
    assert!(ok && out.starts_with("no advice"), "{out}{err}");
    let figures: Vec<f64> = answer
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let cores = figures[0] / figures[1];
    eprintln!("{answer:?}: {cores:.2} cores used, 0.25 requested, 1.5 the limit");
    assert!(cores > 0.5, "no burst past the request: {answer}");
    assert!(cores < 1.65, "past the limit: {answer}");
}
