//! Placement decisions: pure logic, no I/O, deterministic for a given state.
//!
//! Ensures: a tenant is placed only on a host that is ready, has the capabilities it needs,
//! satisfies its constraints and has room in every resource (memory, CPU, disk), so the sum of
//! memory caps on a host never exceeds its capacity minus its reserve; a refusal happens only
//! when no host fits, and says why per filter.
//!
//! Speed: schedulable hosts are indexed by (provider, region) and free memory, so a decision
//! looks at a handful of best-fitting hosts instead of the whole fleet; when that fast path
//! finds nothing, an exhaustive pass decides, so the index never causes a false refusal.

pub mod baselines;
pub mod explain;
pub mod offline;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_shared::host::Provider;
use berth_shared::ids::HostId;
use berth_shared::spec::Constraints;
use serde::{Deserialize, Serialize};

pub use explain::{CatalogEntry, Filter, FilterCount, Recommendation, Refusal};

/// An amount of each scheduled resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Vec3 {
    pub mem: u64,
    /// CPU in millicores.
    pub cpu: u64,
    pub disk: u64,
}

impl Vec3 {
    pub fn fits_in(&self, room: &Vec3) -> bool {
        self.mem <= room.mem && self.cpu <= room.cpu && self.disk <= room.disk
    }
    pub fn saturating_sub(&self, o: &Vec3) -> Vec3 {
        Vec3 {
            mem: self.mem.saturating_sub(o.mem),
            cpu: self.cpu.saturating_sub(o.cpu),
            disk: self.disk.saturating_sub(o.disk),
        }
    }
    pub fn add(&self, o: &Vec3) -> Vec3 {
        Vec3 {
            mem: self.mem + o.mem,
            cpu: self.cpu + o.cpu,
            disk: self.disk + o.disk,
        }
    }
}

/// How to choose among hosts that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fill hosts before touching emptier ones (fewer hosts, lower cost).
    #[default]
    Binpack,
    /// Prefer the least allocated host (Kubernetes' default; more headroom per tenant).
    Spread,
}

/// What the scheduler knows of a host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInfo {
    pub id: HostId,
    pub provider: Provider,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub dm_crypt: bool,
    pub monthly_cost_cents: u64,
    /// Capacity minus the host's reserve.
    pub allocatable: Vec3,
    /// Ready: reporting, not cordoned, not draining.
    pub schedulable: bool,
}

impl HostInfo {
    /// Monthly cost per GiB of allocatable memory: the tie-break between equal choices.
    fn cost_per_gib(&self) -> f64 {
        self.monthly_cost_cents as f64
            / (self.allocatable.mem as f64 / f64::from(1u32 << 30)).max(1e-9)
    }
}

/// A tenant to place.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub need: Vec3,
    pub encrypted: bool,
    pub constraints: &'a Constraints,
    pub strategy: Strategy,
}

#[derive(Debug, Clone)]
struct Slot {
    info: HostInfo,
    used: Vec3,
    groups: HashMap<String, u32>,
}

impl Slot {
    fn free(&self) -> Vec3 {
        self.info.allocatable.saturating_sub(&self.used)
    }
}

type BucketKey = (Provider, String);

/// The fleet as the scheduler sees it.
#[derive(Debug, Default, Clone)]
pub struct Scheduler {
    slots: Vec<Slot>,
    index: HashMap<HostId, usize>,
    /// Schedulable hosts by (provider, region), each ordered by free memory and by free CPU.
    buckets: BTreeMap<BucketKey, Bucket>,
}

#[derive(Debug, Default, Clone)]
struct Bucket {
    by_mem: BTreeSet<(u64, usize)>,
    by_cpu: BTreeSet<(u64, usize)>,
}

/// Best-fitting hosts looked at per bucket and per index (memory, CPU) before scoring.
const CANDIDATES: usize = 8;
/// Hosts examined per bucket on the fast path before falling back to the exhaustive pass.
const SCAN_LIMIT: usize = 64;

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(info: &HostInfo) -> BucketKey {
        (info.provider, info.region.clone())
    }

    fn unindex(&mut self, slot: usize) {
        let s = &self.slots[slot];
        let key = Self::key(&s.info);
        let free = s.free();
        if let Some(bucket) = self.buckets.get_mut(&key) {
            bucket.by_mem.remove(&(free.mem, slot));
            bucket.by_cpu.remove(&(free.cpu, slot));
            if bucket.by_mem.is_empty() {
                self.buckets.remove(&key);
            }
        }
    }

    fn reindex(&mut self, slot: usize) {
        let s = &self.slots[slot];
        if s.info.schedulable {
            let free = s.free();
            let bucket = self.buckets.entry(Self::key(&s.info)).or_default();
            bucket.by_mem.insert((free.mem, slot));
            bucket.by_cpu.insert((free.cpu, slot));
        }
    }

    /// Adds a host or updates what is known of it (its usage is kept).
    pub fn upsert_host(&mut self, info: HostInfo) {
        match self.index.get(&info.id) {
            Some(&slot) => {
                self.unindex(slot);
                self.slots[slot].info = info;
                self.reindex(slot);
            }
            None => {
                let slot = self.slots.len();
                self.index.insert(info.id.clone(), slot);
                self.slots.push(Slot {
                    info,
                    used: Vec3::default(),
                    groups: HashMap::new(),
                });
                self.reindex(slot);
            }
        }
    }

    pub fn host(&self, id: &HostId) -> Option<(&HostInfo, Vec3)> {
        self.index
            .get(id)
            .map(|&s| (&self.slots[s].info, self.slots[s].used))
    }

    pub fn hosts(&self) -> impl Iterator<Item = (&HostInfo, Vec3)> {
        self.slots.iter().map(|s| (&s.info, s.used))
    }

    /// This fleet without host `id`: a drain's source, whose tenants go elsewhere and which a
    /// refusal must not count among the hosts considered.
    pub fn without(&self, id: &HostId) -> Self {
        let mut out = Self::new();
        for s in self.slots.iter().filter(|s| s.info.id != *id) {
            let slot = out.slots.len();
            out.index.insert(s.info.id.clone(), slot);
            out.slots.push(s.clone());
            out.reindex(slot);
        }
        out
    }

    /// This fleet with `percent` of every host's memory and CPU kept free: what a compaction
    /// may fill (a host already fuller than that takes nothing more).
    pub fn with_headroom(&self, percent: u32) -> Self {
        let keep = |v: u64| v - v / 100 * u64::from(percent.min(100));
        let mut out = Self::new();
        for s in &self.slots {
            let slot = out.slots.len();
            let mut s = s.clone();
            s.info.allocatable.mem = keep(s.info.allocatable.mem);
            s.info.allocatable.cpu = keep(s.info.allocatable.cpu);
            out.index.insert(s.info.id.clone(), slot);
            out.slots.push(s);
            out.reindex(slot);
        }
        out
    }

    pub fn set_schedulable(&mut self, id: &HostId, schedulable: bool) {
        if let Some(&slot) = self.index.get(id)
            && self.slots[slot].info.schedulable != schedulable
        {
            self.unindex(slot);
            self.slots[slot].info.schedulable = schedulable;
            self.reindex(slot);
        }
    }

    /// Records a placed tenant's usage. Not checked: existing placements are facts (a host may
    /// have shrunk since); only new decisions go through [`Scheduler::choose`].
    pub fn commit(&mut self, id: &HostId, need: Vec3, group: Option<&str>) {
        let Some(&slot) = self.index.get(id) else {
            return;
        };
        self.unindex(slot);
        let s = &mut self.slots[slot];
        s.used = s.used.add(&need);
        if let Some(g) = group {
            *s.groups.entry(g.to_string()).or_insert(0) += 1;
        }
        self.reindex(slot);
    }

    /// Releases a removed tenant's usage.
    pub fn release(&mut self, id: &HostId, need: Vec3, group: Option<&str>) {
        let Some(&slot) = self.index.get(id) else {
            return;
        };
        self.unindex(slot);
        let s = &mut self.slots[slot];
        s.used = s.used.saturating_sub(&need);
        if let Some(g) = group
            && let Some(n) = s.groups.get_mut(g)
        {
            *n -= 1;
            if *n == 0 {
                s.groups.remove(g);
            }
        }
        self.reindex(slot);
    }

    /// Whether `req` fits on one given host; the first filter that removes it otherwise (an
    /// unknown host is not ready).
    pub fn check(&self, id: &HostId, req: &Request<'_>) -> Result<(), Filter> {
        let slot = *self.index.get(id).ok_or(Filter::State)?;
        self.reject(slot, req).map_or(Ok(()), Err)
    }

    /// The first filter that removes `slot` for `req`, if any.
    fn reject(&self, slot: usize, req: &Request<'_>) -> Option<Filter> {
        let s = &self.slots[slot];
        let c = req.constraints;
        if !s.info.schedulable {
            return Some(Filter::State);
        }
        if !c.provider_allowed(s.info.provider) {
            return Some(Filter::Provider);
        }
        if !c.region_allowed(&s.info.region) {
            return Some(Filter::Region);
        }
        if c.labels
            .iter()
            .any(|(k, v)| s.info.labels.get(k) != Some(v))
        {
            return Some(Filter::Labels);
        }
        if req.encrypted && !s.info.dm_crypt {
            return Some(Filter::Capability);
        }
        if let Some(g) = &c.anti_affinity_group
            && s.groups.contains_key(g)
        {
            return Some(Filter::AntiAffinity);
        }
        let free = s.free();
        if req.need.mem > free.mem {
            return Some(Filter::Memory);
        }
        if req.need.cpu > free.cpu {
            return Some(Filter::Cpu);
        }
        if req.need.disk > free.disk {
            return Some(Filter::Disk);
        }
        None
    }

    /// Lower is better. Binpack: the host left fullest after placement (best fit on the sum of
    /// free fractions), with a small penalty for leaving memory and CPU lopsided (a host with
    /// free memory but no free CPU is wasted); measured on the Azure replay, see docs/performance.md.
    /// Spread: the host left emptiest.
    fn score(&self, slot: usize, req: &Request<'_>) -> f64 {
        let s = &self.slots[slot];
        let after = s.free().saturating_sub(&req.need);
        let cap = s.info.allocatable;
        let frac = |free: u64, cap: u64| {
            if cap == 0 {
                0.0
            } else {
                free as f64 / cap as f64
            }
        };
        let (m, c, d) = (
            frac(after.mem, cap.mem),
            frac(after.cpu, cap.cpu),
            frac(after.disk, cap.disk),
        );
        match req.strategy {
            // Disk weighs less: volumes are sparse files and rarely the binding resource.
            Strategy::Binpack => m + c + 0.2 * (m - c).abs() + 0.25 * d,
            Strategy::Spread => -(m + c + 0.25 * d),
        }
    }

    fn better(&self, a: (f64, usize), b: (f64, usize)) -> bool {
        let (sa, sb) = (&self.slots[a.1].info, &self.slots[b.1].info);
        match a.0.partial_cmp(&b.0) {
            Some(std::cmp::Ordering::Less) => true,
            Some(std::cmp::Ordering::Greater) => false,
            _ => match sa.cost_per_gib().partial_cmp(&sb.cost_per_gib()) {
                Some(std::cmp::Ordering::Less) => true,
                Some(std::cmp::Ordering::Greater) => false,
                _ => sa.id < sb.id,
            },
        }
    }

    /// Chooses a host for `req`, or explains why none fits.
    pub fn choose(&self, req: &Request<'_>) -> Result<HostId, Box<Refusal>> {
        let mut best: Option<(f64, usize)> = None;
        let mut truncated = false;
        let consider = |slot: usize, best: &mut Option<(f64, usize)>| {
            let candidate = (self.score(slot, req), slot);
            if best.is_none_or(|b| self.better(candidate, b)) {
                *best = Some(candidate);
            }
        };
        let allowed = self.buckets.iter().filter(|((p, r), _)| {
            req.constraints.provider_allowed(*p) && req.constraints.region_allowed(r)
        });
        for (_, bucket) in allowed {
            // The best-fitting hosts by memory and by CPU; binpack walks up from the request,
            // spread down from the emptiest.
            for (index, need) in [
                (&bucket.by_mem, req.need.mem),
                (&bucket.by_cpu, req.need.cpu),
            ] {
                let ordered: Box<dyn Iterator<Item = &(u64, usize)>> = match req.strategy {
                    Strategy::Binpack => Box::new(index.range((need, 0)..)),
                    Strategy::Spread => Box::new(index.range((need, 0)..).rev()),
                };
                let (mut found, mut scanned) = (0, 0);
                for &(_, slot) in ordered {
                    scanned += 1;
                    if self.reject(slot, req).is_none() {
                        consider(slot, &mut best);
                        found += 1;
                        if found >= CANDIDATES {
                            break;
                        }
                    }
                    if scanned >= SCAN_LIMIT {
                        truncated |= found == 0;
                        break;
                    }
                }
            }
        }
        if best.is_none() && truncated {
            best = self.exhaustive(req);
        }
        match best {
            Some((_, slot)) => Ok(self.slots[slot].info.id.clone()),
            None => Err(Box::new(self.explain(req))),
        }
    }

    /// Every host, no index: the fallback that keeps refusals exact.
    fn exhaustive(&self, req: &Request<'_>) -> Option<(f64, usize)> {
        let mut best: Option<(f64, usize)> = None;
        for slot in 0..self.slots.len() {
            if self.reject(slot, req).is_none() {
                let candidate = (self.score(slot, req), slot);
                if best.is_none_or(|b| self.better(candidate, b)) {
                    best = Some(candidate);
                }
            }
        }
        best
    }

    fn explain(&self, req: &Request<'_>) -> Refusal {
        let mut counts: BTreeMap<Filter, FilterCount> = BTreeMap::new();
        for slot in 0..self.slots.len() {
            let Some(filter) = self.reject(slot, req) else {
                continue;
            };
            let entry = counts.entry(filter).or_insert(FilterCount {
                filter,
                hosts: 0,
                closest_shortfall: None,
            });
            entry.hosts += 1;
            let free = self.slots[slot].free();
            let shortfall = match filter {
                Filter::Memory => Some(req.need.mem - free.mem),
                Filter::Cpu => Some(req.need.cpu - free.cpu),
                Filter::Disk => Some(req.need.disk - free.disk),
                _ => None,
            };
            if let Some(s) = shortfall {
                entry.closest_shortfall =
                    Some(entry.closest_shortfall.map_or(s, |c: u64| c.min(s)));
            }
        }
        Refusal {
            hosts_considered: self.slots.len() as u32,
            removed: counts.into_values().collect(),
            constraints: req.constraints.clone(),
            recommendation: None,
        }
    }
}

#[cfg(test)]
mod tests;
