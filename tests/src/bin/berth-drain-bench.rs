//! berth-drain-bench: how long a drain takes against the bound
//! `1.2 × (volume bytes ÷ stream throughput) + restart time × ⌈tenants ÷ max-parallel⌉`.
//!
//! A coordinator and three agents on the local Docker engine, in this host's network
//! namespace. First a probe tenant with a `--probe-mib` volume is drained alone: the source
//! agent's own log gives the stream throughput (bytes and milliseconds of the export, which
//! starts once the volume is closed and ends when the last chunk is sent), and the median
//! downtime of five `berthctl restart`s of the moved probe gives one tenant's restart time.
//! The probe is drained without a pre-copy, so its stream is the whole of a closed volume.
//! Then `--tenants` tenants with `--volume-mib` of random data each are drained with
//! `--max-parallel` (and `--no-precopy` if given), timed from the drain call until it is done,
//! as one `berthctl drain --wait` sees it. Their files are first left to settle, as a running
//! tenant's mostly are (`--fresh-data`: drained at once, every file just written and so read
//! again after the stop).
//!
//! It also prints the machine's busy CPU time during the drain and one restart (from
//! `/proc/stat`), and berth's processes' share of it (from `/proc/PID/stat`): divided by the
//! CPUs, it is a floor no scheduling gets under, on one machine that runs the coordinator,
//! all agents and Docker. With `--max-parallel` above 1 it times Docker restarting that many
//! of the moved containers at once against one, and prints the ratio with a round of moves
//! counted as that round of restarts (the bound counts it as one restart).
//!
//! Run as root with dockerd running, after `cargo build --release --workspace --bins`:
//! `target/release/berth-drain-bench --tenants 6 --volume-mib 64 --max-parallel 2`

use std::time::{Duration, Instant};

use berth_node_agent::transfer::STAMP_SETTLED;
use berth_tests::multihost::{Host, fleet, json, tenants_on};
use berth_tests::procs::CoordinatorProc;

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

/// /proc counts CPU time in USER_HZ ticks, which Linux fixes at 100 for user space.
fn ticks(n: u64) -> Duration {
    Duration::from_millis(n * 10)
}

/// The CPU time process `pid` (all its threads) used so far, user and system.
fn process_cpu(pid: Option<u32>) -> Duration {
    let pid = pid.expect("a running process");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // After the command name in parentheses: state is field 3, utime and stime 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("(comm)") + 1..]
        .split_whitespace()
        .collect();
    ticks(
        fields[11..13]
            .iter()
            .map(|v| v.parse::<u64>().expect("a /proc/PID/stat counter"))
            .sum(),
    )
}

/// The whole machine's busy CPU time so far (every CPU, all but idle and I/O wait), and its
/// number of CPUs.
fn cpu_busy() -> (Duration, u32) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpus = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count() as u32;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .expect("the cpu line of /proc/stat")
        .split_whitespace()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v.parse::<u64>().expect("a /proc/stat counter"))
        .sum();
    (ticks(busy), cpus)
}

/// Drains `host` (with pre-copies unless `no_precopy`) and waits until it is done; returns
/// the wall time and the machine's busy CPU time meanwhile.
fn drain(
    c: &CoordinatorProc,
    host: &str,
    max_parallel: usize,
    no_precopy: bool,
) -> (Duration, Duration) {
    // The kernel writes back the volumes just filled in its own time: first all of it, so the
    // drain is not charged with the set-up's writes.
    assert!(
        std::process::Command::new("sync")
            .status()
            .is_ok_and(|s| s.success()),
        "sync failed"
    );
    let (busy_before, _) = cpu_busy();
    let began = Instant::now();
    let max_parallel = max_parallel.to_string();
    // One berthctl that waits on its connection: a process and a TLS handshake every look
    // would take CPU from the drain it times.
    let mut args = vec!["drain", host, "--max-parallel", &max_parallel, "--wait"];
    if no_precopy {
        args.push("--no-precopy");
    }
    let (_, out, err) = c.berthctl(&[&["--json"], &args[..]].concat());
    let took = began.elapsed();
    let busy = cpu_busy().0 - busy_before;
    let ended: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("berthctl drain --wait: {e}: {out}{err}"));
    if ended["phase"] != "done" {
        eprintln!("the drain ended {}: {ended:#}", ended["phase"]);
        std::process::exit(1)
    }
    (took, busy)
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

/// Each moved tenant's downtime in the drain of `host`, sorted: from the coordinator's log,
/// the time from its move's stop until it was healthy on its target (phases `stopping` and
/// `releasing`).
fn move_downtimes(c: &CoordinatorProc, host: &str) -> Vec<Duration> {
    let log = c.log();
    let started = log
        .rfind(&format!("drain started host={host} "))
        .expect("the drain's start in the coordinator's log");
    let mut stops = std::collections::BTreeMap::new();
    let mut downtimes = Vec::new();
    for line in log[started..].lines() {
        let (Some(at), Some(tenant), Some(phase)) = (
            line.split_whitespace()
                .next()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok()),
            line.split(" tenant=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next()),
            line.split(" phase=").nth(1),
        ) else {
            continue;
        };
        match phase.trim_matches('"') {
            "stopping" => {
                stops.insert(tenant.to_string(), at);
            }
            "releasing" => downtimes.extend(stops.get(tenant).map(|s| {
                Duration::try_from(at.duration_since(*s)).expect("released after its stop")
            })),
            _ => {}
        }
    }
    downtimes.sort_unstable();
    downtimes
}

/// How long `docker restart` of all of `containers` at once takes, until the last is back:
/// the median of five rounds.
fn docker_restarts(containers: &[String]) -> f64 {
    let mut rounds: Vec<Duration> = (0..5)
        .map(|_| {
            let began = Instant::now();
            std::thread::scope(|s| {
                for c in containers {
                    s.spawn(move || {
                        let out = std::process::Command::new("docker")
                            .args(["restart", c])
                            .output()
                            .expect("docker");
                        assert!(out.status.success(), "docker restart {c}: {out:?}");
                    });
                }
            });
            began.elapsed()
        })
        .collect();
    rounds.sort_unstable();
    rounds[2].as_secs_f64()
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
    // One restart varies by a third from run to run: the median of five, and of the CPU
    // time each kept busy.
    let (mut downtimes, mut restart_cpu): (Vec<u64>, Vec<Duration>) = (0..5)
        .map(|_| {
            let (before, _) = cpu_busy();
            let downtime = json(&coordinator, &["restart", &probe_id])["downtime_ms"]
                .as_u64()
                .unwrap();
            (downtime, cpu_busy().0 - before)
        })
        .unzip();
    downtimes.sort_unstable();
    restart_cpu.sort_unstable();
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
    // A tenant's files were mostly written long before a drain; files written within the
    // last STAMP_SETTLED are read again after the stop (see berth_node_agent::transfer).
    // `--fresh-data` drains at once, every file just written: the worst case.
    if !args.iter().any(|a| a == "--fresh-data") {
        std::thread::sleep(STAMP_SETTLED);
    }
    let total_bytes = (data.len() * (volume_mib << 20)) as f64;
    // berth's own processes' share of the machine's CPU time during the drain.
    let berth_cpu = || {
        [
            process_cpu(coordinator.pid()),
            process_cpu(hosts[0].agent.pid()),
            process_cpu(hosts[1].agent.pid()) + process_cpu(hosts[2].agent.pid()),
        ]
    };
    let berth_before = berth_cpu();
    let (took, busy) = drain(&coordinator, &ids[0], max_parallel, no_precopy);
    let berth_after = berth_cpu();
    let move_downtimes = move_downtimes(&coordinator, &ids[0]);
    let [coordinator_cpu, source_cpu, targets_cpu]: [f64; 3] =
        std::array::from_fn(|i| (berth_after[i] - berth_before[i]).as_secs_f64());
    let (took, busy) = (took.as_secs_f64(), busy.as_secs_f64());
    let cpus = cpu_busy().1;
    let rounds = tenants.div_ceil(max_parallel) as f64;
    let limit = 1.2 * total_bytes / throughput + restart_s * rounds;
    // The bound counts a round of `max_parallel` moves as one restart. How Docker here does
    // that many restarts at once against one (the moved tenants' containers, restarted by
    // Docker alone; berth's own restarts take a host's tenants one at a time by default).
    let docker_factor = (max_parallel > 1).then(|| {
        let placed = json(&coordinator, &["tenants"]);
        let containers: Vec<String> = data
            .keys()
            .take(max_parallel)
            .map(|t| {
                let host = placed
                    .as_array()
                    .and_then(|all| all.iter().find(|p| p["tenant_id"] == t.as_str()))
                    .and_then(|p| p["host_id"].as_str())
                    .expect("the moved tenant's host");
                berth_tests::docker::container_name(host, t)
            })
            .collect();
        docker_restarts(&containers) / docker_restarts(&containers[..1])
    });
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
    println!(
        "one tenant's restart: {restart_s:.2} s (median of {downtimes:?} ms), keeping the machine busy {:.2} CPU-s",
        restart_cpu[2].as_secs_f64()
    );
    println!(
        "drain of {tenants} tenants × {volume_mib} MiB, {max_parallel} at once{}: {took:.2} s; bound 1.2 × {:.2} s + {restart_s:.2} s × {rounds} = {limit:.2} s; ratio {:.2}",
        if no_precopy { ", no pre-copy" } else { "" },
        total_bytes / throughput,
        took / limit
    );
    let ms: Vec<u128> = move_downtimes.iter().map(Duration::as_millis).collect();
    println!(
        "each tenant's downtime (its stop until healthy on its target): median {} ms, max {} ms ({ms:?} ms)",
        ms.get(ms.len().saturating_sub(1) / 2).unwrap_or(&0),
        ms.last().unwrap_or(&0)
    );
    if let Some(factor) = docker_factor {
        let limit = 1.2 * total_bytes / throughput + restart_s * factor * rounds;
        println!(
            "Docker here restarts {max_parallel} containers at once in {factor:.2} × the time of one; a round counted so, the bound is {limit:.2} s, ratio {:.2}",
            took / limit
        );
    }
    println!(
        "the machine was busy {busy:.2} CPU-s meanwhile ({:.0} % of {cpus} CPUs): no drain here takes less than {:.2} s ({:.2} × the bound)",
        100.0 * busy / (took * f64::from(cpus)),
        busy / f64::from(cpus),
        busy / f64::from(cpus) / limit
    );
    println!(
        "of which berth's: the coordinator {coordinator_cpu:.2} CPU-s, the source's agent {source_cpu:.2}, the targets' agents {targets_cpu:.2}; the rest (Docker, the kernel's writeback, the tenants) {:.2}",
        busy - coordinator_cpu - source_cpu - targets_cpu
    );
}
