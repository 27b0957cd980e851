//! Online replay of the Azure trace: each VM is a tenant arriving at its time and leaving after
//! its duration; hosts are opened when nothing fits and count while they hold a VM. The figure
//! of merit is host-seconds used divided by the lower bound summed over time. With
//! `--compact-every`, berth's compaction (`placement::compaction`, as `berthctl compact` plans
//! it) runs at that period on the live fleet and its moves are applied at once; a VM moves at
//! most `--max-moves-per-tenant-per-month` times in any 30 days. With `--references`, the
//! placers of [`reference`](mod@reference), which know what no online decision can, are replayed too and
//! reported apart: they bound what a policy could reach on the trace.

use std::collections::BTreeMap;
use std::path::Path;

use berth_coordinator::placement::compaction::{self, CompactOptions, Movable};
use berth_coordinator::placement::scheduler::{HostInfo, Request, Scheduler, Strategy, Vec3};
use berth_shared::host::Provider;
use berth_shared::ids::{HostId, TenantId};
use berth_shared::spec::Constraints;
use serde_json::json;

use crate::inputs::{self, Vm};
use berth_coordinator::placement::scheduler::baselines::Baseline;

mod reference;

/// Where each VM goes; the caller keeps the loads.
trait Placer {
    /// The host for VM `index` of the replay (an index into the placer's hosts), opening one
    /// if needed.
    fn place(&mut self, index: usize, vm: &Vm) -> usize;
    fn remove(&mut self, host: usize, index: usize, vm: &Vm);
    /// Moves VMs to empty hosts: `live` is every VM placed now (its index and host), `movable`
    /// says which may move; returns each move (VM, new host). berth compacts as the product
    /// does; the full re-pack reference moves every VM it may.
    fn compact(
        &mut self,
        _vms: &[Vm],
        _live: &[(usize, usize)],
        _movable: &dyn Fn(usize) -> bool,
    ) -> Vec<(usize, usize)> {
        Vec::new()
    }
}

/// A host's load (CPU, memory) with `vm` on it.
fn carry(load: &mut [u64], vm: &Vm) {
    load[0] += vm.cpu;
    load[1] += vm.mem;
}

/// A host's load (CPU, memory) once `vm` left it.
fn unload(load: &mut [u64], vm: &Vm) {
    load[0] -= vm.cpu;
    load[1] -= vm.mem;
}

struct BaselinePlacer {
    policy: Baseline,
    cap: Vec<u64>,
    loads: Vec<Vec<u64>>,
}

impl Placer for BaselinePlacer {
    fn place(&mut self, _index: usize, vm: &Vm) -> usize {
        let item = [vm.cpu, vm.mem];
        let h = self
            .policy
            .choose(&self.loads, &self.cap, &item)
            .unwrap_or_else(|| {
                self.loads.push(vec![0, 0]);
                self.loads.len() - 1
            });
        carry(&mut self.loads[h], vm);
        h
    }
    fn remove(&mut self, host: usize, _index: usize, vm: &Vm) {
        unload(&mut self.loads[host], vm);
    }
}

/// berth's own scheduler, exactly as the coordinator runs it (and its compaction, with
/// `compact`).
struct BerthPlacer {
    scheduler: Scheduler,
    ids: Vec<HostId>,
    index: BTreeMap<HostId, usize>,
    cap: Vec3,
    constraints: Constraints,
    compact: CompactOptions,
}

fn need(vm: &Vm) -> Vec3 {
    Vec3 {
        mem: vm.mem,
        cpu: vm.cpu,
        disk: 0,
    }
}

impl Placer for BerthPlacer {
    fn place(&mut self, _index: usize, vm: &Vm) -> usize {
        let need = Vec3 {
            mem: vm.mem,
            cpu: vm.cpu,
            disk: 0,
        };
        let request = Request {
            need,
            encrypted: false,
            constraints: &self.constraints,
            strategy: Strategy::Binpack,
        };
        let id = match self.scheduler.choose(&request) {
            Ok(id) => id,
            Err(_) => {
                let id = HostId::new(format!("h{:07}", self.ids.len())).expect("valid id");
                self.scheduler.upsert_host(HostInfo {
                    id: id.clone(),
                    provider: Provider::Other,
                    region: "replay".into(),
                    labels: Default::default(),
                    dm_crypt: true,
                    // Every host costs the same: a compaction empties the most hosts per move.
                    monthly_cost_cents: 100,
                    allocatable: self.cap,
                    schedulable: true,
                });
                self.index.insert(id.clone(), self.ids.len());
                self.ids.push(id.clone());
                id
            }
        };
        self.scheduler.commit(&id, need, None);
        self.index[&id]
    }
    fn remove(&mut self, host: usize, _index: usize, vm: &Vm) {
        self.scheduler.release(&self.ids[host], need(vm), None);
    }

    fn compact(
        &mut self,
        vms: &[Vm],
        live: &[(usize, usize)],
        movable: &dyn Fn(usize) -> bool,
    ) -> Vec<(usize, usize)> {
        let mut tenants: BTreeMap<HostId, Vec<Movable>> = BTreeMap::new();
        let mut busy = std::collections::BTreeSet::new();
        for &(vm, host) in live {
            let id = &self.ids[host];
            if !movable(vm) {
                busy.insert(id.clone());
            }
            tenants.entry(id.clone()).or_default().push(Movable {
                tenant: TenantId::new(format!("v{vm}")).expect("valid id"),
                need: need(&vms[vm]),
                encrypted: false,
                constraints: Constraints::default(),
                strategy: Strategy::Binpack,
                volume_bytes: 0,
            });
        }
        let plan = compaction::plan(&self.scheduler, &tenants, &busy, &self.compact);
        let mut moves = Vec::with_capacity(plan.moves());
        for host in &plan.emptied {
            for m in &host.moves {
                let vm: usize = m.tenant.as_str()[1..].parse().expect("a VM's index");
                self.scheduler.release(&host.host, need(&vms[vm]), None);
                self.scheduler.commit(&m.target, need(&vms[vm]), None);
                moves.push((vm, self.index[&m.target]));
            }
        }
        moves
    }
}

/// When compactions run and how often a VM may move.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    pub every_seconds: u64,
    pub max_moves_per_month: usize,
    /// Share of each target's memory and CPU kept free.
    pub headroom_percent: u32,
}

const MONTH_SECONDS: u64 = 30 * 24 * 3600;

/// What one replay measured: host-seconds used and the lower bound's, over the whole window
/// and over each half of it (split at the arrival of the middle VM, or `split_after` seconds
/// after the first: a policy tuned on the first half is judged on the second).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Outcome {
    used: f64,
    bound: f64,
    halves: [(f64, f64); 2],
    peak: usize,
    moves: usize,
}

fn simulate(
    vms: &[Vm],
    placer: &mut dyn Placer,
    host_cpu: u64,
    host_mem: u64,
    compaction: Option<Compaction>,
    split_after: Option<u64>,
) -> Outcome {
    // Departures sort before arrivals at the same instant: capacity is freed first.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(vms.len() * 2);
    for (i, vm) in vms.iter().enumerate() {
        events.push((vm.arrive, true, i));
        events.push((vm.depart, false, i));
    }
    events.sort_unstable_by_key(|&(t, arrival, i)| (t, arrival, i));
    // Measured from the first to the last arrival: after it, no placement decision is made and
    // a truncated trace (`--limit`) would only measure its own artificial tail.
    let window_end = vms.iter().map(|v| v.arrive).max().unwrap_or(0);
    let middle = {
        let mut arrivals: Vec<u64> = vms.iter().map(|v| v.arrive).collect();
        arrivals.sort_unstable();
        match split_after {
            Some(after) => arrivals.first().map_or(0, |first| first + after),
            None => arrivals.get(arrivals.len() / 2).copied().unwrap_or(0),
        }
    };
    let mut halves = [(0f64, 0f64); 2];
    let mut host_of = vec![usize::MAX; vms.len()];
    let mut vms_on: Vec<u32> = Vec::new();
    let (mut used_hosts, mut total_cpu, mut total_mem) = (0u64, 0u64, 0u64);
    let (mut used, mut bound, mut peak) = (0f64, 0f64, 0usize);
    let mut last_t = events.first().map_or(0, |e| e.0);
    let mut next_compaction = compaction.map_or(u64::MAX, |c| last_t + c.every_seconds);
    // Per VM, when it was moved.
    let mut moved_at: Vec<Vec<u64>> = vec![Vec::new(); vms.len()];
    let mut live: BTreeMap<usize, ()> = BTreeMap::new();
    let mut moves = 0;
    for (t, arrival, i) in events {
        if let Some(c) = compaction
            && t >= next_compaction
        {
            next_compaction = t + c.every_seconds;
            let pairs: Vec<(usize, usize)> = live.keys().map(|&v| (v, host_of[v])).collect();
            let movable = |v: usize| {
                moved_at[v]
                    .iter()
                    .filter(|&&at| at + MONTH_SECONDS > t)
                    .count()
                    < c.max_moves_per_month
            };
            for (vm, to) in placer.compact(vms, &pairs, &movable) {
                let from = host_of[vm];
                vms_on[from] -= 1;
                if vms_on[from] == 0 {
                    used_hosts -= 1;
                }
                if to >= vms_on.len() {
                    vms_on.resize(to + 1, 0);
                }
                if vms_on[to] == 0 {
                    used_hosts += 1;
                }
                vms_on[to] += 1;
                host_of[vm] = to;
                moved_at[vm].push(t);
                moves += 1;
            }
        }
        if t > last_t {
            let (from, to) = (last_t.min(window_end), t.min(window_end));
            let hosts_needed = total_cpu
                .div_ceil(host_cpu)
                .max(total_mem.div_ceil(host_mem)) as f64;
            let dt = to.saturating_sub(from) as f64;
            used += used_hosts as f64 * dt;
            bound += hosts_needed * dt;
            let split = [
                to.min(middle).saturating_sub(from.min(middle)),
                to.max(middle).saturating_sub(from.max(middle)),
            ];
            for (half, seconds) in halves.iter_mut().zip(split) {
                half.0 += used_hosts as f64 * seconds as f64;
                half.1 += hosts_needed * seconds as f64;
            }
            last_t = t;
        }
        let vm = &vms[i];
        if arrival {
            let h = placer.place(i, vm);
            if h >= vms_on.len() {
                vms_on.resize(h + 1, 0);
            }
            if vms_on[h] == 0 {
                used_hosts += 1;
                peak = peak.max(used_hosts as usize);
            }
            vms_on[h] += 1;
            host_of[i] = h;
            live.insert(i, ());
            total_cpu += vm.cpu;
            total_mem += vm.mem;
        } else if host_of[i] != usize::MAX {
            let h = host_of[i];
            live.remove(&i);
            placer.remove(h, i, vm);
            vms_on[h] -= 1;
            if vms_on[h] == 0 {
                used_hosts -= 1;
            }
            total_cpu -= vm.cpu;
            total_mem -= vm.mem;
        }
    }
    Outcome {
        used,
        bound,
        halves,
        peak,
        moves,
    }
}

/// What `berth-bench replay` runs, beside berth itself.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub host_cpu: u64,
    pub host_mem: u64,
    /// Only the first this many arrivals.
    pub limit: Option<usize>,
    pub baselines: bool,
    /// The reference placers of [`reference`](mod@reference): not online policies, reported apart.
    pub references: bool,
    /// Split the halves this many seconds after the first arrival, not at the middle one.
    pub split_after: Option<u64>,
    pub compaction: Option<Compaction>,
}

/// The lifetime quantile the in-sample guess assumes: of 0.5, 0.75 and 0.9, the best on the
/// trace's first half (0.9 ties it there).
const GUESS_QUANTILE: f64 = 0.75;

pub fn run(dir: &Path, trace: &inputs::Trace, options: Options) -> anyhow::Result<()> {
    let Options {
        host_cpu,
        host_mem,
        limit,
        baselines,
        references,
        split_after,
        compaction,
    } = options;
    let all = inputs::read_azure(dir, trace, limit)?;
    anyhow::ensure!(!all.is_empty(), "{}: the trace has no VM", trace.arrivals);
    let (vms, too_big): (Vec<Vm>, Vec<Vm>) = all
        .into_iter()
        .partition(|v| v.cpu <= host_cpu && v.mem <= host_mem);
    let first = vms.iter().map(|v| v.arrive).min().unwrap_or(0);
    let span = vms.iter().map(|v| v.arrive).max().unwrap_or(0) - first;
    anyhow::ensure!(
        span > 0,
        "{}: every VM replayed arrives at {first}: no time to measure (replay more of it, --limit)",
        trace.arrivals
    );
    if let Some(after) = split_after {
        anyhow::ensure!(
            after > 0 && after < span,
            "--split-after {after}s: the split must fall after the first arrival and before the last ({span} s after the first), or a half is empty"
        );
    }
    let mut results = serde_json::Map::new();
    let mut reference_results = serde_json::Map::new();
    let run_one = |name: &str,
                   placer: &mut dyn Placer,
                   compaction: Option<Compaction>,
                   into: &mut serde_json::Map<String, serde_json::Value>| {
        let started = std::time::Instant::now();
        let Outcome {
            used,
            bound,
            halves,
            peak,
            moves,
        } = simulate(&vms, placer, host_cpu, host_mem, compaction, split_after);
        let [first, second] = halves.map(|(used, bound)| used / bound);
        into.insert(
            name.to_string(),
            json!({ "host_seconds_over_lower_bound": used / bound, "first_half": first, "second_half": second, "peak_hosts": peak, "moves": moves, "seconds": started.elapsed().as_secs_f64() }),
        );
        eprintln!(
            "{name}: {:.4} (halves {first:.4} / {second:.4}; peak {peak} hosts, {moves} moves, {:.1}s)",
            used / bound,
            started.elapsed().as_secs_f64()
        );
    };
    let berth = |compact: CompactOptions| BerthPlacer {
        scheduler: Scheduler::new(),
        ids: Vec::new(),
        index: BTreeMap::new(),
        cap: Vec3 {
            mem: host_mem,
            cpu: host_cpu,
            disk: 0,
        },
        constraints: Constraints::default(),
        compact,
    };
    run_one(
        "berth",
        &mut berth(CompactOptions::default()),
        None,
        &mut results,
    );
    if let Some(c) = compaction {
        let options = CompactOptions {
            max_moves: u32::MAX,
            providers: Default::default(),
            headroom_percent: c.headroom_percent,
        };
        run_one(
            "berth_compacting",
            &mut berth(options),
            Some(c),
            &mut results,
        );
    }
    if baselines {
        for b in Baseline::ALL {
            run_one(
                b.name(),
                &mut BaselinePlacer {
                    policy: b,
                    cap: vec![host_cpu, host_mem],
                    loads: Vec::new(),
                },
                None,
                &mut results,
            );
        }
    }
    if references {
        let cap = [host_cpu, host_mem];
        run_one(
            "clairvoyant_lifetime_best_fit",
            &mut reference::LifetimeAware::clairvoyant(&vms, cap),
            None,
            &mut reference_results,
        );
        run_one(
            "in_sample_lifetime_guess_best_fit",
            &mut reference::LifetimeAware::in_sample_guess(&vms, GUESS_QUANTILE, cap),
            None,
            &mut reference_results,
        );
        if let Some(c) = compaction {
            run_one(
                "best_fit_full_repack",
                &mut reference::FullRepack::new(cap),
                Some(c),
                &mut reference_results,
            );
        }
    }
    println!(
        "{}",
        json!({ "summary": { "compact_every_seconds": compaction.map(|c| c.every_seconds), "max_moves_per_tenant_per_month": compaction.map(|c| c.max_moves_per_month), "compact_headroom_percent": compaction.map(|c| c.headroom_percent), "trace": trace.durations, "trace_end_seconds": trace.end, "halves_split_after_seconds": split_after, "arrivals": vms.len() + too_big.len(), "placed": vms.len(), "larger_than_a_host": too_big.len(), "host_cpu_millicores": host_cpu, "host_mem_mib": host_mem, "policies": results, "references": references.then_some(reference_results) } })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn berth() -> BerthPlacer {
        BerthPlacer {
            scheduler: Scheduler::new(),
            ids: Vec::new(),
            index: BTreeMap::new(),
            cap: Vec3 {
                mem: 100,
                cpu: 100,
                disk: 0,
            },
            constraints: Constraints::default(),
            compact: CompactOptions {
                max_moves: u32::MAX,
                providers: Default::default(),
                headroom_percent: 0,
            },
        }
    }

    fn vm(arrive: u64, depart: u64, size: u64) -> Vm {
        Vm {
            arrive,
            depart,
            cpu: size,
            mem: size,
            flavour: 0,
            batch: 0,
        }
    }

    /// A replay whose VMs all arrive at once, or whose halves would be empty, measures
    /// nothing: it is refused rather than reported as NaN.
    #[test]
    fn a_replay_with_nothing_to_measure_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("flav_map.txt", "1,2 a\n");
        write("v1.interval_map.txt", "100 0\n1000 1\n");
        write("t.txt", "10 a,a\n20 a\n");
        write("t.c5000.txt", "10 U0,U0\n20 U0\n");
        let trace = inputs::Trace::find(dir.path(), None, None).unwrap();
        let options = |limit, split_after| Options {
            host_cpu: 16_000,
            host_mem: 65_536,
            limit,
            baselines: false,
            references: true,
            split_after,
            compaction: None,
        };
        let err = |o| run(dir.path(), &trace, o).unwrap_err().to_string();
        assert!(
            err(options(Some(2), None)).contains("every VM replayed arrives at 10"),
            "{}",
            err(options(Some(2), None))
        );
        for split in [0, 10, 11] {
            let e = err(options(None, Some(split)));
            assert!(e.contains("(10 s after the first)"), "{e}");
        }
        run(dir.path(), &trace, options(None, Some(5))).unwrap();
    }

    /// Two hosts fill up; most of their VMs leave, and what stays fits on one host: a
    /// compaction empties the other, where the plain replay keeps both until the end.
    #[test]
    fn a_compaction_gives_back_a_host_the_departures_left_nearly_empty() {
        let mut vms = vec![vm(0, 10_000, 30), vm(1, 10_000, 30)];
        // 60 + 60 fills the first host and opens a second.
        vms.extend((0..2).map(|i| vm(2 + i, 100, 20)));
        vms.push(vm(4, 10_000, 30));
        vms.push(vm(5, 100, 60));
        vms.push(vm(9_999, 10_000, 1));
        let every = Compaction {
            every_seconds: 1_000,
            max_moves_per_month: 2,
            headroom_percent: 0,
        };
        let plain = simulate(&vms, &mut berth(), 100, 100, None, None);
        let compacted = simulate(&vms, &mut berth(), 100, 100, Some(every), None);
        assert_eq!((plain.moves, plain.bound), (0, compacted.bound));
        assert_eq!(compacted.moves, 1, "the lone VM on the second host moves");
        assert!(compacted.used < plain.used, "{compacted:?} < {plain:?}");
        // The halves split the window at the middle VM's arrival (the fourth of seven, at 3)
        // and add up to it.
        let [(used_a, bound_a), (used_b, bound_b)] = plain.halves;
        assert_eq!(
            (used_a + used_b, bound_a + bound_b),
            (plain.used, plain.bound)
        );
        assert_eq!(
            bound_a, 3.0,
            "one host's worth from 0 to 3 (30, 60, then 80 of 100)"
        );
        // Split 2 s after the first arrival instead: one host's worth from 0 to 2.
        let split = simulate(&vms, &mut berth(), 100, 100, None, Some(2));
        assert_eq!(split.halves[0].1, 2.0);
        assert_eq!(split.halves[0].1 + split.halves[1].1, plain.bound);
        // No move allowed: the same as without compaction.
        let never = Compaction {
            max_moves_per_month: 0,
            ..every
        };
        let same = simulate(&vms, &mut berth(), 100, 100, Some(never), None);
        assert_eq!((same.used, same.moves), (plain.used, 0));
    }
}
