//! Offline vector bin packing: place a known set of items into as few identical bins as
//! possible. `berth-bench pack` measures it against the published optima.
//!
//! A portfolio of heuristics (item-centric first/best fit decreasing under several size
//! measures, bin-centric dot-product and norm-based filling after Panigrahy et al. 2011, and
//! every baseline policy in the items' own order) is run, each packing improved by trying to
//! empty its least-loaded bins into the others. Above the lower bound, the items are packed
//! again bin by bin at the bound, each bin filled to within the room the bound leaves
//! ([`fill_within_slack`], after the minimum bin slack heuristic). A local search then
//! starts from the best: it
//! takes one bin's items out into a pool and exchanges items between the pool and the other
//! bins (one in, at most two out, never straight back) until the pool is empty, which is a
//! packing with one bin fewer, and goes on from there within its budget.
//!
//! Ensures: the result is never worse than any packing of the portfolio, so never worse than
//! any baseline; every packing returned holds every item once and fits; the same instance and
//! iteration budget give the same packing (the time limit only ever cuts a search short).

use std::time::{Duration, Instant};

use super::baselines::Baseline;

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

    /// The summed sizes of the items of `bin`.
    fn load(&self, bin: &[usize]) -> Vec<u64> {
        let mut load = vec![0u64; self.capacity.len()];
        for &i in bin {
            add(&mut load, &self.items[i]);
        }
        load
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

/// Items in decreasing `measure`, each into the bin a baseline's `rule` chooses (first fit,
/// or best fit by the load left free).
fn item_centric(inst: &Instance, weights: &[f64], measure: SizeMeasure, rule: Baseline) -> Packing {
    let mut order: Vec<usize> = (0..inst.items.len()).collect();
    order.sort_by(|a, b| {
        size(inst, weights, &inst.items[*b], measure).total_cmp(&size(
            inst,
            weights,
            &inst.items[*a],
            measure,
        ))
    });
    place_in_order(inst, order, |loads, item| {
        rule.choose(loads, &inst.capacity, item)
    })
}

/// Places the items in `order`, each into the bin `choose` names among the open bins' loads,
/// or into a new bin when it names none.
fn place_in_order(
    inst: &Instance,
    order: impl IntoIterator<Item = usize>,
    mut choose: impl FnMut(&[Vec<u64>], &[u64]) -> Option<usize>,
) -> Packing {
    let mut bins: Packing = Vec::new();
    let mut loads: Vec<Vec<u64>> = Vec::new();
    for i in order {
        let item = &inst.items[i];
        let b = choose(&loads, item).unwrap_or_else(|| {
            bins.push(Vec::new());
            loads.push(vec![0; inst.capacity.len()]);
            bins.len() - 1
        });
        bins[b].push(i);
        add(&mut loads[b], item);
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
    let load_of = |bin: &[usize]| inst.load(bin);
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

/// How long the local search may run on one instance: whichever ends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchBudget {
    /// Moves (one exchange between the pool and a bin each).
    pub iterations: u64,
    pub time: Duration,
}

impl Default for SearchBudget {
    fn default() -> Self {
        Self {
            iterations: 20_000,
            time: Duration::from_millis(500),
        }
    }
}

/// Packs `inst` with the portfolio and the local search under the default budget.
pub fn pack(inst: &Instance) -> Packing {
    pack_within(inst, SearchBudget::default())
}

/// Packs the items in their own order with a baseline's choice of bin.
pub fn in_input_order(inst: &Instance, rule: Baseline) -> Packing {
    place_in_order(inst, 0..inst.items.len(), |loads, item| {
        rule.choose(loads, &inst.capacity, item)
    })
}

/// The best packing of the portfolio, then the local search from it within `budget`.
pub fn pack_within(inst: &Instance, budget: SearchBudget) -> Packing {
    let started = Instant::now();
    let weights = dimension_weights(inst);
    let unit = vec![1.0; inst.capacity.len()];
    let lower = inst.lower_bound();
    let mut best: Option<Packing> = None;
    let mut consider = |p: Packing| {
        if best.as_ref().is_none_or(|b| p.len() < b.len()) {
            best = Some(p);
        }
    };
    let mut candidates: Vec<Box<dyn Fn() -> Packing>> = vec![
        Box::new(|| bin_centric(inst, &weights, BinRule::DotProduct)),
        Box::new(|| bin_centric(inst, &unit, BinRule::DotProduct)),
        Box::new(|| bin_centric(inst, &weights, BinRule::L2Residual)),
        Box::new(|| bin_centric(inst, &unit, BinRule::L2Residual)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Weighted, Baseline::FirstFit)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Sum, Baseline::FirstFit)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Max, Baseline::FirstFit)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::L2, Baseline::BestFit)),
        Box::new(|| item_centric(inst, &weights, SizeMeasure::Weighted, Baseline::BestFit)),
    ];
    for rule in Baseline::ALL {
        candidates.push(Box::new(move || in_input_order(inst, rule)));
    }
    for make in candidates {
        let packing = eliminate_bins(inst, make());
        let reached_bound = packing.len() <= lower;
        consider(packing);
        if reached_bound {
            break;
        }
    }
    let best = best.unwrap_or_default();
    if best.len() <= lower {
        return best;
    }
    let deadline = started + budget.time;
    let mut spent = 0;
    let best = (lower..best.len())
        .find_map(|target| fill_within_slack(inst, &weights, target, &mut spent, deadline))
        .unwrap_or(best);
    if best.len() <= lower {
        return best;
    }
    PoolSearch::new(inst, best).run(lower, budget, deadline)
}

/// How many item placements one bin's search in [`fill_within_slack`] may try.
const FILL_TRIES_PER_BIN: u64 = 200_000;
/// How many item placements every bin of every target together may try: most of the time
/// budget stays with the local search (an instance of 500 items that cannot be filled to its
/// bound would otherwise spend it all failing).
const FILL_TRIES: u64 = 1_000_000;

/// Packs into `target` bins, bin by bin: each bin takes, of the items left, a set found by a
/// depth-first search in decreasing weighted size that leaves it no emptier in any dimension
/// than the room `target` bins leave over the items' total (what earlier bins left empty
/// counts against that room); the last bin takes what remains if it fits. After the minimum
/// bin slack heuristic (Gupta and Ho), with the room of a target bin count as the budget, so
/// a tight instance is packed full bin after bin. `None` when the room is negative, a bin
/// finds no such set within [`FILL_TRIES_PER_BIN`] placements, the rest does not fit the last
/// bin, or `spent` (placements tried, counted here) reaches [`FILL_TRIES`] or the deadline
/// passes.
fn fill_within_slack(
    inst: &Instance,
    weights: &[f64],
    target: usize,
    spent: &mut u64,
    deadline: Instant,
) -> Option<Packing> {
    let dims = inst.capacity.len();
    let mut room: Vec<i128> = (0..dims)
        .map(|d| {
            let total: u64 = inst.items.iter().map(|i| i[d]).sum();
            target as i128 * inst.capacity[d] as i128 - total as i128
        })
        .collect();
    if target == 0 || room.iter().any(|r| *r < 0) {
        return None;
    }
    let mut left: Vec<usize> = (0..inst.items.len()).collect();
    left.sort_by(|&a, &b| {
        let size = |i: usize| size(inst, weights, &inst.items[i], SizeMeasure::Weighted);
        size(b).total_cmp(&size(a)).then(a.cmp(&b))
    });
    let mut bins = Vec::with_capacity(target);
    for _ in 1..target {
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline || *spent >= FILL_TRIES {
            return None;
        }
        let mut search = SlackSearch {
            inst,
            order: &left,
            room: &room,
            tries: 0,
            chosen: Vec::new(),
        };
        let positions = search.run(0, vec![0; dims]);
        *spent += search.tries;
        let positions = positions?;
        let bin: Vec<usize> = positions.iter().map(|&p| left[p]).collect();
        let load = inst.load(&bin);
        for d in 0..dims {
            room[d] -= (inst.capacity[d] - load[d]) as i128;
        }
        let mut taken = positions;
        taken.sort_unstable_by(|a, b| b.cmp(a));
        for p in taken {
            left.remove(p);
        }
        bins.push(bin);
    }
    let last = inst.load(&left);
    if last.iter().zip(&inst.capacity).any(|(l, c)| l > c) {
        return None;
    }
    if !left.is_empty() {
        bins.push(left);
    }
    Some(bins)
}

/// One bin's depth-first search of [`fill_within_slack`].
struct SlackSearch<'a> {
    inst: &'a Instance,
    /// The items left, by position.
    order: &'a [usize],
    /// Per dimension, how much the bin may leave empty.
    room: &'a [i128],
    tries: u64,
    chosen: Vec<usize>,
}

impl SlackSearch<'_> {
    /// The positions of a set that fills the bin to within `room`, trying items from `from`
    /// on, with `load` in the bin so far.
    fn run(&mut self, from: usize, load: Vec<u64>) -> Option<Vec<usize>> {
        let cap = &self.inst.capacity;
        if !self.chosen.is_empty()
            && (0..cap.len()).all(|d| (cap[d] - load[d]) as i128 <= self.room[d])
        {
            return Some(self.chosen.clone());
        }
        for p in from..self.order.len() {
            self.tries += 1;
            if self.tries > FILL_TRIES_PER_BIN {
                return None;
            }
            let item = &self.inst.items[self.order[p]];
            if !self.inst.fits(&load, item) {
                continue;
            }
            let mut next = load.clone();
            add(&mut next, item);
            self.chosen.push(p);
            if let Some(found) = self.run(p + 1, next) {
                return Some(found);
            }
            self.chosen.pop();
        }
        None
    }
}

/// The local search's state: every bin fits; the pool holds the items of no bin.
struct PoolSearch<'a> {
    inst: &'a Instance,
    /// Per item: its size, each dimension over the capacity, summed; squared in the objective
    /// (the pool's sum of squares), so placing one big item beats placing two small ones.
    weight: Vec<f64>,
    bins: Vec<Vec<usize>>,
    loads: Vec<Vec<u64>>,
    pool: Vec<usize>,
    /// Per (item, bin): the iteration before which the item may not go back into the bin it
    /// was just taken out of.
    tabu: std::collections::HashMap<(usize, usize), u64>,
    rng: u64,
}

/// An exchange: `pool[pooled]` goes into `bin`, the items at positions `out` of that bin go
/// to the pool.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    pooled: usize,
    bin: usize,
    out: [Option<usize>; 2],
    gain: f64,
}

impl<'a> PoolSearch<'a> {
    fn new(inst: &'a Instance, bins: Packing) -> Self {
        let weight = inst
            .items
            .iter()
            .map(|item| inst.norm(item).iter().sum::<f64>())
            .collect();
        let loads = bins.iter().map(|bin| inst.load(bin)).collect();
        // Seeded by the instance's shape: the same instance searches the same way.
        let rng = 0x9e37_79b9_7f4a_7c15 ^ (inst.items.len() as u64) << 8 ^ bins.len() as u64;
        Self {
            inst,
            weight,
            bins,
            loads,
            pool: Vec::new(),
            tabu: Default::default(),
            rng,
        }
    }

    fn next_random(&mut self) -> u64 {
        xorshift(&mut self.rng)
    }

    /// Moves the items of the `rank`-th lightest bin (0: the lightest) into the pool.
    fn open_pool(&mut self, rank: usize) {
        let total = |bin: &Vec<usize>| bin.iter().map(|&i| self.weight[i]).sum::<f64>();
        let mut order: Vec<usize> = (0..self.bins.len()).collect();
        order.sort_by(|&a, &b| total(&self.bins[a]).total_cmp(&total(&self.bins[b])));
        let Some(&chosen) = order.get(rank.min(order.len().saturating_sub(1))) else {
            return;
        };
        self.pool.extend(self.bins.swap_remove(chosen));
        self.loads.swap_remove(chosen);
        // Bin numbers changed.
        self.tabu.clear();
    }

    /// Starts again from `bins`, with an empty pool.
    fn reset(&mut self, bins: Packing) {
        self.loads = bins.iter().map(|bin| self.inst.load(bin)).collect();
        self.bins = bins;
        self.pool.clear();
        self.tabu.clear();
    }

    fn pool_objective(&self) -> f64 {
        self.pool
            .iter()
            .map(|&i| self.weight[i] * self.weight[i])
            .sum()
    }

    /// Whether `item` fits in `bin` once the items at positions `out` of it are taken out.
    fn fits_without(&self, bin: usize, out: [Option<usize>; 2], item: usize) -> bool {
        let members = &self.bins[bin];
        let item = &self.inst.items[item];
        (0..self.inst.capacity.len()).all(|d| {
            let freed: u64 = out
                .iter()
                .flatten()
                .map(|&p| self.inst.items[members[p]][d])
                .sum();
            self.loads[bin][d] - freed + item[d] <= self.inst.capacity[d]
        })
    }

    /// The exchange that lowers the pool's sum of squared weights the most (or raises it the
    /// least: the search goes on through worse states, the tabu keeping it from undoing its
    /// last steps); ties broken at random.
    fn best_exchange(&mut self, iteration: u64) -> Option<Exchange> {
        let mut best: Option<Exchange> = None;
        let mut ties = 0u64;
        let mut rng = self.rng;
        let square = |w: f64| w * w;
        for pooled in 0..self.pool.len() {
            let item = self.pool[pooled];
            let gained = square(self.weight[item]);
            for bin in 0..self.bins.len() {
                if self
                    .tabu
                    .get(&(item, bin))
                    .is_some_and(|until| *until > iteration)
                {
                    continue;
                }
                let members = &self.bins[bin];
                let n = members.len();
                let singles = (0..n).map(|a| [Some(a), None]);
                let pairs = (0..n).flat_map(|a| (a + 1..n).map(move |b| [Some(a), Some(b)]));
                for out in std::iter::once([None, None]).chain(singles).chain(pairs) {
                    let lost: f64 = out
                        .iter()
                        .flatten()
                        .map(|&p| square(self.weight[members[p]]))
                        .sum();
                    let gain = gained - lost;
                    // Only an exchange at least as good as the best so far is checked for fit.
                    if best.is_some_and(|b| gain < b.gain - 1e-12)
                        || !self.fits_without(bin, out, item)
                    {
                        continue;
                    }
                    let candidate = Exchange {
                        pooled,
                        bin,
                        out,
                        gain,
                    };
                    match &best {
                        Some(b) if gain <= b.gain + 1e-12 => {
                            ties += 1;
                            if xorshift(&mut rng).is_multiple_of(ties + 1) {
                                best = Some(candidate);
                            }
                        }
                        _ => {
                            ties = 0;
                            best = Some(candidate);
                        }
                    }
                }
            }
        }
        self.rng = rng;
        best
    }

    fn apply(&mut self, exchange: Exchange, iteration: u64) {
        let item = self.pool.swap_remove(exchange.pooled);
        let bin = exchange.bin;
        let mut positions: Vec<usize> = exchange.out.iter().flatten().copied().collect();
        positions.sort_unstable_by(|a, b| b.cmp(a));
        let tenure = 3 + self.next_random() % 8;
        for position in positions {
            let out = self.bins[bin].swap_remove(position);
            for (l, s) in self.loads[bin].iter_mut().zip(&self.inst.items[out]) {
                *l -= s;
            }
            self.tabu.insert((out, bin), iteration + tenure);
            self.pool.push(out);
        }
        self.bins[bin].push(item);
        add(&mut self.loads[bin], &self.inst.items[item]);
    }

    /// Searches until the bins reach `lower`, the budget ends or no exchange is possible;
    /// returns the packing with the fewest bins it held (the one it started from at worst).
    /// A pool that has not come closer to empty for [`PATIENCE`] moves is given up: the search
    /// starts again from the best packing, emptying one of its lightest bins at random.
    fn run(mut self, lower: usize, budget: SearchBudget, deadline: Instant) -> Packing {
        let mut best = self.bins.clone();
        self.open_pool(0);
        let (mut closest, mut since_closer) = (f64::INFINITY, 0u64);
        for iteration in 0..budget.iterations {
            if self.pool.is_empty() {
                best = self.bins.clone();
                if best.len() <= lower {
                    break;
                }
                self.open_pool(0);
                (closest, since_closer) = (f64::INFINITY, 0);
                continue;
            }
            if iteration % 64 == 0 && Instant::now() >= deadline {
                break;
            }
            if since_closer >= PATIENCE {
                self.reset(best.clone());
                let rank = (self.next_random() % 4) as usize;
                self.open_pool(rank);
                (closest, since_closer) = (f64::INFINITY, 0);
            }
            let Some(exchange) = self.best_exchange(iteration) else {
                break;
            };
            self.apply(exchange, iteration);
            let objective = self.pool_objective();
            if objective < closest - 1e-12 {
                (closest, since_closer) = (objective, 0);
            } else {
                since_closer += 1;
            }
        }
        if self.pool.is_empty() && self.bins.len() < best.len() {
            best = self.bins;
        }
        best
    }
}

/// Moves without the pool coming closer to empty before the search starts again.
const PATIENCE: u64 = 2_000;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn add(load: &mut [u64], item: &[u64]) {
    for (l, s) in load.iter_mut().zip(item) {
        *l += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bins of `capacity` in both dimensions.
    fn two_dimensions(capacity: u64, items: &[[u64; 2]]) -> Instance {
        Instance {
            capacity: vec![capacity; 2],
            items: items.iter().map(|i| i.to_vec()).collect(),
        }
    }

    #[test]
    fn packs_to_the_bound_when_items_pair_up() {
        // Items that pair perfectly: 6 items, 3 bins.
        let inst = two_dimensions(10, &[[7, 3], [3, 7], [6, 4], [4, 6], [5, 5], [5, 5]]);
        let p = pack(&inst);
        assert!(inst.is_valid(&p));
        assert_eq!(p.len(), 3);
        assert_eq!(inst.lower_bound(), 3);
    }

    /// `bins` full bins of capacity 1,000 in 3 dimensions, each cut into 4 to 7 items, the
    /// items shuffled: an instance whose only packings into `bins` bins leave no room.
    fn cut_full_bins(bins: usize, seed: u64) -> Instance {
        let mut rng = seed;
        let mut next = move || xorshift(&mut rng);
        let mut items = Vec::new();
        for _ in 0..bins {
            let pieces = 4 + (next() % 4) as usize;
            let mut cut: Vec<Vec<u64>> = vec![Vec::new(); pieces];
            for _ in 0..3 {
                let mut marks: Vec<u64> = (1..pieces).map(|_| 1 + next() % 999).collect();
                marks.extend([0, 1000]);
                marks.sort_unstable();
                for (piece, w) in marks.windows(2).enumerate() {
                    cut[piece].push(w[1] - w[0]);
                }
            }
            items.extend(cut.into_iter().filter(|i| i.iter().all(|s| *s > 0)));
        }
        for i in (1..items.len()).rev() {
            items.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        Instance {
            capacity: vec![1000; 3],
            items,
        }
    }

    #[test]
    fn a_tight_instance_is_filled_bin_by_bin_within_its_room() {
        let weights = vec![1.0; 3];
        let far = Instant::now() + Duration::from_secs(60);
        for seed in [3, 5, 8, 13] {
            let inst = cut_full_bins(5, seed);
            let lower = inst.lower_bound();
            let filled = fill_within_slack(&inst, &weights, lower, &mut 0, far)
                .unwrap_or_else(|| panic!("seed {seed}: no packing into {lower} bins"));
            assert!(inst.is_valid(&filled), "seed {seed}");
            assert_eq!(filled.len(), lower, "seed {seed}");
            assert_eq!(pack(&inst).len(), lower, "seed {seed}");
        }
        // Fewer bins than the items' total leaves no room at all: refused at once.
        let inst = cut_full_bins(5, 3);
        let below = inst.lower_bound() - 1;
        assert!(fill_within_slack(&inst, &weights, below, &mut 0, far).is_none());
    }

    #[test]
    fn every_packing_is_valid_on_random_instances() {
        let mut rng = 12345u64;
        let mut next = move || xorshift(&mut rng);
        for _ in 0..50 {
            let dims = 1 + (next() % 4) as usize;
            let capacity: Vec<u64> = (0..dims).map(|_| 100 + next() % 900).collect();
            let items: Vec<Vec<u64>> = (0..(5 + next() % 60))
                .map(|_| capacity.iter().map(|c| 1 + next() % c).collect())
                .collect();
            let inst = Instance { capacity, items };
            let p = pack_within(
                &inst,
                SearchBudget {
                    iterations: 300,
                    time: Duration::from_secs(60),
                },
            );
            assert!(inst.is_valid(&p));
            assert!(p.len() >= inst.lower_bound());
        }
    }

    fn random_instances(count: usize) -> Vec<Instance> {
        let mut rng = 777u64;
        let mut next = move || xorshift(&mut rng);
        (0..count)
            .map(|_| {
                let dims = 2 + (next() % 4) as usize;
                let capacity: Vec<u64> = (0..dims).map(|_| 1000).collect();
                let items = (0..(20 + next() % 80))
                    .map(|_| capacity.iter().map(|c| 50 + next() % (c / 2)).collect())
                    .collect();
                Instance { capacity, items }
            })
            .collect()
    }

    #[test]
    fn the_search_empties_bins_a_bad_start_left() {
        // Pairs that fill a bin exactly, started one item per bin: the search must find the
        // pairing, 4 bins (the bound), not merely some improvement.
        let inst = two_dimensions(
            100,
            &[
                [70, 30],
                [30, 70],
                [60, 45],
                [40, 55],
                [55, 50],
                [45, 50],
                [20, 90],
                [80, 10],
            ],
        );
        let start: Packing = (0..inst.items.len()).map(|i| vec![i]).collect();
        let budget = SearchBudget {
            iterations: 10_000,
            time: Duration::from_secs(10),
        };
        let found = PoolSearch::new(&inst, start).run(
            inst.lower_bound(),
            budget,
            Instant::now() + budget.time,
        );
        assert!(inst.is_valid(&found), "{found:?}");
        assert_eq!((found.len(), inst.lower_bound()), (4, 4));
    }

    #[test]
    fn the_portfolio_is_never_worse_than_a_baseline_and_the_search_only_helps() {
        let no_search = SearchBudget {
            iterations: 0,
            time: Duration::ZERO,
        };
        let search = SearchBudget {
            iterations: 1_000,
            time: Duration::from_secs(60),
        };
        let (mut fewer, mut total) = (0, 0);
        for inst in random_instances(20) {
            let portfolio = pack_within(&inst, no_search);
            let searched = pack_within(&inst, search);
            assert!(inst.is_valid(&portfolio) && inst.is_valid(&searched));
            for rule in Baseline::ALL {
                let baseline = in_input_order(&inst, rule);
                assert!(inst.is_valid(&baseline));
                assert!(portfolio.len() <= baseline.len(), "{rule:?}");
            }
            assert!(searched.len() <= portfolio.len());
            assert!(searched.len() >= inst.lower_bound());
            fewer += portfolio.len() - searched.len();
            total += portfolio.len();
        }
        assert!(fewer > 0, "the search saved no bin in {total}");
    }

    #[test]
    fn the_same_instance_and_iterations_give_the_same_packing() {
        let budget = SearchBudget {
            iterations: 1_000,
            time: Duration::from_secs(60),
        };
        for inst in random_instances(3) {
            assert_eq!(pack_within(&inst, budget), pack_within(&inst, budget));
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
