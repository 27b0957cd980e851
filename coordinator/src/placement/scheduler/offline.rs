//! Offline vector bin packing: place a known set of items into as few identical bins as
//! possible. Drain plans and compaction use it; `berth-bench pack` measures it against the
//! published optima.
//!
//! A portfolio of heuristics (item-centric first/best fit decreasing under several size
//! measures, and bin-centric dot-product and norm-based filling, after Panigrahy et al. 2011)
//! is run; the best packing is then improved by trying to empty its least-loaded bins into the
//! others. Every packing returned is checked to fit.

/// Items and capacity in any number of dimensions (integer sizes, as in the .vbp format).
#[derive(Debug, Clone)]
pub struct Instance {
    pub capacity: Vec<u64>,
    pub items: Vec<Vec<u64>>,
}

/// Bins, each a list of item indices.
pub type Packing = Vec<Vec<usize>>;

impl Instance {
    /// The trivial lower bound: per dimension, total size over capacity, rounded up.
    pub fn lower_bound(&self) -> usize {
        (0..self.capacity.len())
            .map(|d| {
                let total: u64 = self.items.iter().map(|i| i[d]).sum();
                total.div_ceil(self.capacity[d].max(1)) as usize
            })
            .max()
            .unwrap_or(0)
    }

    fn norm(&self, item: &[u64]) -> Vec<f64> {
        item.iter()
            .zip(&self.capacity)
            .map(|(s, c)| *s as f64 / *c as f64)
            .collect()
    }

    fn fits(&self, load: &[u64], item: &[u64]) -> bool {
        load.iter()
            .zip(item)
            .zip(&self.capacity)
            .all(|((l, s), c)| l + s <= *c)
    }

    /// True when `packing` holds every item exactly once and no bin overflows.
    pub fn is_valid(&self, packing: &Packing) -> bool {
        let mut seen = vec![false; self.items.len()];
        for bin in packing {
            let mut load = vec![0u64; self.capacity.len()];
            for &i in bin {
                if i >= seen.len() || seen[i] || !self.fits(&load, &self.items[i]) {
                    return false;
                }
                seen[i] = true;
                for (l, s) in load.iter_mut().zip(&self.items[i]) {
                    *l += s;
                }
            }
        }
        seen.iter().all(|s| *s)
    }
}

/// Item orderings for the item-centric heuristics.
#[derive(Debug, Clone, Copy)]
enum SizeMeasure {
    Sum,
    Max,
    L2,
    /// Weighted by how scarce each dimension is across all items.
    Weighted,
}

fn dimension_weights(inst: &Instance) -> Vec<f64> {
    (0..inst.capacity.len())
        .map(|d| {
            inst.items
                .iter()
                .map(|i| i[d] as f64 / inst.capacity[d] as f64)
                .sum::<f64>()
                .max(1e-9)
        })
        .collect()
}

fn size(inst: &Instance, weights: &[f64], item: &[u64], measure: SizeMeasure) -> f64 {
    let n = inst.norm(item);
    match measure {
        SizeMeasure::Sum => n.iter().sum(),
        SizeMeasure::Max => n.iter().cloned().fold(0.0, f64::max),
        SizeMeasure::L2 => n.iter().map(|x| x * x).sum(),
        SizeMeasure::Weighted => n.iter().zip(weights).map(|(x, w)| x * w).sum(),
    }
}

/// First fit (or best fit, by the load left free) over items in decreasing `measure`.
fn item_centric(inst: &Instance, weights: &[f64], measure: SizeMeasure, best_fit: bool) -> Packing {
    let mut order: Vec<usize> = (0..inst.items.len()).collect();
    order.sort_by(|a, b| {
        size(inst, weights, &inst.items[*b], measure).total_cmp(&size(
            inst,
            weights,
            &inst.items[*a],
            measure,
        ))
    });
    let mut bins: Packing = Vec::new();
    let mut loads: Vec<Vec<u64>> = Vec::new();
    for i in order {
        let item = &inst.items[i];
        let chosen = if best_fit {
            (0..bins.len())
                .filter(|&b| inst.fits(&loads[b], item))
                .min_by(|&a, &b| {
                    let free = |b: usize| -> f64 {
                        loads[b]
                            .iter()
                            .zip(&inst.capacity)
                            .zip(item)
                            .map(|((l, c), s)| (c - l - s) as f64 / *c as f64)
                            .sum()
                    };
                    free(a).total_cmp(&free(b))
                })
        } else {
            (0..bins.len()).find(|&b| inst.fits(&loads[b], item))
        };
        let b = chosen.unwrap_or_else(|| {
            bins.push(Vec::new());
            loads.push(vec![0; inst.capacity.len()]);
            bins.len() - 1
        });
        bins[b].push(i);
        for (l, s) in loads[b].iter_mut().zip(item) {
            *l += s;
        }
    }
    bins
}

/// How a bin-centric heuristic picks the next item for the open bin.
#[derive(Debug, Clone, Copy)]
enum BinRule {
    /// Largest weighted dot product between the item and the bin's free space.
    DotProduct,
    /// Smallest distance between the free space and the item (fills the bin evenly).
    L2Residual,
}

/// Opens one bin at a time and fills it with the best-matching remaining item until none fits.
fn bin_centric(inst: &Instance, weights: &[f64], rule: BinRule) -> Packing {
    let dims = inst.capacity.len();
    let normed: Vec<Vec<f64>> = inst.items.iter().map(|i| inst.norm(i)).collect();
    let mut left: Vec<usize> = (0..inst.items.len()).collect();
    // Start each bin with the largest remaining item.
    left.sort_by(|a, b| {
        normed[*b]
            .iter()
            .sum::<f64>()
            .total_cmp(&normed[*a].iter().sum::<f64>())
    });
    let mut bins = Vec::new();
    while !left.is_empty() {
        let mut load = vec![0u64; dims];
        let mut bin = Vec::new();
        loop {
            let free: Vec<f64> = (0..dims)
                .map(|d| (inst.capacity[d] - load[d]) as f64 / inst.capacity[d] as f64)
                .collect();
            let pick = left
                .iter()
                .enumerate()
                .filter(|(_, i)| inst.fits(&load, &inst.items[**i]))
                .map(|(pos, i)| {
                    let n = &normed[*i];
                    let score = match rule {
                        BinRule::DotProduct => {
                            -(0..dims).map(|d| n[d] * free[d] * weights[d]).sum::<f64>()
                        }
                        BinRule::L2Residual => (0..dims)
                            .map(|d| (free[d] - n[d]).powi(2) * weights[d])
                            .sum::<f64>(),
                    };
                    (pos, score)
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let Some((pos, _)) = pick else { break };
            let i = left.remove(pos);
            for (l, s) in load.iter_mut().zip(&inst.items[i]) {
                *l += s;
            }
            bin.push(i);
        }
        bins.push(bin);
    }
    bins
}

/// Tries to empty the least-loaded bins by moving their items into the others (each item to
/// the fullest bin it fits in). Repeats while it removes bins.
fn eliminate_bins(inst: &Instance, mut bins: Packing) -> Packing {
    let load_of = |bin: &[usize]| -> Vec<u64> {
        let mut load = vec![0u64; inst.capacity.len()];
        for &i in bin {
            for (l, s) in load.iter_mut().zip(&inst.items[i]) {
                *l += s;
            }
        }
        load
    };
    let fullness = |load: &[u64]| -> f64 {
        load.iter()
            .zip(&inst.capacity)
            .map(|(l, c)| *l as f64 / *c as f64)
            .sum()
    };
    'outer: loop {
        let mut order: Vec<usize> = (0..bins.len()).collect();
        order.sort_by(|a, b| {
            fullness(&load_of(&bins[*a])).total_cmp(&fullness(&load_of(&bins[*b])))
        });
        for &victim in &order {
            let mut loads: Vec<Vec<u64>> = bins.iter().map(|b| load_of(b)).collect();
            let mut moves = Vec::new();
            let mut items = bins[victim].clone();
            items.sort_by(|a, b| {
                inst.norm(&inst.items[*b])
                    .iter()
                    .sum::<f64>()
                    .total_cmp(&inst.norm(&inst.items[*a]).iter().sum::<f64>())
            });
            let mut ok = true;
            for i in items {
                let target = (0..bins.len())
                    .filter(|&b| b != victim && inst.fits(&loads[b], &inst.items[i]))
                    .max_by(|a, b| fullness(&loads[*a]).total_cmp(&fullness(&loads[*b])));
                match target {
                    Some(b) => {
                        for (l, s) in loads[b].iter_mut().zip(&inst.items[i]) {
                            *l += s;
                        }
                        moves.push((i, b));
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                for (i, b) in moves {
                    bins[b].push(i);
                }
                bins.remove(victim);
                continue 'outer;
            }
        }
        return bins;
    }
}

/// Packs `inst` with the portfolio; the result always holds every item and fits.
pub fn pack(inst: &Instance) -> Packing {
    let weights = dimension_weights(inst);
    let unit = vec![1.0; inst.capacity.len()];
    let lower = inst.lower_bound();
    let mut best: Option<Packing> = None;
    let mut consider = |p: Packing| {
        if best.as_ref().is_none_or(|b| p.len() < b.len()) {
            best = Some(p);
        }
    };
    let candidates: Vec<Box<dyn Fn() -> Packing>> = vec![
        Box::new(|| bin_centric(inst, &weights, BinRule::DotProduct)),
        Box::new(|| bin_centric(inst, &unit, BinRule::DotProduct)),
        Box::new(|| bin_centric(inst, &weights, BinRule::L2Residual)),
        Box::new(|| bin_centric(inst, &unit, BinRule::L2Residual)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Weighted, false)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Sum, false)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Max, false)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::L2, true)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Weighted, true)),
    ];
    for make in candidates {
        let packing = eliminate_bins(inst, make());
        let reached_bound = packing.len() <= lower;
        consider(packing);
        if reached_bound {
            break;
        }
    }
    best.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_to_the_bound_when_items_pair_up() {
        // Items that pair perfectly: 6 items, 3 bins.
        let inst = Instance {
            capacity: vec![10, 10],
            items: vec![
                vec![7, 3],
                vec![3, 7],
                vec![6, 4],
                vec![4, 6],
                vec![5, 5],
                vec![5, 5],
            ],
        };
        let p = pack(&inst);
        assert!(inst.is_valid(&p));
        assert_eq!(p.len(), 3);
        assert_eq!(inst.lower_bound(), 3);
    }

    #[test]
    fn every_packing_is_valid_on_random_instances() {
        let mut rng = 12345u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..50 {
            let dims = 1 + (next() % 4) as usize;
            let capacity: Vec<u64> = (0..dims).map(|_| 100 + next() % 900).collect();
            let items: Vec<Vec<u64>> = (0..(5 + next() % 60))
                .map(|_| capacity.iter().map(|c| 1 + next() % c).collect())
                .collect();
            let inst = Instance { capacity, items };
            let p = pack(&inst);
            assert!(inst.is_valid(&p));
            assert!(p.len() >= inst.lower_bound());
        }
    }

    #[test]
    fn validity_check_catches_overflow_and_missing_items() {
        let inst = Instance {
            capacity: vec![10],
            items: vec![vec![6], vec![6]],
        };
        assert!(!inst.is_valid(&vec![vec![0, 1]]));
        assert!(!inst.is_valid(&vec![vec![0]]));
        assert!(inst.is_valid(&vec![vec![0], vec![1]]));
    }
}
