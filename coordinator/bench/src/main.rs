//! berth-bench: measures berth's placement engine on real inputs against the lower bound and
//! against baseline policies run in the same process. See docs/performance.md.

mod api;
mod dashboard;
mod inputs;
mod replay;

use std::path::PathBuf;

use anyhow::Context;
use berth_coordinator::placement::scheduler::baselines::Baseline;
use berth_coordinator::placement::scheduler::offline::{self, SearchBudget};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "berth-bench",
    about = "Benchmarks for berth's placement engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline vector packing of .vbp instances, per class against the best published result.
    Pack {
        /// .vbp files, or directories searched for them.
        #[arg(long = "vbp", required = true, num_args = 1..)]
        vbp: Vec<PathBuf>,
        /// Panigrahy_summary_known.csv (lower bounds and optima).
        #[arg(long)]
        summary: Option<PathBuf>,
        /// Only instances with this many dimensions.
        #[arg(long)]
        dims: Option<usize>,
        /// Print one JSON line per instance too.
        #[arg(long)]
        per_instance: bool,
        /// The local search's moves per instance.
        #[arg(long, default_value_t = SearchBudget::default().iterations)]
        search_iterations: u64,
        /// The local search's time per instance, in milliseconds (whichever ends first).
        #[arg(long, default_value_t = SearchBudget::default().time.as_millis() as u64)]
        search_ms: u64,
    },
    /// Latency of one placement decision in a large fleet (p50, p99, max).
    Decide {
        #[arg(long, default_value_t = 10_000)]
        hosts: usize,
        #[arg(long, default_value_t = 200_000)]
        tenants: usize,
        /// Decisions measured.
        #[arg(long, default_value_t = 100_000)]
        samples: usize,
    },
    /// The whole API path: a real coordinator, synthetic hosts, concurrent gRPC clients over
    /// mTLS, every placement flushed to disk before its reply.
    Api {
        #[arg(long, default_value_t = 20)]
        hosts: usize,
        /// Concurrent requests in flight.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// TLS connections they share.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value_t = 20_000)]
        placements: usize,
        /// Keep the fleet store in this etcd cluster (its members' client URLs, comma
        /// separated; a fresh prefix per run) instead of the embedded sled store.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
    },
    /// The fleet page of a seeded fleet: render time and size (or `--serve` it).
    Dashboard {
        #[arg(long, default_value_t = 500)]
        hosts: usize,
        #[arg(long, default_value_t = 10_000)]
        tenants: usize,
        #[arg(long, default_value_t = 200)]
        renders: usize,
        /// Serve the seeded fleet's dashboard on this address instead (for screenshots).
        #[arg(long)]
        serve: Option<std::net::SocketAddr>,
    },
    /// Online arrivals and departures from the Azure trace.
    Replay {
        /// The trace's directory: NAME.txt (arrivals), NAME.cEND.txt (durations censored at
        /// END seconds), flav_map.txt, v1.interval_map.txt.
        #[arg(long = "azure-v1")]
        azure_v1: PathBuf,
        /// Which NAME, when the directory holds several traces.
        #[arg(long)]
        trace: Option<String>,
        /// The trace's end in seconds, instead of the END its durations file is named with.
        #[arg(long)]
        trace_end: Option<u64>,
        #[arg(long, default_value_t = 16)]
        host_cpu: u64,
        #[arg(long, default_value_t = 64)]
        host_mem_gb: u64,
        /// Only the first N arrivals.
        #[arg(long)]
        limit: Option<usize>,
        /// Skip the baselines (they scan every host for every VM).
        #[arg(long)]
        no_baselines: bool,
        /// Also replay reference placers that no coordinator could run, reported apart: best
        /// fit told each VM's departure, the same with each VM's lifetime guessed from its
        /// batch's flavours over the whole trace, and (with --compact-every) best fit packing
        /// every VM that may move again at each compaction.
        #[arg(long)]
        references: bool,
        /// Split the halves this long after the first arrival (`24h`), not at the middle one.
        #[arg(long, value_parser = humantime::parse_duration)]
        split_after: Option<std::time::Duration>,
        /// Also replay berth compacting the fleet at this period (`24h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        compact_every: Option<std::time::Duration>,
        /// With --compact-every: the most moves of one VM in any 30 days.
        #[arg(long, default_value_t = 2, requires = "compact_every")]
        max_moves_per_tenant_per_month: usize,
        /// With --compact-every: percent of each target's memory and CPU kept free.
        #[arg(long, default_value_t = 10, requires = "compact_every")]
        compact_headroom: u32,
    },
}

/// `--compact-every` in seconds, checked with `--compact-headroom`.
fn replay_compaction(
    every: Option<std::time::Duration>,
    headroom: u32,
) -> anyhow::Result<Option<u64>> {
    anyhow::ensure!(
        headroom <= 90,
        "--compact-headroom {headroom}: at most 90 (percent)"
    );
    every
        .map(|d| {
            anyhow::ensure!(
                d.as_secs() >= 60,
                "--compact-every {}: at least 1m",
                humantime::format_duration(d)
            );
            Ok(d.as_secs())
        })
        .transpose()
}

fn vbp_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            for entry in std::fs::read_dir(p).with_context(|| p.display().to_string())? {
                let entry = entry?.path();
                if entry.is_dir() || entry.extension().is_some_and(|e| e == "vbp") {
                    out.extend(vbp_files(&[entry])?);
                }
            }
        } else {
            out.push(p.clone());
        }
    }
    out.sort();
    Ok(out)
}

/// Per class of instances (`d3/class1`: dimensions and Panigrahy class from the file name):
/// berth's bins against the best published result, and how often berth lost to a baseline.
#[derive(Debug, Default)]
struct ClassResult {
    instances: usize,
    /// Sum of berth's bins over the best published result (instances that have one).
    over_best_published: f64,
    with_best_published: usize,
    better: usize,
    equal: usize,
    worse: usize,
    worse_than_a_baseline: usize,
}

/// `classC_N_D_I` → `dD/classC`; other names are their own class.
fn class_of(name: &str, dims: usize) -> String {
    let class = name.split('_').next().unwrap_or(name);
    format!("d{dims}/{class}")
}

fn pack(
    files: Vec<PathBuf>,
    summary: Option<PathBuf>,
    dims: Option<usize>,
    per_instance: bool,
    budget: SearchBudget,
) -> anyhow::Result<serde_json::Value> {
    let known = summary
        .map(|s| inputs::read_summary(&s))
        .transpose()?
        .unwrap_or_default();
    let mut sums: std::collections::BTreeMap<&str, (f64, f64, usize)> = Default::default();
    let mut classes: std::collections::BTreeMap<String, ClassResult> = Default::default();
    let (mut instances, mut with_opt) = (0usize, 0usize);
    let started = std::time::Instant::now();
    let mut invalid = Vec::new();
    for file in files {
        // One bad file is reported and skipped; the others are still measured.
        let inst = match inputs::read_vbp(&file) {
            Ok(inst) => inst,
            Err(e) => {
                eprintln!("invalid instance: {e:#}");
                invalid
                    .push(json!({ "file": file.display().to_string(), "error": format!("{e:#}") }));
                continue;
            }
        };
        if dims.is_some_and(|d| d != inst.capacity.len()) {
            continue;
        }
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let packing = offline::pack_within(&inst, budget);
        anyhow::ensure!(
            inst.is_valid(&packing),
            "{name}: berth's packing is invalid"
        );
        let (lb, opt, best_published) =
            known
                .get(&name)
                .copied()
                .unwrap_or((inst.lower_bound() as u64, None, 0));
        let mut results = vec![("berth", packing.len())];
        for b in Baseline::ALL {
            results.push((b.name(), offline::in_input_order(&inst, b).len()));
        }
        instances += 1;
        if opt.is_some() {
            with_opt += 1;
        }
        for (policy, bins) in &results {
            let entry = sums.entry(policy).or_default();
            entry.0 += *bins as f64 / lb as f64;
            if let Some(opt) = opt {
                entry.1 += *bins as f64 / opt as f64;
                entry.2 += 1;
            }
        }
        let class = classes
            .entry(class_of(&name, inst.capacity.len()))
            .or_default();
        class.instances += 1;
        if results[1..].iter().any(|(_, bins)| *bins < packing.len()) {
            class.worse_than_a_baseline += 1;
        }
        if best_published > 0 {
            let berth = packing.len() as u64;
            class.with_best_published += 1;
            class.over_best_published += berth as f64 / best_published as f64;
            match berth.cmp(&best_published) {
                std::cmp::Ordering::Less => class.better += 1,
                std::cmp::Ordering::Equal => class.equal += 1,
                std::cmp::Ordering::Greater => class.worse += 1,
            }
        }
        if per_instance {
            let r: serde_json::Map<String, serde_json::Value> = results
                .iter()
                .map(|(p, b)| (p.to_string(), json!(b)))
                .collect();
            println!(
                "{}",
                json!({ "instance": name, "items": inst.items.len(), "dims": inst.capacity.len(), "lower_bound": lb, "optimum": opt, "best_published": best_published, "bins": r })
            );
        }
    }
    let summary: serde_json::Map<String, serde_json::Value> = sums
        .iter()
        .map(|(p, (lb, opt, n))| {
            (p.to_string(), json!({ "mean_bins_over_lower_bound": lb / instances as f64, "mean_bins_over_optimum": if *n > 0 { Some(opt / *n as f64) } else { None } }))
        })
        .collect();
    let per_class: serde_json::Map<String, serde_json::Value> = classes
        .iter()
        .map(|(name, c)| {
            let over = (c.with_best_published > 0)
                .then(|| c.over_best_published / c.with_best_published as f64);
            (name.clone(), json!({ "instances": c.instances, "mean_bins_over_best_published": over, "better": c.better, "equal": c.equal, "worse": c.worse, "worse_than_a_baseline": c.worse_than_a_baseline }))
        })
        .collect();
    Ok(
        json!({ "summary": { "instances": instances, "instances_with_known_optimum": with_opt, "invalid": invalid, "seconds": started.elapsed().as_secs_f64(), "search": { "iterations": budget.iterations, "ms": budget.time.as_millis() as u64 }, "policies": summary, "classes": per_class } }),
    )
}

fn decide(hosts: usize, tenants: usize, samples: usize) -> anyhow::Result<()> {
    use berth_coordinator::testing::synthetic;
    let started = std::time::Instant::now();
    let (scheduler, mut rng) = synthetic::fleet(hosts, tenants, 7);
    let built = started.elapsed().as_secs_f64();
    let requests: Vec<_> = (0..samples)
        .map(|i| synthetic::request(&mut rng, tenants + i))
        .collect();
    let mut nanos = Vec::with_capacity(samples);
    let mut refused = 0;
    for r in &requests {
        let t = std::time::Instant::now();
        let decision = std::hint::black_box(scheduler.choose(std::hint::black_box(&r.request())));
        nanos.push(t.elapsed().as_nanos() as u64);
        refused += usize::from(decision.is_err());
    }
    nanos.sort_unstable();
    let pct =
        |p: f64| nanos[((nanos.len() as f64 * p) as usize).min(nanos.len() - 1)] as f64 / 1000.0;
    println!(
        "{}",
        json!({ "decide": { "hosts": hosts, "tenants_placed": tenants, "samples": samples, "refused": refused,
            "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": pct(1.0), "fleet_build_seconds": built } })
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pack {
            vbp,
            summary,
            dims,
            per_instance,
            search_iterations,
            search_ms,
        } => vbp_files(&vbp)
            .and_then(|files| {
                let budget = SearchBudget {
                    iterations: search_iterations,
                    time: std::time::Duration::from_millis(search_ms),
                };
                pack(files, summary, dims, per_instance, budget)
            })
            .map(|summary| println!("{summary}")),
        Command::Decide {
            hosts,
            tenants,
            samples,
        } => decide(hosts, tenants, samples),
        Command::Api {
            hosts,
            clients,
            connections,
            placements,
            etcd,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(api::run(hosts, clients, connections, placements, &etcd))),
        Command::Dashboard {
            hosts,
            tenants,
            renders,
            serve: None,
        } => dashboard::run(hosts, tenants, renders.max(1)),
        Command::Dashboard {
            hosts,
            tenants,
            serve: Some(addr),
            ..
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(dashboard::serve(hosts, tenants, addr))),
        Command::Replay {
            azure_v1,
            trace,
            trace_end,
            host_cpu,
            host_mem_gb,
            limit,
            no_baselines,
            references,
            split_after,
            compact_every,
            max_moves_per_tenant_per_month,
            compact_headroom,
        } => replay_compaction(compact_every, compact_headroom).and_then(|compaction| {
            inputs::Trace::find(&azure_v1, trace.as_deref(), trace_end).and_then(|trace| {
                replay::run(
                    &azure_v1,
                    &trace,
                    replay::Options {
                        host_cpu: host_cpu * 1000,
                        host_mem: host_mem_gb * 1024,
                        limit,
                        baselines: !no_baselines,
                        references,
                        split_after: split_after.map(|d| d.as_secs()),
                        compaction: compaction.map(|every_seconds| replay::Compaction {
                            every_seconds,
                            max_moves_per_month: max_moves_per_tenant_per_month,
                            headroom_percent: compact_headroom,
                        }),
                    },
                )
            })
        }),
    };
    berth_shared::cli::finish(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_instance_is_reported_and_the_others_are_packed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a_bad.vbp"), "2\n10 10\n1\n-2 3 4\n").unwrap();
        std::fs::write(dir.path().join("b_good.vbp"), "2\n10 10\n2\n6 2 3\n4 5 1\n").unwrap();
        let files = vbp_files(&[dir.path().to_path_buf()]).unwrap();
        let summary = pack(files, None, None, false, SearchBudget::default()).unwrap();
        assert_eq!(summary["summary"]["instances"], 1);
        let class = &summary["summary"]["classes"]["d2/b"];
        assert_eq!(class["instances"], 1);
        assert_eq!(class["worse_than_a_baseline"], 0);
        let invalid = summary["summary"]["invalid"].as_array().unwrap();
        assert_eq!(invalid.len(), 1);
        assert!(
            invalid[0]["error"]
                .as_str()
                .unwrap()
                .contains("a_bad.vbp: \"-2\" is not a number"),
            "{invalid:?}"
        );
        assert!(
            summary["summary"]["policies"]["berth"]["mean_bins_over_lower_bound"]
                .as_f64()
                .unwrap()
                >= 1.0
        );
    }
}
