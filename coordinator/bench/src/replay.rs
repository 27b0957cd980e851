//! Online replay of the Azure trace: each VM is a tenant arriving at its time and leaving after
//! its duration; hosts are opened when nothing fits and count while they hold a VM. The figure
//! of merit is host-seconds used divided by the lower bound summed over time.

use std::collections::BTreeMap;
use std::path::Path;

use berth_coordinator::placement::scheduler::{HostInfo, Request, Scheduler, Strategy, Vec3};
use berth_shared::host::Provider;
use berth_shared::ids::HostId;
use berth_shared::spec::Constraints;
use serde_json::json;

use crate::baselines::Baseline;
use crate::inputs::{self, Vm};

/// Where each VM goes; the caller keeps the loads.
trait Placer {
    /// The host for a VM (an index into the placer's hosts), opening one if needed.
    fn place(&mut self, vm: &Vm) -> usize;
    fn remove(&mut self, host: usize, vm: &Vm);
}

struct BaselinePlacer {
    policy: Baseline,
    cap: Vec<u64>,
    loads: Vec<Vec<u64>>,
}

impl Placer for BaselinePlacer {
    fn place(&mut self, vm: &Vm) -> usize {
        let item = [vm.cpu, vm.mem];
        let h = self
            .policy
            .choose(&self.loads, &self.cap, &item)
            .unwrap_or_else(|| {
                self.loads.push(vec![0, 0]);
                self.loads.len() - 1
            });
        self.loads[h][0] += vm.cpu;
        self.loads[h][1] += vm.mem;
        h
    }
    fn remove(&mut self, host: usize, vm: &Vm) {
        self.loads[host][0] -= vm.cpu;
        self.loads[host][1] -= vm.mem;
    }
}

/// berth's own scheduler, exactly as the coordinator runs it.
struct BerthPlacer {
    scheduler: Scheduler,
    ids: Vec<HostId>,
    index: BTreeMap<HostId, usize>,
    cap: Vec3,
    constraints: Constraints,
}

impl Placer for BerthPlacer {
    fn place(&mut self, vm: &Vm) -> usize {
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
                    monthly_cost_cents: 0,
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
    fn remove(&mut self, host: usize, vm: &Vm) {
        self.scheduler.release(
            &self.ids[host],
            Vec3 {
                mem: vm.mem,
                cpu: vm.cpu,
                disk: 0,
            },
            None,
        );
    }
}

/// Replays `vms` through `placer`; returns (used host-seconds, lower-bound host-seconds).
fn simulate(
    vms: &[Vm],
    placer: &mut dyn Placer,
    host_cpu: u64,
    host_mem: u64,
) -> (f64, f64, usize) {
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
    let mut host_of = vec![usize::MAX; vms.len()];
    let mut vms_on: Vec<u32> = Vec::new();
    let (mut used_hosts, mut total_cpu, mut total_mem) = (0u64, 0u64, 0u64);
    let (mut used, mut bound, mut peak) = (0f64, 0f64, 0usize);
    let mut last_t = events.first().map_or(0, |e| e.0);
    for (t, arrival, i) in events {
        if t > last_t {
            let dt = (t.min(window_end).saturating_sub(last_t.min(window_end))) as f64;
            used += used_hosts as f64 * dt;
            bound += total_cpu
                .div_ceil(host_cpu)
                .max(total_mem.div_ceil(host_mem)) as f64
                * dt;
            last_t = t;
        }
        let vm = &vms[i];
        if arrival {
            let h = placer.place(vm);
            if h >= vms_on.len() {
                vms_on.resize(h + 1, 0);
            }
            if vms_on[h] == 0 {
                used_hosts += 1;
                peak = peak.max(used_hosts as usize);
            }
            vms_on[h] += 1;
            host_of[i] = h;
            total_cpu += vm.cpu;
            total_mem += vm.mem;
        } else if host_of[i] != usize::MAX {
            let h = host_of[i];
            placer.remove(h, vm);
            vms_on[h] -= 1;
            if vms_on[h] == 0 {
                used_hosts -= 1;
            }
            total_cpu -= vm.cpu;
            total_mem -= vm.mem;
        }
    }
    (used, bound, peak)
}

pub fn run(
    dir: &Path,
    trace: &inputs::Trace,
    host_cpu: u64,
    host_mem: u64,
    limit: Option<usize>,
    baselines: bool,
) -> anyhow::Result<()> {
    let all = inputs::read_azure(dir, trace, limit)?;
    anyhow::ensure!(!all.is_empty(), "{}: the trace has no VM", trace.arrivals);
    let (vms, too_big): (Vec<Vm>, Vec<Vm>) = all
        .into_iter()
        .partition(|v| v.cpu <= host_cpu && v.mem <= host_mem);
    let mut results = serde_json::Map::new();
    let mut run_one = |name: &str, placer: &mut dyn Placer| {
        let started = std::time::Instant::now();
        let (used, bound, peak) = simulate(&vms, placer, host_cpu, host_mem);
        results.insert(
            name.to_string(),
            json!({ "host_seconds_over_lower_bound": used / bound, "peak_hosts": peak, "seconds": started.elapsed().as_secs_f64() }),
        );
        eprintln!(
            "{name}: {:.4} (peak {peak} hosts, {:.1}s)",
            used / bound,
            started.elapsed().as_secs_f64()
        );
    };
    let cap = Vec3 {
        mem: host_mem,
        cpu: host_cpu,
        disk: 0,
    };
    run_one(
        "berth",
        &mut BerthPlacer {
            scheduler: Scheduler::new(),
            ids: Vec::new(),
            index: BTreeMap::new(),
            cap,
            constraints: Constraints::default(),
        },
    );
    if baselines {
        for b in Baseline::ALL {
            run_one(
                b.name(),
                &mut BaselinePlacer {
                    policy: b,
                    cap: vec![host_cpu, host_mem],
                    loads: Vec::new(),
                },
            );
        }
    }
    println!(
        "{}",
        json!({ "summary": { "trace": trace.durations, "trace_end_seconds": trace.end, "arrivals": vms.len() + too_big.len(), "placed": vms.len(), "larger_than_a_host": too_big.len(), "host_cpu_millicores": host_cpu, "host_mem_mib": host_mem, "policies": results } })
    );
    Ok(())
}
