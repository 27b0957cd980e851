//! berth-drain-bench: how long a drain takes against the bound
//! `1.2 × (volume bytes ÷ stream throughput) + restart time × ⌈tenants ÷ max-parallel⌉`.
//!
//! A coordinator and three agents on the local Docker engine, in this host's network
//! namespace. First a probe tenant with a
//! `--probe-mib` volume is drained alone: the source agent's own log gives the stream
//! throughput (bytes and milliseconds of the export, which starts once the volume is closed
//! and ends when the last chunk is sent), and the median downtime of five `berthctl restart`s
//! of the moved probe gives one tenant's restart time. Then `--tenants`
//! tenants with `--volume-mib` of random data each are drained with `--max-parallel` (and
//! `--no-precopy` if given), timed from the drain call until `drain-status` says done (polled
//! every 100 ms). The probe is drained without a pre-copy, so its stream is the whole volume
//! of a closed volume.
//!
//! Run as root with dockerd running, after `cargo build --release --workspace --bins`:
//! `target/release/berth-drain-bench --tenants 6 --volume-mib 64 --max-parallel 2`

use std::time::{Duration, Instant};

use berth_tests::multihost::{Host, drain_status, fleet, json, tenants_on};
use berth_tests::procs::CoordinatorProc;
use berth_tests::wait_for;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| {
                eprintln!("{name}: a positive number");
                std::process::exit(2)
            }),
    }
}

/// Drains `host` (with pre-copies unless `no_precopy`) and waits until it is done; returns
/// the wall time.
fn drain(c: &CoordinatorProc, host: &str, max_parallel: usize, no_precopy: bool) -> Duration {
    // The kernel writes back the volumes just filled in its own time: first all of it, so the
    // drain is not charged with the set-up's writes.
    assert!(
        std::process::Command::new("sync")
            .status()
            .is_ok_and(|s| s.success()),
        "sync failed"
    );
    let began = Instant::now();
    let max_parallel = max_parallel.to_string();
    let mut args = vec!["drain", host, "--max-parallel", &max_parallel];
    if no_precopy {
        args.push("--no-precopy");
    }
    json(c, &args);
    let ended = wait_for("the drain done", Duration::from_secs(1800), || {
        let s = drain_status(c, host);
        (s["phase"] != "running").then_some(s)
    });
    let took = began.elapsed();
    if ended["phase"] != "done" {
        eprintln!("the drain ended {}: {ended:#}", ended["phase"]);
        std::process::exit(1)
    }
    took
}

/// Bytes and milliseconds of the last whole-volume export (a pre-copy) logged by `host`'s
/// agent.
fn last_export(host: &Host) -> (u64, u64) {
    let log = host.agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("volume transferred") && l.contains("Export") && l.contains("base=0 "))
        .unwrap_or_else(|| panic!("no whole export in the agent's log:\n{log}"));
    let field = |name: &str| -> u64 {
        let start = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        line[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|v| v.parse().ok())
            .expect(name)
    };
    (field("bytes"), field("ms"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tenants = arg(&args, "--tenants", 6);
    let volume_mib = arg(&args, "--volume-mib", 64);
    let max_parallel = arg(&args, "--max-parallel", 2);
    let probe_mib = arg(&args, "--probe-mib", 256);
    let no_precopy = args.iter().any(|a| a == "--no-precopy");
    let Some((_net, coordinator, hosts)) = fleet(3, false) else {
        eprintln!("needs root, network namespaces and a Docker engine");
        std::process::exit(1)
    };
    let ids: Vec<String> = hosts.iter().map(|h| h.agent.host_id.clone()).collect();

    // The probe: one tenant's volume alone, and one restart.
    let probe = tenants_on(&coordinator, &hosts[2], &[&ids[0], &ids[1]], 1, probe_mib);
    let probe_id = probe.keys().next().unwrap().clone();
    drain(&coordinator, &ids[2], 1, true);
    let (bytes, ms) = last_export(&hosts[2]);
    let throughput = bytes as f64 / (ms.max(1) as f64 / 1000.0);
    // One restart varies by a third from run to run: the median of five.
    let mut downtimes: Vec<u64> = (0..5)
        .map(|_| {
            json(&coordinator, &["restart", &probe_id])["downtime_ms"]
                .as_u64()
                .unwrap()
        })
        .collect();
    downtimes.sort_unstable();
    let restart_s = downtimes[2] as f64 / 1000.0;
    assert!(coordinator.berthctl(&["uncordon", &ids[2]]).0);
    assert!(coordinator.berthctl(&["remove", &probe_id, "--purge"]).0);

    // The drain itself.
    let data = tenants_on(
        &coordinator,
        &hosts[0],
        &[&ids[1], &ids[2]],
        tenants,
        volume_mib,
    );
    let total_bytes = (data.len() * (volume_mib << 20)) as f64;
    let took = drain(&coordinator, &ids[0], max_parallel, no_precopy).as_secs_f64();
    let rounds = tenants.div_ceil(max_parallel) as f64;
    let limit = 1.2 * total_bytes / throughput + restart_s * rounds;
    if std::env::var_os("BERTH_BENCH_LOG").is_some() {
        eprintln!("{}", coordinator.log());
        for h in &hosts {
            eprintln!("--- {}\n{}", h.agent.host_id, h.agent.log());
        }
    }
    println!(
        "stream throughput: {:.1} MiB/s ({} MiB in {ms} ms)",
        throughput / f64::from(1 << 20),
        bytes >> 20
    );
    println!("one tenant's restart: {restart_s:.2} s (median of {downtimes:?} ms)");
    println!(
        "drain of {tenants} tenants × {volume_mib} MiB, {max_parallel} at once{}: {took:.2} s; bound 1.2 × {:.2} s + {restart_s:.2} s × {rounds} = {limit:.2} s; ratio {:.2}",
        if no_precopy { ", no pre-copy" } else { "" },
        total_bytes / throughput,
        took / limit
    );
}
