//! The baseline policies berth is measured against (`berth-bench`, in the same process on the
//! same input): first fit, best fit, Kubernetes' default spread (least allocated) and Nomad's
//! bin-pack score. Each sees the open bins' loads and returns the bin for an item, or `None` to
//! open a new one. Offline packing runs them too, so its portfolio is never worse than any.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    FirstFit,
    BestFit,
    Spread,
    Nomad,
}

impl Baseline {
    pub const ALL: [Baseline; 4] = [
        Baseline::FirstFit,
        Baseline::BestFit,
        Baseline::Spread,
        Baseline::Nomad,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::FirstFit => "first_fit",
            Self::BestFit => "best_fit",
            Self::Spread => "spread",
            Self::Nomad => "nomad",
        }
    }

    /// Bins with zero load count as closed: choosing one is opening a bin, which every policy
    /// does only when no loaded bin fits.
    pub fn choose(self, loads: &[Vec<u64>], cap: &[u64], item: &[u64]) -> Option<usize> {
        let fits = |l: &Vec<u64>| l.iter().zip(item).zip(cap).all(|((l, s), c)| l + s <= *c);
        let free_after = |l: &Vec<u64>| -> Vec<f64> {
            l.iter()
                .zip(item)
                .zip(cap)
                .map(|((l, s), c)| (c - l - s) as f64 / *c as f64)
                .collect()
        };
        // Free capacity left after the item, normalized and summed over dimensions.
        let free_sum = |l: &Vec<u64>| free_after(l).iter().sum::<f64>();
        let open = |l: &&Vec<u64>| l.iter().any(|x| *x > 0);
        let candidates = loads.iter().enumerate().filter(|(_, l)| open(l) && fits(l));
        let chosen = match self {
            Self::FirstFit => candidates.map(|(i, _)| i).next(),
            // Least free capacity left.
            Self::BestFit => candidates
                .min_by(|a, b| free_sum(a.1).total_cmp(&free_sum(b.1)))
                .map(|(i, _)| i),
            // Kubernetes NodeResourcesFit LeastAllocated: the most free capacity left.
            Self::Spread => candidates
                .max_by(|a, b| free_sum(a.1).total_cmp(&free_sum(b.1)))
                .map(|(i, _)| i),
            // Nomad's ScoreFitBinPack: 20 - (10^freeCpu + 10^freeMem), higher is better.
            Self::Nomad => candidates
                .max_by(|a, b| {
                    let score = |l: &Vec<u64>| {
                        20.0 - free_after(l).iter().map(|f| 10f64.powf(*f)).sum::<f64>()
                    };
                    score(a.1).total_cmp(&score(b.1))
                })
                .map(|(i, _)| i),
        };
        // Spread would rather open a new bin than fill one, but keeping hosts bounded is the
        // point of the comparison: like Kubernetes, it only spreads over existing nodes.
        chosen.or_else(|| loads.iter().position(|l| !open(&l) && fits(l)))
    }
}
