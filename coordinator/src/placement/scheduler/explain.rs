//! Why nothing fits, and what host type would.

use std::fmt;

use berth_shared::host::Provider;
use berth_shared::spec::Constraints;
use serde::{Deserialize, Serialize};

use super::Vec3;

/// The filters, in the order they are applied; a host is counted under the first one that
/// removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    State,
    Provider,
    Region,
    Labels,
    Capability,
    AntiAffinity,
    Memory,
    Cpu,
    Disk,
}

impl Filter {
    /// What the filter says of one host that it removes.
    pub fn reason(self) -> &'static str {
        match self {
            Filter::State => "not ready (cordoned, draining or down)",
            Filter::Provider => "outside the allowed providers",
            Filter::Region => "outside the allowed regions",
            Filter::Labels => "without the required labels",
            Filter::Capability => "without dm-crypt (the volume is encrypted)",
            Filter::AntiAffinity => "already runs a tenant of the anti-affinity group",
            Filter::Memory => "short of memory",
            Filter::Cpu => "short of CPU",
            Filter::Disk => "short of disk",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterCount {
    pub filter: Filter,
    pub hosts: u32,
    /// For resource filters: the smallest amount missing on any host (bytes or millicores).
    pub closest_shortfall: Option<u64>,
}

/// A host type that could be bought.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub provider: Provider,
    pub instance_type: String,
    pub memory_bytes: u64,
    pub cpus: u32,
    /// Monthly price in cents (one currency for the whole catalog).
    pub monthly_cost_cents: u64,
    pub regions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub provider: Provider,
    pub instance_type: String,
    pub region: String,
    pub monthly_cost_cents: u64,
}

/// A refusal with its explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub hosts_considered: u32,
    pub removed: Vec<FilterCount>,
    pub constraints: Constraints,
    pub recommendation: Option<Recommendation>,
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hosts_considered == 0 {
            f.write_str("no host fits: the fleet has no hosts")?;
        } else {
            write!(f, "no host fits ({} considered)", self.hosts_considered)?;
            for (i, c) in self.removed.iter().enumerate() {
                f.write_str(if i == 0 { ": " } else { "; " })?;
                let n = c.hosts;
                let hosts = if n == 1 {
                    "1 host".to_string()
                } else {
                    format!("{n} hosts")
                };
                match (c.filter, c.closest_shortfall) {
                    (Filter::State, _) => {
                        write!(f, "state: {hosts} not ready (cordoned, draining or down)")?
                    }
                    (Filter::Provider, _) => write!(
                        f,
                        "provider: {hosts} not {}",
                        join(
                            &self
                                .constraints
                                .providers
                                .iter()
                                .map(|p| p.as_str().to_string())
                                .collect::<Vec<_>>()
                        )
                    )?,
                    (Filter::Region, _) => write!(
                        f,
                        "region: {hosts} outside {}",
                        join(&self.constraints.regions)
                    )?,
                    (Filter::Labels, _) => write!(
                        f,
                        "labels: {hosts} without {}",
                        join(
                            &self
                                .constraints
                                .labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                        )
                    )?,
                    (Filter::Capability, _) => write!(
                        f,
                        "capability: {hosts} without dm-crypt (the volume is encrypted)"
                    )?,
                    (Filter::AntiAffinity, _) => write!(
                        f,
                        "anti-affinity: {hosts} already run a tenant of group {}",
                        self.constraints
                            .anti_affinity_group
                            .as_deref()
                            .unwrap_or("")
                    )?,
                    (Filter::Memory, Some(s)) => {
                        write!(f, "memory: {hosts} short, closest by {}", mib(s))?
                    }
                    (Filter::Cpu, Some(s)) => {
                        write!(f, "cpu: {hosts} short, closest by {s} millicores")?
                    }
                    (Filter::Disk, Some(s)) => {
                        write!(f, "disk: {hosts} short, closest by {}", mib(s))?
                    }
                    (_, None) => write!(f, "{:?}: {hosts}", c.filter)?,
                }
            }
        }
        if let Some(r) = &self.recommendation {
            write!(
                f,
                "; cheapest host type that would take it: {} {} in {} ({}.{:02}/month)",
                r.provider.as_str(),
                r.instance_type,
                r.region,
                r.monthly_cost_cents / 100,
                r.monthly_cost_cents % 100
            )?;
        }
        Ok(())
    }
}

fn join(items: &[String]) -> String {
    if items.is_empty() {
        "any".into()
    } else {
        items.join(",")
    }
}

/// The cheapest catalog entry, in an allowed provider and region, whose allocatable share
/// (memory minus `reserve`) takes `need`.
pub fn recommend(
    catalog: &[CatalogEntry],
    need: Vec3,
    reserve_bytes: u64,
    constraints: &Constraints,
) -> Option<Recommendation> {
    catalog
        .iter()
        .filter(|e| constraints.provider_allowed(e.provider))
        .filter(|e| {
            e.memory_bytes.saturating_sub(reserve_bytes) >= need.mem
                && u64::from(e.cpus) * 1000 >= need.cpu
        })
        .filter_map(|e| {
            e.regions
                .iter()
                .find(|r| constraints.region_allowed(r))
                .map(|r| (e, r))
        })
        .min_by(|(a, _), (b, _)| {
            a.monthly_cost_cents
                .cmp(&b.monthly_cost_cents)
                .then_with(|| a.instance_type.cmp(&b.instance_type))
        })
        .map(|(e, region)| Recommendation {
            provider: e.provider,
            instance_type: e.instance_type.clone(),
            region: region.clone(),
            monthly_cost_cents: e.monthly_cost_cents,
        })
}
