//! The dashboard's figures, computed from a [`Snapshot`] of the fleet: pure, so tests check
//! every figure against the fleet they seeded.

use std::collections::BTreeMap;

use berth_shared::spec::Tier;

/// One host as the dashboard sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub host_id: String,
    /// `ready`, `cordoned`, `draining` or `down`.
    pub state: &'static str,
    pub provider: String,
    pub region: String,
    pub instance_type: String,
    pub memory_total: u64,
    pub memory_reserved: u64,
    /// The sum of its tenants' memory caps.
    pub memory_committed: u64,
    /// The sum of what its tenants reported using.
    pub memory_used: u64,
    pub cpu_millicores: u64,
    /// What its tenants request (what placement counts) and what they used lately.
    pub cpu_committed_millicores: u64,
    pub cpu_used_millicores: u64,
    /// Disk its tenants' volumes may take, and what their sizes add up to.
    pub disk_capacity: u64,
    pub disk_committed: u64,
    pub tenants: u32,
    pub running: u32,
    pub oom_kills: u64,
    pub monthly_cost_cents: u64,
    pub currency: String,
    /// Since its last report; `None` when it never reported.
    pub report_age_ms: Option<i64>,
}

impl HostRow {
    /// Memory tenants may be given: total minus the host's reserve.
    pub fn memory_capacity(&self) -> u64 {
        self.memory_total.saturating_sub(self.memory_reserved)
    }

    /// How many more tenants of `tier` fit (memory, CPU and their volumes on disk); 0 unless
    /// the host takes placements.
    pub fn fits(&self, tier: &Tier) -> u64 {
        if self.state != "ready" {
            return 0;
        }
        let memory = self.memory_capacity().saturating_sub(self.memory_committed)
            / tier.resources.memory_bytes.max(1);
        let cpu = self
            .cpu_millicores
            .saturating_sub(self.cpu_committed_millicores)
            / u64::from(tier.resources.cpu_millicores.max(1));
        let disk = self.disk_capacity.saturating_sub(self.disk_committed)
            / tier.resources.volume_bytes.max(1);
        memory.min(cpu).min(disk)
    }
}

/// The fleet at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub now_ms: i64,
    pub hosts: Vec<HostRow>,
    pub tiers: Vec<Tier>,
    /// Per tier, its CPU request against what its running tenants use.
    pub tier_cpu: Vec<berth_shared::proto::TierCpu>,
    /// What a compaction with the defaults could save now.
    pub saving: Saving,
}

/// The hosts a compaction could empty now (`berthctl compact --dry-run`), what they cost per
/// month and the moves it takes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Saving {
    pub hosts: Vec<String>,
    pub monthly_cost_cents: u64,
    pub moves: u32,
}

/// Totals over a set of hosts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub hosts: u32,
    /// Hosts per state.
    pub states: BTreeMap<&'static str, u32>,
    pub tenants: u32,
    pub memory_total: u64,
    pub memory_reserved: u64,
    pub memory_capacity: u64,
    pub memory_committed: u64,
    pub memory_used: u64,
    pub monthly_cost_cents: u64,
}

impl Totals {
    fn add(&mut self, h: &HostRow) {
        self.hosts += 1;
        *self.states.entry(h.state).or_default() += 1;
        self.tenants += h.tenants;
        self.memory_total += h.memory_total;
        self.memory_reserved += h.memory_reserved;
        self.memory_capacity += h.memory_capacity();
        self.memory_committed += h.memory_committed;
        self.memory_used += h.memory_used;
        self.monthly_cost_cents += h.monthly_cost_cents;
    }

    /// Tenants per host.
    pub fn density(&self) -> f64 {
        if self.hosts == 0 {
            0.0
        } else {
            f64::from(self.tenants) / f64::from(self.hosts)
        }
    }

    /// Monthly cost per tenant, in cents; `None` without tenants.
    pub fn cost_per_tenant_cents(&self) -> Option<f64> {
        (self.tenants > 0).then(|| self.monthly_cost_cents as f64 / f64::from(self.tenants))
    }
}

/// How many more tenants of one tier fit, where.
#[derive(Debug, Clone, PartialEq)]
pub struct TierFit {
    pub tier: Tier,
    pub total: u64,
    pub regions: Vec<RegionFit>,
}

/// How many more tenants of a tier fit in one `provider region`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionFit {
    pub region: String,
    pub tenants: u64,
    /// The hosts with the most room (at most 3), with how many each takes.
    pub hosts: Vec<(String, u64)>,
}

/// Everything on the fleet page.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetFigures {
    pub overall: Totals,
    pub by_provider: BTreeMap<String, Totals>,
    /// Keyed `provider region`.
    pub by_region: BTreeMap<String, Totals>,
    /// The fleet's currency, or `mixed` when hosts report different ones.
    pub currency: String,
    pub fits: Vec<TierFit>,
}

pub fn region_key(h: &HostRow) -> String {
    format!("{} {}", h.provider, h.region)
}

impl FleetFigures {
    pub fn of(snapshot: &Snapshot) -> Self {
        let mut overall = Totals::default();
        let mut by_provider: BTreeMap<String, Totals> = BTreeMap::new();
        let mut by_region: BTreeMap<String, Totals> = BTreeMap::new();
        for h in &snapshot.hosts {
            overall.add(h);
            by_provider.entry(h.provider.clone()).or_default().add(h);
            by_region.entry(region_key(h)).or_default().add(h);
        }
        let mut currencies: Vec<&str> = snapshot
            .hosts
            .iter()
            .filter(|h| h.monthly_cost_cents > 0)
            .map(|h| h.currency.as_str())
            .collect();
        currencies.sort_unstable();
        currencies.dedup();
        let currency = match currencies.as_slice() {
            [] => "EUR".to_string(),
            [one] => (*one).to_string(),
            _ => "mixed".to_string(),
        };
        let fits = snapshot
            .tiers
            .iter()
            .map(|tier| {
                let mut regions: BTreeMap<String, (u64, Vec<(String, u64)>)> = BTreeMap::new();
                for h in &snapshot.hosts {
                    let n = h.fits(tier);
                    if n > 0 {
                        let entry = regions.entry(region_key(h)).or_default();
                        entry.0 += n;
                        entry.1.push((h.host_id.clone(), n));
                    }
                }
                let regions: Vec<_> = regions
                    .into_iter()
                    .map(|(region, (tenants, mut hosts))| {
                        hosts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                        hosts.truncate(3);
                        RegionFit {
                            region,
                            tenants,
                            hosts,
                        }
                    })
                    .collect();
                TierFit {
                    tier: tier.clone(),
                    total: regions.iter().map(|r| r.tenants).sum(),
                    regions,
                }
            })
            .collect();
        Self {
            overall,
            by_provider,
            by_region,
            currency,
            fits,
        }
    }
}
