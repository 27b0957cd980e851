//! A synthetic fleet for measuring decisions: hosts across Hetzner and AWS regions with
//! realistic sizes, filled with tenants of the default tiers through the scheduler itself.
//! Deterministic for a seed.

use berth_shared::host::Provider;
use berth_shared::ids::HostId;
use berth_shared::spec::Constraints;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::placement::scheduler::{HostInfo, Request, Scheduler, Strategy, Vec3};

const GIB: u64 = 1 << 30;
const REGIONS: [(Provider, &str); 5] = [
    (Provider::Hetzner, "fsn1"),
    (Provider::Hetzner, "nbg1"),
    (Provider::Hetzner, "hel1"),
    (Provider::Aws, "eu-central-1"),
    (Provider::Aws, "eu-west-1"),
];

/// A tenant request drawn like real signups: mostly small tiers, some constraints.
#[derive(Debug, Clone)]
pub struct SyntheticRequest {
    pub need: Vec3,
    pub constraints: Constraints,
}

impl SyntheticRequest {
    pub fn request(&self) -> Request<'_> {
        Request {
            need: self.need,
            encrypted: false,
            constraints: &self.constraints,
            strategy: Strategy::Binpack,
        }
    }
}

pub fn request(rng: &mut StdRng, tenant_no: usize) -> SyntheticRequest {
    let (mem, cpu) = match rng.random_range(0..10) {
        0..=5 => (256 << 20, 250),
        6..=8 => (GIB, 500),
        _ => (1536 << 20, 1000),
    };
    let mut constraints = Constraints::default();
    match rng.random_range(0..10) {
        0..=2 => {
            constraints.regions = vec![REGIONS[rng.random_range(0..REGIONS.len())].1.to_string()]
        }
        3 => constraints.providers = vec![Provider::Hetzner],
        4 => constraints.anti_affinity_group = Some(format!("customer-{}", tenant_no % 5000)),
        _ => {}
    }
    SyntheticRequest {
        need: Vec3 {
            mem,
            cpu,
            disk: 5 * GIB,
        },
        constraints,
    }
}

/// `hosts` hosts with `tenants` tenants placed; returns the scheduler and the RNG to draw
/// further requests from.
pub fn fleet(hosts: usize, tenants: usize, seed: u64) -> (Scheduler, StdRng) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut scheduler = Scheduler::new();
    for i in 0..hosts {
        let (provider, region) = REGIONS[i % REGIONS.len()];
        let (mem_gib, cpus, cost) = match (provider, rng.random_range(0..3)) {
            (Provider::Hetzner, 0) => (32, 8, 4849),
            (Provider::Hetzner, 1) => (64, 16, 9649),
            (Provider::Hetzner, _) => (32, 16, 3240),
            (_, 0) => (32, 8, 30800),
            (_, 1) => (64, 16, 61600),
            (_, _) => (16, 4, 15400),
        };
        scheduler.upsert_host(HostInfo {
            id: HostId::new(format!("{}-{region}-{i:05}", provider.as_str())).expect("valid id"),
            provider,
            region: region.into(),
            labels: Default::default(),
            dm_crypt: true,
            monthly_cost_cents: cost,
            allocatable: Vec3 {
                mem: (mem_gib - 2) * GIB,
                cpu: cpus * 1000,
                disk: 600 * GIB,
            },
            schedulable: true,
        });
    }
    let mut placed = 0;
    while placed < tenants {
        let r = request(&mut rng, placed);
        if let Ok(host) = scheduler.choose(&r.request()) {
            scheduler.commit(&host, r.need, r.constraints.anti_affinity_group.as_deref());
        }
        placed += 1;
    }
    (scheduler, rng)
}
