//! Reference placers for the replay: not policies a coordinator could run, but what puts the
//! online and compaction figures in context. Each knows something no online decision can:
//!
//! - [`LifetimeAware::clairvoyant`]: every VM's departure, read from the trace;
//! - [`LifetimeAware::in_sample_guess`]: a guess of each VM's lifetime from what is known when
//!   it arrives (the flavours of its arrival batch), but learned from the whole trace, future
//!   included: more than those features can tell an online policy;
//! - [`FullRepack`]: best fit, and at every compaction every VM that may move is packed again
//!   (best fit decreasing), however many moves that takes.

use std::collections::{BTreeMap, HashMap};

use berth_coordinator::placement::scheduler::baselines::Baseline;

use super::{BaselinePlacer, Placer, carry, unload};
use crate::inputs::Vm;

fn fits(load: &[u64], item: &[u64; 2], cap: &[u64]) -> bool {
    load.iter()
        .zip(item)
        .zip(cap)
        .all(|((l, s), c)| l + s <= *c)
}

/// The capacity left free after `item`, each dimension as a share of the host, summed: what
/// best fit makes least.
fn free_after(load: &[u64], item: &[u64; 2], cap: &[u64]) -> f64 {
    load.iter()
        .zip(item)
        .zip(cap)
        .map(|((l, s), c)| (c - l - s) as f64 / *c as f64)
        .sum()
}

/// Lifetime-aware best fit: among the hosts that hold a VM and fit the new one, those whose
/// latest assumed departure is not before the new VM's come first (it does not keep the host
/// any longer); among them, the least capacity left free, as best fit.
pub(super) struct LifetimeAware {
    /// Per VM of the replay, when it is assumed to leave.
    assumed_end: Vec<u64>,
    cap: [u64; 2],
    loads: Vec<[u64; 2]>,
    /// Per host, its VMs' assumed departures and how many VMs leave at each.
    ends: Vec<BTreeMap<u64, u32>>,
}

impl LifetimeAware {
    /// Told every VM's departure.
    pub(super) fn clairvoyant(vms: &[Vm], cap: [u64; 2]) -> Self {
        Self::assuming(vms.iter().map(|v| v.depart).collect(), cap)
    }

    /// Each VM assumed to last the `quantile` of the lifetimes of every VM of `vms` whose
    /// arrival batch holds the same flavours, as many times each.
    pub(super) fn in_sample_guess(vms: &[Vm], quantile: f64, cap: [u64; 2]) -> Self {
        Self::assuming(guessed_ends(vms, quantile), cap)
    }

    fn assuming(assumed_end: Vec<u64>, cap: [u64; 2]) -> Self {
        Self {
            assumed_end,
            cap,
            loads: Vec::new(),
            ends: Vec::new(),
        }
    }
}

/// Per VM, its arrival plus the `quantile` of the lifetimes of the VMs of `vms` in batches
/// of the same flavours.
fn guessed_ends(vms: &[Vm], quantile: f64) -> Vec<u64> {
    let mut batches: HashMap<u32, Vec<u16>> = HashMap::new();
    for v in vms {
        batches.entry(v.batch).or_default().push(v.flavour);
    }
    for flavours in batches.values_mut() {
        flavours.sort_unstable();
    }
    let mut lifetimes: HashMap<&[u16], Vec<u64>> = HashMap::new();
    for v in vms {
        lifetimes
            .entry(&batches[&v.batch])
            .or_default()
            .push(v.depart - v.arrive);
    }
    for l in lifetimes.values_mut() {
        l.sort_unstable();
    }
    vms.iter()
        .map(|v| {
            let l = &lifetimes[batches[&v.batch].as_slice()];
            v.arrive + l[((l.len() - 1) as f64 * quantile) as usize]
        })
        .collect()
}

impl Placer for LifetimeAware {
    fn place(&mut self, index: usize, vm: &Vm) -> usize {
        let (end, item) = (self.assumed_end[index], [vm.cpu, vm.mem]);
        let mut best: Option<(bool, f64, usize)> = None;
        for (h, (load, ends)) in self.loads.iter().zip(&self.ends).enumerate() {
            let Some((&latest, _)) = ends.last_key_value() else {
                continue;
            };
            if !fits(load, &item, &self.cap) {
                continue;
            }
            let (outlives, free) = (latest < end, free_after(load, &item, &self.cap));
            if best.is_none_or(|(o, f, _)| outlives.cmp(&o).then(free.total_cmp(&f)).is_lt()) {
                best = Some((outlives, free, h));
            }
        }
        let h = match best {
            Some((_, _, h)) => h,
            None => match self.ends.iter().position(BTreeMap::is_empty) {
                Some(h) => h,
                None => {
                    self.loads.push([0, 0]);
                    self.ends.push(BTreeMap::new());
                    self.loads.len() - 1
                }
            },
        };
        carry(&mut self.loads[h], vm);
        *self.ends[h].entry(end).or_default() += 1;
        h
    }

    fn remove(&mut self, host: usize, index: usize, vm: &Vm) {
        unload(&mut self.loads[host], vm);
        let end = self.assumed_end[index];
        let ends = &mut self.ends[host];
        if let Some(n) = ends.get_mut(&end) {
            *n -= 1;
            if *n == 0 {
                ends.remove(&end);
            }
        }
    }
}

/// Best fit, packing every VM that may move again at each compaction.
pub(super) struct FullRepack {
    fit: BaselinePlacer,
}

impl FullRepack {
    pub(super) fn new(cap: [u64; 2]) -> Self {
        Self {
            fit: BaselinePlacer {
                policy: Baseline::BestFit,
                cap: cap.to_vec(),
                loads: Vec::new(),
            },
        }
    }
}

impl Placer for FullRepack {
    fn place(&mut self, index: usize, vm: &Vm) -> usize {
        self.fit.place(index, vm)
    }

    fn remove(&mut self, host: usize, index: usize, vm: &Vm) {
        self.fit.remove(host, index, vm)
    }

    /// Keeps the VMs that may not move where they are, then packs the others by best fit
    /// decreasing (by their sizes as shares of a host, summed) into the hosts that hold a VM,
    /// opening one (a VM's own host first) when none fits; on a tie a VM stays put.
    fn compact(
        &mut self,
        vms: &[Vm],
        live: &[(usize, usize)],
        movable: &dyn Fn(usize) -> bool,
    ) -> Vec<(usize, usize)> {
        let cap = self.fit.cap.clone();
        let mut loads = vec![vec![0u64; 2]; self.fit.loads.len()];
        let mut moving = Vec::new();
        for &(v, h) in live {
            if movable(v) {
                moving.push((v, h));
            } else {
                carry(&mut loads[h], &vms[v]);
            }
        }
        let mut open: Vec<bool> = loads.iter().map(|l| l.iter().any(|x| *x > 0)).collect();
        let size = |v: &Vm| v.cpu as f64 / cap[0] as f64 + v.mem as f64 / cap[1] as f64;
        moving.sort_by(|a, b| {
            size(&vms[b.0])
                .total_cmp(&size(&vms[a.0]))
                .then(a.0.cmp(&b.0))
        });
        let mut moves = Vec::new();
        for (v, from) in moving {
            let item = [vms[v].cpu, vms[v].mem];
            let mut best: Option<(f64, bool, usize)> = None;
            for (h, load) in loads.iter().enumerate() {
                if !open[h] || !fits(load, &item, &cap) {
                    continue;
                }
                let (free, elsewhere) = (free_after(load, &item, &cap), h != from);
                if best.is_none_or(|(f, e, _)| free.total_cmp(&f).then(elsewhere.cmp(&e)).is_lt()) {
                    best = Some((free, elsewhere, h));
                }
            }
            let to = match best {
                Some((_, _, h)) => h,
                None if !open[from] => from,
                None => open.iter().position(|o| !o).unwrap_or_else(|| {
                    loads.push(vec![0, 0]);
                    open.push(false);
                    loads.len() - 1
                }),
            };
            open[to] = true;
            carry(&mut loads[to], &vms[v]);
            if to != from {
                moves.push((v, to));
            }
        }
        self.fit.loads = loads;
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::super::simulate;
    use super::*;

    fn vm(arrive: u64, depart: u64, size: u64, flavour: u16, batch: u32) -> Vm {
        Vm {
            arrive,
            depart,
            cpu: size,
            mem: size,
            flavour,
            batch,
        }
    }

    /// A long VM arrives while the fuller host is about to empty: best fit keeps that host
    /// for the long VM's whole life, the clairvoyant placer puts it beside the other long one.
    #[test]
    fn knowing_departures_keeps_a_short_lived_host_short() {
        let vms = [
            vm(0, 10, 70, 0, 0),
            vm(1, 1_000, 40, 0, 1),
            vm(2, 1_000, 20, 0, 2),
            vm(1_000, 1_001, 1, 0, 3),
        ];
        let best_fit = simulate(&vms, &mut FullRepack::new([100, 100]), 100, 100, None, None);
        let clairvoyant = simulate(
            &vms,
            &mut LifetimeAware::clairvoyant(&vms, [100, 100]),
            100,
            100,
            None,
            None,
        );
        // Best fit: the first host from 0 to 1,000, the second from 1 to 1,000.
        assert_eq!(best_fit.used, 1_000.0 + 999.0);
        // Clairvoyant: the first host until 10.
        assert_eq!(clairvoyant.used, 10.0 + 999.0);
        assert_eq!(best_fit.bound, clairvoyant.bound);
    }

    #[test]
    fn a_guess_is_the_quantile_of_the_lifetimes_of_batches_of_the_same_flavours() {
        let vms = [
            // Batches 0 and 1 hold flavours {0, 1}; batch 2 only {0}.
            vm(0, 100, 1, 0, 0),
            vm(0, 200, 1, 1, 0),
            vm(10, 310, 1, 1, 1),
            vm(10, 410, 1, 0, 1),
            vm(20, 25, 1, 0, 2),
        ];
        // Lifetimes of {0, 1} batches: 100, 200, 300, 400; the 0.75 quantile is the third.
        assert_eq!(guessed_ends(&vms, 0.75), [300, 300, 310, 310, 25]);
        assert_eq!(guessed_ends(&vms, 0.0), [100, 100, 110, 110, 25]);
    }

    /// Departures leave two hosts half empty: a re-pack puts what is left on one of them, the
    /// VM that may not move stays.
    #[test]
    fn a_full_repack_packs_what_may_move_around_what_may_not() {
        let vms = [
            vm(0, 10_000, 50, 0, 0),
            vm(1, 100, 50, 0, 0),
            vm(2, 10_000, 30, 0, 0),
            vm(3, 100, 70, 0, 0),
            vm(5_000, 10_000, 1, 0, 0),
        ];
        let mut placer = FullRepack::new([100, 100]);
        for (i, v) in vms[..4].iter().enumerate() {
            placer.place(i, v);
        }
        assert_eq!(placer.fit.loads, [[100, 100], [100, 100]]);
        placer.remove(0, 1, &vms[1]);
        placer.remove(1, 3, &vms[3]);
        let live = [(0, 0), (2, 1)];
        // VM 0 may not move: VM 2 joins it.
        assert_eq!(placer.compact(&vms, &live, &|v| v != 0), [(2, 0)]);
        assert_eq!(placer.fit.loads, [[80, 80], [0, 0]]);
        // Neither may move: nothing does.
        let live = [(0, 0), (2, 0)];
        assert!(placer.compact(&vms, &live, &|_| false).is_empty());
        assert_eq!(placer.fit.loads, [[80, 80], [0, 0]]);
    }
}
